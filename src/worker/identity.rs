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

/// The users actions run as, from `worker.run_as_user`: one shared, or one per running
/// action (distinct users; fewer than `max_inflight` bound the actions run at once).
pub fn run_as_user(
    config: &Config,
) -> anyhow::Result<Option<std::sync::Arc<kiln_worker::run_as::ActionUsers>>> {
    use kiln_config::RunAsUser;
    use kiln_worker::run_as::{ActionUsers, RunAs};
    let lookup = |u: &str| RunAs::lookup(u).map_err(anyhow::Error::msg);
    let users = match &config.worker.run_as_user {
        None => return Ok(None),
        Some(RunAsUser::Shared(user)) => ActionUsers::shared(lookup(user)?),
        Some(RunAsUser::Each(names)) => {
            if names.is_empty() {
                anyhow::bail!("worker.run_as_user: an empty list (leave it out to run actions as the worker's user)");
            }
            let users = names
                .iter()
                .map(|u| lookup(u))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut uids = std::collections::HashSet::new();
            if let Some(twice) = users.iter().find(|u| !uids.insert(u.uid)) {
                anyhow::bail!(
                    "worker.run_as_user: uid {} is listed more than once ({}); each action needs a user of its own",
                    twice.uid,
                    twice.name
                );
            }
            let slots = max_inflight(config);
            if users.len() < slots {
                tracing::warn!(
                    users = users.len(),
                    slots,
                    "worker.run_as_user lists fewer users than worker.max_inflight: at most one action per user runs at once"
                );
            }
            ActionUsers::each(users)
        }
    };
    Ok(Some(std::sync::Arc::new(users)))
}

/// Actions at once: the configured number, or one per core.
pub fn max_inflight(config: &Config) -> usize {
    match config.worker.max_inflight {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}
