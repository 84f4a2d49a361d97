//! The simulated bank API (served over mutual TLS): initiation of single payments, standing
//! orders and bulks; status, details and cancellation of each; token.
//!
//! One router per brand host: each knows its brand, and accounts of the other brand are refused
//! like Belfius does (docs/belfius-facts.md §1.1). Validation follows what Belfius documents
//! (§2.2, §2.5, §3.2, §5 of that file; every section number after a source tag below is one of
//! docs/belfius-facts.md); where the docs are silent the choice is marked [I] and listed in
//! docs/belfius.md.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Extension;
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
use chrono::{Datelike as _, NaiveDate, Utc};
use secrecy::ExposeSecret as _;
use serde_json::{Map, Value, json};

use super::accounts::{self, Holder};
use super::faults::{self, Faults};
use super::onboarding::{self, PeerCertificate};
use super::store::{
    AutoAction, BulkLine, CancelError, Challenge, ChallengeMethod, GrantError, NewPayment, Payment,
    Scenario, Schedule, Scope, Store, TokenCheck,
};
use super::{Rules, Shared};
use crate::belfius::answer::AnswerShape;
use crate::belfius::client::headers as h;
use crate::belfius::status::TransactionStatus;
use crate::belfius::{AmountFormat, ErrorBody};
use crate::domain::model::{
    Amount, Brand, ChargeBearer, Frequency, Language, MAX_BULK_ENTRIES, PaymentKind, PaymentProduct,
};

/// Versions the simulator accepts per endpoint (`Accept: ...; version=N`). The client's
/// defaults are in `belfius::ApiVersions` and `belfius::client`; token accepts the versions
/// seen in the wild [C][P].
pub const INITIATION_VERSIONS: &[&str] = &["3"];
/// [P §2.3] periodic payment initiation v2.
pub const PERIODIC_VERSIONS: &[&str] = &["2"];
/// [I] bulk initiation version not documented.
pub const BULK_VERSIONS: &[&str] = &["1"];
/// Status, details [P example version 1] and cancellation [I].
pub const STATUS_VERSIONS: &[&str] = &["1"];
pub const TOKEN_VERSIONS: &[&str] = &["1", "1.1", "3"];

const MEDIA_TYPE: &str = "application/vnd.belfius.api+json";

/// Magic words in `creditor_name` that pick a scenario (docs/belfius.md, "Scenarios"). For a
/// bulk the first transfer's name counts, except `REJECT-ENTRY` which is per transfer.
pub mod scenario {
    pub const AUTO_SIGN: &str = "AUTO-SIGN";
    pub const AUTO_REJECT: &str = "AUTO-REJECT";
    pub const MULTI_SIGN: &str = "MULTI-SIGN";
    pub const LOCATION_ONLY: &str = "LOCATION-ONLY";
    /// Refuse with 503 before creating anything.
    pub const FAIL_503: &str = "FAIL-503";
    /// Refuse with 429 and `Retry-After: 1` before creating anything.
    pub const FAIL_429: &str = "FAIL-429";
    /// `FAIL-CODE=<error_code>`: refuse with that documented error (status and token from
    /// [`super::DOCUMENTED_ERRORS`]) before creating anything.
    pub const FAIL_CODE: &str = "FAIL-CODE=";
    /// Create the payment, then answer only after [`super::SLOW_CREATE_DELAY`]: the client
    /// times out while the bank did act (outcome unknown).
    pub const SLOW_CREATE: &str = "SLOW-CREATE";
    /// Bulk: this transfer is rejected at execution; the bulk ends PART.
    pub const REJECT_ENTRY: &str = "REJECT-ENTRY";
    /// Create the payment, then answer 201 with its SCA link but no payment id anywhere: an
    /// answer no dialect gives (the client must end it, never initiate it again).
    pub const NO_PAYMENT_ID: &str = "NO-PAYMENT-ID";
    /// `STATUS-CODE-<code>` (the SEPA character set has no `=`): status answers for this payment give that code, whatever its
    /// state (a code the client may not know).
    pub const STATUS_CODE: &str = "STATUS-CODE-";
}

pub const SLOW_CREATE_DELAY: Duration = Duration::from_secs(60);

/// Every error of the Belfius error table (docs/belfius-facts.md §5): HTTP status, `error`,
/// `error_code`. The simulator's own validation uses the same codes; `FAIL-CODE=` reaches the
/// ones no validation rule produces (account blocked, consent revoked, …).
pub const DOCUMENTED_ERRORS: &[(u16, &str, &str)] = &[
    (400, "MISSING_INPUT", "GEN-1201-100001"),
    (400, "MISSING_INPUT", "GEN-1201-100002"),
    (400, "INVALID_INPUT", "GEN-1202-100001"),
    (400, "INVALID_INPUT", "GEN-1202-100002"),
    (400, "MISSING_INPUT", "B14821ZZ-1200-000000"),
    (400, "INVALID_INPUT", "B14821ZZ-1227-000000"),
    (400, "INVALID_INPUT", "B14821ZZ-1231-000000"),
    (400, "INVALID_INPUT", "B14821ZZ-1232-000000"),
    (400, "INVALID_INPUT", "B14821ZZ-1236-000000"),
    (400, "INVALID_INPUT", "B14821ZZ-1259-000000"),
    (400, "INVALID_INPUT", "B14821ZZ-1322-000000"),
    (400, "INVALID_INPUT", "B14821ZZ-1345-000000"),
    (400, "INVALID_INPUT", "B14821ZZ-2102-000000"),
    (401, "FAILED_SECURITY_VALIDATION", "GEN-1203-100003"),
    (401, "FAILED_SECURITY_VALIDATION", "GEN-1203-100004"),
    (401, "FAILED_SECURITY_VALIDATION", "GEN-1203-100008"),
    (401, "FAILED_SECURITY_VALIDATION", "GEN-1203-100009"),
    (401, "FAILED_SECURITY_VALIDATION", "GEN-1203-100010"),
    (401, "SCA_REQUIRED", "B14800ZZ-0PLC-REDRCT"),
    (403, "INVALID_TPP", "B14663ZZ-2100-000000"),
    (403, "INVALID_ACCOUNT", "B14800ZZ-3002-000000"),
    (403, "ACCESS_DENIED", "B14800ZZ-3004-000000"),
    (403, "CHANNEL_NOT_PERMITTED", "B14800ZZ-3007-000000"),
    (403, "ACCOUNT_NOT_SUPPORTED", "B14800-3008-000000"),
    (403, "NO_ACTIVE_CONSENT", "B14800ZZ-3013-000000"),
    (403, "INVALID_PAYMENT", "B14821ZZ-2121-000000"),
    (403, "FORBIDDEN", "B14821ZZ-2101-000000"),
];

