//! Bank faults as the guarded Belfius client meets them (docs/belfius.md §1.5): one test per
//! fault class against the sandbox's fault injection, over real HTTPS with mutual TLS, in this
//! process. What reached the bank is read from the sandbox (its traffic recorder and counters),
//! never from wall-clock timing; time-related checks use generous lower bounds only.
//!
//! The tests share the process-wide metrics registry, so they run one at a time.
//!
//! The last test runs the worker binary against a broker (`PIS_TEST_BROKERS`, as `make test`
//! sets it): an initiation made while the circuit is open is held, not failed.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use chrono::Datelike as _;
use pis_worker::belfius::guard::{
    BreakerConfig, BreakerState, CIRCUIT_OPEN_PREFIX, GuardConfig, HostLimits, RetryConfig,
};
use pis_worker::belfius::pkce::Pkce;
use pis_worker::belfius::{BankError, BelfiusClient, Initiated, TokenPair};
use pis_worker::domain::machine::{InitiationFailure, StateKind};
use pis_worker::domain::model::{
    Amount, BankPaymentId, Brand, Frequency, Language, PaymentKind, PaymentOrder, PaymentProduct,
    StandingOrder,
};
use pis_worker::engine::bank::classify_initiation_error;
use pis_worker::metrics::metrics;
use pis_worker::sandbox::faults::{EndpointClass, Fault, FaultRule, FaultSettings, Latency};
use pis_worker::sandbox::{self, RunningSandbox, SandboxConfig};
use secrecy::SecretString;
use serde_json::Value;

const REDIRECT: &str = "https://tpp.example/callback";

/// One test at a time: the metrics registry is process-wide.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn shared_pki() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bank-faults-pki");
        sandbox::tls::load_or_create(&dir).unwrap();
        dir
    })
}

struct Env {
    sandbox: RunningSandbox,
    admin: reqwest::Client,
}

async fn env() -> Env {
    let mut config = SandboxConfig::local(shared_pki());
    // Signed payments stay ACTC: nothing settles under the tests' feet.
    config.settle_after = Duration::from_secs(3600);
    Env {
        sandbox: sandbox::start(config).await.unwrap(),
        admin: reqwest::Client::new(),
    }
}

/// Retries fast enough for tests; no limits, no breaker unless a test adds them.
fn quick_retries(max_retries: usize) -> GuardConfig {
    GuardConfig {
        retry: RetryConfig {
            min_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(100),
            max_retries,
            max_elapsed: Duration::from_secs(10),
        },
        ..GuardConfig::none()
    }
}

fn order(e2e: &str) -> PaymentOrder {
    PaymentOrder {
        product: PaymentProduct::SepaCreditTransfers,
        brand: Brand::Belfius,
        amount: Amount::from_minor(1234),
        currency: "EUR".into(),
        creditor_name: "ACME NV".into(),
        creditor_iban: "BE71096123456769".into(),
        creditor_bic: None,
        debtor_iban: None,
        end_to_end_id: e2e.into(),
        remittance_information: None,
        requested_execution_date: None,
        language: Language::Nl,
        redirect_uri: REDIRECT.into(),
        cross_border: None,
    }
}

/// A standing order: signed, it stays ACTC and cancellable.
fn standing(e2e: &str) -> StandingOrder {
    let start = chrono::Utc::now().date_naive() + chrono::Days::new(7);
    StandingOrder {
        order: order(e2e),
        start_date: start,
        end_date: None,
        frequency: Frequency::Monthly,
        day_of_execution: Some(u8::try_from(start.day()).unwrap()),
    }
}

fn rule(endpoint: EndpointClass, fault: Fault, remaining: Option<u64>) -> FaultRule {
    FaultRule {
        endpoint,
        probability: 1.0,
        fault,
        remaining,
    }
}

fn status(status: u16) -> Fault {
    Fault::Status {
        status,
        retry_after_secs: None,
    }
}

fn too_many(retry_after_secs: u64) -> Fault {
    Fault::Status {
        status: 429,
        retry_after_secs: Some(retry_after_secs),
    }
}

