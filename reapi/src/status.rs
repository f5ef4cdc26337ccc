//! What went wrong, as a kind, and the one table from kinds to gRPC codes; plus the one
//! builder of REAPI's `PreconditionFailure` for blobs a request needs that are not in the CAS.
//!
//! Every error enum in Kiln says which [`ErrorKind`] each of its variants is (by implementing
//! [`Classify`]), and errors get their codes only here. (A few answers that are not errors of
//! a type pick their code where they are given: see `docs/architecture.md`.) An error that wraps another (a blob
//! request's store failure, a worker's local-CAS failure) asks the inner one for its kind, so
//! the same failure gets the same code on every path.

use crate::digest::Digest;
use kiln_proto::google::rpc::{
    precondition_failure::Violation, PreconditionFailure, Status as RpcStatus,
};
use prost::Message;
use tonic::Code;

/// What kind of failure an error is, in the terms REAPI chooses status codes by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request is malformed or breaks a rule of the protocol.
    Invalid,
    /// What was asked for is not there.
    Missing,
    /// An offset outside what is there.
    OutOfRange,
    /// Something the request depends on is not there (an action's inputs), or no worker can
    /// run it; the client can fix it and retry.
    Precondition,
    /// Over a capacity that frees up with time: uploads staging, the queue, the disk.
    Exhausted,
    /// A conflict with another request in progress (a second writer of one upload).
    Conflict,
    /// The caller did not identify itself.
    Unauthenticated,
    /// The caller may not do this.
    Denied,
    /// Took too long: a deadline, or a stream that stalled.
    TimedOut,
    /// Stopped on request.
    Cancelled,
    /// Going down, or a part the request needs is unreachable: retry, here or elsewhere.
    Unavailable,
    /// Not offered by this server.
    Unsupported,
    /// A fault of the server's own: logged where it happened, named but not detailed to the
    /// client.
    Internal,
}

impl ErrorKind {
    /// The gRPC code for this kind: the one table.
    pub const fn code(self) -> Code {
        match self {
            ErrorKind::Invalid => Code::InvalidArgument,
            ErrorKind::Missing => Code::NotFound,
            ErrorKind::OutOfRange => Code::OutOfRange,
            ErrorKind::Precondition => Code::FailedPrecondition,
            ErrorKind::Exhausted => Code::ResourceExhausted,
            ErrorKind::Conflict => Code::Aborted,
            ErrorKind::Unauthenticated => Code::Unauthenticated,
            ErrorKind::Denied => Code::PermissionDenied,
            ErrorKind::TimedOut => Code::DeadlineExceeded,
            ErrorKind::Cancelled => Code::Cancelled,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::Unsupported => Code::Unimplemented,
            ErrorKind::Internal => Code::Internal,
        }
    }

    /// The kind of a local I/O failure: a full disk (or quota) is [`ErrorKind::Exhausted`],
    /// anything else [`ErrorKind::Internal`].
    pub fn of_io(e: &std::io::Error) -> ErrorKind {
        let full = e.kind() == std::io::ErrorKind::StorageFull
            || e.kind() == std::io::ErrorKind::QuotaExceeded
            || matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT));
        if full {
            ErrorKind::Exhausted
        } else {
            ErrorKind::Internal
        }
    }

    /// Whether an error of this kind is the server's fault (and so worth an `error!` log line),
    /// rather than a refusal of the request.
    pub fn is_server_fault(self) -> bool {
        matches!(self, ErrorKind::Internal | ErrorKind::Exhausted)
    }
}

/// An error that knows its [`ErrorKind`]; its statuses follow from the table.
pub trait Classify: std::fmt::Display {
    /// Which kind of failure this is.
    fn kind(&self) -> ErrorKind;

    /// The message a client sees; by default the error itself.
    fn client_message(&self) -> String {
        self.to_string()
    }

