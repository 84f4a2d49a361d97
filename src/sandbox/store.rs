//! In-memory bank state of the simulator: payments, authorization codes, tokens, counters.
//!
//! Time-driven transitions (auto-sign, settlement, SCA expiry) are applied lazily whenever a
//! payment is read, using the instant at which they were due: the result is the same as with
//! timers, without tasks to manage.
//!
//! Codes and tokens are stored as SHA-256 digests only, so the store never holds them in clear.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use rand::RngCore as _;
use secrecy::{ExposeSecret as _, SecretString};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::belfius::pkce::challenge_for;
use crate::belfius::status::TransactionStatus;
use crate::domain::model::{Amount, PaymentProduct};

/// [I] Lifetime of an authorization code (not documented; RFC 6749 recommends at most 10 min).
pub const CODE_LIFETIME: Duration = Duration::from_secs(600);
/// [C] 900 s was observed for AIS access tokens (belfius-api.md §3.2); assumed for PIS.
pub const ACCESS_TOKEN_LIFETIME: Duration = Duration::from_secs(900);
/// Delay of the `AUTO-SIGN` / `AUTO-REJECT` scenarios when no global auto-sign delay is set.
pub const DEFAULT_SCENARIO_DELAY: Duration = Duration::from_secs(1);

pub type Digest = [u8; 32];

pub fn digest(secret: &str) -> Digest {
    Sha256::digest(secret.as_bytes()).into()
}

fn random_secret() -> SecretString {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes).into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeMethod {
    S256,
    /// Seen in a Belfius sandbox demo (belfius-api.md §2.2); accepted, never sent by our client.
    Plain,
}

/// The PKCE challenge of an initiation. Not a secret: it travels in a request header.
#[derive(Debug, Clone)]
pub struct Challenge {
    pub value: String,
    pub method: ChallengeMethod,
}

