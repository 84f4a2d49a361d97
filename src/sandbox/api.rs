//! The simulated bank API (served over mutual TLS): initiation, status, token.
//!
//! Validation follows what Belfius documents (belfius-api.md §2.2, §2.5, §3.2, §5); where the
//! docs are silent the choice is marked [I] and listed in docs/belfius.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chrono::{NaiveDate, Utc};
use secrecy::ExposeSecret as _;
use serde_json::{Value, json};

use super::Shared;
use super::store::{AutoAction, Challenge, ChallengeMethod, GrantError, NewPayment, Scenario};
use crate::belfius::ErrorBody;
use crate::belfius::client::headers as h;
use crate::domain::model::{Amount, Language, PaymentProduct};

/// Versions the simulator accepts per endpoint (`Accept: ...; version=N`). The client's
/// defaults are in `belfius::ApiVersions`; token accepts the versions seen in the wild [C][P].
pub const INITIATION_VERSIONS: &[&str] = &["3"];
pub const STATUS_VERSIONS: &[&str] = &["1"];
pub const TOKEN_VERSIONS: &[&str] = &["1", "1.1", "3"];

const MEDIA_TYPE: &str = "application/vnd.belfius.api+json";

/// Magic words in `creditor_name` that pick a scenario (docs/belfius.md, "Scenarios").
pub mod scenario {
    pub const AUTO_SIGN: &str = "AUTO-SIGN";
    pub const AUTO_REJECT: &str = "AUTO-REJECT";
    pub const MULTI_SIGN: &str = "MULTI-SIGN";
    pub const LOCATION_ONLY: &str = "LOCATION-ONLY";
    /// Refuse with 503 before creating anything.
    pub const FAIL_503: &str = "FAIL-503";
    /// Refuse with 429 and `Retry-After: 1` before creating anything.
    pub const FAIL_429: &str = "FAIL-429";
    /// Create the payment, then answer only after [`super::SLOW_CREATE_DELAY`]: the client
    /// times out while the bank did act (outcome unknown).
    pub const SLOW_CREATE: &str = "SLOW-CREATE";
}

pub const SLOW_CREATE_DELAY: Duration = Duration::from_secs(60);

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/payments/{product}", post(initiate))
        .route("/payments/{product}/{id}/status", get(status))
        .route("/token", post(token))
        .fallback(not_found)
        .layer(middleware::from_fn(echo_request_id))
        .with_state(shared)
}

/// Every response carries `Response-ID` = the request's `Request-ID` [P][C].
async fn echo_request_id(request: Request, next: Next) -> Response {
    let request_id = request.headers().get(h::REQUEST_ID).cloned();
    let mut response = next.run(request).await;
    if let Some(id) = request_id {
        response.headers_mut().insert(h::RESPONSE_ID, id);
    }
    response
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        "GEN-1202-100002",
        "no such resource",
    )
}

// ---------------------------------------------------------------------------------------------
// Errors in the documented `{error, error_code, error_description}` shape [P §5].