mod portal;

/// What every handler sees: the shared bank and the brand of the host it serves.
#[derive(Clone)]
pub struct ApiState {
    pub(super) shared: Arc<Shared>,
    pub(super) brand: Brand,
}

/// The bank API of one brand host, behind the fault injection, and the fallback interface
/// (`sandbox::fallback`) next to it.
pub fn router(shared: Arc<Shared>, brand: Brand, faults: Faults) -> Router {
    let mut dedicated = Router::new();
    for kind in [
        PaymentKind::Single,
        PaymentKind::Periodic,
        PaymentKind::Bulk,
    ] {
        dedicated = resource_routes(dedicated, kind);
    }
    let dedicated = dedicated
        .route("/token", post(token))
        .route("/consent-uris", get(portal::consent_uris))
        .route("/funds-confirmations", post(portal::funds_confirmation))
        .route("/accounts", get(portal::accounts))
        .route("/accounts/{id}", get(portal::account))
        .route("/accounts/{id}/transactions", get(portal::transactions))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            registered_certificate,
        ))
        // Faults inside the Response-ID layer: an injected error still echoes the Request-ID.
        .layer(middleware::from_fn_with_state(faults, faults::middleware));
    // The fallback must answer while the dedicated API is down (RTS art. 33): it is not behind
    // the fault layer.
    super::fallback::routes(&shared.fallback.settings)
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            registered_certificate,
        ))
        .merge(dedicated)
        .layer(middleware::from_fn(echo_request_id))
        .with_state(ApiState { shared, brand })
}

/// `/{prefix}/{product}` (POST), `…/{id}/status` (GET), `…/{id}` (GET details, DELETE).
fn resource_routes(router: Router<ApiState>, kind: PaymentKind) -> Router<ApiState> {
    let prefix = kind.path_prefix();
    router
        .route(
            &format!("/{prefix}/{{product}}"),
            post(
                move |state: State<ApiState>,
                      path: Path<String>,
                      headers: HeaderMap,
                      body: Bytes| initiate(state, kind, path, headers, body),
            ),
        )
        .route(
            &format!("/{prefix}/{{product}}/{{id}}/status"),
            get(
                move |state: State<ApiState>, path: Path<(String, String)>, headers: HeaderMap| {
                    status(state, kind, path, headers)
                },
            ),
        )
        .route(
            &format!("/{prefix}/{{product}}/{{id}}"),
            get(
                move |state: State<ApiState>, path: Path<(String, String)>, headers: HeaderMap| {
                    details(state, kind, path, headers)
                },
            )
            .delete(
                move |state: State<ApiState>, path: Path<(String, String)>, headers: HeaderMap| {
                    cancel(state, kind, path, headers)
                },
            ),
        )
}

fn initiation_versions(kind: PaymentKind) -> &'static [&'static str] {
    match kind {
        PaymentKind::Single => INITIATION_VERSIONS,
        PaymentKind::Periodic => PERIODIC_VERSIONS,
        PaymentKind::Bulk => BULK_VERSIONS,
    }
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

/// [P §1.2] the QWAC is handed in at onboarding, which gives the Client-ID: a request naming
/// this Client-ID over a connection with another certificate (another TPP's, from a CA the
/// bank trusts) is refused. [I] the code: GEN-1203-100009, as for an unknown Client-ID.
async fn registered_certificate(
    State(shared): State<Arc<Shared>>,
    peer: Option<Extension<PeerCertificate>>,
    request: Request,
    next: Next,
) -> Response {
    let peer = peer.map_or(PeerCertificate(None), |Extension(peer)| peer);
    if onboarding::names_client_id(request.headers(), &shared.client_id)
        && !shared.onboarding.certificate_registered(peer)
    {
        tracing::info!("sandbox: client certificate not registered for the Client-ID");
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "FAILED_SECURITY_VALIDATION",
            "GEN-1203-100009",
            "the client certificate is not the one registered for this Client-ID",
        )
        .into_response();
    }
    next.run(request).await
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
    pub(super) status: StatusCode,
    pub(super) body: Option<ErrorBody>,
    retry_after: Option<u64>,
}

impl ApiError {
    pub(super) fn new(
        status: StatusCode,
        error: &str,
        code: &str,
        description: impl Into<String>,
    ) -> Self {
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

    pub(super) fn invalid_header(name: &str, why: &str) -> Self {
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

    pub(super) fn invalid_field(name: &str, why: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "INVALID_INPUT",
            "GEN-1202-100002",
            format!("Invalid input '{name}': {why}"),
        )
    }

    /// A business rule on the payment fields, with its own documented code [P §5].
    fn rule(code: &str, description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "INVALID_INPUT", code, description)
    }

    fn bad_client() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "FAILED_SECURITY_VALIDATION",
            "GEN-1203-100009",
            "Invalid Client-ID or client credentials",
        )
    }

    pub(super) fn invalid_token() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "FAILED_SECURITY_VALIDATION",
            "GEN-1203-100003",
            "invalid access token",
        )
    }

    /// [I] GEN-1203-100008 "invalid security parameter" is the closest documented code for a
    /// missing or wrong QSeal signature (open question, docs/belfius-facts.md §10.7).
    pub(super) fn bad_signature(why: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "FAILED_SECURITY_VALIDATION",
            "GEN-1203-100008",
            format!("invalid security parameter: {why}"),
        )
    }

    fn channel_not_permitted(why: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "CHANNEL_NOT_PERMITTED",
            "B14800ZZ-3007-000000",
            why,
        )
    }

    pub(super) fn payment_not_found() -> Self {
        // [I] unknown id, or an id of another kind, product or brand: 404 (open question,
        // docs/belfius-facts.md §10.11).
        Self::new(
            StatusCode::NOT_FOUND,
            "INVALID_INPUT",
            "GEN-1202-100002",
            "unknown payment id",
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
            GrantError::InvalidRefreshToken | GrantError::RefreshTokenExpired => Self::new(
                StatusCode::UNAUTHORIZED,
                "FAILED_SECURITY_VALIDATION",
                "GEN-1203-100004",
                format!("invalid refresh token: {error}"),
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

pub(super) fn header_str<'a>(
    headers: &'a HeaderMap,
    name: &str,
) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|v| Some(v.trim()))
            .map_err(|_| ApiError::invalid_header(name, "not visible ASCII")),
    }
}

