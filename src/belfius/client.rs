//! HTTP client for the Belfius / Banx PSD2 PIS API.
//!
//! Every call goes through [`BelfiusClient::send`], which maps transport and HTTP failures to
//! [`BankError`] in one place: that mapping decides retry vs outcome-unknown for the worker.
//! Source tags ([P]/[C]/[T]/[I]) and the section numbers after them ([P §2.2]) refer to
//! docs/belfius-facts.md (what is known of the Belfius API, and from where); docs/belfius.md
//! lists every assumption and the setting that changes it.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, RequestBuilder, StatusCode};
use secrecy::{ExposeSecret as _, SecretSlice, SecretString};
use serde::{Deserialize, Deserializer, Serialize};

use super::guard::{Call, Guard, GuardConfig, StatusClass};
use super::pkce::METHOD_S256;
use super::qseal::QsealSigner;
use super::{AmountFormat, BankError, BelfiusConfig, ErrorBody, Initiated, TokenPair};
use crate::domain::model::{
    BankPaymentId, Brand, BulkOrder, Language, PaymentKind, PaymentOrder, PaymentProduct,
    StandingOrder,
};
use crate::metrics::metrics;

pub mod portal;

/// Header names of the Belfius API [P §2.2]. HTTP header names are case-insensitive.
pub mod headers {
    pub const REQUEST_ID: &str = "request-id";
    pub const RESPONSE_ID: &str = "response-id";
    pub const CLIENT_ID: &str = "client-id";
    pub const REDIRECT_URI: &str = "redirect-uri";
    pub const CODE_CHALLENGE: &str = "code-challenge";
    pub const CODE_CHALLENGE_METHOD: &str = "code-challenge-method";
    /// QSeal JWS over the body [C Tink, §1.3(a)].
    pub const SIGNATURE: &str = "signature";
}

/// What the bank answered to a successful cancellation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancelled {
    /// `None` when the bank answered 204 without a body.
    pub transaction_status: Option<String>,
}

/// `Accept: application/vnd.belfius.api+json; version=N` [P §2.2].
pub fn accept_header(version: &str) -> String {
    format!("application/vnd.belfius.api+json; version={version}")
}

#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    #[error("extra CA certificate PEM is invalid or empty: {0}")]
    InvalidCa(String),
    #[error("QWAC identity (certificate chain + private key PEM) is invalid")]
    InvalidQwac,
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
    #[error("QSeal signing configuration is invalid: {0}")]
    Qseal(String),
    #[error("fallback interface configuration is invalid: {0}")]
    Fallback(String),
}

/// Cheap to clone: one connection pool, one configuration and one [`Guard`] (retries, limits,
/// circuit breakers) shared by all clones.
#[derive(Clone)]
pub struct BelfiusClient {
    http: reqwest::Client,
    config: Arc<BelfiusConfig>,
    /// Built once from `config.qseal`: parsing the key per request would be wasted work.
    signer: Option<Arc<QsealSigner>>,
    guard: Arc<Guard>,
    /// The `/token` Accept version that last worked (see [`TOKEN_VERSIONS`]).
    token_version: Arc<std::sync::RwLock<String>>,
}

/// The `/token` versions seen in public clients and on the portal, newest first [C Tink, Yolt;
/// P]. Which one a bank takes for PIS is undocumented: the configured one is tried first, and
/// if the bank refuses the version (406, or 400 naming the Accept header) the others in turn.
/// A refused version redeems nothing, so trying the next one cannot use a code twice.
pub const TOKEN_VERSIONS: &[&str] = &["3", "2", "1.1", "1"];

/// Whether a refusal is about the Accept version rather than the request [I].
fn version_refused(status: u16, body: &ErrorBody) -> bool {
    status == 406 || (status == 400 && body.error_description.contains("Accept"))
}

impl std::fmt::Debug for BelfiusClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // BelfiusConfig's own Debug hides the secret (SecretString) and the QWAC key.
        f.debug_struct("BelfiusClient")
            .field("config", &self.config)
            .field("guard", &self.guard)
            .finish_non_exhaustive()
    }
}

/// The HTTP client of every bank call: rustls, the extra CA roots, the QWAC as client
/// certificate (mutual TLS), the timeouts, redirects off. Shared by [`BelfiusClient`] and the
/// fallback client (`belfius::fallback`), which must present the same QWAC.
pub(crate) fn http_client(config: &BelfiusConfig) -> Result<reqwest::Client, ClientBuildError> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(config.connect_timeout)
        .timeout(config.request_timeout)
        // The SCA URL may come back in a Location header [C Tink]: following it would send
        // the TPP's credentials to the PSU-facing page and lose the URL.
        .redirect(reqwest::redirect::Policy::none());

    if let Some(pem) = &config.extra_ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| ClientBuildError::InvalidCa(e.to_string()))?;
        if certs.is_empty() {
            return Err(ClientBuildError::InvalidCa("no certificate found".into()));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }

    if let Some(qwac) = &config.qwac {
        // reqwest wants chain and key in one PEM buffer; keep the copy in a zeroizing box.
        let mut pem = qwac.cert_chain_pem.clone();
        if !pem.ends_with(b"\n") {
            pem.push(b'\n');
        }
        pem.extend_from_slice(qwac.private_key_pem.expose_secret().as_bytes());
        let pem: SecretSlice<u8> = pem.into();
        let identity = reqwest::Identity::from_pem(pem.expose_secret())
            .map_err(|_| ClientBuildError::InvalidQwac)?;
        builder = builder.identity(identity);
    }

    builder
        .build()
        .map_err(|e| ClientBuildError::Http(error_chain(&e)))
}

impl BelfiusClient {
    /// A client with the default [`GuardConfig`] (the worker's defaults).
    pub fn new(config: BelfiusConfig) -> Result<Self, ClientBuildError> {
        Self::with_guard(config, GuardConfig::default())
    }

    /// A client whose calls run under `guard` (retries, per-host limits, circuit breakers).
    pub fn with_guard(config: BelfiusConfig, guard: GuardConfig) -> Result<Self, ClientBuildError> {
        let http = http_client(&config)?;
        let signer = match &config.qseal {
            Some(qseal) => Some(Arc::new(
                QsealSigner::new(qseal).map_err(|e| ClientBuildError::Qseal(e.to_string()))?,
            )),
            None => None,
        };
        let config_token_version = config.versions.token.clone();
        Ok(Self {
            http,
            config: Arc::new(config),
            signer,
            guard: Arc::new(Guard::new(guard)),
            token_version: Arc::new(std::sync::RwLock::new(config_token_version)),
        })
    }

