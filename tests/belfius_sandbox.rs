//! Contract tests: the Belfius client against the sandbox simulator, over real HTTPS with mutual
//! TLS, both in this process. Every endpoint, every documented error code the simulator can
//! produce (with its typed `BelfiusErrorCode`), token rotation, brand hosts, QSeal signatures
//! and injected faults.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use chrono::{Datelike as _, NaiveDate};
use pis_worker::belfius::client::portal::{ConsentRequest, ConsentScope, TransactionQuery};
use pis_worker::belfius::client::{Cancelled, accept_header};
use pis_worker::belfius::errors::BelfiusErrorCode as E;
use pis_worker::belfius::pkce::Pkce;
use pis_worker::belfius::qseal::QsealSigner;
use pis_worker::belfius::status::TransactionStatus;
use pis_worker::belfius::{
    BankError, BelfiusClient, BelfiusConfig, ErrorBody, GuardConfig, Initiated, QsealConfig,
    QwacIdentity, SignatureEncoding, TokenPair,
};
use pis_worker::domain::bank::BankProgress;
use pis_worker::domain::model::{
    Amount, BankPaymentId, Brand, BulkEntry, BulkOrder, ChargeBearer, CrossBorder, Frequency,
    Language, MAX_BULK_ENTRIES, PaymentKind, PaymentOrder, PaymentProduct, PostalAddress,
    StandingOrder,
};
use pis_worker::sandbox::faults::{EndpointClass, Fault, FaultRule, FaultSettings, Latency};
use pis_worker::sandbox::{self, RunningSandbox, SandboxConfig};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{Value, json};
use tempfile::TempDir;

const REDIRECT: &str = "https://tpp.example/callback";
/// Long enough that a status read right after signing still sees ACTC on a loaded machine.
const SETTLE: Duration = Duration::from_millis(800);
/// A Belfius-brand debtor account (bank code 096, one of Belfius' codes).
const BELFIUS_DEBTOR: &str = "BE71096123456769";
/// A Banx-brand debtor account (bank code 977, the simulator's default Banx code).
const BANX_DEBTOR: &str = "BE76977123456795";

/// One test PKI (TLS + QSeal) for the whole file: generating RSA keys per test would dominate
/// the run time. It lives in cargo's per-target temporary directory and is reused across runs.
fn shared_pki() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("belfius-sandbox-pki");
        sandbox::tls::load_or_create(&dir).unwrap();
        // Absent until the QSeal implementation exists; the sandbox then runs unsigned.
        if let Err(e) = pis_worker::belfius::qseal::ensure_test_qseal(&dir) {
            eprintln!("no test QSeal: {e}");
        }
        dir
    })
}

/// A second QSeal key pair, for "signed with the wrong key".
fn other_qseal() -> (PathBuf, PathBuf) {
    static FILES: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    FILES
        .get_or_init(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("belfius-other-qseal");
            pis_worker::belfius::qseal::ensure_test_qseal(&dir).unwrap()
        })
        .clone()
}

struct Env {
    sandbox: RunningSandbox,
    client: BelfiusClient,
    admin: reqwest::Client,
}

async fn env_with(adjust: impl FnOnce(&mut SandboxConfig)) -> Env {
    let mut config = SandboxConfig::local(shared_pki());
    config.settle_after = SETTLE;
    adjust(&mut config);
    let sandbox = sandbox::start(config).await.unwrap();
    let client = BelfiusClient::new(sandbox.belfius_config().unwrap()).unwrap();
    Env {
        sandbox,
        client,
        admin: reqwest::Client::new(),
    }
}

async fn env() -> Env {
    env_with(|_| {}).await
}

fn today() -> NaiveDate {
    chrono::Utc::now().date_naive()
}

fn order(e2e: &str) -> PaymentOrder {
    PaymentOrder {
        product: PaymentProduct::SepaCreditTransfers,
        brand: Brand::Belfius,
        amount: Amount::from_minor(1234),
        currency: "EUR".into(),
        creditor_name: "ACME NV".into(),
        creditor_iban: "BE71096123456769".into(),
        creditor_bic: Some("GKCCBEBB".into()),
        debtor_iban: None,
        end_to_end_id: e2e.into(),
        remittance_information: Some("invoice 42".into()),
        requested_execution_date: None,
        language: Language::Nl,
        redirect_uri: REDIRECT.into(),
        cross_border: None,
    }
}

/// A cross-border transfer in dollars to a US account number with an ABA routing number.
fn cross_border_order(e2e: &str) -> PaymentOrder {
    PaymentOrder {
        product: PaymentProduct::CrossBorderCreditTransfers,
        currency: "USD".into(),
        creditor_name: "Acme Inc".into(),
        creditor_iban: String::new(),
        creditor_bic: None,
        cross_border: Some(Box::new(CrossBorder {
            charge_bearer: ChargeBearer::Shar,
            creditor_address: Some(PostalAddress {
                street: Some("5th Avenue".into()),
                building_number: Some("1".into()),
                postal_code: Some("10001".into()),
                town: Some("New York".into()),
                country: "US".into(),
            }),
            creditor_bban: Some("123456789".into()),
            creditor_bank_national_id: Some("021000021".into()),
            creditor_currency: Some("USD".into()),
        })),
        ..order(e2e)
    }
}

fn standing(e2e: &str) -> StandingOrder {
    let start = today() + chrono::Days::new(7);
    StandingOrder {
        order: order(e2e),
        start_date: start,
        end_date: None,
        frequency: Frequency::Monthly,
        day_of_execution: Some(u8::try_from(start.day()).unwrap()),
    }
}

fn entry(e2e: &str) -> BulkEntry {
    BulkEntry {
        amount: Amount::from_minor(250),
        currency: "EUR".into(),
        creditor_name: "Supplier BV".into(),
        creditor_iban: "BE71096123456769".into(),
        creditor_bic: None,
        end_to_end_id: e2e.into(),
        remittance_information: Some("batch".into()),
    }
}

fn bulk(entries: Vec<BulkEntry>) -> BulkOrder {
    BulkOrder {
        product: PaymentProduct::SepaCreditTransfers,
        brand: Brand::Belfius,
        debtor_iban: Some(BELFIUS_DEBTOR.into()),
        batch_booking: true,
        requested_execution_date: None,
        payments: entries,
        language: Language::Fr,
        redirect_uri: REDIRECT.into(),
    }
}

fn challenge() -> String {
    Pkce::generate().challenge
}