pub(super) fn required_header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
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

pub(super) fn check_client_id(shared: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
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

pub(super) fn check_content_type(headers: &HeaderMap, expected: &str) -> Result<(), ApiError> {
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

pub(super) fn product(segment: &str) -> Result<PaymentProduct, ApiError> {
    PaymentProduct::from_path_segment(segment)
        .ok_or_else(|| ApiError::invalid_field("payment-product", "unknown payment product"))
}

// ---------------------------------------------------------------------------------------------
// POST /{payments|periodic-payments|bulk-payments}/{product}

async fn initiate(
    State(state): State<ApiState>,
    kind: PaymentKind,
    Path(product_segment): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let shared = &state.shared;
    shared.store().count_initiation_request();
    check_common(shared, &headers, initiation_versions(kind))?;
    let product = product(&product_segment)?;
    match kind {
        PaymentKind::Bulk => {
            // [P flows] bulk payments are offered to Belfius clients only.
            match state.brand {
                Brand::Belfius => {}
                Brand::Banx => {
                    return Err(ApiError::channel_not_permitted(
                        "bulk payments are not offered on the Banx channel",
                    ));
                }
            }
            // [I] a bulk is a batch of SEPA transfers (its entries carry no cross-border data).
            if !product.is_sepa() {
                return Err(ApiError::invalid_field(
                    "payment-product",
                    "bulk payments are SEPA transfers",
                ));
            }
        }
        PaymentKind::Single | PaymentKind::Periodic => {}
    }
    check_content_type(&headers, "application/json")?;
    let redirect_uri = required_header(&headers, h::REDIRECT_URI)?;
    if let Some(why) = shared.onboarding.redirect_refusal(redirect_uri) {
        return Err(ApiError::invalid_header("Redirect-URI", why));
    }
    let auth = authorization(shared, state.brand, &headers)?;
    check_signature(shared, &headers, &body, true)?;

    let object = json_object(&body)?;
    let today = Utc::now().date_naive();
    let fields = match kind {
        PaymentKind::Single => validate_single(&object, product, &shared.rules, today)?,
        PaymentKind::Periodic => validate_periodic(&object, product, &shared.rules, today)?,
        PaymentKind::Bulk => validate_bulk(&object, product, &shared.rules, today)?,
    };
    if let Some(debtor) = &fields.debtor_iban {
        check_debtor_account(&shared.rules, state.brand, debtor)?;
    }

    let name = fields.creditor_name.as_str();
    let scenario = Scenario {
        auto: if name.contains(scenario::AUTO_REJECT) {
            Some(AutoAction::Reject)
        } else if name.contains(scenario::AUTO_SIGN) {
            Some(AutoAction::Sign)
        } else {
            None
        },
        multi_sign: name.contains(scenario::MULTI_SIGN),
        location_only: name.contains(scenario::LOCATION_ONLY),
    };
    scenario_failure(name)?;
    let slow = name.contains(scenario::SLOW_CREATE);
    let no_payment_id = name.contains(scenario::NO_PAYMENT_ID);

    let payment_id = {
        let mut store = shared.store();
        let payment = store.insert_payment(
            fields.into_new_payment(Placed {
                kind,
                brand: state.brand,
                product,
                redirect_uri,
                challenge: auth.challenge,
                psu: auth.psu,
                scenario,
                request: Value::Object(object),
            }),
            Instant::now(),
        );
        payment.id.clone()
    };
    tracing::info!(
        payment_id,
        kind = kind.path_prefix(),
        product = product.path_segment(),
        brand = state.brand.as_str(),
        "sandbox: payment initiated"
    );
    if slow {
        tokio::time::sleep(SLOW_CREATE_DELAY).await;
    }

    let sca_url = shared.sca_url(&payment_id).unwrap_or_default();
    // The answer in the dialect's shape (docs/belfius.md, "Dialects"). Where the body carries
    // no id, the link's query does [I].
    let status = shared.dialect.statuses.answer(TransactionStatus::Rcvd);
    let linked = |url: &str| format!("{url}?payment_id={payment_id}");
    let mut response = match shared.dialect.answer {
        AnswerShape::LinksBody => {
            let body = json!({
                "payment_id": payment_id,
                "transaction_status": status,
                "_links": {"scaRedirect": {"href": sca_url}},
            });
            let mut response = (StatusCode::CREATED, Json(body)).into_response();
            // And the link again in Location, as v1 sent it [C Tink].
            if let Ok(location) = HeaderValue::from_str(&sca_url) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            response
        }
        AnswerShape::LocationHeader => {
            let body = json!({"payment_id": payment_id, "transaction_status": status});
            let mut response = (StatusCode::CREATED, Json(body)).into_response();
            if let Ok(location) = HeaderValue::from_str(&sca_url) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            response
        }
        AnswerShape::Redirect => {
            let mut response = StatusCode::FOUND.into_response();
            if let Ok(location) = HeaderValue::from_str(&linked(&sca_url)) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            response
        }
        AnswerShape::ScaRequired => (
            StatusCode::UNAUTHORIZED,
            Json(json!({
                "error": "SCA_REQUIRED",
                "error_code": "B14800ZZ-0PLC-REDRCT",
                "error_description": format!(
                    "SCA is required. Please follow the corresponding URL: {}",
                    linked(&sca_url)
                ),
            })),
        )
            .into_response(),
    };
    // The LOCATION-ONLY scenario word keeps its meaning in the default dialect: no link in the
    // body, only in Location.
    if scenario.location_only && shared.dialect.answer == AnswerShape::LinksBody {
        let body = json!({"payment_id": payment_id, "transaction_status": status});
        response = (StatusCode::CREATED, Json(body)).into_response();
        if let Ok(location) = HeaderValue::from_str(&sca_url) {
            response.headers_mut().insert(header::LOCATION, location);
        }
    }
    if no_payment_id {
        let body = json!({"transaction_status": status});
        response = (StatusCode::CREATED, Json(body)).into_response();
        if let Ok(location) = HeaderValue::from_str(&sca_url) {
            response.headers_mut().insert(header::LOCATION, location);
        }
    }
    // For the fault layer: a lost answer must leave this payment unsignable (see faults).
    if let Ok(id) = HeaderValue::from_str(&payment_id) {
        response
            .headers_mut()
            .insert(crate::sandbox::faults::CREATED_PAYMENT_HEADER, id);
    }
    Ok(response)
}

/// The refusals a scenario word asks for, before anything is created.
fn scenario_failure(name: &str) -> Result<(), ApiError> {
    if name.contains(scenario::FAIL_503) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "internal_server_error",
            "",
            "simulated outage",
        ));
    }
    if name.contains(scenario::FAIL_429) {
        let mut error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "TOO_MANY_REQUESTS",
            "",
            "simulated rate limit",
        );
        error.retry_after = Some(1);
        return Err(error);
    }
    if let Some((_, rest)) = name.split_once(scenario::FAIL_CODE) {
        let code = rest.split_whitespace().next().unwrap_or_default();
        return Err(
            match DOCUMENTED_ERRORS.iter().find(|(_, _, c)| *c == code) {
                Some((status, error, code)) => ApiError::new(
                    StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST),
                    error,
                    code,
                    "simulated by scenario FAIL-CODE",
                ),
                None => {
                    ApiError::invalid_field("creditor_name", "FAIL-CODE= names no documented code")
                }
            },
        );
    }
    Ok(())
}

