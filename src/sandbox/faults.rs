//! Runtime-switchable fault injection for the simulated bank API.
//!
//! [`middleware`] sits in front of the bank routes (`axum::middleware::from_fn_with_state`);
//! [`admin_router`] switches faults on the operator listener:
//!
//! * `GET /admin/faults` → `{"settings": FaultSettings, "counters": {...}}`
//! * `PUT /admin/faults` with a [`FaultSettings`] body → 204 (400 if invalid)
//! * `DELETE /admin/faults` → 204, back to no faults (counters and traffic are kept)
//! * `DELETE /admin/faults/traffic` → 204, forgets the recorded traffic
//!
//! Fault kinds, as a client sees them:
//! * [`Fault::Status`]: an HTTP error with the Belfius error body (and `Retry-After`).
//! * [`Fault::Reset`]: the connection closes before the request is processed; no HTTP status.
//! * [`Fault::ResponseLost`]: the request IS processed (e.g. the payment exists), then the
//!   connection hangs for `hang_ms` and closes without an answer: the outcome is unknown.
//!
//! The layer also records the traffic it sees ([`Faults::traffic`], `traffic` in
//! `GET /admin/faults`): every request's arrival time, endpoint and host, and the most requests
//! in progress at once, per host. Tests check retries, rate and concurrency limits with it.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Error token and code of the simulated failure body. The code is not documented [I].
pub const SIMULATED_ERROR: &str = "INTERNAL_SERVER_ERROR";
pub const SIMULATED_ERROR_CODE: &str = "GEN-5000-000000";
pub const SIMULATED_ERROR_DESCRIPTION: &str = "simulated";

/// Shared, cheaply clonable fault switchboard.
#[derive(Clone, Default)]
pub struct Faults {
    inner: Arc<Inner>,
}

/// Response header naming the payment a successful initiation created; lets a lost answer
/// mark that payment as an orphan.
pub const CREATED_PAYMENT_HEADER: &str = "x-sandbox-created-payment";

type LostHook = Arc<dyn Fn(&str) + Send + Sync>;

#[derive(Default)]
struct Inner {
    /// Called with the id of a payment whose initiation answer was lost.
    on_lost: Mutex<Option<LostHook>>,
    settings: Mutex<FaultSettings>,
    /// (fault label, endpoint label) → injections.
    counters: Mutex<BTreeMap<(String, &'static str), u64>>,
    traffic: Mutex<TrafficState>,
}

/// Arrivals kept by the traffic recorder (the oldest are dropped first).
pub const MAX_ARRIVALS: usize = 10_000;

#[derive(Default)]
struct TrafficState {
    /// Arrival times are milliseconds since this instant (the first request, or the reset).
    epoch: Option<Instant>,
    arrivals: VecDeque<Arrival>,
    in_flight: BTreeMap<String, usize>,
    max_in_flight: BTreeMap<String, usize>,
}

/// A request as the fault layer saw it arrive (before latency or a fault was applied).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Arrival {
    /// Milliseconds (monotonic clock) since the recorder's epoch.
    pub at_ms: u64,
    pub endpoint: EndpointClass,
    /// The request's `Host` header: one bank host (brand) per listener.
    pub host: String,
}

/// What [`Faults::traffic`] reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Traffic {
    /// Oldest first, at most [`MAX_ARRIVALS`].
    pub arrivals: Vec<Arrival>,
    /// Requests in progress now (arrived, no response produced yet), per host.
    pub in_flight: BTreeMap<String, usize>,
    /// The most requests in progress at once, per host, since the last reset.
    pub max_in_flight: BTreeMap<String, usize>,
}

impl Traffic {
    /// Arrivals for one endpoint class, oldest first.
    pub fn arrivals_at(&self, endpoint: EndpointClass) -> Vec<&Arrival> {
        self.arrivals
            .iter()
            .filter(|a| endpoint.matches(a.endpoint))
            .collect()
    }

    /// The largest `max_in_flight` of any host.
    pub fn max_in_flight_any_host(&self) -> usize {
        self.max_in_flight.values().copied().max().unwrap_or(0)
    }
}

