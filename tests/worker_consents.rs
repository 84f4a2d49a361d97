//! Consents, funds checks and settlement evidence, end to end on real parts (issue 13, the
//! worker's side): the broker, the worker process, and the Belfius sandbox over mutual TLS. A
//! client asks for a consent with `RequestConsent`, the PSU grants or refuses it at the bank's
//! consent page (the sandbox's admin route, with the `state` of the consent URI the worker
//! published), and the client hands the redirect back with `CompleteConsent`. A CAF consent
//! lets the worker refuse an uncovered payment before initiating it; an AIS consent lets it
//! confirm a settlement from the debtor's booked history, and see a payment booked twice.

mod common;

use std::time::Duration;

use common::*;
use pis_worker::contract::command::{CommandBody, CommandEnvelope, ScaRedirect};
use pis_worker::contract::consent_status::ConsentStatusRecord;
use pis_worker::contract::status::StatusRecord;
use pis_worker::domain::consent::{ConsentScope, ConsentState};
use pis_worker::domain::machine::StateKind;
use pis_worker::domain::model::RawConsentRequest;
use pis_worker::domain::settlement::SettlementOutcome;
use pis_worker::kafka::state::{self, DecodedRecord};
use pis_worker::sandbox::faults::{EndpointClass, Fault, FaultRule, FaultSettings};
use pis_worker::secret::StateKeyRing;
use rdkafka::Message;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

const CONSENT_REDIRECT: &str = "https://client.example/consent";

/// A Belfius IBAN (bank code 063) for account number `account`: Belgian national check digits
/// (mod 97 of the first ten digits) and ISO 13616 IBAN check digits.
fn belfius_iban(account: u32) -> String {
    let national = format!("063{account:07}");
    let check = match national.parse::<u64>().expect("digits") % 97 {
        0 => 97,
        c => c,
    };
    let bban = format!("{national}{check:02}");
    // BBAN, then "BE00" with B = 11, E = 14.
    let digits = format!("{bban}111400");
    let remainder = digits
        .bytes()
        .fold(0u64, |acc, b| (acc * 10 + u64::from(b - b'0')) % 97);
    format!("BE{:02}{bban}", 98 - remainder)
}

#[test]
fn belfius_ibans_are_valid() {
    assert_eq!(belfius_iban(123_456), "BE41063012345610");
}

fn request_consent(
    consent_id: &str,
    psu_id: &str,
    scope: &str,
    account_iban: Option<&str>,
) -> CommandEnvelope {
    command(
        consent_id,
        psu_id,
        CommandBody::RequestConsent(RawConsentRequest {
            brand: "BELFIUS".into(),
            scope: scope.into(),
            account_iban: account_iban.map(str::to_owned),
            language: "fr".into(),
            redirect_uri: CONSENT_REDIRECT.into(),
        }),
    )
}

fn complete_consent(consent_id: &str, psu_id: &str, redirect_url: &str) -> CommandEnvelope {
    command(
        consent_id,
        psu_id,
        CommandBody::CompleteConsent(ScaRedirect::from_redirect_url(
            &url::Url::parse(redirect_url).expect("redirect url"),
        )),
    )
}

/// A single payment from `debtor`, with or without a funds check.
fn initiate_from(
    payment_id: &str,
    psu_id: &str,
    amount: &str,
    debtor: &str,
    funds_check: bool,
) -> CommandEnvelope {
    let mut envelope = initiate(payment_id, psu_id, amount, "Shop");
    let CommandBody::Initiate(raw) = &mut envelope.body else {
        unreachable!("initiate() builds an InitiatePayment");
    };
    raw.debtor_iban = Some(debtor.into());
    raw.funds_check = funds_check;
    envelope
}