fn retries(endpoint: &str) -> u64 {
    metrics().bank_retries.with_label_values(&[endpoint]).get()
}

fn requests(endpoint: &str, class: &str) -> u64 {
    metrics()
        .bank_requests
        .with_label_values(&[endpoint, class])
        .get()
}

fn breaker_gauge() -> i64 {
    metrics()
        .circuit_breaker_state
        .with_label_values(&["belfius"])
        .get()
}

impl Env {
    fn client(&self, guard: GuardConfig) -> BelfiusClient {
        BelfiusClient::with_guard(self.sandbox.belfius_config().unwrap(), guard).unwrap()
    }

    /// Faults from now on; the traffic record starts afresh.
    fn faults(&self, rules: Vec<FaultRule>) {
        self.sandbox.faults().set(FaultSettings {
            latency: Latency::default(),
            rules,
        });
        self.sandbox.faults().reset_traffic();
    }

    fn latency(&self, fixed_ms: u64) {
        self.sandbox.faults().set(FaultSettings {
            latency: Latency {
                fixed_ms,
                ..Latency::default()
            },
            rules: vec![],
        });
        self.sandbox.faults().reset_traffic();
    }

    fn clear(&self) {
        self.sandbox.faults().clear();
        self.sandbox.faults().reset_traffic();
    }

    /// Requests of this endpoint class that reached the bank since the last reset.
    fn arrived(&self, endpoint: EndpointClass) -> usize {
        self.sandbox.faults().traffic().arrivals_at(endpoint).len()
    }

    /// Milliseconds between consecutive arrivals of this endpoint class.
    fn gaps(&self, endpoint: EndpointClass) -> Vec<u64> {
        let traffic = self.sandbox.faults().traffic();
        let at: Vec<u64> = traffic
            .arrivals_at(endpoint)
            .iter()
            .map(|a| a.at_ms)
            .collect();
        at.windows(2).map(|w| w[1] - w[0]).collect()
    }

