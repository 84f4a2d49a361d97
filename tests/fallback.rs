//! The fallback (contingency) interface: `belfius::fallback::FallbackClient` against the
//! simulator's `sandbox::fallback`, over real HTTPS with mutual TLS, and raw requests for what
//! a well-behaved client never sends (stale dates, tampered digests, wrong keys, bad tokens).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use chrono::Utc;
use pis_worker::belfius::fallback::{DATE_FORMAT, FallbackClient};
use pis_worker::belfius::httpsig::{self, DigestLabel, HttpSigner};
use pis_worker::belfius::{BankError, BelfiusClient, BelfiusConfig};
use pis_worker::domain::model::{
    Amount, BankPaymentId, Brand, Language, PaymentOrder, PaymentProduct,
};
use pis_worker::sandbox::faults::{EndpointClass, Fault, FaultRule, FaultSettings};
use pis_worker::sandbox::{self, RunningSandbox, SandboxConfig};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{Value, json};

const REDIRECT: &str = "https://tpp.example/callback";
const SETTLE: Duration = Duration::from_millis(800);

/// One test PKI (TLS + QSeal) for the file, reused across runs.
fn shared_pki() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fallback-pki");
        sandbox::tls::load_or_create(&dir).unwrap();
        pis_worker::belfius::qseal::ensure_test_qseal(&dir).unwrap();
        dir
    })
}

/// Another QSeal key, not the one registered with the simulator.
fn other_qseal_key() -> SecretString {
    static KEY: OnceLock<String> = OnceLock::new();
    KEY.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fallback-other-qseal");
        let (_, key) = pis_worker::belfius::qseal::ensure_test_qseal(&dir).unwrap();
        std::fs::read_to_string(key).unwrap()
    })
    .clone()
    .into()
}

struct Env {
    sandbox: RunningSandbox,
    bank: BelfiusConfig,
    client: FallbackClient,
    http: reqwest::Client,
}

async fn env_with(adjust: impl FnOnce(&mut SandboxConfig)) -> Env {
    let mut config = SandboxConfig::local(shared_pki());
    config.settle_after = SETTLE;
    adjust(&mut config);
    let sandbox = sandbox::start(config).await.unwrap();
    let bank = sandbox.belfius_config().unwrap();
    let client = FallbackClient::new(&bank, sandbox.fallback_endpoints()).unwrap();
    let tls = &sandbox.tls_dir;
    let mut identity = std::fs::read(tls.join("client.pem")).unwrap();
    identity.extend(std::fs::read(tls.join("client-key.pem")).unwrap());
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(tls.join("ca.pem")).unwrap()).unwrap(),
        )
        .identity(reqwest::Identity::from_pem(&identity).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    Env {
        sandbox,
        bank,
        client,
        http,
    }
}

async fn env() -> Env {
    env_with(|_| {}).await
}

fn order(e2e: &str) -> PaymentOrder {
    PaymentOrder {
        product: PaymentProduct::SepaCreditTransfers,
        brand: Brand::Belfius,
        amount: Amount::from_minor(4200),
        currency: "EUR".into(),
        creditor_name: "ACME NV".into(),
        creditor_iban: "BE71096123456769".into(),
        creditor_bic: Some("GKCCBEBB".into()),
        debtor_iban: None,
        end_to_end_id: e2e.into(),
        remittance_information: Some("fallback".into()),
        requested_execution_date: None,
        language: Language::Fr,
        redirect_uri: REDIRECT.into(),
        cross_border: None,
    }
}

/// A request to the fallback built by hand: every value can be wrong on purpose.
struct Raw {
    method: Method,
    /// Path on the Belfius host.
    path: String,
    body: Vec<u8>,
    date: String,
    digest: String,
    /// Signs `(request-target) date digest` with this key when set.
    signer: Option<HttpSigner>,
    token: Option<String>,
}

impl Raw {
    /// A well-formed signed session request, signed with the registered QSeal key.
    fn session(env: &Env) -> Self {
        let body = br#"{"data":{"type":"sample-token","attributes":{"appReference":"12345"}}}"#;
        Self {
            method: Method::POST,
            path: env.sandbox.fallback_endpoints().session_path,
            body: body.to_vec(),
            date: Utc::now().format(DATE_FORMAT).to_string(),
            digest: httpsig::digest_header(body, DigestLabel::Rfc5843),
            signer: Some(signer(&registered_key(env))),
            token: None,
        }
    }