impl Challenge {
    fn verifies(&self, verifier: &str) -> bool {
        match self.method {
            ChallengeMethod::S256 => challenge_for(verifier) == self.value,
            ChallengeMethod::Plain => verifier == self.value,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoAction {
    Sign,
    Reject,
}

/// Timing settings, copied from the sandbox configuration.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub auto_sign_after: Option<Duration>,
    pub settle_after: Duration,
    pub sca_expiry: Duration,
}

/// A validated initiation, as the API handler hands it to the store.
#[derive(Debug, Clone)]
pub struct NewPayment {
    pub product: PaymentProduct,
    pub e2e: String,
    pub amount: Amount,
    pub currency: String,
    pub creditor_name: String,
    pub creditor_iban: String,
    pub debtor_iban: Option<String>,
    pub redirect_uri: String,
    /// `None` when the initiation carried a valid access token: then no code is issued.
    pub challenge: Option<Challenge>,
    pub scenario: Scenario,
}

/// Behaviour chosen by magic words in `creditor_name` (docs/belfius.md, "Scenarios").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scenario {
    pub auto: Option<AutoAction>,
    /// First signature gives PATC, a second one ACTC (multi-signature, belfius-api.md §4).
    pub multi_sign: bool,
    /// Answer the initiation like API v1: SCA URL in `Location` only, not in the body.
    pub location_only: bool,
}

pub struct Payment {
    pub id: String,
    pub product: PaymentProduct,
    pub e2e: String,
    pub amount: Amount,
    pub currency: String,
    pub creditor_name: String,
    pub creditor_iban: String,
    pub debtor_iban: Option<String>,
    pub redirect_uri: String,
    pub challenge: Option<Challenge>,
    pub status: TransactionStatus,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub scenario: Scenario,
    created: Instant,
    signed_at: Option<Instant>,
    auto_at: Option<(Instant, AutoAction)>,
    /// The PSU's last browser redirect back to the TPP; holds an authorization code.
    last_redirect: Option<SecretString>,
}

/// JSON view of a payment for the operator API. No Debug: `redirect_url` may hold a code.
#[derive(Serialize)]
pub struct PaymentView {
    pub payment_id: String,
    pub payment_product: &'static str,
    pub endtoend_identification: String,
    pub amount: String,
    pub currency: String,
    pub creditor_name: String,
    pub creditor_iban: String,
    pub debtor_iban: Option<String>,
    pub transaction_status: &'static str,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub redirect_uri: String,
    pub pkce: bool,
    /// Operator view only: contains the authorization code, as the PSU's browser would.
    pub redirect_url: Option<String>,
}

impl Payment {
    pub fn view(&self) -> PaymentView {
        PaymentView {
            payment_id: self.id.clone(),
            payment_product: self.product.path_segment(),
            endtoend_identification: self.e2e.clone(),
            amount: self.amount.to_string(),
            currency: self.currency.clone(),
            creditor_name: self.creditor_name.clone(),
            creditor_iban: self.creditor_iban.clone(),
            debtor_iban: self.debtor_iban.clone(),
            transaction_status: self.status.as_str(),
            reason: self.reason.clone(),
            created_at: self.created_at,
            redirect_uri: self.redirect_uri.clone(),
            pkce: self.challenge.is_some(),
            redirect_url: self
                .last_redirect
                .as_ref()
                .map(|r| r.expose_secret().to_owned()),
        }
    }
}

/// What a PSU action produced.
#[derive(Serialize)]
pub struct PsuOutcome {
    pub payment_id: String,
    pub status: &'static str,
    /// Where the PSU's browser goes next; `None` when the action happens in Belfius channels
    /// (second signer of a multi-signature payment).
    pub redirect_url: Option<String>,
}

impl std::fmt::Debug for PsuOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The redirect URL carries the authorization code.
        f.debug_struct("PsuOutcome")
            .field("payment_id", &self.payment_id)
            .field("status", &self.status)
            .field("redirect", &self.redirect_url.is_some())
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PsuError {
    #[error("no such payment")]
    NotFound,
    #[error("payment is {0}, the PSU cannot act on it any more")]
    Conflict(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("authorization code unknown")]
    UnknownCode,
    #[error("authorization code already used")]
    CodeUsed,
    #[error("authorization code expired")]
    CodeExpired,
    #[error("redirect_uri does not match the Redirect-URI of the initiation")]
    RedirectMismatch,
    #[error("code_verifier does not match the code challenge")]
    VerifierMismatch,
    #[error("refresh token is not valid")]
    InvalidRefreshToken,
}

struct IssuedCode {
    payment_id: String,
    redirect_uri: String,
    challenge: Challenge,
    issued: Instant,
    used: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    Access,
    Refresh,
}

struct IssuedToken {
    kind: TokenKind,
    /// One pair per chain: a refresh replaces both tokens of its chain [P §3.2].
    chain: u64,
    expires: Option<Instant>,
}

/// A freshly issued pair, in clear once, for the HTTP response.
pub struct IssuedPair {
    pub access_token: SecretString,
    pub refresh_token: SecretString,
    pub expires_in: Duration,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Counters {
    /// Successful (201) initiations per end-to-end id: proves "no double initiation".
    pub initiations_by_e2e: BTreeMap<String, u64>,
    /// Successful (201) initiations.
    pub initiations: u64,
    /// Every request that reached the initiation handler, refused ones included.
    pub initiation_requests: u64,
    /// Every request that reached the status handler.
    pub status_requests: u64,
    pub tokens_issued: u64,
    pub token_failures: u64,
}

pub struct Store {
    timing: Timing,
    payments: HashMap<String, Payment>,
    /// Creation order, for listings and "latest payment with this e2e id".
    order: Vec<String>,
    codes: HashMap<Digest, IssuedCode>,
    tokens: HashMap<Digest, IssuedToken>,
    next_chain: u64,
    pub counters: Counters,
}

impl Store {
    pub fn new(timing: Timing) -> Self {
        Self {
            timing,
            payments: HashMap::new(),
            order: Vec::new(),
            codes: HashMap::new(),
            tokens: HashMap::new(),
            next_chain: 0,
            counters: Counters::default(),
        }
    }

    pub fn reset(&mut self) {
        *self = Self::new(self.timing);
    }

    pub fn count_initiation_request(&mut self) {
        self.counters.initiation_requests += 1;
    }

    pub fn count_status_request(&mut self) {
        self.counters.status_requests += 1;
    }

    pub fn count_token_failure(&mut self) {
        self.counters.token_failures += 1;
    }

