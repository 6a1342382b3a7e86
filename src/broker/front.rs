//! TLS and WebSocket device listeners.
//!
//! rumqttd runs TLS and WebSocket handshakes inside its accept loop with no timeout, so
//! one idle socket blocks every later connection (DESIGN.md, failure mode 3). A TLS or
//! WebSocket listener is therefore edgebridge's own accept loop: each accepted socket
//! gets its own task that runs the handshakes under `connect_timeout`, then relays the
//! plain MQTT bytes to a rumqttd listener on a loopback port. The relay starts with a
//! preamble carrying a per-process token (only the front can connect there) and the
//! identity of the verified client certificate, which the protocol seam reads.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info};

use super::protocol::{preamble, TOKEN_LEN};
use crate::config::{ListenerPlan, ListenerTls};
use crate::metrics::ListenerMetrics;

/// The WebSocket path devices connect to.
pub const WS_PATH: &str = "/mqtt";

/// Sockets beyond `max_connections` still allowed to be mid-handshake: the MQTT-level
/// limit answers with a CONNACK, which needs a finished handshake.
const HANDSHAKE_SLACK: usize = 64;

/// A TLS and/or WebSocket listener in front of a loopback rumqttd listener.
pub struct Front {
    name: String,
    tls: Option<TlsAcceptor>,
    websocket: bool,
    timeout: Duration,
    max_sockets: usize,
    max_message: usize,
    internal: SocketAddr,
    token: [u8; TOKEN_LEN],
    metrics: ListenerMetrics,
    open: AtomicUsize,
}

impl Front {
    pub fn new(
        plan: &ListenerPlan,
        internal: SocketAddr,
        token: [u8; TOKEN_LEN],
        metrics: ListenerMetrics,
    ) -> anyhow::Result<Self> {
        let tls = match &plan.tls {
            Some(t) => Some(TlsAcceptor::from(Arc::new(
                server_config(t)
                    .with_context(|| format!("listener {}: TLS settings", plan.name))?,
            ))),
            None => None,
        };
        Ok(Self {
            name: plan.name.clone(),
            tls,
            websocket: plan.websocket,
            timeout: plan.connect_timeout,
            max_sockets: plan.max_connections + HANDSHAKE_SLACK,
            // A WebSocket message carries at most one MQTT packet's worth, plus framing.
            max_message: plan.max_packet_size + 1024,
            internal,
            token,
            metrics,
            open: AtomicUsize::new(0),
        })
    }

