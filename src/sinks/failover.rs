//! Failover between the endpoints of an MQTT sink (`url = ["mqtts://primary:8883",
//! "mqtts://backup:8883"]`).
//!
//! Input: how each connection of the sink's worker (`sinks::mqtt::run`) ended, and the
//! answer of a background check of the first endpoint (the primary). Output: which
//! endpoint the next connection goes to; the worker publishes it as
//! `edgebridge_sink_endpoint{sink,endpoint}` and in the status API.
//!
//! The rules, as a state machine ([`Endpoints`], pure, unit-tested below):
//! - `failover_after` connection attempts in a row that did not prove the endpoint works
//!   (no CONNACK, or a connection closed right after it without a single acknowledgement;
//!   the same test that restarts the reconnect backoff) move the sink to the next endpoint
//!   in the list, wrapping around after the last one. A connection that worked resets the
//!   count.
//! - While the sink is on any endpoint but the first, a [`Probe`] connects to the first one
//!   every `failback_check` with the sink's TLS and credentials (client id
//!   `{client_id}-probe`, clean session, so it never takes over the sink's own session).
//!   Once it is accepted (CONNACK "accepted"), the worker closes its connection cleanly
//!   (the acks of what is in flight get a short grace) and returns to the first endpoint.
//!
//! Nothing here touches the buffer: each new connection starts from the buffer's rewind,
//! as any reconnect does, so unconfirmed records are resent to the new endpoint and
//! nothing is lost; duplicates are limited to the in-flight window.

use std::fmt;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::mqtt::client::{self, Options};

/// Failed connection attempts in a row before moving to the next endpoint. With the
/// default backoff (200 ms doubling) a refused primary is left in under a second; an
/// unreachable one after three connect timeouts.
pub const DEFAULT_FAILOVER_AFTER: u32 = 3;

/// How often the primary is checked while the sink uses another endpoint.
pub const DEFAULT_FAILBACK_CHECK: Duration = Duration::from_secs(30);

/// Shortest `failback_check` accepted: a check is a full TLS + MQTT handshake.
pub const MIN_FAILBACK_CHECK: Duration = Duration::from_millis(100);

/// Longest wait for the acks of messages in flight when leaving an endpoint that works
/// (failback); what is still unconfirmed then is resent to the primary.
pub const FAILBACK_GRACE: Duration = Duration::from_secs(5);

/// One upstream address of an MQTT sink; shown as `host:port` (never with credentials).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// A change of endpoint decided by [`Endpoints`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    /// `failures` attempts in a row on `from` failed: the next connection goes to `to`.
    Failover {
        from: usize,
        to: usize,
        failures: u32,
    },
    /// The primary answered the background check: the next connection goes to it.
    Failback { from: usize },
}

impl Switch {
    /// The endpoint the sink uses after this switch.
    pub fn to(&self) -> usize {
        match self {
            Switch::Failover { to, .. } => *to,
            Switch::Failback { .. } => 0,
        }
    }
}

/// Which endpoint the sink connects to; the index is into the sink's `url` list, 0 is the
/// primary.
#[derive(Debug, Clone)]
pub struct Endpoints {
    count: usize,
    current: usize,
    /// Attempts in a row on `current` that did not work.
    failures: u32,
    failover_after: u32,
}

impl Endpoints {
    /// `count` endpoints (at least one is assumed), starting on the primary.
    pub fn new(count: usize, failover_after: u32) -> Self {
        Self {
            count: count.max(1),
            current: 0,
            failures: 0,
            failover_after: failover_after.max(1),
        }
    }

    pub fn current(&self) -> usize {
        self.current
    }

    /// Whether the background check of the primary should run.
    pub fn needs_probe(&self) -> bool {
        self.current != 0
    }

    /// A connection to the current endpoint ended; `worked` says whether it proved the
    /// endpoint works. Returns the switch to make, if any.
    pub fn connection_ended(&mut self, worked: bool) -> Option<Switch> {
        if worked {
            self.failures = 0;
            return None;
        }
        self.failures = self.failures.saturating_add(1);
        if self.count < 2 || self.failures < self.failover_after {
            return None;
        }
        let switch = Switch::Failover {
            from: self.current,
            to: (self.current + 1) % self.count,
            failures: self.failures,
        };
        self.current = switch.to();
        self.failures = 0;
        Some(switch)
    }

    /// The background check reached the primary: return to it (nothing when already
    /// there).
    pub fn primary_answered(&mut self) -> Option<Switch> {
        if self.current == 0 {
            return None;
        }
        let switch = Switch::Failback { from: self.current };
        self.current = 0;
        self.failures = 0;
        Some(switch)
    }
}

/// The background check of the primary endpoint: a task that connects to it every
/// `interval` until it is accepted once, then cancels [`Probe::answered`] and ends.
/// Dropping the probe stops it.
pub struct Probe {
    answered: CancellationToken,
    task: JoinHandle<()>,
}