impl Env {
    async fn admin_get(&self, path: &str) -> (StatusCode, Value) {
        let url = self.sandbox.admin_base_url().join(path).unwrap();
        let response = self.admin.get(url).send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    async fn admin_post(&self, path: &str) -> (StatusCode, Value) {
        self.admin_post_json(path, None).await
    }

    async fn admin_post_json(&self, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let url = self.sandbox.admin_base_url().join(path).unwrap();
        let mut request = self.admin.post(url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    async fn counters(&self) -> Value {
        self.admin_get("admin/counters").await.1
    }

    async fn status_of(
        &self,
        kind: PaymentKind,
        product: PaymentProduct,
        id: &BankPaymentId,
    ) -> String {
        self.client
            .payment_status(kind, Brand::Belfius, product, id)
            .await
            .unwrap()
    }

    async fn status(&self, id: &BankPaymentId) -> String {
        self.status_of(PaymentKind::Single, PaymentProduct::SepaCreditTransfers, id)
            .await
    }

    /// The PSU `psu` signs; returns the redirect URL the browser would follow.
    async fn sign_as(&self, e2e: &str, psu: &str) -> url::Url {
        let (status, body) = self
            .admin_post(&format!("admin/e2e/{e2e}/sign?psu={psu}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "ACTC");
        url::Url::parse(body["redirect_url"].as_str().unwrap()).unwrap()
    }

    async fn sign(&self, e2e: &str) -> url::Url {
        self.sign_as(e2e, "psu-default").await
    }

    /// A single SEPA payment initiated with PKCE, signed by `psu`, and the PSU's token pair.
    async fn signed_with_tokens(&self, e2e: &str, psu: &str) -> (Initiated, TokenPair) {
        let pkce = Pkce::generate();
        let initiated = self
            .client
            .initiate_payment(&order(e2e), &pkce.challenge, None)
            .await
            .unwrap();
        let code = SecretString::from(query(&self.sign_as(e2e, psu).await, "code").unwrap());
        let tokens = self
            .client
            .exchange_code(Brand::Belfius, &code, &pkce.verifier, REDIRECT)
            .await
            .unwrap();
        (initiated, tokens)
    }

    /// A raw HTTPS client presenting the sandbox's client certificate.
    fn raw(&self) -> reqwest::Client {
        let tls = &self.sandbox.tls_dir;
        let ca = std::fs::read(tls.join("ca.pem")).unwrap();
        let mut identity = std::fs::read(tls.join("client.pem")).unwrap();
        identity.extend(std::fs::read(tls.join("client-key.pem")).unwrap());
        reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .identity(reqwest::Identity::from_pem(&identity).unwrap())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }

    /// The headers of a well-formed initiation; tests break one thing at a time.
    fn initiation_headers(&self, request_id: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let mut set = |name: &'static str, value: &str| {
            headers.insert(name, HeaderValue::from_str(value).unwrap());
        };
        set("request-id", request_id);
        set("accept", &accept_header("3"));
        set("accept-language", "fr");
        set("client-id", self.sandbox.client_id());
        set("redirect-uri", REDIRECT);
        set("code-challenge", &challenge());
        set("code-challenge-method", "S256");
        set("content-type", "application/json");
        headers
    }

    /// The QSeal `Signature` a well-behaved TPP sends with `body` (the sandbox verifies it).
    fn seal(&self, body: &[u8]) -> String {
        let config = self.sandbox.belfius_config().unwrap();
        QsealSigner::new(config.qseal.as_ref().unwrap())
            .unwrap()
            .sign(body)
            .unwrap()
    }

    /// Signed with the test QSeal unless `headers` already carry a `Signature`.
    async fn raw_initiation_at(
        &self,
        path: &str,
        mut headers: HeaderMap,
        body: &Value,
    ) -> reqwest::Response {
        let url = self.sandbox.api_base_url().join(path).unwrap();
        let bytes = serde_json::to_vec(body).unwrap();
        if !headers.contains_key("signature") {
            let signature = self.seal(&bytes);
            headers.insert("signature", HeaderValue::from_str(&signature).unwrap());
        }
        self.raw()
            .post(url)
            .headers(headers)
            .body(bytes)
            .send()
            .await
            .unwrap()
    }

    async fn raw_initiation(&self, headers: HeaderMap, body: &Value) -> reqwest::Response {
        self.raw_initiation_at("payments/sepa-credit-transfers", headers, body)
            .await
    }

    /// Status and `(error, error_code)` of an initiation answer.
    async fn raw_error(&self, headers: HeaderMap, body: &Value) -> (StatusCode, String, String) {
        let response = self.raw_initiation(headers, body).await;
        error_triple(response).await
    }
}

async fn error_triple(response: reqwest::Response) -> (StatusCode, String, String) {
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    (
        status,
        body["error"].as_str().unwrap().to_owned(),
        body["error_code"].as_str().unwrap().to_owned(),
    )
}

fn valid_body(e2e: &str) -> Value {
    json!({
        "creditor_account": {"iban": "BE71096123456769"},
        "creditor_name": "ACME NV",
        "endtoend_identification": e2e,
        "instructed_amount": {"amount": "10.00", "currency": "EUR"}
    })
}

fn query(url: &url::Url, key: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

fn refused(result: Result<impl std::fmt::Debug, BankError>) -> (u16, ErrorBody) {
    match result {
        Err(BankError::Refused { status, body }) => (status, body),
        other => panic!("expected Refused, got {other:?}"),
    }
}

/// HTTP status, error_code and the typed code of a refusal.
fn refused_code(result: Result<impl std::fmt::Debug, BankError>) -> (u16, String, E) {
    match result {
        Err(error @ BankError::Refused { .. }) => {
            let code = error.code().unwrap();
            let BankError::Refused { status, body } = error else {
                unreachable!()
            };
            (status, body.error_code, code)
        }
        other => panic!("expected Refused, got {other:?}"),
    }
}

// =============================================================================================
// Single payments: the three products.

#[tokio::test]
async fn initiation_returns_bank_id_sca_url_and_rcvd() {
    let env = env().await;
    let initiated = env
        .client
        .initiate_payment(&order("E2E-INIT"), &challenge(), None)
        .await
        .unwrap();

    let id = initiated.bank_payment_id.as_str();
    assert_eq!(id.len(), 32, "{id}");
    assert_eq!(
        initiated.sca_redirect_url,
        format!("{}sca/{id}", env.sandbox.admin_base_url())
    );
    assert_eq!(initiated.bank_status.as_deref(), Some("RCVD"));
    assert_eq!(env.status(&initiated.bank_payment_id).await, "RCVD");
    assert_eq!(
        TransactionStatus::parse("RCVD").map(TransactionStatus::progress),
        Some(BankProgress::AwaitingSca)
    );

    // What the bank stored is what the client sent.
    let (status, view) = env.admin_get(&format!("admin/payments/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["endtoend_identification"], "E2E-INIT");
    assert_eq!(view["amount"], "12.34");
    assert_eq!(view["creditor_name"], "ACME NV");
    assert_eq!(view["redirect_uri"], REDIRECT);
    assert_eq!(view["pkce"], true);
    assert_eq!(view["debtor_iban"], Value::Null);
    assert_eq!(view["brand"], "BELFIUS");
    assert_eq!(view["payment_kind"], "payments");

    // The SCA page exists and names the payment.
    let page = env
        .admin
        .get(&initiated.sca_redirect_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("E2E-INIT"), "{page}");

    // The page's "Sign" button sends the browser back to the TPP with a code.
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = browser
        .post(format!("{}/sign", initiated.sca_redirect_url))
        .form(&[("psu", "alice")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let location = url::Url::parse(response.headers()["location"].to_str().unwrap()).unwrap();
    assert!(location.as_str().starts_with(REDIRECT), "{location}");
    assert!(query(&location, "code").is_some());
    assert_eq!(env.status(&initiated.bank_payment_id).await, "ACTC");
    let (_, view) = env.admin_get(&format!("admin/payments/{id}")).await;
    assert_eq!(view["psu"], "alice");
}

#[tokio::test]
async fn every_product_initiates_and_reports_status_on_its_own_path() {
    let env = env().await;
    let mut instant = order("E2E-INST");
    instant.product = PaymentProduct::InstantSepaCreditTransfers;
    let cases = [order("E2E-SCT"), instant, cross_border_order("E2E-XB")];
    for o in &cases {
        let initiated = env
            .client
            .initiate_payment(o, &challenge(), None)
            .await
            .unwrap();
        let id = &initiated.bank_payment_id;
        assert_eq!(
            env.status_of(PaymentKind::Single, o.product, id).await,
            "RCVD"
        );
        // The status endpoint is per product, and per kind.
        for other in PaymentProduct::ALL.into_iter().filter(|p| *p != o.product) {
            let (status, _) = refused(
                env.client
                    .payment_status(PaymentKind::Single, Brand::Belfius, other, id)
                    .await,
            );
            assert_eq!(status, 404, "{other:?}");
        }
        let (status, _) = refused(
            env.client
                .payment_status(PaymentKind::Periodic, Brand::Belfius, o.product, id)
                .await,
        );
        assert_eq!(status, 404);
    }
    // What the simulator received for the cross-border transfer: the cross-border fields.
    let (_, list) = env.admin_get("admin/payments").await;
    let xb = &list.as_array().unwrap()[2];
    assert_eq!(xb["payment_product"], "cross-border-credit-transfers");
    assert_eq!(xb["creditor_iban"], "123456789");
    assert_eq!(xb["currency"], "USD");
    assert_eq!(env.counters().await["initiations"], 3);
}

#[tokio::test]
async fn cross_border_rules_and_their_codes() {
    let env = env().await;
    let c = challenge();

    // [P] charge_bearer is required for cross-border.
    let mut no_bearer = cross_border_order("E2E-XB1");
    no_bearer.cross_border = None;
    no_bearer.creditor_iban = "GB29NWBK60161331926819".into();
    let (status, code, typed) =
        refused_code(env.client.initiate_payment(&no_bearer, &c, None).await);
    assert_eq!((status, code.as_str()), (400, "GEN-1201-100002"));
    assert_eq!(typed, E::MissingInput);

    // BBAN together with a BIC.
    let mut bban_bic = cross_border_order("E2E-XB2");
    bban_bic.creditor_bic = Some("CHASUS33".into());
    let (_, code, typed) = refused_code(env.client.initiate_payment(&bban_bic, &c, None).await);
    assert_eq!(
        (code.as_str(), typed),
        ("B14821ZZ-1236-000000", E::BbanWithBic)
    );

    // A US account without BIC nor bank national id.
    let mut no_bank = cross_border_order("E2E-XB3");
    if let Some(x) = no_bank.cross_border.as_mut() {
        x.creditor_bank_national_id = None;
    }
    let (_, code, typed) = refused_code(env.client.initiate_payment(&no_bank, &c, None).await);
    assert_eq!(
        (code.as_str(), typed),
        ("B14821ZZ-2102-000000", E::BicInvalidOrMissing)
    );

    // A beneficiary in a denied country (the IBAN's country counts).
    let mut denied = cross_border_order("E2E-XB4");
    denied.creditor_iban = "IR30062960000000100324200001".into();
    if let Some(x) = denied.cross_border.as_mut() {
        x.creditor_bban = None;
        x.creditor_address = None;
    }
    let (_, code, typed) = refused_code(env.client.initiate_payment(&denied, &c, None).await);
    assert_eq!(
        (code.as_str(), typed),
        ("B14821ZZ-1227-000000", E::CountryNotAllowed)
    );

    // Control: the full cross-border order passes.
    env.client
        .initiate_payment(&cross_border_order("E2E-XB5"), &c, None)
        .await
        .unwrap();
    let counters = env.counters().await;
    assert_eq!(counters["initiations"], 1);
    assert_eq!(counters["initiation_requests"], 5);
}

#[tokio::test]
async fn sepa_products_refuse_cross_border_fields() {
    let env = env().await;
    let fresh = || uuid::Uuid::new_v4().to_string();
    let invalid = (
        StatusCode::BAD_REQUEST,
        "INVALID_INPUT".to_owned(),
        "GEN-1202-100002".to_owned(),
    );
    for product in ["sepa-credit-transfers", "instant-sepa-credit-transfers"] {
        let path = format!("payments/{product}");
        let mut with_bearer = valid_body("E2E-S1");
        with_bearer["charge_bearer"] = json!("SHAR");
        let mut with_address = valid_body("E2E-S2");
        with_address["creditor_address"] = json!({"country": "BE"});
        let mut with_bban = valid_body("E2E-S3");
        with_bban["creditor_account"]["bankNationalID"] = json!("123");
        for body in [with_bearer, with_address, with_bban] {
            let response = env
                .raw_initiation_at(&path, env.initiation_headers(&fresh()), &body)
                .await;
            assert_eq!(error_triple(response).await, invalid, "{product} {body}");
        }
    }
    assert_eq!(env.counters().await["initiations"], 0);
}

#[tokio::test]
async fn zero_amount_and_foreign_currency_are_refused_by_code() {
    let env = env().await;
    let mut zero = order("E2E-ZERO");
    zero.amount = Amount::from_minor(0);
    let (status, code, typed) =
        refused_code(env.client.initiate_payment(&zero, &challenge(), None).await);
    assert_eq!(status, 400);
    assert_eq!(
        (code.as_str(), typed),
        ("B14821ZZ-1231-000000", E::AmountNotPositive)
    );

    let mut dollars = order("E2E-USD");
    dollars.currency = "USD".into();
    let (_, code, typed) = refused_code(
        env.client
            .initiate_payment(&dollars, &challenge(), None)
            .await,
    );
    assert_eq!(
        (code.as_str(), typed),
        ("B14821ZZ-1232-000000", E::CurrencyNotAllowed)
    );
    let mut instant = dollars.clone();
    instant.product = PaymentProduct::InstantSepaCreditTransfers;
    let (_, code, _) = refused_code(
        env.client
            .initiate_payment(&instant, &challenge(), None)
            .await,
    );
    assert_eq!(code, "B14821ZZ-1232-000000");
    assert_eq!(env.counters().await["initiations"], 0);
}

// =============================================================================================
// Tokens.

#[tokio::test]
async fn sign_settle_and_token_exchange_rules() {
    let env = env().await;
    let pkce = Pkce::generate();
    let initiated = env
        .client
        .initiate_payment(&order("E2E-SIGN"), &pkce.challenge, None)
        .await
        .unwrap();
    let id = initiated.bank_payment_id.clone();

    let redirect = env.sign("E2E-SIGN").await;
    assert!(redirect.as_str().starts_with(&format!("{REDIRECT}?code=")));
    // The PSU came without a state: the bank invents none.
    assert_eq!(query(&redirect, "state"), None);
    let code = SecretString::from(query(&redirect, "code").unwrap());

    assert_eq!(env.status(&id).await, "ACTC");
    tokio::time::sleep(SETTLE + Duration::from_millis(100)).await;
    assert_eq!(env.status(&id).await, "ACSC");

    // Wrong verifier, wrong redirect_uri: refused, and the code survives those attempts.
    let wrong = SecretString::from(Pkce::generate().verifier.expose_secret().to_owned());
    let (status, body) = refused(
        env.client
            .exchange_code(Brand::Belfius, &code, &wrong, REDIRECT)
            .await,
    );
    assert_eq!((status, body.error_code.as_str()), (400, "GEN-1202-100002"));
    assert!(body.error_description.contains("code_verifier"), "{body:?}");

    let (status, body) = refused(
        env.client
            .exchange_code(
                Brand::Belfius,
                &code,
                &pkce.verifier,
                "https://evil.example/cb",
            )
            .await,
    );
    assert_eq!((status, body.error.as_str()), (400, "INVALID_INPUT"));
    assert!(body.error_description.contains("redirect_uri"), "{body:?}");

    let tokens = env
        .client
        .exchange_code(Brand::Belfius, &code, &pkce.verifier, REDIRECT)
        .await
        .unwrap();
    assert_eq!(tokens.scope.as_deref(), Some("PIS"));
    assert_eq!(tokens.expires_in, Some(Duration::from_secs(900)));
    assert!(tokens.access_token.expose_secret().len() >= 43);
    assert!(tokens.refresh_token.is_some());
    // Debug output never shows the tokens.
    assert!(!format!("{tokens:?}").contains(tokens.access_token.expose_secret()));

    // Single use.
    let (status, body) = refused(
        env.client
            .exchange_code(Brand::Belfius, &code, &pkce.verifier, REDIRECT)
            .await,
    );
    assert_eq!(status, 400);
    assert!(body.error_description.contains("already used"), "{body:?}");
    // And the replay revokes the pair the code granted (RFC 6749 §4.1.2): someone else may
    // hold the code.
    let (status, code, _) = refused_code(
        env.client
            .payment_details(
                PaymentKind::Single,
                Brand::Belfius,
                PaymentProduct::SepaCreditTransfers,
                &id,
                &tokens.access_token,
            )
            .await,
    );
    assert_eq!((status, code.as_str()), (401, "GEN-1203-100003"));
    let (status, code, _) = refused_code(
        env.client
            .refresh_token(Brand::Belfius, tokens.refresh_token.as_ref().unwrap())
            .await,
    );
    assert_eq!((status, code.as_str()), (401, "GEN-1203-100004"));

    let counters = env.counters().await;
    assert_eq!(counters["tokens_issued"], 1);
    assert_eq!(counters["token_failures"], 4);
}

#[tokio::test]
async fn token_rotation_one_pair_per_psu() {
    let env = env().await;
    let (_, tokens) = env.signed_with_tokens("E2E-T1", "alice").await;

    // Second payment with the token: accepted without PKCE, and no code comes back.
    env.client
        .initiate_payment(&order("E2E-T2"), "", Some(&tokens.access_token))
        .await
        .unwrap();
    let redirect = env.sign_as("E2E-T2", "alice").await;
    // Neither a code (token initiation) nor a state (none given): the bare Redirect-URI.
    assert_eq!(redirect.as_str(), REDIRECT);
    // The bank counts how each initiation was authorised.
    let by_auth = &env.counters().await["initiations_by_auth"];
    assert_eq!(
        (&by_auth["pkce"], &by_auth["bearer"]),
        (&json!(1), &json!(1)),
        "{by_auth}"
    );

    let refresh = tokens.refresh_token.clone().unwrap();
    let rotated = env
        .client
        .refresh_token(Brand::Belfius, &refresh)
        .await
        .unwrap();
    assert_ne!(
        rotated.access_token.expose_secret(),
        tokens.access_token.expose_secret()
    );
    // One pair per PSU: the old access token is dead everywhere, and its use is counted.
    let (status, code, typed) = refused_code(
        env.client
            .initiate_payment(&order("E2E-T3"), "", Some(&tokens.access_token))
            .await,
    );
    assert_eq!((status, code.as_str()), (401, "GEN-1203-100003"));
    assert_eq!(typed, E::InvalidAccessToken);
    assert_eq!(env.counters().await["invalidated_token_uses"], 1);
    // The old refresh token too.
    let (status, code, typed) =
        refused_code(env.client.refresh_token(Brand::Belfius, &refresh).await);
    assert_eq!((status, code.as_str()), (401, "GEN-1203-100004"));
    assert_eq!(typed, E::InvalidRefreshToken);

    // Another PSU's pair does not disturb alice's.
    let (_, bob) = env.signed_with_tokens("E2E-T4", "bob").await;
    env.client
        .initiate_payment(&order("E2E-T5"), "", Some(&rotated.access_token))
        .await
        .unwrap();
    // A new code exchange for alice replaces her rotated pair.
    let (_, again) = env.signed_with_tokens("E2E-T6", "alice").await;
    let (status, _) = refused(
        env.client
            .initiate_payment(&order("E2E-T7"), "", Some(&rotated.access_token))
            .await,
    );
    assert_eq!(status, 401);
    for live in [&bob, &again] {
        env.client
            .initiate_payment(&order("E2E-T8"), "", Some(&live.access_token))
            .await
            .unwrap();
    }

    let counters = env.counters().await;
    // E2E-T1, T4, T6 with PKCE; T2, T5 and both T8 with a token (refused ones not counted).
    assert_eq!(counters["initiations_by_auth"]["pkce"], 3, "{counters}");
    assert_eq!(counters["initiations_by_auth"]["bearer"], 4, "{counters}");
    assert_eq!(counters["refreshes"], 1);
    assert_eq!(counters["tokens_issued"], 4);
    assert_eq!(counters["invalidated_token_uses"], 3);
}

#[tokio::test]
async fn expired_access_token_is_refused() {
    let env = env_with(|c| c.access_token_lifetime = Duration::from_millis(1000)).await;
    let (initiated, tokens) = env.signed_with_tokens("E2E-EXP", "alice").await;
    env.client
        .payment_details(
            PaymentKind::Single,
            Brand::Belfius,
            PaymentProduct::SepaCreditTransfers,
            &initiated.bank_payment_id,
            &tokens.access_token,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, code, _) = refused_code(
        env.client
            .payment_details(
                PaymentKind::Single,
                Brand::Belfius,
                PaymentProduct::SepaCreditTransfers,
                &initiated.bank_payment_id,
                &tokens.access_token,
            )
            .await,
    );
    assert_eq!((status, code.as_str()), (401, "GEN-1203-100003"));
    // Expired is not "replaced": not counted as such. A refresh still works.
    assert_eq!(env.counters().await["invalidated_token_uses"], 0);
    env.client
        .refresh_token(Brand::Belfius, tokens.refresh_token.as_ref().unwrap())
        .await
        .unwrap();
}

#[tokio::test]
async fn wrong_client_secret_is_refused_at_token() {
    let env = env().await;
    let pkce = Pkce::generate();
    env.client
        .initiate_payment(&order("E2E-SECRET"), &pkce.challenge, None)
        .await
        .unwrap();
    let code = SecretString::from(query(&env.sign("E2E-SECRET").await, "code").unwrap());
    let mut config = env.sandbox.belfius_config().unwrap();
    config.client_secret = SecretString::from("not-the-secret");
    let impostor = BelfiusClient::new(config).unwrap();
    let (status, code_str, typed) = refused_code(
        impostor
            .exchange_code(Brand::Belfius, &code, &pkce.verifier, REDIRECT)
            .await,
    );
    assert_eq!((status, code_str.as_str()), (401, "GEN-1203-100009"));
    assert_eq!(typed, E::InvalidClientId);
    // The code was not burnt by the impostor.
    env.client
        .exchange_code(Brand::Belfius, &code, &pkce.verifier, REDIRECT)
        .await
        .unwrap();
}

// =============================================================================================
// Details and cancellation.

#[tokio::test]
async fn details_need_the_token_of_the_payments_psu() {
    let env = env().await;
    let (initiated, alice) = env.signed_with_tokens("E2E-DET", "alice").await;
    let id = &initiated.bank_payment_id;
    let details = |token: SecretString| {
        let client = env.client.clone();
        let id = id.clone();
        async move {
            client
                .payment_details(
                    PaymentKind::Single,
                    Brand::Belfius,
                    PaymentProduct::SepaCreditTransfers,
                    &id,
                    &token,
                )
                .await
        }
    };
    let body = details(alice.access_token.clone()).await.unwrap();
    assert_eq!(body["payment_id"], id.as_str());
    assert_eq!(body["transaction_status"], "ACTC");
    assert_eq!(body["endtoend_identification"], "E2E-DET");
    assert_eq!(body["instructed_amount"]["amount"], "12.34");
    assert_eq!(body["creditor_account"]["bic"], "GKCCBEBB");

    // Another PSU's valid token, and a made-up token: both 401 GEN-1203-100003.
    let (_, bob) = env.signed_with_tokens("E2E-DET2", "bob").await;
    for token in [bob.access_token.clone(), SecretString::from("made-up")] {
        let (status, code, typed) = refused_code(details(token).await);
        assert_eq!(
            (status, code.as_str(), typed),
            (401, "GEN-1203-100003", E::InvalidAccessToken)
        );
    }
    // Unknown id with a valid token: 404.
    let (status, _) = refused(
        env.client
            .payment_details(
                PaymentKind::Single,
                Brand::Belfius,
                PaymentProduct::SepaCreditTransfers,
                &BankPaymentId::new("nope"),
                &alice.access_token,
            )
            .await,
    );
    assert_eq!(status, 404);
    assert_eq!(env.counters().await["details_requests"], 4);
}

#[tokio::test]
async fn cancellation_allowed_and_refused() {
    let env = env().await;
    let (signed, tokens) = env.signed_with_tokens("E2E-C1", "alice").await;
    let cancel = |id: BankPaymentId, kind: PaymentKind| {
        let client = env.client.clone();
        let token = tokens.access_token.clone();
        async move {
            client
                .cancel_payment(
                    kind,
                    Brand::Belfius,
                    PaymentProduct::SepaCreditTransfers,
                    &id,
                    &token,
                )
                .await
        }
    };

    // Signed for execution today: too late.
    let (status, code, typed) =
        refused_code(cancel(signed.bank_payment_id.clone(), PaymentKind::Single).await);
    assert_eq!(
        (status, code.as_str(), typed),
        (409, "B14821ZZ-9000-000000", E::CancellationNotAllowed)
    );

    // Not signed yet (initiated with the token, so it is alice's): cancellable, 204.
    let unsigned = env
        .client
        .initiate_payment(&order("E2E-C2"), "", Some(&tokens.access_token))
        .await
        .unwrap();
    let cancelled = cancel(unsigned.bank_payment_id.clone(), PaymentKind::Single)
        .await
        .unwrap();
    assert_eq!(
        cancelled,
        Cancelled {
            transaction_status: None
        }
    );
    assert_eq!(env.status(&unsigned.bank_payment_id).await, "CANC");
    assert_eq!(
        TransactionStatus::parse("CANC").map(TransactionStatus::progress),
        Some(BankProgress::Cancelled)
    );

    // Signed but dated tomorrow: still cancellable; this time the bank answers 202 + body.
    let (status, _) = env
        .admin_post_json("admin/config", Some(json!({"cancel_status": 202})))
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut dated = order("E2E-C3");
    dated.requested_execution_date = Some(today() + chrono::Days::new(1));
    let dated = env
        .client
        .initiate_payment(&dated, "", Some(&tokens.access_token))
        .await
        .unwrap();
    env.sign_as("E2E-C3", "alice").await;
    tokio::time::sleep(SETTLE + Duration::from_millis(100)).await;
    assert_eq!(env.status(&dated.bank_payment_id).await, "ACTC");
    let cancelled = cancel(dated.bank_payment_id.clone(), PaymentKind::Single)
        .await
        .unwrap();
    assert_eq!(cancelled.transaction_status.as_deref(), Some("CANC"));
    // And 200 + body is read the same way.
    env.admin_post_json("admin/config", Some(json!({"cancel_status": 200})))
        .await;
    let another = env
        .client
        .initiate_payment(&order("E2E-C4"), "", Some(&tokens.access_token))
        .await
        .unwrap();
    let cancelled = cancel(another.bank_payment_id.clone(), PaymentKind::Single)
        .await
        .unwrap();
    assert_eq!(cancelled.transaction_status.as_deref(), Some("CANC"));

    // Cancelled is final: a second cancellation is refused.
    let (status, _, _) =
        refused_code(cancel(unsigned.bank_payment_id.clone(), PaymentKind::Single).await);
    assert_eq!(status, 409);
    // No token: 401.
    let no_token = env
        .client
        .cancel_payment(
            PaymentKind::Single,
            Brand::Belfius,
            PaymentProduct::SepaCreditTransfers,
            &another.bank_payment_id,
            &SecretString::from(""),
        )
        .await;
    assert_eq!(refused(no_token).0, 401);
    let counters = env.counters().await;
    assert_eq!(counters["cancellations"], 3);
    assert_eq!(counters["cancel_requests"], 6);
}

// =============================================================================================
// Standing orders.

#[tokio::test]
async fn standing_order_initiate_status_details_cancel() {
    let env = env().await;
    let pkce = Pkce::generate();
    let initiated = env
        .client
        .initiate_periodic(&standing("E2E-SO"), &pkce.challenge, None)
        .await
        .unwrap();
    let id = &initiated.bank_payment_id;
    let product = PaymentProduct::SepaCreditTransfers;
    assert_eq!(
        env.status_of(PaymentKind::Periodic, product, id).await,
        "RCVD"
    );
    // Not a single payment.
    assert_eq!(
        refused(
            env.client
                .payment_status(PaymentKind::Single, Brand::Belfius, product, id)
                .await
        )
        .0,
        404
    );

    let code = SecretString::from(query(&env.sign_as("E2E-SO", "carol").await, "code").unwrap());
    let tokens = env
        .client
        .exchange_code(Brand::Belfius, &code, &pkce.verifier, REDIRECT)
        .await
        .unwrap();
    // An active standing order stays ACTC past the settlement delay.
    tokio::time::sleep(SETTLE + Duration::from_millis(100)).await;
    assert_eq!(
        env.status_of(PaymentKind::Periodic, product, id).await,
        "ACTC"
    );

    let details = env
        .client
        .payment_details(
            PaymentKind::Periodic,
            Brand::Belfius,
            product,
            id,
            &tokens.access_token,
        )
        .await
        .unwrap();
    assert_eq!(details["frequency"], "Monthly");
    assert_eq!(
        details["start_date"],
        (today() + chrono::Days::new(7))
            .format("%Y-%m-%d")
            .to_string()
    );
    assert_eq!(details["transaction_status"], "ACTC");

    let cancelled = env
        .client
        .cancel_payment(
            PaymentKind::Periodic,
            Brand::Belfius,
            product,
            id,
            &tokens.access_token,
        )
        .await
        .unwrap();
    assert_eq!(cancelled.transaction_status, None);
    assert_eq!(
        env.status_of(PaymentKind::Periodic, product, id).await,
        "CANC"
    );
    assert_eq!(env.counters().await["initiations_by_e2e"]["E2E-SO"], 1);
}

#[tokio::test]
async fn standing_order_date_rules() {
    let env = env().await;
    let c = challenge();
    let mut today_start = standing("E2E-SO1");
    today_start.start_date = today();
    let (_, code, typed) = refused_code(env.client.initiate_periodic(&today_start, &c, None).await);
    assert_eq!(
        (code.as_str(), typed),
        ("B14821ZZ-1259-000000", E::StartDateNotInFuture)
    );

    let mut before = standing("E2E-SO2");
    before.end_date = Some(before.start_date - chrono::Days::new(1));
    let (_, code, typed) = refused_code(env.client.initiate_periodic(&before, &c, None).await);
    assert_eq!(
        (code.as_str(), typed),
        ("B14821ZZ-1345-000000", E::EndDateInvalid)
    );

    // Quarterly from month M: an end date in month M+1 does not fit.
    let mut quarterly = standing("E2E-SO3");
    quarterly.frequency = Frequency::Quarterly;
    quarterly.end_date = quarterly
        .start_date
        .checked_add_months(chrono::Months::new(1));
    let (_, code, typed) = refused_code(env.client.initiate_periodic(&quarterly, &c, None).await);
    assert_eq!(
        (code.as_str(), typed),
        ("B14821ZZ-1322-000000", E::EndDateInconsistentWithFrequency)
    );
    // M+3 fits.
    quarterly.end_date = quarterly
        .start_date
        .checked_add_months(chrono::Months::new(3));
    env.client
        .initiate_periodic(&quarterly, &c, None)
        .await
        .unwrap();
    // Weekly has no month rule.
    let mut weekly = standing("E2E-SO4");
    weekly.frequency = Frequency::Weekly;
    weekly.day_of_execution = Some(3);
    weekly.end_date = weekly.start_date.checked_add_days(chrono::Days::new(40));
    env.client
        .initiate_periodic(&weekly, &c, None)
        .await
        .unwrap();
    assert_eq!(env.counters().await["initiations"], 2);
}

// =============================================================================================
// Bulk payments.

#[tokio::test]
async fn bulk_initiate_status_settle_and_partial_rejection() {
    let env = env().await;
    let product = PaymentProduct::SepaCreditTransfers;
    let pkce = Pkce::generate();
    let ok = env
        .client
        .initiate_bulk(
            &bulk(vec![entry("BULK-1"), entry("BULK-2")]),
            &pkce.challenge,
            None,
        )
        .await
        .unwrap();
    let mut bad = entry("BULK-4");
    bad.creditor_name = "REJECT-ENTRY Ltd".into();
    let part = env
        .client
        .initiate_bulk(&bulk(vec![entry("BULK-3"), bad]), &challenge(), None)
        .await
        .unwrap();
    for initiated in [&ok, &part] {
        assert_eq!(
            env.status_of(PaymentKind::Bulk, product, &initiated.bank_payment_id)
                .await,
            "RCVD"
        );
    }
    let code = SecretString::from(query(&env.sign("BULK-1").await, "code").unwrap());
    env.sign("BULK-4").await;
    tokio::time::sleep(SETTLE + Duration::from_millis(100)).await;
    assert_eq!(
        env.status_of(PaymentKind::Bulk, product, &ok.bank_payment_id)
            .await,
        "ACSC"
    );
    assert_eq!(
        env.status_of(PaymentKind::Bulk, product, &part.bank_payment_id)
            .await,
        "PART"
    );

    // Details list each transfer with its own status.
    let tokens = env
        .client
        .exchange_code(Brand::Belfius, &code, &pkce.verifier, REDIRECT)
        .await
        .unwrap();
    let details = env
        .client
        .payment_details(
            PaymentKind::Bulk,
            Brand::Belfius,
            product,
            &part.bank_payment_id,
            &tokens.access_token,
        )
        .await;
    // The PART bulk was signed by the default PSU too: same PSU, so the token fits.
    let details = details.unwrap();
    assert_eq!(details["payments"][0]["transaction_status"], "ACSC");
    assert_eq!(details["payments"][1]["transaction_status"], "RJCT");
    assert_eq!(details["batch_booking_preferred"], true);

    let counters = env.counters().await;
    assert_eq!(
        counters["bulk_initiations"],
        json!({"BULK-1": 1, "BULK-3": 1})
    );
    assert_eq!(counters["initiations"], 2);
}

#[tokio::test]
async fn bulk_size_and_entry_rules() {
    let env = env().await;
    let c = challenge();
    let (status, code, typed) =
        refused_code(env.client.initiate_bulk(&bulk(vec![]), &c, None).await);
    assert_eq!(
        (status, code.as_str(), typed),
        (400, "GEN-1202-100002", E::InvalidInput)
    );

    let too_many: Vec<_> = (0..=MAX_BULK_ENTRIES)
        .map(|i| entry(&format!("BIG-{i}")))
        .collect();
    let (_, code, _) = refused_code(env.client.initiate_bulk(&bulk(too_many), &c, None).await);
    assert_eq!(code, "GEN-1202-100002");

    // Each transfer is validated like a single SEPA payment.
    let mut zero = entry("BULK-Z");
    zero.amount = Amount::from_minor(0);
    let (_, code, _) = refused_code(
        env.client
            .initiate_bulk(&bulk(vec![entry("BULK-A"), zero]), &c, None)
            .await,
    );
    assert_eq!(code, "B14821ZZ-1231-000000");
    let mut dollars = entry("BULK-D");
    dollars.currency = "USD".into();
    let (_, code, _) = refused_code(
        env.client
            .initiate_bulk(&bulk(vec![dollars]), &c, None)
            .await,
    );
    assert_eq!(code, "B14821ZZ-1232-000000");
    let (_, code, _) = refused_code(
        env.client
            .initiate_bulk(&bulk(vec![entry("DUP"), entry("DUP")]), &c, None)
            .await,
    );
    assert_eq!(code, "GEN-1202-100002");

    // Exactly the maximum is fine.
    let max: Vec<_> = (0..MAX_BULK_ENTRIES)
        .map(|i| entry(&format!("MAX-{i}")))
        .collect();
    env.client
        .initiate_bulk(&bulk(max), &c, None)
        .await
        .unwrap();
    assert_eq!(env.counters().await["initiations"], 1);
}

// =============================================================================================
// Brand hosts.

#[tokio::test]
async fn banx_accounts_belong_on_the_banx_host() {
    let env = env().await;
    let c = challenge();
    let mut banx = order("E2E-BX1");
    banx.brand = Brand::Banx;
    banx.debtor_iban = Some(BANX_DEBTOR.into());
    let initiated = env.client.initiate_payment(&banx, &c, None).await.unwrap();
    let id = &initiated.bank_payment_id;
    assert_eq!(
        env.client
            .payment_status(
                PaymentKind::Single,
                Brand::Banx,
                PaymentProduct::SepaCreditTransfers,
                id
            )
            .await
            .unwrap(),
        "RCVD"
    );
    // The Belfius host does not know the Banx payment.
    assert_eq!(
        refused(
            env.client
                .payment_status(
                    PaymentKind::Single,
                    Brand::Belfius,
                    PaymentProduct::SepaCreditTransfers,
                    id
                )
                .await
        )
        .0,
        404
    );
    let (_, view) = env.admin_get(&format!("admin/payments/{id}")).await;
    assert_eq!(view["brand"], "BANX");

    // A Banx account on the Belfius host, and a Belfius account on the Banx host.
    let mut wrong_host = banx.clone();
    wrong_host.brand = Brand::Belfius;
    let mut wrong_account = banx.clone();
    wrong_account.debtor_iban = Some(BELFIUS_DEBTOR.into());
    for o in [wrong_host, wrong_account] {
        let (status, code, typed) = refused_code(env.client.initiate_payment(&o, &c, None).await);
        assert_eq!(
            (status, code.as_str(), typed),
            (403, "B14800ZZ-3007-000000", E::ChannelNotPermitted)
        );
    }
    // A foreign debtor account belongs to neither brand.
    let mut foreign = order("E2E-BX2");
    foreign.debtor_iban = Some("NL91ABNA0417164300".into());
    let (status, code, typed) = refused_code(env.client.initiate_payment(&foreign, &c, None).await);
    assert_eq!(
        (status, code.as_str(), typed),
        (403, "B14800ZZ-3002-000000", E::InvalidAccount)
    );

    // Standing orders exist on Banx; bulks do not.
    let mut so = standing("E2E-BX3");
    so.order.brand = Brand::Banx;
    so.order.debtor_iban = Some(BANX_DEBTOR.into());
    env.client.initiate_periodic(&so, &c, None).await.unwrap();
    let mut banx_bulk = bulk(vec![entry("BX-B1")]);
    banx_bulk.brand = Brand::Banx;
    banx_bulk.debtor_iban = Some(BANX_DEBTOR.into());
    let (status, code, typed) = refused_code(env.client.initiate_bulk(&banx_bulk, &c, None).await);
    assert_eq!(
        (status, code.as_str(), typed),
        (403, "B14800ZZ-3007-000000", E::ChannelNotPermitted)
    );
    assert_eq!(env.counters().await["initiations"], 2);
}

// =============================================================================================
// Documented error codes that no validation rule reaches, via the FAIL-CODE= scenario.

#[tokio::test]
async fn every_documented_error_code_is_typed() {
    let expected = [
        ("GEN-1201-100001", 400, E::MissingHeader),
        ("GEN-1201-100002", 400, E::MissingInput),
        ("GEN-1202-100001", 400, E::InvalidHeader),
        ("GEN-1202-100002", 400, E::InvalidInput),
        ("B14821ZZ-1200-000000", 400, E::MissingPaymentField),
        ("B14821ZZ-1227-000000", 400, E::CountryNotAllowed),
        ("B14821ZZ-1231-000000", 400, E::AmountNotPositive),
        ("B14821ZZ-1232-000000", 400, E::CurrencyNotAllowed),
        ("B14821ZZ-1236-000000", 400, E::BbanWithBic),
        ("B14821ZZ-1259-000000", 400, E::StartDateNotInFuture),
        (
            "B14821ZZ-1322-000000",
            400,
            E::EndDateInconsistentWithFrequency,
        ),
        ("B14821ZZ-1345-000000", 400, E::EndDateInvalid),
        ("B14821ZZ-2102-000000", 400, E::BicInvalidOrMissing),
        ("GEN-1203-100003", 401, E::InvalidAccessToken),
        ("GEN-1203-100004", 401, E::InvalidRefreshToken),
        ("GEN-1203-100008", 401, E::InvalidSecurityParameter),
        ("GEN-1203-100009", 401, E::InvalidClientId),
        ("GEN-1203-100010", 401, E::InvalidJwt),
        ("B14800ZZ-0PLC-REDRCT", 401, E::ScaRequired),
        ("B14663ZZ-2100-000000", 403, E::InvalidTpp),
        ("B14800ZZ-3002-000000", 403, E::InvalidAccount),
        ("B14800ZZ-3004-000000", 403, E::AccessDenied),
        ("B14800ZZ-3007-000000", 403, E::ChannelNotPermitted),
        ("B14800-3008-000000", 403, E::AccountNotSupported),
        ("B14800ZZ-3013-000000", 403, E::NoActiveConsent),
        ("B14821ZZ-2121-000000", 403, E::InvalidPayment),
        ("B14821ZZ-2101-000000", 403, E::Forbidden),
    ];
    // Every code of the simulator's table is covered here.
    assert_eq!(sandbox::api::DOCUMENTED_ERRORS.len(), expected.len());
    let env = env().await;
    for (code, status, typed) in expected {
        let (_, token, _) = sandbox::api::DOCUMENTED_ERRORS
            .iter()
            .find(|(_, _, c)| *c == code)
            .unwrap();
        let mut o = order("E2E-CODE");
        o.creditor_name = format!("FAIL-CODE={code}");
        let result = env.client.initiate_payment(&o, &challenge(), None).await;
        if typed == E::ScaRequired {
            // On an initiation, SCA_REQUIRED is an answer carrying the SCA link (dialect
            // sca-required-401); without a link in it, it is an answer nobody can read.
            let Err(BankError::Unrecognized(why)) = &result else {
                panic!("{code}: {result:?}");
            };
            assert!(why.contains("without a URL"), "{why}");
            continue;
        }
        let BankError::Refused { status: got, body } = result.as_ref().unwrap_err() else {
            panic!("{code}: {result:?}");
        };
        assert_eq!((*got, body.error_code.as_str()), (status, code));
        assert_eq!(body.error, *token);
        let got_typed = result.unwrap_err().code().unwrap();
        assert_eq!(got_typed, typed, "{code}");
        assert!(!got_typed.retryable());
    }
    assert_eq!(env.counters().await["initiations"], 0);
}

// =============================================================================================
// Header and body validation (raw requests).

#[tokio::test]
async fn missing_accept_language_is_406_and_response_id_echoes_request_id() {
    let env = env().await;
    let request_id = uuid::Uuid::new_v4().to_string();
    let mut headers = env.initiation_headers(&request_id);
    headers.remove("accept-language");
    let response = env.raw_initiation(headers, &valid_body("E2E-406")).await;
    assert_eq!(response.status(), StatusCode::NOT_ACCEPTABLE);
    assert_eq!(
        response.headers()["response-id"].to_str().unwrap(),
        request_id
    );

    let mut headers = env.initiation_headers(&uuid::Uuid::new_v4().to_string());
    headers.insert("accept-language", HeaderValue::from_static("en"));
    let response = env.raw_initiation(headers, &valid_body("E2E-406")).await;
    assert_eq!(response.status(), StatusCode::NOT_ACCEPTABLE);

    // Through the client the 406 is typed too.
    let error = BankError::Refused {
        status: 406,
        body: ErrorBody {
            error: "Not Acceptable".into(),
            ..ErrorBody::default()
        },
    };
    assert_eq!(error.code(), Some(E::NotAcceptable));

    // Control: the same request, well-formed, is accepted, and carries the SCA URL twice.
    let request_id = uuid::Uuid::new_v4().to_string();
    let response = env
        .raw_initiation(env.initiation_headers(&request_id), &valid_body("E2E-406"))
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        response.headers()["response-id"].to_str().unwrap(),
        request_id
    );
    let sca = response.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["_links"]["scaRedirect"]["href"], sca.as_str());
    assert_eq!(body["transaction_status"], "RCVD");
}

#[tokio::test]
async fn header_validation_errors() {
    let env = env().await;
    let body = valid_body("E2E-HDR");
    let fresh = || uuid::Uuid::new_v4().to_string();
    let invalid_header = (
        StatusCode::BAD_REQUEST,
        "INVALID_INPUT".to_owned(),
        "GEN-1202-100001".to_owned(),
    );
    let missing_header = (
        StatusCode::BAD_REQUEST,
        "MISSING_INPUT".to_owned(),
        "GEN-1201-100001".to_owned(),
    );

    // A UUID, but version 1; and not a UUID at all.
    for bad in ["c232ab00-9414-11ec-b3c8-9f6bdeced846", "not-a-uuid"] {
        let headers = env.initiation_headers(bad);
        assert_eq!(env.raw_error(headers, &body).await, invalid_header, "{bad}");
    }

    let mut headers = env.initiation_headers(&fresh());
    headers.remove("request-id");
    assert_eq!(env.raw_error(headers, &body).await, missing_header);

    let mut headers = env.initiation_headers(&fresh());
    headers.insert(
        "accept",
        HeaderValue::from_str(&accept_header("2")).unwrap(),
    );
    assert_eq!(env.raw_error(headers, &body).await, invalid_header);

    let mut headers = env.initiation_headers(&fresh());
    headers.insert("client-id", HeaderValue::from_static("someone-else"));
    assert_eq!(
        env.raw_error(headers, &body).await,
        (
            StatusCode::UNAUTHORIZED,
            "FAILED_SECURITY_VALIDATION".to_owned(),
            "GEN-1203-100009".to_owned()
        )
    );

    // Neither Authorization nor PKCE headers.
    let mut headers = env.initiation_headers(&fresh());
    headers.remove("code-challenge");
    headers.remove("code-challenge-method");
    assert_eq!(env.raw_error(headers, &body).await, missing_header);

    let mut headers = env.initiation_headers(&fresh());
    headers.insert("code-challenge", HeaderValue::from_static("too-short"));
    assert_eq!(env.raw_error(headers, &body).await, invalid_header);

    // Periodic initiation wants version 2, bulk version 1.
    let mut headers = env.initiation_headers(&fresh());
    headers.insert(
        "accept",
        HeaderValue::from_str(&accept_header("3")).unwrap(),
    );
    let response = env
        .raw_initiation_at("periodic-payments/sepa-credit-transfers", headers, &body)
        .await;
    assert_eq!(error_triple(response).await, invalid_header);

    assert_eq!(env.counters().await["initiations"], 0);
    assert_eq!(env.counters().await["initiation_requests"], 8);
}

#[tokio::test]
async fn body_validation_errors() {
    let env = env().await;
    let fresh = || uuid::Uuid::new_v4().to_string();
    let env = &env;
    let error = |body: Value| {
        let headers = env.initiation_headers(&fresh());
        async move { env.raw_error(headers, &body).await }
    };

    let mut empty_debtor = valid_body("E2E-B1");
    empty_debtor["debtor_account"] = json!({});
    assert_eq!(
        error(empty_debtor).await,
        (
            StatusCode::BAD_REQUEST,
            "INVALID_INPUT".into(),
            "GEN-1202-100002".into()
        )
    );

    let mut no_e2e = valid_body("E2E-B2");
    no_e2e
        .as_object_mut()
        .unwrap()
        .remove("endtoend_identification");
    assert_eq!(
        error(no_e2e).await,
        (
            StatusCode::BAD_REQUEST,
            "MISSING_INPUT".into(),
            "B14821ZZ-1200-000000".into()
        )
    );

    let mut negative = valid_body("E2E-B3");
    negative["instructed_amount"]["amount"] = json!("-5.00");
    assert_eq!(error(negative).await.2, "B14821ZZ-1231-000000");

    let mut bad_iban = valid_body("E2E-B4");
    bad_iban["creditor_account"]["iban"] = json!("BE71096123456768");
    assert_eq!(error(bad_iban).await.2, "GEN-1202-100002");

    // Control: with a debtor IBAN it is accepted.
    let mut with_debtor = valid_body("E2E-B5");
    with_debtor["debtor_account"] = json!({"iban": BELFIUS_DEBTOR});
    let response = env
        .raw_initiation(env.initiation_headers(&fresh()), &with_debtor)
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let counters = env.counters().await;
    assert_eq!(counters["initiations"], 1);
    assert_eq!(counters["initiation_requests"], 5);

    // Unknown product in the path.
    let response = env
        .raw_initiation_at(
            "payments/bitcoin",
            env.initiation_headers(&fresh()),
            &valid_body("E2E-B6"),
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

// =============================================================================================
// Transport security: mTLS and QSeal.

#[tokio::test]
async fn client_without_certificate_is_stopped_at_the_handshake() {
    let env = env().await;
    let mut config: BelfiusConfig = env.sandbox.belfius_config().unwrap();
    config.qwac = None;
    // One attempt per call: a refused handshake is NotSent, which reads would retry.
    let no_cert = BelfiusClient::with_guard(config, GuardConfig::none()).unwrap();
    let result = no_cert
        .initiate_payment(&order("E2E-NOCERT"), &challenge(), None)
        .await;
    // Refused during the handshake: the bank processed nothing, so a retry is safe.
    match &result {
        Err(BankError::NotSent(detail)) => assert!(detail.contains("Certificate"), "{detail}"),
        other => panic!("expected NotSent, got {other:?}"),
    }
    let status = no_cert
        .payment_status(
            PaymentKind::Single,
            Brand::Banx,
            PaymentProduct::SepaCreditTransfers,
            &BankPaymentId::new("whatever"),
        )
        .await;
    assert!(matches!(status, Err(BankError::NotSent(_))), "{status:?}");
    let counters = env.counters().await;
    assert_eq!(counters["initiation_requests"], 0);
    assert_eq!(counters["status_requests"], 0);

    // Control: the same call with the certificate gets through.
    env.client
        .initiate_payment(&order("E2E-NOCERT"), &challenge(), None)
        .await
        .unwrap();
    assert_eq!(env.counters().await["initiation_requests"], 1);
}

/// Verification is on by default (`SandboxConfig::local`, as for `pis-worker sandbox`).
#[tokio::test]
async fn qseal_signatures_are_verified() {
    let env = env().await;
    let config = env.sandbox.belfius_config().unwrap();
    assert!(
        config.qseal.is_some(),
        "belfius_config signs with the test QSeal"
    );

    // Right key: accepted, for every kind of initiation.
    env.client
        .initiate_payment(&order("E2E-SIG1"), &challenge(), None)
        .await
        .unwrap();
    env.client
        .initiate_periodic(&standing("E2E-SIG2"), &challenge(), None)
        .await
        .unwrap();
    env.client
        .initiate_bulk(&bulk(vec![entry("E2E-SIG3")]), &challenge(), None)
        .await
        .unwrap();
    let counters = env.counters().await;
    assert_eq!(
        (
            counters["signatures_checked"].as_u64(),
            counters["signatures_failed"].as_u64()
        ),
        (Some(3), Some(0))
    );

    // Another key: 401 GEN-1203-100008.
    let (cert, key) = other_qseal();
    let mut wrong = config.clone();
    wrong.qseal = Some(QsealConfig {
        private_key_pem: std::fs::read_to_string(key).unwrap().into(),
        certificate_pem: Some(std::fs::read(cert).unwrap()),
        ..config.qseal.clone().unwrap()
    });
    let impostor = BelfiusClient::new(wrong).unwrap();
    let (status, code, typed) = refused_code(
        impostor
            .initiate_payment(&order("E2E-SIG4"), &challenge(), None)
            .await,
    );
    assert_eq!(
        (status, code.as_str(), typed.clone()),
        (401, "GEN-1203-100008", E::InvalidSecurityParameter)
    );
    assert_eq!(
        typed.reason(),
        pis_worker::domain::reason::ReasonCode::BankSecurityFailure
    );

    // No signature at all: refused the same way.
    let mut unsigned = config.clone();
    unsigned.qseal = None;
    let unsigned = BelfiusClient::new(unsigned).unwrap();
    let (status, code, _) = refused_code(
        unsigned
            .initiate_payment(&order("E2E-SIG5"), &challenge(), None)
            .await,
    );
    assert_eq!((status, code.as_str()), (401, "GEN-1203-100008"));

    // The operator switches verification off at run time: unsigned passes.
    let (status, body) = env
        .admin_post_json("admin/config", Some(json!({"verify_signatures": false})))
        .await;
    assert_eq!(
        (status, body["verify_signatures"].as_bool()),
        (StatusCode::OK, Some(false))
    );
    unsigned
        .initiate_payment(&order("E2E-SIG6"), &challenge(), None)
        .await
        .unwrap();

    let counters = env.counters().await;
    assert_eq!(counters["signatures_checked"], 5);
    assert_eq!(counters["signatures_failed"], 2);
    assert_eq!(counters["initiations"], 4);
}

// =============================================================================================
// The PSU: abandon, partial signatures, scenarios.

#[tokio::test]
async fn abandoned_payment_expires_and_partial_signatures_keep_it_patc() {
    let env = env_with(|c| c.auto_sign_after = Some(Duration::from_millis(1000))).await;
    let c = challenge();
    let abandoned = env
        .client
        .initiate_payment(&order("E2E-ABN"), &c, None)
        .await
        .unwrap();
    let (status, body) = env.admin_post("admin/e2e/E2E-ABN/abandon").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("RCVD"))
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The automatic signature did not happen: the PSU walked away.
    assert_eq!(env.status(&abandoned.bank_payment_id).await, "RCVD");
    // The operator shortens the SCA expiry at run time: the payment expires.
    let (status, body) = env
        .admin_post_json(
            "admin/config",
            Some(json!({"sca_expiry_ms": 200, "auto_sign_after_ms": 0})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["sca_expiry_ms"], 200);
    assert_eq!(env.status(&abandoned.bank_payment_id).await, "RJCT");

    env.admin_post_json("admin/config", Some(json!({"sca_expiry_ms": 60_000})))
        .await;
    let multi = env
        .client
        .initiate_payment(&order("E2E-PART"), &c, None)
        .await
        .unwrap();
    let (_, first) = env
        .admin_post("admin/e2e/E2E-PART/sign?psu=alice&partial=true")
        .await;
    assert_eq!(first["status"], "PATC");
    assert!(first["redirect_url"].as_str().unwrap().contains("code="));
    let (_, second) = env
        .admin_post("admin/e2e/E2E-PART/sign?psu=bob&partial=true")
        .await;
    assert_eq!(
        (second["status"].as_str(), &second["redirect_url"]),
        (Some("PATC"), &Value::Null)
    );
    assert_eq!(env.status(&multi.bank_payment_id).await, "PATC");
    assert_eq!(
        TransactionStatus::parse("PATC").map(TransactionStatus::progress),
        Some(BankProgress::PartiallySigned)
    );
    let (_, last) = env.admin_post("admin/e2e/E2E-PART/sign?psu=carol").await;
    assert_eq!(last["status"], "ACTC");
    let (_, view) = env
        .admin_get(&format!("admin/payments/{}", multi.bank_payment_id))
        .await;
    assert_eq!(view["psu"], "alice");
    let (status, _) = env.admin_post("admin/e2e/E2E-PART/dance").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn psu_reject_gives_rjct_and_an_error_redirect() {
    let env = env().await;
    let initiated = env
        .client
        .initiate_payment(&order("E2E-REJ"), &challenge(), None)
        .await
        .unwrap();
    let (status, body) = env
        .admin_post("admin/e2e/E2E-REJ/reject?state=tpp-rej-1")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let redirect = url::Url::parse(body["redirect_url"].as_str().unwrap()).unwrap();
    assert_eq!(query(&redirect, "error").as_deref(), Some("access_denied"));
    assert_eq!(
        query(&redirect, "error_description").as_deref(),
        Some("PSU refused")
    );
    assert_eq!(query(&redirect, "state").as_deref(), Some("tpp-rej-1"));
    assert_eq!(query(&redirect, "code"), None);
    assert_eq!(env.status(&initiated.bank_payment_id).await, "RJCT");

    // Acting again on a final payment is a conflict.
    let (status, body) = env.admin_post("admin/e2e/E2E-REJ/sign").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, _) = env.admin_post("admin/e2e/NO-SUCH-E2E/sign").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn location_only_answer_is_understood() {
    let env = env().await;
    let mut o = order("E2E-LOC");
    o.creditor_name = "LOCATION-ONLY NV".into();
    let initiated = env
        .client
        .initiate_payment(&o, &challenge(), None)
        .await
        .unwrap();
    assert!(
        initiated
            .sca_redirect_url
            .ends_with(&format!("/sca/{}", initiated.bank_payment_id))
    );
}

#[tokio::test]
async fn scenarios_auto_reject_multi_sign_and_expiry() {
    let env = env_with(|c| c.sca_expiry = Duration::from_millis(1500)).await;
    let c = challenge();
    let mut auto = order("E2E-AUTO");
    auto.creditor_name = "AUTO-REJECT BV".into();
    let auto = env.client.initiate_payment(&auto, &c, None).await.unwrap();
    let mut multi = order("E2E-MULTI");
    multi.creditor_name = "MULTI-SIGN BV".into();
    let multi = env.client.initiate_payment(&multi, &c, None).await.unwrap();
    let idle = env
        .client
        .initiate_payment(&order("E2E-IDLE"), &c, None)
        .await
        .unwrap();

    let (_, first) = env.admin_post("admin/e2e/E2E-MULTI/sign").await;
    assert_eq!(first["status"], "PATC");
    assert!(first["redirect_url"].as_str().unwrap().contains("code="));
    assert_eq!(env.status(&multi.bank_payment_id).await, "PATC");
    let (_, second) = env.admin_post("admin/e2e/E2E-MULTI/sign").await;
    assert_eq!(second["status"], "ACTC");
    assert_eq!(second["redirect_url"], Value::Null);

    assert_eq!(env.status(&auto.bank_payment_id).await, "RCVD");
    assert_eq!(env.status(&idle.bank_payment_id).await, "RCVD");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(env.status(&auto.bank_payment_id).await, "RJCT");
    assert_eq!(env.status(&idle.bank_payment_id).await, "RJCT");
    let (_, view) = env
        .admin_get(&format!("admin/payments/{}", idle.bank_payment_id))
        .await;
    assert!(
        view["reason"]
            .as_str()
            .unwrap()
            .contains("SCA not completed")
    );
    let (_, view) = env
        .admin_get(&format!("admin/payments/{}", auto.bank_payment_id))
        .await;
    assert_eq!(view["reason"], "PSU refused");
}

#[tokio::test]
async fn global_auto_sign_then_settlement() {
    let env = env_with(|c| c.auto_sign_after = Some(Duration::from_millis(500))).await;
    let initiated = env
        .client
        .initiate_payment(&order("E2E-GLOBAL"), &challenge(), None)
        .await
        .unwrap();
    assert_eq!(env.status(&initiated.bank_payment_id).await, "RCVD");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(env.status(&initiated.bank_payment_id).await, "ACTC");
    tokio::time::sleep(SETTLE).await;
    assert_eq!(env.status(&initiated.bank_payment_id).await, "ACSC");
}

#[tokio::test]
async fn counters_count_initiations_per_end_to_end_id() {
    let env = env().await;
    for e2e in ["E2E-A", "E2E-A", "E2E-B"] {
        env.client
            .initiate_payment(&order(e2e), &challenge(), None)
            .await
            .unwrap();
    }
    env.client
        .initiate_periodic(&standing("E2E-B"), &challenge(), None)
        .await
        .unwrap();
    let counters = env.counters().await;
    assert_eq!(
        counters["initiations_by_e2e"],
        json!({"E2E-A": 2, "E2E-B": 2})
    );
    assert_eq!(counters["initiations"], 4);
    let (_, list) = env.admin_get("admin/payments").await;
    assert_eq!(list.as_array().unwrap().len(), 4);

    let (status, _) = env.admin_post("admin/reset").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let counters = env.counters().await;
    assert_eq!(counters["initiations"], 0);
    assert_eq!(counters["initiations_by_e2e"], json!({}));
}

// =============================================================================================
// Faults: what each failure looks like to the client.

fn rule(endpoint: EndpointClass, fault: Fault) -> FaultRule {
    FaultRule {
        endpoint,
        probability: 1.0,
        fault,
        remaining: Some(1),
    }
}

/// One HTTP attempt per call (no retries, limits or breaker): what each fault maps to. What the
/// guard then does with it is `tests/bank_faults.rs`.
#[tokio::test]
async fn injected_faults_map_to_bank_errors() {
    let mut env = env().await;
    env.client =
        BelfiusClient::with_guard(env.sandbox.belfius_config().unwrap(), GuardConfig::none())
            .unwrap();
    let faults = env.sandbox.faults();
    let c = challenge();

    // Latency is observed by the client.
    let initiated = env
        .client
        .initiate_payment(&order("E2E-F0"), &c, None)
        .await
        .unwrap();
    faults.set(FaultSettings {
        latency: Latency {
            fixed_ms: 300,
            ..Latency::default()
        },
        rules: vec![],
    });
    let started = Instant::now();
    env.status(&initiated.bank_payment_id).await;
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    faults.clear();

    // 503: Unavailable, retryable, nothing created.
    faults.set(FaultSettings {
        latency: Latency::default(),
        rules: vec![rule(
            EndpointClass::Initiate,
            Fault::Status {
                status: 503,
                retry_after_secs: None,
            },
        )],
    });
    let error = env
        .client
        .initiate_payment(&order("E2E-F1"), &c, None)
        .await
        .unwrap_err();
    assert!(
        matches!(error, BankError::Unavailable { status: 503, .. }),
        "{error:?}"
    );
    assert_eq!(error.code(), Some(E::ServerError));
    assert!(error.code().unwrap().retryable());

    // 429 with Retry-After.
    faults.set(FaultSettings {
        latency: Latency::default(),
        rules: vec![rule(
            EndpointClass::Status,
            Fault::Status {
                status: 429,
                retry_after_secs: Some(2),
            },
        )],
    });
    match env
        .client
        .payment_status(
            PaymentKind::Single,
            Brand::Belfius,
            PaymentProduct::SepaCreditTransfers,
            &initiated.bank_payment_id,
        )
        .await
    {
        Err(BankError::RateLimited { retry_after }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(2)))
        }
        other => panic!("{other:?}"),
    }

    // Reset: the connection closes without a status line. The client cannot tell whether the
    // bank acted, so it reports NoResponse (outcome unknown), never NotSent.
    faults.set(FaultSettings {
        latency: Latency::default(),
        rules: vec![rule(EndpointClass::Initiate, Fault::Reset)],
    });
    let error = env
        .client
        .initiate_payment(&order("E2E-F2"), &c, None)
        .await
        .unwrap_err();
    assert!(matches!(error, BankError::NoResponse(_)), "{error:?}");
    assert_eq!(error.code(), None);

    // Response lost: the bank DID create the payment, the client sees NoResponse.
    faults.set(FaultSettings {
        latency: Latency::default(),
        rules: vec![rule(
            EndpointClass::Initiate,
            Fault::ResponseLost { hang_ms: 100 },
        )],
    });
    let error = env
        .client
        .initiate_payment(&order("E2E-F3"), &c, None)
        .await
        .unwrap_err();
    assert!(matches!(error, BankError::NoResponse(_)), "{error:?}");
    let counters = env.counters().await;
    assert_eq!(counters["initiations_by_e2e"]["E2E-F3"], 1);
    // Nobody saw its SCA URL: it is an orphan no PSU can sign, and an e2e lookup skips it.
    assert_eq!(counters["orphaned_initiations"], 1);
    let (_, payments) = env.admin_get("admin/payments").await;
    let orphan = payments
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|p| p["endtoend_identification"] == "E2E-F3")
        })
        .expect("the orphan is listed");
    assert_eq!(orphan["orphaned"], true);
    let id = orphan["payment_id"].as_str().expect("id").to_owned();
    let signed = reqwest::Client::new()
        .post(
            env.sandbox
                .admin_base_url()
                .join(&format!("admin/payments/{id}/sign"))
                .expect("url"),
        )
        .send()
        .await
        .expect("admin call");
    assert_eq!(signed.status(), reqwest::StatusCode::CONFLICT);
    let by_e2e = reqwest::Client::new()
        .post(
            env.sandbox
                .admin_base_url()
                .join("admin/e2e/E2E-F3/sign")
                .expect("url"),
        )
        .send()
        .await
        .expect("admin call");
    assert_eq!(by_e2e.status(), reqwest::StatusCode::NOT_FOUND);
    assert_eq!(counters["initiations_by_e2e"].get("E2E-F1"), None);
    assert_eq!(counters["initiations_by_e2e"].get("E2E-F2"), None);

    // The operator view of the faults counts each injection.
    let (_, view) = env.admin_get("admin/faults").await;
    assert_eq!(view["counters"]["total"], 4);
}

#[tokio::test]
async fn scenario_outages_rate_limits_and_slow_answers() {
    let env = env().await;
    let c = challenge();

    let mut down = order("E2E-503");
    down.creditor_name = "FAIL-503".into();
    match env.client.initiate_payment(&down, &c, None).await {
        Err(BankError::Unavailable {
            status: 503,
            body: Some(body),
        }) => {
            assert_eq!(body.error, "internal_server_error")
        }
        other => panic!("{other:?}"),
    }

    let mut limited = order("E2E-429");
    limited.creditor_name = "FAIL-429".into();
    match env.client.initiate_payment(&limited, &c, None).await {
        Err(BankError::RateLimited { retry_after }) => {
            assert_eq!(retry_after, Some(Duration::from_secs(1)))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(env.counters().await["initiations"], 0);

    // The bank creates the payment but the answer never arrives in time: outcome unknown.
    let mut config = env.sandbox.belfius_config().unwrap();
    config.request_timeout = Duration::from_millis(500);
    let impatient = BelfiusClient::new(config).unwrap();
    let mut slow = order("E2E-SLOW");
    slow.creditor_name = "SLOW-CREATE".into();
    match impatient.initiate_payment(&slow, &c, None).await {
        Err(BankError::NoResponse(_)) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(env.counters().await["initiations_by_e2e"]["E2E-SLOW"], 1);
}

#[tokio::test]
async fn restarted_sandbox_reuses_its_pki() {
    let dir = TempDir::new().unwrap();
    let tls_dir = dir.path().join("tls");
    // Copy the shared PKI so this test does not generate keys of its own.
    std::fs::create_dir_all(&tls_dir).unwrap();
    for file in std::fs::read_dir(shared_pki()).unwrap() {
        let file = file.unwrap();
        std::fs::copy(file.path(), tls_dir.join(file.file_name())).unwrap();
    }
    std::fs::remove_file(tls_dir.join("server.pem")).unwrap();
    // A missing file makes the sandbox generate a fresh TLS set on first start.
    let first = sandbox::start(SandboxConfig::local(&tls_dir))
        .await
        .unwrap();
    let client_pem = std::fs::read(tls_dir.join("client.pem")).unwrap();
    let ca_pem = std::fs::read(tls_dir.join("ca.pem")).unwrap();
    let config = first.belfius_config().unwrap();
    first.shutdown().await;

    let second = sandbox::start(SandboxConfig::local(&tls_dir))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(tls_dir.join("client.pem")).unwrap(),
        client_pem
    );
    assert_eq!(std::fs::read(tls_dir.join("ca.pem")).unwrap(), ca_pem);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(tls_dir.join("client-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "private key readable by others: {mode:o}");
    }
    // The old client configuration (old certificate, new ports) still works, on both hosts.
    let mut config = config;
    config.belfius_base_url = second.api_base_url();
    config.banx_base_url = second.banx_base_url();
    let client = BelfiusClient::new(config).unwrap();
    client
        .initiate_payment(&order("E2E-RESTART"), &challenge(), None)
        .await
        .unwrap();
    let mut banx = order("E2E-RESTART-BX");
    banx.brand = Brand::Banx;
    client
        .initiate_payment(&banx, &challenge(), None)
        .await
        .unwrap();
}

// =============================================================================================
// The TPP's `state`, signable orphans, a rotated client secret.

/// A browser that does not follow the bank's 303 (the test reads where it would go).
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// `{admin}/admin/sca/{action}?url=<link>&…`, the link percent-encoded.
fn by_sca_url(env: &Env, action: &str, link: &str, extra: &[(&str, &str)]) -> url::Url {
    let mut url = env
        .sandbox
        .admin_base_url()
        .join(&format!("admin/sca/{action}"))
        .expect("url");
    url.query_pairs_mut()
        .append_pair("url", link)
        .extend_pairs(extra);
    url
}

async fn post_url(url: url::Url) -> (StatusCode, Value) {
    let response = reqwest::Client::new()
        .post(url)
        .send()
        .await
        .expect("admin call");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_tpps_state_comes_back_on_the_redirect_only_when_given() {
    let env = env().await;
    let pkce = Pkce::generate();

    // Browser: the TPP appends its state to the SCA URL; the page carries it to the redirect.
    let initiated = env
        .client
        .initiate_payment(&order("E2E-STATE-1"), &pkce.challenge, None)
        .await
        .unwrap();
    let link = format!("{}?state=tpp-state_1", initiated.sca_redirect_url);
    let page = browser().get(&link).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let page = page.text().await.unwrap();
    assert_eq!(
        page.matches("name=\"state\" value=\"tpp-state_1\"").count(),
        2,
        "{page}"
    );
    let response = browser()
        .post(format!("{}/sign", initiated.sca_redirect_url))
        .form(&[("psu", "alice"), ("state", "tpp-state_1")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let location = url::Url::parse(response.headers()["location"].to_str().unwrap()).unwrap();
    assert_eq!(query(&location, "state").as_deref(), Some("tpp-state_1"));
    let code = SecretString::from(query(&location, "code").unwrap());
    env.client
        .exchange_code(Brand::Belfius, &code, &pkce.verifier, REDIRECT)
        .await
        .unwrap();

    // The PSU opens exactly the TPP's link through the operator API.
    let initiated = env
        .client
        .initiate_payment(&order("E2E-STATE-2"), &challenge(), None)
        .await
        .unwrap();
    let link = format!("{}?state=tpp.state~2", initiated.sca_redirect_url);
    let (status, body) = post_url(by_sca_url(&env, "sign", &link, &[("psu", "bob")])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["payment_id"], initiated.bank_payment_id.as_str());
    let redirect = url::Url::parse(body["redirect_url"].as_str().unwrap()).unwrap();
    assert_eq!(query(&redirect, "state").as_deref(), Some("tpp.state~2"));
    assert!(query(&redirect, "code").is_some());
    let (_, view) = env
        .admin_get(&format!("admin/payments/{}", initiated.bank_payment_id))
        .await;
    assert_eq!(view["psu"], "bob");
    assert_eq!(view["redirect_url"], body["redirect_url"]);

    // Refusal through the link without a state: error, and no state.
    let initiated = env
        .client
        .initiate_payment(&order("E2E-STATE-3"), &challenge(), None)
        .await
        .unwrap();
    let (status, body) =
        post_url(by_sca_url(&env, "reject", &initiated.sca_redirect_url, &[])).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let redirect = url::Url::parse(body["redirect_url"].as_str().unwrap()).unwrap();
    assert_eq!(query(&redirect, "error").as_deref(), Some("access_denied"));
    assert_eq!(query(&redirect, "state"), None);

    // A malformed state is refused wherever it comes in, and nothing is signed.
    let initiated = env
        .client
        .initiate_payment(&order("E2E-STATE-4"), &challenge(), None)
        .await
        .unwrap();
    let (status, body) = env
        .admin_post("admin/e2e/E2E-STATE-4/sign?state=not%20opaque")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("state must be 1 to 512 characters"),
        "{body}"
    );
    let bad_link = format!("{}?state=a%2Bb", initiated.sca_redirect_url);
    let (status, _) = post_url(by_sca_url(&env, "sign", &bad_link, &[])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let page = browser().get(&bad_link).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::BAD_REQUEST);
    let too_long = "s".repeat(513);
    let response = browser()
        .post(format!("{}/sign", initiated.sca_redirect_url))
        .form(&[("state", too_long.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(env.status(&initiated.bank_payment_id).await, "RCVD");

    // A link that is not one of the simulator's SCA links.
    let foreign = format!(
        "https://bank.example/sca/{}?state=x",
        initiated.bank_payment_id
    );
    let (status, body) = post_url(by_sca_url(&env, "sign", &foreign, &[])).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("not an SCA link of this simulator"),
        "{body}"
    );
    assert_eq!(env.status(&initiated.bank_payment_id).await, "RCVD");

    // The `psu` command with --sca-url: the same endpoint, from the command line.
    let args = sandbox::cli::PsuArgs {
        admin_url: env.sandbox.admin_base_url(),
        action: sandbox::cli::PsuAction::Sign,
        e2e: None,
        sca_url: Some(format!("{}?state=cli-1", initiated.sca_redirect_url)),
        psu: "carol".into(),
        partial: false,
    };
    sandbox::cli::run_psu(args).await.unwrap();
    let (_, view) = env
        .admin_get(&format!("admin/payments/{}", initiated.bank_payment_id))
        .await;
    assert_eq!(view["psu"], "carol");
    let redirect = url::Url::parse(view["redirect_url"].as_str().unwrap()).unwrap();
    assert_eq!(query(&redirect, "state").as_deref(), Some("cli-1"));
}

/// Initiates `e2e` with its answer lost; returns the orphan's bank id.
async fn orphan(env: &Env, e2e: &str) -> String {
    env.sandbox.faults().set(FaultSettings {
        latency: Latency::default(),
        rules: vec![rule(
            EndpointClass::Initiate,
            Fault::ResponseLost { hang_ms: 50 },
        )],
    });
    let error = env
        .client
        .initiate_payment(&order(e2e), &challenge(), None)
        .await
        .unwrap_err();
    assert!(matches!(error, BankError::NoResponse(_)), "{error:?}");
    env.sandbox.faults().clear();
    let (_, payments) = env.admin_get("admin/payments").await;
    let orphan = payments
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|p| p["endtoend_identification"] == e2e && p["orphaned"] == true)
        })
        .expect("the orphan is listed");
    orphan["payment_id"].as_str().expect("id").to_owned()
}

#[tokio::test]
async fn orphans_are_signable_only_in_that_mode() {
    let env = env().await;
    let id = orphan(&env, "E2E-ORPH").await;

    // Off (the default): refused by id, invisible by end-to-end id, never signed.
    let (_, config) = env.admin_get("admin/config").await;
    assert_eq!(config["orphans_signable"], false);
    let (status, body) = env.admin_post(&format!("admin/payments/{id}/sign")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("orphans_signable is off"),
        "{body}"
    );
    let (status, _) = env.admin_post("admin/e2e/E2E-ORPH/sign").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = env.admin_post("admin/e2e/E2E-ORPH/sign-all").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(env.counters().await["orphans_signed"], 0);

    // On, at run time: the PSU finds it by end-to-end id and signs it.
    let (status, body) = env
        .admin_post_json("admin/config", Some(json!({"orphans_signable": true})))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["orphans_signable"], true);
    let (status, body) = env
        .admin_post("admin/e2e/E2E-ORPH/sign?psu=alice&state=orph-1")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["payment_id"], id.as_str());
    let redirect = url::Url::parse(body["redirect_url"].as_str().unwrap()).unwrap();
    assert_eq!(query(&redirect, "state").as_deref(), Some("orph-1"));
    assert!(query(&redirect, "code").is_some());
    assert_eq!(env.status(&BankPaymentId::new(id.clone())).await, "ACTC");
    let counters = env.counters().await;
    assert_eq!(counters["orphans_signed"], 1);
    assert_eq!(counters["orphaned_initiations"], 1);
}

#[tokio::test]
async fn signable_orphans_keep_their_automatic_signature() {
    let env = env_with(|c| {
        c.orphans_signable = true;
        c.auto_sign_after = Some(Duration::from_millis(300));
    })
    .await;
    let id = BankPaymentId::new(orphan(&env, "E2E-ORPH-AUTO").await);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(env.status(&id).await, "ACTC");
    assert_eq!(env.counters().await["orphans_signed"], 1);

    // The same with the mode off: the automatic signature went with the lost answer.
    let env = env_with(|c| c.auto_sign_after = Some(Duration::from_millis(300))).await;
    let id = BankPaymentId::new(orphan(&env, "E2E-ORPH-AUTO").await);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(env.status(&id).await, "RCVD");
    assert_eq!(env.counters().await["orphans_signed"], 0);
}

#[tokio::test]
async fn sign_all_signs_every_payment_still_waiting_for_its_first_signature() {
    let env = env().await;
    // A payment already signed, an orphan of a lost answer, then the worker's retry.
    let signed = env
        .client
        .initiate_payment(&order("E2E-ALL"), &challenge(), None)
        .await
        .unwrap();
    env.sign("E2E-ALL").await;
    let lost = orphan(&env, "E2E-ALL").await;
    let retried = env
        .client
        .initiate_payment(&order("E2E-ALL"), &challenge(), None)
        .await
        .unwrap();
    let other = env
        .client
        .initiate_payment(&order("E2E-OTHER"), &challenge(), None)
        .await
        .unwrap();

    // Mode off: only the retry.
    let (status, body) = env
        .admin_post("admin/e2e/E2E-ALL/sign-all?psu=alice&state=all-1")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ids: Vec<_> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["payment_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, [retried.bank_payment_id.as_str()]);
    let redirect = url::Url::parse(body[0]["redirect_url"].as_str().unwrap()).unwrap();
    assert_eq!(query(&redirect, "state").as_deref(), Some("all-1"));
    assert_eq!(body[0]["status"], "ACTC");

    // Mode on: the orphan too; signed payments and other end-to-end ids stay as they were.
    env.admin_post_json("admin/config", Some(json!({"orphans_signable": true})))
        .await;
    let retried_again = env
        .client
        .initiate_payment(&order("E2E-ALL"), &challenge(), None)
        .await
        .unwrap();
    let (status, body) = env.admin_post("admin/e2e/E2E-ALL/sign-all?psu=alice").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ids: Vec<_> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["payment_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, [lost.as_str(), retried_again.bank_payment_id.as_str()]);
    assert!(
        body.as_array()
            .unwrap()
            .iter()
            .all(|o| o["status"] == "ACTC")
    );
    assert_eq!(env.counters().await["orphans_signed"], 1);
    let (status, _) = env.admin_post("admin/e2e/E2E-ALL/sign-all").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(env.status(&other.bank_payment_id).await, "RCVD");
    let (_, view) = env
        .admin_get(&format!("admin/payments/{}", signed.bank_payment_id))
        .await;
    assert_eq!(view["psu"], "psu-default");
}

#[tokio::test]
async fn a_rotated_client_secret_refuses_the_old_one() {
    let env = env().await;
    let (_, tokens) = env.signed_with_tokens("E2E-ROT", "alice").await;
    let refresh = tokens.refresh_token.clone().unwrap();

    let (status, body) = env
        .admin_post_json(
            "admin/config",
            Some(json!({"client_secret": "rotated-secret-2"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(!body.to_string().contains("rotated-secret-2"), "{body}");
    let (_, shown) = env.admin_get("admin/config").await;
    assert!(!shown.to_string().contains("rotated-secret-2"), "{shown}");

    // The worker still on the old secret: invalid client, whatever the grant.
    let (status, code, typed) =
        refused_code(env.client.refresh_token(Brand::Belfius, &refresh).await);
    assert_eq!((status, code.as_str()), (401, "GEN-1203-100009"));
    assert_eq!(typed, E::InvalidClientId);
    let pkce = Pkce::generate();
    env.client
        .initiate_payment(&order("E2E-ROT-2"), &pkce.challenge, None)
        .await
        .unwrap();
    let code = SecretString::from(query(&env.sign("E2E-ROT-2").await, "code").unwrap());
    let (status, error_code, _) = refused_code(
        env.client
            .exchange_code(Brand::Belfius, &code, &pkce.verifier, REDIRECT)
            .await,
    );
    assert_eq!((status, error_code.as_str()), (401, "GEN-1203-100009"));

    // With the new secret: an invalid refresh token is still told apart.
    let mut config = env.sandbox.belfius_config().unwrap();
    config.client_secret = SecretString::from("rotated-secret-2");
    let rotated = BelfiusClient::new(config).unwrap();
    let bogus = SecretString::from("not-a-refresh-token");
    let (status, error_code, typed) =
        refused_code(rotated.refresh_token(Brand::Belfius, &bogus).await);
    assert_eq!((status, error_code.as_str()), (401, "GEN-1203-100004"));
    assert_eq!(typed, E::InvalidRefreshToken);
    // The old client's refusals burnt nothing: the real refresh token and the code still work.
    rotated
        .refresh_token(Brand::Belfius, &refresh)
        .await
        .unwrap();
    rotated
        .exchange_code(Brand::Belfius, &code, &pkce.verifier, REDIRECT)
        .await
        .unwrap();
}

// =============================================================================================
// Simulator strictness: what a real bank refuses (docs/belfius.md, "Simulator strictness").

/// A client presenting `cert`/`key` instead of the registered client certificate.
fn client_with_certificate(env: &Env, cert: &Path, key: &Path) -> BelfiusClient {
    let mut config = env.sandbox.belfius_config().unwrap();
    config.qwac = Some(QwacIdentity {
        cert_chain_pem: std::fs::read(cert).unwrap(),
        private_key_pem: std::fs::read_to_string(key).unwrap().into(),
    });
    BelfiusClient::with_guard(config, GuardConfig::none()).unwrap()
}

fn other_tpp(env: &Env) -> BelfiusClient {
    client_with_certificate(
        env,
        &env.sandbox.other_client_cert_path(),
        &env.sandbox.other_client_key_path(),
    )
}

#[tokio::test]
async fn a_client_certificate_not_registered_for_the_client_id_is_refused() {
    let env = env().await;
    let pkce = Pkce::generate();
    env.client
        .initiate_payment(&order("E2E-CERT1"), &pkce.challenge, None)
        .await
        .unwrap();
    let code = SecretString::from(query(&env.sign("E2E-CERT1").await, "code").unwrap());

    // Another TPP's certificate, from a CA the bank trusts: the handshake succeeds, but the
    // Client-ID it sends (ours) is not bound to that certificate.
    let other = other_tpp(&env);
    let invalid_client = (401, "GEN-1203-100009".to_owned(), E::InvalidClientId);
    assert_eq!(
        refused_code(
            other
                .initiate_payment(&order("E2E-CERT2"), &challenge(), None)
                .await
        ),
        invalid_client
    );
    let initiated = env
        .client
        .initiate_payment(&order("E2E-CERT3"), &challenge(), None)
        .await
        .unwrap();
    assert_eq!(
        refused_code(
            other
                .payment_status(
                    PaymentKind::Single,
                    Brand::Belfius,
                    PaymentProduct::SepaCreditTransfers,
                    &initiated.bank_payment_id
                )
                .await
        ),
        invalid_client
    );
    // At /token the Basic credentials name the Client-ID: refused, and the code survives.
    assert_eq!(
        refused_code(
            other
                .exchange_code(Brand::Belfius, &code, &pkce.verifier, REDIRECT)
                .await
        ),
        invalid_client
    );
    env.client
        .exchange_code(Brand::Belfius, &code, &pkce.verifier, REDIRECT)
        .await
        .unwrap();
    let counters = env.counters().await;
    // Refused before any handler: the E2E-CERT2 initiation was never seen.
    assert_eq!(counters["initiation_requests"], 2, "{counters}");
    assert_eq!(counters["status_requests"], 0, "{counters}");

    // The registration is a setting: register the other certificate instead, and ours is
    // the stranger.
    let pem = std::fs::read_to_string(env.sandbox.other_client_cert_path()).unwrap();
    let fingerprint = hex::encode(sandbox::tls::leaf_fingerprint(&pem).unwrap());
    let rebound = env_with(|c| c.client_certificates = vec![fingerprint]).await;
    other_tpp(&rebound)
        .initiate_payment(&order("E2E-CERT4"), &challenge(), None)
        .await
        .unwrap();
    assert_eq!(
        refused_code(
            rebound
                .client
                .initiate_payment(&order("E2E-CERT5"), &challenge(), None)
                .await
        ),
        invalid_client
    );
}

#[tokio::test]
async fn redirect_uris_must_be_registered() {
    let env = env().await;
    let fresh = || uuid::Uuid::new_v4().to_string();
    let with_redirect = |uri: &str| {
        let mut headers = env.initiation_headers(&fresh());
        headers.insert("redirect-uri", HeaderValue::from_str(uri).unwrap());
        headers
    };
    // The defaults: what the tests, the demo and the benchmarks use, and loopback over plain
    // http on any port (RFC 8252 §7.3).
    for uri in [
        "https://tpp.example/callback",
        "https://client.example/callback",
        "http://127.0.0.1:49152/cb",
        "http://localhost:8080/return",
    ] {
        let response = env
            .raw_initiation(with_redirect(uri), &valid_body("E2E-RU1"))
            .await;
        assert_eq!(response.status(), StatusCode::CREATED, "{uri}");
    }
    for uri in [
        "https://unregistered.example/callback",
        "https://tpp.example.evil.example/callback",
        "http://tpp.example/callback",
        "https://tpp.example/callback#fragment",
    ] {
        let response = env
            .raw_initiation(with_redirect(uri), &valid_body("E2E-RU2"))
            .await;
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            (status, body["error_code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("GEN-1202-100001")),
            "{uri}: {body}"
        );
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .contains("Redirect-URI"),
            "{body}"
        );
    }
    // Through the client, typed.
    let mut unregistered = order("E2E-RU3");
    unregistered.redirect_uri = "https://unregistered.example/callback".into();
    assert_eq!(
        refused_code(
            env.client
                .initiate_payment(&unregistered, &challenge(), None)
                .await
        ),
        (400, "GEN-1202-100001".to_owned(), E::InvalidHeader)
    );
    assert_eq!(env.counters().await["initiations"], 4);

    // A TPP's own registration: exact URLs only match exactly.
    let own = env_with(|c| c.redirect_uris = vec!["https://shop.example/return".into()]).await;
    let mut shop = order("E2E-RU4");
    shop.redirect_uri = "https://shop.example/return".into();
    own.client
        .initiate_payment(&shop, &challenge(), None)
        .await
        .unwrap();
    for uri in ["https://shop.example/return/x", REDIRECT] {
        let mut other = order("E2E-RU5");
        other.redirect_uri = uri.into();
        let (status, code, _) = refused_code(
            own.client
                .initiate_payment(&other, &challenge(), None)
                .await,
        );
        assert_eq!((status, code.as_str()), (400, "GEN-1202-100001"), "{uri}");
    }
    // Plain http may not even be registered for another host.
    let mut config = SandboxConfig::local(shared_pki());
    config.redirect_uris = vec!["http://shop.example/return".into()];
    let error = sandbox::start(config).await.unwrap_err();
    assert!(error.to_string().contains("loopback"), "{error:#}");
}

#[tokio::test]
async fn tokens_are_valid_only_on_the_brand_host_that_issued_them() {
    let env = env().await;
    let pkce = Pkce::generate();
    let banx = |e2e: &str| {
        let mut o = order(e2e);
        o.brand = Brand::Banx;
        o
    };
    env.client
        .initiate_payment(&banx("E2E-BRT1"), &pkce.challenge, None)
        .await
        .unwrap();
    let code = SecretString::from(query(&env.sign_as("E2E-BRT1", "alice").await, "code").unwrap());
    // The Belfius host's /token never issued this code; asking there burns nothing.
    let (status, body) = refused(
        env.client
            .exchange_code(Brand::Belfius, &code, &pkce.verifier, REDIRECT)
            .await,
    );
    assert_eq!((status, body.error_code.as_str()), (400, "GEN-1202-100002"));
    assert!(body.error_description.contains("unknown"), "{body:?}");
    let tokens = env
        .client
        .exchange_code(Brand::Banx, &code, &pkce.verifier, REDIRECT)
        .await
        .unwrap();
    let refresh = tokens.refresh_token.clone().unwrap();

    env.client
        .initiate_payment(&banx("E2E-BRT2"), "", Some(&tokens.access_token))
        .await
        .unwrap();
    assert_eq!(
        refused_code(
            env.client
                .initiate_payment(&order("E2E-BRT3"), "", Some(&tokens.access_token))
                .await
        ),
        (401, "GEN-1203-100003".to_owned(), E::InvalidAccessToken)
    );
    assert_eq!(
        refused_code(env.client.refresh_token(Brand::Belfius, &refresh).await),
        (401, "GEN-1203-100004".to_owned(), E::InvalidRefreshToken)
    );
    // The refusals rotated nothing: the Banx pair still refreshes on its own host.
    env.client
        .refresh_token(Brand::Banx, &refresh)
        .await
        .unwrap();
    let counters = env.counters().await;
    assert_eq!(counters["invalidated_token_uses"], 0, "{counters}");
    assert_eq!(counters["initiations_by_auth"]["bearer"], 1, "{counters}");
}

#[tokio::test]
async fn debtor_accounts_of_other_belgian_banks_are_refused() {
    let env = env().await;
    let with_debtor = |e2e: &str, iban: &str| {
        let mut o = order(e2e);
        o.debtor_iban = Some(iban.into());
        o
    };
    // Belfius bank codes from several of its ranges: 096, 063, 550, 775.
    for (i, iban) in [
        BELFIUS_DEBTOR,
        "BE41063012345610",
        "BE40550000123463",
        "BE23775000123491",
    ]
    .into_iter()
    .enumerate()
    {
        env.client
            .initiate_payment(
                &with_debtor(&format!("E2E-ACC{i}"), iban),
                &challenge(),
                None,
            )
            .await
            .unwrap();
    }
    // 539 (the IBAN registry's Belgian example, a code not allocated) and 734 (KBC): valid
    // IBANs, but not accounts of this bank, on either host.
    for iban in ["BE68539007547034", "BE36734012345681"] {
        for brand in [Brand::Belfius, Brand::Banx] {
            let mut o = with_debtor("E2E-ACC9", iban);
            o.brand = brand;
            assert_eq!(
                refused_code(env.client.initiate_payment(&o, &challenge(), None).await),
                (403, "B14800ZZ-3002-000000".to_owned(), E::InvalidAccount),
                "{iban} at {brand:?}"
            );
        }
    }
    // The codes are settings.
    let other = env_with(|c| c.belfius_bank_codes = vec!["539".into()]).await;
    other
        .client
        .initiate_payment(
            &with_debtor("E2E-ACC10", "BE68539007547034"),
            &challenge(),
            None,
        )
        .await
        .unwrap();
    let (status, code, _) = refused_code(
        other
            .client
            .initiate_payment(
                &with_debtor("E2E-ACC11", BELFIUS_DEBTOR),
                &challenge(),
                None,
            )
            .await,
    );
    assert_eq!((status, code.as_str()), (403, "B14800ZZ-3002-000000"));
}

#[tokio::test]
async fn refresh_tokens_expire() {
    let env = env_with(|c| c.refresh_token_lifetime = Duration::from_millis(1000)).await;
    let (_, tokens) = env.signed_with_tokens("E2E-RTX", "alice").await;
    let rotated = env
        .client
        .refresh_token(Brand::Belfius, tokens.refresh_token.as_ref().unwrap())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = refused(
        env.client
            .refresh_token(Brand::Belfius, rotated.refresh_token.as_ref().unwrap())
            .await,
    );
    assert_eq!((status, body.error_code.as_str()), (401, "GEN-1203-100004"));
    assert!(body.error_description.contains("expired"), "{body:?}");
    // Expired is not "replaced": not counted as such.
    assert_eq!(env.counters().await["invalidated_token_uses"], 0);
    // The lifetime is a run-time setting too.
    let (status, body) = env
        .admin_post_json(
            "admin/config",
            Some(json!({"refresh_token_lifetime_secs": 7_776_000})),
        )
        .await;
    assert_eq!(
        (status, body["refresh_token_lifetime_secs"].as_u64()),
        (StatusCode::OK, Some(7_776_000))
    );
}

#[tokio::test]
async fn one_signature_encoding_is_accepted() {
    let padded_bank = env().await;
    let mut config = padded_bank.sandbox.belfius_config().unwrap();
    let qseal = config.qseal.as_mut().unwrap();
    assert_eq!(qseal.format.encoding, SignatureEncoding::Base64Padded);
    qseal.format.encoding = SignatureEncoding::Base64UrlNoPad;
    let url_client = BelfiusClient::new(config).unwrap();
    let (status, body) = refused(
        url_client
            .initiate_payment(&order("E2E-ENC1"), &challenge(), None)
            .await,
    );
    assert_eq!((status, body.error_code.as_str()), (401, "GEN-1203-100008"));
    assert!(body.error_description.contains("padding"), "{body:?}");

    // A bank configured for base64url: the other way round.
    let url_bank = env_with(|c| c.signature_encoding = SignatureEncoding::Base64UrlNoPad).await;
    let mut config = url_bank.sandbox.belfius_config().unwrap();
    config.qseal.as_mut().unwrap().format.encoding = SignatureEncoding::Base64UrlNoPad;
    BelfiusClient::new(config)
        .unwrap()
        .initiate_payment(&order("E2E-ENC2"), &challenge(), None)
        .await
        .unwrap();
    let (status, code, _) = refused_code(
        url_bank
            .client
            .initiate_payment(&order("E2E-ENC3"), &challenge(), None)
            .await,
    );
    assert_eq!((status, code.as_str()), (401, "GEN-1203-100008"));
    let counters = url_bank.counters().await;
    assert_eq!(
        (
            counters["signatures_checked"].as_u64(),
            counters["signatures_failed"].as_u64()
        ),
        (Some(2), Some(1))
    );
}

// =============================================================================================
// The rest of the portal: consent URIs, consent codes at /token, funds confirmation.

impl Env {
    /// A consent of `scope` requested through the client, granted by `psu`, its code
    /// exchanged: the pair of that scope.
    async fn consented(&self, scope: ConsentScope, iban: Option<&str>, psu: &str) -> TokenPair {
        let pkce = Pkce::generate();
        let uris = self
            .client
            .consent_uris(&ConsentRequest {
                brand: Brand::Belfius,
                scope,
                iban,
                language: Some(Language::Nl),
                redirect_uri: REDIRECT,
                code_challenge: &pkce.challenge,
            })
            .await
            .unwrap();
        let redirect = self.grant_consent(&uris[0].consent_uri, psu).await;
        let code = SecretString::from(query(&redirect, "code").unwrap());
        self.client
            .exchange_code(Brand::Belfius, &code, &pkce.verifier, REDIRECT)
            .await
            .unwrap()
    }

    /// The PSU grants the consent its URI names (the operator API stands in for the page).
    async fn grant_consent(&self, consent_uri: &str, psu: &str) -> url::Url {
        let id = consent_id(consent_uri);
        let (status, body) = self
            .admin_post(&format!("admin/consents/{id}/grant?psu={psu}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "GRANTED");
        url::Url::parse(body["redirect_url"].as_str().unwrap()).unwrap()
    }

    /// The headers of a well-formed `GET /consent-uris`; tests break one thing at a time.
    fn consent_headers(&self, version: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let mut set = |name: &'static str, value: &str| {
            headers.insert(name, HeaderValue::from_str(value).unwrap());
        };
        set("request-id", &uuid::Uuid::new_v4().to_string());
        set("accept", &accept_header(version));
        set("client-id", self.sandbox.client_id());
        set("redirect-uri", REDIRECT);
        set("code-challenge", &challenge());
        set("code-challenge-method", "S256");
        headers
    }

    async fn raw_consent(&self, query: &str, headers: HeaderMap) -> reqwest::Response {
        let url = self
            .sandbox
            .api_base_url()
            .join(&format!("consent-uris?{query}"))
            .unwrap();
        self.raw().get(url).headers(headers).send().await.unwrap()
    }
}

/// The consent id is the last path segment of a consent URI.
fn consent_id(consent_uri: &str) -> String {
    let url = url::Url::parse(consent_uri).unwrap();
    url.path_segments().unwrap().next_back().unwrap().to_owned()
}

#[tokio::test]
async fn consent_uris_answer_per_language_and_a_granted_consent_gives_a_scoped_pair() {
    let env = env().await;
    let pkce = Pkce::generate();
    let mut request = ConsentRequest {
        brand: Brand::Belfius,
        scope: ConsentScope::Ais,
        iban: None,
        language: None,
        redirect_uri: REDIRECT,
        code_challenge: &pkce.challenge,
    };
    // No language: every language's URI.
    let all = env.client.consent_uris(&request).await.unwrap();
    let languages: Vec<&str> = all.iter().map(|u| u.language.as_str()).collect();
    assert_eq!(languages, ["fr", "nl"]);
    // One language: its URI only.
    request.language = Some(Language::Nl);
    let uris = env.client.consent_uris(&request).await.unwrap();
    assert_eq!(uris.len(), 1);
    assert_eq!(uris[0].language, "nl");

    // The PSU's page, then the grant through the page's own button (a browser's POST): 303
    // back to the TPP with a code and the state the TPP appended.
    let page = format!("{}&state=tpp-consent-1", uris[0].consent_uri);
    let html = env
        .admin
        .get(&page)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("AIS consent on BELFIUS"), "{html}");
    let id = consent_id(&uris[0].consent_uri);
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let form = browser
        .post(
            env.sandbox
                .admin_base_url()
                .join(&format!("consent/{id}/grant"))
                .unwrap(),
        )
        .header("content-type", "application/x-www-form-urlencoded")
        .body("psu=alice&state=tpp-consent-1")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), StatusCode::SEE_OTHER);
    let back = url::Url::parse(form.headers()["location"].to_str().unwrap()).unwrap();
    assert_eq!(query(&back, "state").as_deref(), Some("tpp-consent-1"));
    let code = SecretString::from(query(&back, "code").unwrap());

    let ais = env
        .client
        .exchange_code(Brand::Belfius, &code, &pkce.verifier, REDIRECT)
        .await
        .unwrap();
    assert_eq!(ais.scope.as_deref(), Some("AIS"));
    // An AIS token is not a PIS token: it cannot read a payment.
    let (initiated, pis) = env.signed_with_tokens("E2E-CONSENT", "alice").await;
    let (status, code, _) = refused_code(
        env.client
            .payment_details(
                PaymentKind::Single,
                Brand::Belfius,
                PaymentProduct::SepaCreditTransfers,
                &initiated.bank_payment_id,
                &ais.access_token,
            )
            .await,
    );
    assert_eq!((status, code.as_str()), (401, "GEN-1203-100003"));
    // And a consent does not replace the PSU's PIS pair (one pair per scope).
    let _caf = env
        .consented(ConsentScope::Caf, Some(BELFIUS_DEBTOR), "alice")
        .await;
    assert!(
        env.client
            .payment_details(
                PaymentKind::Single,
                Brand::Belfius,
                PaymentProduct::SepaCreditTransfers,
                &initiated.bank_payment_id,
                &pis.access_token,
            )
            .await
            .is_ok()
    );
    // The consent is listed, granted, with its PSU.
    let (_, listed) = env.admin_get("admin/consents").await;
    let granted = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id.as_str())
        .unwrap();
    assert_eq!(granted["status"], "GRANTED");
    assert_eq!(granted["psu"], "alice");
    assert_eq!(granted["scope"], "AIS");
}

#[tokio::test]
async fn consent_uris_refusals() {
    let env = env().await;
    // Each refusal, then the control: the same request well-formed is answered.
    type Breaks = Box<dyn Fn(&mut HeaderMap)>;
    let cases: Vec<(&str, &str, Breaks, u16, &str)> = vec![
        ("", "4", Box::new(|_| {}), 400, "GEN-1201-100002"),
        ("scope=PIS", "4", Box::new(|_| {}), 400, "GEN-1202-100002"),
        ("scope=AIS", "3", Box::new(|_| {}), 400, "GEN-1202-100001"),
        (
            "scope=AIS&iban=BE71096123456769",
            "4",
            Box::new(|_| {}),
            400,
            "GEN-1202-100002",
        ),
        ("scope=CAF", "3", Box::new(|_| {}), 400, "GEN-1201-100002"),
        (
            "scope=CAF&iban=BE71096123456768",
            "3",
            Box::new(|_| {}),
            400,
            "GEN-1202-100002",
        ),
        // A Banx account on the Belfius host.
        (
            "scope=CAF&iban=BE76977123456795",
            "3",
            Box::new(|_| {}),
            403,
            "B14800ZZ-3007-000000",
        ),
        (
            "scope=AIS",
            "4",
            Box::new(|h: &mut HeaderMap| {
                h.insert(
                    "redirect-uri",
                    HeaderValue::from_static("https://evil.example/cb"),
                );
            }),
            400,
            "GEN-1202-100001",
        ),
        (
            "scope=AIS",
            "4",
            Box::new(|h: &mut HeaderMap| {
                h.remove("code-challenge");
            }),
            400,
            "GEN-1201-100001",
        ),
        (
            "scope=AIS",
            "4",
            Box::new(|h: &mut HeaderMap| {
                h.insert("client-id", HeaderValue::from_static("someone-else"));
            }),
            401,
            "GEN-1203-100009",
        ),
    ];
    for (query, version, breaks, status, code) in cases {
        let mut headers = env.consent_headers(version);
        breaks(&mut headers);
        let (got_status, _, got_code) = error_triple(env.raw_consent(query, headers).await).await;
        assert_eq!(
            (got_status.as_u16(), got_code.as_str()),
            (status, code),
            "{query} v{version}"
        );
    }
    // A language the bank has no page in: 406 [P].
    let mut headers = env.consent_headers("4");
    headers.insert("accept-language", HeaderValue::from_static("en"));
    let response = env.raw_consent("scope=AIS", headers).await;
    assert_eq!(response.status(), StatusCode::NOT_ACCEPTABLE);
    // Controls.
    for (query, version) in [("scope=AIS", "4"), ("scope=CAF&iban=BE71096123456769", "3")] {
        let response = env.raw_consent(query, env.consent_headers(version)).await;
        assert_eq!(response.status(), StatusCode::OK, "{query}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body.as_array().map(Vec::len), Some(2), "{body}");
    }
    // Through the client, a refusal is typed.
    let pkce = Pkce::generate();
    let (status, code, _) = refused_code(
        env.client
            .consent_uris(&ConsentRequest {
                brand: Brand::Belfius,
                scope: ConsentScope::Caf,
                iban: None,
                language: Some(Language::Fr),
                redirect_uri: REDIRECT,
                code_challenge: &pkce.challenge,
            })
            .await,
    );
    assert_eq!((status, code.as_str()), (400, "GEN-1201-100002"));
}

#[tokio::test]
async fn a_refused_consent_sends_the_psu_back_with_access_denied_and_no_code() {
    let env = env().await;
    let pkce = Pkce::generate();
    let uris = env
        .client
        .consent_uris(&ConsentRequest {
            brand: Brand::Belfius,
            scope: ConsentScope::Ais,
            iban: None,
            language: Some(Language::Fr),
            redirect_uri: REDIRECT,
            code_challenge: &pkce.challenge,
        })
        .await
        .unwrap();
    let id = consent_id(&uris[0].consent_uri);
    let (status, body) = env
        .admin_post(&format!("admin/consents/{id}/refuse?state=s-1"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "REFUSED");
    let back = url::Url::parse(body["redirect_url"].as_str().unwrap()).unwrap();
    assert_eq!(query(&back, "error").as_deref(), Some("access_denied"));
    assert_eq!(query(&back, "state").as_deref(), Some("s-1"));
    assert_eq!(query(&back, "code"), None);
    // Acting again is a conflict.
    let (status, _) = env.admin_post(&format!("admin/consents/{id}/grant")).await;
    assert_eq!(status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn funds_confirmation_answers_from_the_ledger_under_a_caf_token_for_that_account() {
    let env = env().await;
    let caf = env
        .consented(ConsentScope::Caf, Some(BELFIUS_DEBTOR), "carol")
        .await;
    assert_eq!(caf.scope.as_deref(), Some("CAF"));
    let (status, _) = env
        .admin_post_json(
            &format!("admin/accounts/{BELFIUS_DEBTOR}/balance"),
            Some(json!({"balance": "50.00"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let ask = |minor: i64| {
        env.client.funds_available(
            Brand::Belfius,
            &caf.access_token,
            BELFIUS_DEBTOR,
            Amount::from_minor(minor),
            "EUR",
        )
    };
    assert!(ask(5_000).await.unwrap());
    assert!(!ask(5_001).await.unwrap());

    // Settlement moves the balance: a payment of 30.00 from the account, signed and settled,
    // leaves 20.00, and is booked with its end-to-end id.
    let mut paying = order("E2E-CAF-SETTLE");
    paying.amount = Amount::from_minor(3_000);
    paying.debtor_iban = Some(BELFIUS_DEBTOR.into());
    let initiated = env
        .client
        .initiate_payment(&paying, &challenge(), None)
        .await
        .unwrap();
    env.sign("E2E-CAF-SETTLE").await;
    tokio::time::sleep(SETTLE + Duration::from_millis(100)).await;
    assert_eq!(env.status(&initiated.bank_payment_id).await, "ACSC");
    assert!(ask(2_000).await.unwrap());
    assert!(!ask(2_001).await.unwrap());
    let (_, account) = env
        .admin_get(&format!("admin/accounts/{BELFIUS_DEBTOR}"))
        .await;
    assert_eq!(account["balance"], "20.00");
    let bookings = account["bookings"].as_array().unwrap();
    assert_eq!(bookings.len(), 1, "{account}");
    assert_eq!(bookings[0]["end_to_end_id"], "E2E-CAF-SETTLE");
    assert_eq!(bookings[0]["amount_minor"], -3_000);

    // Another account than the consent's: refused. A PIS token: refused.
    let (status, code, _) = refused_code(
        env.client
            .funds_available(
                Brand::Belfius,
                &caf.access_token,
                "BE41063012345610",
                Amount::from_minor(1),
                "EUR",
            )
            .await,
    );
    assert_eq!((status, code.as_str()), (403, "GEN-1203-100003"));
    let (_, pis) = env.signed_with_tokens("E2E-CAF-PIS", "carol").await;
    let (status, code, _) = refused_code(
        env.client
            .funds_available(
                Brand::Belfius,
                &pis.access_token,
                BELFIUS_DEBTOR,
                Amount::from_minor(1),
                "EUR",
            )
            .await,
    );
    assert_eq!((status, code.as_str()), (401, "GEN-1203-100003"));
    // Or the token of the other brand's host (tokens are brand-bound).
    let (status, code, _) = refused_code(
        env.client
            .funds_available(
                Brand::Banx,
                &caf.access_token,
                BELFIUS_DEBTOR,
                Amount::from_minor(1),
                "EUR",
            )
            .await,
    );
    assert_eq!((status, code.as_str()), (401, "GEN-1203-100003"));

    // Raw: a number amount and a wrong version are refused.
    let url = env
        .sandbox
        .api_base_url()
        .join("funds-confirmations")
        .unwrap();
    for (version, amount, code) in [
        ("1", json!(12.0), "GEN-1202-100002"),
        ("2", json!("12.00"), "GEN-1202-100001"),
    ] {
        let response = env
            .raw()
            .post(url.clone())
            .header("request-id", uuid::Uuid::new_v4().to_string())
            .header("accept", accept_header(version))
            .header("client-id", env.sandbox.client_id())
            .header("content-type", "application/json")
            .bearer_auth(caf.access_token.expose_secret())
            .json(&json!({"account": {"iban": BELFIUS_DEBTOR},
                          "instructed_amount": {"currency": "EUR", "amount": amount}}))
            .send()
            .await
            .unwrap();
        let (status, _, got) = error_triple(response).await;
        assert_eq!((status.as_u16(), got.as_str()), (400, code), "v{version}");
    }
    let counters = env.counters().await;
    assert_eq!(counters["funds_confirmations"], 4);
    // Each answer, by account and amount (minor units).
    let answers = &counters["funds_answers"];
    assert_eq!(
        answers[format!("{BELFIUS_DEBTOR}/5000")],
        json!({"available": 1, "unavailable": 0}),
        "{counters}"
    );
    assert_eq!(
        answers[format!("{BELFIUS_DEBTOR}/5001")],
        json!({"available": 0, "unavailable": 1})
    );
    assert_eq!(answers.as_object().map(|a| a.len()), Some(4), "{answers}");
}

#[tokio::test]
async fn account_information_lists_the_granted_accounts_and_pages_their_settled_history() {
    let env = env().await;
    const SECOND: &str = "BE41063012345610";
    for iban in [BELFIUS_DEBTOR, SECOND] {
        let (status, _) = env
            .admin_post_json(
                &format!("admin/accounts/{iban}/balance"),
                Some(json!({"balance": "1000.00", "psu": "dora"})),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    // Three payments from the first account, signed by its holder, settled.
    for i in 1..=3 {
        let e2e = format!("E2E-AIS-{i}");
        let mut paying = order(&e2e);
        paying.amount = Amount::from_minor(100 * i);
        paying.debtor_iban = Some(BELFIUS_DEBTOR.into());
        env.client
            .initiate_payment(&paying, &challenge(), None)
            .await
            .unwrap();
        env.sign_as(&e2e, "dora").await;
    }
    tokio::time::sleep(SETTLE + Duration::from_millis(100)).await;

    let ais = env.consented(ConsentScope::Ais, None, "dora").await;
    let accounts = env
        .client
        .accounts(Brand::Belfius, &ais.access_token)
        .await
        .unwrap();
    let mut ibans: Vec<&str> = accounts.iter().map(|a| a.iban.as_str()).collect();
    ibans.sort_unstable();
    assert_eq!(ibans, [SECOND, BELFIUS_DEBTOR]);
    let first = accounts.iter().find(|a| a.iban == BELFIUS_DEBTOR).unwrap();
    // Settled by now (nobody read their status: the bank settles all the same).
    assert_eq!(first.balance.as_deref(), Some("994.00"));

    // Two pages of two, newest first; the e2e ids and signed amounts are there.
    let page = |next: Option<String>| {
        let token = ais.access_token.clone();
        let id = first.logical_id.clone();
        let client = &env.client;
        async move {
            client
                .transactions(
                    Brand::Belfius,
                    &token,
                    &id,
                    TransactionQuery {
                        next: next.as_deref(),
                        page_size: Some(2),
                        psu_involved: true,
                        ..TransactionQuery::default()
                    },
                )
                .await
                .unwrap()
        }
    };
    let one = page(None).await;
    let two = page(one.next_page_key.clone()).await;
    assert!(two.next_page_key.is_none(), "{two:?}");
    let seen: Vec<(Option<&str>, &str)> = one
        .booked
        .iter()
        .chain(&two.booked)
        .map(|b| (b.end_to_end_id.as_deref(), b.amount.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (Some("E2E-AIS-3"), "-3.00"),
            (Some("E2E-AIS-2"), "-2.00"),
            (Some("E2E-AIS-1"), "-1.00")
        ]
    );

    // Four unattended calls per account and day, then 429 until the window moves.
    let unattended = || {
        env.client.transactions(
            Brand::Belfius,
            &ais.access_token,
            &first.logical_id,
            TransactionQuery::default(),
        )
    };
    for _ in 0..4 {
        unattended().await.unwrap();
    }
    let refused = unattended().await;
    assert!(
        matches!(refused, Err(BankError::RateLimited { .. })),
        "{refused:?}"
    );
    // The other account has its own four; a PSU-involved call is not counted.
    page(None).await;
    let counters = env.counters().await;
    assert_eq!(
        counters["unattended_reads"],
        json!({BELFIUS_DEBTOR: 4}),
        "{counters}"
    );
    assert_eq!(counters["unattended_refused"], json!({BELFIUS_DEBTOR: 1}));

    // An account outside the consent is 404; a CAF token is no AIS token.
    let url = env
        .sandbox
        .api_base_url()
        .join("accounts/00000000-0000-0000-0000-000000000000/transactions")
        .unwrap();
    let response = env
        .raw()
        .get(url)
        .header("request-id", uuid::Uuid::new_v4().to_string())
        .header("accept", accept_header("3"))
        .header("client-id", env.sandbox.client_id())
        .bearer_auth(ais.access_token.expose_secret())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let caf = env
        .consented(ConsentScope::Caf, Some(BELFIUS_DEBTOR), "dora")
        .await;
    let (status, code, _) =
        refused_code(env.client.accounts(Brand::Belfius, &caf.access_token).await);
    assert_eq!((status, code.as_str()), (401, "GEN-1203-100003"));
}