fn query(url: &str, name: &str) -> Option<String> {
    url::Url::parse(url)
        .expect("url")
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The consent's events, de-duplicated by sequence, in sequence order.
fn consent_timeline(events: &[ConsentStatusRecord], consent_id: &str) -> Vec<ConsentStatusRecord> {
    let mut by_sequence = std::collections::BTreeMap::new();
    for event in events.iter().filter(|e| e.consent_id == consent_id) {
        if let Some(existing) = by_sequence.insert(event.sequence, event.clone()) {
            assert_eq!(
                existing.event_id, event.event_id,
                "two different events with sequence {} for {consent_id}",
                event.sequence
            );
        }
    }
    by_sequence.into_values().collect()
}

/// Waits for `consent_id` to publish `state`; returns that event.
async fn consent_reaches(
    feed: &Collector,
    consent_id: &str,
    state: ConsentState,
) -> ConsentStatusRecord {
    let events = wait_for_consent(
        feed,
        &format!("consent {consent_id} to be {}", state.symbol()),
        |events| {
            events
                .iter()
                .any(|e| e.consent_id == consent_id && e.state == state)
        },
    )
    .await;
    events
        .into_iter()
        .rev()
        .find(|e| e.consent_id == consent_id && e.state == state)
        .expect("found")
}

/// The PSU opens the consent URI the worker published and acts (`grant` / `refuse`) at the
/// bank's admin route, with the URI's `state`; returns the redirect URL their browser brings
/// back to the client.
async fn psu_consent(
    env: &TestEnv,
    consent_uri: &str,
    action: &str,
    psu_id: &str,
    accounts: Option<&str>,
) -> String {
    let uri = url::Url::parse(consent_uri).expect("consent uri");
    let bank_consent = uri
        .path_segments()
        .and_then(|mut s| s.next_back())
        .expect("the consent URI names the bank's consent")
        .to_owned();
    let mut url = env
        .sandbox
        .admin_base_url()
        .join(&format!("admin/consents/{bank_consent}/{action}"))
        .expect("url");
    {
        let mut pairs = url.query_pairs_mut();
        pairs.append_pair("psu", psu_id);
        if let Some(state) = query(consent_uri, "state") {
            pairs.append_pair("state", &state);
        }
        if let Some(accounts) = accounts {
            pairs.append_pair("accounts", accounts);
        }
    }
    let response = reqwest::Client::new()
        .post(url)
        .send()
        .await
        .expect("admin call");
    assert!(
        response.status().is_success(),
        "PSU {action} of the consent failed: {}",
        response.status()
    );
    let body: Value = response.json().await.expect("json");
    body["redirect_url"]
        .as_str()
        .expect("redirect_url")
        .to_owned()
}

/// Asks for a consent, has the PSU grant it at the bank (AIS: on `accounts`) and hands the
/// redirect back; returns the authorization code the redirect carried.
async fn grant(
    env: &TestEnv,
    feed: &Collector,
    consent_id: &str,
    psu_id: &str,
    scope: &str,
    account_iban: Option<&str>,
    accounts: Option<&str>,
) -> String {
    env.send(&request_consent(consent_id, psu_id, scope, account_iban))
        .await;
    let pending = consent_reaches(feed, consent_id, ConsentState::Pending).await;
    let uri = pending
        .consent_uri
        .expect("PENDING carries the consent URI");
    let redirect = psu_consent(env, &uri, "grant", psu_id, accounts).await;
    let code = query(&redirect, "code").expect("a grant's redirect carries a code");
    env.send(&complete_consent(consent_id, psu_id, &redirect))
        .await;
    consent_reaches(feed, consent_id, ConsentState::Granted).await;
    code
}

async fn admin_get(env: &TestEnv, path: &str) -> Value {
    let url = env.sandbox.admin_base_url().join(path).expect("url");
    reqwest::get(url)
        .await
        .expect("admin call")
        .json()
        .await
        .expect("json")
}

async fn admin_post(env: &TestEnv, path: &str, body: Option<Value>) -> Value {
    let url = env.sandbox.admin_base_url().join(path).expect("url");
    let mut request = reqwest::Client::new().post(url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("admin call");
    assert!(
        response.status().is_success(),
        "POST {path}: {}",
        response.status()
    );
    response.json().await.expect("json")
}

async fn set_balance(env: &TestEnv, iban: &str, balance: &str) {
    admin_post(
        env,
        &format!("admin/accounts/{iban}/balance"),
        Some(json!({ "balance": balance })),
    )
    .await;
}

/// A worker serving `/metrics` on a port of its own.
fn start_scraped_worker(env: &TestEnv, name: &str, extra: &[&str]) -> (Worker, u16) {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec!["--http-addr", addr.as_str()];
    args.extend_from_slice(extra);
    (env.start_worker(name, &args), port)
}

/// The latest event of `payment_id` in state `state`.
fn event_in(events: &[StatusRecord], payment_id: &str, state: StateKind) -> StatusRecord {
    events
        .iter()
        .rev()
        .find(|e| e.payment_id == payment_id && e.state == state)
        .cloned()
        .unwrap_or_else(|| panic!("no {} event for {payment_id}", state.symbol()))
}

fn sample(name: &str, outcome: &str) -> String {
    format!("{name}{{outcome=\"{outcome}\"}}")
}

/// `pis_settlement_checks_total{outcome}` of the worker serving `/metrics` on `port`.
async fn settlement_checks(port: u16, outcome: &str) -> f64 {
    metric(port, &sample("pis_settlement_checks_total", outcome)).await
}

// =============================================================================================

/// RequestConsent (CAF) → PENDING with a consent URI carrying the worker's `state` → the PSU
/// grants at the bank with that state → CompleteConsent with the redirect's code and state →
/// GRANTED. Sequences 1 and 2; neither the code nor the token pair it bought appears in any
/// consent event or in the worker's log (the pair is in the sealed state record only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consent_is_granted_and_its_secrets_stay_in_the_sealed_record() {
    const PSU: &str = "psu-grant";
    let env = TestEnv::new(|_| {}).await;
    let feed = env.follow_consents();
    let worker = env.start_worker("a", &[]);
    worker.wait_restored(PARTITIONS as usize).await;
    let iban = belfius_iban(1_001);

    env.send(&request_consent("caf-1", PSU, "CAF", Some(&iban)))
        .await;
    let pending = consent_reaches(&feed, "caf-1", ConsentState::Pending).await;
    assert_eq!(pending.sequence, 1);
    assert_eq!(pending.psu_id, PSU);
    assert_eq!(pending.scope, ConsentScope::Caf);
    assert_eq!(pending.account_iban.as_deref(), Some(iban.as_str()));
    assert!(!pending.is_final);
    // Caused by the bank's answer with the URI (the request itself publishes nothing).
    assert_eq!(pending.causation_id.as_deref(), Some("bank"));
    let uri = pending
        .consent_uri
        .clone()
        .expect("PENDING carries the URI");
    let state = query(&uri, "state").expect("the consent URI carries the worker's state");
    assert!(!state.is_empty());

    let redirect = psu_consent(&env, &uri, "grant", PSU, None).await;
    assert_eq!(query(&redirect, "state").as_deref(), Some(state.as_str()));
    let code = query(&redirect, "code").expect("a grant's redirect carries a code");
    env.send(&complete_consent("caf-1", PSU, &redirect)).await;
    let granted = consent_reaches(&feed, "caf-1", ConsentState::Granted).await;
    assert_eq!(granted.sequence, 2);
    assert!(!granted.is_final);
    assert_eq!(granted.consent_uri, None, "the URI is on PENDING only");
    assert_eq!(granted.reason_code, None);
    // Caused by the bank's token answer, once the pair is stored.
    assert_eq!(granted.causation_id.as_deref(), Some("bank"));
    let timeline = consent_timeline(&consent_events(&feed), "caf-1");
    let seen: Vec<(i64, ConsentState)> = timeline.iter().map(|e| (e.sequence, e.state)).collect();
    assert_eq!(
        seen,
        [(1, ConsentState::Pending), (2, ConsentState::Granted)]
    );

    // The bank holds it granted, by this PSU, for this account; the code was exchanged once.
    let consents = admin_get(&env, "admin/consents").await;
    let at_bank = consents
        .as_array()
        .and_then(|all| all.iter().find(|c| c["iban"] == iban.as_str()))
        .unwrap_or_else(|| panic!("the bank's consent: {consents}"));
    assert_eq!(at_bank["status"], "GRANTED", "{at_bank}");
    assert_eq!(at_bank["psu"], PSU, "{at_bank}");
    assert_eq!(env.counters().await["tokens_issued"], 1);

    // The pair is in the consent's state record, sealed with the worker's key.
    let ring =
        StateKeyRing::from_config(&SecretString::from(env.state_key.clone()), None).expect("ring");
    let record_key = format!("consent/BELFIUS/CAF/{PSU}");
    let reader = Collector::follow(&env.settings, &env.settings.topics.state);
    let started = std::time::Instant::now();
    let tokens = loop {
        let tokens = reader
            .snapshot()
            .into_iter()
            .filter(|m| m.key() == Some(record_key.as_bytes()))
            .filter_map(|m| {
                let bytes = m.payload()?.to_vec();
                match state::decode(&ring, &record_key, &bytes).expect("decodable") {
                    DecodedRecord::Consent { record, .. } => record.tokens,
                    _ => None,
                }
            })
            .next_back();
        if let Some(tokens) = tokens {
            break tokens;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no consent record with a token pair under {record_key}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut secrets = vec![code, tokens.access_token.expose_secret().to_owned()];
    secrets.extend(
        tokens
            .refresh_token
            .as_ref()
            .map(|t| t.expose_secret().to_owned()),
    );
    assert!(secrets.iter().all(|s| s.len() >= 20), "real secrets");

    let log = worker.log();
    assert!(
        log.contains("consent transition"),
        "the log is the worker's: {log}"
    );
    let raw_events = feed.snapshot();
    assert!(raw_events.len() >= 2);
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "a secret in the worker's log"
        );
        for event in &raw_events {
            let bytes = event.payload().unwrap_or_default();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "a secret in a consent status event"
            );
        }
    }
    assert!(env.dlq_records().is_empty(), "nothing dead-lettered");
}

