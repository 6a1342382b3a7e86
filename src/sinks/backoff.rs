//! Exponential backoff with jitter for reconnects and retries.

use std::time::Duration;

use rand::Rng;

use crate::units::HumanDuration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    /// Times [`Backoff::reset`] was called.
    resets: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("backoff minimum {min:?} must be above zero and not above the maximum {max:?}")]
pub struct BackoffError {
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn try_new(min: Duration, max: Duration) -> Result<Self, BackoffError> {
        if min.is_zero() || min > max {
            return Err(BackoffError { min, max });
        }
        Ok(Self {
            min,
            max,
            attempt: 0,
            resets: 0,
        })
    }

    /// The next delay: `min · 2^attempt`, capped at `max`, then jittered down by up to half
    /// so that many gateways restarting together do not reconnect in lockstep.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.min.saturating_mul(1u32 << self.attempt.min(20));
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = exp.min(self.max);
        let factor = rand::rng().random_range(0.5..=1.0);
        ceiling.mul_f64(factor).max(self.min.min(ceiling))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
        self.resets = self.resets.wrapping_add(1);
    }

    /// How many times [`Backoff::reset`] was called. A worker that resets its backoff
    /// exactly when a connection proves the upstream works compares this before and after
    /// a connection to learn whether it did (MQTT failover counts the ones that did not).
    pub fn resets(&self) -> u64 {
        self.resets
    }
}

/// Reports (at `{path}.backoff_min`) a backoff range [`Backoff`] refuses; `false` then.
pub fn check_backoff(
    path: &str,
    min: HumanDuration,
    max: HumanDuration,
    err: &mut impl FnMut(String, String),
) -> bool {
    let ok = Backoff::try_new(min.0, max.0).is_ok();
    if !ok {
        err(
            format!("{path}.backoff_min"),
            "must be above 0 and not above backoff_max".into(),
        );
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter() {
        let mut b = Backoff::try_new(Duration::from_millis(100), Duration::from_secs(2))
            .expect("valid bounds");
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(100));
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(100) && d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
        let late = b.next_delay();
        assert!(late >= Duration::from_secs(1), "{late:?}");
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn refuses_inverted_bounds() {
        assert!(Backoff::try_new(Duration::from_secs(2), Duration::from_secs(1)).is_err());
        assert!(Backoff::try_new(Duration::ZERO, Duration::from_secs(1)).is_err());
    }
}