/// What the initiation is authorised by: a PKCE challenge (a code will be issued), or the
/// access token of a PSU.
struct Authorization {
    challenge: Option<Challenge>,
    psu: Option<String>,
}

pub(super) fn bearer(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    Ok(
        header_str(headers, header::AUTHORIZATION.as_str())?.map(|auth| {
            auth.strip_prefix("Bearer ")
                .or_else(|| auth.strip_prefix("bearer "))
                .map(str::trim)
                .unwrap_or_default()
        }),
    )
}

/// The PSU owning a live access token issued by this brand host; anything else (missing,
/// unknown, the other brand's, replaced by a newer pair, expired) is 401 GEN-1203-100003 [P].
fn token_psu(shared: &Shared, brand: Brand, token: Option<&str>) -> Result<String, ApiError> {
    let token = token
        .filter(|t| !t.is_empty())
        .ok_or_else(ApiError::invalid_token)?;
    match shared
        .store()
        .check_access_token(token, brand, Scope::Pis, Instant::now())
    {
        TokenCheck::Valid { psu, .. } => Ok(psu),
        TokenCheck::Invalidated | TokenCheck::Expired | TokenCheck::Unknown => {
            Err(ApiError::invalid_token())
        }
    }
}

/// A valid Bearer token replaces PKCE; without one, both PKCE headers are mandatory [P §2.2].
fn authorization(
    shared: &Shared,
    brand: Brand,
    headers: &HeaderMap,
) -> Result<Authorization, ApiError> {
    if let Some(token) = bearer(headers)? {
        return Ok(Authorization {
            challenge: None,
            psu: Some(token_psu(shared, brand, Some(token))?),
        });
    }
    Ok(Authorization {
        challenge: Some(pkce_challenge(headers)?),
        psu: None,
    })
}

/// The `Code-Challenge` and `Code-Challenge-Method` headers, both mandatory here.
fn pkce_challenge(headers: &HeaderMap) -> Result<Challenge, ApiError> {
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
    Ok(Challenge {
        value: challenge.to_owned(),
        method,
    })
}

/// The QSeal `Signature` over the exact body, when verification is switched on. `required`:
/// initiations must carry one; on other calls [I] a signature is checked only if sent.
fn check_signature(
    shared: &Shared,
    headers: &HeaderMap,
    body: &[u8],
    required: bool,
) -> Result<(), ApiError> {
    if !shared.store().settings.verify_signatures {
        return Ok(());
    }
    let signature = header_str(headers, h::SIGNATURE).ok().flatten();
    if signature.is_none() && !required {
        return Ok(());
    }
    let encoding = shared.onboarding.signature_encoding;
    let outcome = match (&shared.verifier, signature) {
        // [I] the bank accepts one encoding (Tink sent standard Base64 with padding, RFC 7515
        // says base64url): the other one is refused, not decoded leniently.
        (Some(_), Some(signature)) if !onboarding::jws_encoded_as(signature, encoding) => Err(
            format!("the JWS is not in {}", onboarding::encoding_name(encoding)),
        ),
        (Some(verifier), Some(signature)) => {
            verifier.verify(signature, body).map_err(|e| e.to_string())
        }
        (None, Some(_)) => Err("no QSeal certificate to verify with".to_owned()),
        (_, None) => Err("missing Signature header".to_owned()),
    };
    shared.store().count_signature(outcome.is_ok());
    outcome.map_err(|why| {
        tracing::info!(why, "sandbox: signature refused");
        ApiError::bad_signature(&why)
    })
}

