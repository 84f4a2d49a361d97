//! The sandbox fault-injection middleware as a client sees it, over real HTTP/1 connections
//! served the way the sandbox serves them (hyper http1 + TowerToHyperService).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use pis_worker::sandbox::faults::{
    self, EndpointClass, Fault, FaultRule, FaultSettings, Faults, Latency,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;

struct App {
    base: String,
    calls: Arc<AtomicUsize>,
    faults: Faults,
    client: reqwest::Client,
}

impl App {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    async fn initiate(&self) -> reqwest::Result<reqwest::Response> {
        self.client
            .post(format!("{}/payments/sepa-credit-transfers", self.base))
            .body("{}")
            .send()
            .await
    }

    async fn status(&self) -> reqwest::Result<reqwest::Response> {
        self.client
            .get(format!(
                "{}/payments/sepa-credit-transfers/p-1/status",
                self.base
            ))
            .send()
            .await
    }
}

async fn counting(State(calls): State<Arc<AtomicUsize>>) -> &'static str {
    calls.fetch_add(1, Ordering::SeqCst);
    "{\"payment_id\":\"p-1\"}"
}

/// A bank-like app (two routes sharing a call counter) behind the fault middleware, plus the
/// admin router, on 127.0.0.1:0.
async fn start(settings: FaultSettings) -> App {
    let calls = Arc::new(AtomicUsize::new(0));
    let faults = Faults::default();
    faults.set(settings);
    let app = Router::new()
        .route("/payments/{product}", post(counting))
        .route("/payments/{product}/{id}/status", get(counting))
        .with_state(calls.clone())
        .layer(from_fn_with_state(faults.clone(), faults::middleware))
        .merge(faults::admin_router(faults.clone()));

    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let service = TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                // Injected faults end connections with an error: expected.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    App {
        base: format!("http://{addr}"),
        calls,
        faults,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client"),
    }
}

fn rule(endpoint: EndpointClass, probability: f64, fault: Fault) -> FaultRule {
    FaultRule {
        endpoint,
        probability,
        fault,
        remaining: None,
    }
}

fn only(rule: FaultRule) -> FaultSettings {
    FaultSettings {
        latency: Latency::default(),
        rules: vec![rule],
    }
}

#[tokio::test]
async fn status_fault_returns_belfius_error_with_retry_after() {
    let app = start(only(rule(
        EndpointClass::Initiate,
        1.0,
        Fault::Status {
            status: 429,
            retry_after_secs: Some(7),
        },
    )))
    .await;
    let response = app.initiate().await.expect("an HTTP answer");
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("7")
    );
    let body: Value = response.json().await.expect("json body");
    assert_eq!(
        body,
        json!({
            "error": "INTERNAL_SERVER_ERROR",
            "error_code": "GEN-5000-000000",
            "error_description": "simulated",
        })
    );
    assert_eq!(app.calls(), 0, "a status fault does not reach the handler");

    // Other endpoints are untouched by an Initiate rule.
    let response = app.status().await.expect("status call");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(app.calls(), 1);

    app.faults.set(only(rule(
        EndpointClass::Any,
        1.0,
        Fault::Status {
            status: 503,
            retry_after_secs: None,
        },
    )));
    let response = app.status().await.expect("an HTTP answer");
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().get("retry-after").is_none());
}

#[tokio::test]
async fn reset_is_a_connection_error_and_does_nothing() {
    let app = start(only(rule(EndpointClass::Initiate, 1.0, Fault::Reset))).await;
    for _ in 0..3 {
        let error = app.initiate().await.expect_err("no HTTP answer");
        assert!(error.status().is_none(), "{error:?}");
        assert!(!error.is_timeout(), "{error:?}");
    }
    assert_eq!(app.calls(), 0, "the handler never ran");

    // The client recovers on a fresh connection once the fault is cleared.
    app.faults.clear();
    assert_eq!(app.initiate().await.expect("ok").status().as_u16(), 200);
    assert_eq!(app.calls(), 1);
}