    async fn counters(&self) -> Value {
        let url = self
            .sandbox
            .admin_base_url()
            .join("admin/counters")
            .unwrap();
        self.admin
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The PSU `psu` signs the latest payment with this end-to-end id; its authorization code.
    async fn sign(&self, e2e: &str, psu: &str) -> SecretString {
        let url = self
            .sandbox
            .admin_base_url()
            .join(&format!("admin/e2e/{e2e}/sign?psu={psu}"))
            .unwrap();
        let response = self.admin.post(url).send().await.unwrap();
        assert!(response.status().is_success(), "{}", response.status());
        let body: Value = response.json().await.unwrap();
        let redirect = url::Url::parse(body["redirect_url"].as_str().unwrap()).unwrap();
        let code = redirect
            .query_pairs()
            .find(|(k, _)| k == "code")
            .map(|(_, v)| v.into_owned())
            .expect("a code in the redirect");
        SecretString::from(code)
    }

    /// A standing order of `psu`, initiated and signed (ACTC); its code and PKCE verifier.
    async fn signed_standing(
        &self,
        client: &BelfiusClient,
        e2e: &str,
        psu: &str,
    ) -> (Initiated, SecretString, SecretString) {
        let pkce = Pkce::generate();
        let initiated = client
            .initiate_periodic(&standing(e2e), &pkce.challenge, None)
            .await
            .unwrap();
        let code = self.sign(e2e, psu).await;
        (initiated, code, pkce.verifier)
    }

    /// A standing order of `psu`, signed, and the PSU's token pair from its code.
    async fn standing_with_tokens(
        &self,
        client: &BelfiusClient,
        e2e: &str,
        psu: &str,
    ) -> (Initiated, TokenPair) {
        let (initiated, code, verifier) = self.signed_standing(client, e2e, psu).await;
        let tokens = client
            .exchange_code(Brand::Belfius, &code, &verifier, REDIRECT)
            .await
            .unwrap();
        (initiated, tokens)
    }
}

async fn read_status(client: &BelfiusClient, id: &BankPaymentId) -> Result<String, BankError> {
    client
        .payment_status(
            PaymentKind::Single,
            Brand::Belfius,
            PaymentProduct::SepaCreditTransfers,
            id,
        )
        .await
}

async fn cancel_standing(
    client: &BelfiusClient,
    id: &BankPaymentId,
    access: &SecretString,
) -> Result<Option<String>, BankError> {
    client
        .cancel_payment(
            PaymentKind::Periodic,
            Brand::Belfius,
            PaymentProduct::SepaCreditTransfers,
            id,
            access,
        )
        .await
        .map(|c| c.transaction_status)
}

// =============================================================================================
// 5xx

#[tokio::test]
async fn status_read_is_retried_through_a_503_burst() {
    let _serial = SERIAL.lock().await;
    let env = env().await;
    let client = env.client(quick_retries(4));
    let initiated = client
        .initiate_payment(&order("E2E-503-BURST"), &Pkce::generate().challenge, None)
        .await
        .unwrap();
    let (retried, failed, answered) = (
        retries("status"),
        requests("status", "5xx"),
        requests("status", "2xx"),
    );

    env.faults(vec![rule(EndpointClass::Status, status(503), Some(2))]);
    let code = read_status(&client, &initiated.bank_payment_id)
        .await
        .expect("the third attempt answers");
    assert_eq!(code, "RCVD");
    assert_eq!(env.arrived(EndpointClass::Status), 3);
    assert_eq!(retries("status") - retried, 2);
    assert_eq!(requests("status", "5xx") - failed, 2);
    assert_eq!(requests("status", "2xx") - answered, 1);

    // A burst longer than the retries: the read gives up with the bank's error.
    env.faults(vec![rule(EndpointClass::Status, status(502), None)]);
    let error = read_status(&client, &initiated.bank_payment_id)
        .await
        .unwrap_err();
    assert!(
        matches!(error, BankError::Unavailable { status: 502, .. }),
        "{error:?}"
    );
    assert_eq!(env.arrived(EndpointClass::Status), 5, "1 + 4 retries");
}

// =============================================================================================
// 429 with Retry-After

#[tokio::test]
async fn rate_limited_read_waits_for_retry_after() {
    let _serial = SERIAL.lock().await;
    let env = env().await;
    let client = env.client(quick_retries(4));
    let initiated = client
        .initiate_payment(&order("E2E-429-READ"), &Pkce::generate().challenge, None)
        .await
        .unwrap();
    let retried = retries("status");

    env.faults(vec![rule(EndpointClass::Status, too_many(1), Some(1))]);
    assert_eq!(
        read_status(&client, &initiated.bank_payment_id)
            .await
            .unwrap(),
        "RCVD"
    );
    assert_eq!(env.arrived(EndpointClass::Status), 2);
    assert_eq!(retries("status") - retried, 1);
    // The back-off alone would have waited 20-40 ms: the retry waited for Retry-After (1 s).
    let gaps = env.gaps(EndpointClass::Status);
    assert!(gaps[0] >= 990, "retry came {} ms after the 429", gaps[0]);
}

#[tokio::test]
async fn rate_limited_initiation_is_not_processed_and_carries_retry_after() {
    let _serial = SERIAL.lock().await;
    let env = env().await;
    let client = env.client(quick_retries(4));
    env.faults(vec![rule(EndpointClass::Initiate, too_many(3), None)]);
    let error = client
        .initiate_payment(&order("E2E-429-INIT"), &Pkce::generate().challenge, None)
        .await
        .unwrap_err();
    assert_eq!(env.arrived(EndpointClass::Initiate), 1, "never retried");
    match classify_initiation_error(&error) {
        InitiationFailure::NotProcessed { retry_after_ms, .. } => {
            assert_eq!(retry_after_ms, Some(3_000))
        }
        other => panic!("{other:?}"),
    }
}

// =============================================================================================
// The initiation POST under every fault: exactly one request per attempt

#[tokio::test]
async fn initiation_post_is_never_retried() {
    let _serial = SERIAL.lock().await;
    let env = env().await;
    // Generous retries: none of them may apply to a POST.
    let client = env.client(quick_retries(4));
    let retried = retries("initiate");
    let cases = [
        ("E2E-NR-503", status(503)),
        ("E2E-NR-500", status(500)),
        ("E2E-NR-429", too_many(1)),
        ("E2E-NR-RESET", Fault::Reset),
        ("E2E-NR-LOST", Fault::ResponseLost { hang_ms: 100 }),
    ];
    for (e2e, fault) in cases {
        env.faults(vec![rule(EndpointClass::Initiate, fault.clone(), None)]);
        let error = client
            .initiate_payment(&order(e2e), &Pkce::generate().challenge, None)
            .await
            .unwrap_err();
        assert_eq!(
            env.arrived(EndpointClass::Initiate),
            1,
            "{e2e}: one POST for one attempt ({error:?})"
        );
        let unknown = matches!(
            classify_initiation_error(&error),
            InitiationFailure::Unknown { .. }
        );
        assert_eq!(
            unknown,
            !matches!(fault, Fault::Status { status: 429, .. }),
            "{e2e}"
        );
    }
    assert_eq!(retries("initiate"), retried);
    // The lost answer's payment exists at the bank, exactly once; the others were never made.
    let counters = env.counters().await;
    assert_eq!(counters["initiations_by_e2e"]["E2E-NR-LOST"], 1);
    assert_eq!(counters["initiations"], 1);
}

// =============================================================================================
// Token grants and DELETE: retried only when the bank provably did not process them

#[tokio::test]
async fn grants_and_cancellations_are_retried_only_when_provably_unprocessed() {
    let _serial = SERIAL.lock().await;
    let env = env().await;
    let client = env.client(quick_retries(4));

    // Code exchange turned away by a 503: retried, one pair issued.
    let (order_a, code, verifier) = env.signed_standing(&client, "E2E-G-1", "psu-a").await;
    env.faults(vec![rule(EndpointClass::Token, status(503), Some(1))]);
    let pair = client
        .exchange_code(Brand::Belfius, &code, &verifier, REDIRECT)
        .await
        .expect("retried after the 503");
    assert_eq!(env.arrived(EndpointClass::Token), 2);
    let refresh = pair.refresh_token.clone().expect("a refresh token");

    // Refresh turned away by a 503: retried.
    env.faults(vec![rule(EndpointClass::Token, status(503), Some(1))]);
    let pair = client
        .refresh_token(Brand::Belfius, &refresh)
        .await
        .expect("retried after the 503");
    assert_eq!(env.arrived(EndpointClass::Token), 2);
    let refresh = pair.refresh_token.clone().expect("a refresh token");

    // 500, reset, lost answer: the bank may have rotated the pair. One request each.
    for fault in [
        status(500),
        Fault::Reset,
        Fault::ResponseLost { hang_ms: 100 },
    ] {
        env.faults(vec![rule(EndpointClass::Token, fault.clone(), Some(1))]);
        let error = client
            .refresh_token(Brand::Belfius, &refresh)
            .await
            .unwrap_err();
        assert_eq!(env.arrived(EndpointClass::Token), 1, "{fault:?}: {error:?}");
    }
    // The lost answer was processed: the pair rotated behind our back, and the client never
    // presented the replaced refresh token again.
    let counters = env.counters().await;
    assert_eq!(counters["invalidated_token_uses"], 0);
    env.clear();
    let stale = client
        .refresh_token(Brand::Belfius, &refresh)
        .await
        .unwrap_err();
    assert!(
        matches!(stale, BankError::Refused { status: 401, .. }),
        "{stale:?}"
    );
    assert_eq!(
        env.arrived(EndpointClass::Token),
        1,
        "a refusal is not retried"
    );

    // A code exchange that got no answer is not sent again (the code is single-use)...
    let (order_b, code, verifier) = env.signed_standing(&client, "E2E-G-2", "psu-a").await;
    env.faults(vec![rule(EndpointClass::Token, Fault::Reset, Some(1))]);
    let error = client
        .exchange_code(Brand::Belfius, &code, &verifier, REDIRECT)
        .await
        .unwrap_err();
    assert!(matches!(error, BankError::NoResponse(_)), "{error:?}");
    assert_eq!(env.arrived(EndpointClass::Token), 1);
    // ... and the engine's own re-run finds it unused (a reset processes nothing).
    env.clear();
    let pair = client
        .exchange_code(Brand::Belfius, &code, &verifier, REDIRECT)
        .await
        .unwrap();

    // DELETE rate-limited: retried after Retry-After, and it cancels.
    env.faults(vec![rule(EndpointClass::Cancel, too_many(1), Some(1))]);
    let cancelled = cancel_standing(&client, &order_a.bank_payment_id, &pair.access_token)
        .await
        .expect("retried after the 429");
    assert!(matches!(cancelled.as_deref(), None | Some("CANC")));
    assert_eq!(env.arrived(EndpointClass::Cancel), 2);
    assert!(env.gaps(EndpointClass::Cancel)[0] >= 990);

    // DELETE whose answer was lost: not repeated (a repeat would be refused as not cancellable).
    env.faults(vec![rule(
        EndpointClass::Cancel,
        Fault::ResponseLost { hang_ms: 100 },
        Some(1),
    )]);
    let error = cancel_standing(&client, &order_b.bank_payment_id, &pair.access_token)
        .await
        .unwrap_err();
    assert!(matches!(error, BankError::NoResponse(_)), "{error:?}");
    assert_eq!(env.arrived(EndpointClass::Cancel), 1);
    env.clear();
    let status = client
        .payment_status(
            PaymentKind::Periodic,
            Brand::Belfius,
            PaymentProduct::SepaCreditTransfers,
            &order_b.bank_payment_id,
        )
        .await
        .unwrap();
    assert_eq!(
        status, "CANC",
        "the lost DELETE was applied; the status check tells"
    );
}

// =============================================================================================
// Latency beyond the request timeout, on every call type

#[tokio::test]
async fn request_timeout_applies_to_every_call_including_token_calls() {
    let _serial = SERIAL.lock().await;
    let env = env().await;
    let mut config = env.sandbox.belfius_config().unwrap();
    config.request_timeout = Duration::from_millis(400);
    let client = BelfiusClient::with_guard(config, quick_retries(1)).unwrap();
    let (initiated, pair) = env
        .standing_with_tokens(&client, "E2E-TIMEOUT", "psu-t")
        .await;
    let timeouts = requests("token", "timeout");

    env.latency(1_500);
    let error = client
        .refresh_token(Brand::Belfius, pair.refresh_token.as_ref().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(error, BankError::NoResponse(_)), "{error:?}");
    assert_eq!(env.arrived(EndpointClass::Token), 1, "not retried");
    assert_eq!(requests("token", "timeout") - timeouts, 1);

    // A read times out too, and is retried (once, as configured).
    let error = client
        .payment_status(
            PaymentKind::Periodic,
            Brand::Belfius,
            PaymentProduct::SepaCreditTransfers,
            &initiated.bank_payment_id,
        )
        .await
        .unwrap_err();
    assert!(matches!(error, BankError::NoResponse(_)), "{error:?}");
    assert_eq!(env.arrived(EndpointClass::Status), 2);

    // An initiation times out once: outcome unknown.
    let error = client
        .initiate_payment(&order("E2E-TIMEOUT-2"), &Pkce::generate().challenge, None)
        .await
        .unwrap_err();
    assert!(matches!(
        classify_initiation_error(&error),
        InitiationFailure::Unknown { .. }
    ));
    assert_eq!(env.arrived(EndpointClass::Initiate), 1);
}

// =============================================================================================
// Reset and lost answers on reads

#[tokio::test]
async fn reads_are_retried_through_resets_and_lost_answers() {
    let _serial = SERIAL.lock().await;
    let env = env().await;
    let client = env.client(quick_retries(4));
    let initiated = client
        .initiate_payment(&order("E2E-READ-RESET"), &Pkce::generate().challenge, None)
        .await
        .unwrap();
    env.faults(vec![
        rule(EndpointClass::Status, Fault::Reset, Some(1)),
        rule(
            EndpointClass::Status,
            Fault::ResponseLost { hang_ms: 100 },
            Some(1),
        ),
    ]);
    assert_eq!(
        read_status(&client, &initiated.bank_payment_id)
            .await
            .unwrap(),
        "RCVD"
    );
    assert_eq!(env.arrived(EndpointClass::Status), 3);
}

// =============================================================================================
// Per-host limits

#[tokio::test]
async fn concurrency_limit_per_host_is_respected() {
    let _serial = SERIAL.lock().await;
    let env = env().await;
    let limited = env.client(GuardConfig {
        limits: HostLimits {
            max_concurrency: 3,
            rate_per_sec: 0.0,
            rate_burst: 1,
        },
        ..GuardConfig::none()
    });
    let unlimited = env.client(GuardConfig::none());
    env.latency(200);

    let burst = |client: &BelfiusClient, brand: Brand, n: usize| {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let client = client.clone();
            tasks.spawn(async move {
                // An unknown id: 404 after the latency, which is all this test needs.
                let _ = client
                    .payment_status(
                        PaymentKind::Single,
                        brand,
                        PaymentProduct::SepaCreditTransfers,
                        &BankPaymentId::new(format!("unknown-{i}")),
                    )
                    .await;
            });
        }
        tasks
    };

