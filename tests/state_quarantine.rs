//! Defect n, end to end: one unreadable record in the state topic used to fail every restore of
//! its partition, on every replica in turn. Now the partition runs, the payment the record names
//! is held (its commands dead-lettered as QUARANTINED), the gauge reports it, and
//! `pis-worker state quarantined` lists it.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use pis_worker::contract::command::CommandBody;
use pis_worker::domain::machine::StateKind;
use rdkafka::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Where the worker (started with `PIS_HTTP_ADDR=127.0.0.1:0`) says it serves /metrics.
fn metrics_base(log: &str) -> Option<String> {
    log.lines()
        .find(|l| l.contains("serving /metrics"))
        .and_then(|l| l.split("bound=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map(|addr| format!("http://{addr}"))
}

async fn quarantined_gauge(base: &str) -> Option<f64> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with("pis_state_quarantined_records "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_state_record_holds_its_payment_and_nothing_else() {
    let env = TestEnv::new(|c| c.settle_after = Duration::from_secs(3600)).await;
    // Two PSUs on the same partition: the held payment's neighbour must go on.
    let on = |prefix: &str, partition: i32| {
        (0..)
            .map(|i| format!("{prefix}-{i}"))
            .find(|k| {
                pis_worker::kafka::partitioner::partition_for(k.as_bytes(), PARTITIONS) == partition
            })
            .expect("a key for the partition")
    };
    let held_psu = on("psu-held", 1);
    let ok_psu = on("psu-ok", 1);
    let mut a = env.start_worker("a", CLIENT_DRIVEN);
    a.wait_restored(PARTITIONS as usize).await;
    env.send(&initiate("q-held", &held_psu, "10.00", "Alice"))
        .await;
    env.send(&initiate("q-ok", &ok_psu, "11.00", "Bob")).await;
    env.wait_for_state("q-held", StateKind::ScaPending).await;
    env.wait_for_state("q-ok", StateKind::ScaPending).await;
    assert!(a.stop().success(), "graceful stop:\n{}", a.log());

    // Something writes garbage under the held payment's key.
    let producer: FutureProducer = env.settings.client_config().create().expect("producer");
    producer
        .send(
            FutureRecord::to(&env.settings.topics.state)
                .partition(1)
                .key("payment/q-held".as_bytes())
                .payload("{\"type\":\"payment\",\"v\":1,\"garbage".as_bytes()),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("garbage written");

    let b = env.start_worker("b", CLIENT_DRIVEN);
    b.wait_restored(PARTITIONS as usize).await;
    assert!(
        b.log().contains("state record quarantined"),
        "the owner says so:\n{}",
        b.log()
    );
    let base = metrics_base(&b.log()).expect("metrics address");
    let deadline = Instant::now() + Duration::from_secs(30);
    while quarantined_gauge(&base).await != Some(1.0) {
        assert!(Instant::now() < deadline, "the gauge never showed 1");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The neighbour on the same partition goes on.
    let redirect = env.psu("sign", "q-ok", &ok_psu).await;
    env.send(&complete_sca("q-ok", &ok_psu, &redirect)).await;
    env.wait_for_state("q-ok", StateKind::Signed).await;
    // The held payment's commands wait in the DLQ, to replay once it is resolved.
    env.send(&command("q-held", &held_psu, CommandBody::RefreshStatus))
        .await;
    let records = env.wait_for_dlq(1).await;
    let class = |r: &rdkafka::message::OwnedMessage| {
        use rdkafka::message::Headers;
        r.headers()
            .and_then(|h| {
                h.iter()
                    .find(|h| h.key == "pis.error.class")
                    .and_then(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()))
            })
            .unwrap_or_default()
    };
    assert_eq!(class(&records[0]), "QUARANTINED");
    assert!(
        !env.status_events()
            .iter()
            .any(|e| e.payment_id == "q-held" && e.sequence > 3),
        "the held payment did not move"
    );

    // The operator's view.
    let output = Command::new(env!("CARGO_BIN_EXE_pis-worker"))
        .args(["state", "quarantined", "--json"])
        .args(["--brokers", &env.settings.brokers])
        .args(["--topic-state", &env.settings.topics.state])
        .env("PIS_STATE_KEY", &env.state_key)
        .output()
        .expect("pis-worker state quarantined");
    assert!(output.status.success(), "{output:?}");
    let rows: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    let rows = rows.as_array().expect("an array");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["key"], "payment/q-held");
    assert_eq!(rows[0]["partition"], 1);
    assert_eq!(rows[0]["last_good_state"], "SCA_PENDING");
    assert_eq!(rows[0]["class"], "malformed", "{rows:?}");
    assert!(
        rows[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("neither sealed nor JSON")),
        "{rows:?}"
    );
}
