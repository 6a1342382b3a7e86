//! A device's byte stream: plain TCP, TLS, WebSocket or WebSocket over TLS, behind one
//! type so every transport takes the same code path in `connection.rs`.
//!
//! [`accept`] runs the TLS and WebSocket handshakes; the caller bounds it with the
//! listener's `connect_timeout` (an idle socket must never hold anything up: with
//! rumqttd's own listener, one did). After that, [`Transport::read`] appends the device's
//! bytes to the connection's buffer and [`Transport::write`] sends encoded packets (one
//! binary WebSocket message per write on WebSocket listeners).
//!
//! Certificate rotation: a TLS listener keeps the files its acceptor came from;
//! [`Handshake::reload_tls`] reads them again (the broker calls it every
//! [`super::CREDENTIALS_POLL`] and on SIGHUP) and, when they changed and make a working
//! configuration, new handshakes use the new acceptor. Connections already up keep theirs.
//! Files that do not load are refused and the acceptor in force stays.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use anyhow::Context;
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use parking_lot::{Mutex, RwLock};
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use super::config::{ListenerPlan, ListenerTls};
use crate::pem;

/// The WebSocket path devices connect to.
pub const WS_PATH: &str = "/mqtt";

/// How a listener's sockets become device streams.
pub struct Handshake {
    tls: Option<Rotating>,
    websocket: bool,
    max_message: usize,
}

/// A TLS listener's acceptor and the files it came from.
struct Rotating {
    files: ListenerTls,
    /// What new handshakes use.
    acceptor: RwLock<TlsAcceptor>,
    /// A digest of the files as last read, applied or refused: each change is acted on
    /// (and reported) once.
    seen: Mutex<u64>,
}

/// What [`Handshake::reload_tls`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum TlsReload {
    /// The files are as last read.
    Unchanged,
    /// New handshakes use the new certificate.
    Applied,
    /// The new files do not load; the acceptor in force stays. Why.
    Refused(String),
}

impl Handshake {
    pub fn new(plan: &ListenerPlan) -> anyhow::Result<Self> {
        let tls = match &plan.tls {
            Some(t) => Some(Rotating {
                acceptor: RwLock::new(TlsAcceptor::from(Arc::new(
                    server_config(t)
                        .with_context(|| format!("listener {}: TLS settings", plan.name))?,
                ))),
                seen: Mutex::new(digest(t)),
                files: t.clone(),
            }),
            None => None,
        };
        Ok(Self {
            tls,
            websocket: plan.websocket,
            // A WebSocket message carries at most one MQTT packet's worth, plus framing.
            max_message: plan.max_packet_size + 1024,
        })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Reads the TLS files again (blocking file I/O: call off the async workers) and, if
    /// they changed, puts a new acceptor in force or refuses them. `None`: no TLS.
    pub fn reload_tls(&self) -> Option<TlsReload> {
        let tls = self.tls.as_ref()?;
        let now = digest(&tls.files);
        {
            let mut seen = tls.seen.lock();
            if *seen == now {
                return Some(TlsReload::Unchanged);
            }
            *seen = now;
        }
        Some(match server_config(&tls.files) {
            Ok(config) => {
                *tls.acceptor.write() = TlsAcceptor::from(Arc::new(config));
                TlsReload::Applied
            }
            Err(e) => TlsReload::Refused(format!("{e:#}")),
        })
    }

    /// Runs the TLS and WebSocket handshakes (unbounded: the caller times it out).
    /// Returns the stream and the verified client certificate's identity.
    pub async fn accept(&self, socket: TcpStream) -> anyhow::Result<(Transport, Option<String>)> {
        let (stream, cn) = match &self.tls {
            Some(rotating) => {
                // The acceptor is an `Arc` inside: the lock is held for a clone.
                let acceptor = rotating.acceptor.read().clone();
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
            Transport::WebSocket(Box::new(ws))
        } else {
            Transport::Stream(stream)
        };
        Ok((io, cn))
    }
}

/// A device connection after its handshakes.
pub enum Transport {
    Stream(Stream),
    WebSocket(Box<tokio_tungstenite::WebSocketStream<Stream>>),
}

impl Transport {
    /// Appends what the device sent next to `buf`; `Ok(0)` when it closed. Cancel-safe
    /// (it is one branch of the connection's `select!`).
    pub async fn read(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Transport::Stream(s) => {
                // Grow in small steps: an idle connection keeps a small buffer, and only
                // a large packet (whose length the codec reported) reserves more.
                if buf.capacity() - buf.len() < 64 {
                    buf.reserve(512);
                }
                s.read_buf(buf).await
            }
            Transport::WebSocket(ws) => loop {
                match ws.next().await {
                    None => return Ok(0),
                    Some(Err(e)) => return Err(io::Error::other(e)),
                    Some(Ok(Message::Binary(data))) => {
                        if data.is_empty() {
                            continue;
                        }
                        buf.extend_from_slice(&data);
                        return Ok(data.len());
                    }
                    Some(Ok(Message::Close(_))) => return Ok(0),
                    Some(Ok(Message::Text(_))) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "text WebSocket message (MQTT uses binary)",
                        ))
                    }
                    // Pings are answered by tungstenite.
                    Some(Ok(_)) => {}
                }
            },
        }
    }

    /// Sends `data` (whole packets) and flushes it.
    pub async fn write(&mut self, data: BytesMut) -> io::Result<()> {
        match self {
            Transport::Stream(s) => {
                s.write_all(&data).await?;
                s.flush().await
            }
            Transport::WebSocket(ws) => ws
                .send(Message::binary(data.freeze()))
                .await
                .map_err(io::Error::other),
        }
    }

    /// Closes the stream politely (WebSocket close frame, TLS close_notify).
    pub async fn close(&mut self) {
        match self {
            Transport::Stream(s) => {
                let _ = s.shutdown().await;
            }
            Transport::WebSocket(ws) => {
                let _ = SinkExt::close(ws.as_mut()).await;
            }
        }
    }
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

/// The device's byte stream: plain TCP or TLS.
pub enum Stream {
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

/// A digest of what the TLS files hold now (an unreadable file counts as its error), to
/// tell a change.
fn digest(tls: &ListenerTls) -> u64 {
    let mut hasher = DefaultHasher::new();
    for path in [Some(&tls.cert), Some(&tls.key), tls.client_ca.as_ref()]
        .into_iter()
        .flatten()
    {
        match std::fs::read(path) {
            Ok(bytes) => bytes.hash(&mut hasher),
            Err(e) => e.kind().hash(&mut hasher),
        }
    }
    hasher.finish()
}

fn read_pem(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// The rustls server configuration of a device listener; with `client_ca`, a client
/// certificate signed by it is required.
pub fn server_config(tls: &ListenerTls) -> anyhow::Result<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let read = |path: &Path| read_pem(path).map(|bytes| (bytes, path.display().to_string()));
    let (bytes, what) = read(&tls.cert)?;
    let certs = pem::certificates(&bytes, &what).map_err(anyhow::Error::msg)?;
    let (bytes, what) = read(&tls.key)?;
    let key = pem::private_key(&bytes, &what).map_err(anyhow::Error::msg)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let (bytes, what) = read(ca)?;
            let roots = pem::roots(&bytes, &what).map_err(anyhow::Error::msg)?;
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
