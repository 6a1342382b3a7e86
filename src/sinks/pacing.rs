//! Pacing: holds a sink's sends to its `rate` (messages and/or bytes per second).
//!
//! In: the size in bytes of each upstream message just before it goes on the wire (one
//! MQTT PUBLISH, one HTTP request, one Kafka record, one file line). Out: when it may go
//! ([`Pacer::ready_at`], [`Pacer::acquire`]); a message is counted once it is let through.
//!
//! Two mechanisms, both always on:
//! - Even spacing (GCRA): each message moves a theoretical arrival time on by `1/N`
//!   seconds (and `size/B` seconds for bytes); the next one may go once that time has
//!   come. It moves on from the *scheduled* time, not from when the timer actually fired,
//!   so timer lateness (a tokio timer fires up to ~1 ms late) and the window's holding
//!   back (below; made up for by at most [`MAX_LAG`]) do not lower the average rate. A
//!   sender that comes more than [`CATCH_UP`] late (it had nothing to send, or waited for
//!   acks) restarts the schedule from now, so a pause is never made up for with a burst.
//! - A strict sliding window: no closed 1 s interval ever holds more than N messages or
//!   more than B bytes, which is what a strict upstream (AWS IoT Core disconnects above
//!   its limits) checks. Counts are kept in [`BUCKETS`] ring buckets of [`BUCKET`]; the
//!   current partial bucket plus the 100 full ones before it always cover at least the
//!   last second, so the count is conservative (the window is 1 s to 1.01 s long, which
//!   costs up to 1% of the rate) and memory does not grow with N.
//!
//! A single message larger than B goes alone when the window holds no bytes (so a sink is
//! never stuck); its bytes then hold back the following ones.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::problems::Problems;
use crate::units::ByteSize;

/// Width of one bucket of the sliding window.
const BUCKET: Duration = Duration::from_millis(10);
/// The current bucket and the 100 full ones before it: at least 1 s of history.
const BUCKETS: usize = 101;
/// How late after its due time (or after the time the pacer itself named, when it held
/// the message back) a sender may come and still have the schedule go on from the due
/// time. Later, the sender was idle: the schedule restarts from now. Larger than a
/// timer's lateness and a sink loop's own work per message.
const CATCH_UP: Duration = Duration::from_millis(20);
/// How far the schedule may fall behind while the window (not the sender) holds messages
/// back, and so how much a sender may catch up at once afterwards: the window keeps the
/// average at the rate, this keeps catching up from becoming a burst.
const MAX_LAG: Duration = Duration::from_millis(100);

/// A sink's `rate`, validated: per second, at least one of the two set, each above zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub messages: Option<u32>,
    pub bytes: Option<u64>,
}

impl Rate {
    /// `100 msg/s, 512.0 KiB/s`, as `check` prints it.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(n) = self.messages {
            parts.push(format!("{n} msg/s"));
        }
        if let Some(b) = self.bytes {
            parts.push(format!("{}/s", bytesize::ByteSize(b).display().iec()));
        }
        parts.join(", ")
    }
}

/// Messages and bytes let through in one bucket.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    messages: u64,
    bytes: u64,
}

/// Paces one stream of upstream messages (one per sink; for MQTT one per connection, as
/// AWS counts per connection).
#[derive(Debug)]
pub struct Pacer {
    rate: Rate,
    /// Interval between two messages at the message rate.
    message_interval: Option<Duration>,
    /// Theoretical arrival time of the next message, for the message rate and the byte
    /// rate.
    next_message: Instant,
    next_byte: Instant,
    /// Where bucket 0 starts.
    origin: Instant,
    /// The window's buckets, indexed by bucket number modulo [`BUCKETS`].
    ring: [Bucket; BUCKETS],
    /// Number of the newest bucket the ring holds (older ones up to `BUCKETS - 1` back).
    head: u64,
    /// Sums over the ring.
    in_window: Bucket,
    /// The last time [`Pacer::ready_at`] named for a message it held back: a sender that
    /// comes then was waiting for the pacer, not idle.
    promised: Option<Instant>,
}