    pub fn config(&self) -> &BelfiusConfig {
        &self.config
    }

    /// The retry policy, limits and circuit breakers this client's calls run under.
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// Belfius and Banx customers must be addressed on their own brand's host [P §1.1].
    pub fn base_url(&self, brand: Brand) -> &url::Url {
        match brand {
            Brand::Belfius => &self.config.belfius_base_url,
            Brand::Banx => &self.config.banx_base_url,
        }
    }

    /// `base` + path segments, each percent-encoded; keeps a base path such as `/sandbox/psd2`.
    fn endpoint(&self, brand: Brand, segments: &[&str]) -> Result<url::Url, BankError> {
        let mut url = self.base_url(brand).clone();
        {
            let mut path = url.path_segments_mut().map_err(|()| {
                BankError::NotSent(format!("base URL for {} cannot be a base", brand.as_str()))
            })?;
            path.pop_if_empty();
            path.extend(segments);
        }
        Ok(url)
    }

    /// Headers every call carries [P §2.2]. `Request-ID` is added by [`Self::send`] per HTTP
    /// attempt: a fresh UUID v4 each time, NOT an idempotency key (§9).
    fn request(
        &self,
        method: Method,
        url: url::Url,
        version: &str,
        language: Language,
    ) -> RequestBuilder {
        self.http
            .request(method, url)
            .header(header::ACCEPT, accept_header(version))
            .header(header::ACCEPT_LANGUAGE, language.as_str())
    }

    /// `POST {base}/payments/{product}` with the v3 body and its per-product rules [P §2.5].
    ///
    /// Without an access token the PKCE headers are sent (mandatory then [P]); with one, the
    /// `Authorization: Bearer` header replaces them.
    pub async fn initiate_payment(
        &self,
        order: &PaymentOrder,
        code_challenge: &str,
        access_token: Option<&SecretString>,
    ) -> Result<Initiated, BankError> {
        self.initiate_single(order, code_challenge, access_token)
            .await
            .map(|(initiated, _)| initiated)
    }

    /// [`Self::initiate_payment`] with PKCE, also telling which answer shape came back
    /// (`pis-worker bank-check`).
    pub async fn initiate_payment_shaped(
        &self,
        order: &PaymentOrder,
        code_challenge: &str,
    ) -> Result<(Initiated, super::answer::AnswerShape), BankError> {
        self.initiate_single(order, code_challenge, None).await
    }

    async fn initiate_single(
        &self,
        order: &PaymentOrder,
        code_challenge: &str,
        access_token: Option<&SecretString>,
    ) -> Result<(Initiated, super::answer::AnswerShape), BankError> {
        let body = encode(
            &InitiationBody::from_order(order),
            self.config.amount_format,
        )?;
        self.initiate(
            Initiation {
                kind: PaymentKind::Single,
                brand: order.brand,
                product: order.product,
                language: order.language,
                redirect_uri: &order.redirect_uri,
                version: &self.config.versions.payment_initiation,
                body,
            },
            code_challenge,
            access_token,
        )
        .await
    }

