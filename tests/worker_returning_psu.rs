//! Returning PSUs, end to end on real parts (broker, worker process, the sandbox over mutual
//! TLS): a PSU's first payment is signed with PKCE and its code gives the worker the PSU's PIS
//! token pair; the PSU's later payments are initiated with that pair's access token, their
//! redirect carries the state only, and Belfius' one-pair-per-PSU rule holds throughout.

mod common;

use std::time::Duration;

use common::*;
use pis_worker::belfius::BelfiusClient;
use pis_worker::belfius::pkce::Pkce;
use pis_worker::contract::command::CommandBody;
use pis_worker::domain::machine::StateKind;
use pis_worker::domain::model::{Amount, Brand, Language, PaymentOrder, PaymentProduct};
use secrecy::SecretString;

const PSU: &str = "psu-returning";

/// The worker polls every 500 ms; the sandbox settles a signed payment 2 s after the signature,
/// well after the redirect is handed back (sooner, a poll could see the payment final first and
/// the redirect would be dead-lettered `ALREADY_FINAL`, its code unexchanged).
async fn env_and_worker() -> (TestEnv, Worker) {
    let env = TestEnv::new(|c| c.settle_after = Duration::from_secs(2)).await;
    let worker = env.start_worker("a", &["--poll-fast-ms", "500"]);
    worker.wait_restored(PARTITIONS as usize).await;
    (env, worker)
}

/// The PSU signs `payment_id` at its published SCA URL; returns the redirect URL.
async fn sign(env: &TestEnv, payment_id: &str) -> String {
    env.wait_for_state(payment_id, StateKind::ScaPending).await;
    env.psu("sign", payment_id, PSU).await
}

