//! Edge: the Belfius / Banx PSD2 PIS API (client side), its data types and status mapping.
//!
//! Everything the public documentation leaves open is a setting in [`BelfiusConfig`] or an
//! adapter choice documented in docs/belfius.md, never a silent guess.

pub mod answer;
pub mod client;
pub mod conformance;
pub mod dialect;
pub mod errors;
pub mod fallback;
pub mod guard;
pub mod httpsig;
pub mod identity;
pub mod pkce;
pub mod qseal;
pub mod route;
pub mod status;

use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

pub use client::BelfiusClient;
pub use guard::GuardConfig;

use crate::domain::model::BankPaymentId;

/// Connection and protocol settings of the Belfius client.
#[derive(Debug, Clone)]
pub struct BelfiusConfig {
    /// Base URL of the Belfius-brand API, e.g. `https://psd2.b2b.belfius.be:8443`.
    pub belfius_base_url: url::Url,
    /// Base URL of the Banx-brand API, e.g. `https://psd2.b2b.banx.be:8443`.
    pub banx_base_url: url::Url,
    /// The Client-ID received at onboarding.
    pub client_id: String,
    /// The client secret received at onboarding (HTTP Basic at /token).
    pub client_secret: SecretString,
    /// Extra trusted CA certificates (PEM), e.g. the sandbox simulator's test CA.
    pub extra_ca_pem: Option<Vec<u8>>,
    /// QWAC client certificate chain and private key (PEM) for mutual TLS.
    pub qwac: Option<QwacIdentity>,
    /// TCP connect (and TLS handshake) bound of every call.
    pub connect_timeout: Duration,
    /// Whole-exchange bound of every HTTP attempt (connect, request, response body), token
    /// calls included; retries each get their own.
    pub request_timeout: Duration,
    pub versions: ApiVersions,
    /// QSeal request signing (`Signature` header); `None` sends no signature (sandbox).
    pub qseal: Option<QsealConfig>,
    /// How `instructed_amount.amount` is written (undocumented for v3: docs/belfius.md).
    pub amount_format: AmountFormat,
    /// Status codes beyond the ISO list, mapped by the operator (`PIS_BANK_STATUS_MAP`).
    pub status_map: status::StatusMap,
}

/// `"12.34"` or `12.34` in initiation bodies: the v3 type is not documented. The CAF API's
/// `instructed_amount.amount` is a string [P], v1 payments took a number [C]: a setting, string
/// by default; `pis-worker bank-check` tells which one a bank takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AmountFormat {
    #[default]
    String,
    Number,
}

impl AmountFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            AmountFormat::String => "string",
            AmountFormat::Number => "number",
        }
    }
}

impl std::str::FromStr for AmountFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "string" => Ok(Self::String),
            "number" => Ok(Self::Number),
            other => Err(format!(
                "amount format must be string or number, not {other:?}"
            )),
        }
    }
}

/// How requests are sealed with the QSeal key. The format Belfius verifies is not documented
/// (open question, docs/belfius-facts.md §10.7): every choice is a setting, defaults follow Tink's
/// client.
#[derive(Clone)]
pub struct QsealConfig {
    /// PKCS#8 (or PKCS#1) PEM RSA private key.
    pub private_key_pem: SecretString,
    /// The QSeal certificate (PEM), for `x5c`.
    pub certificate_pem: Option<Vec<u8>>,
    pub format: SignatureFormat,
    pub sign: SignedOperations,
}

impl std::fmt::Debug for QsealConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QsealConfig")
            .field("format", &self.format)
            .field("sign", &self.sign)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureFormat {
    pub encoding: SignatureEncoding,
    /// Put the certificate chain in the JWS header (`x5c`).
    pub include_x5c: bool,
    /// A `kid` for the JWS header.
    pub kid: Option<String>,
}

impl Default for SignatureFormat {
    fn default() -> Self {
        Self {
            encoding: SignatureEncoding::Base64Padded,
            include_x5c: false,
            kid: None,
        }
    }
}

/// Tink used standard Base64 with padding; RFC 7515 says base64url without padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureEncoding {
    Base64Padded,
    Base64UrlNoPad,
}

