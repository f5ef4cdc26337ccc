//! The role each method needs (by gRPC path).

use crate::Role;

/// What a method asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// This role on the request's instance.
    Role(Role),
    /// Any role at all on the request's instance (Capabilities: every client asks first).
    AnyRole,
}

/// The need of the method at `path` (`/package.Service/Method`); `None` for paths Kiln does
/// not serve (they are answered UNIMPLEMENTED anyway).
pub fn need(path: &str) -> Option<Need> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    let role = match (service, method) {
        ("build.bazel.remote.execution.v2.Capabilities", _) => return Some(Need::AnyRole),
        (
            "build.bazel.remote.execution.v2.ContentAddressableStorage",
            "BatchUpdateBlobs" | "SpliceBlob",
        ) => Role::CacheWrite,
        ("build.bazel.remote.execution.v2.ContentAddressableStorage", _) => Role::CacheRead,
        ("google.bytestream.ByteStream", "Read") => Role::CacheRead,
        ("google.bytestream.ByteStream", _) => Role::CacheWrite,
        ("build.bazel.remote.execution.v2.ActionCache", "UpdateActionResult") => Role::AcWrite,
        ("build.bazel.remote.execution.v2.ActionCache", _) => Role::CacheRead,
        ("build.bazel.remote.execution.v2.Execution", _) => Role::Execute,
        // A fetch makes the server download into the CAS: a write. A push vouches for what a
        // URL holds, which every later fetch trusts: like writing the action cache.
        ("build.bazel.remote.asset.v1.Fetch", _) => Role::CacheWrite,
        ("build.bazel.remote.asset.v1.Push", _) => Role::AcWrite,
        ("google.longrunning.Operations", _) => Role::Execute,
        ("kiln.worker.v1.WorkerApi", _) => Role::Worker,
        // Callers without credentials enrol with a join token, which the method checks.
        ("kiln.worker.v1.Enrolment", _) => return None,
        _ => return None,
    };
    Some(Need::Role(role))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_has_its_role() {
        let cases = [
            (
                "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities",
                Need::AnyRole,
            ),
            (
                "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
                Need::Role(Role::CacheRead),
            ),
            (
                "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs",
                Need::Role(Role::CacheRead),
            ),
            (
                "/build.bazel.remote.execution.v2.ContentAddressableStorage/GetTree",
                Need::Role(Role::CacheRead),
            ),
            (
                "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs",
                Need::Role(Role::CacheWrite),
            ),
            (
                "/build.bazel.remote.execution.v2.ContentAddressableStorage/SpliceBlob",
                Need::Role(Role::CacheWrite),
            ),
            (
                "/build.bazel.remote.execution.v2.ContentAddressableStorage/SplitBlob",
                Need::Role(Role::CacheRead),
            ),
            (
                "/build.bazel.remote.asset.v1.Fetch/FetchBlob",
                Need::Role(Role::CacheWrite),
            ),
            (
                "/build.bazel.remote.asset.v1.Push/PushDirectory",
                Need::Role(Role::AcWrite),
            ),
            (
                "/google.bytestream.ByteStream/Read",
                Need::Role(Role::CacheRead),
            ),
            (
                "/google.bytestream.ByteStream/Write",
                Need::Role(Role::CacheWrite),
            ),
            (
                "/google.bytestream.ByteStream/QueryWriteStatus",
                Need::Role(Role::CacheWrite),
            ),
            (
                "/build.bazel.remote.execution.v2.ActionCache/GetActionResult",
                Need::Role(Role::CacheRead),
            ),
            (
                "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult",
                Need::Role(Role::AcWrite),
            ),
            (
                "/build.bazel.remote.execution.v2.Execution/Execute",
                Need::Role(Role::Execute),
            ),
            (
                "/build.bazel.remote.execution.v2.Execution/WaitExecution",
                Need::Role(Role::Execute),
            ),
            (
                "/google.longrunning.Operations/GetOperation",
                Need::Role(Role::Execute),
            ),
            (
                "/kiln.worker.v1.WorkerApi/Session",
                Need::Role(Role::Worker),
            ),
        ];
        for (path, want) in cases {
            assert_eq!(need(path), Some(want), "{path}");
        }
        assert_eq!(need("/other.Service/Method"), None);
        assert_eq!(need("garbage"), None);
    }
}
