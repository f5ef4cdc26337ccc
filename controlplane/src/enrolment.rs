//! The enrolment service: the one call a caller without credentials may make. A worker
//! presents a one-time join token, its name and a certificate signing request, and gets a
//! client certificate signed by the farm CA. The signing and the token bookkeeping are the
//! [`Enroller`]'s (the binary's, which owns the farm CA); this is the gRPC face.

use kiln_proto::worker::enrolment_server::Enrolment;
use kiln_proto::worker::{EnrolRequest, EnrolResponse};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Issues certificates for join tokens.
pub trait Enroller: Send + Sync {
    /// Checks `token`, signs `csr_pem` for a worker named `name`, records the enrolment;
    /// returns (certificate PEM, CA PEM). Blocking: called off the async threads.
    fn enrol(&self, token: &str, name: &str, csr_pem: &str) -> Result<(String, String), Status>;
}

/// The gRPC service over an [`Enroller`].
pub struct EnrolmentService {
    enroller: Arc<dyn Enroller>,
}

impl EnrolmentService {
    /// Serves `enroller`.
    pub fn new(enroller: Arc<dyn Enroller>) -> EnrolmentService {
        EnrolmentService { enroller }
    }
}

/// Whether a worker name is acceptable: 1–64 of letters, digits, `.`, `_`, `-`.
pub fn valid_worker_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The largest certificate request taken.
const MAX_CSR_BYTES: usize = 64 << 10;

/// The largest enrolment request read: a certificate request of [`MAX_CSR_BYTES`], a name
/// and a token, with room to spare.
pub const MAX_REQUEST_BYTES: usize = MAX_CSR_BYTES + (32 << 10);

#[tonic::async_trait]
impl Enrolment for EnrolmentService {
    async fn enrol(
        &self,
        request: Request<EnrolRequest>,
    ) -> Result<Response<EnrolResponse>, Status> {
        let r = request.into_inner();
        if !valid_worker_name(&r.name) {
            return Err(Status::invalid_argument(format!(
                "worker name {:?}: use 1 to 64 letters, digits, '.', '_' or '-'",
                r.name
            )));
        }
        if r.csr_pem.len() > MAX_CSR_BYTES {
            return Err(Status::invalid_argument(
                "the certificate request is over 64 KiB",
            ));
        }
        let enroller = self.enroller.clone();
        let (certificate_pem, ca_pem) =
            tokio::task::spawn_blocking(move || enroller.enrol(&r.token, &r.name, &r.csr_pem))
                .await
                .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(EnrolResponse {
            certificate_pem,
            ca_pem,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_names_are_plain() {
        for ok in ["mac-1", "build.host_2", "a"] {
            assert!(valid_worker_name(ok), "{ok}");
        }
        for bad in ["", "a b", "x/y", "ü", &"n".repeat(65)] {
            assert!(!valid_worker_name(bad), "{bad}");
        }
    }
}