    /// Whether the bank's `/token` takes this Accept `version`: a code exchange with a code
    /// that does not exist (nothing can be redeemed) is refused either for the version
    /// (`Ok(false)`) or for the code (`Ok(true)`). Transport and 5xx failures are errors.
    pub async fn token_version_accepted(
        &self,
        brand: Brand,
        version: &str,
        redirect_uri: &str,
    ) -> Result<bool, BankError> {
        let form = serde_urlencoded::to_string([
            ("grant_type", "authorization_code"),
            ("code", "pis-worker-bank-check-no-such-code"),
            ("redirect_uri", redirect_uri),
            (
                "code_verifier",
                "pis-worker-bank-check-verifier-0000000000000000000",
            ),
        ])
        .map_err(|_| BankError::NotSent("cannot encode token request".into()))?;
        let url = self.endpoint(brand, &["token"])?;
        let req = self
            .request(Method::POST, url, version, Language::Fr)
            .basic_auth(
                &self.config.client_id,
                Some(self.config.client_secret.expose_secret()),
            )
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form);
        match self.send(Call::TokenExchange, brand, req).await {
            Err(BankError::Refused { status, body }) => Ok(!version_refused(status, &body)),
            Ok(_) => Err(BankError::Protocol(
                "/token accepted a code that does not exist".into(),
            )),
            Err(other) => Err(other),
        }
    }

    /// `POST {base}/periodic-payments/{product}` (standing order) [P v2 §2.3; I path and body:
    /// the single-payment body plus `start_date`, `end_date`, `frequency`, `day_of_execution`].
    pub async fn initiate_periodic(
        &self,
        order: &StandingOrder,
        code_challenge: &str,
        access_token: Option<&SecretString>,
    ) -> Result<Initiated, BankError> {
        let body = encode(&PeriodicBody::from_order(order), self.config.amount_format)?;
        self.initiate(
            Initiation {
                kind: PaymentKind::Periodic,
                brand: order.order.brand,
                product: order.order.product,
                language: order.order.language,
                redirect_uri: &order.order.redirect_uri,
                version: &self.config.versions.periodic_initiation,
                body,
            },
            code_challenge,
            access_token,
        )
        .await
        .map(|(initiated, _)| initiated)
    }

    /// `POST {base}/bulk-payments/{product}` [P bulk exists, Belfius brand only; I path and
    /// body]. The caller keeps bulks on the Belfius brand; a Banx bulk is refused by the bank.
    pub async fn initiate_bulk(
        &self,
        order: &BulkOrder,
        code_challenge: &str,
        access_token: Option<&SecretString>,
    ) -> Result<Initiated, BankError> {
        let body = encode(&BulkBody::from_order(order), self.config.amount_format)?;
        self.initiate(
            Initiation {
                kind: PaymentKind::Bulk,
                brand: order.brand,
                product: order.product,
                language: order.language,
                redirect_uri: &order.redirect_uri,
                version: &self.config.versions.bulk_initiation,
                body,
            },
            code_challenge,
            access_token,
        )
        .await
        .map(|(initiated, _)| initiated)
    }

    /// The part all three initiations share: headers, signature, answer parsing.
    async fn initiate(
        &self,
        initiation: Initiation<'_>,
        code_challenge: &str,
        access_token: Option<&SecretString>,
    ) -> Result<(Initiated, super::answer::AnswerShape), BankError> {
        let url = self.endpoint(
            initiation.brand,
            &[
                initiation.kind.path_prefix(),
                initiation.product.path_segment(),
            ],
        )?;
        let signature = if self
            .config
            .qseal
            .as_ref()
            .is_some_and(|q| q.sign.initiation)
        {
            Some(self.sign(&initiation.body)?)
        } else {
            None
        };
        let mut req = self.request(
            Method::POST,
            url.clone(),
            initiation.version,
            initiation.language,
        );
        req = req
            .header(headers::CLIENT_ID, &self.config.client_id)
            .header(headers::REDIRECT_URI, initiation.redirect_uri)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(signature) = signature {
            req = req.header(headers::SIGNATURE, signature);
        }
        req = req.body(initiation.body);
        req = match access_token {
            Some(token) => req.bearer_auth(token.expose_secret()),
            None => req
                .header(headers::CODE_CHALLENGE, code_challenge)
                .header(headers::CODE_CHALLENGE_METHOD, METHOD_S256),
        };

        let call = match initiation.kind {
            PaymentKind::Single => Call::Initiate,
            PaymentKind::Periodic => Call::InitiatePeriodic,
            PaymentKind::Bulk => Call::InitiateBulk,
        };
        let response = self.send(call, initiation.brand, req).await?;
        let (initiated, shape) = super::answer::read(
            &super::answer::RawAnswer {
                status: response.status,
                location: response.location.as_deref(),
                body: &response.body,
            },
            &url,
        )
        .inspect_err(|e| {
            tracing::error!(
                request_id = response.request_id,
                error = %e,
                "the bank's answer to an initiation matches no known dialect (docs/belfius.md)"
            );
            metrics()
                .bank_answers_unrecognized
                .with_label_values(&[call.endpoint()])
                .inc();
        })?;
        tracing::debug!(
            request_id = response.request_id,
            payment_id = initiated.bank_payment_id.as_str(),
            kind = initiation.kind.path_prefix(),
            shape = shape.as_str(),
            "payment initiated"
        );
        Ok((initiated, shape))
    }

    /// The `Signature` header value for these exact body bytes.
    fn sign(&self, body: &[u8]) -> Result<String, BankError> {
        let signer = self.signer.as_ref().ok_or_else(|| {
            BankError::NotSent("QSeal signing configured but no signer was built".into())
        })?;
        signer
            .sign(body)
            .map_err(|e| BankError::NotSent(format!("cannot sign the request: {e}")))
    }

    /// `{base}/{kind prefix}/{product}/{id}` plus optional trailing segments.
    fn resource(
        &self,
        kind: PaymentKind,
        brand: Brand,
        product: PaymentProduct,
        id: &BankPaymentId,
        tail: Option<&str>,
    ) -> Result<url::Url, BankError> {
        let mut segments = vec![kind.path_prefix(), product.path_segment(), id.as_str()];
        segments.extend(tail);
        self.endpoint(brand, &segments)
    }

    /// `GET {base}/{kind}/{product}/{id}/status` [P: no token needed; I: exact path].
    /// Returns the ISO 20022 code as sent; [`super::status::TransactionStatus`] interprets it.
    pub async fn payment_status(
        &self,
        kind: PaymentKind,
        brand: Brand,
        product: PaymentProduct,
        id: &BankPaymentId,
    ) -> Result<String, BankError> {
        let url = self.resource(kind, brand, product, id, Some("status"))?;
        let req = self.request(
            Method::GET,
            url,
            &self.config.versions.payment_status,
            // [I] the status call shows no PSU screen; any supported language will do.
            Language::Fr,
        );
        let req = req.header(headers::CLIENT_ID, &self.config.client_id);
        let response = self.send(Call::Status, brand, req).await?;
        let parsed: StatusResponse = response.json()?;
        parsed
            .transaction_status
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| {
                BankError::Protocol("status response carries no transaction_status".into())
            })
    }

    /// `GET {base}/{kind}/{product}/{id}` with the PSU's PIS token [P: token required; I: path
    /// and body]. The body is returned as JSON: its fields are not documented (open question,
    /// docs/belfius-facts.md §10.5).
    pub async fn payment_details(
        &self,
        kind: PaymentKind,
        brand: Brand,
        product: PaymentProduct,
        id: &BankPaymentId,
        access_token: &SecretString,
    ) -> Result<serde_json::Value, BankError> {
        let url = self.resource(kind, brand, product, id, None)?;
        let req = self.request(
            Method::GET,
            url,
            // [P] the details reference shows the same version example as status.
            &self.config.versions.payment_details,
            Language::Fr,
        );
        let req = req
            .header(headers::CLIENT_ID, &self.config.client_id)
            .bearer_auth(access_token.expose_secret());
        let response = self.send(Call::Details, brand, req).await?;
        response.json()
    }

    /// `DELETE {base}/{kind}/{product}/{id}` with the PSU's PIS token [P: cancellation needs a
    /// token; I: method, path, answer]. Accepts 204 (no body) and 200/202 with
    /// `{"transaction_status": …}`.
    pub async fn cancel_payment(
        &self,
        kind: PaymentKind,
        brand: Brand,
        product: PaymentProduct,
        id: &BankPaymentId,
        access_token: &SecretString,
    ) -> Result<Cancelled, BankError> {
        let url = self.resource(kind, brand, product, id, None)?;
        let signature = if self
            .config
            .qseal
            .as_ref()
            .is_some_and(|q| q.sign.cancellation)
        {
            // [I] a DELETE has no body: the JWS covers the empty body.
            Some(self.sign(b"")?)
        } else {
            None
        };
        let mut req = self.request(
            Method::DELETE,
            url,
            &self.config.versions.payment_cancellation,
            Language::Fr,
        );
        req = req
            .header(headers::CLIENT_ID, &self.config.client_id)
            .bearer_auth(access_token.expose_secret());
        if let Some(signature) = signature {
            req = req.header(headers::SIGNATURE, signature);
        }
        let response = self.send(Call::Cancel, brand, req).await?;
        let parsed: StatusResponse = response.json_or_empty()?;
        Ok(Cancelled {
            transaction_status: parsed.transaction_status.filter(|s| !s.trim().is_empty()),
        })
    }

    /// `POST {base}/token`, grant `authorization_code` with the PKCE verifier [C Tink/Yolt].
    pub async fn exchange_code(
        &self,
        brand: Brand,
        code: &SecretString,
        code_verifier: &SecretString,
        redirect_uri: &str,
    ) -> Result<TokenPair, BankError> {
        let form = serde_urlencoded::to_string([
            ("grant_type", "authorization_code"),
            ("code", code.expose_secret()),
            ("redirect_uri", redirect_uri),
            ("code_verifier", code_verifier.expose_secret()),
        ])
        .map_err(|_| BankError::NotSent("cannot encode token request".into()))?;
        let result = self
            .token_call(brand, Call::TokenExchange, form.into())
            .await;
        metrics()
            .token_exchanges
            .with_label_values(&[if result.is_ok() { "ok" } else { "failed" }])
            .inc();
        result
    }

    /// `POST {base}/token`, grant `refresh_token` [C]. Belfius keeps ONE pair per scope: the
    /// previous access and refresh tokens stop working once this succeeds [P §3.2].
    pub async fn refresh_token(
        &self,
        brand: Brand,
        refresh_token: &SecretString,
    ) -> Result<TokenPair, BankError> {
        let form = serde_urlencoded::to_string([
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose_secret()),
        ])
        .map_err(|_| BankError::NotSent("cannot encode token request".into()))?;
        let result = self
            .token_call(brand, Call::TokenRefresh, form.into())
            .await;
        metrics()
            .token_refreshes
            .with_label_values(&[if result.is_ok() { "ok" } else { "failed" }])
            .inc();
        result
    }

    async fn token_call(
        &self,
        brand: Brand,
        call: Call,
        form: SecretString,
    ) -> Result<TokenPair, BankError> {
        let url = self.endpoint(brand, &["token"])?;
        let first = self
            .token_version
            .read()
            .map(|v| v.clone())
            .unwrap_or_else(|e| e.into_inner().clone());
        let mut versions = vec![first.clone()];
        versions.extend(
            TOKEN_VERSIONS
                .iter()
                .map(|v| (*v).to_owned())
                .filter(|v| *v != first),
        );
        let mut answer = None;
        for version in &versions {
            let req = self.request(Method::POST, url.clone(), version, Language::Fr);
            let req = req
                .basic_auth(
                    &self.config.client_id,
                    Some(self.config.client_secret.expose_secret()),
                )
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(form.expose_secret().to_owned());
            match self.send(call, brand, req).await {
                Err(BankError::Refused { status, body }) if version_refused(status, &body) => {
                    tracing::warn!(version, status, "the bank refused this /token version");
                }
                Ok(response) => {
                    if *version != first {
                        tracing::warn!(
                            version,
                            configured = first,
                            "/token works with another version than configured: using it (set PIS_API_VERSION_TOKEN)"
                        );
                        if let Ok(mut current) = self.token_version.write() {
                            current.clone_from(version);
                        }
                    }
                    answer = Some(response);
                    break;
                }
                Err(other) => return Err(other),
            }
        }
        let response = answer.ok_or_else(|| {
            BankError::Unrecognized(format!(
                "/token refused every known Accept version ({})",
                versions.join(", ")
            ))
        })?;
        let parsed: TokenResponse = response.json_redacted()?;
        if let Some(kind) = &parsed.token_type
            && !kind.eq_ignore_ascii_case("bearer")
        {
            return Err(BankError::Protocol(format!(
                "unexpected token_type {kind:?}"
            )));
        }
        Ok(TokenPair {
            access_token: parsed.access_token,
            refresh_token: parsed.refresh_token,
            expires_in: parsed.expires_in.map(Duration::from_secs),
            scope: parsed.scope,
        })
    }

    /// Sends a request under the guard of `brand`'s host (retries as `call`'s policy allows,
    /// concurrency and rate limits, circuit breaker) and maps every failure to [`BankError`];
    /// returns 2xx responses only. The single place where requests leave the worker.
    async fn send(
        &self,
        call: Call,
        brand: Brand,
        req: RequestBuilder,
    ) -> Result<Success, BankError> {
        let template = req.build().map_err(|e| {
            BankError::NotSent(format!("cannot build the request: {}", error_chain(&e)))
        })?;
        let template = &template;
        self.guard
            .run(call, brand, move || self.attempt(call, template))
            .await
    }

    /// One HTTP exchange: a copy of `template` with a fresh `Request-ID`, sent and read.
    async fn attempt(
        &self,
        call: Call,
        template: &reqwest::Request,
    ) -> (Result<Success, BankError>, StatusClass) {
        let operation = call.endpoint();
        let request_id = uuid::Uuid::new_v4().to_string();
        let Some(mut request) = template.try_clone() else {
            // Only streaming bodies cannot be copied; this client sends none.
            return (
                Err(BankError::NotSent("request body cannot be replayed".into())),
                StatusClass::Transport,
            );
        };
        match HeaderValue::from_str(&request_id) {
            Ok(value) => {
                request.headers_mut().insert(headers::REQUEST_ID, value);
            }
            Err(_) => {
                return (
                    Err(BankError::NotSent(
                        "Request-ID is not a header value".into(),
                    )),
                    StatusClass::Transport,
                );
            }
        }
        let response = match self.http.execute(request).await {
            Ok(response) => response,
            Err(e) => {
                let error = map_transport_error(&e);
                tracing::warn!(request_id, operation, %error, "bank call failed");
                return (Err(error), transport_class(&e));
            }
        };
        let status = response.status();
        let response_headers = response.headers().clone();
        // Once a status line is in, the bank has acted (or refused): a failed body read leaves
        // the outcome unknown.
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(e) => {
                let error =
                    BankError::NoResponse(format!("reading response body: {}", error_chain(&e)));
                tracing::warn!(request_id, operation, %error, "bank call failed");
                return (Err(error), transport_class(&e));
            }
        };
        tracing::debug!(
            request_id,
            operation,
            status = status.as_u16(),
            response_id = response_headers
                .get(headers::RESPONSE_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
            "bank answered"
        );
        let location = response_headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok());
        // An initiation may be answered by a redirect or a 401 SCA_REQUIRED that carries the
        // SCA link (docs/belfius.md, "Initiation answer"): those are answers, not failures.
        let initiation_answer = call.is_initiation()
            && super::answer::RawAnswer {
                status: status.as_u16(),
                location,
                body: &body,
            }
            .is_initiation_answer();
        let (class, mapped) = if initiation_answer {
            (StatusClass::Success, Ok(()))
        } else {
            (
                StatusClass::of_status(status.as_u16()),
                map_status(status, &response_headers, &body),
            )
        };
        match mapped {
            Ok(()) => (
                Ok(Success {
                    request_id,
                    status: status.as_u16(),
                    location: response_headers
                        .get(header::LOCATION)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned),
                    body: body.to_vec(),
                }),
                class,
            ),
            Err(error) => {
                tracing::info!(request_id, operation, %error, "bank did not accept the call");
                (Err(error), class)
            }
        }
    }
}

