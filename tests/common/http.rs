//! A real HTTP(S) server for webhook tests, answering from a script and recording every
//! request. Plain HTTP/1.1, or TLS offering h2 and http/1.1 (optionally requiring a
//! client certificate signed by the test CA). Included with
//! `#[path = "common/http.rs"] mod http;`.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::common::TestCerts;

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    /// Wait this long before answering (a hanging server: longer than the client's
    /// timeout).
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn header(mut self, name: &'static str, value: &str) -> Reply {
        self.headers.push((name, value.to_string()));
        self
    }

    pub fn delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The status it was answered with.
    pub status: u16,
    /// The client certificate of its connection (DER), with mutual TLS.
    pub client_cert: Option<Vec<u8>>,
    pub at: std::time::Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("request body is JSON")
    }

    /// The body's NDJSON lines.
    pub fn ndjson(&self) -> Vec<serde_json::Value> {
        self.body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("NDJSON line"))
            .collect()
    }
}

#[derive(Default)]
struct Shared {
    script: Mutex<VecDeque<Reply>>,
    /// Requests whose body contains this get this status (a message the receiver
    /// refuses, wherever it is in a batch).
    refuse: Mutex<Option<(Vec<u8>, u16)>>,
    received: Mutex<Vec<Received>>,
}

pub struct HttpServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
    tls: Option<(Arc<rustls::ServerConfig>,)>,
}

impl HttpServer {
    /// Plain HTTP on a free port.
    pub async fn start() -> HttpServer {
        Self::bind("127.0.0.1:0".parse().expect("addr"), None).await
    }

    /// HTTPS with the test CA's server certificate; `require_client_cert` = mTLS.
    pub async fn start_tls(certs: &TestCerts, require_client_cert: bool) -> HttpServer {
        let mut config = crate::common::tls_server_config(certs, require_client_cert);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self::bind(
            "127.0.0.1:0".parse().expect("addr"),
            Some((Arc::new(config),)),
        )
        .await
    }

    async fn bind(addr: SocketAddr, tls: Option<(Arc<rustls::ServerConfig>,)>) -> HttpServer {
        let mut server = HttpServer {
            addr,
            shared: Arc::new(Shared::default()),
            task: None,
            tls,
        };
        server.listen().await;
        server
    }

    async fn listen(&mut self) {
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("bind http server");
        self.addr = listener.local_addr().expect("local addr");
        let app = Router::new()
            .fallback(handle)
            .with_state(self.shared.clone());
        let tls = self.tls.clone();
        self.task = Some(tokio::spawn(async move {
            let acceptor = tls.map(|(c,)| tokio_rustls::TlsAcceptor::from(c));
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let app = app.clone();
                let acceptor = acceptor.clone();
                connections.spawn(async move {
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(acceptor) => {
                            // A refused handshake (wrong client cert) just closes.
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                let cert = tls
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|chain| chain.first())
                                    .map(|c| c.to_vec());
                                let service = TowerToHyperService::new(
                                    app.layer(axum::Extension(ClientCert(cert))),
                                );
                                let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let service = TowerToHyperService::new(app);
                            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                        }
                    }
                });
            }
        }));
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        // The test certificate names localhost.
        format!("{scheme}://localhost:{}{path}", self.addr.port())
    }

    /// Queues answers for the next requests; once the script is empty, requests get 200.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.shared
            .script
            .lock()
            .expect("script lock")
            .extend(replies);
    }

    /// Answers `status` to every request whose body contains `needle`.
    pub fn refuse_containing(&self, needle: &str, status: u16) {
        *self.shared.refuse.lock().expect("refuse lock") =
            Some((needle.as_bytes().to_vec(), status));
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().expect("received lock").clone()
    }

    /// Requests answered 2xx.
    pub fn accepted(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .collect()
    }

    /// Polls until `cond` holds on the received requests, or `timeout` passes.
    pub async fn wait_for(&self, timeout: Duration, cond: impl Fn(&[Received]) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if cond(&self.received()) {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops listening and drops every connection.
    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Listens again on the same port, keeping the script and the record.
    pub async fn restart(&mut self) {
        self.stop();
        self.listen().await;
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The client certificate of a TLS connection, handed to each of its requests.
#[derive(Clone)]
struct ClientCert(Option<Vec<u8>>);

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let client_cert = parts
        .extensions
        .get::<ClientCert>()
        .and_then(|c| c.0.clone());
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let refused = shared
        .refuse
        .lock()
        .expect("refuse lock")
        .as_ref()
        .filter(|(needle, _)| body.windows(needle.len()).any(|w| w == needle.as_slice()))
        .map(|(_, status)| Reply::status(*status));
    let reply = refused.unwrap_or_else(|| {
        shared
            .script
            .lock()
            .expect("script lock")
            .pop_front()
            .unwrap_or_else(|| Reply::status(200))
    });
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    shared
        .received
        .lock()
        .expect("received lock")
        .push(Received {
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            version: parts.version,
            headers: parts.headers,
            body,
            status: reply.status,
            client_cert,
            at: std::time::Instant::now(),
        });
    let status = StatusCode::from_u16(reply.status).expect("valid status");
    let mut response = status.into_response();
    for (name, value) in reply.headers {
        response
            .headers_mut()
            .insert(name, value.parse().expect("header value"));
    }
    response
}