    pub fn insert_payment(&mut self, new: NewPayment, now: Instant) -> &Payment {
        // 32 hex characters: inside the reported `^[a-zA-Z0-9-]{0,35}$` id format [T Exthand].
        let id = uuid::Uuid::new_v4().simple().to_string();
        let auto_delay = self
            .timing
            .auto_sign_after
            .unwrap_or(DEFAULT_SCENARIO_DELAY);
        let auto_at = match new.scenario.auto {
            Some(action) => Some((now + auto_delay, action)),
            None => self
                .timing
                .auto_sign_after
                .map(|after| (now + after, AutoAction::Sign)),
        };
        *self
            .counters
            .initiations_by_e2e
            .entry(new.e2e.clone())
            .or_insert(0) += 1;
        self.counters.initiations += 1;
        self.order.push(id.clone());
        self.payments.entry(id.clone()).or_insert(Payment {
            id,
            product: new.product,
            e2e: new.e2e,
            amount: new.amount,
            currency: new.currency,
            creditor_name: new.creditor_name,
            creditor_iban: new.creditor_iban,
            debtor_iban: new.debtor_iban,
            redirect_uri: new.redirect_uri,
            challenge: new.challenge,
            status: TransactionStatus::Rcvd,
            reason: None,
            created_at: Utc::now(),
            scenario: new.scenario,
            created: now,
            signed_at: None,
            auto_at,
            last_redirect: None,
        })
    }

    pub fn payment(&mut self, id: &str, now: Instant) -> Option<&Payment> {
        self.advance(id, now);
        self.payments.get(id)
    }

    pub fn payments(&mut self, now: Instant) -> Vec<&Payment> {
        for id in self.order.clone() {
            self.advance(&id, now);
        }
        self.order
            .iter()
            .filter_map(|id| self.payments.get(id))
            .collect()
    }

    /// The most recent payment with this end-to-end id (there may be several: that is exactly
    /// what the counters are there to reveal).
    pub fn latest_by_e2e(&self, e2e: &str) -> Option<String> {
        self.order
            .iter()
            .rev()
            .find(|id| self.payments.get(*id).is_some_and(|p| p.e2e == e2e))
            .cloned()
    }

    pub fn sign(&mut self, id: &str, now: Instant) -> Result<PsuOutcome, PsuError> {
        self.advance(id, now);
        self.act(id, AutoAction::Sign, now)
    }

    pub fn reject(&mut self, id: &str, now: Instant) -> Result<PsuOutcome, PsuError> {
        self.advance(id, now);
        self.act(id, AutoAction::Reject, now)
    }

    /// Applies the transitions that were due by `now`, each at the instant it was due.
    fn advance(&mut self, id: &str, now: Instant) {
        loop {
            let Some(p) = self.payments.get_mut(id) else {
                return;
            };
            match p.status {
                TransactionStatus::Rcvd => {
                    let expires = p.created + self.timing.sca_expiry;
                    if let Some((at, action)) = p.auto_at
                        && at <= now
                        && at < expires
                    {
                        p.auto_at = None;
                        // Cannot conflict: the payment is RCVD.
                        let _ = self.act(id, action, at);
                        continue;
                    }
                    if expires <= now {
                        p.status = TransactionStatus::Rjct;
                        p.reason = Some(format!(
                            "SCA not completed within {} s",
                            self.timing.sca_expiry.as_secs()
                        ));
                    }
                    return;
                }
                TransactionStatus::Actc => {
                    if let Some(signed) = p.signed_at
                        && signed + self.timing.settle_after <= now
                    {
                        p.status = TransactionStatus::Acsc;
                    }
                    return;
                }
                // Waiting for another signer, or final, or never produced by the simulator.
                TransactionStatus::Patc
                | TransactionStatus::Pdng
                | TransactionStatus::Accp
                | TransactionStatus::Acsp
                | TransactionStatus::Acwc
                | TransactionStatus::Acfc
                | TransactionStatus::Acsc
                | TransactionStatus::Part
                | TransactionStatus::Rjct
                | TransactionStatus::Canc => return,
            }
        }
    }

