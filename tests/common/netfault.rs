//! A fault-injecting TCP proxy (toxiproxy-style) that the network-fault tests put between
//! the gateway and a real upstream (Mosquitto, the tests' HTTP server, tansu): `tc netem`
//! is not available in these machines' kernels. Switched at run time between passing
//! bytes through, a latency, a bandwidth cap, a blackhole (bytes stop both ways with no
//! FIN and no RST: a half-open link), tiny fragments, a link that is down (open
//! connections reset, new ones refused with RST) and a flapping link; it can also reset
//! every connection (RST via `SO_LINGER` 0) once a given number of bytes went upstream,
//! which lands the reset in the middle of a batch by construction. Included with
//! `#[path = "common/netfault.rs"] mod netfault;`.
//!
//! Each accepted connection is two relays (client → upstream, upstream → client), and each
//! relay a reader and a writer joined by a bounded queue of chunks stamped with the time
//! they may be written: a latency delays every chunk without reordering them and without
//! holding up the reader, and a blackhole stops both the reader (so the sender's kernel
//! buffers fill, as with a vanished route) and the writer.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the link does to the bytes from the moment it is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Pass,
    /// Every chunk is held `base ± jitter` (uniform) before it is written; order is kept
    /// (a chunk never overtakes the one read before it).
    Latency {
        base: Duration,
        jitter: Duration,
    },
    /// At most this many bytes per second, per direction and connection.
    Bandwidth(u64),
    /// Nothing is read, written or closed; a new connection is accepted by the kernel
    /// (its SYN "got through" to the proxy) and held until the blackhole ends.
    Blackhole,
    /// Every chunk is written in pieces of 1..=max bytes, each its own `write` on a
    /// TCP_NODELAY socket (so its own segment).
    Fragments {
        max: usize,
    },
    /// The link is down: setting it resets every open connection, and connections
    /// accepted while it lasts are reset at once.
    Down,
}

impl Fault {
    /// 300 ms ± 100 ms, as issue "Months unattended" asks.
    pub fn wan_latency() -> Fault {
        Fault::Latency {
            base: Duration::from_millis(300),
            jitter: Duration::from_millis(100),
        }
    }
}

struct Shared {
    fault: watch::Sender<Fault>,
    /// Cancelled (and replaced) to reset every connection open at that moment; each
    /// connection holds a child token.
    reset: Mutex<CancellationToken>,
    accepted: AtomicUsize,
    /// Cancelled (and replaced) by [`FaultyLink::forget_open_connections`]: the
    /// connections open at that moment go silent for good; each holds a child token.
    forget: Mutex<CancellationToken>,
    /// Connections closed with RST by the proxy (a reset, a link down).
    resets: AtomicUsize,
    /// Bytes forwarded client → upstream, over all connections.
    upstream_bytes: AtomicU64,
    /// `write` calls made, both directions, over all connections.
    writes: AtomicU64,
    /// Armed by [`FaultyLink::after_upstream_bytes`]: once `upstream_bytes` reaches the
    /// mark, the action is taken.
    armed: Mutex<Option<(u64, Armed)>>,
    /// When the armed action was taken.
    fired_at: Mutex<Option<Instant>>,
}

/// What [`FaultyLink::after_upstream_bytes`] does once the bytes went through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Armed {
    /// Reset every connection; the chunk that reached the mark is not forwarded.
    Reset,
    /// [`FaultyLink::forget_open_connections`]; the chunk that reached the mark is lost.
    Forget,
    /// Switch to this fault; the chunk that reached the mark is subject to it.
    Set(Fault),
}

impl Shared {
    fn forget_all(&self) {
        let mut token = self.forget.lock().expect("proxy lock");
        token.cancel();
        *token = CancellationToken::new();
    }

    fn reset_all(&self) {
        let mut token = self.reset.lock().expect("proxy lock");
        token.cancel();
        *token = CancellationToken::new();
    }
}