impl Pacer {
    pub fn new(rate: Rate) -> Self {
        let now = Instant::now();
        Self {
            rate,
            message_interval: rate
                .messages
                .map(|n| Duration::from_nanos(1_000_000_000 / u64::from(n.max(1)))),
            next_message: now,
            next_byte: now,
            origin: now,
            ring: [Bucket::default(); BUCKETS],
            head: 0,
            in_window: Bucket::default(),
            promised: None,
        }
    }

    /// Waits until a message of `bytes` may go, and counts it. Cancel-safe: dropped before
    /// it returns, it has counted nothing.
    pub async fn acquire(&mut self, bytes: usize) {
        loop {
            let now = Instant::now();
            let at = self.ready_at(bytes, now);
            if at <= now {
                self.record(bytes, now);
                return;
            }
            tokio::time::sleep_until(at).await;
        }
    }

    /// Counts a message of `bytes` and returns `true` when it may go at `now`; `false`
    /// (nothing counted) when it must wait.
    pub fn try_acquire(&mut self, bytes: usize, now: Instant) -> bool {
        if self.ready_at(bytes, now) <= now {
            self.record(bytes, now);
            true
        } else {
            false
        }
    }

    /// The earliest instant a message of `bytes` may go (`<= now`: at once). Counts
    /// nothing; it only forgets buckets that left the window.
    pub fn ready_at(&mut self, bytes: usize, now: Instant) -> Instant {
        self.advance(now);
        let bytes = bytes as u64;
        let mut at = now;
        if self.rate.messages.is_some() {
            at = at.max(self.next_message);
        }
        if self.rate.bytes.is_some() {
            at = at.max(self.next_byte);
        }
        let at = at.max(self.window_free_at(bytes, now));
        if at > now {
            self.promised = Some(at);
        }
        at
    }

    /// Counts a message of `bytes` let through at `now`.
    fn record(&mut self, bytes: usize, now: Instant) {
        self.advance(now);
        let bytes = bytes as u64;
        let promised = self.promised.take();
        if let Some(interval) = self.message_interval {
            self.next_message = schedule(self.next_message, promised, now) + interval;
        }
        if let Some(rate) = self.rate.bytes {
            let nanos = u128::from(bytes) * 1_000_000_000 / u128::from(rate.max(1));
            let cost = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
            self.next_byte = schedule(self.next_byte, promised, now) + cost;
        }
        let slot = &mut self.ring[(self.head % BUCKETS as u64) as usize];
        slot.messages += 1;
        slot.bytes += bytes;
        self.in_window.messages += 1;
        self.in_window.bytes += bytes;
    }

    /// Whether the window, holding `held`, takes one more message of `bytes`.
    fn fits(&self, held: Bucket, bytes: u64) -> bool {
        let messages_ok = self
            .rate
            .messages
            .is_none_or(|n| held.messages < u64::from(n));
        let bytes_ok = self
            .rate
            .bytes
            .is_none_or(|b| held.bytes == 0 || held.bytes + bytes <= b);
        messages_ok && bytes_ok
    }

    /// When the window has room for one more message of `bytes`: `now`, or the start of
    /// the bucket whose arrival drops enough old buckets out of it.
    fn window_free_at(&self, bytes: u64, now: Instant) -> Instant {
        let mut held = self.in_window;
        if self.fits(held, bytes) {
            return now;
        }
        let oldest = self.head.saturating_sub(BUCKETS as u64 - 1);
        for number in oldest..=self.head {
            let slot = self.ring[(number % BUCKETS as u64) as usize];
            held.messages -= slot.messages;
            held.bytes -= slot.bytes;
            if self.fits(held, bytes) {
                // Bucket `number` leaves the window when bucket `number + BUCKETS` begins.
                return self.bucket_start(number + BUCKETS as u64);
            }
        }
        // Unreachable: an empty window takes any message. Should it happen, wait one
        // bucket rather than never.
        now + BUCKET
    }