/// The PSU refuses at the bank: the redirect's error ends the consent REFUSED (`SCA_FAILED`).
/// A redirect whose `state` is not the consent URI's is dead-lettered `STATE_MISMATCH` and
/// leaves the consent as it was: its genuine redirect still grants it, at sequence 2. Invalid
/// requests (AIS naming an account, CAF naming none) are dead-lettered
/// `INVALID_CONSENT_REQUEST` and publish nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_forged_redirects_and_invalid_requests() {
    let env = TestEnv::new(|_| {}).await;
    let feed = env.follow_consents();
    let (worker, port) = start_scraped_worker(&env, "a", &[]);
    worker.wait_restored(PARTITIONS as usize).await;

    // Refused by the PSU.
    env.send(&request_consent(
        "refused-1",
        "psu-refuse",
        "CAF",
        Some(&belfius_iban(2_001)),
    ))
    .await;
    let pending = consent_reaches(&feed, "refused-1", ConsentState::Pending).await;
    let uri = pending.consent_uri.expect("URI");
    let redirect = psu_consent(&env, &uri, "refuse", "psu-refuse", None).await;
    assert_eq!(query(&redirect, "error").as_deref(), Some("access_denied"));
    assert_eq!(query(&redirect, "code"), None);
    env.send(&complete_consent("refused-1", "psu-refuse", &redirect))
        .await;
    let refused = consent_reaches(&feed, "refused-1", ConsentState::Refused).await;
    assert_eq!(refused.sequence, 2);
    assert!(refused.is_final);
    assert_eq!(refused.reason_code.as_deref(), Some("SCA_FAILED"));
    assert_eq!(env.counters().await["tokens_issued"], 0);

    // A redirect with another state: dead-lettered, the consent untouched.
    env.send(&request_consent("forged-1", "psu-forged", "AIS", None))
        .await;
    let pending = consent_reaches(&feed, "forged-1", ConsentState::Pending).await;
    let uri = pending.consent_uri.expect("URI");
    let genuine = psu_consent(&env, &uri, "grant", "psu-forged", None).await;
    let state = query(&genuine, "state").expect("state");
    let forged = genuine.replace(&format!("state={state}"), "state=forged-state");
    assert_ne!(forged, genuine);
    env.send(&complete_consent("forged-1", "psu-forged", &forged))
        .await;
    let dlq = env
        .wait_for_dlq_where("STATE_MISMATCH", |records| {
            records
                .iter()
                .any(|r| header(r, "pis.error.class").as_deref() == Some("STATE_MISMATCH"))
        })
        .await;
    assert_eq!(dlq.len(), 1, "only the forged redirect");
    assert_eq!(
        header(&dlq[0], "pis.payment.id").as_deref(),
        Some("forged-1"),
        "the DLQ record names the consent"
    );
    assert_eq!(
        consent_timeline(&consent_events(&feed), "forged-1").len(),
        1,
        "still PENDING only"
    );
    assert_eq!(
        env.counters().await["tokens_issued"],
        0,
        "the code was not spent"
    );
    env.send(&complete_consent("forged-1", "psu-forged", &genuine))
        .await;
    let granted = consent_reaches(&feed, "forged-1", ConsentState::Granted).await;
    assert_eq!(granted.sequence, 2, "nothing happened in between");

    // Invalid requests: no consent to speak of, so no consent event.
    env.send(&request_consent(
        "bad-ais",
        "psu-bad",
        "AIS",
        Some(&belfius_iban(2_002)),
    ))
    .await;
    env.send(&request_consent("bad-caf", "psu-bad", "CAF", None))
        .await;
    let dlq = env
        .wait_for_dlq_where("two INVALID_CONSENT_REQUEST", |records| {
            records
                .iter()
                .filter(|r| {
                    header(r, "pis.error.class").as_deref() == Some("INVALID_CONSENT_REQUEST")
                })
                .count()
                == 2
        })
        .await;
    let messages: Vec<String> = dlq
        .iter()
        .filter(|r| header(r, "pis.error.class").as_deref() == Some("INVALID_CONSENT_REQUEST"))
        .filter_map(|r| header(r, "pis.error.message"))
        .collect();
    assert!(
        messages.iter().any(|m| m.starts_with("FIELD_NOT_ALLOWED")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.starts_with("MISSING_FIELD")),
        "{messages:?}"
    );
    let events = consent_events(&feed);
    assert!(
        events
            .iter()
            .all(|e| e.consent_id != "bad-ais" && e.consent_id != "bad-caf"),
        "an invalid request publishes nothing"
    );

    // Every consent command is counted, dead-lettered ones also by class (docs/metrics.md).
    let consumed = |kind: &str, outcome: &str| {
        format!("pis_commands_consumed_total{{outcome=\"{outcome}\",type=\"{kind}\"}}")
    };
    for (sample, expected) in [
        (consumed("request_consent", "accepted"), 2.0),
        (consumed("request_consent", "dead_lettered"), 2.0),
        (consumed("complete_consent", "accepted"), 2.0),
        (consumed("complete_consent", "dead_lettered"), 1.0),
        (
            "pis_dlq_records_total{class=\"STATE_MISMATCH\"}".to_owned(),
            1.0,
        ),
        (
            "pis_dlq_records_total{class=\"INVALID_CONSENT_REQUEST\"}".to_owned(),
            2.0,
        ),
    ] {
        assert_eq!(metric(port, &sample).await, expected, "{sample}");
    }
}

