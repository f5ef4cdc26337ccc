//! Process limits raised at start. The open-file limit bounds at once a server's connections,
//! its blob files being read and written, and each segment of a small-blob log; a worker's
//! inputs being fetched and its actions' pipes. Its usual soft default (1,024 on Linux, 256 for
//! a macOS launchd job) is far below what the hard limit allows.

/// macOS refuses a soft limit above `OPEN_MAX` when the hard limit is unlimited.
const MACOS_OPEN_MAX: libc::rlim_t = 10_240;

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
    let mut last = None;
    for want in [limit.rlim_max, limit.rlim_max.min(MACOS_OPEN_MAX)] {
        if want <= was {
            break;
        }
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct it is given, which lives for the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::info!(from = was, to = want, "open-file limit raised");
            return;
        }
        last = Some(std::io::Error::last_os_error());
    }
    if let Some(e) = last {
        tracing::warn!(limit = was, error = %e, "cannot raise the open-file limit; running within it");
    }
}