/// The proxy: listens on 127.0.0.1:`port`, forwards to `target`.
pub struct FaultyLink {
    pub port: u16,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl FaultyLink {
    /// Listens on a free port, passing bytes through to `target`.
    pub async fn start(target: SocketAddr) -> FaultyLink {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        Self::serve(listener, target)
    }

    /// With a listener bound beforehand (when the upstream must be told the proxy's
    /// address before it starts, as tansu's advertised listener).
    pub fn serve(listener: TcpListener, target: SocketAddr) -> FaultyLink {
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared {
            fault: watch::Sender::new(Fault::Pass),
            reset: Mutex::new(CancellationToken::new()),
            forget: Mutex::new(CancellationToken::new()),
            accepted: AtomicUsize::new(0),
            resets: AtomicUsize::new(0),
            upstream_bytes: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            armed: Mutex::new(None),
            fired_at: Mutex::new(None),
        });
        let sh = shared.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                sh.accepted.fetch_add(1, Ordering::Relaxed);
                if *sh.fault.borrow() == Fault::Down {
                    sh.resets.fetch_add(1, Ordering::Relaxed);
                    rst(client);
                    continue;
                }
                let tokens = Tokens {
                    reset: sh.reset.lock().expect("proxy lock").child_token(),
                    forgotten: sh.forget.lock().expect("proxy lock").child_token(),
                };
                tokio::spawn(connection(client, target, sh.clone(), tokens));
            }
        });
        FaultyLink {
            port,
            shared,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Applies to every connection, open or new, from now on.
    pub fn set(&self, fault: Fault) {
        self.shared.fault.send_replace(fault);
        if fault == Fault::Down {
            self.shared.reset_all();
        }
    }

    pub fn fault(&self) -> Fault {
        *self.shared.fault.borrow()
    }

    /// A NAT that forgets its mappings, a load balancer that loses its backend: every
    /// connection open now goes silent for good (no FIN, no RST, nothing passes either
    /// way, until the proxy is dropped), while new connections work. Only a client that
    /// gives up on the silent connection and opens another recovers.
    pub fn forget_open_connections(&self) {
        self.shared.forget_all();
    }

    /// Resets (RST) every open connection now.
    pub fn reset_all(&self) {
        self.shared.reset_all();
    }

    /// Takes `action` once `more` further bytes went client → upstream: in the middle of
    /// whatever the client was sending, without racing it from the test.
    pub fn after_upstream_bytes(&self, more: u64, action: Armed) {
        let at = self.upstream_bytes() + more;
        *self.shared.fired_at.lock().expect("proxy lock") = None;
        *self.shared.armed.lock().expect("proxy lock") = Some((at, action));
    }

    /// When the armed action was taken, if it was.
    pub fn fired_at(&self) -> Option<Instant> {
        *self.shared.fired_at.lock().expect("proxy lock")
    }

    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections the proxy closed with RST.
    pub fn resets(&self) -> usize {
        self.shared.resets.load(Ordering::Relaxed)
    }

    pub fn upstream_bytes(&self) -> u64 {
        self.shared.upstream_bytes.load(Ordering::Relaxed)
    }

    /// `write` calls made so far (both directions): one per piece with fragments.
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(Ordering::Relaxed)
    }

    /// A flapping link: up for `up`, down ([`Fault::Down`]) for `down`, over and over for
    /// `total`; ends up. Returns how many times it went down.
    pub async fn flap(&self, up: Duration, down: Duration, total: Duration) -> usize {
        let end = Instant::now() + total;
        let mut downs = 0;
        while Instant::now() + up < end {
            self.set(Fault::Pass);
            tokio::time::sleep(up).await;
            self.set(Fault::Down);
            downs += 1;
            tokio::time::sleep(down).await;
        }
        self.set(Fault::Pass);
        downs
    }
}

impl Drop for FaultyLink {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.reset_all();
    }
}