/// A granted CAF consent on account X; X's balance set low at the bank. A payment above the
/// balance with `funds_check` is REJECTED `INSUFFICIENT_FUNDS` and never reaches the bank's
/// payment interface; one below it is initiated. While the bank's funds confirmation fails,
/// a funds-checked payment is initiated all the same (outcome `error`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_funds_check_refuses_an_uncovered_payment_and_never_holds_one() {
    const PSU: &str = "psu-funds";
    const METRIC: &str = "pis_funds_checks_total";
    let env = TestEnv::new(|_| {}).await;
    let feed = env.follow_consents();
    let (worker, port) = start_scraped_worker(&env, "a", CLIENT_DRIVEN);
    worker.wait_restored(PARTITIONS as usize).await;
    let iban = belfius_iban(3_001);
    grant(&env, &feed, "caf-funds", PSU, "CAF", Some(&iban), None).await;
    set_balance(&env, &iban, "50.00").await;

    // Above the balance: refused before any initiation.
    env.send(&initiate_from("funds-low", PSU, "80.00", &iban, true))
        .await;
    let events = env.wait_for_state("funds-low", StateKind::Rejected).await;
    assert_well_formed(&events, "funds-low");
    let rejected = event_in(&events, "funds-low", StateKind::Rejected);
    assert_eq!(
        rejected.reason_code.as_deref(),
        Some("INSUFFICIENT_FUNDS"),
        "{}",
        describe(&events)
    );
    assert!(rejected.is_final);
    let line = states(&timeline(&events, "funds-low"));
    assert!(
        !line.contains(&StateKind::Initiating) && !line.contains(&StateKind::ScaPending),
        "{line:?}"
    );
    let counters = env.counters().await;
    assert_eq!(counters["funds_confirmations"], 1, "{counters}");
    assert_eq!(counters["initiation_requests"], 0, "{counters}");
    assert!(
        counters["initiations_by_e2e"].get("funds-low").is_none(),
        "{counters}"
    );
    assert_eq!(metric(port, &sample(METRIC, "insufficient")).await, 1.0);

    // Below the balance: initiated.
    env.send(&initiate_from("funds-ok", PSU, "20.00", &iban, true))
        .await;
    env.wait_for_state("funds-ok", StateKind::ScaPending).await;
    let counters = env.counters().await;
    assert_eq!(counters["funds_confirmations"], 2, "{counters}");
    assert_eq!(counters["initiations_by_e2e"]["funds-ok"], 1, "{counters}");
    assert_eq!(metric(port, &sample(METRIC, "available")).await, 1.0);

    // The bank's funds confirmation fails: the payment goes on unchecked.
    env.sandbox.faults().set(FaultSettings {
        rules: vec![FaultRule {
            endpoint: EndpointClass::Funds,
            probability: 1.0,
            fault: Fault::Status {
                status: 503,
                retry_after_secs: None,
            },
            remaining: None,
        }],
        ..FaultSettings::default()
    });
    env.send(&initiate_from("funds-outage", PSU, "30.00", &iban, true))
        .await;
    env.wait_for_state("funds-outage", StateKind::ScaPending)
        .await;
    env.sandbox.faults().clear();
    let injected = env.sandbox.faults().counters();
    assert!(
        injected["by_fault"]["status_503"]["funds"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "the funds call met the fault: {injected}"
    );
    let counters = env.counters().await;
    assert_eq!(
        counters["funds_confirmations"], 2,
        "none answered: {counters}"
    );
    assert_eq!(
        counters["initiations_by_e2e"]["funds-outage"], 1,
        "{counters}"
    );
    assert_eq!(metric(port, &sample(METRIC, "error")).await, 1.0);
    assert_eq!(metric(port, &sample(METRIC, "insufficient")).await, 1.0);
    assert_eq!(metric(port, &sample(METRIC, "available")).await, 1.0);
    assert!(env.dlq_records().is_empty(), "nothing dead-lettered");
}

