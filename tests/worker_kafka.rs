//! End-to-end tests of the worker on real parts: Tansu broker, the worker binary, the Belfius
//! sandbox over mutual TLS, Avro bytes.

mod common;

use std::time::Duration;

use common::*;
use pis_worker::domain::machine::StateKind;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_initiate_sca_pending_complete_sca_signed() {
    let env = TestEnv::new(|c| c.settle_after = Duration::from_secs(3600)).await;
    let worker = env.start_worker("a", CLIENT_DRIVEN);
    worker.wait_restored(PARTITIONS as usize).await;

    env.send(&initiate("happy-1", "psu-happy", "12.34", "Alice"))
        .await;
    let events = env.wait_for_state("happy-1", StateKind::ScaPending).await;
    let pending = timeline(&events, "happy-1");
    let sca = pending
        .last()
        .and_then(|e| e.sca_redirect_url.clone())
        .expect("SCA_PENDING carries the redirect URL");
    assert!(
        sca.starts_with(env.sandbox.admin_base_url().as_str()),
        "{sca}"
    );

    let redirect = env.psu("sign", "happy-1", "psu-happy").await;
    assert!(redirect.contains("code="), "{redirect}");
    env.send(&complete_sca("happy-1", "psu-happy", &redirect))
        .await;
    let events = env.wait_for_state("happy-1", StateKind::Signed).await;

    assert_eq!(
        states(&timeline(&events, "happy-1")),
        vec![
            StateKind::Received,
            StateKind::Initiating,
            StateKind::ScaPending,
            StateKind::Authorizing,
            StateKind::Signed
        ]
    );
    assert_well_formed(&events, "happy-1");
    let signed = timeline(&events, "happy-1").pop().expect("signed");
    assert_eq!(signed.bank_status.as_deref(), Some("ACTC"));
    assert!(signed.bank_payment_id.is_some());
    let counters = env.counters().await;
    assert_eq!(counters["initiations_by_e2e"]["happy-1"], 1, "{counters}");
    assert_eq!(
        counters["tokens_issued"], 1,
        "the code was exchanged once: {counters}"
    );
    // The authorization code is a secret: it never reaches the log.
    let code = url::Url::parse(&redirect)
        .expect("url")
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .expect("code");
    assert!(
        !worker.log().contains(&code),
        "authorization code leaked into the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psu_refusal_and_invalid_input_end_rejected_with_reasons() {
    let env = TestEnv::new(|_| {}).await;
    let worker = env.start_worker("a", CLIENT_DRIVEN);
    worker.wait_restored(PARTITIONS as usize).await;

    env.send(&initiate("refused-1", "psu-r", "50.00", "Bob"))
        .await;
    let mut invalid = initiate("invalid-1", "psu-r", "0", "Bob");
    invalid.command_id = "cmd-invalid-1".into();
    env.send(&invalid).await;
    env.wait_for_state("refused-1", StateKind::ScaPending).await;
    let redirect = env.psu("reject", "refused-1", "psu-r").await;
    env.send(&complete_sca("refused-1", "psu-r", &redirect))
        .await;
    let events = env.wait_for_state("refused-1", StateKind::Rejected).await;

    let refused = timeline(&events, "refused-1").pop().expect("event");
    assert_eq!(refused.reason_code.as_deref(), Some("SCA_FAILED"));
    assert!(refused.is_final);
    let invalid = timeline(&events, "invalid-1");
    assert_eq!(states(&invalid), vec![StateKind::Rejected]);
    assert_eq!(invalid[0].reason_code.as_deref(), Some("INVALID_AMOUNT"));
    assert_eq!(invalid[0].causation_id.as_deref(), Some("cmd-invalid-1"));
    assert_well_formed(&events, "refused-1");
    let counters = env.counters().await;
    assert!(
        counters["initiations_by_e2e"].get("invalid-1").is_none(),
        "an invalid payment must never reach the bank: {counters}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_goes_to_the_dlq_and_the_next_command_is_processed() {
    let env = TestEnv::new(|_| {}).await;
    let worker = env.start_worker("a", CLIENT_DRIVEN);
    worker.wait_restored(PARTITIONS as usize).await;

    // Same key as the good command: same partition, so the poison is in its way.
    env.send_raw("psu-p", b"definitely not avro").await;
    env.send_raw("psu-p", &[0xC3, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 9])
        .await;
    env.send(&initiate("after-poison", "psu-p", "1.00", "Carol"))
        .await;
    env.wait_for_state("after-poison", StateKind::ScaPending)
        .await;

    let dlq = env.wait_for_dlq(2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dlq_after = env.dlq_records();
    assert_eq!(
        dlq_after.len(),
        2,
        "exactly the two poison records are dead-lettered"
    );
    use rdkafka::Message;
    assert_eq!(
        dlq[0].payload(),
        Some(&b"definitely not avro"[..]),
        "original bytes kept"
    );
    assert_eq!(dlq[0].key(), Some(&b"psu-p"[..]));
    assert_eq!(
        header(&dlq[0], "pis.error.class").as_deref(),
        Some("BAD_FRAMING")
    );
    assert_eq!(
        header(&dlq[1], "pis.error.class").as_deref(),
        Some("UNKNOWN_SCHEMA")
    );
    assert_eq!(
        header(&dlq[0], "pis.source.topic").as_deref(),
        Some(env.settings.topics.commands.as_str())
    );
    assert!(header(&dlq[0], "pis.source.offset").is_some());
    assert!(header(&dlq[0], "pis.error.message").is_some_and(|m| !m.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_command_ids_are_applied_once() {
    let env = TestEnv::new(|_| {}).await;
    let worker = env.start_worker("a", CLIENT_DRIVEN);
    worker.wait_restored(PARTITIONS as usize).await;

    let command = initiate("dup-1", "psu-d", "3.00", "Dave");
    env.send(&command).await;
    env.send(&command).await;
    // The same payment under a new command id is an idempotent resend as well.
    let mut resend = command.clone();
    resend.command_id = uuid::Uuid::new_v4().to_string();
    env.send(&resend).await;
    // A marker after them on the same partition tells us they were all handled.
    env.send(&initiate("dup-marker", "psu-d", "4.00", "Dave"))
        .await;
    let events = env
        .wait_for_state("dup-marker", StateKind::ScaPending)
        .await;
    env.wait_for_state("dup-1", StateKind::ScaPending).await;

    assert_eq!(
        states(&timeline(&events, "dup-1")),
        vec![
            StateKind::Received,
            StateKind::Initiating,
            StateKind::ScaPending
        ]
    );
    assert_eq!(env.counters().await["initiations_by_e2e"]["dup-1"], 1);
    assert!(env.dlq_records().is_empty(), "duplicates are not errors");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_restores_state_without_reemitting_or_reinitiating() {
    let env = TestEnv::new(|c| c.settle_after = Duration::from_secs(3600)).await;
    let mut first = env.start_worker("first", CLIENT_DRIVEN);
    first.wait_restored(PARTITIONS as usize).await;
    env.send(&initiate("restart-1", "psu-x", "7.00", "Erin"))
        .await;
    env.wait_for_state("restart-1", StateKind::ScaPending).await;
    assert!(
        first.stop().success(),
        "graceful stop exits 0:\n{}",
        first.log()
    );
    let before = env.status_events().len();

    let second = env.start_worker("second", CLIENT_DRIVEN);
    second.wait_restored(PARTITIONS as usize).await;
    assert!(
        second.log().contains("payments=1"),
        "the payment is restored from the state topic:\n{}",
        second.log()
    );
    // Nothing new appears on the status topic just because of the restart.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.status_events().len(),
        before,
        "restart re-emitted events"
    );

    let redirect = env.psu("sign", "restart-1", "psu-x").await;
    env.send(&complete_sca("restart-1", "psu-x", &redirect))
        .await;
    let events = env.wait_for_state("restart-1", StateKind::Signed).await;
    assert_well_formed(&events, "restart-1");
    let raw: Vec<_> = events
        .iter()
        .filter(|e| e.payment_id == "restart-1")
        .collect();
    assert_eq!(
        raw.len(),
        5,
        "no duplicate events at all after a graceful restart"
    );
    assert_eq!(env.counters().await["initiations_by_e2e"]["restart-1"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_is_replaced_without_losing_or_doubling_the_payment() {
    let env = TestEnv::new(|c| c.settle_after = Duration::from_secs(3600)).await;
    let mut first = env.start_worker("first", CLIENT_DRIVEN);
    first.wait_restored(PARTITIONS as usize).await;
    env.send(&initiate("crash-1", "psu-k", "8.00", "Frank"))
        .await;
    env.wait_for_state("crash-1", StateKind::ScaPending).await;
    first.kill();

    let redirect = env.psu("sign", "crash-1", "psu-k").await;
    // Sent while no worker runs: it must wait in the topic, not get lost.
    env.send(&complete_sca("crash-1", "psu-k", &redirect)).await;
    let second = env.start_worker("second", CLIENT_DRIVEN);
    second.wait_restored(PARTITIONS as usize).await;
    let events = env.wait_for_state("crash-1", StateKind::Signed).await;

    assert_well_formed(&events, "crash-1");
    assert_eq!(
        states(&timeline(&events, "crash-1")),
        vec![
            StateKind::Received,
            StateKind::Initiating,
            StateKind::ScaPending,
            StateKind::Authorizing,
            StateKind::Signed
        ]
    );
    let counters = env.counters().await;
    assert_eq!(counters["initiations_by_e2e"]["crash-1"], 1, "{counters}");
    assert_eq!(counters["tokens_issued"], 1, "{counters}");
}