pub struct ApiError {
    status: StatusCode,
    body: Option<ErrorBody>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, error: &str, code: &str, description: impl Into<String>) -> Self {
        Self {
            status,
            body: Some(ErrorBody {
                error: error.into(),
                error_code: code.into(),
                error_description: description.into(),
            }),
            retry_after: None,
        }
    }

    fn missing_header(name: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "MISSING_INPUT",
            "GEN-1201-100001",
            format!("Missing required header '{name}'"),
        )
    }

    fn invalid_header(name: &str, why: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "INVALID_INPUT",
            "GEN-1202-100001",
            format!("Invalid header '{name}': {why}"),
        )
    }

    fn missing_field(name: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "MISSING_INPUT",
            "GEN-1201-100002",
            format!("Missing required input '{name}'"),
        )
    }

    fn invalid_field(name: &str, why: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "INVALID_INPUT",
            "GEN-1202-100002",
            format!("Invalid input '{name}': {why}"),
        )
    }

    fn bad_client() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "FAILED_SECURITY_VALIDATION",
            "GEN-1203-100009",
            "Invalid Client-ID or client credentials",
        )
    }

    /// [P §2.2] 406 on a missing/unsupported language; no body is documented, none is sent.
    fn not_acceptable() -> Self {
        Self {
            status: StatusCode::NOT_ACCEPTABLE,
            body: None,
            retry_after: None,
        }
    }

    /// [I] /token grant failures use the current error model; RFC 6749's `invalid_grant`
    /// is kept in the description.
    fn invalid_grant(error: GrantError) -> Self {
        match error {
            GrantError::InvalidRefreshToken => Self::new(
                StatusCode::UNAUTHORIZED,
                "FAILED_SECURITY_VALIDATION",
                "GEN-1203-100004",
                "invalid refresh token",
            ),
            GrantError::UnknownCode
            | GrantError::CodeUsed
            | GrantError::CodeExpired
            | GrantError::RedirectMismatch
            | GrantError::VerifierMismatch => Self::new(
                StatusCode::BAD_REQUEST,
                "INVALID_INPUT",
                "GEN-1202-100002",
                format!("invalid_grant: {error}"),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = match self.body {
            Some(body) => (self.status, Json(body)).into_response(),
            None => self.status.into_response(),
        };
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

// ---------------------------------------------------------------------------------------------
// Header validation shared by the endpoints, in the order a gateway would check them.

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|v| Some(v.trim()))
            .map_err(|_| ApiError::invalid_header(name, "not visible ASCII")),
    }
}

fn required_header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
    match header_str(headers, name)? {
        Some(v) if !v.is_empty() => Ok(v),
        Some(_) | None => Err(ApiError::missing_header(name)),
    }
}

fn check_request_id(headers: &HeaderMap) -> Result<(), ApiError> {
    let value = required_header(headers, h::REQUEST_ID)?;
    match uuid::Uuid::parse_str(value) {
        Ok(id) if id.get_version_num() == 4 => Ok(()),
        Ok(_) | Err(_) => Err(ApiError::invalid_header(
            "Request-ID",
            "must be a UUID version 4",
        )),
    }
}

/// `fr` / `nl`, optionally with a region (`fr-BE`); the first listed language decides [I].
fn language(headers: &HeaderMap) -> Option<Language> {
    let value = headers.get(header::ACCEPT_LANGUAGE)?.to_str().ok()?;
    let first = value.split(',').next()?.split(';').next()?.trim();
    let primary = first.split('-').next()?;
    Language::parse(primary)
}

fn check_accept(headers: &HeaderMap, versions: &[&str]) -> Result<(), ApiError> {
    let value = required_header(headers, header::ACCEPT.as_str())?;
    let mut parts = value.split(';').map(str::trim);
    let media = parts.next().unwrap_or_default();
    let version = parts.find_map(|p| {
        p.split_once('=')
            .filter(|(k, _)| k.trim().eq_ignore_ascii_case("version"))
            .map(|(_, v)| v.trim().trim_matches('"'))
    });
    if !media.eq_ignore_ascii_case(MEDIA_TYPE) {
        return Err(ApiError::invalid_header(
            "Accept",
            "expected application/vnd.belfius.api+json; version=N",
        ));
    }
    match version {
        Some(v) if versions.contains(&v) => Ok(()),
        Some(_) | None => Err(ApiError::invalid_header(
            "Accept",
            &format!("supported versions: {}", versions.join(", ")),
        )),
    }
}

fn check_client_id(shared: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let value = required_header(headers, h::CLIENT_ID)?;
    if value == shared.client_id {
        Ok(())
    } else {
        Err(ApiError::bad_client())
    }
}

/// Request-ID, Accept-Language, Accept, Client-ID: the headers every PIS call carries [P §2.2].
fn check_common(shared: &Shared, headers: &HeaderMap, versions: &[&str]) -> Result<(), ApiError> {
    check_request_id(headers)?;
    if language(headers).is_none() {
        return Err(ApiError::not_acceptable());
    }
    check_accept(headers, versions)?;
    check_client_id(shared, headers)
}

fn check_content_type(headers: &HeaderMap, expected: &str) -> Result<(), ApiError> {
    let value = required_header(headers, header::CONTENT_TYPE.as_str())?;
    let media = value.split(';').next().unwrap_or_default().trim();
    if media.eq_ignore_ascii_case(expected) {
        Ok(())
    } else {
        Err(ApiError::invalid_header(
            "Content-Type",
            &format!("expected {expected}"),
        ))
    }
}

