//! The simulated bank's fallback (contingency) interface, PSD2 RTS art. 33: a signed first call
//! opens a session, later unsigned calls initiate payments and read their status with it
//! (docs/belfius-facts.md §8, §13; docs/belfius.md "Fallback interface").
//!
//! Mounted on both brand hosts next to the dedicated API (`api::router`), behind the same
//! client-certificate check but NOT behind the fault layer: a fault rule (e.g. 503 on `any`)
//! takes the dedicated API down while the fallback keeps answering, which is what it is for.
//! Payments go into the same store as the dedicated API's, so a PSU signs them the same way.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::Utc;
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::{Value, json};

use super::api::{self, ApiError, ApiState};
use super::store::{self, Digest, Scenario};
use crate::belfius::client::headers as h;
use crate::belfius::fallback::headers as fh;
use crate::belfius::httpsig::{self, HttpSigError, SignatureHeader};
use crate::belfius::status::TransactionStatus;
use crate::domain::model::{Brand, PaymentKind};

/// The simulator's paths: Belfius has not published its own (facts §10.13).
pub const DEFAULT_SESSION_PATH: &str = "/fallback/session";
pub const DEFAULT_PAYMENTS_PATH: &str = "/fallback/payments";
/// [I] not documented; the 900 s seen for AIS access tokens (facts §3.2).
pub const DEFAULT_SESSION_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// [P §8] "±3 minutes tolerated".
pub const DATE_TOLERANCE: Duration = Duration::from_secs(3 * 60);

