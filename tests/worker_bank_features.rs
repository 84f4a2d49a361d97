//! The worker end to end on real parts for what Belfius offers beyond a single payment:
//! cancellation at the bank with the PSU's token, standing orders, bulk payments, and QSeal
//! signatures that the sandbox verifies.

mod common;

use std::time::Duration;

use common::*;
use pis_worker::contract::command::CommandBody;
use pis_worker::domain::machine::StateKind;
use pis_worker::domain::model::{RawBulkPayment, RawBulkTransfer, RawPeriodicPayment};

/// Takes `payment_id` of `psu_id` from SCA_PENDING to `expected` through the PSU's signature
/// and the redirect's code.
async fn sign_through_redirect(env: &TestEnv, payment_id: &str, psu_id: &str, expected: StateKind) {
    env.wait_for_state(payment_id, StateKind::ScaPending).await;
    let redirect = env.psu("sign", payment_id, psu_id).await;
    env.send(&complete_sca(payment_id, psu_id, &redirect)).await;
    env.wait_for_state(payment_id, expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_goes_through_the_bank_with_the_psus_token() {
    let env = TestEnv::new(|c| c.settle_after = Duration::from_secs(3600)).await;
    let worker = env.start_worker("a", CLIENT_DRIVEN);
    worker.wait_restored(PARTITIONS as usize).await;
    let cancel = |id: &str| command(id, "psu-c", CommandBody::Cancel { reason: None });

    // Without any token for the PSU, a payment the bank holds cannot be cancelled.
    env.send(&initiate("no-token-1", "psu-c", "5.00", "Shop"))
        .await;
    env.wait_for_state("no-token-1", StateKind::ScaPending)
        .await;
    env.send(&cancel("no-token-1")).await;
    let dlq = env.wait_for_dlq(1).await;
    assert_eq!(
        header(&dlq[0], "pis.error.class").as_deref(),
        Some("CANCEL_NOT_POSSIBLE")
    );

    // The first signed payment gives the worker the PSU's PIS token. It executes in five days,
    // so the bank still lets it be cancelled, with that token.
    let mut future = initiate("cancel-1", "psu-c", "6.00", "Shop");
    if let CommandBody::Initiate(raw) = &mut future.body {
        raw.requested_execution_date = Some(
            (chrono::Utc::now().date_naive() + chrono::Duration::days(5))
                .format("%Y-%m-%d")
                .to_string(),
        );
    }
    env.send(&future).await;
    sign_through_redirect(&env, "cancel-1", "psu-c", StateKind::Signed).await;
    env.send(&cancel("cancel-1")).await;
    let events = env.wait_for_state("cancel-1", StateKind::Cancelled).await;
    assert_eq!(
        states(&timeline(&events, "cancel-1")),
        vec![
            StateKind::Received,
            StateKind::Initiating,
            StateKind::ScaPending,
            StateKind::Authorizing,
            StateKind::Signed,
            StateKind::Cancelling,
            StateKind::Cancelled
        ]
    );
    assert_well_formed(&events, "cancel-1");

    // The earlier unsigned one can be cancelled too, now that a token exists.
    env.send(&cancel("no-token-1")).await;
    env.wait_for_state("no-token-1", StateKind::Cancelled).await;

    // A signed payment due now is past cancelling: the bank refuses and it stays SIGNED.
    env.send(&initiate("too-late-1", "psu-c", "7.00", "Shop"))
        .await;
    sign_through_redirect(&env, "too-late-1", "psu-c", StateKind::Signed).await;
    env.send(&cancel("too-late-1")).await;
    let events = env
        .wait_for(
            "too-late-1 back to SIGNED",
            Duration::from_secs(60),
            |events| {
                states(&timeline(events, "too-late-1")).ends_with(&[
                    StateKind::Signed,
                    StateKind::Cancelling,
                    StateKind::Signed,
                ])
            },
        )
        .await;
    let back = timeline(&events, "too-late-1").pop().expect("event");
    assert_eq!(
        back.reason_code.as_deref(),
        Some("CANCEL_REFUSED"),
        "{back:?}"
    );
    assert!(!back.is_final);
    assert_well_formed(&events, "too-late-1");
    let counters = env.counters().await;
    assert_eq!(counters["cancellations"], 2, "{counters}");
    assert_eq!(counters["invalidated_token_uses"], 0, "{counters}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standing_order_becomes_active_and_can_be_cancelled() {
    let env = TestEnv::new(|_| {}).await;
    let worker = env.start_worker("a", CLIENT_DRIVEN);
    worker.wait_restored(PARTITIONS as usize).await;

    let start = (chrono::Utc::now().date_naive() + chrono::Duration::days(10))
        .format("%Y-%m-%d")
        .to_string();
    let CommandBody::Initiate(payment) = initiate("so-1", "psu-s", "50.00", "Landlord").body else {
        unreachable!("initiate builds an InitiatePayment")
    };
    let standing = RawPeriodicPayment {
        payment: *payment,
        start_date: start,
        end_date: None,
        frequency: "MONTHLY".into(),
        day_of_execution: None,
    };
    env.send(&command(
        "so-1",
        "psu-s",
        CommandBody::InitiatePeriodic(Box::new(standing)),
    ))
    .await;
    sign_through_redirect(&env, "so-1", "psu-s", StateKind::Active).await;
    env.send(&command(
        "so-1",
        "psu-s",
        CommandBody::Cancel { reason: None },
    ))
    .await;
    let events = env.wait_for_state("so-1", StateKind::Cancelled).await;
    assert_well_formed(&events, "so-1");
    assert!(
        states(&timeline(&events, "so-1")).contains(&StateKind::Active),
        "{}",
        describe(&events)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_payment_is_signed_once_and_settles() {
    let env = TestEnv::new(|c| c.settle_after = Duration::from_millis(300)).await;
    let worker = env.start_worker("a", &["--poll-fast-ms", "500"]);
    worker.wait_restored(PARTITIONS as usize).await;

    let bulk = RawBulkPayment {
        payment_product: "SEPA_CREDIT_TRANSFERS".into(),
        brand: "BELFIUS".into(),
        debtor_iban: None,
        batch_booking: true,
        requested_execution_date: None,
        language: "nl".into(),
        redirect_uri: "https://client.example/callback".into(),
        payments: (1..=3)
            .map(|i| RawBulkTransfer {
                amount: format!("{i}.00"),
                currency: "EUR".into(),
                creditor_name: format!("Supplier {i}"),
                creditor_iban: "BE68539007547034".into(),
                creditor_bic: None,
                end_to_end_id: format!("bulk-1-{i}"),
                remittance_information: None,
            })
            .collect(),
        always_pkce: false,
        funds_check: false,
    };
    env.send(&command(
        "bulk-1",
        "psu-b",
        CommandBody::InitiateBulk(Box::new(bulk)),
    ))
    .await;
    env.wait_for_state("bulk-1", StateKind::ScaPending).await;
    let redirect = env.psu("sign", "bulk-1", "psu-b").await;
    env.send(&complete_sca("bulk-1", "psu-b", &redirect)).await;
    let events = env.wait_for_state("bulk-1", StateKind::Settled).await;
    assert_well_formed(&events, "bulk-1");
    let counters = env.counters().await;
    assert_eq!(counters["bulk_initiations"]["bulk-1-1"], 1, "{counters}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initiations_are_sealed_and_an_unsealed_worker_is_refused() {
    // Verification is the sandbox's default; the harness's workers seal with its test QSeal.
    let env = TestEnv::new(|_| {}).await;
    let sealed = env.start_worker("sealed", &["--poll-fast-ms", "60000"]);
    sealed.wait_restored(PARTITIONS as usize).await;
    env.send(&initiate("sealed-1", "psu-q", "1.00", "Shop"))
        .await;
    env.wait_for_state("sealed-1", StateKind::ScaPending).await;
    let counters = env.counters().await;
    assert!(
        counters["signatures_checked"].as_u64() >= Some(1),
        "{counters}"
    );
    assert_eq!(counters["signatures_failed"], 0, "{counters}");
    drop(sealed);

    let unsealed = env.start_worker_unsealed("unsealed", &["--poll-fast-ms", "60000"]);
    unsealed.wait_restored(PARTITIONS as usize).await;
    env.send(&initiate("unsealed-1", "psu-q", "1.00", "Shop"))
        .await;
    let events = env.wait_for_state("unsealed-1", StateKind::Rejected).await;
    let rejected = timeline(&events, "unsealed-1").pop().expect("event");
    assert_eq!(
        rejected.reason_code.as_deref(),
        Some("BANK_SECURITY_FAILURE"),
        "{rejected:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refreshed_once_for_queued_cancellations() {
    let env = TestEnv::new(|c| {
        c.settle_after = Duration::from_secs(3600);
        c.access_token_lifetime = Duration::from_secs(2);
    })
    .await;
    let worker = env.start_worker("a", CLIENT_DRIVEN);
    worker.wait_restored(PARTITIONS as usize).await;
    let in_five_days = (chrono::Utc::now().date_naive() + chrono::Duration::days(5))
        .format("%Y-%m-%d")
        .to_string();
    for id in ["refresh-1", "refresh-2"] {
        let mut future = initiate(id, "psu-t", "9.00", "Shop");
        if let CommandBody::Initiate(raw) = &mut future.body {
            raw.requested_execution_date = Some(in_five_days.clone());
        }
        env.send(&future).await;
        env.wait_for_state(id, StateKind::ScaPending).await;
    }
    // Each redirect hands back a code; each exchange issues a new pair, killing the previous.
    sign_through_redirect(&env, "refresh-1", "psu-t", StateKind::Signed).await;
    sign_through_redirect(&env, "refresh-2", "psu-t", StateKind::Signed).await;
    assert_eq!(env.counters().await["tokens_issued"], 2);
    // Let the access token expire, then ask for both cancellations at once.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for id in ["refresh-1", "refresh-2"] {
        env.send(&command(id, "psu-t", CommandBody::Cancel { reason: None }))
            .await;
    }
    env.wait_for_state("refresh-1", StateKind::Cancelled).await;
    let events = env.wait_for_state("refresh-2", StateKind::Cancelled).await;
    assert_well_formed(&events, "refresh-2");
    let counters = env.counters().await;
    // One refresh served both: the second cancellation waited in the PSU's lane and used the
    // fresh pair; nobody used an invalidated token.
    assert_eq!(counters["refreshes"], 1, "{counters}");
    assert_eq!(counters["invalidated_token_uses"], 0, "{counters}");
    assert_eq!(counters["cancellations"], 2, "{counters}");
}