    /// Error details the statuses carry (a `PreconditionFailure` naming missing blobs); none
    /// by default.
    fn details(&self) -> Vec<prost_types::Any> {
        Vec::new()
    }

    /// The gRPC status of a failed call (details, when there are any, in the
    /// `grpc-status-details-bin` trailer).
    fn status(&self) -> tonic::Status {
        let details = self.details();
        if details.is_empty() {
            return tonic::Status::new(self.kind().code(), self.client_message());
        }
        to_tonic(&self.rpc_status())
    }

    /// The `google.rpc.Status` of a failed item inside a response (a batch entry, an
    /// `ExecuteResponse`).
    fn rpc_status(&self) -> RpcStatus {
        RpcStatus {
            code: self.kind().code() as i32,
            message: self.client_message(),
            details: self.details(),
        }
    }
}

/// The most `MISSING` violations one status lists: enough for a client to see what is wrong,
/// few enough that the status fits in every client's trailer limit. (Clients such as Bazel
/// upload every missing input again, found with `FindMissingBlobs`, whatever the list holds.)
pub const MAX_VIOLATIONS: usize = 32;

/// `FAILED_PRECONDITION` for blobs a request needs that are not in the CAS. REAPI
/// (`Execution.Execute`):
//# `FAILED_PRECONDITION`: One or more errors occurred in setting up the
//# action requested, such as a missing input or command or no worker being
//# available. The client may be able to fix the errors and retry.
/// and "the server SHOULD additionally send a PreconditionFailure error detail where, for each
/// requested blob not present in the CAS, there is a Violation with a type of MISSING and a
/// subject of "blobs/{hash}/{size}"". Lists at most [`MAX_VIOLATIONS`] (sorted, without
/// repeats); the message gives the whole count. `context` says who needs them ("the action").
pub fn missing_blobs(context: &str, mut missing: Vec<Digest>) -> RpcStatus {
    missing.sort();
    missing.dedup();
    let violations = missing
        .iter()
        .take(MAX_VIOLATIONS)
        .map(|d| Violation {
            r#type: "MISSING".into(),
            subject: format!("blobs/{}/{}", d.hex(), d.size),
            description: format!("{d:?} is not in the CAS"),
        })
        .collect();
    let more = missing.len().saturating_sub(MAX_VIOLATIONS);
    let message = if more > 0 {
        format!(
            "{} blob(s) {context} needs are missing; the first {MAX_VIOLATIONS} are listed, {more} more are not",
            missing.len()
        )
    } else {
        format!(
            "{} blob(s) {context} needs are missing, e.g. {:?}",
            missing.len(),
            missing.first()
        )
    };
    RpcStatus {
        code: ErrorKind::Precondition.code() as i32,
        message,
        details: vec![any(
            "google.rpc.PreconditionFailure",
            &PreconditionFailure { violations },
        )],
    }
}

/// A `google.rpc.Status` as the status of a failed call, its details carried in the
/// `grpc-status-details-bin` trailer as the whole encoded status (as gRPC specifies).
pub fn to_tonic(status: &RpcStatus) -> tonic::Status {
    tonic::Status::with_details(
        Code::from_i32(status.code),
        status.message.clone(),
        status.encode_to_vec().into(),
    )
}