/// [P §1.1] a debtor account must be addressed on its own brand's host. The holder is read
/// from the Belgian bank code (IBAN characters 5-7, [T] codes, [I] rule): another Belgian
/// bank's account, or a foreign IBAN, is no account of either brand.
pub(super) fn check_debtor_account(rules: &Rules, host: Brand, iban: &str) -> Result<(), ApiError> {
    let not_ours = |why: String| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "INVALID_ACCOUNT",
            "B14800ZZ-3002-000000",
            why,
        )
    };
    match accounts::holder(&rules.belfius_bank_codes, &rules.banx_bank_codes, iban) {
        Holder::Brand(brand) if brand == host => Ok(()),
        Holder::Brand(brand) => Err(ApiError::channel_not_permitted(&format!(
            "the debtor account is a {} account: use its own host",
            brand.as_str()
        ))),
        Holder::OtherBelgianBank(code) => Err(not_ours(format!(
            "the debtor account is held by another bank (Belgian bank code {code:03})"
        ))),
        Holder::Foreign => Err(not_ours(
            "the debtor account is not an account of this bank".into(),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Body validation.

/// The validated initiation, whatever its kind.
pub(super) struct Fields {
    pub(super) e2e: String,
    pub(super) amount: Amount,
    pub(super) currency: String,
    pub(super) creditor_name: String,
    pub(super) creditor_account: String,
    pub(super) debtor_iban: Option<String>,
    pub(super) requested_execution_date: Option<NaiveDate>,
    schedule: Option<super::store::Schedule>,
    entries: Vec<BulkLine>,
}

/// Where and how a validated initiation was placed: the rest of a [`NewPayment`].
pub(super) struct Placed<'a> {
    pub(super) kind: PaymentKind,
    pub(super) brand: Brand,
    pub(super) product: PaymentProduct,
    pub(super) redirect_uri: &'a str,
    pub(super) challenge: Option<Challenge>,
    pub(super) psu: Option<String>,
    pub(super) scenario: Scenario,
    pub(super) request: Value,
}

impl Fields {
    pub(super) fn into_new_payment(self, placed: Placed<'_>) -> NewPayment {
        NewPayment {
            kind: placed.kind,
            brand: placed.brand,
            product: placed.product,
            e2e: self.e2e,
            amount: self.amount,
            currency: self.currency,
            creditor_name: self.creditor_name,
            creditor_account: self.creditor_account,
            debtor_iban: self.debtor_iban,
            requested_execution_date: self.requested_execution_date,
            schedule: self.schedule,
            entries: self.entries,
            redirect_uri: placed.redirect_uri.to_owned(),
            challenge: placed.challenge,
            psu: placed.psu,
            scenario: placed.scenario,
            request: placed.request,
        }
    }
}

/// A request body that must be a JSON object.
pub(super) fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(ApiError::invalid_field("body", "must be a JSON object")),
        Err(_) => Err(ApiError::invalid_field("body", "not valid JSON")),
    }
}

/// One transfer: a single payment's body, or one entry of a bulk.
struct Transfer {
    e2e: String,
    amount: Amount,
    currency: String,
    creditor_name: String,
    creditor_account: String,
}

/// Keys only the cross-border product may carry [P §2.5 table: "n/a" for SEPA products].
const CROSS_BORDER_KEYS: [&str; 2] = ["charge_bearer", "creditor_address"];
const CROSS_BORDER_ACCOUNT_KEYS: [&str; 3] = ["bban", "bankNationalID", "currency"];

/// A string field: absent or empty gives `None`; another JSON type is refused.
fn opt_str<'a>(
    object: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<&'a str>, ApiError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(ApiError::invalid_field(path, "must be a string")),
    }
}

fn debtor(object: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    // [P FAQ] No debtor account: omit the key. An empty object (or one without IBAN) is refused.
    match object.get("debtor_account") {
        None => Ok(None),
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
            Ok(Some(iban.to_owned()))
        }
    }
}

/// `yyyy-mm-dd`, `None` when absent.
fn date_field(
    object: &Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<NaiveDate>, ApiError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value
            .as_str()
            .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
            .map(Some)
            .ok_or_else(|| ApiError::invalid_field(path, "yyyy-mm-dd")),
    }
}

fn execution_date(
    object: &Map<String, Value>,
    today: NaiveDate,
) -> Result<Option<NaiveDate>, ApiError> {
    let date = date_field(
        object,
        "requested_execution_date",
        "requested_execution_date",
    )?;
    // [I] a past execution date is refused.
    if date.is_some_and(|d| d < today) {
        return Err(ApiError::invalid_field(
            "requested_execution_date",
            "must not be in the past",
        ));
    }
    Ok(date)
}

/// [I] ISO 9362: 4 letters (bank), 2 letters (country), 2 alphanumerics, optionally 3 more.
fn bic_valid(bic: &str) -> bool {
    let b = bic.as_bytes();
    matches!(b.len(), 8 | 11)
        && b[..6].iter().all(u8::is_ascii_uppercase)
        && b[6..]
            .iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
}

fn country_valid(country: &str) -> bool {
    country.len() == 2 && country.bytes().all(|b| b.is_ascii_uppercase())
}

