//! The worker end to end against every simulator dialect (docs/belfius.md, "Dialects"): on the
//! real broker, over mutual TLS, with QSeal signatures the simulator verifies in the dialect's
//! one alphabet. Per dialect: a payment cancelled at the bank with the PSU's token (which also
//! makes the worker exchange a code at `/token`, in the dialect's version, found by itself), a
//! payment signed to SETTLED (its statuses in the dialect's codes), and a payment the PSU
//! refuses. Then `pis-worker bank-check` against the same simulator must name the dialect.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use pis_worker::belfius::dialect::{DIALECTS, Dialect};
use pis_worker::contract::command::CommandBody;
use pis_worker::domain::machine::StateKind;
use secrecy::ExposeSecret as _;

async fn sign_through_redirect(env: &TestEnv, payment_id: &str, psu_id: &str, expected: StateKind) {
    env.wait_for_state(payment_id, StateKind::ScaPending).await;
    let redirect = env.psu("sign", payment_id, psu_id).await;
    env.send(&complete_sca(payment_id, psu_id, &redirect)).await;
    env.wait_for_state(payment_id, expected).await;
}

async fn matrix(name: &str) {
    let dialect = Dialect::named(name).unwrap_or_else(|| panic!("no dialect {name}"));
    let env = TestEnv::new(|c| {
        c.set_dialect(dialect);
        c.verify_signatures = true;
        c.settle_after = Duration::from_secs(1);
    })
    .await;
    let tls = env.sandbox.tls_dir.clone();
    let qseal = tls.join("qseal-key.pem");
    // The test worker signs with the simulator's QSeal key (`start_worker`).
    let mut args: Vec<String> = vec!["--poll-fast-ms".into(), "500".into()];
    for (var, value) in dialect.worker_env() {
        let flag = match var {
            "PIS_AMOUNT_FORMAT" => "--amount-format",
            "PIS_SIGNATURE_ENCODING" => "--signature-encoding",
            other => panic!("no flag for {other}"),
        };
        args.push(flag.into());
        args.push(value.into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let worker = env.start_worker("a", &args);
    worker.wait_restored(PARTITIONS as usize).await;
    let psu = "psu-dialect";

    // Cancelled: a future-dated payment, signed (the code exchange gives the worker the PSU's
    // token), then cancelled at the bank with that token.
    let mut future = initiate("cancel-1", psu, "6.00", "Shop");
    if let CommandBody::Initiate(raw) = &mut future.body {
        raw.requested_execution_date = Some(
            (chrono::Utc::now().date_naive() + chrono::Duration::days(5))
                .format("%Y-%m-%d")
                .to_string(),
        );
    }
    env.send(&future).await;
    sign_through_redirect(&env, "cancel-1", psu, StateKind::Signed).await;
    env.send(&command(
        "cancel-1",
        psu,
        CommandBody::Cancel { reason: None },
    ))
    .await;
    let events = env.wait_for_state("cancel-1", StateKind::Cancelled).await;
    assert_well_formed(&events, "cancel-1");

    // Signed and settled, through the dialect's status codes.
    env.send(&initiate("sign-1", psu, "12.34", "Bakery")).await;
    sign_through_redirect(&env, "sign-1", psu, StateKind::Settled).await;
    let events = env.wait_for_state("sign-1", StateKind::Settled).await;
    assert_well_formed(&events, "sign-1");
    let settled = timeline(&events, "sign-1");
    let last = settled.last().and_then(|e| e.bank_status.clone());
    assert_eq!(
        last.as_deref(),
        Some(
            dialect
                .statuses
                .answer(pis_worker::belfius::status::TransactionStatus::Acsc)
        ),
        "{name}: the settled event carries the dialect's own code"
    );

    // Refused by the PSU.
    env.send(&initiate("refuse-1", psu, "7.00", "Shop")).await;
    env.wait_for_state("refuse-1", StateKind::ScaPending).await;
    let redirect = env.psu("reject", "refuse-1", psu).await;
    env.send(&complete_sca("refuse-1", psu, &redirect)).await;
    let events = env.wait_for_state("refuse-1", StateKind::Rejected).await;
    assert_well_formed(&events, "refuse-1");

    // No answer went unread.
    let log = worker.log();
    assert!(
        !log.contains("matches no known dialect"),
        "{name}: an answer was not recognised"
    );

    // bank-check names the dialect.
    let output = Command::new(env!("CARGO_BIN_EXE_pis-worker"))
        .arg("bank-check")
        .env("PIS_BELFIUS_URL", env.sandbox.api_base_url().as_str())
        .env("PIS_BANX_URL", env.sandbox.banx_base_url().as_str())
        .env("PIS_CLIENT_ID", env.sandbox.client_id())
        .env(
            "PIS_CLIENT_SECRET",
            env.sandbox.client_secret().expose_secret(),
        )
        .env("PIS_BANK_CA_FILE", tls.join("ca.pem"))
        .env("PIS_QWAC_CERT_FILE", tls.join("client.pem"))
        .env("PIS_QWAC_KEY_FILE", tls.join("client-key.pem"))
        .env("PIS_QSEAL_KEY_FILE", &qseal)
        .env(
            "PIS_BANK_CHECK_REDIRECT_URI",
            "https://tpp.example/bank-check",
        )
        .env("PIS_BANK_CHECK_CAF_IBAN", "BE71096123456769")
        .env("PIS_LOG", "warn")
        .output()
        .expect("bank-check runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{name}: bank-check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(&format!("verdict: dialect {name} (")),
        "{name}: bank-check said:\n{stdout}"
    );
    // And the consent versions the simulator takes (AIS 4; CAF 3, after refusing nothing).
    assert!(
        stdout.contains(
            "consent settings: PIS_API_VERSION_CONSENT_AIS=4 PIS_API_VERSION_CONSENT_CAF=3"
        ),
        "{name}: bank-check said:\n{stdout}"
    );
}

macro_rules! dialect_tests {
    ($($test:ident => $name:literal),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                matrix($name).await;
            }
        )+

        /// Every dialect has its test above.
        #[test]
        fn every_dialect_is_in_the_matrix() {
            let tested = [$($name),+];
            for d in DIALECTS {
                assert!(tested.contains(&d.name), "{} is not tested", d.name);
            }
        }
    };
}

dialect_tests!(
    v3_links => "v3-links",
    v3_location => "v3-location",
    v1_redirect => "v1-redirect",
    sca_required_401 => "sca-required-401",
    iso_status => "iso-status",
);

/// An initiation answer that matches no dialect (201 with a link but no payment id anywhere)
/// ends the payment REJECTED with BANK_ANSWER_UNRECOGNIZED, is counted, and is never sent again:
/// a second initiation could create a second payment at the bank.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_initiation_answer_ends_the_payment_once() {
    let env = TestEnv::new(|_| {}).await;
    let port = free_port();
    let http = format!("127.0.0.1:{port}");
    let worker = env.start_worker("a", &["--http-addr", &http]);
    worker.wait_restored(PARTITIONS as usize).await;
    env.send(&initiate("noid-1", "psu-n", "5.00", "Shop NO-PAYMENT-ID"))
        .await;
    let events = env.wait_for_state("noid-1", StateKind::Rejected).await;
    assert_well_formed(&events, "noid-1");
    let rejected = timeline(&events, "noid-1");
    let last = rejected.last().expect("an event");
    assert_eq!(
        last.reason_code.as_deref(),
        Some("BANK_ANSWER_UNRECOGNIZED")
    );
    assert!(
        last.reason_message
            .as_deref()
            .is_some_and(|m| m.contains("no payment id")),
        "{last:?}"
    );
    assert!(
        states(&rejected)
            .iter()
            .all(|s| *s != StateKind::OutcomeUnknown && *s != StateKind::ScaPending),
        "{}",
        describe(&rejected)
    );
    // Sent once, never again (give a re-initiation time to happen).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.counters().await["initiation_requests"], 1);
    assert_eq!(
        metric(
            port,
            "pis_bank_answers_unrecognized_total{endpoint=\"initiate\"}"
        )
        .await,
        1.0
    );
}

