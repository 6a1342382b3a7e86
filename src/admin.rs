//! The admin HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (alive: every device
//! listener accepts a loopback connection), `/readyz` (started: config loaded, buffers
//! open, listeners bound).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::broker::loopback;
use crate::buffer::Buffer;
use crate::metrics::Metrics;

pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub buffers: Vec<Arc<Buffer>>,
    /// Device listener addresses probed by `/healthz`.
    pub listeners: Vec<SocketAddr>,
    pub ready: AtomicBool,
}

async fn metrics(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    for b in &state.buffers {
        b.refresh_age();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn healthz(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    for &addr in &state.listeners {
        let probe =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(loopback(addr)));
        if !matches!(probe.await, Ok(Ok(_))) {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("listener {addr} does not accept connections\n"),
            );
        }
    }
    (StatusCode::OK, "ok\n".to_string())
}

async fn readyz(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

/// Binds `bind` and serves until `shutdown`. Returns the bound address.
pub async fn start(
    bind: SocketAddr,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(bind)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind admin address {bind}: {e}"))?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok((addr, task))
}