/// A request in progress; counted out when dropped (answered, failed or abandoned).
struct Visit {
    faults: Faults,
    host: String,
}

impl Drop for Visit {
    fn drop(&mut self) {
        let mut traffic = lock(&self.faults.inner.traffic);
        if let Some(count) = traffic.in_flight.get_mut(&self.host) {
            *count = count.saturating_sub(1);
        }
    }
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults")
            .field("settings", &self.settings())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct FaultSettings {
    /// Added before every bank API response.
    pub latency: Latency,
    /// Evaluated in order: the first rule whose endpoint matches, which is not spent and whose
    /// probability draw succeeds, is applied; a failed draw moves on to the next rule.
    pub rules: Vec<FaultRule>,
}

impl FaultSettings {
    /// Checks probabilities (0.0..=1.0) and status codes (100..=599).
    pub fn validate(&self) -> Result<(), String> {
        for (index, rule) in self.rules.iter().enumerate() {
            if !(0.0..=1.0).contains(&rule.probability) {
                return Err(format!(
                    "rules[{index}].probability must be within 0.0..=1.0, got {}",
                    rule.probability
                ));
            }
            match rule.fault {
                Fault::Status { status, .. } if !(100..=599).contains(&status) => {
                    return Err(format!(
                        "rules[{index}].fault.status must be within 100..=599, got {status}"
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Latency {
    pub fixed_ms: u64,
    /// Uniform in `0..=jitter_ms`.
    pub jitter_ms: u64,
    /// Added with 1% probability.
    pub p99_spike_ms: u64,
}

impl Latency {
    fn draw(&self) -> Duration {
        let mut rng = rand::thread_rng();
        let jitter = if self.jitter_ms > 0 {
            rng.gen_range(0..=self.jitter_ms)
        } else {
            0
        };
        let spike = if self.p99_spike_ms > 0 && rng.gen_bool(0.01) {
            self.p99_spike_ms
        } else {
            0
        };
        Duration::from_millis(self.fixed_ms.saturating_add(jitter).saturating_add(spike))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FaultRule {
    pub endpoint: EndpointClass,
    /// 0.0..=1.0.
    pub probability: f64,
    pub fault: Fault,
    /// Apply at most N times, then the rule is spent (it stays listed with `Some(0)`).
    #[serde(default)]
    pub remaining: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum EndpointClass {
    Initiate,
    Status,
    Details,
    Cancel,
    Token,
    /// `GET /consent-uris`.
    Consent,
    /// `POST /funds-confirmations` (CAF).
    Funds,
    /// `GET /accounts…` (AIS).
    Accounts,
    /// In a rule: every request. Never returned by [`classify`].
    Any,
    /// What [`classify`] returns for anything else (only `Any` rules match it).
    Other,
}

impl EndpointClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initiate => "initiate",
            Self::Status => "status",
            Self::Details => "details",
            Self::Cancel => "cancel",
            Self::Token => "token",
            Self::Consent => "consent",
            Self::Funds => "funds",
            Self::Accounts => "accounts",
            Self::Any => "any",
            Self::Other => "other",
        }
    }

    /// Whether a rule for `self` applies to a request classified as `request`.
    pub fn matches(self, request: EndpointClass) -> bool {
        self == Self::Any || self == request
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// An HTTP error (e.g. 500/502/503, or 429 with `Retry-After`) with the Belfius error body;
    /// the request is not processed.
    Status {
        status: u16,
        #[serde(default)]
        retry_after_secs: Option<u64>,
    },
    /// Close the connection before processing: the request did nothing.
    Reset,
    /// Process the request, then never answer: hang `hang_ms`, then drop the connection.
    ResponseLost { hang_ms: u64 },
}

impl Fault {
    /// Counter label: `status_503`, `reset`, `response_lost`.
    pub fn label(&self) -> String {
        match self {
            Self::Status { status, .. } => format!("status_{status}"),
            Self::Reset => "reset".into(),
            Self::ResponseLost { .. } => "response_lost".into(),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while a guard is held; a poisoned lock still holds consistent data.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Faults {
    /// Registers what to do with a payment whose initiation answer was lost.
    pub fn on_response_lost(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        let mut slot = self.inner.on_lost.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Some(Arc::new(hook));
    }

    fn payment_lost(&self, id: &str) {
        let hook = self
            .inner
            .on_lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(hook) = hook {
            hook(id);
        }
    }

    pub fn new(settings: FaultSettings) -> Self {
        let faults = Self::default();
        faults.set(settings);
        faults
    }

    pub fn settings(&self) -> FaultSettings {
        lock(&self.inner.settings).clone()
    }

    /// Replaces the settings. Out-of-range values do not panic: a probability is clamped by the
    /// draw, an invalid status becomes 500. Use [`FaultSettings::validate`] to refuse them.
    pub fn set(&self, settings: FaultSettings) {
        *lock(&self.inner.settings) = settings;
    }

    /// No latency, no rules. Counters are kept.
    pub fn clear(&self) {
        self.set(FaultSettings::default());
    }

    /// Injected faults per kind and endpoint:
    /// `{"total": 3, "by_fault": {"status_503": {"initiate": 2}, "reset": {"status": 1}}}`.
    pub fn counters(&self) -> serde_json::Value {
        let counters = lock(&self.inner.counters);
        let mut by_fault = serde_json::Map::new();
        let mut total = 0u64;
        for ((fault, endpoint), count) in counters.iter() {
            total = total.saturating_add(*count);
            let entry = by_fault.entry(fault.clone()).or_insert_with(|| json!({}));
            if let Some(map) = entry.as_object_mut() {
                map.insert((*endpoint).to_owned(), json!(count));
            }
        }
        json!({ "total": total, "by_fault": by_fault })
    }

    pub fn reset_counters(&self) {
        lock(&self.inner.counters).clear();
    }

    /// The traffic seen since the last [`Self::reset_traffic`].
    pub fn traffic(&self) -> Traffic {
        let traffic = lock(&self.inner.traffic);
        Traffic {
            arrivals: traffic.arrivals.iter().cloned().collect(),
            in_flight: traffic.in_flight.clone(),
            max_in_flight: traffic.max_in_flight.clone(),
        }
    }

    /// Forgets arrivals and maxima (requests in progress stay counted); the clock restarts.
    pub fn reset_traffic(&self) {
        let mut traffic = lock(&self.inner.traffic);
        traffic.epoch = Some(Instant::now());
        traffic.arrivals.clear();
        traffic.max_in_flight = traffic.in_flight.clone();
    }

    /// Records an arriving request; it is in progress until the returned value is dropped.
    fn arrive(&self, endpoint: EndpointClass, host: &str) -> Visit {
        let mut traffic = lock(&self.inner.traffic);
        let now = Instant::now();
        let epoch = *traffic.epoch.get_or_insert(now);
        let at_ms = now.saturating_duration_since(epoch).as_millis() as u64;
        if traffic.arrivals.len() >= MAX_ARRIVALS {
            traffic.arrivals.pop_front();
        }
        traffic.arrivals.push_back(Arrival {
            at_ms,
            endpoint,
            host: host.to_owned(),
        });
        let count = {
            let count = traffic.in_flight.entry(host.to_owned()).or_insert(0);
            *count += 1;
            *count
        };
        let max = traffic.max_in_flight.entry(host.to_owned()).or_insert(0);
        *max = (*max).max(count);
        Visit {
            faults: self.clone(),
            host: host.to_owned(),
        }
    }

    /// The latency to add and the fault to inject (if any) for one request; spends one use of
    /// the chosen rule and counts the injection.
    pub fn decide(&self, endpoint: EndpointClass) -> (Duration, Option<Fault>) {
        let chosen = {
            let mut settings = lock(&self.inner.settings);
            let latency = settings.latency.draw();
            let mut rng = rand::thread_rng();
            let fault = settings.rules.iter_mut().find_map(|rule| {
                if !rule.endpoint.matches(endpoint) || rule.remaining == Some(0) {
                    return None;
                }
                // gen::<f64>() is in [0, 1): probability 0 (or NaN) never fires, 1 always does.
                if rng.r#gen::<f64>() >= rule.probability {
                    return None;
                }
                if let Some(remaining) = rule.remaining.as_mut() {
                    *remaining -= 1;
                }
                Some(rule.fault.clone())
            });
            (latency, fault)
        };
        if let Some(fault) = &chosen.1 {
            let mut counters = lock(&self.inner.counters);
            *counters
                .entry((fault.label(), endpoint.as_str()))
                .or_insert(0) += 1;
        }
        chosen
    }
}

/// The endpoint class of a bank API request. Any base path prefix is accepted (e.g.
/// `/sandbox/psd2/payments/...`).
///
/// * `POST …/token` → Token
/// * `…/consent-uris` → Consent; `POST …/funds-confirmations` → Funds; `…/accounts…` → Accounts
/// * `POST …/{payments|periodic-payments|bulk-payments}/{product}` → Initiate
/// * `GET …/payments/{product}/{id}/status` → Status
/// * `DELETE …/payments/…` → Cancel
/// * any other `GET …/payments/…` → Details
/// * everything else → Other
pub fn classify(method: &Method, path: &str) -> EndpointClass {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if *method == Method::POST && segments.last() == Some(&"token") {
        return EndpointClass::Token;
    }
    if segments.last() == Some(&"consent-uris") {
        return EndpointClass::Consent;
    }
    if *method == Method::POST && segments.last() == Some(&"funds-confirmations") {
        return EndpointClass::Funds;
    }
    if segments.contains(&"accounts") {
        return EndpointClass::Accounts;
    }
    let Some(start) = segments
        .iter()
        .position(|s| matches!(*s, "payments" | "periodic-payments" | "bulk-payments"))
    else {
        return EndpointClass::Other;
    };
    let under = &segments[start + 1..];
    if *method == Method::POST {
        if under.len() == 1 {
            EndpointClass::Initiate
        } else {
            EndpointClass::Other
        }
    } else if *method == Method::DELETE {
        EndpointClass::Cancel
    } else if *method == Method::GET {
        if under.len() == 3 && under[2] == "status" {
            EndpointClass::Status
        } else {
            EndpointClass::Details
        }
    } else {
        EndpointClass::Other
    }
}

/// For `axum::middleware::from_fn_with_state(faults, middleware)` on the bank API router.
pub async fn middleware(State(faults): State<Faults>, request: Request, next: Next) -> Response {
    let endpoint = classify(request.method(), request.uri().path());
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    // In progress until this function returns (or its future is dropped): latency and a lost
    // answer's hang count as time spent at the bank.
    let _visit = faults.arrive(endpoint, &host);
    let (latency, fault) = faults.decide(endpoint);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let Some(fault) = fault else {
        return next.run(request).await;
    };
    tracing::info!(endpoint = endpoint.as_str(), fault = %fault.label(), "sandbox: injecting fault");
    match fault {
        Fault::Status {
            status,
            retry_after_secs,
        } => status_response(status, retry_after_secs),
        Fault::Reset => {
            drop(request);
            aborted_response()
        }
        Fault::ResponseLost { hang_ms } => {
            // The bank acts: the handler runs to completion and its answer is lost. A payment
            // it created is an orphan: the TPP never saw its SCA URL (whether a PSU may still
            // sign it is the store's `orphans_signable`).
            let answered = next.run(request).await;
            let created = answered
                .headers()
                .get(CREATED_PAYMENT_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            drop(answered);
            if let Some(id) = created {
                faults.payment_lost(&id);
            }
            tokio::time::sleep(Duration::from_millis(hang_ms)).await;
            aborted_response()
        }
    }
}

fn status_response(status: u16, retry_after_secs: Option<u64>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = json!({
        "error": SIMULATED_ERROR,
        "error_code": SIMULATED_ERROR_CODE,
        "error_description": SIMULATED_ERROR_DESCRIPTION,
    });
    let mut response = (status, Json(body)).into_response();
    if let Some(seconds) = retry_after_secs {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// A response whose body fails on the first poll. hyper then abandons the connection before
/// the buffered response head is flushed, so the client sees the connection close without any
/// HTTP status (not a 200 with a broken body).
fn aborted_response() -> Response {
    let mut response = Response::new(Body::new(AbortBody));
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

struct AbortBody;

impl hyper::body::Body for AbortBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Poll::Ready(Some(Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "sandbox fault injection: connection dropped",
        ))))
    }
}

/// Operator endpoints for the faults (mount on the plain-HTTP admin listener).
pub fn admin_router(faults: Faults) -> Router {
    Router::new()
        .route(
            "/admin/faults",
            get(show_faults).put(put_faults).delete(delete_faults),
        )
        .route(
            "/admin/faults/traffic",
            axum::routing::delete(delete_traffic),
        )
        .with_state(faults)
}

async fn show_faults(State(faults): State<Faults>) -> Json<serde_json::Value> {
    Json(json!({
        "settings": faults.settings(),
        "counters": faults.counters(),
        "traffic": faults.traffic(),
    }))
}

async fn put_faults(State(faults): State<Faults>, Json(settings): Json<FaultSettings>) -> Response {
    match settings.validate() {
        Ok(()) => {
            tracing::info!(?settings, "sandbox: fault settings replaced");
            faults.set(settings);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(message) => {
            (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response()
        }
    }
}

async fn delete_traffic(State(faults): State<Faults>) -> StatusCode {
    faults.reset_traffic();
    StatusCode::NO_CONTENT
}

async fn delete_faults(State(faults): State<Faults>) -> StatusCode {
    faults.clear();
    tracing::info!("sandbox: faults cleared");
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_endpoints() {
        use EndpointClass::*;
        let cases = [
            (Method::POST, "/token", Token),
            (Method::POST, "/sandbox/psd2/token", Token),
            (Method::GET, "/token", Other),
            (Method::POST, "/payments/sepa-credit-transfers", Initiate),
            (Method::POST, "/payments/sepa-credit-transfers/", Initiate),
            (
                Method::POST,
                "/sandbox/psd2/payments/instant-sepa-credit-transfers",
                Initiate,
            ),
            (
                Method::POST,
                "/periodic-payments/sepa-credit-transfers",
                Initiate,
            ),
            (
                Method::POST,
                "/bulk-payments/sepa-credit-transfers",
                Initiate,
            ),
            (
                Method::GET,
                "/payments/sepa-credit-transfers/abc-1/status",
                Status,
            ),
            (
                Method::GET,
                "/bulk-payments/sepa-credit-transfers/abc-1/status",
                Status,
            ),
            (
                Method::GET,
                "/payments/sepa-credit-transfers/abc-1",
                Details,
            ),
            (
                Method::GET,
                "/periodic-payments/sepa-credit-transfers/abc-1",
                Details,
            ),
            (
                Method::DELETE,
                "/payments/sepa-credit-transfers/abc-1",
                Cancel,
            ),
            (
                Method::DELETE,
                "/periodic-payments/sepa-credit-transfers/abc-1",
                Cancel,
            ),
            (Method::POST, "/payments/sepa-credit-transfers/abc-1", Other),
            (Method::PUT, "/payments/sepa-credit-transfers/abc-1", Other),
            (Method::GET, "/consent-uris", Consent),
            (Method::POST, "/funds-confirmations", Funds),
            (Method::GET, "/funds-confirmations", Other),
            (Method::GET, "/accounts", Accounts),
            (
                Method::GET,
                "/sandbox/psd2/accounts/abc/transactions",
                Accounts,
            ),
            (Method::GET, "/", Other),
        ];
        for (method, path, expected) in cases {
            assert_eq!(classify(&method, path), expected, "{method} {path}");
        }
    }

    #[test]
    fn settings_json_shape() {
        let settings: FaultSettings = serde_json::from_value(json!({
            "latency": {"fixed_ms": 5},
            "rules": [
                {"endpoint": "initiate", "probability": 0.5,
                 "fault": {"kind": "status", "status": 429, "retry_after_secs": 2}},
                {"endpoint": "any", "probability": 1.0, "fault": {"kind": "reset"}, "remaining": 1},
                {"endpoint": "status", "probability": 0.1,
                 "fault": {"kind": "response_lost", "hang_ms": 100}}
            ]
        }))
        .expect("deserialise");
        assert_eq!(settings.latency.fixed_ms, 5);
        assert_eq!(settings.latency.jitter_ms, 0);
        assert_eq!(settings.rules[0].remaining, None);
        assert_eq!(
            settings.rules[0].fault,
            Fault::Status {
                status: 429,
                retry_after_secs: Some(2)
            }
        );
        assert_eq!(settings.rules[1].fault, Fault::Reset);
        assert_eq!(
            settings.rules[2].fault,
            Fault::ResponseLost { hang_ms: 100 }
        );
        let back: FaultSettings =
            serde_json::from_value(serde_json::to_value(&settings).expect("ser")).expect("de");
        assert_eq!(back, settings);
        assert!(settings.validate().is_ok());
    }

    #[test]
    fn validation_and_rule_order() {
        let rule = |endpoint, probability, fault| FaultRule {
            endpoint,
            probability,
            fault,
            remaining: None,
        };
        let bad = FaultSettings {
            latency: Latency::default(),
            rules: vec![rule(EndpointClass::Any, 1.5, Fault::Reset)],
        };
        assert!(bad.validate().is_err());
        let bad = FaultSettings {
            latency: Latency::default(),
            rules: vec![rule(
                EndpointClass::Any,
                1.0,
                Fault::Status {
                    status: 42,
                    retry_after_secs: None,
                },
            )],
        };
        assert!(bad.validate().is_err());

        let faults = Faults::new(FaultSettings {
            latency: Latency::default(),
            rules: vec![
                rule(EndpointClass::Token, 1.0, Fault::Reset),
                FaultRule {
                    remaining: Some(1),
                    ..rule(
                        EndpointClass::Any,
                        1.0,
                        Fault::Status {
                            status: 503,
                            retry_after_secs: None,
                        },
                    )
                },
                rule(EndpointClass::Initiate, 0.0, Fault::Reset),
            ],
        });
        assert_eq!(faults.decide(EndpointClass::Token).1, Some(Fault::Reset));
        assert!(matches!(
            faults.decide(EndpointClass::Status).1,
            Some(Fault::Status { status: 503, .. })
        ));
        assert_eq!(faults.settings().rules[1].remaining, Some(0));
        for _ in 0..100 {
            assert_eq!(faults.decide(EndpointClass::Initiate).1, None);
        }
        let counters = faults.counters();
        assert_eq!(counters["total"], 2);
        assert_eq!(counters["by_fault"]["reset"]["token"], 1);
        assert_eq!(counters["by_fault"]["status_503"]["status"], 1);
    }

    #[test]
    fn traffic_counts_arrivals_and_requests_in_progress_per_host() {
        let faults = Faults::default();
        let a = faults.arrive(EndpointClass::Status, "h1");
        let b = faults.arrive(EndpointClass::Initiate, "h1");
        let c = faults.arrive(EndpointClass::Status, "h2");
        let traffic = faults.traffic();
        assert_eq!(traffic.arrivals.len(), 3);
        assert_eq!(traffic.in_flight["h1"], 2);
        assert_eq!(traffic.max_in_flight["h1"], 2);
        assert_eq!(traffic.max_in_flight["h2"], 1);
        assert_eq!(traffic.max_in_flight_any_host(), 2);
        assert_eq!(traffic.arrivals_at(EndpointClass::Status).len(), 2);
        assert_eq!(traffic.arrivals_at(EndpointClass::Any).len(), 3);
        assert!(
            traffic
                .arrivals
                .windows(2)
                .all(|w| w[0].at_ms <= w[1].at_ms)
        );
        drop((a, b));
        let d = faults.arrive(EndpointClass::Token, "h1");
        let traffic = faults.traffic();
        assert_eq!(traffic.in_flight["h1"], 1);
        assert_eq!(traffic.max_in_flight["h1"], 2);
        faults.reset_traffic();
        let traffic = faults.traffic();
        assert!(traffic.arrivals.is_empty());
        // In progress across the reset: still counted.
        assert_eq!(traffic.max_in_flight["h1"], 1);
        drop((c, d));
        assert_eq!(faults.traffic().in_flight["h2"], 0);
    }
}