/// Which calls carry a `Signature` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedOperations {
    pub initiation: bool,
    pub cancellation: bool,
}

impl Default for SignedOperations {
    fn default() -> Self {
        Self {
            initiation: true,
            cancellation: false,
        }
    }
}

#[derive(Clone)]
pub struct QwacIdentity {
    pub cert_chain_pem: Vec<u8>,
    pub private_key_pem: SecretString,
}

impl std::fmt::Debug for QwacIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QwacIdentity").finish_non_exhaustive()
    }
}

/// Per-endpoint `Accept: application/vnd.belfius.api+json; version=N` values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiVersions {
    pub payment_initiation: String,
    /// Standing orders: v2 takes no debtor account [P FAQ].
    pub periodic_initiation: String,
    pub bulk_initiation: String,
    pub payment_status: String,
    pub payment_details: String,
    pub payment_cancellation: String,
    pub token: String,
    /// `GET /consent-uris` with `scope=AIS`: [P] version 4 only.
    pub consent_uris_ais: String,
    /// `GET /consent-uris` with `scope=CAF` and the account's IBAN: [I] version 3.
    pub consent_uris_caf: String,
    /// `POST /funds-confirmations`: [P] version 1.
    pub funds_confirmation: String,
    /// `GET /accounts…` (AIS): [P] version 3 (Tink and Yolt sent 2).
    pub accounts: String,
}

impl Default for ApiVersions {
    fn default() -> Self {
        Self {
            payment_initiation: "3".into(),
            periodic_initiation: "2".into(),
            bulk_initiation: "1".into(),
            payment_status: "1".into(),
            payment_details: "1".into(),
            payment_cancellation: "1".into(),
            // [P] the portal's /token is at version 3 (said for AIS); others are tried in turn
            // if the bank refuses it (`client::TOKEN_VERSIONS`).
            token: "3".into(),
            consent_uris_ais: "4".into(),
            consent_uris_caf: "3".into(),
            funds_confirmation: "1".into(),
            accounts: "3".into(),
        }
    }
}

/// What the bank answered to a successful initiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initiated {
    pub bank_payment_id: BankPaymentId,
    /// Where the PSU must be redirected to sign.
    pub sca_redirect_url: String,
    /// ISO 20022 status code, if the response carried one.
    pub bank_status: Option<String>,
}

/// A PIS access/refresh token pair. Belfius keeps one pair per scope.
#[derive(Clone)]
pub struct TokenPair {
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    pub expires_in: Option<Duration>,
    pub scope: Option<String>,
}

impl std::fmt::Debug for TokenPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenPair")
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// The documented Belfius error body `{error, error_code, error_description}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ErrorBody {
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub error_code: String,
    #[serde(default)]
    pub error_description: String,
}

/// Why a bank call did not succeed. The variants encode what the worker may conclude about
/// whether the bank acted on the request: that decides between retry and outcome-unknown.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BankError {
    /// The request never left this process (DNS, connect refused, TLS handshake): the bank did
    /// nothing, a retry is safe.
    #[error("request not sent: {0}")]
    NotSent(String),
    /// The request may have reached the bank but no response came back (timeout, reset):
    /// the outcome is unknown.
    #[error("no response from bank: {0}")]
    NoResponse(String),
    /// HTTP 429.
    #[error("rate limited by bank (retry after {retry_after:?})")]
    RateLimited { retry_after: Option<Duration> },
    /// HTTP 5xx.
    #[error("bank unavailable: HTTP {status} {body:?}")]
    Unavailable {
        status: u16,
        body: Option<ErrorBody>,
    },
    /// HTTP 4xx other than 429: the bank refused the request.
    #[error("bank refused: HTTP {status} {} {}", body.error, body.error_code)]
    Refused { status: u16, body: ErrorBody },
    /// A response that does not follow the contract.
    #[error("unexpected bank response: {0}")]
    Protocol(String),
    /// An initiation answer that matches none of the known shapes (`answer`): the bank may
    /// hold a payment whose SCA link the worker cannot read. Never re-initiated.
    #[error("bank answer matches no known dialect: {0}")]
    Unrecognized(String),
}
