//! The server's CPU time over the measured phase, from `/proc/PID/stat` (Linux), so that
//! every scenario can be compared per server CPU second: on a small box where client and
//! server share the cores, throughput alone hides the server's cost.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// CPU time a process has used: user and system.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CpuTimes {
    /// In user space.
    pub user: Duration,
    /// In the kernel on its behalf.
    pub system: Duration,
}

impl CpuTimes {
    /// The CPU used between `earlier` and `self`.
    pub fn since(self, earlier: CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

/// Parses the text of `/proc/PID/stat`: `utime` and `stime` (fields 14 and 15, in clock
/// ticks). The command name (field 2) may hold spaces and parentheses, so fields are counted
/// from its closing parenthesis.
pub fn parse_stat(text: &str, ticks_per_second: u64) -> Option<CpuTimes> {
    let (_, rest) = text.rsplit_once(") ")?;
    // `rest` starts at field 3 (state): utime is field 14, the 12th from here.
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    let tick = |t: u64| Duration::from_secs_f64(t as f64 / ticks_per_second.max(1) as f64);
    Some(CpuTimes {
        user: tick(user),
        system: tick(system),
    })
}

/// Reads the CPU times of process `pid` now.
pub fn read(pid: u32) -> std::io::Result<CpuTimes> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    parse_stat(&text, u64::try_from(ticks).unwrap_or(100)).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("cannot parse /proc/{pid}/stat"),
        )
    })
}

/// Resident memory of process `pid` now, in bytes (`VmRSS` in `/proc/PID/status`).
pub fn resident(pid: u32) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_vm_rss(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("no VmRSS in /proc/{pid}/status"),
        )
    })
}

/// `VmRSS:   123456 kB` → bytes.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The server's resident memory sampled through a run (a soak), as reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerRss {
    /// (seconds since the measured phase began, MiB) samples.
    pub samples: Vec<(f64, f64)>,
    /// The largest sample, MiB.
    pub max_mib: f64,
    /// Growth over the last two thirds of the run, MiB per minute (least squares).
    pub growth_mib_per_min: f64,
    /// That growth over the whole last two thirds, as a share of the RSS at its start.
    pub growth_percent: f64,
}

impl ServerRss {
    /// Summarises `samples` ((seconds, bytes)); `None` with fewer than three.
    pub fn new(samples: &[(f64, u64)]) -> Option<ServerRss> {
        if samples.len() < 3 {
            return None;
        }
        let mib: Vec<(f64, f64)> = samples
            .iter()
            .map(|(t, b)| (*t, *b as f64 / (1u64 << 20) as f64))
            .collect();
        let tail = &mib[mib.len() / 3..];
        let n = tail.len() as f64;
        let (mt, mm) = (
            tail.iter().map(|p| p.0).sum::<f64>() / n,
            tail.iter().map(|p| p.1).sum::<f64>() / n,
        );
        let var: f64 = tail.iter().map(|p| (p.0 - mt).powi(2)).sum();
        let slope = if var > 0.0 {
            tail.iter().map(|p| (p.0 - mt) * (p.1 - mm)).sum::<f64>() / var
        } else {
            0.0
        };
        let span = tail[tail.len() - 1].0 - tail[0].0;
        let start = tail[0].1.max(1e-9);
        Some(ServerRss {
            max_mib: mib.iter().map(|p| p.1).fold(0.0, f64::max),
            growth_mib_per_min: slope * 60.0,
            growth_percent: slope * span / start * 100.0,
            samples: mib,
        })
    }
}

/// The server's CPU over a run, as reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerCpu {
    /// The server's process id.
    pub pid: u32,
    /// CPU seconds in user space during the measured phase.
    pub user_seconds: f64,
    /// CPU seconds in the kernel during the measured phase.
    pub system_seconds: f64,
    /// Operations the measured phase ran (one per workload step, whatever it recorded).
    pub operations: u64,
    /// Server CPU microseconds per operation.
    pub micros_per_op: f64,
    /// Cores the server kept busy on average.
    pub cores: f64,
}

impl ServerCpu {
    /// The report of `used` CPU over `operations` in `seconds`.
    pub fn new(pid: u32, used: CpuTimes, operations: u64, seconds: f64) -> ServerCpu {
        let total = (used.user + used.system).as_secs_f64();
        ServerCpu {
            pid,
            user_seconds: used.user.as_secs_f64(),
            system_seconds: used.system.as_secs_f64(),
            operations,
            micros_per_op: if operations > 0 {
                total * 1e6 / operations as f64
            } else {
                0.0
            },
            cores: if seconds > 0.0 { total / seconds } else { 0.0 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // A command name with a space and a parenthesis, as a process may choose.
        let text = "4242 (kiln shard) 0) S 1 4242 4242 0 -1 4194560 2950 0 0 0 \
                    250 75 0 0 20 0 7 0 123 456 789\n";
        let t = parse_stat(text, 100).unwrap();
        assert_eq!(t.user, Duration::from_millis(2500));
        assert_eq!(t.system, Duration::from_millis(750));
        assert!(parse_stat("4242 (x) S 1", 100).is_none());
        let later = CpuTimes {
            user: Duration::from_secs(4),
            system: Duration::from_secs(1),
        };
        assert_eq!(
            later.since(t),
            CpuTimes {
                user: Duration::from_millis(1500),
                system: Duration::from_millis(250)
            }
        );
        let r = ServerCpu::new(1, later.since(t), 1000, 2.0);
        assert!((r.micros_per_op - 1750.0).abs() < 1e-6, "{r:?}");
        assert!((r.cores - 0.875).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn this_process_can_be_read() {
        let before = read(std::process::id()).unwrap();
        // Spin until the kernel has counted at least one tick of it (bounded).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut x = 0u64;
        let grew = loop {
            for _ in 0..1_000_000 {
                x = x.wrapping_add(std::hint::black_box(1));
            }
            let now = read(std::process::id()).unwrap();
            if now.since(before).user > Duration::ZERO {
                break true;
            }
            if std::time::Instant::now() > deadline {
                break false;
            }
        };
        std::hint::black_box(x);
        assert!(grew, "user time never grew while spinning");
    }

    #[test]
    fn rss_is_parsed_and_growth_is_the_slope_of_the_last_two_thirds() {
        assert_eq!(
            parse_vm_rss("Name:\tkiln\nVmRSS:\t  2048 kB\n"),
            Some(2 << 20)
        );
        assert_eq!(parse_vm_rss("Name: kiln\n"), None);
        // Fast growth in the first third, then 1 MiB per minute from 100 MiB.
        let mib = 1u64 << 20;
        let samples: Vec<(f64, u64)> = (0..30)
            .map(|i| {
                let t = i as f64 * 60.0;
                let m = if i < 10 { 10 * i } else { 100 + (i - 10) };
                (t, m as u64 * mib)
            })
            .collect();
        let r = ServerRss::new(&samples).unwrap();
        assert!((r.growth_mib_per_min - 1.0).abs() < 1e-9, "{r:?}");
        assert!((r.growth_percent - 19.0).abs() < 1e-9, "{r:?}");
        assert_eq!(r.max_mib, 119.0);
        assert!(ServerRss::new(&samples[..2]).is_none());
        assert!(resident(std::process::id()).unwrap() > 0);
    }
}