/// The fields of one transfer, with the per-product rules of docs/belfius-facts.md §2.5 and the
/// documented business codes of §5. `prefix` locates the transfer in error descriptions
/// (`payments[3].`).
fn transfer(
    object: &Map<String, Value>,
    product: PaymentProduct,
    rules: &Rules,
    prefix: &str,
) -> Result<Transfer, ApiError> {
    let path = |name: &str| format!("{prefix}{name}");
    let sepa = product.is_sepa();
    let account = match object.get("creditor_account") {
        None | Some(Value::Null) => None,
        Some(Value::Object(account)) => Some(account),
        Some(_) => {
            return Err(ApiError::invalid_field(
                &path("creditor_account"),
                "must be an object",
            ));
        }
    };

    // [P §2.5] cross-border fields are "n/a" on SEPA products. [I] refused rather than ignored.
    if sepa {
        for key in CROSS_BORDER_KEYS {
            if object.contains_key(key) {
                return Err(ApiError::invalid_field(
                    &path(key),
                    &format!("not allowed for {}", product.path_segment()),
                ));
            }
        }
        for key in CROSS_BORDER_ACCOUNT_KEYS {
            if account.is_some_and(|a| a.contains_key(key)) {
                return Err(ApiError::invalid_field(
                    &path(&format!("creditor_account.{key}")),
                    &format!("not allowed for {}", product.path_segment()),
                ));
            }
        }
    }

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
                format!(
                    "Missing required input '{}'",
                    path("endtoend_identification")
                ),
            ));
        }
    };
    // [I] SEPA end-to-end ids are at most 35 characters.
    if e2e.chars().count() > 35 {
        return Err(ApiError::invalid_field(
            &path("endtoend_identification"),
            "at most 35 characters",
        ));
    }

    let account = account.ok_or_else(|| ApiError::missing_field(&path("creditor_account.iban")))?;
    let iban = opt_str(account, "iban", &path("creditor_account.iban"))?;
    let bban = opt_str(account, "bban", &path("creditor_account.bban"))?;
    let bic = opt_str(account, "bic", &path("creditor_account.bic"))?;
    let national_id = opt_str(
        account,
        "bankNationalID",
        &path("creditor_account.bankNationalID"),
    )?;
    let creditor_currency = opt_str(account, "currency", &path("creditor_account.currency"))?;
    let creditor_account = match (iban, bban) {
        (Some(iban), None) => {
            if !iban_valid(iban) {
                return Err(ApiError::invalid_field(
                    &path("creditor_account.iban"),
                    "not a valid IBAN",
                ));
            }
            iban
        }
        (None, Some(bban)) => {
            // [P] a BBAN together with a BIC is refused.
            if bic.is_some() {
                return Err(ApiError::rule(
                    "B14821ZZ-1236-000000",
                    format!("{}: BBAN with BIC not authorised", path("creditor_account")),
                ));
            }
            // [I] a national account number: 1 to 34 upper-case letters and digits.
            let well_formed = (1..=34).contains(&bban.len())
                && bban
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
            if !well_formed {
                return Err(ApiError::invalid_field(
                    &path("creditor_account.bban"),
                    "1 to 34 upper-case letters and digits",
                ));
            }
            bban
        }
        // [I] iban and bban are alternatives ("conditional" in the portal table).
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid_field(
                &path("creditor_account"),
                "iban and bban are exclusive",
            ));
        }
        (None, None) => return Err(ApiError::missing_field(&path("creditor_account.iban"))),
    };
    if bic.is_some_and(|b| !bic_valid(b)) {
        return Err(ApiError::invalid_field(
            &path("creditor_account.bic"),
            "not a BIC",
        ));
    }

    let creditor_name = object
        .get("creditor_name")
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| ApiError::missing_field(&path("creditor_name")))?;
    // [I] SEPA name length.
    if creditor_name.chars().count() > 70 {
        return Err(ApiError::invalid_field(
            &path("creditor_name"),
            "at most 70 characters",
        ));
    }

    let mut address_country = None;
    if !sepa {
        // [P] charge_bearer is required for cross-border; [I] ISO 20022 values.
        let bearer = opt_str(object, "charge_bearer", &path("charge_bearer"))?
            .ok_or_else(|| ApiError::missing_field(&path("charge_bearer")))?;
        if ChargeBearer::parse(bearer).is_none() {
            return Err(ApiError::invalid_field(
                &path("charge_bearer"),
                "one of DEBT, CRED, SHAR, SLEV",
            ));
        }
        match object.get("creditor_address") {
            None | Some(Value::Null) => {}
            Some(Value::Object(address)) => {
                for key in ["street", "building_number", "postal_code", "town"] {
                    let field = path(&format!("creditor_address.{key}"));
                    // [I] SEPA-like limit on address lines.
                    if opt_str(address, key, &field)?.is_some_and(|v| v.chars().count() > 70) {
                        return Err(ApiError::invalid_field(&field, "at most 70 characters"));
                    }
                }
                let field = path("creditor_address.country");
                let country = opt_str(address, "country", &field)?
                    .ok_or_else(|| ApiError::missing_field(&field))?;
                if !country_valid(country) {
                    return Err(ApiError::invalid_field(&field, "ISO 3166 alpha-2 code"));
                }
                address_country = Some(country);
            }
            Some(_) => {
                return Err(ApiError::invalid_field(
                    &path("creditor_address"),
                    "must be an object",
                ));
            }
        }
        if creditor_currency.is_some_and(|c| !currency_well_formed(c)) {
            return Err(ApiError::rule(
                "B14821ZZ-1232-000000",
                format!(
                    "{}: currency is not valid",
                    path("creditor_account.currency")
                ),
            ));
        }
    }

    let instructed = object
        .get("instructed_amount")
        .ok_or_else(|| ApiError::missing_field(&path("instructed_amount")))?;
    // Strict per dialect: a bank parsing one JSON type refuses the other.
    let amount_text = match (instructed.get("amount"), rules.amount) {
        (Some(Value::String(s)), AmountFormat::String) => s.trim().to_owned(),
        (Some(Value::Number(n)), AmountFormat::Number) => n.to_string(),
        (Some(Value::String(_) | Value::Number(_)), expected) => {
            return Err(ApiError::invalid_field(
                &path("instructed_amount.amount"),
                &format!("must be a JSON {}", expected.as_str()),
            ));
        }
        (Some(_) | None, _) => {
            return Err(ApiError::missing_field(&path("instructed_amount.amount")));
        }
    };
    let amount = parse_amount(&amount_text)?;
    let currency = instructed
        .get("currency")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::missing_field(&path("instructed_amount.currency")))?;
    // [P] code; [I] SEPA products move euros only.
    if !currency_well_formed(currency) || (sepa && currency != "EUR") {
        return Err(ApiError::rule(
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
                    &path("remittance_information"),
                    "a string of at most 140 characters",
                ));
            }
        }
    }

    // [P] beneficiary country not allowed; [I] the country is the IBAN's and the address's,
    // the list is `SandboxConfig::denied_countries`.
    let account_country = iban.and_then(|i| i.get(..2));
    for country in [account_country, address_country].into_iter().flatten() {
        if rules.denied_countries.iter().any(|c| c == country) {
            return Err(ApiError::rule(
                "B14821ZZ-1227-000000",
                format!("Beneficiary country {country} is not allowed"),
            ));
        }
    }
    // [P] the beneficiary BIC may be mandatory for some countries; [I] a bank national id
    // (e.g. ABA routing number) identifies the bank as well; list in
    // `SandboxConfig::bic_required_countries`.
    if !sepa
        && let Some(country) = account_country.or(address_country)
        && rules.bic_required_countries.iter().any(|c| c == country)
        && bic.is_none()
        && national_id.is_none()
    {
        return Err(ApiError::rule(
            "B14821ZZ-2102-000000",
            format!("Beneficiary BIC is missing (mandatory for {country})"),
        ));
    }

    Ok(Transfer {
        e2e,
        amount,
        currency: currency.to_owned(),
        creditor_name: creditor_name.to_owned(),
        creditor_account: creditor_account.to_owned(),
    })
}

