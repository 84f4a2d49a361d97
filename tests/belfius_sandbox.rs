//! Contract tests: the Belfius client against the sandbox simulator, over real HTTPS with mutual
//! TLS, both in this process.

use std::time::Duration;

use pis_worker::belfius::client::accept_header;
use pis_worker::belfius::pkce::Pkce;
use pis_worker::belfius::status::TransactionStatus;
use pis_worker::belfius::{BankError, BelfiusClient, BelfiusConfig};
use pis_worker::domain::bank::BankProgress;
use pis_worker::domain::model::{
    Amount, BankPaymentId, Brand, Language, PaymentOrder, PaymentProduct,
};
use pis_worker::sandbox::{self, RunningSandbox, SandboxConfig};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{Value, json};
use tempfile::TempDir;

const REDIRECT: &str = "https://tpp.example/callback";
/// Long enough that a status read right after signing still sees ACTC on a loaded machine.
const SETTLE: Duration = Duration::from_millis(800);

struct Env {
    sandbox: RunningSandbox,
    client: BelfiusClient,
    admin: reqwest::Client,
    _dir: TempDir,
}

async fn env_with(adjust: impl FnOnce(&mut SandboxConfig)) -> Env {
    let dir = TempDir::new().unwrap();
    let mut config = SandboxConfig::local(dir.path().join("tls"));
    config.settle_after = SETTLE;
    adjust(&mut config);
    let sandbox = sandbox::start(config).await.unwrap();
    let client = BelfiusClient::new(sandbox.belfius_config().unwrap()).unwrap();
    Env {
        sandbox,
        client,
        admin: reqwest::Client::new(),
        _dir: dir,
    }
}