#[tokio::test]
async fn response_lost_processes_then_drops() {
    let app = start(only(rule(
        EndpointClass::Initiate,
        1.0,
        Fault::ResponseLost { hang_ms: 300 },
    )))
    .await;
    let started = Instant::now();
    let error = app.initiate().await.expect_err("no HTTP answer");
    assert!(error.status().is_none(), "{error:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(app.calls(), 1, "the bank acted");

    // A client with a shorter timeout sees a timeout instead.
    app.faults.set(only(rule(
        EndpointClass::Initiate,
        1.0,
        Fault::ResponseLost { hang_ms: 5_000 },
    )));
    let error = app
        .client
        .post(format!("{}/payments/sepa-credit-transfers", app.base))
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .expect_err("no HTTP answer");
    assert!(error.is_timeout(), "{error:?}");
    // The handler runs before the hang, i.e. before the client gave up.
    assert_eq!(app.calls(), 2);
}

#[tokio::test]
async fn probability_zero_never_fires() {
    let app = start(only(rule(EndpointClass::Any, 0.0, Fault::Reset))).await;
    for _ in 0..50 {
        assert_eq!(app.initiate().await.expect("ok").status().as_u16(), 200);
    }
    assert_eq!(app.calls(), 50);
    assert_eq!(app.faults.counters()["total"], 0);
}

#[tokio::test]
async fn remaining_one_fires_once() {
    let app = start(only(FaultRule {
        remaining: Some(1),
        ..rule(
            EndpointClass::Status,
            1.0,
            Fault::Status {
                status: 502,
                retry_after_secs: None,
            },
        )
    }))
    .await;
    assert_eq!(app.status().await.expect("answer").status().as_u16(), 502);
    for _ in 0..5 {
        assert_eq!(app.status().await.expect("answer").status().as_u16(), 200);
    }
    assert_eq!(app.calls(), 5);
    assert_eq!(app.faults.settings().rules[0].remaining, Some(0));
    let counters = app.faults.counters();
    assert_eq!(counters["total"], 1);
    assert_eq!(counters["by_fault"]["status_502"]["status"], 1);
}

#[tokio::test]
async fn latency_adds_at_least_fixed_ms() {
    let app = start(FaultSettings {
        latency: Latency {
            fixed_ms: 200,
            jitter_ms: 50,
            p99_spike_ms: 0,
        },
        rules: vec![],
    })
    .await;
    for _ in 0..2 {
        let started = Instant::now();
        assert_eq!(app.initiate().await.expect("ok").status().as_u16(), 200);
        assert!(started.elapsed() >= Duration::from_millis(200));
    }
}

#[tokio::test]
async fn admin_router_round_trips_settings() {
    let app = start(FaultSettings::default()).await;
    let url = format!("{}/admin/faults", app.base);

    let shown: Value = app
        .client
        .get(&url)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(
        shown["settings"],
        json!({"latency": {"fixed_ms": 0, "jitter_ms": 0, "p99_spike_ms": 0}, "rules": []})
    );
    assert_eq!(shown["counters"]["total"], 0);

    let settings = FaultSettings {
        latency: Latency {
            fixed_ms: 1,
            jitter_ms: 2,
            p99_spike_ms: 3,
        },
        rules: vec![
            FaultRule {
                remaining: Some(4),
                ..rule(
                    EndpointClass::Token,
                    0.25,
                    Fault::Status {
                        status: 503,
                        retry_after_secs: Some(1),
                    },
                )
            },
            rule(
                EndpointClass::Cancel,
                1.0,
                Fault::ResponseLost { hang_ms: 10 },
            ),
            rule(EndpointClass::Details, 0.0, Fault::Reset),
        ],
    };
    let put = app
        .client
        .put(&url)
        .json(&settings)
        .send()
        .await
        .expect("put");
    assert_eq!(put.status().as_u16(), 204);
    assert_eq!(app.faults.settings(), settings);

    let shown: Value = app
        .client
        .get(&url)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    let back: FaultSettings = serde_json::from_value(shown["settings"].clone()).expect("settings");
    assert_eq!(back, settings);

    // Invalid settings are refused and leave the current ones in place.
    let bad =
        json!({"rules": [{"endpoint": "any", "probability": 2.0, "fault": {"kind": "reset"}}]});
    let put = app.client.put(&url).json(&bad).send().await.expect("put");
    assert_eq!(put.status().as_u16(), 400);
    assert_eq!(app.faults.settings(), settings);

    let delete = app.client.delete(&url).send().await.expect("delete");
    assert_eq!(delete.status().as_u16(), 204);
    assert_eq!(app.faults.settings(), FaultSettings::default());
}