/// The metrics class of a failure without an HTTP status.
pub(crate) fn transport_class(e: &reqwest::Error) -> StatusClass {
    if e.is_timeout() {
        StatusClass::Timeout
    } else {
        StatusClass::Transport
    }
}

struct Success {
    /// The `Request-ID` of the attempt that got this answer.
    request_id: String,
    status: u16,
    location: Option<String>,
    body: Vec<u8>,
}

impl Success {
    fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, BankError> {
        // Initiation and status bodies hold no secrets: serde's message (which may quote a
        // value) is kept for diagnosis. Token bodies use `json_redacted`.
        serde_json::from_slice(&self.body).map_err(|e| {
            BankError::Protocol(format!("response body is not the expected JSON: {e}"))
        })
    }

    /// For bodies holding secrets: serde messages may quote a value, so give the position only.
    fn json_redacted<T: serde::de::DeserializeOwned>(&self) -> Result<T, BankError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            BankError::Protocol(format!(
                "response body is not the expected JSON ({:?} error at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ))
        })
    }

    /// Like [`Self::json`], but an empty body reads as `{}` (v1 answered with a Location only).
    fn json_or_empty<T: serde::de::DeserializeOwned>(&self) -> Result<T, BankError> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            serde_json::from_slice(b"{}")
                .map_err(|e| BankError::Protocol(format!("empty response body: {e}")))
        } else {
            self.json()
        }
    }
}