    // Control: without a limit the sandbox sees more than 3 at once.
    burst(&unlimited, Brand::Belfius, 10).join_all().await;
    let control = env.sandbox.faults().traffic().max_in_flight_any_host();
    assert!(control > 3, "control run reached only {control}");

    // Limited, on both hosts at once: at most 3 per host.
    env.sandbox.faults().reset_traffic();
    let a = burst(&limited, Brand::Belfius, 10);
    let b = burst(&limited, Brand::Banx, 10);
    a.join_all().await;
    b.join_all().await;
    let traffic = env.sandbox.faults().traffic();
    assert_eq!(traffic.arrivals.len(), 20);
    assert_eq!(
        traffic.max_in_flight.len(),
        2,
        "{:?}",
        traffic.max_in_flight
    );
    for (host, max) in &traffic.max_in_flight {
        assert!((1..=3).contains(max), "{host}: {max} at once");
    }
}

#[tokio::test]
async fn rate_limit_per_host_is_respected() {
    let _serial = SERIAL.lock().await;
    let env = env().await;
    let client = env.client(GuardConfig {
        limits: HostLimits {
            max_concurrency: 0,
            rate_per_sec: 5.0,
            rate_burst: 2,
        },
        ..GuardConfig::none()
    });
    env.clear();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..12 {
        let client = client.clone();
        tasks.spawn(async move {
            let _ = client
                .payment_status(
                    PaymentKind::Single,
                    Brand::Belfius,
                    PaymentProduct::SepaCreditTransfers,
                    &BankPaymentId::new(format!("unknown-{i}")),
                )
                .await;
        });
    }
    tasks.join_all().await;
    let traffic = env.sandbox.faults().traffic();
    let at: Vec<u64> = traffic.arrivals.iter().map(|a| a.at_ms).collect();
    assert_eq!(at.len(), 12);
    // 2 at once, then one per 200 ms: 10 more take at least 2 s. Lower bound with margin.
    let span = at[at.len() - 1] - at[0];
    assert!(span >= 1_800, "12 calls within {span} ms");
    // In any one-second window: at most burst + rate = 7 (plus one for network jitter).
    for (i, start) in at.iter().enumerate() {
        let within = at[i..].iter().filter(|t| **t < start + 1_000).count();
        assert!(within <= 8, "{within} calls in the second after {start} ms");
    }
}