impl Probe {
    /// Starts checking. `options` makes the connection options of each check (called
    /// anew each time: an Azure SAS token must be fresh); an `Err` counts as not
    /// answering.
    pub fn spawn<F>(sink: String, interval: Duration, options: F) -> Self
    where
        F: Fn() -> Result<Options, String> + Send + 'static,
    {
        let answered = CancellationToken::new();
        let done = answered.clone();
        // A check that hangs (a silent host) must not hold up the next one for long.
        let timeout = interval.clamp(Duration::from_secs(1), Duration::from_secs(10));
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let result = match options() {
                    Ok(opts) => client::check(opts, timeout).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => {
                        done.cancel();
                        return;
                    }
                    Err(e) => {
                        debug!(sink = %sink, error = %e, "primary endpoint still not answering")
                    }
                }
            }
        });
        Self { answered, task }
    }

    /// Cancelled once the primary accepted a connection.
    pub fn answered(&self) -> &CancellationToken {
        &self.answered
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_endpoint_never_switches() {
        let mut e = Endpoints::new(1, 3);
        for _ in 0..10 {
            assert_eq!(e.connection_ended(false), None);
        }
        assert_eq!(e.current(), 0);
        assert_eq!(e.primary_answered(), None);
        assert!(!e.needs_probe());
    }

    #[test]
    fn fails_over_after_the_threshold_of_failures_in_a_row() {
        let mut e = Endpoints::new(2, 3);
        assert_eq!(e.connection_ended(false), None);
        assert_eq!(e.connection_ended(false), None);
        assert_eq!(
            e.connection_ended(false),
            Some(Switch::Failover {
                from: 0,
                to: 1,
                failures: 3
            })
        );
        assert_eq!(e.current(), 1);
        assert!(e.needs_probe());
    }

    #[test]
    fn a_connection_that_worked_restarts_the_count() {
        let mut e = Endpoints::new(2, 3);
        e.connection_ended(false);
        e.connection_ended(false);
        assert_eq!(e.connection_ended(true), None);
        assert_eq!(e.connection_ended(false), None);
        assert_eq!(e.connection_ended(false), None);
        assert_eq!(e.current(), 0, "two failures after a good connection stay");
        assert!(e.connection_ended(false).is_some());
    }

    #[test]
    fn moves_through_the_list_and_wraps_to_the_primary() {
        let mut e = Endpoints::new(3, 2);
        let mut visited = vec![e.current()];
        for _ in 0..3 {
            assert_eq!(e.connection_ended(false), None);
            let switch = e.connection_ended(false).expect("second failure switches");
            assert_eq!(switch.to(), e.current());
            visited.push(e.current());
        }
        assert_eq!(visited, [0, 1, 2, 0]);
        assert!(!e.needs_probe(), "back on the primary: nothing to check");
    }

    #[test]
    fn fails_back_when_the_primary_answers() {
        let mut e = Endpoints::new(3, 1);
        e.connection_ended(false);
        e.connection_ended(false);
        assert_eq!(e.current(), 2);
        assert_eq!(e.primary_answered(), Some(Switch::Failback { from: 2 }));
        assert_eq!(e.current(), 0);
        assert_eq!(e.primary_answered(), None, "already there");
    }

    #[test]
    fn failures_before_a_failback_do_not_carry_over() {
        let mut e = Endpoints::new(2, 3);
        for _ in 0..3 {
            e.connection_ended(false);
        }
        // Two failures on the backup, then the primary answers.
        e.connection_ended(false);
        e.connection_ended(false);
        e.primary_answered();
        assert_eq!(e.connection_ended(false), None);
        assert_eq!(e.connection_ended(false), None);
        assert_eq!(e.current(), 0, "the primary gets its own three attempts");
    }

    #[test]
    fn a_zero_threshold_is_taken_as_one() {
        let mut e = Endpoints::new(2, 0);
        assert!(e.connection_ended(false).is_some());
    }

    #[tokio::test]
    async fn a_closed_port_does_not_answer_the_check() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let opts = Options::V311(Box::new(rumqttc::MqttOptions::new(
            "probe",
            "127.0.0.1",
            port,
        )));
        assert!(client::check(opts, Duration::from_secs(2)).await.is_err());
    }

    /// A listener that answers every MQTT CONNECT with CONNACK `code`.
    async fn fake_broker(code: u8) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 256];
                    if socket.read(&mut buf).await.unwrap_or(0) > 0 {
                        let _ = socket.write_all(&[0x20, 0x02, 0x00, code]).await;
                        while socket.read(&mut buf).await.unwrap_or(0) > 0 {}
                    }
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn only_an_accepted_connection_answers_the_check() {
        let accepting = fake_broker(0).await;
        let refusing = fake_broker(5).await;
        let opts = |port| {
            Options::V311(Box::new(rumqttc::MqttOptions::new(
                "probe",
                "127.0.0.1",
                port,
            )))
        };
        assert_eq!(
            client::check(opts(accepting), Duration::from_secs(5)).await,
            Ok(())
        );
        assert!(client::check(opts(refusing), Duration::from_secs(5))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn the_probe_checks_until_the_primary_answers() {
        let port = fake_broker(0).await;
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = calls.clone();
        // Not answering for the first two checks (as a primary still down would).
        let probe = Probe::spawn("s".into(), Duration::from_millis(50), move || match counted
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        {
            0 | 1 => Err("still down".into()),
            _ => Ok(Options::V311(Box::new(rumqttc::MqttOptions::new(
                "probe",
                "127.0.0.1",
                port,
            )))),
        });
        let answered = tokio::time::timeout(Duration::from_secs(10), probe.answered().cancelled());
        assert!(
            answered.await.is_ok(),
            "the probe never saw the primary answer"
        );
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    }
}
