//! Sealed state records and key rotation on the real broker (issue 11, part 5): a worker with
//! key A drives a payment to SCA_PENDING; a worker with current key B and previous key A
//! restores it, completes it and seals what it writes with B; a state record altered by one
//! byte (written under its own key and epoch header) is quarantined while the partition goes on.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pis_worker::contract::command::CommandBody;
use pis_worker::domain::machine::StateKind;
use pis_worker::kafka::state::{self, DecodedRecord, Sealing, v2};
use pis_worker::secret::{StateKey, StateKeyRing};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{FutureProducer, FutureRecord};
use secrecy::{ExposeSecret, SecretString};

fn named_key(id: &str) -> String {
    format!("{id}:{}", StateKey::generate_hex().expose_secret())
}

fn ring(current: &str, previous: Option<&str>) -> StateKeyRing {
    StateKeyRing::from_config(
        &SecretString::from(current),
        previous.map(SecretString::from).as_ref(),
    )
    .expect("ring")
}

/// The latest record of `key` in the state topic once `done` holds for it.
async fn latest_state_record(
    env: &TestEnv,
    key: &str,
    done: impl Fn(&OwnedMessage) -> bool,
) -> OwnedMessage {
    let reader = Collector::follow(&env.settings, &env.settings.topics.state);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let latest = reader
            .snapshot()
            .into_iter()
            .filter(|m| m.key() == Some(key.as_bytes()) && m.payload().is_some())
            .max_by_key(|m| m.offset());
        if let Some(m) = latest.filter(|m| done(m)) {
            return m;
        }
        assert!(Instant::now() < deadline, "no matching record of {key}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn epoch_header(m: &OwnedMessage) -> Option<i64> {
    header(m, "pis.epoch").and_then(|e| e.parse().ok())
}

/// A key of `prefix` whose commands land on `partition`.
fn psu_on(prefix: &str, partition: i32) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|k| {
            pis_worker::kafka::partitioner::partition_for(k.as_bytes(), PARTITIONS) == partition
        })
        .expect("a key for the partition")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_restores_old_records_seals_new_ones_and_tampering_is_quarantined() {
    let env = TestEnv::new(|c| c.settle_after = Duration::from_millis(500)).await;
    let key_a = named_key("key-a");
    let key_b = named_key("key-b");
    let psu = psu_on("psu-rot", 0);
    let neighbour = psu_on("psu-next", 0);

    // 1. Key A only: the payment reaches SCA_PENDING, sealed with A.
    let mut args_a: Vec<&str> = CLIENT_DRIVEN.to_vec();
    args_a.extend(["--state-key", &key_a]);
    let mut a = env.start_worker("a", &args_a);
    a.wait_restored(PARTITIONS as usize).await;
    env.send(&initiate("rot-1", &psu, "12.34", "Alice")).await;
    env.wait_for_state("rot-1", StateKind::ScaPending).await;
    assert!(a.stop().success(), "graceful stop:\n{}", a.log());
    let only_a = ring(&key_a, None);
    let record = latest_state_record(&env, "payment/rot-1", |_| true).await;
    let decoded = state::decode_record(
        &only_a,
        "payment/rot-1",
        record.payload().unwrap_or_default(),
        epoch_header(&record),
    )
    .expect("sealed with A");
    assert_eq!(
        decoded.sealing,
        Sealing::Sealed {
            key_id: "key-a".into()
        }
    );

    // 2. Current key B, previous key A: restored, and the payment goes on to the end.
    let mut args_b: Vec<&str> = CLIENT_DRIVEN.to_vec();
    args_b.extend(["--state-key", &key_b, "--state-key-previous", &key_a]);
    let mut b = env.start_worker("b", &args_b);
    b.wait_restored(PARTITIONS as usize).await;
    assert!(
        !b.log().contains("state record quarantined"),
        "nothing quarantined after the rotation:\n{}",
        b.log()
    );
    let redirect = env.psu("sign", "rot-1", &psu).await;
    env.send(&complete_sca("rot-1", &psu, &redirect)).await;
    env.wait_for_state("rot-1", StateKind::Signed).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    env.send(&command("rot-1", &psu, CommandBody::RefreshStatus))
        .await;
    env.wait_for_state("rot-1", StateKind::Settled).await;

    // New records are sealed with B: a ring of B alone opens them, a ring of A alone does not.
    let only_b = ring(&key_b, None);
    let record = latest_state_record(&env, "payment/rot-1", |m| {
        v2::parse_header(m.payload().unwrap_or_default()).is_ok_and(|(h, _)| h.key_id == "key-b")
    })
    .await;
    let value = record.payload().unwrap_or_default().to_vec();
    let epoch = epoch_header(&record);
    let DecodedRecord::Payment { payment, .. } =
        state::decode_with_epoch(&only_b, "payment/rot-1", &value, epoch)
            .expect("B opens what B sealed")
            .0
    else {
        panic!("not a payment record")
    };
    assert_eq!(payment.state.kind(), StateKind::Settled);
    let err = state::decode(&only_a, "payment/rot-1", &value)
        .err()
        .expect("A alone cannot open it");
    assert_eq!(err.class(), "unknown-key");
    // The operator's view of the rotation: every live record by key id.
    let keys = env
        .cli(&[
            "state",
            "keys",
            "--json",
            "--state-key",
            &key_b,
            "--state-key-previous",
            &key_a,
        ])
        .await;
    let keys: serde_json::Value = serde_json::from_str(&keys).expect("json");
    assert!(
        keys["live_records"]["v2 key key-b"].as_u64().unwrap_or(0) >= 1,
        "{keys}"
    );
    assert!(b.stop().success(), "graceful stop:\n{}", b.log());

    // 3. One byte of the sealed record flipped, written under its own key and epoch header.
    let mut tampered = value.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    let epoch_text = epoch.expect("an epoch header").to_string();
    let producer: FutureProducer = env.settings.client_config().create().expect("producer");
    producer
        .send(
            FutureRecord::to(&env.settings.topics.state)
                .partition(record.partition())
                .key("payment/rot-1".as_bytes())
                .payload(&tampered)
                .headers(
                    rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                        key: "pis.epoch",
                        value: Some(epoch_text.as_bytes()),
                    }),
                ),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("tampered record written");

    let c = env.start_worker("c", &args_b);
    c.wait_restored(PARTITIONS as usize).await;
    assert!(
        c.log().contains("state record quarantined"),
        "the owner says so:\n{}",
        c.log()
    );
    let port_line = c
        .log()
        .lines()
        .find(|l| l.contains("serving /metrics"))
        .and_then(|l| l.split("bound=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|addr| addr.rsplit(':').next())
        .and_then(|p| p.parse::<u16>().ok())
        .expect("metrics port");
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(port_line, "pis_state_quarantined_records").await != 1.0 {
        assert!(Instant::now() < deadline, "the gauge never showed 1");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rows = env
        .cli(&[
            "state",
            "quarantined",
            "--json",
            "--state-key",
            &key_b,
            "--state-key-previous",
            &key_a,
        ])
        .await;
    let rows: serde_json::Value = serde_json::from_str(&rows).expect("json");
    let rows = rows.as_array().expect("an array");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["key"], "payment/rot-1");
    assert_eq!(rows[0]["class"], "unauthentic");
    assert_eq!(rows[0]["last_good_state"], "SETTLED");

    // The partition keeps running: a new payment on it moves.
    env.send(&initiate("rot-2", &neighbour, "1.00", "Bob"))
        .await;
    env.wait_for_state("rot-2", StateKind::ScaPending).await;
    drop(c);
}
