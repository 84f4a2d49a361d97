//! The worker switches a brand to the fallback interface while the dedicated API is down, and
//! back when it recovers (docs/belfius.md §7.5), on real parts: the broker, the TLS sandbox and
//! a worker process. No payment is lost, none reaches two final states, and the bank holds each
//! exactly once.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use pis_worker::domain::machine::StateKind;
use pis_worker::sandbox::faults::{EndpointClass, Fault, FaultRule, FaultSettings};
use serde_json::Value;

const ROUTE_DEDICATED: &str = r#"pis_bank_route{brand="belfius",interface="dedicated"}"#;
const ROUTE_FALLBACK: &str = r#"pis_bank_route{brand="belfius",interface="fallback"}"#;

/// Waits until the sample `series` of the worker's /metrics satisfies `ok`; its value.
async fn metric_until(port: u16, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let value = text
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok());
        if let Some(value) = value.filter(|v| ok(*v)) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never reached the expected value (last {value:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The PSU signs the payment with this end-to-end id at the bank (its app, not the redirect):
/// the worker learns it by polling, on whichever interface the route says.
async fn sign_at_bank(env: &TestEnv, e2e: &str) {
    let url = env
        .sandbox
        .admin_base_url()
        .join(&format!("admin/e2e/{e2e}/sign"))
        .expect("url");
    let response = reqwest::Client::new()
        .post(url)
        .send()
        .await
        .expect("admin call");
    assert!(
        response.status().is_success(),
        "signing {e2e}: {}",
        response.text().await.unwrap_or_default()
    );
}

async fn bank_payments(env: &TestEnv) -> Vec<Value> {
    let url = env
        .sandbox
        .admin_base_url()
        .join("admin/payments")
        .expect("url");
    reqwest::get(url)
        .await
        .expect("payments")
        .json()
        .await
        .expect("json")
}

fn dedicated_down() -> FaultSettings {
    FaultSettings {
        rules: vec![FaultRule {
            endpoint: EndpointClass::Any,
            probability: 1.0,
            fault: Fault::Status {
                status: 503,
                retry_after_secs: None,
            },
            remaining: None,
        }],
        ..FaultSettings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brand_switches_to_the_fallback_and_back_without_losing_or_doubling_a_payment() {
    let env = TestEnv::new(|c| c.settle_after = Duration::from_millis(300)).await;
    let port = free_port();
    let http_addr = format!("127.0.0.1:{port}");
    let endpoints = env.sandbox.fallback_endpoints();
    let worker = env.start_worker(
        "fb",
        &[
            "--http-addr",
            &http_addr,
            "--poll-fast-ms",
            "300",
            "--poll-fast-count",
            "1000",
            // A breaker that opens after 3 failed calls and probes every second, no retries:
            // the outage is seen within a second of polling.
            "--bank-circuit-consecutive-failures",
            "3",
            "--bank-circuit-failure-percent",
            "0",
            "--bank-circuit-open-ms",
            "1000",
            "--bank-retry-max-retries",
            "0",
            "--fallback-enabled",
            "--fallback-after-secs",
            "3",
            "--fallback-back-after-secs",
            "1",
            "--fallback-belfius-url",
            endpoints.belfius_base_url.as_str(),
            "--fallback-banx-url",
            endpoints.banx_base_url.as_str(),
            "--fallback-session-path",
            &endpoints.session_path,
            "--fallback-payments-path",
            &endpoints.payments_path,
            "--fallback-key-id",
            &endpoints.key_id,
        ],
    );
    worker.wait_restored(PARTITIONS as usize).await;
    assert_eq!(metric_until(port, ROUTE_DEDICATED, |v| v == 1.0).await, 1.0);

    // Dedicated API up: a1 settles through it; a2 waits for its PSU and keeps being polled.
    for id in ["fbs-a1", "fbs-a2"] {
        env.send(&initiate(id, &format!("psu-{id}"), "10.00", "Shop"))
            .await;
        env.wait_for_state(id, StateKind::ScaPending).await;
    }
    sign_at_bank(&env, "fbs-a1").await;
    env.wait_for_state("fbs-a1", StateKind::Settled).await;

    // The dedicated API goes down: a2's polls fail and open the circuit.
    env.sandbox.faults().set(dedicated_down());
    metric_until(port, r#"pis_circuit_breaker_state{host="belfius"}"#, |v| {
        v >= 1.0
    })
    .await;
    // Sent while the circuit is open but before the switch-over: it waits (nothing is sent to
    // a host that is down), then goes through the fallback.
    env.send(&initiate("fbs-b0", "psu-fbs-b0", "20.00", "Shop"))
        .await;
    metric_until(port, ROUTE_FALLBACK, |v| v == 1.0).await;
    assert_eq!(metric_until(port, ROUTE_DEDICATED, |_| true).await, 0.0);

    // On the fallback: new payments are initiated there, and polled there until they settle.
    for id in ["fbs-b1", "fbs-b2"] {
        env.send(&initiate(id, &format!("psu-{id}"), "30.00", "Shop"))
            .await;
    }
    for id in ["fbs-b0", "fbs-b1", "fbs-b2"] {
        env.wait_for_state(id, StateKind::ScaPending).await;
    }
    for id in ["fbs-a2", "fbs-b0", "fbs-b1"] {
        sign_at_bank(&env, id).await;
    }
    for id in ["fbs-a2", "fbs-b0", "fbs-b1"] {
        env.wait_for_state(id, StateKind::Settled).await;
    }

    // The dedicated API is back: a probe closes the circuit, the route follows after its hold.
    env.sandbox.faults().clear();
    metric_until(port, ROUTE_DEDICATED, |v| v == 1.0).await;
    assert_eq!(metric_until(port, ROUTE_FALLBACK, |_| true).await, 0.0);
    env.send(&initiate("fbs-c1", "psu-fbs-c1", "40.00", "Shop"))
        .await;
    env.wait_for_state("fbs-c1", StateKind::ScaPending).await;
    // b2, initiated through the fallback, is now polled through the dedicated API.
    for id in ["fbs-b2", "fbs-c1"] {
        sign_at_bank(&env, id).await;
    }
    for id in ["fbs-b2", "fbs-c1"] {
        env.wait_for_state(id, StateKind::Settled).await;
    }

    // Every payment: one well-formed stream, exactly one final event, SETTLED.
    let all = ["fbs-a1", "fbs-a2", "fbs-b0", "fbs-b1", "fbs-b2", "fbs-c1"];
    let events = env.status_events();
    for id in all {
        assert_well_formed(&events, id);
        let line = timeline(&events, id);
        let finals: Vec<_> = line.iter().filter(|e| e.is_final).collect();
        assert_eq!(finals.len(), 1, "{id}: {}", describe(&line));
        assert_eq!(finals[0].state, StateKind::Settled, "{id}");
    }

    // The bank holds each payment once, created by the interface the route named at the time
    // (a fallback payment has no PKCE challenge).
    let mut by_e2e: BTreeMap<String, Vec<bool>> = BTreeMap::new();
    for p in bank_payments(&env).await {
        by_e2e
            .entry(
                p["endtoend_identification"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            )
            .or_default()
            .push(p["pkce"].as_bool().unwrap_or(false));
    }
    let expected: BTreeMap<String, Vec<bool>> = [
        ("fbs-a1", true),
        ("fbs-a2", true),
        ("fbs-b0", false),
        ("fbs-b1", false),
        ("fbs-b2", false),
        ("fbs-c1", true),
    ]
    .into_iter()
    .map(|(id, pkce)| (id.to_owned(), vec![pkce]))
    .collect();
    assert_eq!(by_e2e, expected);
    let counters = env.counters().await;
    assert_eq!(
        counters["initiations_by_auth"]["fallback_session"], 3,
        "{counters}"
    );
    // No initiation ever met the dead host (it would have been an unanswered attempt).
    let faults = env.sandbox.faults().counters();
    assert!(
        faults["by_fault"]["status_503"]["initiate"].is_null(),
        "{faults}"
    );
    assert!(
        faults["by_fault"]["status_503"]["status"]
            .as_u64()
            .is_some_and(|n| n >= 3),
        "{faults}"
    );

    for (to, switches) in [("fallback", 1.0), ("dedicated", 1.0)] {
        assert_eq!(
            metric_until(
                port,
                &format!(r#"pis_bank_route_switches_total{{brand="belfius",to="{to}"}}"#),
                |_| true
            )
            .await,
            switches
        );
    }
    assert_eq!(
        metric_until(
            port,
            r#"pis_bank_fallback_requests_total{endpoint="initiate",status_class="2xx"}"#,
            |_| true
        )
        .await,
        3.0
    );
    let log = worker.log();
    assert!(
        log.contains("initiation waits"),
        "b0 did not wait for its route"
    );
}
