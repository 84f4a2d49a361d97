//! Client of the Belfius fallback (contingency) interface, PSD2 RTS art. 33: what a TPP uses
//! when the dedicated API is down (docs/belfius-facts.md §8, §13; docs/belfius.md "Fallback
//! interface"). Small on purpose: no guard (retries, breaker), the caller decides.
//!
//! Known [P §8]: mutual TLS with the QWAC; on every request `Request-Id`, `Client-Id`, `Date`
//! (ISO 8601 UTC, ±3 minutes) and `Digest`; the first call carries an HTTP signature
//! (draft-cavage-http-signatures-10, `belfius::httpsig`) with the QSeal key and obtains a
//! session; later calls go to another endpoint without a signature.
//!
//! Not known, so settings or [I] choices here: both endpoint URLs (Belfius has not published
//! them: [`FallbackEndpoints`] has no default for them), the signature's `keyId`, where the
//! session token comes back and how later calls carry it (`data.attributes.token`, sent as
//! `Authorization: Bearer`), and the payment resources (the dedicated API's v3 body, answer and
//! status shapes are reused).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use reqwest::header::{self, HeaderMap};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use serde_json::json;

use super::answer::{self, RawAnswer};
use super::client::{self, ClientBuildError, InitiationBody, headers as h};
use super::guard::StatusClass;
use super::httpsig::{self, DigestLabel, HttpSigner};
use super::{AmountFormat, BankError, BelfiusConfig, Initiated};
use crate::domain::model::{BankPaymentId, Brand, PaymentOrder, PaymentProduct};

/// Header names of the fallback interface [P §8] (case-insensitive on the wire).
pub mod headers {
    pub const REQUEST_ID: &str = "request-id";
    pub const CLIENT_ID: &str = "client-id";
    pub const DATE: &str = "date";
    pub const DIGEST: &str = "digest";
    pub const SIGNATURE: &str = "signature";
}

/// The fallback's requests, as `pis_bank_fallback_requests_total` counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackCall {
    Session,
    Initiate,
    Status,
}

impl FallbackCall {
    pub const ALL: [FallbackCall; 3] = [
        FallbackCall::Session,
        FallbackCall::Initiate,
        FallbackCall::Status,
    ];

    /// The `endpoint` label.
    pub fn endpoint(self) -> &'static str {
        match self {
            FallbackCall::Session => "session",
            FallbackCall::Initiate => "initiate",
            FallbackCall::Status => "status",
        }
    }
}

fn count(call: FallbackCall, class: StatusClass) {
    crate::metrics::metrics()
        .fallback_requests
        .with_label_values(&[call.endpoint(), class.as_str()])
        .inc();
}

/// The `Date` format: ISO 8601 in UTC, seconds, `Z` [P §8 example `2018-08-04T12:23:34Z`].
pub const DATE_FORMAT: &str = "%Y-%m-%dT%H:%M:%SZ";

/// Where the fallback interface lives and how its first call is made. The paths are not public
/// (open question, docs/belfius-facts.md §10.13): they must be configured from what Belfius
/// gives at onboarding for the regulatory interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FallbackEndpoints {
    /// Base URL of each brand's host (a base path is kept).
    pub belfius_base_url: url::Url,
    pub banx_base_url: url::Url,
    /// The signed first call that opens a session, e.g. `/fallback/session` in the simulator.
    pub session_path: String,
    /// Payments: `POST {payments_path}/{product}`, `GET {payments_path}/{product}/{id}/status`
    /// [I shape, after the dedicated API].
    pub payments_path: String,
    /// `keyId` of the `Signature` header [I]: not documented; Berlin Group interfaces use
    /// `SN=<certificate serial>,CA=<issuer DN>` of the QSeal.
    pub key_id: String,
    /// `data.type` of the session request [P example `sample-token`].
    pub session_type: String,
    /// `data.attributes.appReference` of the session request [P example `12345`].
    pub app_reference: String,
    /// How `Digest` is spelt: `SHA-256=` (RFC 5843) by default, `SHA256=` as the portal writes.
    pub digest_label: DigestLabel,
    /// Headers the first call's signature covers, in order [P names; I order].
    pub signed_headers: Vec<String>,
}