/// A status code the worker does not know is polled (counted, for the alert), never taken as
/// an end; once an operator maps it (PIS_BANK_STATUS_MAP), the next poll follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_status_code_is_counted_until_mapped() {
    let env = TestEnv::new(|_| {}).await;
    let port = free_port();
    let http = format!("127.0.0.1:{port}");
    let mut worker = env.start_worker("a", &["--http-addr", &http, "--poll-fast-ms", "300"]);
    worker.wait_restored(PARTITIONS as usize).await;
    env.send(&initiate(
        "code-1",
        "psu-u",
        "5.00",
        "Shop STATUS-CODE-XYZW",
    ))
    .await;
    env.wait_for_state("code-1", StateKind::ScaPending).await;
    let started = std::time::Instant::now();
    while metric(port, "pis_bank_status_unrecognized_total").await < 3.0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the unknown code was not counted"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let still = timeline(&env.status_events(), "code-1");
    assert_eq!(
        states(&still).last(),
        Some(&StateKind::ScaPending),
        "{}",
        describe(&still)
    );
    worker.stop();
    let worker = env.start_worker(
        "b",
        &["--poll-fast-ms", "300", "--bank-status-map", "XYZW=settled"],
    );
    worker.wait_restored(PARTITIONS as usize).await;
    let events = env.wait_for_state("code-1", StateKind::Settled).await;
    let settled = timeline(&events, "code-1");
    assert_eq!(
        settled.last().and_then(|e| e.bank_status.as_deref()),
        Some("XYZW")
    );
}
