//! Issue 11, parts 1 and 2, end to end: a settled payment is retired after the retention
//! horizon (its latest state record becomes the retired record), a re-sent `InitiatePayment`
//! for it is dead-lettered `PAYMENT_RETIRED` without a second initiation at the bank, and the
//! retired id survives a restart (restore reads the retired record).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use pis_worker::domain::machine::StateKind;

/// A short retention (the test waits past it) and a retired-ids horizon long enough for a
/// restart in between.
const RETENTION: &[&str] = &[
    "--retention-secs",
    "2",
    "--retired-ids-retention-secs",
    "30",
];

fn retired_rows(env: &TestEnv) -> Vec<serde_json::Value> {
    let output = Command::new(env!("CARGO_BIN_EXE_pis-worker"))
        .args(["state", "retired", "--json"])
        .args(["--brokers", &env.settings.brokers])
        .args(["--topic-state", &env.settings.topics.state])
        .env("PIS_STATE_KEY", &env.state_key)
        .env("PIS_LOG", "warn")
        .output()
        .expect("pis-worker state retired");
    assert!(output.status.success(), "{output:?}");
    let rows: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    rows.as_array().cloned().unwrap_or_default()
}

async fn initiations_of(env: &TestEnv, e2e: &str) -> u64 {
    env.counters().await["initiations_by_e2e"][e2e]
        .as_u64()
        .unwrap_or(0)
}

fn retired_dead_letters(env: &TestEnv) -> usize {
    env.dlq_records()
        .iter()
        .filter(|r| header(r, "pis.error.class").as_deref() == Some("PAYMENT_RETIRED"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_payment_is_retired_and_a_resent_initiation_is_dead_lettered_across_a_restart() {
    let env = TestEnv::new(|c| {
        c.auto_sign_after = Some(Duration::from_millis(500));
        c.settle_after = Duration::from_millis(500);
    })
    .await;
    let flags: Vec<&str> = ["--poll-fast-ms", "500"]
        .into_iter()
        .chain(RETENTION.iter().copied())
        .collect();
    let mut a = env.start_worker("a", &flags);
    a.wait_restored(PARTITIONS as usize).await;
    let init = initiate("ret-1", "psu-ret", "10.00", "Carol AUTO-SIGN");
    env.send(&init).await;
    env.wait_for_state("ret-1", StateKind::Settled).await;
    assert_eq!(initiations_of(&env, "ret-1").await, 1);

    // Past the horizon: the latest record of its key is the retired record.
    let deadline = Instant::now() + Duration::from_secs(60);
    let row = loop {
        let rows = retired_rows(&env);
        if let Some(row) = rows.into_iter().find(|r| r["payment_id"] == "ret-1") {
            break row;
        }
        assert!(Instant::now() < deadline, "never retired:\n{}", a.log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(row["final_state"], "SETTLED", "{row}");
    assert!(a.log().contains("final payment retired"), "{}", a.log());

    // The same InitiatePayment again: a dead letter, no second initiation.
    env.send(&init).await;
    env.wait_for_dlq_where("PAYMENT_RETIRED", |_| retired_dead_letters(&env) >= 1)
        .await;
    let records = env.dlq_records();
    let record = records
        .iter()
        .find(|r| header(r, "pis.error.class").as_deref() == Some("PAYMENT_RETIRED"))
        .expect("the dead letter");
    let message = header(record, "pis.error.message").unwrap_or_default();
    assert!(message.contains("SETTLED"), "{message}");
    assert_eq!(
        initiations_of(&env, "ret-1").await,
        1,
        "no second initiation"
    );

    // A restart: the retired id is restored from its record.
    assert!(a.stop().success(), "graceful stop:\n{}", a.log());
    let b = env.start_worker("b", &flags);
    b.wait_restored(PARTITIONS as usize).await;
    env.send(&initiate("ret-1", "psu-ret", "10.00", "Carol AUTO-SIGN"))
        .await;
    env.wait_for_dlq_where("a second PAYMENT_RETIRED", |_| {
        retired_dead_letters(&env) >= 2
    })
    .await;
    assert_eq!(
        initiations_of(&env, "ret-1").await,
        1,
        "no second initiation"
    );
    assert!(
        !env.status_events()
            .iter()
            .any(|e| e.payment_id == "ret-1" && e.state == StateKind::Received && e.sequence > 1),
        "no new payment under the retired id"
    );
}