/// Path segments the dedicated API owns: a fallback path starting with one would collide.
const DEDICATED_PREFIXES: [&str; 4] = ["payments", "periodic-payments", "bulk-payments", "token"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FallbackSettings {
    /// The signed first call.
    pub session_path: String,
    /// `POST {payments_path}/{product}`, `GET {payments_path}/{product}/{id}/status`.
    pub payments_path: String,
    /// How long a session token is accepted after it was issued.
    pub session_lifetime: Duration,
    /// Largest accepted distance between `Date` and the bank's clock.
    pub date_tolerance: Duration,
}

impl Default for FallbackSettings {
    fn default() -> Self {
        Self {
            session_path: DEFAULT_SESSION_PATH.into(),
            payments_path: DEFAULT_PAYMENTS_PATH.into(),
            session_lifetime: DEFAULT_SESSION_LIFETIME,
            date_tolerance: DATE_TOLERANCE,
        }
    }
}

impl FallbackSettings {
    /// Paths axum can route and the dedicated API does not use.
    pub fn validate(&self) -> Result<(), String> {
        for (what, path) in [
            ("session path", &self.session_path),
            ("payments path", &self.payments_path),
        ] {
            let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
            if !path.starts_with('/')
                || path.ends_with('/')
                || path.contains(['?', '#', '{', '}', '*', ':'])
                || first.is_empty()
            {
                return Err(format!(
                    "fallback {what} {path:?} is not a plain absolute path"
                ));
            }
            if DEDICATED_PREFIXES.contains(&first) {
                return Err(format!(
                    "fallback {what} {path:?} collides with the dedicated API"
                ));
            }
        }
        if self.session_path == self.payments_path
            || self
                .session_path
                .starts_with(&format!("{}/", self.payments_path))
        {
            return Err("the fallback session and payments paths overlap".into());
        }
        Ok(())
    }
}

struct Session {
    brand: Brand,
    expires: Instant,
}

/// Sessions by the digest of their token (the token itself is never kept, as in the store).
pub struct FallbackState {
    pub settings: FallbackSettings,
    sessions: Mutex<HashMap<Digest, Session>>,
}

impl FallbackState {
    pub fn new(settings: FallbackSettings) -> Self {
        Self {
            settings,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    fn open(&self, brand: Brand, now: Instant) -> SecretString {
        let token = store::random_secret();
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        sessions.retain(|_, s| s.expires > now);
        sessions.insert(
            store::digest(token.expose_secret()),
            Session {
                brand,
                expires: now + self.settings.session_lifetime,
            },
        );
        token
    }

    /// A live session of this brand host.
    fn valid(&self, token: &str, brand: Brand, now: Instant) -> bool {
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&store::digest(token))
            .is_some_and(|s| s.brand == brand && now < s.expires)
    }
}

/// The fallback routes of one brand host (state: the host's [`ApiState`]).
pub(super) fn routes(settings: &FallbackSettings) -> Router<ApiState> {
    let payments = &settings.payments_path;
    Router::new()
        .route(&settings.session_path, post(open_session))
        .route(&format!("{payments}/{{product}}"), post(initiate))
        .route(
            &format!("{payments}/{{product}}/{{id}}/status"),
            get(status),
        )
}

// ---------------------------------------------------------------------------------------------
// Checks every fallback request goes through [P §8], in this order.

/// `Request-Id`: a UUID [P §8 says UUID, no version].
fn check_request_id(headers: &HeaderMap) -> Result<(), ApiError> {
    let value = api::required_header(headers, fh::REQUEST_ID)?;
    uuid::Uuid::parse_str(value)
        .map(|_| ())
        .map_err(|_| ApiError::invalid_header("Request-Id", "must be a UUID"))
}

/// `Date`: ISO 8601 in UTC (`2018-08-04T12:23:34Z`), within the tolerance of the bank's clock
/// [P §8]. [I] a date outside it is a security failure (401 GEN-1203-100008): it is what stops
/// a captured signed request from being replayed later.
fn check_date(headers: &HeaderMap, tolerance: Duration) -> Result<(), ApiError> {
    let value = api::required_header(headers, fh::DATE)?;
    let at = chrono::DateTime::parse_from_rfc3339(value)
        .ok()
        .filter(|_| value.ends_with('Z'))
        .ok_or_else(|| {
            ApiError::invalid_header("Date", "ISO 8601 in UTC, e.g. 2018-08-04T12:23:34Z")
        })?;
    let skew = (Utc::now() - at.with_timezone(&Utc)).abs();
    let allowed = chrono::Duration::from_std(tolerance).unwrap_or(chrono::Duration::MAX);
    if skew > allowed {
        return Err(ApiError::bad_signature(&format!(
            "Date is {} s away from the bank's clock (at most {} s tolerated)",
            skew.num_seconds(),
            tolerance.as_secs()
        )));
    }
    Ok(())
}

/// `Digest` of the body, `SHA-256=` or `SHA256=` [P §8; RFC 3230]. Malformed: 400; not the
/// body's [I]: 401 GEN-1203-100008, an integrity failure like a bad signature.
fn check_digest(headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    let value = api::required_header(headers, fh::DIGEST)?;
    httpsig::check_digest(value, body).map_err(|e| match e {
        HttpSigError::DigestMismatch => ApiError::bad_signature(&e.to_string()),
        HttpSigError::DigestMalformed(_)
        | HttpSigError::Malformed(_)
        | HttpSigError::UnsupportedAlgorithm(_)
        | HttpSigError::NotCovered(_)
        | HttpSigError::MissingHeader(_)
        | HttpSigError::BadSignature
        | HttpSigError::Key(_) => ApiError::invalid_header("Digest", &e.to_string()),
    })
}

fn check_common(state: &ApiState, headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    check_request_id(headers)?;
    api::check_client_id(&state.shared, headers)?;
    check_date(headers, state.shared.fallback.settings.date_tolerance)?;
    check_digest(headers, body)
}

/// All values of a header, joined as draft-cavage says.
fn header_values(headers: &HeaderMap, name: &str) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// The first call's `Signature`, verified with the registered QSeal certificate. Always on,
/// whatever `verify_signatures` says of the dedicated API's JWS: without it the fallback would
/// authenticate nothing but the QWAC.
fn check_signature(
    state: &ApiState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let outcome = verify_signature(state, method, uri, headers);
    state.shared.store().count_signature(outcome.is_ok());
    outcome.map_err(|why| {
        tracing::info!(why, "sandbox fallback: signature refused");
        ApiError::bad_signature(&why)
    })
}

fn verify_signature(
    state: &ApiState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(), String> {
    let value = api::header_str(headers, fh::SIGNATURE)
        .ok()
        .flatten()
        .ok_or_else(|| "missing Signature header".to_owned())?;
    let signature = SignatureHeader::parse(value).map_err(|e| e.to_string())?;
    let verifier = state
        .shared
        .verifier
        .as_ref()
        .ok_or_else(|| "no QSeal certificate to verify with".to_owned())?;
    let target = uri
        .path_and_query()
        .map_or_else(|| uri.path(), |p| p.as_str());
    httpsig::verify(
        &signature,
        method.as_str(),
        target,
        httpsig::FALLBACK_HEADERS,
        |name| header_values(headers, name),
        verifier,
    )
    .map_err(|e| e.to_string())
}

/// Later calls: `Authorization: Bearer <session token>` of a live session of this host [I];
/// anything else is 401 GEN-1203-100003, the documented "invalid access token".
fn check_session(state: &ApiState, headers: &HeaderMap) -> Result<(), ApiError> {
    let token = api::bearer(headers)?.filter(|t| !t.is_empty());
    match token {
        Some(token)
            if state
                .shared
                .fallback
                .valid(token, state.brand, Instant::now()) =>
        {
            Ok(())
        }
        Some(_) | None => Err(ApiError::invalid_token()),
    }
}

// ---------------------------------------------------------------------------------------------
// POST {session_path}

async fn open_session(
    State(state): State<ApiState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_common(&state, &headers, &body)?;
    check_signature(&state, &method, &uri, &headers)?;
    // [P example] `{"data":{"type":"sample-token","attributes":{"appReference":"12345"}}}`:
    // [I] a JSON:API document whose `data` is an object; its values are not interpreted.
    let value: Value = serde_json::from_slice(&body)
        .map_err(|_| ApiError::invalid_field("body", "not valid JSON"))?;
    if !value.get("data").is_some_and(Value::is_object) {
        return Err(ApiError::invalid_field(
            "data",
            "must be a JSON:API data object",
        ));
    }
    let fallback = &state.shared.fallback;
    let token = fallback.open(state.brand, Instant::now());
    tracing::info!(
        brand = state.brand.as_str(),
        "sandbox fallback: session opened"
    );
    // [I] the answer's shape (facts §10.13).
    let body = json!({
        "data": {
            "type": "session-token",
            "attributes": {
                "token": token.expose_secret(),
                "expires_in": fallback.settings.session_lifetime.as_secs(),
            },
        }
    });
    let mut response = (StatusCode::CREATED, Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

// ---------------------------------------------------------------------------------------------
// POST {payments_path}/{product}

/// [I] the dedicated API's single-payment v3 body and rules, without PKCE or token: the PSU
/// signs in the bank's screens and comes back to the bare `Redirect-URI` (no code).
async fn initiate(
    State(state): State<ApiState>,
    Path(product_segment): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let shared = &state.shared;
    shared.store().count_initiation_request();
    check_common(&state, &headers, &body)?;
    check_session(&state, &headers)?;
    let product = api::product(&product_segment)?;
    api::check_content_type(&headers, "application/json")?;
    let redirect_uri = api::required_header(&headers, h::REDIRECT_URI)?;
    if let Some(why) = shared.onboarding.redirect_refusal(redirect_uri) {
        return Err(ApiError::invalid_header("Redirect-URI", why));
    }
    let object = api::json_object(&body)?;
    let fields = api::validate_single(&object, product, &shared.rules, Utc::now().date_naive())?;
    if let Some(debtor) = &fields.debtor_iban {
        api::check_debtor_account(&shared.rules, state.brand, debtor)?;
    }
    let payment_id = {
        let mut store = shared.store();
        store
            .insert_payment(
                fields.into_new_payment(api::Placed {
                    kind: PaymentKind::Single,
                    brand: state.brand,
                    product,
                    redirect_uri,
                    challenge: None,
                    psu: None,
                    scenario: Scenario::default(),
                    request: Value::Object(object),
                }),
                Instant::now(),
            )
            .id
            .clone()
    };
    tracing::info!(
        payment_id,
        brand = state.brand.as_str(),
        "sandbox fallback: payment initiated"
    );
    let sca_url = shared.sca_url(&payment_id).ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_server_error",
            "",
            "no SCA URL",
        )
    })?;
    // [I] the dedicated API's default answer (docs/belfius.md §3.3), whatever the dialect.
    let body = json!({
        "payment_id": payment_id,
        "transaction_status": shared.dialect.statuses.answer(TransactionStatus::Rcvd),
        "_links": {"scaRedirect": {"href": sca_url}},
    });
    let mut response = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(location) = HeaderValue::from_str(&sca_url) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

// ---------------------------------------------------------------------------------------------
// GET {payments_path}/{product}/{id}/status

async fn status(
    State(state): State<ApiState>,
    Path((product_segment, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let shared = &state.shared;
    shared.store().count_status_request();
    check_common(&state, &headers, b"")?;
    check_session(&state, &headers)?;
    let product = api::product(&product_segment)?;
    let mut store = shared.store();
    // Any single payment of this host, whichever interface created it.
    let p = api::find(&mut store, state.brand, PaymentKind::Single, product, &id)
        .ok_or_else(ApiError::payment_not_found)?;
    Ok((
        StatusCode::OK,
        Json(json!({"transaction_status": api::answered_status(shared, p)})),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers_with_date(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(fh::DATE, HeaderValue::from_str(value).unwrap());
        headers
    }

    fn code(result: Result<(), ApiError>) -> (u16, String) {
        let error = result.expect_err("refused");
        let code = error.body.map(|b| b.error_code).unwrap_or_default();
        (error.status.as_u16(), code)
    }

    #[test]
    fn dates_within_three_minutes_only() {
        let now = Utc::now();
        for offset in [-170, 0, 170] {
            let at = now + chrono::Duration::seconds(offset);
            assert!(
                check_date(
                    &headers_with_date(&at.format("%Y-%m-%dT%H:%M:%SZ").to_string()),
                    DATE_TOLERANCE,
                )
                .is_ok(),
                "{offset}"
            );
        }
        for offset in [-240, 240] {
            let at = now + chrono::Duration::seconds(offset);
            assert_eq!(
                code(check_date(
                    &headers_with_date(&at.format("%Y-%m-%dT%H:%M:%SZ").to_string()),
                    DATE_TOLERANCE
                )),
                (401, "GEN-1203-100008".into()),
                "{offset}"
            );
        }
        let local = (now + chrono::Duration::hours(2)).format("%Y-%m-%dT%H:%M:%S+02:00");
        for bad in [
            "Sun, 05 Jan 2014 21:31:40 GMT".to_owned(),
            local.to_string(),
            "2018-08-04 12:23:34".to_owned(),
        ] {
            assert_eq!(
                code(check_date(&headers_with_date(&bad), DATE_TOLERANCE)),
                (400, "GEN-1202-100001".into()),
                "{bad}"
            );
        }
        assert_eq!(
            code(check_date(&HeaderMap::new(), DATE_TOLERANCE)),
            (400, "GEN-1201-100001".into())
        );
    }

    #[test]
    fn settings_refuse_colliding_paths() {
        FallbackSettings::default().validate().unwrap();
        for (session, payments) in [
            ("/payments/session", "/fallback/payments"),
            ("/fallback/session", "/token"),
            ("fallback/session", "/fallback/payments"),
            ("/fallback/session/", "/fallback/payments"),
            ("/fallback/{x}", "/fallback/payments"),
            ("/fallback", "/fallback"),
            ("/fallback/payments/session", "/fallback/payments"),
        ] {
            let settings = FallbackSettings {
                session_path: session.into(),
                payments_path: payments.into(),
                ..FallbackSettings::default()
            };
            assert!(settings.validate().is_err(), "{session} {payments}");
        }
    }

    #[test]
    fn sessions_expire_and_stay_on_their_host() {
        let state = FallbackState::new(FallbackSettings {
            session_lifetime: Duration::from_secs(60),
            ..FallbackSettings::default()
        });
        let now = Instant::now();
        let token = state.open(Brand::Belfius, now);
        assert!(state.valid(token.expose_secret(), Brand::Belfius, now));
        assert!(!state.valid(token.expose_secret(), Brand::Banx, now));
        assert!(!state.valid("another", Brand::Belfius, now));
        assert!(!state.valid(
            token.expose_secret(),
            Brand::Belfius,
            now + Duration::from_secs(60)
        ));
    }
}