/// A granted AIS consent on the debtor account: the payment's SETTLED event carries the
/// booking the bank's history shows (`BOOKED`, its reference). A PSU without an AIS consent
/// gets SETTLED with no evidence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_is_confirmed_from_the_debtors_history() {
    let env = TestEnv::new(|c| c.settle_after = Duration::from_secs(2)).await;
    let feed = env.follow_consents();
    let (worker, port) = start_scraped_worker(&env, "a", &["--poll-fast-ms", "500"]);
    worker.wait_restored(PARTITIONS as usize).await;
    let with_ais = belfius_iban(4_001);
    let without = belfius_iban(4_002);
    grant(
        &env,
        &feed,
        "ais-1",
        "psu-ais",
        "AIS",
        None,
        Some(&with_ais),
    )
    .await;

    for (payment_id, psu, debtor) in [
        ("settle-ais", "psu-ais", with_ais.as_str()),
        ("settle-none", "psu-none", without.as_str()),
    ] {
        env.send(&initiate_from(payment_id, psu, "12.34", debtor, false))
            .await;
        let redirect = env.psu("sign", payment_id, psu).await;
        env.send(&complete_sca(payment_id, psu, &redirect)).await;
    }

    let events = env.wait_for_state("settle-ais", StateKind::Settled).await;
    assert_well_formed(&events, "settle-ais");
    let settled = event_in(&events, "settle-ais", StateKind::Settled);
    let evidence = settled
        .settlement
        .clone()
        .unwrap_or_else(|| panic!("SETTLED carries evidence: {settled:?}"));
    assert_eq!(evidence.outcome, SettlementOutcome::Booked, "{evidence:?}");
    let account = admin_get(&env, &format!("admin/accounts/{with_ais}")).await;
    let bookings = account["bookings"].as_array().expect("bookings");
    assert_eq!(bookings.len(), 1, "{account}");
    assert_eq!(bookings[0]["end_to_end_id"], "settle-ais");
    assert_eq!(
        evidence.transaction_refs,
        vec![bookings[0]["reference"].to_string()],
        "the bank's reference of the booking"
    );
    assert_eq!(
        evidence.booking_date.map(|d| d.to_string()).as_deref(),
        bookings[0]["execution_date"].as_str()
    );

    let events = env.wait_for_state("settle-none", StateKind::Settled).await;
    let settled = event_in(&events, "settle-none", StateKind::Settled);
    assert_eq!(settled.settlement, None, "no AIS consent, no evidence");
    // The sandbox booked it all the same: the worker just could not look.
    let account = admin_get(&env, &format!("admin/accounts/{without}")).await;
    assert_eq!(account["bookings"].as_array().map(Vec::len), Some(1));

    assert_eq!(settlement_checks(port, "booked").await, 1.0);
    assert_eq!(
        settlement_checks(port, "no_consent").await,
        1.0,
        "the PSU without an AIS consent is counted"
    );
}

