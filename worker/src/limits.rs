//! The open-file limit, raised at start and lowered again for actions. It bounds at once a
//! server's connections, its blob files being read and written and each segment of a
//! small-blob log, and a worker's inputs being fetched; its usual soft default (1,024 on
//! Linux, 256 for a macOS launchd job) is far below what the hard limit allows. Actions run
//! with the soft limit the process was started with, as Go's runtime does for its children:
//! a tool that closes every descriptor up to the limit, or uses `select`, would otherwise
//! slow down or fail under a raised one, and differ from a run on the operator's own terms.

use std::sync::OnceLock;

/// macOS refuses a soft limit above `OPEN_MAX` when the hard limit is unlimited.
const MACOS_OPEN_MAX: libc::rlim_t = 10_240;

/// The soft limit the process was started with, once [`raise_open_files`] raised it.
static STARTED_WITH: OnceLock<u64> = OnceLock::new();

/// Raises the soft limit on open files to the hard limit (or, where the system refuses that,
/// to `OPEN_MAX`), and logs it. A failure is only logged: the process runs within the limit it
/// has.
pub fn raise_open_files() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(error = %e, "cannot read the open-file limit");
        return;
    }
    let was = limit.rlim_cur;
    let mut refused = None;
    for want in [limit.rlim_max, limit.rlim_max.min(MACOS_OPEN_MAX)] {
        if want <= was {
            // As high as this candidate allows (a refusal of a higher one stays reported).
            break;
        }
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct it is given, which lives for the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            let _ = STARTED_WITH.set(was);
            tracing::info!(from = was, to = want, "open-file limit raised");
            return;
        }
        refused = Some(std::io::Error::last_os_error());
    }
    if let Some(e) = refused {
        tracing::warn!(limit = was, error = %e, "cannot raise the open-file limit; running within it");
    }
}

/// The soft open-file limit an action gets: the one the process was started with, when
/// [`raise_open_files`] raised it (`None`: the process's own, unchanged).
pub fn for_actions() -> Option<u64> {
    STARTED_WITH.get().copied()
}

/// Sets the calling process's soft open-file limit to `soft` (at most its hard limit). Only
/// system calls: safe between `fork` and `exec`.
pub fn set_soft_open_files(soft: u64) -> std::io::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on a struct on this stack frame.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit.rlim_cur = soft.min(limit.rlim_max);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
