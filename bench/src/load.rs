//! The load model: a warm-up that is not recorded, then a fixed duration or number of
//! operations, closed loop (each of `concurrency` slots starts its next operation when the
//! last finishes) or open loop (`rate` starts per second, latency counted from the scheduled
//! start so a slow server cannot hide its queueing).

use crate::cpu::CpuTimes;
use crate::stats::{Recorder, Sample};
use futures::future::BoxFuture;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One kind of operation a scenario repeats.
pub trait Workload: Send + Sync + 'static {
    /// Runs operation number `index`; returns one sample per step it took.
    fn run(self: Arc<Self>, index: u64) -> BoxFuture<'static, Vec<Sample>>;
}

/// How long and how hard to load.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    /// Operations in flight at once.
    pub concurrency: usize,
    /// Unrecorded load before measuring.
    pub warmup: Duration,
    /// Measure for this long...
    pub duration: Option<Duration>,
    /// ...or this many operations.
    pub ops: Option<u64>,
    /// Open-loop start rate (operations per second).
    pub rate: Option<f64>,
    /// Show a progress bar.
    pub progress: bool,
    /// Sample this process's CPU time when measuring starts and ends.
    pub server_pid: Option<u32>,
    /// Sample its resident memory this often during the measured phase.
    pub rss_every: Option<Duration>,
}

/// What a run measured.
pub struct Measured {
    /// The samples of the measured phase.
    pub recorder: Recorder,
    /// Length of the measured phase.
    pub elapsed: Duration,
    /// Workload steps run in the measured phase (a step may record several samples).
    pub operations: u64,
    /// The server's pid and its CPU time over the measured phase, when the pid was given.
    pub server_cpu: Option<(u32, std::io::Result<CpuTimes>)>,
    /// (seconds into the measured phase, bytes) samples of the server's resident memory.
    pub server_rss: Vec<(f64, u64)>,
}

struct Shared {
    recorder: Mutex<Recorder>,
    next: AtomicU64,
    measured_started: AtomicU64,
    done_ops: AtomicU64,
    done_bytes: AtomicU64,
    measured_ops: AtomicU64,
    stop: AtomicBool,
}

