//! The operations endpoint: `/metrics`, `/healthz`, `/readyz` (docs/metrics.md).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::metrics;

/// A broker that has not answered for this long makes the worker not ready.
pub const BROKER_STALE_MS: i64 = 30_000;

/// What readiness is decided from; written by the engine.
#[derive(Default)]
pub struct Health {
    /// When the broker last answered a metadata request (Unix millis; 0 = never).
    broker_ok_at: AtomicI64,
}

impl Health {
    pub fn broker_answered(&self, at: i64) {
        self.broker_ok_at.store(at, Ordering::Release);
        metrics().broker_reachable.set(1);
    }

    /// `Err(reason)` when the worker should not receive traffic.
    pub fn readiness(&self, now: i64) -> Result<(), String> {
        let ok_at = self.broker_ok_at.load(Ordering::Acquire);
        let reachable = ok_at > 0 && now - ok_at <= BROKER_STALE_MS;
        metrics().broker_reachable.set(i64::from(reachable));
        if !reachable {
            return Err(if ok_at == 0 {
                "broker not reached yet".to_owned()
            } else {
                format!("broker silent for {} s", (now - ok_at) / 1000)
            });
        }
        let restoring = metrics().restores_in_progress.get();
        if restoring > 0 {
            return Err(format!("{restoring} assigned partition(s) still restoring"));
        }
        Ok(())
    }
}

async fn metrics_text(State(health): State<Arc<Health>>) -> impl IntoResponse {
    // Refresh the derived gauges before rendering.
    let _ = health.readiness(crate::engine::now_millis());
    crate::engine::stats::export();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics().render(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(health): State<Arc<Health>>) -> (StatusCode, String) {
    match health.readiness(crate::engine::now_millis()) {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(health)
}

/// Binds `addr` and serves until the process ends. Returns the bound address (port 0 picks one).
pub async fn serve(addr: SocketAddr, health: Arc<Health>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(health)).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_until_the_broker_answered_and_again_when_it_goes_silent() {
        let health = Health::default();
        assert!(health.readiness(1_000_000).is_err());
        health.broker_answered(1_000_000);
        assert!(health.readiness(1_000_000 + 1_000).is_ok());
        let stale = health.readiness(1_000_000 + BROKER_STALE_MS + 1);
        assert!(stale.is_err_and(|r| r.contains("silent")));
    }
}