/// Closes `stream` with RST instead of FIN.
fn rst(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// What ends or silences one connection.
#[derive(Clone)]
struct Tokens {
    reset: CancellationToken,
    forgotten: CancellationToken,
}

/// Waits until the link is not a blackhole (never, for a forgotten connection); false if
/// the proxy is gone or the connection was reset.
async fn open(fault: &mut watch::Receiver<Fault>, tokens: &Tokens) -> bool {
    let reset = &tokens.reset;
    loop {
        if tokens.forgotten.is_cancelled() {
            reset.cancelled().await;
            return false;
        }
        tokio::select! {
            open = fault.wait_for(|f| *f != Fault::Blackhole) => {
                if !tokens.forgotten.is_cancelled() {
                    return open.is_ok();
                }
            }
            _ = reset.cancelled() => return false,
            _ = tokens.forgotten.cancelled() => {}
        }
    }
}

async fn connection(client: TcpStream, target: SocketAddr, shared: Arc<Shared>, tokens: Tokens) {
    let reset = tokens.reset.clone();
    let mut fault = shared.fault.subscribe();
    // A blackhole holds a new connection before the upstream is even reached.
    let held = *fault.borrow() == Fault::Blackhole;
    if !open(&mut fault, &tokens).await || *fault.borrow() == Fault::Down {
        shared.resets.fetch_add(1, Ordering::Relaxed);
        rst(client);
        return;
    }
    // Behind a real blackhole the client's SYN never got through: if it gave up (closed)
    // meanwhile, the upstream never hears of it. Replaying its CONNECT now would be an
    // artifact (Mosquitto would hand that stale client id the live session).
    let mut early = Vec::new();
    if held {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match client.try_read(&mut buf) {
                Ok(0) => {
                    rst(client);
                    return;
                }
                Ok(n) => early.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    rst(client);
                    return;
                }
            }
        }
    }
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        shared.resets.fetch_add(1, Ordering::Relaxed);
        rst(client);
        return;
    };
    if upstream.write_all(&early).await.is_err() {
        rst(client);
        return;
    }
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_rd, client_wr) = client.into_split();
    let (up_rd, up_wr) = upstream.into_split();
    let ((client_rd, up_wr), (up_rd, client_wr)) = tokio::join!(
        relay(client_rd, up_wr, true, shared.clone(), tokens.clone()),
        relay(up_rd, client_wr, false, shared.clone(), tokens.clone()),
    );
    // Reunited, the halves close without the write half's shutdown (a FIN): with
    // SO_LINGER 0 that is a bare RST.
    if reset.is_cancelled() {
        shared.resets.fetch_add(1, Ordering::Relaxed);
        if let Ok(client) = client_rd.reunite(client_wr) {
            rst(client);
        }
        if let Ok(upstream) = up_rd.reunite(up_wr) {
            rst(upstream);
        }
    }
}

type Chunk = (Instant, Vec<u8>);

/// One direction; returns its halves when the reader saw EOF and the writer sent
/// everything and a FIN, or at once on a reset.
async fn relay(
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    upward: bool,
    shared: Arc<Shared>,
    tokens: Tokens,
) -> (OwnedReadHalf, OwnedWriteHalf) {
    // 64 chunks of at most 16 KiB: the proxy holds at most 1 MiB per direction.
    let (tx, rx) = mpsc::channel::<Chunk>(64);
    tokio::join!(
        read_side(rd, tx, upward, shared.clone(), tokens.clone()),
        write_side(wr, rx, shared, tokens)
    )
}

async fn read_side(
    mut rd: OwnedReadHalf,
    tx: mpsc::Sender<Chunk>,
    upward: bool,
    shared: Arc<Shared>,
    tokens: Tokens,
) -> OwnedReadHalf {
    let reset = tokens.reset.clone();
    let mut fault = shared.fault.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    let mut last_due = Instant::now();
    loop {
        let read = loop {
            if !open(&mut fault, &tokens).await {
                return rd;
            }
            tokio::select! {
                _ = reset.cancelled() => return rd,
                // Forgotten: `open` holds it from now on.
                _ = tokens.forgotten.cancelled() => continue,
                n = rd.read(&mut buf) => break n,
                // A blackhole starting stops the reading too.
                changed = fault.changed() => if changed.is_err() { return rd },
            }
        };
        let n = match read {
            // EOF: dropping `tx` lets the writer finish and pass the FIN on.
            Ok(0) => return rd,
            Ok(n) => n,
            // A reset (or any error) from one peer resets the other.
            Err(_) => {
                reset.cancel();
                return rd;
            }
        };
        if upward {
            let total = shared.upstream_bytes.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
            let mut armed = shared.armed.lock().expect("proxy lock");
            if let Some((_, action)) = armed.filter(|(at, _)| total >= *at) {
                *armed = None;
                drop(armed);
                *shared.fired_at.lock().expect("proxy lock") = Some(Instant::now());
                match action {
                    Armed::Reset => {
                        shared.reset_all();
                        return rd;
                    }
                    Armed::Forget => {
                        shared.forget_all();
                        continue;
                    }
                    Armed::Set(fault) => {
                        shared.fault.send_replace(fault);
                        if fault == Fault::Down {
                            shared.reset_all();
                            return rd;
                        }
                    }
                }
            }
        }
        let delay = match *fault.borrow() {
            Fault::Latency { base, jitter } => {
                let j = jitter.as_micros() as i64;
                let offset = rand::random_range(-j..=j);
                Duration::from_micros((base.as_micros() as i64 + offset).max(0) as u64)
            }
            _ => Duration::ZERO,
        };
        let due = (Instant::now() + delay).max(last_due);
        last_due = due;
        tokio::select! {
            _ = reset.cancelled() => return rd,
            sent = tx.send((due, buf[..n].to_vec())) => if sent.is_err() { return rd },
        }
    }
}