fn product(segment: &str) -> Result<PaymentProduct, ApiError> {
    PaymentProduct::from_path_segment(segment)
        .ok_or_else(|| ApiError::invalid_field("payment-product", "unknown payment product"))
}

// ---------------------------------------------------------------------------------------------
// POST /payments/{product}

async fn initiate(
    State(shared): State<Arc<Shared>>,
    Path(product_segment): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    shared.store().count_initiation_request();
    check_common(&shared, &headers, INITIATION_VERSIONS)?;
    let product = product(&product_segment)?;
    check_content_type(&headers, "application/json")?;

    let redirect_uri = required_header(&headers, h::REDIRECT_URI)?;
    match url::Url::parse(redirect_uri) {
        Ok(url) if matches!(url.scheme(), "https" | "http") => {}
        Ok(_) | Err(_) => {
            return Err(ApiError::invalid_header(
                "Redirect-URI",
                "must be an absolute http(s) URL",
            ));
        }
    }
    let challenge = authorization(&shared, &headers)?;
    let fields = validate_body(product, &body)?;

    let scenario = Scenario {
        auto: if fields.creditor_name.contains(scenario::AUTO_REJECT) {
            Some(AutoAction::Reject)
        } else if fields.creditor_name.contains(scenario::AUTO_SIGN) {
            Some(AutoAction::Sign)
        } else {
            None
        },
        multi_sign: fields.creditor_name.contains(scenario::MULTI_SIGN),
        location_only: fields.creditor_name.contains(scenario::LOCATION_ONLY),
    };
    if fields.creditor_name.contains(scenario::FAIL_503) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "internal_server_error",
            "",
            "simulated outage",
        ));
    }
    if fields.creditor_name.contains(scenario::FAIL_429) {
        let mut error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "TOO_MANY_REQUESTS",
            "",
            "simulated rate limit",
        );
        error.retry_after = Some(1);
        return Err(error);
    }
    let slow = fields.creditor_name.contains(scenario::SLOW_CREATE);

    let payment_id = {
        let mut store = shared.store();
        let payment = store.insert_payment(
            NewPayment {
                product,
                e2e: fields.e2e,
                amount: fields.amount,
                currency: fields.currency,
                creditor_name: fields.creditor_name,
                creditor_iban: fields.creditor_iban,
                debtor_iban: fields.debtor_iban,
                redirect_uri: redirect_uri.to_owned(),
                challenge,
                scenario,
            },
            Instant::now(),
        );
        payment.id.clone()
    };
    tracing::info!(
        payment_id,
        product = product.path_segment(),
        "sandbox: payment initiated"
    );
    if slow {
        tokio::time::sleep(SLOW_CREATE_DELAY).await;
    }

    let sca_url = shared
        .admin_base
        .join(&format!("sca/{payment_id}"))
        .map(|u| u.to_string())
        .unwrap_or_default();
    // [I] assumed v3 answer (open question 3): 201, id + status + link in the body, and the
    // link again in Location as v1 did [C Tink].
    let body = if scenario.location_only {
        json!({"payment_id": payment_id, "transaction_status": "RCVD"})
    } else {
        json!({
            "payment_id": payment_id,
            "transaction_status": "RCVD",
            "_links": {"scaRedirect": {"href": sca_url}},
        })
    };
    let mut response = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(location) = HeaderValue::from_str(&sca_url) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// A valid Bearer token replaces PKCE; without one, both PKCE headers are mandatory [P §2.2].
