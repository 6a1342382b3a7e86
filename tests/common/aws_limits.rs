//! A stand-in for AWS IoT Core's per-connection limits, in front of a real Mosquitto:
//! it terminates mutual TLS like AWS (server certificate of the test CA, client
//! certificate required), forwards every byte to the Mosquitto behind it, and reads the
//! MQTT packets the client sends. A connection that sends more than 100 PUBLISH or more
//! than 512 KiB of PUBLISH packets within any one second is closed, as AWS throttles and
//! drops such a client; each such close is counted. Included with
//! `#[path = "common/aws_limits.rs"] mod aws_limits;`.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::common::TestCerts;

/// AWS IoT Core: PUBLISH requests per second per connection.
pub const PUBLISH_PER_SECOND: usize = 100;
/// AWS IoT Core: inbound bytes per second per connection.
pub const BYTES_PER_SECOND: u64 = 512 * 1024;

#[derive(Default)]
pub struct Counters {
    /// Connections closed for going over a limit.
    pub throttled: AtomicU64,
    /// PUBLISH packets forwarded.
    pub publishes: AtomicU64,
    /// TLS connections accepted.
    pub connections: AtomicU64,
    /// The most PUBLISH packets and bytes any connection sent within one second.
    pub peak_publishes: AtomicU64,
    pub peak_bytes: AtomicU64,
}

pub struct AwsLimits {
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl AwsLimits {
    /// Listens on a free port and forwards to Mosquitto on `upstream_port`.
    pub async fn start(certs: &TestCerts, upstream_port: u16) -> AwsLimits {
        let config = crate::common::tls_server_config(certs, true);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let counters = Arc::new(Counters::default());
        let shared = counters.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, counters) = (acceptor.clone(), shared.clone());
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(upstream) = TcpStream::connect(("127.0.0.1", upstream_port)).await
                    else {
                        return;
                    };
                    let _ = upstream.set_nodelay(true);
                    counters.connections.fetch_add(1, Ordering::Relaxed);
                    relay(tls, upstream, &counters).await;
                });
            }
        });
        AwsLimits {
            addr,
            counters,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for AwsLimits {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies both ways until either side closes or the client goes over a limit.
async fn relay(
    client: tokio_rustls::server::TlsStream<TcpStream>,
    upstream: TcpStream,
    counters: &Counters,
) {
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut upstream_rx, mut upstream_tx) = upstream.into_split();
    let down = async {
        let _ = tokio::io::copy(&mut upstream_rx, &mut client_tx).await;
    };
    let up = async {
        let mut meter = Meter::default();
        let mut pending: Vec<u8> = Vec::new();
        let mut chunk = vec![0; 64 * 1024];
        loop {
            let n = match client_rx.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            pending.extend_from_slice(&chunk[..n]);
            // Account for every complete packet, then forward the bytes as they came.
            while let Some((kind, len)) = frame(&pending) {
                if kind == 3 {
                    counters.publishes.fetch_add(1, Ordering::Relaxed);
                    if !meter.admit(Instant::now(), len as u64, counters) {
                        counters.throttled.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
                let packet: Vec<u8> = pending.drain(..len).collect();
                if upstream_tx.write_all(&packet).await.is_err() {
                    return;
                }
            }
        }
    };
    // Whichever direction ends first ends the connection (both sockets are dropped).
    tokio::select! {
        _ = down => {}
        _ = up => {}
    }
}

/// The type and total length of the first complete MQTT packet in `buf`, if there is one.
fn frame(buf: &[u8]) -> Option<(u8, usize)> {
    let first = *buf.first()?;
    let mut remaining = 0usize;
    for i in 0..4 {
        let byte = *buf.get(1 + i)?;
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let total = 1 + i + 1 + remaining;
            return (buf.len() >= total).then_some((first >> 4, total));
        }
    }
    // A malformed length: forward byte by byte, Mosquitto will refuse it.
    Some((0, 1))
}

/// PUBLISH packets and bytes of the last second, exactly (sliding window).
#[derive(Default)]
struct Meter {
    window: VecDeque<(Instant, u64)>,
    bytes: u64,
}

impl Meter {
    fn admit(&mut self, now: Instant, len: u64, counters: &Counters) -> bool {
        while let Some(&(at, n)) = self.window.front() {
            if now.duration_since(at) < Duration::from_secs(1) {
                break;
            }
            self.window.pop_front();
            self.bytes -= n;
        }
        self.window.push_back((now, len));
        self.bytes += len;
        counters
            .peak_publishes
            .fetch_max(self.window.len() as u64, Ordering::Relaxed);
        counters.peak_bytes.fetch_max(self.bytes, Ordering::Relaxed);
        self.window.len() <= PUBLISH_PER_SECOND && self.bytes <= BYTES_PER_SECOND
    }
}