    fn act(&mut self, id: &str, action: AutoAction, at: Instant) -> Result<PsuOutcome, PsuError> {
        let Some(p) = self.payments.get_mut(id) else {
            return Err(PsuError::NotFound);
        };
        let first_signer = match p.status {
            TransactionStatus::Rcvd => true,
            TransactionStatus::Patc => false,
            TransactionStatus::Pdng
            | TransactionStatus::Actc
            | TransactionStatus::Accp
            | TransactionStatus::Acsp
            | TransactionStatus::Acwc
            | TransactionStatus::Acfc
            | TransactionStatus::Acsc
            | TransactionStatus::Part
            | TransactionStatus::Rjct
            | TransactionStatus::Canc => return Err(PsuError::Conflict(p.status.as_str())),
        };
        p.auto_at = None;
        let redirect = match action {
            AutoAction::Sign => {
                if first_signer && p.scenario.multi_sign {
                    p.status = TransactionStatus::Patc;
                } else {
                    p.status = TransactionStatus::Actc;
                    p.signed_at = Some(at);
                }
                // Only the first signer comes through the TPP redirect [P FAQ multi-signature];
                // a code is issued only when no access token was given [P flows].
                match (first_signer, &p.challenge) {
                    (false, _) => None,
                    (true, None) => Some(redirect_url(&p.redirect_uri, &[("state", &p.id)])),
                    (true, Some(challenge)) => {
                        let code = random_secret();
                        self.codes.insert(
                            digest(code.expose_secret()),
                            IssuedCode {
                                payment_id: p.id.clone(),
                                redirect_uri: p.redirect_uri.clone(),
                                challenge: challenge.clone(),
                                issued: at,
                                used: false,
                            },
                        );
                        Some(redirect_url(
                            &p.redirect_uri,
                            &[("code", code.expose_secret()), ("state", &p.id)],
                        ))
                    }
                }
            }
            AutoAction::Reject => {
                p.status = TransactionStatus::Rjct;
                p.reason = Some("PSU refused".into());
                first_signer.then(|| {
                    redirect_url(
                        &p.redirect_uri,
                        &[
                            ("error", "access_denied"),
                            ("error_description", "PSU refused"),
                            ("state", &p.id),
                        ],
                    )
                })
            }
        };
        if let Some(url) = &redirect {
            p.last_redirect = Some(url.clone().into());
        }
        Ok(PsuOutcome {
            payment_id: p.id.clone(),
            status: p.status.as_str(),
            redirect_url: redirect,
        })
    }

    /// `grant_type=authorization_code`. A failed attempt does not burn the code [I]; a
    /// successful one does (single use, RFC 6749 §4.1.2).
    pub fn redeem_code(
        &mut self,
        code: &str,
        verifier: &str,
        redirect_uri: &str,
        now: Instant,
    ) -> Result<IssuedPair, GrantError> {
        let entry = self
            .codes
            .get_mut(&digest(code))
            .ok_or(GrantError::UnknownCode)?;
        if entry.used {
            return Err(GrantError::CodeUsed);
        }
        if now.saturating_duration_since(entry.issued) > CODE_LIFETIME {
            return Err(GrantError::CodeExpired);
        }
        if entry.redirect_uri != redirect_uri {
            return Err(GrantError::RedirectMismatch);
        }
        if !entry.challenge.verifies(verifier) {
            return Err(GrantError::VerifierMismatch);
        }
        entry.used = true;
        tracing::debug!(payment_id = entry.payment_id, "authorization code redeemed");
        let chain = self.next_chain;
        self.next_chain += 1;
        Ok(self.issue_pair(chain, now))
    }

    /// `grant_type=refresh_token`: replaces both tokens of the chain [P §3.2].
    pub fn refresh(&mut self, refresh_token: &str, now: Instant) -> Result<IssuedPair, GrantError> {
        let chain = match self.tokens.get(&digest(refresh_token)) {
            Some(t) if t.kind == TokenKind::Refresh => t.chain,
            Some(_) | None => return Err(GrantError::InvalidRefreshToken),
        };
        self.tokens.retain(|_, t| t.chain != chain);
        Ok(self.issue_pair(chain, now))
    }

    fn issue_pair(&mut self, chain: u64, now: Instant) -> IssuedPair {
        let access_token = random_secret();
        let refresh_token = random_secret();
        self.tokens.insert(
            digest(access_token.expose_secret()),
            IssuedToken {
                kind: TokenKind::Access,
                chain,
                expires: Some(now + ACCESS_TOKEN_LIFETIME),
            },
        );
        self.tokens.insert(
            digest(refresh_token.expose_secret()),
            IssuedToken {
                kind: TokenKind::Refresh,
                chain,
                // [I] refresh-token lifetime is not documented: it lives until replaced.
                expires: None,
            },
        );
        self.counters.tokens_issued += 1;
        IssuedPair {
            access_token,
            refresh_token,
            expires_in: ACCESS_TOKEN_LIFETIME,
        }
    }