/// Returns the challenge to bind the future authorization code to, if any.
fn authorization(shared: &Shared, headers: &HeaderMap) -> Result<Option<Challenge>, ApiError> {
    if let Some(auth) = header_str(headers, header::AUTHORIZATION.as_str())? {
        let token = auth
            .strip_prefix("Bearer ")
            .or_else(|| auth.strip_prefix("bearer "))
            .map(str::trim)
            .unwrap_or_default();
        return if !token.is_empty() && shared.store().access_token_valid(token, Instant::now()) {
            Ok(None)
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "FAILED_SECURITY_VALIDATION",
                "GEN-1203-100003",
                "invalid access token",
            ))
        };
    }
    let challenge = required_header(headers, h::CODE_CHALLENGE)?;
    let method = required_header(headers, h::CODE_CHALLENGE_METHOD)?;
    let method = if method.eq_ignore_ascii_case("S256") {
        ChallengeMethod::S256
    } else if method.eq_ignore_ascii_case("plain") {
        ChallengeMethod::Plain
    } else {
        return Err(ApiError::invalid_header(
            "Code-Challenge-Method",
            "must be S256 or plain",
        ));
    };
    let unreserved = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
    // RFC 7636: an S256 challenge is 43 base64url characters; a plain one 43..=128.
    let well_formed = match method {
        ChallengeMethod::S256 => {
            challenge.len() == 43
                && challenge
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        }
        ChallengeMethod::Plain => {
            (43..=128).contains(&challenge.len()) && challenge.bytes().all(unreserved)
        }
    };
    if !well_formed {
        return Err(ApiError::invalid_header(
            "Code-Challenge",
            "not an RFC 7636 challenge",
        ));
    }
    Ok(Some(Challenge {
        value: challenge.to_owned(),
        method,
    }))
}

struct BodyFields {
    e2e: String,
    amount: Amount,
    currency: String,
    creditor_name: String,
    creditor_iban: String,
    debtor_iban: Option<String>,
}

fn validate_body(product: PaymentProduct, body: &[u8]) -> Result<BodyFields, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|_| ApiError::invalid_field("body", "not valid JSON"))?;
    let Some(object) = value.as_object() else {
        return Err(ApiError::invalid_field("body", "must be a JSON object"));
    };

    // [P FAQ] No debtor account: omit the key. An empty object (or one without IBAN) is refused.
    let debtor_iban = match object.get("debtor_account") {
        None => None,
        Some(account) => {
            let iban = account.get("iban").and_then(Value::as_str).unwrap_or("");
            if iban.is_empty() {
                return Err(ApiError::invalid_field(
                    "debtor_account",
                    "must hold an iban, or be omitted",
                ));
            }
            if !iban_valid(iban) {
                return Err(ApiError::invalid_field(
                    "debtor_account.iban",
                    "not a valid IBAN",
                ));
            }
            Some(iban.to_owned())
        }
    };

    // [P] missing endtoend_identification has its own code.
    let e2e = match object
        .get("endtoend_identification")
        .and_then(Value::as_str)
    {
        Some(e2e) if !e2e.trim().is_empty() => e2e.to_owned(),
        Some(_) | None => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "MISSING_INPUT",
                "B14821ZZ-1200-000000",
                "Missing required input 'endtoend_identification'",
            ));
        }
    };
    // [I] SEPA end-to-end ids are at most 35 characters.
    if e2e.chars().count() > 35 {
        return Err(ApiError::invalid_field(
            "endtoend_identification",
            "at most 35 characters",
        ));
    }

    let creditor_iban = object
        .get("creditor_account")
        .and_then(|a| a.get("iban"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::missing_field("creditor_account.iban"))?;
    if !iban_valid(creditor_iban) {
        return Err(ApiError::invalid_field(
            "creditor_account.iban",
            "not a valid IBAN",
        ));
    }

    let creditor_name = object
        .get("creditor_name")
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| ApiError::missing_field("creditor_name"))?;
    // [I] SEPA name length.
    if creditor_name.chars().count() > 70 {
        return Err(ApiError::invalid_field(
            "creditor_name",
            "at most 70 characters",
        ));
    }

    let instructed = object
        .get("instructed_amount")
        .ok_or_else(|| ApiError::missing_field("instructed_amount"))?;
    let amount_text = match instructed.get("amount") {
        Some(Value::String(s)) => s.trim().to_owned(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) | None => return Err(ApiError::missing_field("instructed_amount.amount")),
    };
    let amount = parse_amount(&amount_text)?;
    let currency = instructed
        .get("currency")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::missing_field("instructed_amount.currency"))?;
    let currency_ok = currency.len() == 3 && currency.bytes().all(|b| b.is_ascii_uppercase());
    if !currency_ok || (product.is_sepa() && currency != "EUR") {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_INPUT",
            "B14821ZZ-1232-000000",
            "Currency is not valid or not authorised",
        ));
    }

    if let Some(remittance) = object.get("remittance_information") {
        match remittance.as_str() {
            // [I] SEPA unstructured remittance: at most 140 characters.
            Some(text) if text.chars().count() <= 140 => {}
            Some(_) | None => {
                return Err(ApiError::invalid_field(
                    "remittance_information",
                    "a string of at most 140 characters",
                ));
            }
        }
    }

    if let Some(date) = object.get("requested_execution_date") {
        let parsed = date
            .as_str()
            .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
            .ok_or_else(|| ApiError::invalid_field("requested_execution_date", "yyyy-mm-dd"))?;
        // [I] a past execution date is refused.
        if parsed < Utc::now().date_naive() {
            return Err(ApiError::invalid_field(
                "requested_execution_date",
                "must not be in the past",
            ));
        }
    }

    Ok(BodyFields {
        e2e,
        amount,
        currency: currency.to_owned(),
        creditor_name: creditor_name.to_owned(),
        creditor_iban: creditor_iban.to_owned(),
        debtor_iban,
    })
}

