//! Throughput over the last minute: totals sampled once a second into a ring (sans-IO).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Running totals at one moment: calls finished, bytes received, bytes sent.
pub type Totals = (u64, u64, u64);

/// Rates over the sampled window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    /// Calls per second.
    pub calls: f64,
    /// Bytes received per second.
    pub bytes_in: f64,
    /// Bytes sent per second.
    pub bytes_out: f64,
    /// Length of the window.
    pub window: Duration,
}

/// The last minute of samples.
#[derive(Default)]
pub struct Sampler {
    samples: Mutex<VecDeque<(Instant, Totals)>>,
}

/// Samples kept (one a second, plus the start of the window).
const KEEP: usize = 61;

impl Sampler {
    /// Adds a sample.
    pub fn record(&self, at: Instant, totals: Totals) {
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        s.push_back((at, totals));
        while s.len() > KEEP {
            s.pop_front();
        }
    }

    /// Rates between the oldest and newest sample, if they span any time.
    pub fn rates(&self) -> Option<Rates> {
        let s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let (t0, a) = *s.front()?;
        let (t1, b) = *s.back()?;
        let window = t1.saturating_duration_since(t0);
        let secs = window.as_secs_f64();
        (secs > 0.0).then(|| Rates {
            calls: b.0.saturating_sub(a.0) as f64 / secs,
            bytes_in: b.1.saturating_sub(a.1) as f64 / secs,
            bytes_out: b.2.saturating_sub(a.2) as f64 / secs,
            window,
        })
    }

    /// Bytes per second (in + out) for each interval in the window, oldest first.
    pub fn series(&self) -> Vec<f64> {
        let s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        s.iter()
            .zip(s.iter().skip(1))
            .map(|((t0, a), (t1, b))| {
                let secs = t1.saturating_duration_since(*t0).as_secs_f64().max(1e-9);
                (b.1 + b.2).saturating_sub(a.1 + a.2) as f64 / secs
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_over_the_window_and_a_bounded_ring() {
        let s = Sampler::default();
        assert_eq!(s.rates(), None);
        let t = Instant::now();
        s.record(t, (0, 0, 0));
        s.record(t + Duration::from_secs(2), (10, 2000, 4000));
        let r = s.rates().unwrap();
        assert_eq!((r.calls, r.bytes_in, r.bytes_out), (5.0, 1000.0, 2000.0));
        assert_eq!(s.series(), vec![3000.0]);
        for i in 0..100 {
            s.record(t + Duration::from_secs(3 + i), (10, 2000, 4000));
        }
        assert_eq!(s.series().len(), KEEP - 1);
        assert_eq!(s.rates().unwrap().calls, 0.0, "old samples left the window");
    }
}