    fn bucket_start(&self, number: u64) -> Instant {
        let nanos = u128::from(number) * BUCKET.as_nanos();
        self.origin + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Moves the ring on to the bucket of `now`, emptying the buckets that left the window.
    fn advance(&mut self, now: Instant) {
        let number =
            (now.saturating_duration_since(self.origin).as_nanos() / BUCKET.as_nanos()) as u64;
        if number <= self.head {
            return;
        }
        let first_stale = (self.head + 1).max(number.saturating_sub(BUCKETS as u64 - 1));
        if number - self.head >= BUCKETS as u64 {
            self.ring = [Bucket::default(); BUCKETS];
            self.in_window = Bucket::default();
        } else {
            for stale in first_stale..=number {
                let slot = &mut self.ring[(stale % BUCKETS as u64) as usize];
                self.in_window.messages -= slot.messages;
                self.in_window.bytes -= slot.bytes;
                *slot = Bucket::default();
            }
        }
        self.head = number;
    }
}

/// Where the schedule goes on from for a message let through at `now`: its theoretical
/// time `due`, so that timer lateness and the window's holding back are made up for (by
/// at most [`MAX_LAG`]); or `now` when the sender came more than [`CATCH_UP`] after both
/// `due` and the time the pacer `promised` it (it was idle: no burst to make up for that).
fn schedule(due: Instant, promised: Option<Instant>, now: Instant) -> Instant {
    let expected = promised.map_or(due, |p| p.max(due));
    if now > expected + CATCH_UP {
        now
    } else {
        due.max(now.checked_sub(MAX_LAG).unwrap_or(due))
    }
}

/// `rate = { messages = 100, bytes = "512KiB" }`: the most a sink puts on the wire per
/// second (see `sinks::pacing`). At least one of the two; each above zero.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateSection {
    /// Upstream messages per second (MQTT PUBLISHes, HTTP requests, Kafka records,
    /// file lines). Signed so that a negative value gets a message with its key path.
    #[serde(default)]
    pub messages: Option<i64>,
    /// Bytes per second of those messages.
    #[serde(default)]
    pub bytes: Option<ByteSize>,
}