    pub fn access_token_valid(&self, token: &str, now: Instant) -> bool {
        self.tokens.get(&digest(token)).is_some_and(|t| {
            t.kind == TokenKind::Access && t.expires.is_none_or(|expires| now < expires)
        })
    }
}

/// `base?k=v&...` with proper query encoding; keeps the TPP's own query parameters. An
/// unparsable base is kept verbatim with the parameters appended (it was validated at
/// initiation, so this does not happen).
fn redirect_url(base: &str, params: &[(&str, &str)]) -> String {
    match url::Url::parse(base) {
        Ok(mut url) => {
            url.query_pairs_mut().extend_pairs(params);
            url.to_string()
        }
        Err(_) => {
            let query = serde_urlencoded::to_string(params).unwrap_or_default();
            format!("{base}?{query}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMING: Timing = Timing {
        auto_sign_after: None,
        settle_after: Duration::from_secs(2),
        sca_expiry: Duration::from_secs(900),
    };

    fn new_payment(e2e: &str, scenario: Scenario) -> NewPayment {
        NewPayment {
            product: PaymentProduct::SepaCreditTransfers,
            e2e: e2e.into(),
            amount: Amount::from_minor(100),
            currency: "EUR".into(),
            creditor_name: "ACME".into(),
            creditor_iban: "BE71096123456769".into(),
            debtor_iban: None,
            redirect_uri: "https://tpp.example/cb?x=1".into(),
            challenge: Some(Challenge {
                value: challenge_for("verifier-verifier-verifier-verifier-verifier"),
                method: ChallengeMethod::S256,
            }),
            scenario,
        }
    }

    fn code_of(redirect: &str) -> String {
        let url = url::Url::parse(redirect).unwrap();
        url.query_pairs()
            .find(|(k, _)| k == "code")
            .map(|(_, v)| v.into_owned())
            .unwrap()
    }

    #[test]
    fn sign_settles_lazily_and_code_is_single_use() {
        let t0 = Instant::now();
        let mut store = Store::new(TIMING);
        let id = store
            .insert_payment(new_payment("E1", Scenario::default()), t0)
            .id
            .clone();
        let out = store.sign(&id, t0).unwrap();
        assert_eq!(out.status, "ACTC");
        let redirect = out.redirect_url.unwrap();
        assert!(
            redirect.starts_with("https://tpp.example/cb?x=1&code="),
            "{redirect}"
        );
        assert!(redirect.ends_with(&format!("&state={id}")));
        assert_eq!(
            store
                .payment(&id, t0 + Duration::from_secs(1))
                .unwrap()
                .status,
            TransactionStatus::Actc
        );
        assert_eq!(
            store
                .payment(&id, t0 + Duration::from_secs(2))
                .unwrap()
                .status,
            TransactionStatus::Acsc
        );
        let code = code_of(&redirect);
        let verifier = "verifier-verifier-verifier-verifier-verifier";
        assert_eq!(
            store
                .redeem_code(&code, "wrong", "https://tpp.example/cb?x=1", t0)
                .err(),
            Some(GrantError::VerifierMismatch)
        );
        assert_eq!(
            store
                .redeem_code(&code, verifier, "https://tpp.example/other", t0)
                .err(),
            Some(GrantError::RedirectMismatch)
        );
        let pair = store
            .redeem_code(&code, verifier, "https://tpp.example/cb?x=1", t0)
            .unwrap();
        assert!(store.access_token_valid(pair.access_token.expose_secret(), t0));
        assert_eq!(
            store
                .redeem_code(&code, verifier, "https://tpp.example/cb?x=1", t0)
                .err(),
            Some(GrantError::CodeUsed)
        );
        assert_eq!(store.sign(&id, t0).err(), Some(PsuError::Conflict("ACSC")));
    }

    #[test]
    fn refresh_replaces_the_whole_pair() {
        let t0 = Instant::now();
        let mut store = Store::new(TIMING);
        let id = store
            .insert_payment(new_payment("E1", Scenario::default()), t0)
            .id
            .clone();
        let code = code_of(&store.sign(&id, t0).unwrap().redirect_url.unwrap());
        let first = store
            .redeem_code(
                &code,
                "verifier-verifier-verifier-verifier-verifier",
                "https://tpp.example/cb?x=1",
                t0,
            )
            .unwrap();
        let second = store
            .refresh(first.refresh_token.expose_secret(), t0)
            .unwrap();
        assert!(!store.access_token_valid(first.access_token.expose_secret(), t0));
        assert!(store.access_token_valid(second.access_token.expose_secret(), t0));
        assert_eq!(
            store.refresh(first.refresh_token.expose_secret(), t0).err(),
            Some(GrantError::InvalidRefreshToken)
        );
        // An access token is not a refresh token.
        assert!(
            store
                .refresh(second.access_token.expose_secret(), t0)
                .is_err()
        );
        assert!(!store.access_token_valid(
            second.access_token.expose_secret(),
            t0 + ACCESS_TOKEN_LIFETIME
        ));
    }

    #[test]
    fn unsigned_payment_expires_and_auto_actions_happen_when_due() {
        let t0 = Instant::now();
        let mut store = Store::new(Timing {
            sca_expiry: Duration::from_secs(10),
            ..TIMING
        });
        let plain = store
            .insert_payment(new_payment("E1", Scenario::default()), t0)
            .id
            .clone();
        let auto = Scenario {
            auto: Some(AutoAction::Reject),
            ..Scenario::default()
        };
        let rejected = store.insert_payment(new_payment("E2", auto), t0).id.clone();
        let later = t0 + Duration::from_millis(999);
        assert_eq!(
            store.payment(&rejected, later).unwrap().status,
            TransactionStatus::Rcvd
        );
        let due = t0 + DEFAULT_SCENARIO_DELAY;
        let p = store.payment(&rejected, due).unwrap();
        assert_eq!(p.status, TransactionStatus::Rjct);
        assert!(
            p.view()
                .redirect_url
                .unwrap()
                .contains("error=access_denied")
        );
        let p = store.payment(&plain, t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(p.status, TransactionStatus::Rjct);
        assert!(p.reason.as_deref().unwrap().contains("SCA not completed"));
    }

    #[test]
    fn global_auto_sign_signs_then_settles() {
        let t0 = Instant::now();
        let mut store = Store::new(Timing {
            auto_sign_after: Some(Duration::from_secs(3)),
            ..TIMING
        });
        let id = store
            .insert_payment(new_payment("E1", Scenario::default()), t0)
            .id
            .clone();
        assert_eq!(
            store
                .payment(&id, t0 + Duration::from_secs(3))
                .unwrap()
                .status,
            TransactionStatus::Actc
        );
        // Settlement counts from the instant of signing, not from the read.
        assert_eq!(
            store
                .payment(&id, t0 + Duration::from_secs(5))
                .unwrap()
                .status,
            TransactionStatus::Acsc
        );
    }

    #[test]
    fn multi_signature_goes_through_patc() {
        let t0 = Instant::now();
        let mut store = Store::new(TIMING);
        let multi = Scenario {
            multi_sign: true,
            ..Scenario::default()
        };
        let id = store
            .insert_payment(new_payment("E1", multi), t0)
            .id
            .clone();
        let first = store.sign(&id, t0).unwrap();
        assert_eq!(first.status, "PATC");
        assert!(first.redirect_url.is_some());
        let second = store.sign(&id, t0).unwrap();
        assert_eq!(second.status, "ACTC");
        assert!(second.redirect_url.is_none());
    }

    #[test]
    fn counters_and_latest_by_e2e() {
        let t0 = Instant::now();
        let mut store = Store::new(TIMING);
        let a1 = store
            .insert_payment(new_payment("A", Scenario::default()), t0)
            .id
            .clone();
        let a2 = store
            .insert_payment(new_payment("A", Scenario::default()), t0)
            .id
            .clone();
        store.insert_payment(new_payment("B", Scenario::default()), t0);
        assert_ne!(a1, a2);
        assert_eq!(store.latest_by_e2e("A"), Some(a2));
        assert_eq!(store.latest_by_e2e("C"), None);
        assert_eq!(store.counters.initiations, 3);
        assert_eq!(store.counters.initiations_by_e2e.get("A"), Some(&2));
        store.reset();
        assert_eq!(store.counters.initiations, 0);
        assert!(store.payments(t0).is_empty());
    }
}