/// Transport failures: did the request leave this process?
pub(crate) fn map_transport_error(e: &reqwest::Error) -> BankError {
    let detail = error_chain(e);
    if e.is_builder() || e.is_connect() || handshake_refused(e) {
        // DNS, TCP connect, TLS handshake, connect timeout: the bank processed nothing.
        BankError::NotSent(detail)
    } else {
        // Timeouts, resets, broken pipes after connecting: the bank may have acted.
        BankError::NoResponse(detail)
    }
}

/// With TLS 1.3 the client finishes its half of the handshake before the server checks the
/// client certificate, so a refused QWAC surfaces as a fatal alert while the request is being
/// sent, not as a connect error. Such an alert means the server never accepted application
/// data: the request was not processed.
fn handshake_refused(e: &reqwest::Error) -> bool {
    use rustls::AlertDescription as A;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(error) = source {
        // io::Error hides its payload from source(): look inside explicitly.
        let tls = error.downcast_ref::<rustls::Error>().or_else(|| {
            error
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::AlertReceived(alert)) = tls {
            return matches!(
                alert,
                A::HandshakeFailure
                    | A::BadCertificate
                    | A::UnsupportedCertificate
                    | A::CertificateRevoked
                    | A::CertificateExpired
                    | A::CertificateUnknown
                    | A::UnknownCA
                    | A::AccessDenied
                    | A::CertificateRequired
                    | A::ProtocolVersion
                    | A::InsufficientSecurity
            );
        }
        source = error.source();
    }
    false
}

/// HTTP status to result; the single place where bank answers become [`BankError`]s.
pub(crate) fn map_status(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), BankError> {
    if status.is_success() {
        return Ok(());
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Err(BankError::RateLimited {
            retry_after: retry_after(headers),
        });
    }
    if status.is_server_error() {
        return Err(BankError::Unavailable {
            status: status.as_u16(),
            body: serde_json::from_slice::<ErrorBody>(body).ok(),
        });
    }
    if status.is_client_error() {
        let mut parsed = serde_json::from_slice::<ErrorBody>(body).unwrap_or_default();
        if parsed.error.is_empty() {
            // 406 on a bad Accept-Language has no documented body [P §2.2].
            parsed.error = status
                .canonical_reason()
                .unwrap_or("HTTP client error")
                .to_owned();
        }
        return Err(BankError::Refused {
            status: status.as_u16(),
            body: parsed,
        });
    }
    // 1xx/3xx: redirects are disabled, so a 3xx here is a contract violation.
    Err(BankError::Protocol(format!(
        "unexpected HTTP status {status}"
    )))
}

/// `Retry-After` as delta-seconds or as an HTTP-date (RFC 9110 §10.2.3; IMF-fixdate, the form
/// senders must use). A date in the past means "now".
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    retry_after_at(headers, chrono::Utc::now())
}

