//! The operations endpoint of a real worker process: /healthz, /readyz and /metrics, scraped
//! over HTTP while payments move (docs/metrics.md).

mod common;

use std::time::{Duration, Instant};

use common::*;
use pis_worker::domain::machine::StateKind;

fn bound_addr(log: &str) -> Option<String> {
    log.lines()
        .find(|l| l.contains("serving /metrics"))
        .and_then(|l| l.split("bound=").nth(1))
        .map(|rest| {
            rest.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
}

/// The value of the first sample whose line starts with `series` (name plus labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn scrape_until(base: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = reqwest::get(format!("{base}/metrics"))
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body");
        if ok(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never held; last scrape:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_follow_the_payments() {
    let env = TestEnv::new(|c| c.settle_after = Duration::from_secs(3600)).await;
    let worker = env.start_worker("m", &["--poll-fast-ms", "60000"]);
    worker.wait_restored(PARTITIONS as usize).await;
    let addr = bound_addr(&worker.log()).expect("the worker logs where it serves /metrics");
    let base = format!("http://{addr}");

    let health = reqwest::get(format!("{base}/healthz"))
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    let ready = reqwest::get(format!("{base}/readyz"))
        .await
        .expect("readyz");
    assert_eq!(
        ready.status(),
        200,
        "{}",
        ready.text().await.unwrap_or_default()
    );

    env.send(&initiate("metrics-ok", "psu-metrics", "10.00", "Alice"))
        .await;
    // An IBAN with a bad checksum: rejected at the edge, no bank call.
    let mut bad = initiate("metrics-bad", "psu-metrics", "10.00", "Bob");
    if let pis_worker::contract::command::CommandBody::Initiate(ref mut i) = bad.body {
        i.creditor_iban = "BE68539007547035".into();
    }
    env.send(&bad).await;
    env.wait_for_state("metrics-ok", StateKind::ScaPending)
        .await;
    env.wait_for_state("metrics-bad", StateKind::Rejected).await;

    let text = scrape_until(&base, "gauges caught up", |t| {
        sample(t, "pis_payments{state=\"SCA_PENDING\"}") == Some(1.0)
            && sample(t, "pis_payments{state=\"REJECTED\"}") == Some(1.0)
            && t.contains("pis_consumer_lag{")
    })
    .await;
    assert_eq!(
        sample(
            &text,
            "pis_state_transitions_total{from=\"NONE\",to=\"RECEIVED\"}"
        ),
        Some(1.0),
        "{text}"
    );
    // Validation rejects before anything is received.
    assert_eq!(
        sample(
            &text,
            "pis_state_transitions_total{from=\"NONE\",to=\"REJECTED\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "pis_state_transitions_total{from=\"INITIATING\",to=\"SCA_PENDING\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "pis_assigned_partitions"),
        Some(f64::from(PARTITIONS))
    );
    assert_eq!(
        sample(&text, "pis_restore_duration_seconds_count"),
        Some(f64::from(PARTITIONS))
    );
    assert_eq!(sample(&text, "pis_restores_in_progress"), Some(0.0));
    assert_eq!(sample(&text, "pis_broker_reachable"), Some(1.0));
    assert!(
        sample(
            &text,
            "pis_oldest_payment_age_seconds{state=\"SCA_PENDING\"}"
        )
        .is_some(),
        "{text}"
    );
    // Bounded labels: no payment or PSU id anywhere in the exposition.
    for id in ["metrics-ok", "metrics-bad", "psu-metrics"] {
        assert!(!text.contains(id), "{id} leaked into /metrics");
    }
}