/// Zero and negative amounts get the documented code [P]; malformed ones the generic one.
fn parse_amount(text: &str) -> Result<Amount, ApiError> {
    let not_positive = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_INPUT",
            "B14821ZZ-1231-000000",
            "Amount must be greater than 0",
        )
    };
    if let Some(magnitude) = text.strip_prefix('-') {
        return match Amount::parse(magnitude) {
            Ok(_) => Err(not_positive()),
            Err(_) => Err(ApiError::invalid_field(
                "instructed_amount.amount",
                "not a decimal amount",
            )),
        };
    }
    match Amount::parse(text) {
        Ok(amount) if amount.minor() > 0 => Ok(amount),
        Ok(_) => Err(not_positive()),
        Err(e) => Err(ApiError::invalid_field(
            "instructed_amount.amount",
            &e.to_string(),
        )),
    }
}

/// ISO 13616: country code, check digits, BBAN; mod-97 of the rearranged number is 1 [I: the
/// bank surely checks IBANs, its error code for it is not documented].
pub fn iban_valid(iban: &str) -> bool {
    let bytes = iban.as_bytes();
    if !(15..=34).contains(&bytes.len())
        || !bytes[..2].iter().all(u8::is_ascii_uppercase)
        || !bytes[2..4].iter().all(u8::is_ascii_digit)
        || !bytes
            .iter()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    {
        return false;
    }
    let rearranged = bytes[4..].iter().chain(&bytes[..4]);
    let mut remainder: u32 = 0;
    for &b in rearranged {
        let value = if b.is_ascii_digit() {
            u32::from(b - b'0')
        } else {
            u32::from(b - b'A') + 10
        };
        remainder = if value >= 10 {
            (remainder * 100 + value) % 97
        } else {
            (remainder * 10 + value) % 97
        };
    }
    remainder == 1
}

// ---------------------------------------------------------------------------------------------
// GET /payments/{product}/{id}/status