/// Runs `workload` according to `plan`.
pub async fn drive(workload: Arc<dyn Workload>, plan: &LoadPlan) -> Measured {
    let shared = Arc::new(Shared {
        recorder: Mutex::new(Recorder::default()),
        next: AtomicU64::new(0),
        measured_started: AtomicU64::new(0),
        done_ops: AtomicU64::new(0),
        done_bytes: AtomicU64::new(0),
        measured_ops: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let deadline = plan.duration.map(|d| measure_from + d);
    // The server's CPU clock is read when the measured phase begins (after the warm-up).
    let cpu_at_start = plan.server_pid.map(|pid| {
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            crate::cpu::read(pid)
        })
    });
    let progress = plan.progress.then(|| progress_bar(plan));
    let rss_sampler = match (plan.server_pid, plan.rss_every) {
        (Some(pid), Some(every)) => {
            let shared = shared.clone();
            Some(tokio::spawn(async move {
                tokio::time::sleep_until(measure_from.into()).await;
                let mut samples = Vec::new();
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    if shared.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match crate::cpu::resident(pid) {
                        Ok(bytes) => samples.push((measure_from.elapsed().as_secs_f64(), bytes)),
                        Err(_) => break,
                    }
                }
                samples
            }))
        }
        _ => None,
    };
    let ticker = progress.clone().map(|bar| {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let (ops, bytes) = (
                    shared.done_ops.load(Ordering::Relaxed),
                    shared.done_bytes.load(Ordering::Relaxed),
                );
                let now = Instant::now();
                let rate = (bytes - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
                last = (now, bytes);
                bar.set_position(ops);
                bar.set_message(format!("{:.1} MB/s", rate / 1e6));
                if shared.stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        })
    });

    // Decides whether another operation may start, and whether it is measured.
    let admit = {
        let shared = shared.clone();
        let ops = plan.ops;
        move || -> Option<(u64, bool)> {
            let now = Instant::now();
            if shared.stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| now >= d) {
                return None;
            }
            let measured = now >= measure_from;
            if measured {
                let n = shared.measured_started.fetch_add(1, Ordering::Relaxed);
                if ops.is_some_and(|limit| n >= limit) {
                    return None;
                }
            }
            Some((shared.next.fetch_add(1, Ordering::Relaxed), measured))
        }
    };

    let record = {
        let shared = shared.clone();
        move |samples: &[Sample], measured: bool| {
            if measured {
                shared.measured_ops.fetch_add(1, Ordering::Relaxed);
                let mut r = shared.recorder.lock().unwrap_or_else(|e| e.into_inner());
                for s in samples {
                    r.record(s);
                }
            }
            shared.done_ops.fetch_add(1, Ordering::Relaxed);
            let bytes: u64 = samples
                .iter()
                .filter(|s| s.error.is_none())
                .map(|s| s.bytes)
                .sum();
            shared.done_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    };

    match plan.rate {
        None => {
            let mut slots = Vec::new();
            for _ in 0..plan.concurrency.max(1) {
                let (workload, admit, record) = (workload.clone(), admit.clone(), record.clone());
                slots.push(tokio::spawn(async move {
                    while let Some((index, measured)) = admit() {
                        let samples = workload.clone().run(index).await;
                        record(&samples, measured);
                    }
                }));
            }
            for s in slots {
                let _ = s.await;
            }
        }
        Some(rate) => {
            let interval = Duration::from_secs_f64(1.0 / rate.max(1e-6));
            let permits = Arc::new(tokio::sync::Semaphore::new(plan.concurrency.max(1)));
            let mut running = tokio::task::JoinSet::new();
            let mut k = 0u32;
            loop {
                let scheduled = start + interval * k;
                k += 1;
                tokio::time::sleep_until(scheduled.into()).await;
                let Some((index, measured)) = admit() else {
                    break;
                };
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let (workload, record) = (workload.clone(), record.clone());
                running.spawn(async move {
                    let mut samples = workload.run(index).await;
                    // Count from when the operation should have started.
                    let queued = Instant::now().duration_since(scheduled);
                    for s in &mut samples {
                        s.latency = s.latency.max(queued);
                    }
                    record(&samples, measured);
                    drop(permit);
                });
            }
            while running.join_next().await.is_some() {}
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    let elapsed = Instant::now().saturating_duration_since(measure_from);
    let mut server_rss = match rss_sampler {
        Some(task) => task.await.unwrap_or_default(),
        None => Vec::new(),
    };
    if let (Some(pid), Some(_)) = (plan.server_pid, plan.rss_every) {
        if let Ok(bytes) = crate::cpu::resident(pid) {
            server_rss.push((elapsed.as_secs_f64(), bytes));
        }
    }
    let server_cpu = match (plan.server_pid, cpu_at_start) {
        (Some(pid), Some(start)) => {
            let end = crate::cpu::read(pid);
            let start = start
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            Some((pid, start.and_then(|s| end.map(|e| e.since(s)))))
        }
        _ => None,
    };
    if let Some(t) = ticker {
        let _ = t.await;
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let recorder = shared
        .recorder
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Measured {
        recorder,
        elapsed,
        operations: shared.measured_ops.load(Ordering::Relaxed),
        server_cpu,
        server_rss,
    }
}

fn progress_bar(plan: &LoadPlan) -> indicatif::ProgressBar {
    let bar = match plan.ops {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    let style = indicatif::ProgressStyle::with_template("{spinner} {elapsed} {pos} ops {msg}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
    bar.set_style(style);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sleepy;
    impl Workload for Sleepy {
        fn run(self: Arc<Self>, index: u64) -> BoxFuture<'static, Vec<Sample>> {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                vec![Sample::ok("sleep", Duration::from_millis(1), index)]
            })
        }
    }

    #[tokio::test]
    async fn ops_mode_measures_exactly_n_after_warmup() {
        let plan = LoadPlan {
            concurrency: 4,
            warmup: Duration::ZERO,
            duration: None,
            ops: Some(40),
            rate: None,
            progress: false,
            server_pid: None,
            rss_every: None,
        };
        let m = drive(Arc::new(Sleepy), &plan).await;
        assert_eq!(m.recorder.kinds["sleep"].ops, 40);
    }

    #[tokio::test]
    async fn open_loop_respects_the_rate() {
        let plan = LoadPlan {
            concurrency: 8,
            warmup: Duration::ZERO,
            duration: None,
            ops: Some(20),
            rate: Some(1000.0),
            progress: false,
            server_pid: None,
            rss_every: None,
        };
        let m = drive(Arc::new(Sleepy), &plan).await;
        assert_eq!(m.recorder.kinds["sleep"].ops, 20);
        assert!(m.elapsed >= Duration::from_millis(19), "{:?}", m.elapsed);
    }
}