/// `message` packed as a `google.protobuf.Any` of type `type_name`.
pub fn any(type_name: &str, message: &impl Message) -> prost_types::Any {
    prost_types::Any {
        type_url: format!("type.googleapis.com/{type_name}"),
        value: message.encode_to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::DigestFunction;

    #[test]
    fn every_kind_has_its_own_code() {
        let kinds = [
            ErrorKind::Invalid,
            ErrorKind::Missing,
            ErrorKind::OutOfRange,
            ErrorKind::Precondition,
            ErrorKind::Exhausted,
            ErrorKind::Conflict,
            ErrorKind::Unauthenticated,
            ErrorKind::Denied,
            ErrorKind::TimedOut,
            ErrorKind::Cancelled,
            ErrorKind::Unavailable,
            ErrorKind::Unsupported,
            ErrorKind::Internal,
        ];
        let codes: std::collections::HashSet<i32> = kinds.iter().map(|k| k.code() as i32).collect();
        assert_eq!(codes.len(), kinds.len());
        assert!(!codes.contains(&(Code::Ok as i32)));
        assert!(!codes.contains(&(Code::Unknown as i32)));
    }

    #[test]
    fn a_full_disk_is_exhausted_and_other_io_is_internal() {
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(ErrorKind::of_io(&full), ErrorKind::Exhausted);
        let quota = std::io::Error::from_raw_os_error(libc::EDQUOT);
        assert_eq!(ErrorKind::of_io(&quota), ErrorKind::Exhausted);
        let denied = std::io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(ErrorKind::of_io(&denied), ErrorKind::Internal);
    }

    /// An error with details when it names missing blobs, as `Execute`'s and the worker's
    /// missing inputs do; none otherwise.
    #[derive(Debug)]
    struct Missing(Vec<Digest>);

    impl std::fmt::Display for Missing {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "missing")
        }
    }

    impl Classify for Missing {
        fn kind(&self) -> ErrorKind {
            ErrorKind::Precondition
        }
        fn details(&self) -> Vec<prost_types::Any> {
            if self.0.is_empty() {
                return Vec::new();
            }
            missing_blobs("the action", self.0.clone()).details
        }
    }

    /// Details reach both the call's status (in its trailer) and an item's status; an error
    /// without details gets a plain status.
    #[test]
    fn details_reach_every_status_of_an_error() {
        let d = Digest::of(DigestFunction::Sha256, b"x");
        let e = Missing(vec![d]);
        assert_eq!(e.details().len(), 1);
        let rpc = e.rpc_status();
        assert_eq!(rpc.code, Code::FailedPrecondition as i32);
        assert_eq!(rpc.details, e.details());
        let status = e.status();
        assert_eq!(status.code(), Code::FailedPrecondition);
        let carried = RpcStatus::decode(status.details()).unwrap();
        assert_eq!(carried.details, e.details());
        let plain = Missing(Vec::new());
        assert!(plain.rpc_status().details.is_empty());
        assert!(plain.status().details().is_empty());
    }

    #[test]
    fn missing_blobs_lists_a_bounded_sorted_set_and_counts_all() {
        let digests: Vec<Digest> = (0..100u32)
            .flat_map(|i| {
                let d = Digest::of(DigestFunction::Sha256, &i.to_le_bytes());
                [d, d]
            })
            .collect();
        let status = missing_blobs("the action", digests.clone());
        assert_eq!(status.code, Code::FailedPrecondition as i32);
        assert!(status.message.starts_with("100 blob(s) the action needs"));
        assert!(status.message.contains("68 more"), "{}", status.message);
        assert_eq!(status.details.len(), 1);
        assert_eq!(
            status.details[0].type_url,
            "type.googleapis.com/google.rpc.PreconditionFailure"
        );
        let failure = PreconditionFailure::decode(status.details[0].value.as_slice()).unwrap();
        assert_eq!(failure.violations.len(), MAX_VIOLATIONS);
        let mut sorted = digests;
        sorted.sort();
        sorted.dedup();
        for (v, d) in failure.violations.iter().zip(&sorted) {
            assert_eq!(v.r#type, "MISSING");
            assert_eq!(v.subject, format!("blobs/{}/{}", d.hex(), d.size));
        }
        let one = missing_blobs("the action", sorted[..1].to_vec());
        let failure = PreconditionFailure::decode(one.details[0].value.as_slice()).unwrap();
        assert_eq!(failure.violations.len(), 1);
        let call = to_tonic(&one);
        assert_eq!(call.code(), Code::FailedPrecondition);
        assert_eq!(RpcStatus::decode(call.details()).unwrap(), one);
    }
}