fn retry_after_at(headers: &HeaderMap, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = headers
        .get(header::RETRY_AFTER)
        .and_then(|v: &HeaderValue| v.to_str().ok())?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        (at.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

/// The error and its sources in one line. reqwest errors carry the URL (no secrets in our URLs)
/// but never headers or bodies.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

/// What differs between the three initiations.
struct Initiation<'a> {
    kind: PaymentKind,
    brand: Brand,
    product: PaymentProduct,
    language: Language,
    redirect_uri: &'a str,
    version: &'a str,
    /// The exact bytes sent, and signed.
    body: Vec<u8>,
}

pub(crate) fn encode<T: Serialize>(body: &T, amounts: AmountFormat) -> Result<Vec<u8>, BankError> {
    let fail =
        |e: serde_json::Error| BankError::NotSent(format!("cannot encode initiation body: {e}"));
    match amounts {
        AmountFormat::String => serde_json::to_vec(body).map_err(fail),
        AmountFormat::Number => {
            let mut value = serde_json::to_value(body).map_err(fail)?;
            amounts_as_numbers(&mut value)?;
            serde_json::to_vec(&value).map_err(fail)
        }
    }
}

/// Every `instructed_amount.amount` as a JSON number instead of a string (the dialects that
/// take numbers, docs/belfius.md). The decimal text has at most 15 significant digits
/// (validation bounds amounts), so the shortest number that reads back as the same double is
/// that same text: nothing is rounded.
fn amounts_as_numbers(value: &mut serde_json::Value) -> Result<(), BankError> {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                if key == "instructed_amount"
                    && let Some(amount) = child.get_mut("amount")
                    && let Value::String(text) = amount
                {
                    let number = text
                        .parse::<f64>()
                        .ok()
                        .and_then(serde_json::Number::from_f64)
                        .ok_or_else(|| {
                            BankError::NotSent(format!("amount {text:?} is not a number"))
                        })?;
                    *amount = Value::Number(number);
                } else {
                    amounts_as_numbers(child)?;
                }
            }
            Ok(())
        }
        Value::Array(items) => items.iter_mut().try_for_each(amounts_as_numbers),
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Wire types.

/// v3 initiation body, snake_case as on the portal [P §2.5]; fields the portal table does not
/// show (currency, remittance, execution date names) are [I], see open question
/// docs/belfius-facts.md §10.2.
///
/// Per product [P §2.5 table]: SEPA and instant SEPA carry no `charge_bearer`,
/// `creditor_address`, `bban`, `bankNationalID` or creditor `currency` (the keys are omitted,
/// not null); cross-border requires `charge_bearer` and may carry the others. Absent optional
/// values are omitted everywhere.
#[derive(Debug, Serialize)]
pub struct InitiationBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debtor_account: Option<DebtorAccount<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub charge_bearer: Option<&'static str>,
    pub creditor_account: CreditorAccount<'a>,
    pub creditor_name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creditor_address: Option<CreditorAddress<'a>>,
    pub endtoend_identification: &'a str,
    pub instructed_amount: InstructedAmount<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remittance_information: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_execution_date: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DebtorAccount<'a> {
    pub iban: &'a str,
}

#[derive(Debug, Serialize)]
pub struct CreditorAccount<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iban: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bban: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bic: Option<&'a str>,
    /// camelCase on the portal, unlike every other field (sic) [P §2.5].
    #[serde(rename = "bankNationalID", skip_serializing_if = "Option::is_none")]
    pub bank_national_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currency: Option<&'a str>,
}

/// [I] sub-field names (the portal row is "creditor_address", conditional, cross-border only).
#[derive(Debug, Serialize)]
pub struct CreditorAddress<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub street: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub building_number: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postal_code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub town: Option<&'a str>,
    pub country: &'a str,
}

#[derive(Debug, Serialize)]
pub struct InstructedAmount<'a> {
    pub amount: String,
    pub currency: &'a str,
}

impl<'a> InitiationBody<'a> {
    pub fn from_order(order: &'a PaymentOrder) -> Self {
        // Cross-border fields only on the cross-border product: SEPA products refuse them, so
        // an order that carries them anyway (validation's job) does not leak them.
        let cross_border = if order.product.is_sepa() {
            None
        } else {
            order.cross_border.as_ref()
        };
        let creditor_iban = Some(order.creditor_iban.as_str()).filter(|iban| !iban.is_empty());
        Self {
            // An empty debtor_account object is refused [P FAQ]: omit the key instead.
            debtor_account: order
                .debtor_iban
                .as_deref()
                .map(|iban| DebtorAccount { iban }),
            charge_bearer: cross_border.map(|c| c.charge_bearer.as_str()),
            creditor_account: CreditorAccount {
                iban: creditor_iban,
                bban: cross_border.and_then(|c| c.creditor_bban.as_deref()),
                bic: order.creditor_bic.as_deref(),
                bank_national_id: cross_border.and_then(|c| c.creditor_bank_national_id.as_deref()),
                currency: cross_border.and_then(|c| c.creditor_currency.as_deref()),
            },
            creditor_name: &order.creditor_name,
            creditor_address: cross_border
                .and_then(|c| c.creditor_address.as_ref())
                .map(|a| CreditorAddress {
                    street: a.street.as_deref(),
                    building_number: a.building_number.as_deref(),
                    postal_code: a.postal_code.as_deref(),
                    town: a.town.as_deref(),
                    country: &a.country,
                }),
            endtoend_identification: &order.end_to_end_id,
            instructed_amount: InstructedAmount {
                amount: order.amount.to_string(),
                currency: &order.currency,
            },
            remittance_information: order.remittance_information.as_deref(),
            requested_execution_date: order.requested_execution_date.map(iso_date),
        }
    }
}

fn iso_date(date: chrono::NaiveDate) -> String {
    date.format("%Y-%m-%d").to_string()
}

/// [I] periodic body (v2): the single-payment body plus the schedule. Frequency in the Berlin
/// Group spelling (`Monthly`, `EveryTwoWeeks`, …).
#[derive(Debug, Serialize)]
pub struct PeriodicBody<'a> {
    #[serde(flatten)]
    pub payment: InitiationBody<'a>,
    pub start_date: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_date: Option<String>,
    pub frequency: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day_of_execution: Option<u8>,
}

impl<'a> PeriodicBody<'a> {
    pub fn from_order(order: &'a StandingOrder) -> Self {
        Self {
            payment: InitiationBody::from_order(&order.order),
            start_date: iso_date(order.start_date),
            end_date: order.end_date.map(iso_date),
            frequency: order.frequency.as_str(),
            day_of_execution: order.day_of_execution,
        }
    }
}

/// [I] bulk body: one debtor, many SEPA transfers.
#[derive(Debug, Serialize)]
pub struct BulkBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debtor_account: Option<DebtorAccount<'a>>,
    pub batch_booking_preferred: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_execution_date: Option<String>,
    pub payments: Vec<BulkEntryBody<'a>>,
}

