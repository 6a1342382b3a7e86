//! The recent past of each sink, for the status page's charts and `/api/v1/status`.
//!
//! Input: every `[admin] history_interval` (default 10 s) the admin endpoint's sampler
//! hands [`History::record`] each sink's running totals (messages stored into its buffer,
//! messages delivered) and its depth (everything pending, and the part of it that is the
//! current drain's backlog). Output: per sink the last [`KEPT`] samples, with the totals
//! turned into rates per second, and an estimate of when a draining backlog will be gone.
//! Kept in memory only, a fixed number of samples per sink, so memory does not grow with
//! uptime; a sink removed by a reload is forgotten at the next sample.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use parking_lot::Mutex;
use serde::Serialize;

/// Samples kept per sink: one hour at the default 10 s interval.
pub const KEPT: usize = 360;

/// Samples the drain estimate looks back over (one minute at the default interval).
const ETA_WINDOW: usize = 6;

/// One sample of one sink.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    /// Milliseconds since the Unix epoch.
    pub at: u64,
    /// Messages stored into the sink's buffer per second since the previous sample.
    pub received_per_second: f64,
    /// Messages the upstream confirmed per second since the previous sample.
    pub delivered_per_second: f64,
    /// Messages waiting (including in flight).
    pub pending: u64,
    /// Of those, the backlog of the current drain (0 when there is none).
    pub backlog: u64,
}

/// Running totals and depth of one sink at one moment, as the sampler reads them.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    pub at: u64,
    pub stored_total: u64,
    pub delivered_total: u64,
    pub pending: u64,
    pub backlog: u64,
}

#[derive(Default)]
struct Series {
    /// The previous reading's totals and when it was taken: rates are the difference.
    last: Option<(Instant, u64, u64)>,
    samples: VecDeque<Sample>,
}

/// Every sink's samples.
#[derive(Default)]
pub struct History {
    series: Mutex<HashMap<String, Series>>,
}

impl History {
    /// Records the readings taken at `now`; sinks absent from `readings` are forgotten.
    /// A sink's first reading only sets the base its rates are measured from.
    pub fn record(&self, now: Instant, readings: &[(&str, Reading)]) {
        let mut series = self.series.lock();
        series.retain(|name, _| readings.iter().any(|(n, _)| n == name));
        for (name, r) in readings {
            let s = series.entry((*name).to_string()).or_default();
            if let Some((then, stored, delivered)) = s.last {
                let seconds = now.duration_since(then).as_secs_f64().max(1e-3);
                let per_second = |now_total: u64, then_total: u64| {
                    let rate = now_total.saturating_sub(then_total) as f64 / seconds;
                    (rate * 100.0).round() / 100.0
                };
                if s.samples.len() == KEPT {
                    s.samples.pop_front();
                }
                s.samples.push_back(Sample {
                    at: r.at,
                    received_per_second: per_second(r.stored_total, stored),
                    delivered_per_second: per_second(r.delivered_total, delivered),
                    pending: r.pending,
                    backlog: r.backlog,
                });
            }
            s.last = Some((now, r.stored_total, r.delivered_total));
        }
    }

    /// The samples of `sink`, oldest first.
    pub fn samples(&self, sink: &str) -> Vec<Sample> {
        let series = self.series.lock();
        series
            .get(sink)
            .map(|s| s.samples.iter().copied().collect())
            .unwrap_or_default()
    }
}

/// Seconds until the backlog is gone at the pace it shrank over the last samples; `None`
/// when there is no backlog or it did not shrink.
pub fn drain_eta_seconds(samples: &[Sample]) -> Option<f64> {
    let last = samples.last()?;
    if last.backlog == 0 {
        return None;
    }
    let first = samples[samples.len().saturating_sub(ETA_WINDOW + 1)..].first()?;
    let seconds = last.at.saturating_sub(first.at) as f64 / 1000.0;
    let shrunk = first.backlog.saturating_sub(last.backlog) as f64;
    if seconds <= 0.0 || shrunk <= 0.0 {
        return None;
    }
    Some((last.backlog as f64 / (shrunk / seconds)).round())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn reading(at: u64, stored: u64, delivered: u64, backlog: u64) -> Reading {
        Reading {
            at,
            stored_total: stored,
            delivered_total: delivered,
            pending: backlog + 5,
            backlog,
        }
    }

    #[test]
    fn totals_become_rates_and_the_window_is_bounded() {
        let history = History::default();
        let t0 = Instant::now();
        history.record(t0, &[("cloud", reading(0, 100, 0, 0))]);
        assert!(
            history.samples("cloud").is_empty(),
            "the first reading is the base"
        );
        for i in 1..=(KEPT as u64 + 10) {
            let now = t0 + Duration::from_secs(10 * i);
            history.record(
                now,
                &[("cloud", reading(i * 10_000, 100 + 50 * i, 20 * i, 0))],
            );
        }
        let samples = history.samples("cloud");
        assert_eq!(samples.len(), KEPT);
        assert_eq!(samples[0].at, 11 * 10_000, "the oldest samples went first");
        assert_eq!(samples[KEPT - 1].received_per_second, 5.0);
        assert_eq!(samples[KEPT - 1].delivered_per_second, 2.0);
    }

    #[test]
    fn a_sink_that_went_away_is_forgotten() {
        let history = History::default();
        let t0 = Instant::now();
        history.record(
            t0,
            &[("a", reading(0, 0, 0, 0)), ("b", reading(0, 0, 0, 0))],
        );
        history.record(t0 + Duration::from_secs(10), &[("a", reading(1, 0, 0, 0))]);
        assert_eq!(history.samples("a").len(), 1);
        assert!(history.series.lock().get("b").is_none());
    }

    #[test]
    fn the_eta_follows_the_backlog_slope() {
        let sample = |at_s: u64, backlog: u64| Sample {
            at: at_s * 1000,
            received_per_second: 0.0,
            delivered_per_second: 0.0,
            pending: backlog,
            backlog,
        };
        // 1,000 messages less every 10 s: 100/s; 6,000 left → 60 s.
        let draining: Vec<Sample> = (0..8).map(|i| sample(i * 10, 13_000 - 1_000 * i)).collect();
        assert_eq!(drain_eta_seconds(&draining), Some(60.0));
        let growing: Vec<Sample> = (0..8).map(|i| sample(i * 10, 1_000 * i)).collect();
        assert_eq!(drain_eta_seconds(&growing), None);
        assert_eq!(drain_eta_seconds(&[sample(0, 0), sample(10, 0)]), None);
        assert_eq!(drain_eta_seconds(&[]), None);
    }
}