/// The lost-answer path (`PIS_UNKNOWN_OUTCOME=reinitiate`): the bank creates the first
/// initiation's payment but its answer is lost, the worker initiates again under the same
/// end-to-end id, and the PSU, seeing both in the banking app, signs both. The debtor's history
/// shows two bookings of one end-to-end id: the SETTLED event says `DUPLICATED`, with both
/// references, and the worker counts and logs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_booked_twice_is_reported_duplicated() {
    const PSU: &str = "psu-dup";
    let env = TestEnv::new(|c| {
        c.settle_after = Duration::from_secs(2);
        c.orphans_signable = true;
    })
    .await;
    let feed = env.follow_consents();
    let (worker, port) = start_scraped_worker(
        &env,
        "a",
        &["--poll-fast-ms", "500", "--unknown-outcome", "reinitiate"],
    );
    worker.wait_restored(PARTITIONS as usize).await;
    let iban = belfius_iban(5_001);
    grant(&env, &feed, "ais-dup", PSU, "AIS", None, Some(&iban)).await;

    env.sandbox.faults().set(FaultSettings {
        rules: vec![FaultRule {
            endpoint: EndpointClass::Initiate,
            probability: 1.0,
            fault: Fault::ResponseLost { hang_ms: 100 },
            remaining: Some(1),
        }],
        ..FaultSettings::default()
    });
    env.send(&initiate_from("dup-1", PSU, "15.00", &iban, false))
        .await;
    env.wait_for_state("dup-1", StateKind::OutcomeUnknown).await;
    env.wait_for_state("dup-1", StateKind::ScaPending).await;
    let counters = env.counters().await;
    assert_eq!(counters["initiations_by_e2e"]["dup-1"], 2, "{counters}");
    assert_eq!(counters["orphaned_initiations"], 1, "{counters}");

    let signed = admin_post(&env, &format!("admin/e2e/dup-1/sign-all?psu={PSU}"), None).await;
    assert_eq!(
        signed.as_array().map(Vec::len),
        Some(2),
        "the orphan and the retry: {signed}"
    );

    let events = env.wait_for_state("dup-1", StateKind::Settled).await;
    assert_well_formed(&events, "dup-1");
    let settled = event_in(&events, "dup-1", StateKind::Settled);
    let evidence = settled
        .settlement
        .clone()
        .unwrap_or_else(|| panic!("SETTLED carries evidence: {settled:?}"));
    assert_eq!(
        evidence.outcome,
        SettlementOutcome::Duplicated,
        "{evidence:?}"
    );
    let account = admin_get(&env, &format!("admin/accounts/{iban}")).await;
    let mut references: Vec<String> = account["bookings"]
        .as_array()
        .expect("bookings")
        .iter()
        .filter(|b| b["end_to_end_id"] == "dup-1")
        .map(|b| b["reference"].to_string())
        .collect();
    references.sort();
    let mut found = evidence.transaction_refs.clone();
    found.sort();
    assert_eq!(references.len(), 2, "{account}");
    assert_eq!(found, references, "both bookings named");
    assert_eq!(settlement_checks(port, "duplicated").await, 1.0);
    assert!(
        worker.log().contains("money moved twice"),
        "the worker says so"
    );
}