fn query(url: &str, name: &str) -> Option<String> {
    url::Url::parse(url)
        .expect("redirect url")
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Hands the redirect back and waits for SETTLED; returns the payment's states. A payment is
/// settled only once its redirect was applied (its code exchanged, the pair stored): the
/// payment takes one input at a time, and the bank settles it 2 s after the signature.
async fn complete(env: &TestEnv, payment_id: &str, redirect: &str) -> Vec<StateKind> {
    env.send(&complete_sca(payment_id, PSU, redirect)).await;
    let events = env.wait_for_state(payment_id, StateKind::Settled).await;
    assert_well_formed(&events, payment_id);
    states(&timeline(&events, payment_id))
}

/// A PKCE payment's code comes back while it waits for it (AUTHORIZING), or after a poll saw
/// the signature (exchanged from SIGNED): either way it settles.
fn settled_with_code(states: &[StateKind]) {
    assert!(
        states.ends_with(&[StateKind::Signed, StateKind::Settled]),
        "{states:?}"
    );
}

/// A payment initiated with the PSU's token never waits for a code.
const WITHOUT_CODE: [StateKind; 5] = [
    StateKind::Received,
    StateKind::Initiating,
    StateKind::ScaPending,
    StateKind::Signed,
    StateKind::Settled,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_psus_payment_is_initiated_with_the_token_and_settles() {
    let (env, worker) = env_and_worker().await;

    // First payment: PKCE. Its redirect carries a code, exchanged for the PSU's pair.
    env.send(&initiate("ret-1", PSU, "10.00", "Shop")).await;
    let redirect = sign(&env, "ret-1").await;
    assert!(query(&redirect, "code").is_some(), "{redirect}");
    settled_with_code(&complete(&env, "ret-1", &redirect).await);
    let counters = env.counters().await;
    assert_eq!(counters["tokens_issued"], 1, "{counters}");

    // Second payment of the same PSU: initiated with the pair's access token. The PSU still
    // signs; the redirect brings the state only.
    env.send(&initiate("ret-2", PSU, "11.00", "Shop")).await;
    let redirect = sign(&env, "ret-2").await;
    assert!(query(&redirect, "code").is_none(), "{redirect}");
    assert!(query(&redirect, "state").is_some(), "{redirect}");
    assert_eq!(complete(&env, "ret-2", &redirect).await, WITHOUT_CODE);
    let counters = env.counters().await;
    assert_eq!(counters["initiations_by_auth"]["pkce"], 1, "{counters}");
    assert_eq!(counters["initiations_by_auth"]["bearer"], 1, "{counters}");
    // Used, not issued: still the one pair; nothing presented a replaced token.
    assert_eq!(counters["tokens_issued"], 1, "{counters}");
    assert_eq!(counters["refreshes"], 0, "{counters}");
    assert_eq!(counters["invalidated_token_uses"], 0, "{counters}");

    // The client asks for PKCE: a code, exchanged for a new pair, which kills the old one at
    // the bank. The next payment presents the new pair, never the replaced one.
    let mut pkce = initiate("ret-3", PSU, "12.00", "Shop");
    if let CommandBody::Initiate(raw) = &mut pkce.body {
        raw.always_pkce = true;
    }
    env.send(&pkce).await;
    let redirect = sign(&env, "ret-3").await;
    assert!(query(&redirect, "code").is_some(), "{redirect}");
    settled_with_code(&complete(&env, "ret-3", &redirect).await);
    assert_eq!(env.counters().await["tokens_issued"], 2);

    env.send(&initiate("ret-4", PSU, "13.00", "Shop")).await;
    let redirect = sign(&env, "ret-4").await;
    assert!(query(&redirect, "code").is_none(), "{redirect}");
    assert_eq!(complete(&env, "ret-4", &redirect).await, WITHOUT_CODE);
    let counters = env.counters().await;
    assert_eq!(counters["initiations_by_auth"]["pkce"], 2, "{counters}");
    assert_eq!(counters["initiations_by_auth"]["bearer"], 2, "{counters}");
    assert_eq!(counters["tokens_issued"], 2, "{counters}");
    assert_eq!(counters["invalidated_token_uses"], 0, "{counters}");
    assert_eq!(counters["initiations"], 4, "{counters}");
    assert!(env.dlq_records().is_empty(), "nothing dead-lettered");
    drop(worker);
}

/// Another TPP (here: the test, with the same client) signs a payment of the same PSU and
/// exchanges its code: the bank issues a new pair and kills the worker's. The worker's next
/// initiation with the dead token is refused (401) and goes again with PKCE: one payment at the
/// bank, settled, and the dead token presented once, never again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_replaced_at_the_bank_is_refused_and_the_payment_goes_with_pkce() {
    let (env, worker) = env_and_worker().await;
    env.send(&initiate("rep-1", PSU, "10.00", "Shop")).await;
    let redirect = sign(&env, "rep-1").await;
    settled_with_code(&complete(&env, "rep-1", &redirect).await);

    // The PSU's pair is replaced behind the worker's back.
    let client = BelfiusClient::new(env.sandbox.belfius_config().expect("config")).expect("client");
    let elsewhere = PaymentOrder {
        product: PaymentProduct::SepaCreditTransfers,
        brand: Brand::Belfius,
        amount: Amount::from_minor(500),
        currency: "EUR".into(),
        creditor_name: "Elsewhere".into(),
        creditor_iban: "BE68539007547034".into(),
        creditor_bic: None,
        debtor_iban: None,
        end_to_end_id: "elsewhere-1".into(),
        remittance_information: None,
        requested_execution_date: None,
        language: Language::Fr,
        redirect_uri: "https://tpp.example/elsewhere".into(),
        cross_border: None,
    };
    let pkce = Pkce::generate();
    client
        .initiate_payment(&elsewhere, &pkce.challenge, None)
        .await
        .expect("initiated elsewhere");
    let url = env
        .sandbox
        .admin_base_url()
        .join(&format!("admin/e2e/elsewhere-1/sign?psu={PSU}"))
        .expect("url");
    let signed: serde_json::Value = reqwest::Client::new()
        .post(url)
        .send()
        .await
        .expect("sign")
        .json()
        .await
        .expect("json");
    let code = query(signed["redirect_url"].as_str().expect("redirect"), "code").expect("code");
    client
        .exchange_code(
            Brand::Belfius,
            &SecretString::from(code),
            &pkce.verifier,
            "https://tpp.example/elsewhere",
        )
        .await
        .expect("the other pair");
    assert_eq!(env.counters().await["tokens_issued"], 2);

    // The worker presents its (dead) token, is refused, and initiates with PKCE instead.
    env.send(&initiate("rep-2", PSU, "11.00", "Shop")).await;
    let redirect = sign(&env, "rep-2").await;
    assert!(
        query(&redirect, "code").is_some(),
        "a PKCE payment: {redirect}"
    );
    settled_with_code(&complete(&env, "rep-2", &redirect).await);
    let counters = env.counters().await;
    assert_eq!(counters["initiations_by_auth"]["pkce"], 3, "{counters}");
    assert_eq!(counters["initiations_by_auth"]["bearer"], 0, "{counters}");
    assert_eq!(counters["initiations_by_e2e"]["rep-2"], 1, "{counters}");
    assert_eq!(counters["invalidated_token_uses"], 1, "{counters}");
    assert_eq!(counters["invalidated_token_reuses"], 0, "{counters}");
    // rep-2's code gave the worker a pair again: the next payment goes with it.
    env.send(&initiate("rep-3", PSU, "12.00", "Shop")).await;
    let redirect = sign(&env, "rep-3").await;
    assert_eq!(complete(&env, "rep-3", &redirect).await, WITHOUT_CODE);
    let counters = env.counters().await;
    assert_eq!(counters["initiations_by_auth"]["bearer"], 1, "{counters}");
    assert_eq!(counters["invalidated_token_uses"], 1, "{counters}");
    assert!(
        worker
            .log()
            .contains("initiating with PKCE instead of the PSU's token"),
        "the fallback is logged"
    );
    assert!(env.dlq_records().is_empty(), "nothing dead-lettered");
}