async fn env() -> Env {
    env_with(|_| {}).await
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

impl Env {
    async fn admin_get(&self, path: &str) -> (StatusCode, Value) {
        let url = self.sandbox.admin_base_url().join(path).unwrap();
        let response = self.admin.get(url).send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    async fn admin_post(&self, path: &str) -> (StatusCode, Value) {
        let url = self.sandbox.admin_base_url().join(path).unwrap();
        let response = self.admin.post(url).send().await.unwrap();
        let status = response.status();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    async fn counters(&self) -> Value {
        self.admin_get("admin/counters").await.1
    }

    async fn status(&self, id: &BankPaymentId) -> String {
        self.client
            .payment_status(Brand::Belfius, PaymentProduct::SepaCreditTransfers, id)
            .await
            .unwrap()
    }

    /// PSU signs; returns the redirect URL the browser would follow.
    async fn sign(&self, e2e: &str) -> url::Url {
        let (status, body) = self.admin_post(&format!("admin/e2e/{e2e}/sign")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "ACTC");
        url::Url::parse(body["redirect_url"].as_str().unwrap()).unwrap()
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
        set("code-challenge", &Pkce::generate().challenge);
        set("code-challenge-method", "S256");
        set("content-type", "application/json");
        headers
    }

    async fn raw_initiation(&self, headers: HeaderMap, body: &Value) -> reqwest::Response {
        let url = self
            .sandbox
            .api_base_url()
            .join("payments/sepa-credit-transfers")
            .unwrap();
        self.raw()
            .post(url)
            .headers(headers)
            .body(serde_json::to_vec(body).unwrap())
            .send()
            .await
            .unwrap()
    }

    /// Status and `(error, error_code)` of an initiation answer.
    async fn raw_error(&self, headers: HeaderMap, body: &Value) -> (StatusCode, String, String) {
        let response = self.raw_initiation(headers, body).await;
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        (
            status,
            body["error"].as_str().unwrap().to_owned(),
            body["error_code"].as_str().unwrap().to_owned(),
        )
    }
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

fn refused(
    result: Result<impl std::fmt::Debug, BankError>,
) -> (u16, pis_worker::belfius::ErrorBody) {
    match result {
        Err(BankError::Refused { status, body }) => (status, body),
        other => panic!("expected Refused, got {other:?}"),
    }
}

#[tokio::test]
async fn initiation_returns_bank_id_sca_url_and_rcvd() {
    let env = env().await;
    let pkce = Pkce::generate();
    let initiated = env
        .client
        .initiate_payment(&order("E2E-INIT"), &pkce.challenge, None)
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
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let location = url::Url::parse(response.headers()["location"].to_str().unwrap()).unwrap();
    assert!(location.as_str().starts_with(REDIRECT), "{location}");
    assert!(query(&location, "code").is_some());
    assert_eq!(env.status(&initiated.bank_payment_id).await, "ACTC");
}

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
    assert_eq!(query(&redirect, "state").as_deref(), Some(id.as_str()));
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

    let counters = env.counters().await;
    assert_eq!(counters["tokens_issued"], 1);
    assert_eq!(counters["token_failures"], 3);
}

#[tokio::test]
async fn access_token_replaces_pkce_and_refresh_rotates_the_pair() {
    let env = env().await;
    let pkce = Pkce::generate();
    env.client
        .initiate_payment(&order("E2E-T1"), &pkce.challenge, None)
        .await
        .unwrap();
    let code = SecretString::from(query(&env.sign("E2E-T1").await, "code").unwrap());
    let tokens = env
        .client
        .exchange_code(Brand::Belfius, &code, &pkce.verifier, REDIRECT)
        .await
        .unwrap();

    // Second payment with the token: accepted without PKCE, and no code comes back.
    env.client
        .initiate_payment(&order("E2E-T2"), "", Some(&tokens.access_token))
        .await
        .unwrap();
    let redirect = env.sign("E2E-T2").await;
    assert_eq!(query(&redirect, "code"), None);
    assert!(query(&redirect, "state").is_some());

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
    // One pair per scope: the old access token and the old refresh token are dead.
    let (status, body) = refused(
        env.client
            .initiate_payment(&order("E2E-T3"), "", Some(&tokens.access_token))
            .await,
    );
    assert_eq!((status, body.error_code.as_str()), (401, "GEN-1203-100003"));
    let (status, body) = refused(env.client.refresh_token(Brand::Belfius, &refresh).await);
    assert_eq!((status, body.error_code.as_str()), (401, "GEN-1203-100004"));
    env.client
        .initiate_payment(&order("E2E-T3"), "", Some(&rotated.access_token))
        .await
        .unwrap();
}

#[tokio::test]
async fn psu_reject_gives_rjct_and_an_error_redirect() {
    let env = env().await;
    let initiated = env
        .client
        .initiate_payment(&order("E2E-REJ"), &Pkce::generate().challenge, None)
        .await
        .unwrap();
    let (status, body) = env.admin_post("admin/e2e/E2E-REJ/reject").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let redirect = url::Url::parse(body["redirect_url"].as_str().unwrap()).unwrap();
    assert_eq!(query(&redirect, "error").as_deref(), Some("access_denied"));
    assert_eq!(
        query(&redirect, "error_description").as_deref(),
        Some("PSU refused")
    );
    assert_eq!(
        query(&redirect, "state").as_deref(),
        Some(initiated.bank_payment_id.as_str())
    );
    assert_eq!(query(&redirect, "code"), None);
    assert_eq!(env.status(&initiated.bank_payment_id).await, "RJCT");

    // Acting again on a final payment is a conflict.
    let (status, body) = env.admin_post("admin/e2e/E2E-REJ/sign").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, _) = env.admin_post("admin/e2e/NO-SUCH-E2E/sign").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

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

    assert_eq!(env.counters().await["initiations"], 0);
    assert_eq!(env.counters().await["initiation_requests"], 7);
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
    with_debtor["debtor_account"] = json!({"iban": "BE68539007547034"});
    let response = env
        .raw_initiation(env.initiation_headers(&fresh()), &with_debtor)
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let counters = env.counters().await;
    assert_eq!(counters["initiations"], 1);
    assert_eq!(counters["initiation_requests"], 5);

    // Unknown product in the path.
    let url = env.sandbox.api_base_url().join("payments/bitcoin").unwrap();
    let response = env
        .raw()
        .post(url)
        .headers(env.initiation_headers(&fresh()))
        .body(serde_json::to_vec(&valid_body("E2E-B6")).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn zero_amount_and_foreign_currency_are_refused_by_code() {
    let env = env().await;
    let mut zero = order("E2E-ZERO");
    zero.amount = Amount::from_minor(0);
    let (status, body) = refused(
        env.client
            .initiate_payment(&zero, &Pkce::generate().challenge, None)
            .await,
    );
    assert_eq!(status, 400);
    assert_eq!(body.error, "INVALID_INPUT");
    assert_eq!(body.error_code, "B14821ZZ-1231-000000");

    let mut dollars = order("E2E-USD");
    dollars.currency = "USD".into();
    let (_, body) = refused(
        env.client
            .initiate_payment(&dollars, &Pkce::generate().challenge, None)
            .await,
    );
    assert_eq!(body.error_code, "B14821ZZ-1232-000000");

    // Cross-border may be in another currency.
    let mut cross = dollars.clone();
    cross.product = PaymentProduct::CrossBorderCreditTransfers;
    cross.end_to_end_id = "E2E-XB".into();
    let initiated = env
        .client
        .initiate_payment(&cross, &Pkce::generate().challenge, None)
        .await
        .unwrap();
    // The status endpoint is per product.
    let status = env
        .client
        .payment_status(
            Brand::Banx,
            PaymentProduct::CrossBorderCreditTransfers,
            &initiated.bank_payment_id,
        )
        .await
        .unwrap();
    assert_eq!(status, "RCVD");
    let (status, _) = refused(
        env.client
            .payment_status(
                Brand::Belfius,
                PaymentProduct::SepaCreditTransfers,
                &initiated.bank_payment_id,
            )
            .await,
    );
    assert_eq!(status, 404);
    assert_eq!(env.counters().await["initiations"], 1);
}

#[tokio::test]
async fn client_without_certificate_is_stopped_at_the_handshake() {
    let env = env().await;
    let mut config: BelfiusConfig = env.sandbox.belfius_config().unwrap();
    config.qwac = None;
    let no_cert = BelfiusClient::new(config).unwrap();
    let result = no_cert
        .initiate_payment(&order("E2E-NOCERT"), &Pkce::generate().challenge, None)
        .await;
    // Refused during the handshake: the bank processed nothing, so a retry is safe.
    match &result {
        Err(BankError::NotSent(detail)) => assert!(detail.contains("Certificate"), "{detail}"),
        other => panic!("expected NotSent, got {other:?}"),
    }
    let status = no_cert
        .payment_status(
            Brand::Belfius,
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
        .initiate_payment(&order("E2E-NOCERT"), &Pkce::generate().challenge, None)
        .await
        .unwrap();
    assert_eq!(env.counters().await["initiation_requests"], 1);
}

#[tokio::test]
async fn counters_count_initiations_per_end_to_end_id() {
    let env = env().await;
    for e2e in ["E2E-A", "E2E-A", "E2E-B"] {
        env.client
            .initiate_payment(&order(e2e), &Pkce::generate().challenge, None)
            .await
            .unwrap();
    }
    let counters = env.counters().await;
    assert_eq!(
        counters["initiations_by_e2e"],
        json!({"E2E-A": 2, "E2E-B": 1})
    );
    assert_eq!(counters["initiations"], 3);
    let (_, list) = env.admin_get("admin/payments").await;
    assert_eq!(list.as_array().unwrap().len(), 3);

    let (status, _) = env.admin_post("admin/reset").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let counters = env.counters().await;
    assert_eq!(counters["initiations"], 0);
    assert_eq!(counters["initiations_by_e2e"], json!({}));
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
    let (status, body) = refused(
        impostor
            .exchange_code(Brand::Belfius, &code, &pkce.verifier, REDIRECT)
            .await,
    );
    assert_eq!((status, body.error_code.as_str()), (401, "GEN-1203-100009"));
    // The code was not burnt by the impostor.
    env.client
        .exchange_code(Brand::Belfius, &code, &pkce.verifier, REDIRECT)
        .await
        .unwrap();
}

#[tokio::test]
async fn location_only_answer_is_understood() {
    let env = env().await;
    let mut o = order("E2E-LOC");
    o.creditor_name = "LOCATION-ONLY NV".into();
    let initiated = env
        .client
        .initiate_payment(&o, &Pkce::generate().challenge, None)
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
    let env = env_with(|c| c.sca_expiry = Duration::from_millis(2500)).await;
    let challenge = Pkce::generate().challenge;
    let mut auto = order("E2E-AUTO");
    auto.creditor_name = "AUTO-REJECT BV".into();
    let auto = env
        .client
        .initiate_payment(&auto, &challenge, None)
        .await
        .unwrap();
    let mut multi = order("E2E-MULTI");
    multi.creditor_name = "MULTI-SIGN BV".into();
    let multi = env
        .client
        .initiate_payment(&multi, &challenge, None)
        .await
        .unwrap();
    let idle = env
        .client
        .initiate_payment(&order("E2E-IDLE"), &challenge, None)
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
    tokio::time::sleep(Duration::from_millis(2600)).await;
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
        .initiate_payment(&order("E2E-GLOBAL"), &Pkce::generate().challenge, None)
        .await
        .unwrap();
    assert_eq!(env.status(&initiated.bank_payment_id).await, "RCVD");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(env.status(&initiated.bank_payment_id).await, "ACTC");
    tokio::time::sleep(SETTLE).await;
    assert_eq!(env.status(&initiated.bank_payment_id).await, "ACSC");
}

#[tokio::test]
async fn outages_rate_limits_and_lost_responses_map_to_bank_errors() {
    let env = env().await;
    let challenge = Pkce::generate().challenge;

    let mut down = order("E2E-503");
    down.creditor_name = "FAIL-503".into();
    match env.client.initiate_payment(&down, &challenge, None).await {
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
    match env
        .client
        .initiate_payment(&limited, &challenge, None)
        .await
    {
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
    match impatient.initiate_payment(&slow, &challenge, None).await {
        Err(BankError::NoResponse(_)) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(env.counters().await["initiations_by_e2e"]["E2E-SLOW"], 1);
}

#[tokio::test]
async fn restarted_sandbox_reuses_its_pki() {
    let dir = TempDir::new().unwrap();
    let tls_dir = dir.path().join("tls");
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
    // The old client configuration (old certificate, new port) still works.
    let mut config = config;
    config.belfius_base_url = second.api_base_url();
    let client = BelfiusClient::new(config).unwrap();
    client
        .initiate_payment(&order("E2E-RESTART"), &Pkce::generate().challenge, None)
        .await
        .unwrap();
}
