//! Several worker replicas in one consumer group on the real broker: partitions are shared,
//! a killed replica's payments and PSU tokens are taken over from the state topic, and each
//! PSU's tokens keep a single writer (the sandbox counts any use of an invalidated token).

mod common;

use std::time::Duration;

use common::*;
use pis_worker::contract::command::CommandBody;
use pis_worker::domain::machine::StateKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_payments_and_tokens_are_taken_over() {
    let env = TestEnv::new(|c| {
        c.settle_after = Duration::from_secs(3600);
        // Short-lived tokens: the surviving replica must refresh the dead one's pairs.
        c.access_token_lifetime = Duration::from_secs(2);
    })
    .await;
    let mut a = env.start_worker("a", CLIENT_DRIVEN);
    let b = env.start_worker("b", CLIENT_DRIVEN);
    // Each replica owns one of the two partitions once the group has settled.
    a.wait_restored(1).await;
    b.wait_restored(1).await;

    let in_five_days = (chrono::Utc::now().date_naive() + chrono::Duration::days(5))
        .format("%Y-%m-%d")
        .to_string();
    let psus: Vec<String> = (0..8).map(|i| format!("psu-rep-{i}")).collect();
    for (i, psu) in psus.iter().enumerate() {
        let id = format!("rep-{i}");
        let mut c = initiate(&id, psu, "12.00", "Shop");
        if let CommandBody::Initiate(raw) = &mut c.body {
            raw.requested_execution_date = Some(in_five_days.clone());
        }
        env.send(&c).await;
    }
    for (i, psu) in psus.iter().enumerate() {
        let id = format!("rep-{i}");
        env.wait_for_state(&id, StateKind::ScaPending).await;
        let redirect = env.psu("sign", &id, psu).await;
        env.send(&complete_sca(&id, psu, &redirect)).await;
    }
    for i in 0..psus.len() {
        env.wait_for_state(&format!("rep-{i}"), StateKind::Signed)
            .await;
    }
    let before = env.counters().await;
    assert_eq!(before["tokens_issued"], 8, "{before}");

    // Replica a dies; b takes over its partition, restoring payments and sealed tokens.
    a.kill();
    b.wait_restored(2).await;
    // Every access token is expired by now: each cancellation starts with a refresh.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for (i, psu) in psus.iter().enumerate() {
        env.send(&command(
            &format!("rep-{i}"),
            psu,
            CommandBody::Cancel { reason: None },
        ))
        .await;
    }
    let mut events = Vec::new();
    for i in 0..psus.len() {
        events = env
            .wait_for_state(&format!("rep-{i}"), StateKind::Cancelled)
            .await;
    }
    for i in 0..psus.len() {
        let id = format!("rep-{i}");
        assert_well_formed(&events, &id);
        assert_eq!(
            states(&timeline(&events, &id)),
            vec![
                StateKind::Received,
                StateKind::Initiating,
                StateKind::ScaPending,
                StateKind::Authorizing,
                StateKind::Signed,
                StateKind::Cancelling,
                StateKind::Cancelled
            ],
            "{id}"
        );
    }
    let counters = env.counters().await;
    assert_eq!(counters["cancellations"], 8, "{counters}");
    // One refresh per PSU, by the one replica that owns it, and no use of a replaced pair.
    assert_eq!(counters["refreshes"], 8, "{counters}");
    assert_eq!(counters["invalidated_token_uses"], 0, "{counters}");
    for i in 0..psus.len() {
        assert_eq!(
            counters["initiations_by_e2e"][format!("rep-{i}")],
            1,
            "{counters}"
        );
    }
    assert!(env.dlq_records().is_empty(), "nothing dead-lettered");
}