/// A granted consent is in the state topic: a worker that takes over after a crash (same
/// group) still checks funds with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_consent_survives_a_restart() {
    const PSU: &str = "psu-restart";
    // Access tokens live less than the worker's refresh margin: the new owner refreshes the
    // restored pair before it uses it.
    let env = TestEnv::new(|c| c.access_token_lifetime = Duration::from_secs(20)).await;
    let feed = env.follow_consents();
    let mut first = env.start_worker("a", CLIENT_DRIVEN);
    first.wait_restored(PARTITIONS as usize).await;
    let iban = belfius_iban(6_001);
    grant(&env, &feed, "caf-restart", PSU, "CAF", Some(&iban), None).await;
    first.kill();

    let second = env.start_worker("b", CLIENT_DRIVEN);
    second.wait_restored(PARTITIONS as usize).await;
    set_balance(&env, &iban, "5.00").await;
    env.send(&initiate_from("after-restart", PSU, "9.00", &iban, true))
        .await;
    let events = env
        .wait_for_state("after-restart", StateKind::Rejected)
        .await;
    let rejected = event_in(&events, "after-restart", StateKind::Rejected);
    assert_eq!(
        rejected.reason_code.as_deref(),
        Some("INSUFFICIENT_FUNDS"),
        "{}",
        describe(&events)
    );
    let counters = env.counters().await;
    assert_eq!(counters["funds_confirmations"], 1, "{counters}");
    assert_eq!(counters["initiation_requests"], 0, "{counters}");
    assert_eq!(
        counters["refreshes"], 1,
        "the restored pair's refresh token: {counters}"
    );
    assert_eq!(counters["tokens_issued"], 2, "{counters}");
    assert_eq!(counters["invalidated_token_uses"], 0, "{counters}");
    let timeline = consent_timeline(&consent_events(&feed), "caf-restart");
    assert_eq!(timeline.len(), 2, "PENDING, GRANTED: nothing new");
}