impl FallbackEndpoints {
    /// The URLs and key id, which have no defaults; the rest as the portal's example shows.
    pub fn new(
        belfius_base_url: url::Url,
        banx_base_url: url::Url,
        session_path: impl Into<String>,
        payments_path: impl Into<String>,
        key_id: impl Into<String>,
    ) -> Self {
        Self {
            belfius_base_url,
            banx_base_url,
            session_path: session_path.into(),
            payments_path: payments_path.into(),
            key_id: key_id.into(),
            session_type: "sample-token".into(),
            app_reference: "12345".into(),
            digest_label: DigestLabel::default(),
            signed_headers: httpsig::FALLBACK_HEADERS
                .iter()
                .map(|h| (*h).to_owned())
                .collect(),
        }
    }

    fn base_url(&self, brand: Brand) -> &url::Url {
        match brand {
            Brand::Belfius => &self.belfius_base_url,
            Brand::Banx => &self.banx_base_url,
        }
    }

    /// `{brand's base}{path}` plus percent-encoded segments; the base's own path is kept.
    pub fn url(&self, brand: Brand, path: &str, segments: &[&str]) -> Result<url::Url, BankError> {
        let mut url = self.base_url(brand).clone();
        let joined = format!("{}{path}", url.path().trim_end_matches('/'));
        url.set_path(&joined);
        if !segments.is_empty() {
            let mut parts = url.path_segments_mut().map_err(|()| {
                BankError::NotSent(format!("base URL for {} cannot be a base", brand.as_str()))
            })?;
            parts.pop_if_empty();
            parts.extend(segments);
        }
        Ok(url)
    }
}

/// One session per brand host [I: each host has its own].
#[derive(Default)]
struct Sessions {
    belfius: Option<SecretString>,
    banx: Option<SecretString>,
}

impl Sessions {
    fn slot(&mut self, brand: Brand) -> &mut Option<SecretString> {
        match brand {
            Brand::Belfius => &mut self.belfius,
            Brand::Banx => &mut self.banx,
        }
    }
}

/// Cheap to clone; clones share the connection pool and the sessions.
#[derive(Clone)]
pub struct FallbackClient {
    http: reqwest::Client,
    client_id: String,
    amount_format: AmountFormat,
    endpoints: Arc<FallbackEndpoints>,
    signer: Arc<HttpSigner>,
    sessions: Arc<Mutex<Sessions>>,
    sessions_opened: Arc<AtomicU64>,
}

impl std::fmt::Debug for FallbackClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No sessions, no key: the signer's Debug shows only its keyId.
        f.debug_struct("FallbackClient")
            .field("client_id", &self.client_id)
            .field("endpoints", &self.endpoints)
            .field("signer", &self.signer)
            .finish_non_exhaustive()
    }
}

/// What came back, whatever the status.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// The session answer [I]: `{"data":{"type":…,"attributes":{"token":"…"}}}`. No Debug: it
/// holds the token.
#[derive(Deserialize)]
struct SessionAnswer {
    data: SessionData,
}

#[derive(Deserialize)]
struct SessionData {
    attributes: SessionAttributes,
}

#[derive(Deserialize)]
struct SessionAttributes {
    token: SecretString,
}

#[derive(Deserialize)]
struct StatusAnswer {
    transaction_status: Option<String>,
}

fn check_path(what: &str, path: &str) -> Result<(), ClientBuildError> {
    if !path.starts_with('/') || path.contains(['?', '#']) || path.len() < 2 {
        return Err(ClientBuildError::Fallback(format!(
            "{what} must be an absolute path without query or fragment, got {path:?}"
        )));
    }
    Ok(())
}