async fn status(
    State(shared): State<Arc<Shared>>,
    Path((product_segment, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    shared.store().count_status_request();
    check_common(&shared, &headers, STATUS_VERSIONS)?;
    let product = product(&product_segment)?;
    let mut store = shared.store();
    // [I] unknown id, or an id of another product: 404 (open question 11).
    match store.payment(&id, Instant::now()) {
        Some(p) if p.product == product => Ok((
            StatusCode::OK,
            Json(json!({"transaction_status": p.status.as_str()})),
        )
            .into_response()),
        Some(_) | None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "INVALID_INPUT",
            "GEN-1202-100002",
            "unknown payment id",
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// POST /token

async fn token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let result = token_inner(&shared, &headers, &body);
    if result.is_err() {
        shared.store().count_token_failure();
    }
    result
}

fn token_inner(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> Result<Response, ApiError> {
    check_request_id(headers)?;
    // [I] Accept-Language is sent by Tink but not known to be mandatory here; if sent it must
    // be supported.
    if headers.contains_key(header::ACCEPT_LANGUAGE) && language(headers).is_none() {
        return Err(ApiError::not_acceptable());
    }
    check_accept(headers, TOKEN_VERSIONS)?;
    check_basic_auth(shared, headers)?;
    check_content_type(headers, "application/x-www-form-urlencoded")?;

    // Form values are secrets (code, verifier, refresh token): never logged.
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
        .map_err(|_| ApiError::invalid_field("body", "not a form"))?;
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| ApiError::missing_field(name))
    };
    let now = Instant::now();
    let pair = match field("grant_type")? {
        "authorization_code" => {
            let code = field("code")?;
            let verifier = field("code_verifier")?;
            let redirect_uri = field("redirect_uri")?;
            shared
                .store()
                .redeem_code(code, verifier, redirect_uri, now)
                .map_err(ApiError::invalid_grant)?
        }
        "refresh_token" => shared
            .store()
            .refresh(field("refresh_token")?, now)
            .map_err(ApiError::invalid_grant)?,
        _ => {
            return Err(ApiError::invalid_field(
                "grant_type",
                "unsupported grant type",
            ));
        }
    };
    let body = json!({
        "access_token": pair.access_token.expose_secret(),
        "token_type": "Bearer",
        // [C] Belfius sent expires_in as a string.
        "expires_in": pair.expires_in.as_secs().to_string(),
        "refresh_token": pair.refresh_token.expose_secret(),
        "scope": "PIS",
    });
    let mut response = (StatusCode::OK, Json(body)).into_response();
    let response_headers = response.headers_mut();
    response_headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response_headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// HTTP Basic `client_id:client_secret` [C]; compared as digests to keep timing flat.
fn check_basic_auth(shared: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let value =
        header_str(headers, header::AUTHORIZATION.as_str())?.ok_or_else(ApiError::bad_client)?;
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))
        .ok_or_else(ApiError::bad_client)?;
    let decoded = STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(ApiError::bad_client)?;
    let (id, secret) = decoded.split_once(':').ok_or_else(ApiError::bad_client)?;
    if id == shared.client_id && super::store::digest(secret) == shared.client_secret_digest {
        Ok(())
    } else {
        Err(ApiError::bad_client())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iban_check() {
        assert!(iban_valid("BE71096123456769"));
        assert!(iban_valid("BE68539007547034"));
        assert!(iban_valid("NL91ABNA0417164300"));
        assert!(!iban_valid("BE71096123456768"));
        assert!(!iban_valid("be71096123456769"));
        assert!(!iban_valid("BE71 0961 2345 6769"));
        assert!(!iban_valid("BE71"));
    }

    #[test]
    fn amounts() {
        assert_eq!(parse_amount("12.34").map(Amount::minor).ok(), Some(1234));
        for zero_or_less in ["0", "0.00", "-1", "-0.01"] {
            let err = parse_amount(zero_or_less).err().unwrap();
            assert_eq!(err.body.unwrap().error_code, "B14821ZZ-1231-000000");
        }
        let err = parse_amount("1.234").err().unwrap();
        assert_eq!(err.body.unwrap().error_code, "GEN-1202-100002");
    }

    #[test]
    fn accept_header_versions() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.belfius.api+json; version=3"),
        );
        assert!(check_accept(&headers, INITIATION_VERSIONS).is_ok());
        assert!(check_accept(&headers, STATUS_VERSIONS).is_err());
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        assert!(check_accept(&headers, INITIATION_VERSIONS).is_err());
    }

    #[test]
    fn languages() {
        let mut headers = HeaderMap::new();
        assert_eq!(language(&headers), None);
        for (value, expected) in [
            ("fr", Some(Language::Fr)),
            ("NL", Some(Language::Nl)),
            ("fr-BE,nl;q=0.5", Some(Language::Fr)),
            ("en", None),
            ("de-BE", None),
        ] {
            headers.insert(header::ACCEPT_LANGUAGE, HeaderValue::from_static(value));
            assert_eq!(language(&headers), expected, "{value}");
        }
    }
}
