//! The one supervision loop of every sink worker: run a session with the upstream, and
//! when it ends, act on how it ended: stop, start the next session at once, or wait out
//! a backoff first. Each sink kind says what one session is (connect or open, deliver,
//! classify a failure and report it with [`super::SinkMetrics::mark_down`]); the waits,
//! shutdown and the worker's final state are here, once.
//!
//! Two backoffs: `backoff`, which a session resets when the upstream proves it works
//! (an ack, a written line), spaces out failures; `throttle` spaces out refusals "for
//! now" (MQTT 5 quota exceeded, server busy) and restarts after any other end, so acks
//! that came before a refusal do not make the retry immediate.

use std::future::Future;
use std::time::Duration;

use super::{Backoff, SinkContext};

/// How one session with the upstream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Shutdown: the worker stops.
    Stopped,
    /// Closed on purpose (new credentials, a token to renew, another endpoint to try):
    /// the next session starts at once.
    Again,
    /// Failed, and reported: the next session starts after the backoff.
    Failed,
    /// Refused for now: the next session starts after the throttle backoff.
    Throttled,
}

/// One sink kind's session: from connecting (or opening) to its end.
pub(super) trait Session {
    /// Runs one session. `backoff` is reset by the session when the upstream proves it
    /// works, and may be used for retries within it.
    fn run(&mut self, ctx: &SinkContext, backoff: &mut Backoff) -> impl Future<Output = Ended>;

    /// Resolves when a wait between sessions should end early (MQTT failover: the primary
    /// endpoint answers again). Never, by default.
    fn wake(&self) -> impl Future<Output = ()> {
        std::future::pending()
    }
}

/// Runs `session` again and again until shutdown, then marks the sink stopped.
pub(super) async fn supervise(ctx: &SinkContext, mut backoff: Backoff, session: &mut impl Session) {
    let mut throttle = backoff.clone();
    throttle.reset();
    loop {
        let ended = session.run(ctx, &mut backoff).await;
        let Some(delay) = wait_after(ended, &mut backoff, &mut throttle) else {
            break;
        };
        if delay.is_zero() {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = ctx.shutdown.cancelled() => break,
            _ = session.wake() => {}
        }
    }
    ctx.metrics.mark_stopped();
}

/// What follows a session that ended so: `None` to stop, else the wait before the next
/// one (zero: at once).
fn wait_after(ended: Ended, backoff: &mut Backoff, throttle: &mut Backoff) -> Option<Duration> {
    if ended != Ended::Throttled {
        throttle.reset();
    }
    match ended {
        Ended::Stopped => None,
        Ended::Again => Some(Duration::ZERO),
        Ended::Failed => Some(backoff.next_delay()),
        Ended::Throttled => Some(throttle.next_delay()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use tokio_util::sync::CancellationToken;

    fn secs(min: u64, max: u64) -> Backoff {
        Backoff::try_new(Duration::from_secs(min), Duration::from_secs(max)).expect("bounds")
    }

    #[test]
    fn each_end_leads_to_its_wait() {
        let (mut backoff, mut throttle) = (secs(10, 1000), secs(10, 1000));
        let mut wait = |ended| wait_after(ended, &mut backoff, &mut throttle);
        let within = |wait: Option<Duration>, min: u64, max: u64| {
            wait.is_some_and(|w| w >= Duration::from_secs(min) && w <= Duration::from_secs(max))
        };
        assert_eq!(wait(Ended::Again), Some(Duration::ZERO));
        // Failures: 5..10 s, then 10..20 s (jittered down by up to half).
        assert!(within(wait(Ended::Failed), 5, 10));
        assert!(within(wait(Ended::Failed), 10, 20));
        // Refusals on their own backoff, which starts from its minimum...
        assert!(within(wait(Ended::Throttled), 5, 10));
        assert!(within(wait(Ended::Throttled), 10, 20));
        // ...while the failure backoff goes on growing (no session reset it)...
        assert!(within(wait(Ended::Failed), 20, 40));
        // ...and the throttle backoff starts again after any other end.
        assert!(within(wait(Ended::Throttled), 5, 10));
        assert_eq!(wait(Ended::Stopped), None);
    }

    /// A session that ends as scripted, then as stopped.
    struct Script {
        ends: VecDeque<Ended>,
        runs: usize,
        /// Its `wake`, when set.
        wake: Option<CancellationToken>,
    }

    impl Script {
        fn new(ends: &[Ended]) -> Self {
            Script {
                ends: ends.iter().copied().collect(),
                runs: 0,
                wake: None,
            }
        }
    }

    impl Session for Script {
        async fn run(&mut self, _: &SinkContext, _: &mut Backoff) -> Ended {
            self.runs += 1;
            self.ends.pop_front().unwrap_or(Ended::Stopped)
        }

        async fn wake(&self) {
            match &self.wake {
                Some(token) => token.cancelled().await,
                None => std::future::pending().await,
            }
        }
    }

    /// Runs the loop, which must end long before its waits of 300..600 s would.
    async fn supervised(ctx: &SinkContext, script: &mut Script) {
        let run = supervise(ctx, secs(600, 600), script);
        tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .expect("the loop ended without waiting out its backoff");
    }

    #[tokio::test]
    async fn shutdown_ends_a_wait_and_marks_the_sink_stopped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ctx = crate::sinks::tests::context(dir.path(), "s");
        ctx.metrics.mark_up("connected");
        ctx.shutdown.cancel();
        let mut script = Script::new(&[Ended::Failed, Ended::Failed]);
        supervised(&ctx, &mut script).await;
        assert_eq!(script.runs, 1, "no session after shutdown");
        assert!(!ctx.metrics.state().snapshot().up);
    }

    #[tokio::test]
    async fn a_wake_ends_a_wait() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ctx = crate::sinks::tests::context(dir.path(), "s");
        let mut script = Script::new(&[Ended::Failed, Ended::Throttled]);
        let token = CancellationToken::new();
        token.cancel();
        script.wake = Some(token);
        supervised(&ctx, &mut script).await;
        assert_eq!(script.runs, 3, "failed, throttled, then stopped");
    }
}