#[derive(Debug, Serialize)]
pub struct BulkEntryBody<'a> {
    pub instructed_amount: InstructedAmount<'a>,
    pub creditor_account: CreditorAccount<'a>,
    pub creditor_name: &'a str,
    pub endtoend_identification: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remittance_information: Option<&'a str>,
}

impl<'a> BulkBody<'a> {
    pub fn from_order(order: &'a BulkOrder) -> Self {
        Self {
            debtor_account: order
                .debtor_iban
                .as_deref()
                .map(|iban| DebtorAccount { iban }),
            batch_booking_preferred: order.batch_booking,
            requested_execution_date: order.requested_execution_date.map(iso_date),
            payments: order
                .payments
                .iter()
                .map(|entry| BulkEntryBody {
                    instructed_amount: InstructedAmount {
                        amount: entry.amount.to_string(),
                        currency: &entry.currency,
                    },
                    creditor_account: CreditorAccount {
                        iban: Some(entry.creditor_iban.as_str()),
                        bban: None,
                        bic: entry.creditor_bic.as_deref(),
                        bank_national_id: None,
                        currency: None,
                    },
                    creditor_name: &entry.creditor_name,
                    endtoend_identification: &entry.end_to_end_id,
                    remittance_information: entry.remittance_information.as_deref(),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct StatusResponse {
    #[serde(default, alias = "transactionStatus")]
    transaction_status: Option<String>,
}

/// No Debug: it holds tokens.
#[derive(Deserialize)]
struct TokenResponse {
    access_token: SecretString,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default, deserialize_with = "seconds_string_or_number")]
    expires_in: Option<u64>,
    #[serde(default)]
    refresh_token: Option<SecretString>,
    #[serde(default)]
    scope: Option<String>,
}

/// Belfius sent `"expires_in":"900"` (a string) in recorded traffic [C Tink]; OAuth says number.
fn seconds_string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Number(u64),
        Text(String),
    }
    match Option::<Either>::deserialize(d)? {
        None => Ok(None),
        Some(Either::Number(n)) => Ok(Some(n)),
        Some(Either::Text(t)) => t
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom("expires_in is not a number of seconds")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::model::Amount;

    fn order() -> PaymentOrder {
        PaymentOrder {
            product: PaymentProduct::SepaCreditTransfers,
            brand: Brand::Belfius,
            amount: Amount::from_minor(1234),
            currency: "EUR".into(),
            creditor_name: "ACME".into(),
            creditor_iban: "BE71096123456769".into(),
            creditor_bic: None,
            debtor_iban: None,
            end_to_end_id: "E2E-1".into(),
            remittance_information: None,
            requested_execution_date: None,
            language: Language::Nl,
            redirect_uri: "https://tpp.example/cb".into(),
            cross_border: None,
        }
    }

    #[test]
    fn minimal_body_omits_optional_keys() {
        let body = serde_json::to_value(InitiationBody::from_order(&order())).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "creditor_account": {"iban": "BE71096123456769"},
                "creditor_name": "ACME",
                "endtoend_identification": "E2E-1",
                "instructed_amount": {"amount": "12.34", "currency": "EUR"}
            })
        );
    }

    #[test]
    fn full_body_carries_every_field() {
        let mut o = order();
        o.debtor_iban = Some("BE68539007547034".into());
        o.creditor_bic = Some("GKCCBEBB".into());
        o.remittance_information = Some("invoice 7".into());
        o.requested_execution_date = chrono::NaiveDate::from_ymd_opt(2030, 1, 2);
        let body = serde_json::to_value(InitiationBody::from_order(&o)).unwrap();
        assert_eq!(
            body["debtor_account"],
            serde_json::json!({"iban": "BE68539007547034"})
        );
        assert_eq!(body["creditor_account"]["bic"], "GKCCBEBB");
        assert_eq!(body["remittance_information"], "invoice 7");
        assert_eq!(body["requested_execution_date"], "2030-01-02");
    }

    fn cross_border() -> crate::domain::model::CrossBorder {
        crate::domain::model::CrossBorder {
            charge_bearer: crate::domain::model::ChargeBearer::Shar,
            creditor_address: Some(crate::domain::model::PostalAddress {
                street: Some("Main Street".into()),
                building_number: None,
                postal_code: Some("10001".into()),
                town: Some("New York".into()),
                country: "US".into(),
            }),
            creditor_bban: Some("123456789".into()),
            creditor_bank_national_id: Some("021000021".into()),
            creditor_currency: Some("USD".into()),
        }
    }

    #[test]
    fn sepa_body_never_carries_cross_border_keys() {
        for product in [
            PaymentProduct::SepaCreditTransfers,
            PaymentProduct::InstantSepaCreditTransfers,
        ] {
            let mut o = order();
            o.product = product;
            o.creditor_bic = Some("GKCCBEBB".into());
            // Even if an order slipped through with cross-border data.
            o.cross_border = Some(Box::new(cross_border()));
            let body = serde_json::to_value(InitiationBody::from_order(&o)).unwrap();
            assert_eq!(
                body["creditor_account"],
                serde_json::json!({"iban": "BE71096123456769", "bic": "GKCCBEBB"})
            );
            for key in ["charge_bearer", "creditor_address", "debtor_account"] {
                assert!(body.get(key).is_none(), "{product:?} {key}");
            }
        }
    }

    #[test]
    fn cross_border_body_to_a_bban() {
        let mut o = order();
        o.product = PaymentProduct::CrossBorderCreditTransfers;
        o.currency = "USD".into();
        o.creditor_iban = String::new();
        o.cross_border = Some(Box::new(cross_border()));
        let body = serde_json::to_value(InitiationBody::from_order(&o)).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "charge_bearer": "SHAR",
                "creditor_account": {
                    "bban": "123456789",
                    "bankNationalID": "021000021",
                    "currency": "USD"
                },
                "creditor_name": "ACME",
                "creditor_address": {
                    "street": "Main Street",
                    "postal_code": "10001",
                    "town": "New York",
                    "country": "US"
                },
                "endtoend_identification": "E2E-1",
                "instructed_amount": {"amount": "12.34", "currency": "USD"}
            })
        );
    }

    #[test]
    fn cross_border_body_to_an_iban_with_bic_and_no_address() {
        let mut o = order();
        o.product = PaymentProduct::CrossBorderCreditTransfers;
        o.creditor_iban = "GB29NWBK60161331926819".into();
        o.creditor_bic = Some("NWBKGB2L".into());
        o.debtor_iban = Some("BE68539007547034".into());
        o.cross_border = Some(Box::new(crate::domain::model::CrossBorder {
            charge_bearer: crate::domain::model::ChargeBearer::Debt,
            creditor_address: None,
            creditor_bban: None,
            creditor_bank_national_id: None,
            creditor_currency: None,
        }));
        let body = serde_json::to_value(InitiationBody::from_order(&o)).unwrap();
        assert_eq!(body["charge_bearer"], "DEBT");
        assert_eq!(
            body["creditor_account"],
            serde_json::json!({"iban": "GB29NWBK60161331926819", "bic": "NWBKGB2L"})
        );
        assert_eq!(body["debtor_account"]["iban"], "BE68539007547034");
        assert!(body.get("creditor_address").is_none());
    }

    #[test]
    fn periodic_body_adds_the_schedule() {
        let standing = StandingOrder {
            order: order(),
            start_date: chrono::NaiveDate::from_ymd_opt(2031, 1, 31).unwrap(),
            end_date: chrono::NaiveDate::from_ymd_opt(2031, 7, 31),
            frequency: crate::domain::model::Frequency::EveryTwoMonths,
            day_of_execution: Some(31),
        };
        let body = serde_json::to_value(PeriodicBody::from_order(&standing)).unwrap();
        assert_eq!(body["start_date"], "2031-01-31");
        assert_eq!(body["end_date"], "2031-07-31");
        assert_eq!(body["frequency"], "EveryTwoMonths");
        assert_eq!(body["day_of_execution"], 31);
        assert_eq!(body["endtoend_identification"], "E2E-1");
        let mut open_ended = standing;
        open_ended.end_date = None;
        open_ended.day_of_execution = None;
        let body = serde_json::to_value(PeriodicBody::from_order(&open_ended)).unwrap();
        assert!(body.get("end_date").is_none());
        assert!(body.get("day_of_execution").is_none());
    }

    #[test]
    fn bulk_body_lists_the_entries() {
        let entry = |e2e: &str| crate::domain::model::BulkEntry {
            amount: Amount::from_minor(500),
            currency: "EUR".into(),
            creditor_name: "Supplier".into(),
            creditor_iban: "BE71096123456769".into(),
            creditor_bic: None,
            end_to_end_id: e2e.into(),
            remittance_information: Some("salary".into()),
        };
        let bulk = BulkOrder {
            product: PaymentProduct::SepaCreditTransfers,
            brand: Brand::Belfius,
            debtor_iban: None,
            batch_booking: true,
            requested_execution_date: None,
            payments: vec![entry("B-1"), entry("B-2")],
            language: Language::Fr,
            redirect_uri: "https://tpp.example/cb".into(),
        };
        let body = serde_json::to_value(BulkBody::from_order(&bulk)).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "batch_booking_preferred": true,
                "payments": [
                    {
                        "instructed_amount": {"amount": "5.00", "currency": "EUR"},
                        "creditor_account": {"iban": "BE71096123456769"},
                        "creditor_name": "Supplier",
                        "endtoend_identification": "B-1",
                        "remittance_information": "salary"
                    },
                    {
                        "instructed_amount": {"amount": "5.00", "currency": "EUR"},
                        "creditor_account": {"iban": "BE71096123456769"},
                        "creditor_name": "Supplier",
                        "endtoend_identification": "B-2",
                        "remittance_information": "salary"
                    }
                ]
            })
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-25T08:49:30Z")
            .map(|d| d.with_timezone(&chrono::Utc))
            .unwrap();
        let with = |value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::RETRY_AFTER, HeaderValue::from_static(value));
            retry_after_at(&h, now)
        };
        assert_eq!(with("120"), Some(Duration::from_secs(120)));
        assert_eq!(
            with("Wed, 25 Nov 2026 08:49:37 GMT"),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            with("Wed, 25 Nov 2026 08:00:00 GMT"),
            Some(Duration::ZERO),
            "a date in the past: retry now"
        );
        assert_eq!(with("soon"), None);
        assert_eq!(with("-5"), None);
        assert_eq!(retry_after_at(&HeaderMap::new(), now), None);
    }

    #[test]
    fn status_mapping() {
        let h = HeaderMap::new();
        assert!(map_status(StatusCode::CREATED, &h, b"").is_ok());
        let mut h429 = HeaderMap::new();
        h429.insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
        assert!(matches!(
            map_status(StatusCode::TOO_MANY_REQUESTS, &h429, b""),
            Err(BankError::RateLimited { retry_after: Some(d) }) if d == Duration::from_secs(7)
        ));
        match map_status(
            StatusCode::BAD_GATEWAY,
            &h,
            br#"{"error":"internal_server_error"}"#,
        ) {
            Err(BankError::Unavailable {
                status: 502,
                body: Some(b),
            }) => {
                assert_eq!(b.error, "internal_server_error")
            }
            other => panic!("{other:?}"),
        }
        match map_status(StatusCode::NOT_ACCEPTABLE, &h, b"<html>") {
            Err(BankError::Refused { status: 406, body }) => {
                assert_eq!(body.error, "Not Acceptable")
            }
            other => panic!("{other:?}"),
        }
        let json = br#"{"error":"INVALID_INPUT","error_code":"B14821ZZ-1231-000000","error_description":"x"}"#;
        match map_status(StatusCode::BAD_REQUEST, &h, json) {
            Err(BankError::Refused { status: 400, body }) => {
                assert_eq!(body.error_code, "B14821ZZ-1231-000000")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            map_status(StatusCode::FOUND, &h, b""),
            Err(BankError::Protocol(_))
        ));
    }

    #[test]
    fn expires_in_accepts_string_and_number() {
        for text in [
            r#"{"access_token":"a","expires_in":"900"}"#,
            r#"{"access_token":"a","expires_in":900}"#,
        ] {
            let t: TokenResponse = serde_json::from_str(text).unwrap();
            assert_eq!(t.expires_in, Some(900));
        }
        assert!(
            serde_json::from_str::<TokenResponse>(r#"{"access_token":"a","expires_in":"soon"}"#)
                .is_err()
        );
    }
}