impl FallbackClient {
    /// Same transport as [`super::BelfiusClient`] (`bank`'s QWAC, CA roots, timeouts,
    /// Client-ID, amount format); signs with `bank.qseal`'s key, which is required.
    pub fn new(
        bank: &BelfiusConfig,
        endpoints: FallbackEndpoints,
    ) -> Result<Self, ClientBuildError> {
        check_path("session_path", &endpoints.session_path)?;
        check_path("payments_path", &endpoints.payments_path)?;
        for (brand, base) in [
            (Brand::Belfius, &endpoints.belfius_base_url),
            (Brand::Banx, &endpoints.banx_base_url),
        ] {
            if base.cannot_be_a_base() || base.query().is_some() {
                return Err(ClientBuildError::Fallback(format!(
                    "the {} base URL cannot take a path",
                    brand.as_str()
                )));
            }
        }
        let qseal = bank.qseal.as_ref().ok_or_else(|| {
            ClientBuildError::Qseal(
                "the fallback interface signs with the QSeal key: none configured".into(),
            )
        })?;
        let signer = HttpSigner::from_pem(&qseal.private_key_pem, endpoints.key_id.clone())
            .map_err(|e| ClientBuildError::Qseal(e.to_string()))?;
        Ok(Self {
            http: client::http_client(bank)?,
            client_id: bank.client_id.clone(),
            amount_format: bank.amount_format,
            endpoints: Arc::new(endpoints),
            signer: Arc::new(signer),
            sessions: Arc::new(Mutex::new(Sessions::default())),
            sessions_opened: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn endpoints(&self) -> &FallbackEndpoints {
        &self.endpoints
    }

    /// How many sessions this client (and its clones) opened.
    pub fn sessions_opened(&self) -> u64 {
        self.sessions_opened.load(Ordering::Relaxed)
    }

    /// One HTTP exchange with the headers of every fallback request [P §8]; `signed`: the first
    /// call's signature; `session`: later calls' token.
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &self,
        what: FallbackCall,
        method: Method,
        url: &url::Url,
        body: &[u8],
        signed: bool,
        session: Option<&SecretString>,
        extra: &[(&'static str, &str)],
    ) -> Result<Answer, BankError> {
        let request_id = uuid::Uuid::new_v4().to_string();
        let date = chrono::Utc::now().format(DATE_FORMAT).to_string();
        let digest = httpsig::digest_header(body, self.endpoints.digest_label);
        let mut sent: Vec<(&str, &str)> = vec![
            (headers::REQUEST_ID, request_id.as_str()),
            (headers::CLIENT_ID, self.client_id.as_str()),
            (headers::DATE, date.as_str()),
            (headers::DIGEST, digest.as_str()),
        ];
        let has_body = method == Method::POST;
        if has_body {
            sent.push((header::CONTENT_TYPE.as_str(), "application/json"));
        }
        sent.extend(extra.iter().copied());

        let signature = if signed {
            let target = match url.query() {
                Some(query) => format!("{}?{query}", url.path()),
                None => url.path().to_owned(),
            };
            // The signed values are the ones sent: looked up in the same list.
            let header = self
                .signer
                .sign(
                    method.as_str(),
                    &target,
                    &self.endpoints.signed_headers,
                    |name| {
                        sent.iter()
                            .find(|(sent_name, _)| sent_name.eq_ignore_ascii_case(name))
                            .map(|(_, value)| (*value).to_owned())
                    },
                )
                .map_err(|e| BankError::NotSent(format!("cannot sign the request: {e}")))?;
            Some(header.to_header_value())
        } else {
            None
        };

        let mut request = self.http.request(method, url.clone());
        for (name, value) in &sent {
            request = request.header(*name, *value);
        }
        if let Some(signature) = signature {
            request = request.header(headers::SIGNATURE, signature);
        }
        if let Some(token) = session {
            request = request.bearer_auth(token.expose_secret());
        }
        if has_body {
            request = request.body(body.to_vec());
        }
        let response = request.send().await.map_err(|e| {
            count(what, client::transport_class(&e));
            let error = client::map_transport_error(&e);
            tracing::warn!(request_id, %error, "fallback call failed");
            error
        })?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(|e| {
            count(what, client::transport_class(&e));
            BankError::NoResponse(format!(
                "reading response body: {}",
                client::error_chain(&e)
            ))
        })?;
        count(what, StatusClass::of_status(status.as_u16()));
        tracing::debug!(
            request_id,
            status = status.as_u16(),
            "fallback call answered"
        );
        Ok(Answer {
            status,
            headers,
            body: body.to_vec(),
        })
    }

    /// The signed first call: opens a session on `brand`'s host and keeps it for later calls.
    pub async fn open_session(&self, brand: Brand) -> Result<SecretString, BankError> {
        let body = serde_json::to_vec(&json!({
            "data": {
                "type": self.endpoints.session_type,
                "attributes": {"appReference": self.endpoints.app_reference},
            }
        }))
        .map_err(|e| BankError::NotSent(format!("cannot encode the session request: {e}")))?;
        let url = self
            .endpoints
            .url(brand, &self.endpoints.session_path, &[])?;
        let answer = self
            .call(
                FallbackCall::Session,
                Method::POST,
                &url,
                &body,
                true,
                None,
                &[],
            )
            .await?;
        client::map_status(answer.status, &answer.headers, &answer.body)?;
        // Position only: serde's messages may quote the token.
        let parsed: SessionAnswer = serde_json::from_slice(&answer.body).map_err(|e| {
            BankError::Protocol(format!(
                "session answer is not the expected JSON ({:?} error at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
        let token = parsed.data.attributes.token;
        if token.expose_secret().is_empty() {
            return Err(BankError::Protocol(
                "session answer carries an empty token".into(),
            ));
        }
        *self
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .slot(brand) = Some(token.clone());
        self.sessions_opened.fetch_add(1, Ordering::Relaxed);
        tracing::info!(brand = brand.as_str(), "fallback session opened");
        Ok(token)
    }

    fn current_session(&self, brand: Brand) -> Option<SecretString> {
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .slot(brand)
            .clone()
    }

    /// Forgets `token` unless another task has already replaced it.
    fn forget_session(&self, brand: Brand, token: &SecretString) {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = sessions.slot(brand);
        if slot
            .as_ref()
            .is_some_and(|current| current.expose_secret() == token.expose_secret())
        {
            *slot = None;
        }
    }

    /// A later (unsigned) call under the brand's session, opening one first if needed. A 401
    /// means the session expired [I]: the session is opened again once and the call retried
    /// once. A 401 is a refusal before processing, so the retry cannot act twice.
    async fn in_session(
        &self,
        what: FallbackCall,
        brand: Brand,
        method: Method,
        url: &url::Url,
        body: &[u8],
        extra: &[(&'static str, &str)],
    ) -> Result<Answer, BankError> {
        let (token, fresh) = match self.current_session(brand) {
            Some(token) => (token, false),
            None => (self.session_for_call(brand).await?, true),
        };
        let answer = self
            .call(what, method.clone(), url, body, false, Some(&token), extra)
            .await?;
        if answer.status != StatusCode::UNAUTHORIZED || fresh {
            return Ok(answer);
        }
        tracing::info!(
            brand = brand.as_str(),
            "fallback session refused (401): opening a new one"
        );
        self.forget_session(brand, &token);
        let token = self.session_for_call(brand).await?;
        self.call(what, method, url, body, false, Some(&token), extra)
            .await
    }

    /// A session for a call that has not been sent yet. When opening it got no usable answer,
    /// the call itself still never left: `NotSent`, so that an initiation waiting for its
    /// session is not taken for one whose outcome is unknown (a person would have to resolve
    /// a payment the bank never saw). Refusals and 429s are kept: they mean the same for the
    /// call as for the session (our credentials, the bank's rate limit).
    async fn session_for_call(&self, brand: Brand) -> Result<SecretString, BankError> {
        self.open_session(brand).await.map_err(|error| match error {
            BankError::NoResponse(_) | BankError::Unavailable { .. } | BankError::Protocol(_) => {
                BankError::NotSent(format!("no fallback session: {error}"))
            }
            kept @ (BankError::NotSent(_)
            | BankError::RateLimited { .. }
            | BankError::Refused { .. }
            | BankError::Unrecognized(_)) => kept,
        })
    }

    /// `POST {payments_path}/{product}` with the dedicated API's v3 body [I] and the order's
    /// `Redirect-URI`; the answer is read like the dedicated API's (`belfius::answer`).
    pub async fn initiate(&self, order: &PaymentOrder) -> Result<Initiated, BankError> {
        let body = client::encode(&InitiationBody::from_order(order), self.amount_format)?;
        let url = self.endpoints.url(
            order.brand,
            &self.endpoints.payments_path,
            &[order.product.path_segment()],
        )?;
        let answer = self
            .in_session(
                FallbackCall::Initiate,
                order.brand,
                Method::POST,
                &url,
                &body,
                &[(h::REDIRECT_URI, order.redirect_uri.as_str())],
            )
            .await?;
        if !(answer.status.is_success() || answer.status.is_redirection()) {
            client::map_status(answer.status, &answer.headers, &answer.body)?;
        }
        let location = answer
            .headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok());
        let (initiated, _) = answer::read(
            &RawAnswer {
                status: answer.status.as_u16(),
                location,
                body: &answer.body,
            },
            &url,
        )?;
        tracing::info!(
            payment_id = initiated.bank_payment_id.as_str(),
            "payment initiated through the fallback interface"
        );
        Ok(initiated)
    }

    /// `GET {payments_path}/{product}/{id}/status` → the ISO 20022 code as sent [I shape].
    pub async fn status(
        &self,
        brand: Brand,
        product: PaymentProduct,
        id: &BankPaymentId,
    ) -> Result<String, BankError> {
        let url = self.endpoints.url(
            brand,
            &self.endpoints.payments_path,
            &[product.path_segment(), id.as_str(), "status"],
        )?;
        let answer = self
            .in_session(FallbackCall::Status, brand, Method::GET, &url, b"", &[])
            .await?;
        client::map_status(answer.status, &answer.headers, &answer.body)?;
        let parsed: StatusAnswer = serde_json::from_slice(&answer.body).map_err(|e| {
            BankError::Protocol(format!("status answer is not the expected JSON: {e}"))
        })?;
        parsed
            .transaction_status
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| {
                BankError::Protocol("status answer carries no transaction_status".into())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(session: &str, payments: &str) -> FallbackEndpoints {
        FallbackEndpoints::new(
            url::Url::parse("https://bank.example:8443/base/").unwrap(),
            url::Url::parse("https://banx.example:8443").unwrap(),
            session,
            payments,
            "SN=1",
        )
    }

    #[test]
    fn paths_must_be_absolute_without_query() {
        for (what, path) in [
            ("session_path", "fallback"),
            ("payments_path", "/p?x=1"),
            ("x", "/"),
        ] {
            assert!(check_path(what, path).is_err(), "{path}");
        }
        check_path("session_path", "/fallback/session").unwrap();
    }

    #[test]
    fn defaults_follow_the_portal_example() {
        let e = endpoints("/s", "/p");
        assert_eq!(e.session_type, "sample-token");
        assert_eq!(e.app_reference, "12345");
        assert_eq!(e.digest_label, DigestLabel::Rfc5843);
        assert_eq!(e.signed_headers, ["(request-target)", "date", "digest"]);
    }

    #[test]
    fn urls_keep_the_base_path_and_encode_segments() {
        let e = endpoints("/fallback/session", "/fallback/payments");
        assert_eq!(
            e.url(Brand::Belfius, &e.session_path, &[])
                .unwrap()
                .as_str(),
            "https://bank.example:8443/base/fallback/session"
        );
        assert_eq!(
            e.url(
                Brand::Banx,
                &e.payments_path,
                &["sepa-credit-transfers", "id 1/2", "status"]
            )
            .unwrap()
            .as_str(),
            "https://banx.example:8443/fallback/payments/sepa-credit-transfers/id%201%2F2/status"
        );
    }

    #[test]
    fn dates_are_iso_8601_utc() {
        let at = chrono::DateTime::parse_from_rfc3339("2018-08-04T12:23:34.567+00:00")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(at.format(DATE_FORMAT).to_string(), "2018-08-04T12:23:34Z");
    }
}
