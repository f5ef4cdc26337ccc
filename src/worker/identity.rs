//! Who the worker is and what it offers: its name, the user actions run as, and how many
//! run at once.

use kiln_config::Config;

/// This machine's host name ("" if it has none).
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    }
}

/// The name a worker enrols under by default: its host name, in the characters names allow.
pub(super) fn enrolment_name() -> String {
    let name: String = host_name()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect();
    if name.is_empty() {
        "worker".into()
    } else {
        name
    }
}

/// The worker's name: host name and process id (several workers may share a host).
pub fn default_name() -> String {
    let host = match host_name() {
        h if h.is_empty() => "worker".to_string(),
        h => h,
    };
    format!("{host}-{}", std::process::id())
}

/// The user actions run as, from `worker.run_as_user`.
pub fn run_as_user(config: &Config) -> anyhow::Result<Option<kiln_worker::run_as::RunAs>> {
    config
        .worker
        .run_as_user
        .as_deref()
        .map(|u| kiln_worker::run_as::RunAs::lookup(u).map_err(anyhow::Error::msg))
        .transpose()
}

/// Actions at once: the configured number, or one per core.
pub fn max_inflight(config: &Config) -> usize {
    match config.worker.max_inflight {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}