// =============================================================================================
// Circuit breaker

#[tokio::test]
async fn circuit_opens_holds_work_probes_and_closes() {
    let _serial = SERIAL.lock().await;
    let env = env().await;
    let client = env.client(GuardConfig {
        // Four failures in a row open it (the ratio trigger is unit-tested in `belfius::guard`;
        // here the set-up's successful calls would dilute it).
        breaker: BreakerConfig {
            window: Duration::from_secs(30),
            min_calls: 100,
            failure_percent: 0,
            consecutive_failures: 4,
            open_for: Duration::from_secs(1),
        },
        ..GuardConfig::none()
    });
    // Work to hold later: an initiation, a code to exchange, a refresh, a cancellation.
    let (standing_b, pair_b) = env.standing_with_tokens(&client, "E2E-CB-B", "psu-b").await;
    let (standing_c, pair_c) = env.standing_with_tokens(&client, "E2E-CB-C", "psu-c").await;
    let (_, code_d, verifier_d) = env.signed_standing(&client, "E2E-CB-D", "psu-d").await;
    let probe_id = standing_b.bank_payment_id.clone();
    let status_of = |client: BelfiusClient, id: BankPaymentId| async move {
        client
            .payment_status(
                PaymentKind::Periodic,
                Brand::Belfius,
                PaymentProduct::SepaCreditTransfers,
                &id,
            )
            .await
    };
    let circuit_open_before = requests("status", "circuit_open");

    // Sustained 5xx (five answers in all: four to open it, one for the first probe).
    env.faults(vec![rule(EndpointClass::Any, status(503), Some(5))]);
    for _ in 0..4 {
        let error = status_of(client.clone(), probe_id.clone())
            .await
            .unwrap_err();
        assert!(matches!(error, BankError::Unavailable { status: 503, .. }));
    }
    assert!(matches!(
        client.guard().breaker_state(Brand::Belfius),
        BreakerState::Open { .. }
    ));
    assert_eq!(breaker_gauge(), 2);
    assert_eq!(
        client.guard().breaker_state(Brand::Banx),
        BreakerState::Closed
    );

    // Open: a read fails fast and nothing reaches the bank.
    match status_of(client.clone(), probe_id.clone()).await {
        Err(BankError::NotSent(message)) => {
            assert!(message.starts_with(CIRCUIT_OPEN_PREFIX), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(env.arrived(EndpointClass::Any), 4);
    assert_eq!(requests("status", "circuit_open") - circuit_open_before, 1);

    // After the cool-down one read is let through as the probe; it fails: open again.
    let started = Instant::now();
    let probe_error = loop {
        assert!(started.elapsed() < Duration::from_secs(10), "no probe");
        match status_of(client.clone(), probe_id.clone()).await {
            Err(BankError::NotSent(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            other => break other,
        }
    };
    assert!(
        matches!(probe_error, Err(BankError::Unavailable { status: 503, .. })),
        "{probe_error:?}"
    );
    assert_eq!(env.arrived(EndpointClass::Any), 5, "exactly one probe");
    assert_eq!(breaker_gauge(), 2);

    // Held, not rejected: work that arrives while the circuit is open waits in the guard.
    let backlog_before = metrics().circuit_backlog.get();
    let held = {
        let mut tasks = tokio::task::JoinSet::new();
        let c = client.clone();
        tasks.spawn(async move {
            c.initiate_payment(&order("E2E-CB-HELD"), &Pkce::generate().challenge, None)
                .await
                .map(|_| "initiated")
        });
        let c = client.clone();
        tasks.spawn(async move {
            c.exchange_code(Brand::Belfius, &code_d, &verifier_d, REDIRECT)
                .await
                .map(|_| "exchanged")
        });
        let c = client.clone();
        let refresh = pair_b.refresh_token.clone().unwrap();
        tasks.spawn(async move {
            c.refresh_token(Brand::Belfius, &refresh)
                .await
                .map(|_| "refreshed")
        });
        let c = client.clone();
        let id = standing_c.bank_payment_id.clone();
        let access = pair_c.access_token.clone();
        tasks.spawn(async move { cancel_standing(&c, &id, &access).await.map(|_| "cancelled") });
        tasks
    };
    let started = Instant::now();
    while metrics().circuit_backlog.get() - backlog_before < 4 {
        assert!(started.elapsed() < Duration::from_secs(10), "not held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Still open (no probe has succeeded: the faults are spent, so any probe would have), so
    // nothing was sent while it was.
    assert_eq!(breaker_gauge(), 2);
    assert_eq!(env.arrived(EndpointClass::Any), 5);
    assert_eq!(breaker_gauge(), 2);

    // The bank is back (the faults are spent). Without reads, a held call probes after the
    // cool-down, succeeds, the circuit closes and all held work completes.
    let results = tokio::time::timeout(Duration::from_secs(20), held.join_all())
        .await
        .expect("held work completes once the circuit closes");
    let mut done: Vec<&str> = results
        .into_iter()
        .map(|r| r.expect("no held call failed"))
        .collect();
    done.sort_unstable();
    assert_eq!(
        done,
        vec!["cancelled", "exchanged", "initiated", "refreshed"]
    );
    assert_eq!(breaker_gauge(), 0);
    assert_eq!(
        client.guard().breaker_state(Brand::Belfius),
        BreakerState::Closed
    );
    assert_eq!(metrics().circuit_backlog.get(), backlog_before);
    let counters = env.counters().await;
    assert_eq!(counters["initiations_by_e2e"]["E2E-CB-HELD"], 1);
    assert_eq!(env.arrived(EndpointClass::Initiate), 1);
    assert_eq!(
        status_of(client.clone(), standing_c.bank_payment_id.clone())
            .await
            .unwrap(),
        "CANC"
    );
}

// =============================================================================================
// The worker: an initiation made while the circuit is open is held, then completes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_holds_an_initiation_while_the_circuit_is_open() {
    let _serial = SERIAL.lock().await;
    let env = common::TestEnv::new(|c| c.settle_after = Duration::from_secs(3600)).await;
    let worker = env.start_worker(
        "a",
        &[
            "--poll-fast-ms",
            "200",
            "--poll-fast-count",
            "100000",
            "--bank-retry-max-retries",
            "0",
            "--bank-circuit-window-ms",
            "2000",
            "--bank-circuit-min-calls",
            "3",
            "--bank-circuit-failure-percent",
            "50",
            "--bank-circuit-consecutive-failures",
            "0",
            "--bank-circuit-open-ms",
            "1000",
        ],
    );
    worker.wait_restored(common::PARTITIONS as usize).await;
    let faults = env.sandbox.faults();

    // A payment at the bank, polled every 200 ms.
    env.send(&common::initiate("cb-poll", "psu-p", "5.00", "Shop"))
        .await;
    env.wait_for_state("cb-poll", StateKind::ScaPending).await;

    // The bank's status endpoint fails: the polls open the circuit (then keep probing).
    faults.set(FaultSettings {
        latency: Latency::default(),
        rules: vec![rule(EndpointClass::Status, status(503), None)],
    });
    let started = Instant::now();
    loop {
        faults.reset_traffic();
        tokio::time::sleep(Duration::from_millis(600)).await;
        // Polls arrive every 200 ms while closed; at most one probe per second while open.
        if faults.traffic().arrivals_at(EndpointClass::Status).len() <= 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "circuit never opened"
        );
    }

    // A new payment now: its initiation is held, not attempted and not failed.
    faults.reset_traffic();
    env.send(&common::initiate("cb-held", "psu-h", "6.00", "Shop"))
        .await;
    env.wait_for_state("cb-held", StateKind::Initiating).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        faults.traffic().arrivals_at(EndpointClass::Initiate).len(),
        0,
        "an initiation reached the bank while the circuit was open"
    );
    let events = common::timeline(&env.status_events(), "cb-held");
    assert_eq!(
        common::states(&events),
        vec![StateKind::Received, StateKind::Initiating],
        "{}",
        common::describe(&events)
    );

    // The bank recovers: a probe closes the circuit and the held initiation goes out, once.
    faults.clear();
    let events = env.wait_for_state("cb-held", StateKind::ScaPending).await;
    assert_eq!(
        common::states(&common::timeline(&events, "cb-held")),
        vec![
            StateKind::Received,
            StateKind::Initiating,
            StateKind::ScaPending
        ]
    );
    let counters = env.counters().await;
    assert_eq!(
        faults.traffic().arrivals_at(EndpointClass::Initiate).len(),
        1
    );
    assert_eq!(counters["initiations"], 2);
    drop(worker);
}