/// `rate` at key path `path`; `None` (with the problems reported) when it is invalid.
pub fn validate_rate(
    path: &str,
    rate: &RateSection,
    err: &mut impl FnMut(String, String),
) -> Option<Rate> {
    let mut problems = Problems::new(err);
    if rate.messages.is_none() && rate.bytes.is_none() {
        problems.add(
            path.to_string(),
            "set messages (per second), bytes (per second, e.g. \"512KiB\") or both".into(),
        );
    }
    let messages = match rate.messages {
        Some(n) if n <= 0 || n > i64::from(u32::MAX) => {
            problems.add(
                format!("{path}.messages"),
                format!("must be between 1 and {} (per second)", u32::MAX),
            );
            None
        }
        n => n.and_then(|n| u32::try_from(n).ok()),
    };
    if rate.bytes.is_some_and(|b| b.0 == 0) {
        problems.add(
            format!("{path}.bytes"),
            "must be above zero (per second)".into(),
        );
    }
    problems.none().then_some(Rate {
        messages,
        bytes: rate.bytes.map(|b| b.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    // The pacer is driven on a simulated clock through the `now` it is given: exact,
    // instant, and free of the test machine's load. (`tokio::time::pause()` would need
    // tokio's `test-util` feature, and with it a rebuild of everything that uses tokio.)

    /// The most messages and bytes any closed 1 s interval holds, over `sends` (time,
    /// bytes) in time order.
    fn worst_window(sends: &[(Instant, usize)]) -> (usize, usize) {
        let mut worst = (0, 0);
        let mut end = 0;
        let mut bytes = 0;
        for start in 0..sends.len() {
            while end < sends.len() && sends[end].0 <= sends[start].0 + SECOND {
                bytes += sends[end].1;
                end += 1;
            }
            worst.0 = worst.0.max(end - start);
            worst.1 = worst.1.max(bytes);
            bytes -= sends[start].1;
        }
        worst
    }

    /// A sender that always has a message waiting, from `start` for `run`: the i-th
    /// message has `size(i)` bytes; after each send it works `work(i)`. A wait for the
    /// pacer ends like a tokio timer: at the next whole millisecond after the instant
    /// asked for, plus up to 0.9 ms of scheduling delay. Returns (time, bytes) per send.
    fn simulate(
        pacer: &mut Pacer,
        start: Instant,
        run: Duration,
        size: impl Fn(usize) -> usize,
        work: impl Fn(usize) -> Duration,
    ) -> Vec<(Instant, usize)> {
        let end = start + run;
        let mut now = start;
        let mut sends = Vec::new();
        loop {
            let i = sends.len();
            let bytes = size(i);
            let at = pacer.ready_at(bytes, now);
            if at > now {
                let ms = (at - start).as_nanos().div_ceil(1_000_000) as u64;
                let delay = Duration::from_micros((i as u64 * 7_919) % 900);
                now = start + Duration::from_millis(ms) + delay;
            }
            if now >= end {
                return sends;
            }
            assert!(
                pacer.try_acquire(bytes, now),
                "ready at {at:?}, now {now:?}"
            );
            sends.push((now, bytes));
            now += work(i);
        }
    }

    fn messages(n: u32) -> Rate {
        Rate {
            messages: Some(n),
            bytes: None,
        }
    }

    fn assert_near(measured: f64, expected: f64, tolerance: f64) {
        assert!(
            (measured - expected).abs() <= expected * tolerance,
            "measured {measured}, expected {expected} ±{}%",
            tolerance * 100.0
        );
    }

    fn no_work(_: usize) -> Duration {
        Duration::ZERO
    }

    #[test]
    fn message_rate_holds_its_average_and_every_window() {
        for n in [1, 7, 100, 300, 1_000, 5_000, 20_000] {
            let mut pacer = Pacer::new(messages(n));
            let start = pacer.origin;
            let sends = simulate(&mut pacer, start, 10 * SECOND, |_| 100, no_work);
            assert_near(sends.len() as f64, 10.0 * f64::from(n), 0.02);
            let (worst, _) = worst_window(&sends);
            assert!(worst <= n as usize, "rate {n}: {worst} in one second");
        }
    }

    #[test]
    fn messages_are_spread_evenly_not_sent_in_bursts() {
        let mut pacer = Pacer::new(messages(100));
        let start = pacer.origin;
        let sends = simulate(&mut pacer, start, 10 * SECOND, |_| 100, no_work);
        // No 100 ms holds much more than a tenth of the rate (a "tidal wave" would put
        // all 100 of a second into its first milliseconds), and no gap is much longer
        // than the 10 ms interval.
        for (i, (t, _)) in sends.iter().enumerate() {
            let in_100ms = sends[i..]
                .iter()
                .take_while(|(u, _)| *u < *t + Duration::from_millis(100))
                .count();
            assert!(in_100ms <= 11, "{in_100ms} sends within 100 ms at send {i}");
        }
        let longest = sends.windows(2).map(|w| w[1].0 - w[0].0).max();
        assert!(longest <= Some(Duration::from_millis(22)), "{longest:?}");
    }

    #[test]
    fn byte_rate_holds_its_average_and_every_window() {
        let limit = 20 * 1024;
        let mut pacer = Pacer::new(Rate {
            messages: None,
            bytes: Some(limit),
        });
        let start = pacer.origin;
        let sends = simulate(&mut pacer, start, 10 * SECOND, |_| 1024, no_work);
        assert_near(sends.len() as f64, 200.0, 0.02);
        let (_, worst) = worst_window(&sends);
        assert!(worst <= limit as usize, "{worst} bytes in one second");
    }

    #[test]
    fn both_limits_hold_with_sizes_all_over_the_place() {
        // AWS IoT Core's limits; sizes from 7 bytes to AWS's largest payload.
        let (n, limit) = (100, 512 * 1024);
        let mut pacer = Pacer::new(Rate {
            messages: Some(n),
            bytes: Some(limit),
        });
        let start = pacer.origin;
        let sizes = |i: usize| [100, 20_000, 7, 64 * 1024, 3_000, 128 * 1024][i % 6];
        let sends = simulate(&mut pacer, start, 10 * SECOND, sizes, no_work);
        let (messages, bytes) = worst_window(&sends);
        assert!(messages <= n as usize, "{messages} messages in one second");
        assert!(bytes <= limit as usize, "{bytes} bytes in one second");
        // The byte limit binds here. A message of a quarter of it waits until the window
        // has room for it, which even spacing cannot always give at once: measured 86%
        // of the limit with this mix (96% with sizes up to a 20th of it, below).
        let total: usize = sends.iter().map(|s| s.1).sum();
        let used = total as f64 / (10.0 * limit as f64);
        assert!((0.8..=1.0).contains(&used), "{used}");
        let sizes = |i: usize| [100, 20_000, 7, 26_000, 3_000, 1_000][i % 6];
        let mut pacer = Pacer::new(Rate {
            messages: Some(n),
            bytes: Some(limit),
        });
        let sends = simulate(&mut pacer, start, 10 * SECOND, sizes, no_work);
        let (messages, bytes) = worst_window(&sends);
        assert!(messages <= n as usize, "{messages} messages in one second");
        assert!(bytes <= limit as usize, "{bytes} bytes in one second");
        let total: usize = sends.iter().map(|s| s.1).sum();
        assert_near(total as f64, 10.0 * limit as f64, 0.05);
        // Small messages only: the message limit binds.
        let mut pacer = Pacer::new(Rate {
            messages: Some(n),
            bytes: Some(limit),
        });
        let sends = simulate(&mut pacer, start, 10 * SECOND, |_| 100, no_work);
        assert_near(sends.len() as f64, 1_000.0, 0.02);
    }

    #[test]
    fn lateness_of_the_sender_does_not_lower_the_rate() {
        // Up to 3 ms of work after each of 300 sends per second (a 3.3 ms interval), on
        // top of the timer's lateness: the schedule catches up from where it was due,
        // and still never overshoots.
        let mut pacer = Pacer::new(messages(300));
        let start = pacer.origin;
        let work = |i: usize| Duration::from_micros((i as u64 * 104_729) % 3_000);
        let sends = simulate(&mut pacer, start, 10 * SECOND, |_| 10, work);
        assert_near(sends.len() as f64, 3_000.0, 0.02);
        assert!(worst_window(&sends).0 <= 300);
    }

    #[test]
    fn a_pause_is_not_made_up_with_a_burst() {
        let mut pacer = Pacer::new(messages(100));
        let start = pacer.origin;
        simulate(&mut pacer, start, 2 * SECOND, |_| 10, no_work);
        // Nothing to send for 5 s, then a backlog again.
        let later = start + 7 * SECOND;
        let sends = simulate(&mut pacer, later, SECOND, |_| 10, no_work);
        let first_50ms = sends
            .iter()
            .take_while(|(t, _)| *t < later + Duration::from_millis(50))
            .count();
        assert!(first_50ms <= 6, "{first_50ms} sends in the first 50 ms");
        // Paused for less than the catch-up allowance, it just goes on.
        let sends = simulate(
            &mut pacer,
            later + 1_005 * Duration::from_millis(1),
            SECOND,
            |_| 10,
            no_work,
        );
        assert!(worst_window(&sends).0 <= 100);
    }

    #[test]
    fn a_message_larger_than_the_byte_rate_goes_alone() {
        let mut pacer = Pacer::new(Rate {
            messages: None,
            bytes: Some(1_000),
        });
        let start = pacer.origin;
        // Nothing in the window: it goes at once rather than never.
        assert!(pacer.try_acquire(5_000, start));
        // Its bytes hold the schedule for 5 s (and the window for 1 s of it).
        assert!(!pacer.try_acquire(1, start + Duration::from_millis(1_500)));
        assert_eq!(pacer.ready_at(1, start), start + 5 * SECOND);
        assert!(pacer.try_acquire(10, start + 5 * SECOND));
        // Twice in a row: the window alone would let the second go after 1 s.
        assert!(pacer.try_acquire(5_000, start + 20 * SECOND));
        assert!(!pacer.try_acquire(5_000, start + 21 * SECOND));
    }

    #[tokio::test]
    async fn an_abandoned_wait_counts_nothing() {
        let mut pacer = Pacer::new(messages(1));
        pacer.acquire(1).await;
        let now = Instant::now();
        let due = pacer.ready_at(1, now);
        assert!(due > now);
        // Given up half way (shutdown): nothing counted, the next message is due as
        // before.
        let gave_up = tokio::time::timeout(Duration::from_millis(10), pacer.acquire(1)).await;
        assert!(gave_up.is_err());
        assert_eq!(pacer.ready_at(1, now), due);
        assert_eq!(pacer.in_window.messages, 1);
    }

    #[test]
    fn describe_names_both_limits() {
        let rate = Rate {
            messages: Some(100),
            bytes: Some(512 * 1024),
        };
        assert_eq!(rate.describe(), "100 msg/s, 512.0 KiB/s");
    }
}