/// The worker crashes while the bank's consent-uris call is out (its answer never comes): the
/// consent's record says it was requested, so the next owner asks for the URI again and the
/// consent goes on (PENDING, then GRANTED) rather than waiting for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consent_requested_when_the_worker_crashed_is_asked_for_again() {
    const PSU: &str = "psu-crash";
    let env = TestEnv::new(|_| {}).await;
    let feed = env.follow_consents();
    let mut first = env.start_worker("a", CLIENT_DRIVEN);
    first.wait_restored(PARTITIONS as usize).await;
    env.sandbox.faults().set(FaultSettings {
        rules: vec![FaultRule {
            endpoint: EndpointClass::Consent,
            probability: 1.0,
            fault: Fault::ResponseLost { hang_ms: 30_000 },
            remaining: Some(1),
        }],
        ..FaultSettings::default()
    });
    let iban = belfius_iban(7_001);
    env.send(&request_consent("caf-crash", PSU, "CAF", Some(&iban)))
        .await;
    let started = std::time::Instant::now();
    while env
        .sandbox
        .faults()
        .traffic()
        .arrivals_at(EndpointClass::Consent)
        .is_empty()
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the worker never asked for the consent URI"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.kill();

    let second = env.start_worker("b", CLIENT_DRIVEN);
    second.wait_restored(PARTITIONS as usize).await;
    let pending = consent_reaches(&feed, "caf-crash", ConsentState::Pending).await;
    assert_eq!(pending.sequence, 1);
    let uri = pending.consent_uri.expect("URI");
    let redirect = psu_consent(&env, &uri, "grant", PSU, None).await;
    env.send(&complete_consent("caf-crash", PSU, &redirect))
        .await;
    let granted = consent_reaches(&feed, "caf-crash", ConsentState::Granted).await;
    assert_eq!(granted.sequence, 2);
    assert_eq!(
        env.sandbox
            .faults()
            .traffic()
            .arrivals_at(EndpointClass::Consent)
            .len(),
        2,
        "asked once per owner"
    );
}