fn currency_well_formed(currency: &str) -> bool {
    currency.len() == 3 && currency.bytes().all(|b| b.is_ascii_uppercase())
}

pub(super) fn validate_single(
    object: &Map<String, Value>,
    product: PaymentProduct,
    rules: &Rules,
    today: NaiveDate,
) -> Result<Fields, ApiError> {
    let debtor_iban = debtor(object)?;
    let t = transfer(object, product, rules, "")?;
    let requested_execution_date = execution_date(object, today)?;
    Ok(Fields {
        e2e: t.e2e,
        amount: t.amount,
        currency: t.currency,
        creditor_name: t.creditor_name,
        creditor_account: t.creditor_account,
        debtor_iban,
        requested_execution_date,
        schedule: None,
        entries: Vec::new(),
    })
}

/// Months from `start` to `end` (calendar months, days ignored).
fn months_between(start: NaiveDate, end: NaiveDate) -> i64 {
    let index = |d: NaiveDate| i64::from(d.year()) * 12 + i64::from(d.month0());
    index(end) - index(start)
}

/// [I] shape: the single body plus `start_date`, `end_date?`, `frequency`, `day_of_execution?`.
fn validate_periodic(
    object: &Map<String, Value>,
    product: PaymentProduct,
    rules: &Rules,
    today: NaiveDate,
) -> Result<Fields, ApiError> {
    let mut fields = validate_single(object, product, rules, today)?;
    let start = date_field(object, "start_date", "start_date")?
        .ok_or_else(|| ApiError::missing_field("start_date"))?;
    // [P] the begin date must be in the future.
    if start <= today {
        return Err(ApiError::rule(
            "B14821ZZ-1259-000000",
            "The begin date of the standing order must be in the future",
        ));
    }
    let frequency = opt_str(object, "frequency", "frequency")?
        .ok_or_else(|| ApiError::missing_field("frequency"))?;
    // [I] Berlin Group spelling, exactly.
    let frequency = Frequency::ALL
        .into_iter()
        .find(|f| f.as_str() == frequency)
        .ok_or_else(|| ApiError::invalid_field("frequency", "not a Berlin Group frequency"))?;
    let end = date_field(object, "end_date", "end_date")?;
    if let Some(end) = end {
        // [I] the portal's text for 1345 is cut ("end date …"): end before start is the
        // obvious end-date error left once 1322 covers the periodicity.
        if end < start {
            return Err(ApiError::rule(
                "B14821ZZ-1345-000000",
                "The end date must not be before the begin date",
            ));
        }
        // [P] the month of the end date must fit the periodicity.
        if let Some(period) = frequency.months()
            && months_between(start, end) % i64::from(period) != 0
        {
            return Err(ApiError::rule(
                "B14821ZZ-1322-000000",
                "The month of the end date is not consistent with the periodicity",
            ));
        }
    }
    let day_of_execution = match object.get("day_of_execution") {
        None | Some(Value::Null) => None,
        Some(value) => Some(
            value
                .as_u64()
                .filter(|d| (1..=31).contains(d))
                .and_then(|d| u8::try_from(d).ok())
                .ok_or_else(|| ApiError::invalid_field("day_of_execution", "1 to 31"))?,
        ),
    };
    fields.schedule = Some(Schedule::new(start, end, frequency, day_of_execution));
    Ok(fields)
}