async fn write_side(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Chunk>,
    shared: Arc<Shared>,
    tokens: Tokens,
) -> OwnedWriteHalf {
    let reset = tokens.reset.clone();
    let mut fault = shared.fault.subscribe();
    loop {
        let next = tokio::select! {
            _ = reset.cancelled() => return wr,
            next = rx.recv() => next,
        };
        let Some((due, chunk)) = next else {
            tokio::select! {
                _ = reset.cancelled() => {}
                _ = wr.shutdown() => {}
            }
            return wr;
        };
        tokio::select! {
            _ = reset.cancelled() => return wr,
            _ = tokio::time::sleep_until(due) => {}
        }
        let mut rest = &chunk[..];
        let mut pieces = 0u32;
        while !rest.is_empty() {
            if !open(&mut fault, &tokens).await {
                return wr;
            }
            let now = *fault.borrow();
            let piece = match now {
                Fault::Fragments { max } => rand::random_range(1..=max.max(1)).min(rest.len()),
                // 20 steps a second keep the rate smooth at the scale of a round trip.
                Fault::Bandwidth(rate) => rest.len().min((rate / 20).max(1) as usize),
                _ => rest.len(),
            };
            let written = tokio::select! {
                _ = reset.cancelled() => return wr,
                w = wr.write_all(&rest[..piece]) => w,
            };
            if written.is_err() {
                reset.cancel();
                return wr;
            }
            shared.writes.fetch_add(1, Ordering::Relaxed);
            rest = &rest[piece..];
            pieces += 1;
            let pause = match now {
                Fault::Bandwidth(rate) => {
                    Duration::from_micros(piece as u64 * 1_000_000 / rate.max(1))
                }
                // Now and then a pause, so that the peer's reads return mid-frame rather
                // than finding the fragments coalesced in its receive buffer.
                Fault::Fragments { .. } if pieces % 16 == 0 => Duration::from_millis(1),
                _ => Duration::ZERO,
            };
            if !pause.is_zero() {
                tokio::select! {
                    _ = reset.cancelled() => return wr,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// A network namespace joined to this one by a veth pair (10.N.M.1 here, 10.N.M.2
/// there), for a route that really vanishes: [`NetNs::link_down`] takes the far end
/// down, so the near end loses its carrier and the kernel drops what is sent to
/// 10.N.M.2 without a word (no FIN, no RST, no ICMP), for open connections and new SYNs
/// alike. Needs root (the test command runs as root in CI); removed on drop.
pub struct NetNs {
    pub name: String,
    /// The far end's address, where a peer started inside listens.
    pub addr: String,
    far_if: String,
}

impl NetNs {
    pub fn create() -> NetNs {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Interface names have at most 15 characters.
        let tag = format!("{}{k}", pid % 100_000);
        let (name, near_if, far_if) = (
            format!("ebns{tag}"),
            format!("ebh{tag}"),
            format!("ebn{tag}"),
        );
        let net = format!("10.{}.{}", 100 + k % 100, pid % 256);
        let ns = NetNs {
            name: name.clone(),
            addr: format!("{net}.2"),
            far_if: far_if.clone(),
        };
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &near_if, "type", "veth", "peer", "name", &far_if,
        ]);
        ip(&["link", "set", &far_if, "netns", &name]);
        ip(&["addr", "add", &format!("{net}.1/30"), "dev", &near_if]);
        ip(&["link", "set", &near_if, "up"]);
        ns.exec(&["addr", "add", &format!("{net}.2/30"), "dev", &far_if]);
        ns.exec(&["link", "set", &far_if, "up"]);
        ns.exec(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip …` inside the namespace.
    fn exec(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend_from_slice(args);
        ip(&all);
    }

    pub fn link_down(&self) {
        self.exec(&["link", "set", &self.far_if, "down"]);
    }

    pub fn link_up(&self) {
        self.exec(&["link", "set", &self.far_if, "up"]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {} (network namespaces need root; the test command runs as root in CI)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