    /// An unsigned status request under `token`.
    fn status(env: &Env, id: &str, token: &str) -> Self {
        Self {
            method: Method::GET,
            path: format!(
                "{}/sepa-credit-transfers/{id}/status",
                env.sandbox.fallback_endpoints().payments_path
            ),
            body: Vec::new(),
            date: Utc::now().format(DATE_FORMAT).to_string(),
            digest: httpsig::digest_header(b"", DigestLabel::Rfc5843),
            signer: None,
            token: Some(token.to_owned()),
        }
    }

    async fn send(self, env: &Env) -> (StatusCode, Value) {
        let url = env
            .sandbox
            .api_base_url()
            .join(self.path.trim_start_matches('/'))
            .unwrap();
        let request_id = uuid::Uuid::new_v4().to_string();
        let mut request = env
            .http
            .request(self.method.clone(), url.clone())
            .header("request-id", &request_id)
            .header("client-id", env.sandbox.client_id())
            .header("date", &self.date)
            .header("digest", &self.digest);
        if let Some(signer) = &self.signer {
            let signature = signer
                .sign(
                    self.method.as_str(),
                    url.path(),
                    httpsig::FALLBACK_HEADERS,
                    |name| match name {
                        "date" => Some(self.date.clone()),
                        "digest" => Some(self.digest.clone()),
                        _ => None,
                    },
                )
                .unwrap();
            request = request.header("signature", signature.to_header_value());
        }
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if self.method == Method::POST {
            request = request
                .header("content-type", "application/json")
                .body(self.body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        assert_eq!(
            response
                .headers()
                .get("response-id")
                .and_then(|v| v.to_str().ok()),
            Some(request_id.as_str()),
            "Response-ID echoes the Request-Id"
        );
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

fn registered_key(env: &Env) -> SecretString {
    env.bank.qseal.as_ref().unwrap().private_key_pem.clone()
}

fn signer(key: &SecretString) -> HttpSigner {
    HttpSigner::from_pem(key, "test-key").unwrap()
}

fn refusal(result: Result<impl std::fmt::Debug, BankError>) -> (u16, String) {
    match result {
        Err(BankError::Refused { status, body }) => (status, body.error_code),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn session_opens_with_a_valid_signature_and_later_calls_need_only_the_token() {
    let env = env().await;
    let token = env.client.open_session(Brand::Belfius).await.unwrap();
    assert!(!token.expose_secret().is_empty());
    assert_eq!(env.client.sessions_opened(), 1);

    // Later calls are unsigned: the client's initiation reuses the session.
    let initiated = env.client.initiate(&order("E2E-FB-1")).await.unwrap();
    assert_eq!(env.client.sessions_opened(), 1, "no second session");
    assert!(
        initiated
            .sca_redirect_url
            .ends_with(&format!("/sca/{}", initiated.bank_payment_id.as_str())),
        "{}",
        initiated.sca_redirect_url
    );
    assert_eq!(
        env.client
            .status(
                Brand::Belfius,
                PaymentProduct::SepaCreditTransfers,
                &initiated.bank_payment_id
            )
            .await
            .unwrap(),
        "RCVD"
    );

    // By hand: no Signature header, the session token only.
    let id = initiated.bank_payment_id.as_str();
    let (status, body) = Raw::status(&env, id, token.expose_secret())
        .send(&env)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["transaction_status"], "RCVD");

    // A wrong token, no token, and the token on the other brand's host.
    let (status, body) = Raw::status(&env, id, "not-a-session").send(&env).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error_code"], "GEN-1203-100003");
    let mut raw = Raw::status(&env, id, "");
    raw.token = None;
    let (status, body) = raw.send(&env).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error_code"], "GEN-1203-100003");
    assert_eq!(
        refusal(
            env.client
                .status(
                    Brand::Banx,
                    PaymentProduct::SepaCreditTransfers,
                    &initiated.bank_payment_id
                )
                .await
        ),
        (404, "GEN-1202-100002".into()),
        "the Banx host opens its own session and does not know a Belfius payment"
    );
    assert_eq!(env.client.sessions_opened(), 2);

    // A raw signed session request succeeds, also with the portal's "SHA256=" spelling.
    let (status, body) = Raw::session(&env).send(&env).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(body["data"]["attributes"]["token"].is_string(), "{body}");
    let mut portal = Raw::session(&env);
    portal.digest = httpsig::digest_header(&portal.body, DigestLabel::Portal);
    assert!(portal.digest.starts_with("SHA256="));
    let (status, body) = portal.send(&env).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

#[tokio::test]
async fn session_refused_with_a_wrong_key_a_tampered_digest_or_a_stale_date() {
    let env = env().await;

    // The client itself, sealing with a key that is not the registered QSeal.
    let mut other = env.bank.clone();
    if let Some(qseal) = other.qseal.as_mut() {
        qseal.private_key_pem = other_qseal_key();
        qseal.certificate_pem = None;
    }
    let stranger = FallbackClient::new(&other, env.sandbox.fallback_endpoints()).unwrap();
    assert_eq!(
        refusal(stranger.open_session(Brand::Belfius).await),
        (401, "GEN-1203-100008".into())
    );
    assert_eq!(
        refusal(stranger.initiate(&order("E2E-FB-STRANGER")).await),
        (401, "GEN-1203-100008".into()),
        "no session, no payment"
    );

    // By hand, one thing wrong at a time.
    let mut wrong_key = Raw::session(&env);
    wrong_key.signer = Some(signer(&other_qseal_key()));
    let (status, body) = wrong_key.send(&env).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error_code"], "GEN-1203-100008");

    // The body changed after the Digest was computed (the signature over the headers holds).
    let mut tampered = Raw::session(&env);
    tampered.body =
        br#"{"data":{"type":"sample-token","attributes":{"appReference":"99999"}}}"#.to_vec();
    let (status, body) = tampered.send(&env).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error_code"], "GEN-1203-100008");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("Digest"),
        "{body}"
    );

    // Four minutes off, either way, correctly signed.
    for minutes in [-4, 4] {
        let mut stale = Raw::session(&env);
        stale.date = (Utc::now() + chrono::Duration::minutes(minutes))
            .format(DATE_FORMAT)
            .to_string();
        let (status, body) = stale.send(&env).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{minutes}: {body}");
        assert_eq!(body["error_code"], "GEN-1203-100008");
        assert!(
            body["error_description"].as_str().unwrap().contains("Date"),
            "{body}"
        );
    }
    // Two minutes off is within the tolerance.
    let mut skewed = Raw::session(&env);
    skewed.date = (Utc::now() - chrono::Duration::minutes(2))
        .format(DATE_FORMAT)
        .to_string();
    let (status, body) = skewed.send(&env).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    // Another TPP's QWAC (same test CA) naming our Client-ID: refused before any handler.
    let tls = &env.sandbox.tls_dir;
    let mut identity = std::fs::read(env.sandbox.other_client_cert_path()).unwrap();
    identity.extend(std::fs::read(env.sandbox.other_client_key_path()).unwrap());
    let other_tpp = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(tls.join("ca.pem")).unwrap()).unwrap(),
        )
        .identity(reqwest::Identity::from_pem(&identity).unwrap())
        .build()
        .unwrap();
    let session = Raw::session(&env);
    let url = env
        .sandbox
        .api_base_url()
        .join(session.path.trim_start_matches('/'))
        .unwrap();
    let response = other_tpp
        .post(url)
        .header("request-id", uuid::Uuid::new_v4().to_string())
        .header("client-id", env.sandbox.client_id())
        .header("date", &session.date)
        .header("digest", &session.digest)
        .header("content-type", "application/json")
        .body(session.body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error_code"], "GEN-1203-100009", "{body}");

    // No signature at all.
    let mut unsigned = Raw::session(&env);
    unsigned.signer = None;
    let (status, body) = unsigned.send(&env).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error_code"], "GEN-1203-100008");

    let counters = env
        .http
        .get(env.sandbox.admin_base_url().join("admin/counters").unwrap())
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(counters["initiations"], json!(0), "{counters}");
    assert!(
        counters["signatures_failed"]
            .as_u64()
            .is_some_and(|n| n >= 4),
        "{counters}"
    );
}

#[tokio::test]
async fn an_expired_session_is_refused_and_the_client_opens_a_new_one() {
    let env = env_with(|config| config.fallback.session_lifetime = Duration::from_secs(1)).await;
    let token = env.client.open_session(Brand::Belfius).await.unwrap();
    let first = env.client.initiate(&order("E2E-FB-EXP-1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (status, body) = Raw::status(&env, first.bank_payment_id.as_str(), token.expose_secret())
        .send(&env)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error_code"], "GEN-1203-100003");

    // The client meets the same 401, opens a session again and retries once.
    let second = env.client.initiate(&order("E2E-FB-EXP-2")).await.unwrap();
    assert_ne!(second.bank_payment_id, first.bank_payment_id);
    assert_eq!(env.client.sessions_opened(), 2);
}

async fn admin_post(env: &Env, path: &str) -> (StatusCode, Value) {
    let response = env
        .http
        .post(env.sandbox.admin_base_url().join(path).unwrap())
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn fallback_status(env: &Env, id: &BankPaymentId) -> String {
    env.client
        .status(Brand::Belfius, PaymentProduct::SepaCreditTransfers, id)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_payment_goes_through_the_fallback_while_the_dedicated_api_is_down() {
    let env = env().await;
    let dedicated = BelfiusClient::new(env.bank.clone()).unwrap();
    env.sandbox.faults().set(FaultSettings {
        rules: vec![FaultRule {
            endpoint: EndpointClass::Any,
            probability: 1.0,
            fault: Fault::Status {
                status: 503,
                retry_after_secs: None,
            },
            remaining: None,
        }],
        ..FaultSettings::default()
    });
    let pkce = pis_worker::belfius::pkce::Pkce::generate();
    let down = dedicated
        .initiate_payment(&order("E2E-FB-DOWN-1"), &pkce.challenge, None)
        .await
        .unwrap_err();
    assert!(
        matches!(down, BankError::Unavailable { status: 503, .. }),
        "{down:?}"
    );

    let initiated = env.client.initiate(&order("E2E-FB-DOWN-2")).await.unwrap();
    assert_eq!(
        fallback_status(&env, &initiated.bank_payment_id).await,
        "RCVD"
    );

    // The PSU signs it like any other payment.
    let (status, body) = admin_post(&env, "admin/e2e/E2E-FB-DOWN-2/sign").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ACTC");

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = fallback_status(&env, &initiated.bank_payment_id).await;
    while seen != "ACSC" && Instant::now() < deadline {
        assert!(seen == "ACTC", "{seen}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen = fallback_status(&env, &initiated.bank_payment_id).await;
    }
    assert_eq!(seen, "ACSC");

    let counters: Value = env
        .http
        .get(env.sandbox.admin_base_url().join("admin/counters").unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        counters["initiations_by_auth"],
        json!({"pkce": 0, "bearer": 0, "fallback_session": 1}),
        "{counters}"
    );

    // The dedicated API was refused all along, and sees the same payment once it is back.
    let counters = env.sandbox.faults().counters();
    assert!(
        counters["by_fault"]["status_503"]["initiate"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "{counters}"
    );
    env.sandbox.faults().clear();
    assert_eq!(
        dedicated
            .payment_status(
                pis_worker::domain::model::PaymentKind::Single,
                Brand::Belfius,
                PaymentProduct::SepaCreditTransfers,
                &initiated.bank_payment_id,
            )
            .await
            .unwrap(),
        "ACSC"
    );
}

/// A fallback host whose every answer is 503, recording the paths it was asked for.
async fn failing_fallback_host() -> (url::Url, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let record = record.clone();
        async move {
            record.lock().unwrap().push(uri.path().to_owned());
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url::Url::parse(&format!("http://{addr}/")).unwrap(), seen)
}

/// An initiation whose session could not be opened was never sent: `NotSent` (retried by the
/// machine), not an unanswered initiation (outcome unknown, a person to resolve it).
#[tokio::test]
async fn a_session_that_cannot_be_opened_leaves_the_call_unsent() {
    let env = env().await;
    let (base, seen) = failing_fallback_host().await;
    let mut endpoints = env.sandbox.fallback_endpoints();
    endpoints.belfius_base_url = base.clone();
    endpoints.banx_base_url = base;
    let client = FallbackClient::new(&env.bank, endpoints.clone()).unwrap();

    let error = client
        .initiate(&order("E2E-FB-NOSESSION"))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, BankError::NotSent(m) if m.contains("no fallback session")),
        "{error:?}"
    );
    assert!(matches!(
        pis_worker::engine::bank::classify_initiation_error(&error),
        pis_worker::domain::machine::InitiationFailure::NotProcessed { .. }
    ));
    let error = client
        .status(
            Brand::Belfius,
            PaymentProduct::SepaCreditTransfers,
            &BankPaymentId::new("p1"),
        )
        .await
        .unwrap_err();
    assert!(matches!(error, BankError::NotSent(_)), "{error:?}");
    // Only sessions were asked for: the payment request never left.
    assert_eq!(
        *seen.lock().unwrap(),
        vec![endpoints.session_path.clone(), endpoints.session_path]
    );
    // The session answer itself keeps its meaning.
    assert!(matches!(
        client.open_session(Brand::Belfius).await,
        Err(BankError::Unavailable { status: 503, .. })
    ));
}