/// [I] shape: `{debtor_account?, batch_booking_preferred, requested_execution_date?,
/// payments: [transfer…]}`; each transfer validated like a single SEPA payment.
fn validate_bulk(
    object: &Map<String, Value>,
    product: PaymentProduct,
    rules: &Rules,
    today: NaiveDate,
) -> Result<Fields, ApiError> {
    let debtor_iban = debtor(object)?;
    if object
        .get("batch_booking_preferred")
        .is_some_and(|v| !v.is_boolean())
    {
        return Err(ApiError::invalid_field(
            "batch_booking_preferred",
            "must be a boolean",
        ));
    }
    let requested_execution_date = execution_date(object, today)?;
    let payments = match object.get("payments") {
        None | Some(Value::Null) => return Err(ApiError::missing_field("payments")),
        Some(Value::Array(payments)) => payments,
        Some(_) => return Err(ApiError::invalid_field("payments", "must be an array")),
    };
    // [T Exthand] at most 1000 payments per bulk.
    if payments.is_empty() || payments.len() > MAX_BULK_ENTRIES {
        return Err(ApiError::invalid_field(
            "payments",
            &format!("1 to {MAX_BULK_ENTRIES} transfers"),
        ));
    }
    let mut seen = HashSet::new();
    let mut total: i64 = 0;
    let mut entries = Vec::with_capacity(payments.len());
    let mut first: Option<Transfer> = None;
    for (index, entry) in payments.iter().enumerate() {
        let prefix = format!("payments[{index}].");
        let Value::Object(entry) = entry else {
            return Err(ApiError::invalid_field(&prefix, "must be an object"));
        };
        let t = transfer(entry, product, rules, &prefix)?;
        // [I] end-to-end ids identify transfers: unique within a bulk.
        if !seen.insert(t.e2e.clone()) {
            return Err(ApiError::invalid_field(
                &format!("{prefix}endtoend_identification"),
                "duplicate within the bulk",
            ));
        }
        total = total
            .checked_add(t.amount.minor())
            .ok_or_else(|| ApiError::invalid_field("payments", "total amount too large"))?;
        entries.push(BulkLine {
            endtoend_identification: t.e2e.clone(),
            amount: t.amount.to_string(),
            currency: t.currency.clone(),
            creditor_name: t.creditor_name.clone(),
            creditor_iban: t.creditor_account.clone(),
            transaction_status: "RCVD",
            reject: t.creditor_name.contains(scenario::REJECT_ENTRY),
        });
        if first.is_none() {
            first = Some(t);
        }
    }
    let first = first.ok_or_else(|| ApiError::missing_field("payments"))?;
    Ok(Fields {
        e2e: first.e2e,
        amount: Amount::from_minor(total),
        currency: first.currency,
        creditor_name: first.creditor_name,
        creditor_account: first.creditor_account,
        debtor_iban,
        requested_execution_date,
        schedule: None,
        entries,
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
// GET …/{id}/status, GET …/{id}, DELETE …/{id}

/// The payment behind a resource path: same kind, product and brand host, else `None` [I].
pub(super) fn find<'s>(
    store: &'s mut Store,
    brand: Brand,
    kind: PaymentKind,
    product: PaymentProduct,
    id: &str,
) -> Option<&'s Payment> {
    store
        .payment(id, Instant::now())
        .filter(|p| p.kind == kind && p.product == product && p.brand == brand)
}

async fn status(
    State(state): State<ApiState>,
    kind: PaymentKind,
    Path((product_segment, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let shared = &state.shared;
    shared.store().count_status_request();
    check_common(shared, &headers, STATUS_VERSIONS)?;
    let product = product(&product_segment)?;
    let mut store = shared.store();
    let p = find(&mut store, state.brand, kind, product, &id)
        .ok_or_else(ApiError::payment_not_found)?;
    Ok((
        StatusCode::OK,
        Json(json!({"transaction_status": answered_status(shared, p)})),
    )
        .into_response())
}

/// The status code answered for `p`: the dialect's, or the scenario's `STATUS-CODE=`.
pub(super) fn answered_status(shared: &Shared, p: &super::store::Payment) -> String {
    let name = p
        .request
        .get("creditor_name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    match name.split_once(scenario::STATUS_CODE) {
        Some((_, rest)) => rest
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned(),
        None => shared.dialect.statuses.answer(p.status).to_owned(),
    }
}

/// [P] a valid PIS token is required; [I] it must be the token of the PSU the payment belongs
/// to (when the payment has one yet), else 401 GEN-1203-100003 like any invalid token.
fn owner_check(payment: &Payment, psu: &str) -> Result<(), ApiError> {
    match &payment.psu {
        Some(owner) if owner != psu => Err(ApiError::invalid_token()),
        Some(_) | None => Ok(()),
    }
}

async fn details(
    State(state): State<ApiState>,
    kind: PaymentKind,
    Path((product_segment, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let shared = &state.shared;
    shared.store().count_details_request();
    check_common(shared, &headers, STATUS_VERSIONS)?;
    let product = product(&product_segment)?;
    let psu = token_psu(shared, state.brand, bearer(&headers)?)?;
    let mut store = shared.store();
    let p = find(&mut store, state.brand, kind, product, &id)
        .ok_or_else(ApiError::payment_not_found)?;
    owner_check(p, &psu)?;
    // [I] open question, docs/belfius-facts.md §10.5: the initiation body as received, with id and
    // status added (and each bulk transfer's own status).
    let mut body = p.request.clone();
    if let Value::Object(object) = &mut body {
        object.insert("payment_id".into(), json!(p.id));
        object.insert(
            "transaction_status".into(),
            json!(shared.dialect.statuses.answer(p.status)),
        );
        if let Some(Value::Array(payments)) = object.get_mut("payments") {
            for (entry, line) in payments.iter_mut().zip(&p.entries) {
                if let Value::Object(entry) = entry {
                    entry.insert("transaction_status".into(), json!(line.transaction_status));
                }
            }
        }
    }
    Ok((StatusCode::OK, Json(body)).into_response())
}

async fn cancel(
    State(state): State<ApiState>,
    kind: PaymentKind,
    Path((product_segment, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let shared = &state.shared;
    shared.store().count_cancel_request();
    check_common(shared, &headers, STATUS_VERSIONS)?;
    let product = product(&product_segment)?;
    // [P] cancellation needs the PSU's access token.
    let psu = token_psu(shared, state.brand, bearer(&headers)?)?;
    check_signature(shared, &headers, b"", false)?;
    let mut store = shared.store();
    let p = find(&mut store, state.brand, kind, product, &id)
        .ok_or_else(ApiError::payment_not_found)?;
    owner_check(p, &psu)?;
    let answer = store.settings.cancel_status;
    match store.cancel(&id, Instant::now()) {
        Ok(p) => {
            tracing::info!(payment_id = p.id, "sandbox: payment cancelled");
            // [I] 204 by default; 200/202 with the new status when configured.
            Ok(match answer {
                200 | 202 => (
                    StatusCode::from_u16(answer).unwrap_or(StatusCode::OK),
                    Json(json!({"transaction_status": shared.dialect.statuses.answer(p.status)})),
                )
                    .into_response(),
                _ => StatusCode::NO_CONTENT.into_response(),
            })
        }
        // [I] Belfius' answer to a late cancellation is not documented (open question,
        // docs/belfius-facts.md §10.11).
        Err(e @ CancelError::NotAllowed(_)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "CANCELLATION_NOT_ALLOWED",
            "B14821ZZ-9000-000000",
            e.to_string(),
        )),
        Err(CancelError::NotFound) => Err(ApiError::payment_not_found()),
    }
}

// ---------------------------------------------------------------------------------------------
// POST /token

/// [I] each brand host has its own token service: a code is redeemed, and a pair used, only on
/// the host of the brand it belongs to.
async fn token(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let result = token_inner(&state.shared, state.brand, &headers, &body);
    if result.is_err() {
        state.shared.store().count_token_failure();
    }
    result
}

fn token_inner(
    shared: &Shared,
    brand: Brand,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    check_request_id(headers)?;
    // [I] Accept-Language is sent by Tink but not known to be mandatory here; if sent it must
    // be supported.
    if headers.contains_key(header::ACCEPT_LANGUAGE) && language(headers).is_none() {
        return Err(ApiError::not_acceptable());
    }
    check_accept(headers, &[shared.dialect.token_version])?;
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
                .redeem_code(code, verifier, redirect_uri, brand, now)
                .map_err(ApiError::invalid_grant)?
        }
        "refresh_token" => shared
            .store()
            .refresh(field("refresh_token")?, brand, now)
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
        "scope": pair.scope.as_str(),
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
    if id == shared.client_id && shared.client_secret_matches(secret) {
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
