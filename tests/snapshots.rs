//! Issue 11, part 3, end to end on the real broker (which never compacts): after thousands of
//! historical payments (settled, retired, then forgotten), a restarted worker's restore starts
//! at the newest snapshot. It reads a small part of the state partitions (asserted on the
//! records it read and on the topic's size, not on time), and the payments in flight are back.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pis_worker::domain::machine::StateKind;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const HISTORY: usize = 2_000;
const IN_FLIGHT: usize = 40;

/// Short horizons and frequent snapshots, so that the test sees them act.
const FLAGS: &[&str] = &[
    "--poll-fast-ms",
    "300",
    "--retention-secs",
    "1",
    "--retired-ids-retention-secs",
    "2",
    "--snapshot-interval-secs",
    "2",
    "--snapshot-min-records",
    "200",
];

/// `records=` of each "partition read ..." line of a worker log, with where it started.
fn restores(log: &str) -> Vec<(bool, u64)> {
    log.lines()
        .filter(|l| l.contains("partition read from"))
        .map(|l| {
            let from_snapshot = l.contains("from its newest snapshot");
            let records = l
                .split("records=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|r| r.parse().ok())
                .unwrap_or(u64::MAX);
            (from_snapshot, records)
        })
        .collect()
}

/// Every record of the state topic, counted by reading it to its end.
fn state_records(env: &TestEnv) -> u64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &env.settings.brokers)
        .set("group.id", format!("count-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        tpl.add_partition_offset(&env.settings.topics.state, partition, Offset::Beginning)
            .expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let mut count = 0;
    let mut quiet_since = Instant::now();
    // Tansu's high watermark undercounts (it counts batches): read until nothing comes.
    while quiet_since.elapsed() < Duration::from_secs(3) {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            count += 1;
            quiet_since = Instant::now();
        }
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_thousands_of_payments_restores_from_the_newest_snapshot() {
    // Only the history signs by itself (its creditor name says AUTO-SIGN).
    let env = TestEnv::new(|c| {
        c.settle_after = Duration::from_millis(200);
    })
    .await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let flags: Vec<&str> = FLAGS
        .iter()
        .copied()
        .chain(["--http-addr", &addr])
        .collect();
    let mut a = env.start_worker("a", &flags);
    a.wait_restored(PARTITIONS as usize).await;

    // In flight: waiting for their PSUs (no auto-sign), they outlive the history.
    for i in 0..IN_FLIGHT {
        env.send(&initiate(
            &format!("live-{i}"),
            &format!("psu-live-{i}"),
            "5.00",
            "Dave",
        ))
        .await;
    }
    for i in 0..HISTORY {
        env.send(&initiate(
            &format!("hist-{i}"),
            &format!("psu-h-{}", i % 50),
            "1.00",
            "Carol AUTO-SIGN",
        ))
        .await;
    }
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let events = env.status_events();
        let settled = events
            .iter()
            .filter(|e| e.state == StateKind::Settled)
            .count();
        let waiting = events
            .iter()
            .filter(|e| e.state == StateKind::ScaPending && e.payment_id.starts_with("live-"))
            .count();
        if settled >= HISTORY && waiting >= IN_FLIGHT {
            assert_eq!(settled, HISTORY, "one SETTLED per payment");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{settled} settled, {waiting} waiting:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The history leaves: retired after 1 s, forgotten after 2 s (tombstones).
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(port, "pis_payments_retired_total").await < HISTORY as f64
        || metric(port, "pis_retired_ids").await > 0.0
    {
        assert!(
            Instant::now() < deadline,
            "history not forgotten:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Then a snapshot of what is left, on every partition.
    let recorded = a.log().matches("snapshot recorded").count();
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.log().matches("snapshot recorded").count() < recorded + PARTITIONS as usize {
        assert!(Instant::now() < deadline, "no snapshot:\n{}", a.log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(a.stop().success(), "graceful stop:\n{}", a.log());

    let total = state_records(&env);
    let b = env.start_worker("b", &flags);
    b.wait_restored(PARTITIONS as usize).await;
    let read = restores(&b.log());
    assert_eq!(read.len(), PARTITIONS as usize, "{read:?}");
    assert!(
        read.iter().all(|(from_snapshot, _)| *from_snapshot),
        "{read:?}"
    );
    let records: u64 = read.iter().map(|(_, n)| n).sum();
    // Each historical payment wrote at least five records (received, initiating, pending,
    // signed, settled) plus its retired record and its tombstone; the restore reads the live
    // payments, their PSUs' pairs and what was written since the snapshot began.
    assert!(
        total > (HISTORY * 7) as u64,
        "the topic holds the history: {total}"
    );
    assert!(
        records * 20 < total,
        "restore read {records} of {total} records"
    );
    assert_eq!(
        metric(port, "pis_restores_total{from=\"snapshot\"}").await,
        f64::from(PARTITIONS)
    );
    // The gauges follow the owners' summaries within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(port, "pis_payments{state=\"SCA_PENDING\"}").await != IN_FLIGHT as f64 {
        assert!(
            Instant::now() < deadline,
            "the payments in flight are not back:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(metric(port, "pis_retired_ids").await, 0.0);

    // And they still move: one is signed through its redirect.
    let redirect = env.psu("sign", "live-0", "psu-live-0").await;
    env.send(&complete_sca("live-0", "psu-live-0", &redirect))
        .await;
    env.wait_for_state("live-0", StateKind::Signed).await;
}