    /// The accept loop: never waits on a device.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (socket, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly.
                    debug!(listener = %self.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if self.open.fetch_add(1, Ordering::Relaxed) >= self.max_sockets {
                self.open.fetch_sub(1, Ordering::Relaxed);
                self.metrics.refused.max_connections.inc();
                debug!(listener = %self.name, %peer, "too many sockets open; closing a new one");
                continue;
            }
            let front = self.clone();
            tokio::spawn(async move {
                front.connection(socket, peer).await;
                front.open.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }

    async fn connection(&self, socket: TcpStream, peer: SocketAddr) {
        let _ = socket.set_nodelay(true);
        let device = match tokio::time::timeout(self.timeout, self.handshake(socket)).await {
            Ok(Ok(device)) => device,
            Ok(Err(e)) => {
                self.metrics.refused.handshake.inc();
                info!(listener = %self.name, %peer, error = %e, "device handshake failed");
                return;
            }
            Err(_) => {
                self.metrics.refused.handshake.inc();
                info!(listener = %self.name, %peer, timeout = ?self.timeout, "device handshake timed out");
                return;
            }
        };
        let cn = device.cn.clone();
        let mut internal = match TcpStream::connect(self.internal).await {
            Ok(s) => s,
            Err(e) => {
                info!(listener = %self.name, error = %e, "cannot reach the internal broker listener");
                return;
            }
        };
        let _ = internal.set_nodelay(true);
        if internal
            .write_all(&preamble(&self.token, cn.as_deref()))
            .await
            .is_err()
        {
            return;
        }
        let result = match device.io {
            DeviceIo::Stream(mut stream) => {
                tokio::io::copy_bidirectional(&mut stream, &mut internal)
                    .await
                    .map(drop)
            }
            DeviceIo::WebSocket(ws) => relay_websocket(*ws, internal).await,
        };
        if let Err(e) = result {
            debug!(listener = %self.name, %peer, error = %e, "device connection ended");
        }
    }

    async fn handshake(&self, socket: TcpStream) -> anyhow::Result<Device> {
        let (stream, cn) = match &self.tls {
            Some(acceptor) => {
                let tls = acceptor.accept(socket).await.context("TLS")?;
                let cn = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .and_then(|cert| certificate_identity(cert));
                (Stream::Tls(Box::new(tls)), cn)
            }
            None => (Stream::Plain(socket), None),
        };
        let io = if self.websocket {
            let mut config = WebSocketConfig::default();
            config.max_message_size = Some(self.max_message);
            config.max_frame_size = Some(self.max_message);
            let ws = tokio_tungstenite::accept_hdr_async_with_config(
                stream,
                websocket_request,
                Some(config),
            )
            .await
            .context("WebSocket")?;
            DeviceIo::WebSocket(Box::new(ws))
        } else {
            DeviceIo::Stream(stream)
        };
        Ok(Device { io, cn })
    }
}

struct Device {
    io: DeviceIo,
    cn: Option<String>,
}

enum DeviceIo {
    Stream(Stream),
    WebSocket(Box<tokio_tungstenite::WebSocketStream<Stream>>),
}

/// Checks the upgrade request: path `/mqtt`, and the `mqtt` subprotocol when the client
/// offers subprotocols (MQTT over WebSocket requires it).
// The error type is tungstenite's, not ours to shrink.
#[allow(clippy::result_large_err)]
fn websocket_request(request: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
    let refuse = |status: StatusCode, why: &str| {
        let mut r = ErrorResponse::new(Some(why.to_string()));
        *r.status_mut() = status;
        r
    };
    if request.uri().path() != WS_PATH {
        return Err(refuse(StatusCode::NOT_FOUND, "MQTT is served on /mqtt"));
    }
    let offered: Vec<String> = request
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
        .collect();
    if offered.is_empty() {
        return Ok(response);
    }
    match offered.iter().find(|p| *p == "mqtt" || *p == "mqttv3.1") {
        Some(p) => {
            if let Ok(v) = HeaderValue::from_str(p) {
                response.headers_mut().insert("sec-websocket-protocol", v);
            }
            Ok(response)
        }
        None => Err(refuse(
            StatusCode::BAD_REQUEST,
            "the WebSocket subprotocol must be mqtt",
        )),
    }
}

/// Relays binary WebSocket messages to the internal TCP connection and back.
async fn relay_websocket(
    ws: tokio_tungstenite::WebSocketStream<Stream>,
    internal: TcpStream,
) -> io::Result<()> {
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (mut rd, mut wr) = internal.into_split();
    let upstream = async {
        while let Some(msg) = ws_rx.next().await {
            match msg.map_err(io::Error::other)? {
                Message::Binary(data) => wr.write_all(&data).await?,
                Message::Close(_) => break,
                // Pings are answered by tungstenite; text is not MQTT.
                Message::Text(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text WebSocket message (MQTT uses binary)",
                    ))
                }
                _ => {}
            }
        }
        wr.shutdown().await
    };
    let downstream = async {
        let mut buf = bytes::BytesMut::new();
        loop {
            buf.reserve(16 * 1024);
            if rd.read_buf(&mut buf).await? == 0 {
                let _ = ws_tx.close().await;
                return Ok::<_, io::Error>(());
            }
            // The bytes read become the message without a copy.
            ws_tx
                .send(Message::binary(buf.split().freeze()))
                .await
                .map_err(io::Error::other)?;
        }
    };
    // Whichever side ends first ends the connection.
    tokio::select! {
        r = upstream => r,
        r = downstream => r,
    }
}

/// The device's byte stream: plain TCP or TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The certificate's subject CN, or its first subject alternative name.
fn certificate_identity(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    if let Some(cn) = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
    {
        return Some(cn.to_string());
    }
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
            Some(s.to_string())
        }
        _ => None,
    })
}

fn read_pem(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// The rustls server configuration of a device listener; with `client_ca`, a client
/// certificate signed by it is required.
pub fn server_config(tls: &ListenerTls) -> anyhow::Result<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut read_pem(&tls.cert)?.as_slice())
            .collect::<Result<_, _>>()
            .with_context(|| format!("{}: not PEM certificates", tls.cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{}: no certificate in the file", tls.cert.display());
    }
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut read_pem(&tls.key)?.as_slice())
            .with_context(|| format!("{}: not a PEM private key", tls.key.display()))?
            .with_context(|| format!("{}: no private key in the file", tls.key.display()))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut read_pem(ca)?.as_slice()) {
                let cert = cert.with_context(|| format!("{}: not PEM", ca.display()))?;
                roots
                    .add(cert)
                    .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
            }
            if roots.is_empty() {
                anyhow::bail!("{}: no CA certificate in the file", ca.display());
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder
        .with_single_cert(certs, key)
        .context("the certificate does not match the key")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_the_cn_or_else_the_first_san() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["plc-7.plant".into()]).expect("p");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "press-4");
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(certificate_identity(cert.der()).as_deref(), Some("press-4"));

        let mut params = rcgen::CertificateParams::new(vec!["plc-7.plant".into()]).expect("p");
        params.distinguished_name = rcgen::DistinguishedName::new();
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(
            certificate_identity(cert.der()).as_deref(),
            Some("plc-7.plant")
        );
    }

    #[test]
    fn bad_tls_files_are_clear_errors() {
        let dir = tempfile::tempdir().expect("dir");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem").expect("write");
        let tls = ListenerTls {
            cert: junk.clone(),
            key: junk.clone(),
            client_ca: None,
        };
        let e = server_config(&tls).expect_err("junk");
        assert!(format!("{e:#}").contains("no certificate"), "{e:#}");
    }
}
