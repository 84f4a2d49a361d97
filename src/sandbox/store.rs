//! In-memory bank state of the simulator: payments (single, standing orders, bulks), PSUs'
//! authorization codes and tokens, counters.
//!
//! Time-driven transitions (auto-sign, settlement, SCA expiry, end of a standing order) are
//! applied lazily whenever a payment is read, using the instant at which they were due: the
//! result is the same as with timers, without tasks to manage.
//!
//! Codes and tokens are stored as SHA-256 digests only, so the store never holds them in clear.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, NaiveDate, Utc};
use rand::RngCore as _;
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::belfius::pkce::challenge_for;
use crate::belfius::status::TransactionStatus;
use crate::domain::model::{Amount, Brand, Frequency, PaymentKind, PaymentProduct};

/// [I] Lifetime of an authorization code (not documented; RFC 6749 recommends at most 10 min).
pub const CODE_LIFETIME: Duration = Duration::from_secs(600);
/// [C] 900 s was observed for AIS access tokens (docs/belfius-facts.md §3.2); assumed for PIS.
pub const DEFAULT_ACCESS_TOKEN_LIFETIME: Duration = Duration::from_secs(900);
/// [I] Not documented for PIS; 90 days, the PSD2 RTS (art. 10) bound on account access
/// without a new SCA until 2022, is a plausible bound for a PSU's standing authorisation.
pub const DEFAULT_REFRESH_TOKEN_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// Delay of the `AUTO-SIGN` / `AUTO-REJECT` scenarios when no global auto-sign delay is set.
pub const DEFAULT_SCENARIO_DELAY: Duration = Duration::from_secs(1);
/// The PSU who signs when the operator names none (and for automatic signatures).
pub const DEFAULT_PSU: &str = "psu-default";

pub type Digest = [u8; 32];

mod consent;
pub use consent::{
    Consent, ConsentAction, ConsentError, ConsentOutcome, ConsentStatus, ConsentView, NewConsent,
    UNATTENDED_PER_DAY,
};

/// What a token pair may be used for. Belfius keeps one pair per PSU **and scope**
/// (docs/belfius-facts.md §3.2): an AIS consent does not replace the PSU's PIS pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Scope {
    Pis,
    Ais,
    Caf,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Pis => "PIS",
            Scope::Ais => "AIS",
            Scope::Caf => "CAF",
        }
    }

    /// The `scope` query parameter of `GET /consent-uris` (AIS or CAF; PIS does not use it).
    pub fn of_consent(text: &str) -> Option<Self> {
        match text {
            "AIS" => Some(Scope::Ais),
            "CAF" => Some(Scope::Caf),
            _ => None,
        }
    }
}

pub fn digest(secret: &str) -> Digest {
    Sha256::digest(secret.as_bytes()).into()
}

pub(super) fn random_secret() -> SecretString {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes).into()
}

fn today() -> NaiveDate {
    Utc::now().date_naive()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeMethod {
    S256,
    /// Seen in a Belfius sandbox demo (docs/belfius-facts.md §2.2); accepted, never sent by our
    /// client.
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

/// Longest `state` the simulator accepts from a TPP.
pub const MAX_STATE_LEN: usize = 512;

/// The TPP's opaque `state`, appended to the SCA URL it gives the PSU and echoed by the bank
/// on the redirect back. Only RFC 3986 unreserved characters: the redirect stays a
/// well-formed URL whatever the TPP sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaState(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("state must be 1 to {MAX_STATE_LEN} characters of A-Z, a-z, 0-9, '.', '_', '~', '-'")]
pub struct InvalidState;

impl ScaState {
    pub fn parse(text: &str) -> Result<Self, InvalidState> {
        let unreserved =
            |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-');
        if (1..=MAX_STATE_LEN).contains(&text.len()) && text.bytes().all(unreserved) {
            Ok(Self(text.to_owned()))
        } else {
            Err(InvalidState)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a PSU does on the SCA screens. `state`: the TPP's, when the PSU came through an SCA
/// URL carrying one; the redirect echoes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PsuAction {
    /// `partial`: one signature of several (multi-signature), the payment stays PATC.
    Sign {
        psu: String,
        partial: bool,
        state: Option<ScaState>,
    },
    Reject {
        psu: String,
        state: Option<ScaState>,
    },
}

/// Settings the operator may change while the simulator runs (`/admin/config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub auto_sign_after: Option<Duration>,
    /// ACTC -> ACSC delay (single and bulk payments).
    pub settle_after: Duration,
    /// An unsigned (RCVD) payment turns RJCT after this.
    pub sca_expiry: Duration,
    pub access_token_lifetime: Duration,
    /// After it, a refresh token is refused (GEN-1203-100004) and the PSU must sign again.
    pub refresh_token_lifetime: Duration,
    /// Check the QSeal `Signature` header of initiations.
    pub verify_signatures: bool,
    /// HTTP status of a successful cancellation: 204 (no body), 200 or 202 (with a body).
    pub cancel_status: u16,
    /// PSUs may see and sign orphans (payments whose initiation answer was lost), as in a
    /// banking app at a real bank. Off: nobody can, which makes "an orphan is never signed"
    /// true by construction.
    pub orphans_signable: bool,
}

/// A standing order's schedule, as validated by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Schedule {
    pub start_date: NaiveDate,
    pub end_date: Option<NaiveDate>,
    pub frequency: &'static str,
    pub day_of_execution: Option<u8>,
}

impl Schedule {
    pub fn new(
        start_date: NaiveDate,
        end_date: Option<NaiveDate>,
        frequency: Frequency,
        day_of_execution: Option<u8>,
    ) -> Self {
        Self {
            start_date,
            end_date,
            frequency: frequency.as_str(),
            day_of_execution,
        }
    }
}

/// One transfer of a bulk, with its own outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BulkLine {
    pub endtoend_identification: String,
    pub amount: String,
    pub currency: String,
    pub creditor_name: String,
    pub creditor_iban: String,
    pub transaction_status: &'static str,
    /// Scenario `REJECT-ENTRY`: this transfer is rejected at execution.
    #[serde(skip)]
    pub reject: bool,
}

/// A validated initiation, as the API handler hands it to the store.
#[derive(Debug, Clone)]
pub struct NewPayment {
    pub kind: PaymentKind,
    pub brand: Brand,
    pub product: PaymentProduct,
    /// The end-to-end id (a bulk's: its first transfer's).
    pub e2e: String,
    /// A bulk's: the sum of its transfers.
    pub amount: Amount,
    pub currency: String,
    pub creditor_name: String,
    /// IBAN, or the BBAN of a cross-border transfer.
    pub creditor_account: String,
    pub debtor_iban: Option<String>,
    pub requested_execution_date: Option<NaiveDate>,
    pub schedule: Option<Schedule>,
    pub entries: Vec<BulkLine>,
    pub redirect_uri: String,
    /// `None` when the initiation carried a valid access token: then no code is issued.
    pub challenge: Option<Challenge>,
    /// The PSU whose access token authorised the initiation, if any.
    pub psu: Option<String>,
    pub scenario: Scenario,
    /// The body as received: what the details endpoint gives back.
    pub request: serde_json::Value,
}

/// Behaviour chosen by magic words in `creditor_name` (docs/belfius.md, "Scenarios").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scenario {
    pub auto: Option<AutoAction>,
    /// First signature gives PATC, a second one ACTC (multi-signature, docs/belfius-facts.md §4).
    pub multi_sign: bool,
    /// Answer the initiation like API v1: SCA URL in `Location` only, not in the body.
    pub location_only: bool,
}

pub struct Payment {
    pub id: String,
    pub kind: PaymentKind,
    pub brand: Brand,
    pub product: PaymentProduct,
    pub e2e: String,
    pub amount: Amount,
    pub currency: String,
    pub creditor_name: String,
    pub creditor_account: String,
    pub debtor_iban: Option<String>,
    pub requested_execution_date: Option<NaiveDate>,
    pub schedule: Option<Schedule>,
    pub entries: Vec<BulkLine>,
    pub redirect_uri: String,
    pub challenge: Option<Challenge>,
    /// The PSU the payment belongs to: the token's at initiation, else the first signer.
    pub psu: Option<String>,
    pub status: TransactionStatus,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub scenario: Scenario,
    pub request: serde_json::Value,
    created: Instant,
    signed_at: Option<Instant>,
    auto_at: Option<(Instant, AutoAction)>,
    /// The PSU's last browser redirect back to the TPP; holds an authorization code.
    last_redirect: Option<SecretString>,
    /// The initiation's answer was lost: the TPP never got this payment's SCA URL. Unless
    /// `orphans_signable`, no PSU can sign it and it stays RCVD until it expires.
    orphaned: bool,
    /// When a sweep first saw this payment final (only tracked when the store forgets).
    ended: Option<Instant>,
}

/// JSON view of a payment for the operator API. No Debug: `redirect_url` may hold a code.
#[derive(Serialize)]
pub struct PaymentView {
    pub payment_id: String,
    pub payment_kind: &'static str,
    pub brand: &'static str,
    pub payment_product: &'static str,
    pub endtoend_identification: String,
    pub amount: String,
    pub currency: String,
    pub creditor_name: String,
    pub creditor_iban: String,
    pub debtor_iban: Option<String>,
    pub requested_execution_date: Option<NaiveDate>,
    pub schedule: Option<Schedule>,
    pub entries: Vec<BulkLine>,
    pub psu: Option<String>,
    pub transaction_status: &'static str,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub redirect_uri: String,
    pub pkce: bool,
    /// Operator view only: contains the authorization code, as the PSU's browser would.
    pub redirect_url: Option<String>,
    /// The initiation's answer was lost (fault injection): signable only with
    /// `orphans_signable`.
    pub orphaned: bool,
}

impl Payment {
    pub fn view(&self) -> PaymentView {
        PaymentView {
            payment_id: self.id.clone(),
            payment_kind: self.kind.path_prefix(),
            brand: self.brand.as_str(),
            payment_product: self.product.path_segment(),
            endtoend_identification: self.e2e.clone(),
            amount: self.amount.to_string(),
            currency: self.currency.clone(),
            creditor_name: self.creditor_name.clone(),
            creditor_iban: self.creditor_account.clone(),
            debtor_iban: self.debtor_iban.clone(),
            requested_execution_date: self.requested_execution_date,
            schedule: self.schedule.clone(),
            entries: self.entries.clone(),
            psu: self.psu.clone(),
            transaction_status: self.status.as_str(),
            reason: self.reason.clone(),
            created_at: self.created_at,
            redirect_uri: self.redirect_uri.clone(),
            pkce: self.challenge.is_some(),
            redirect_url: self
                .last_redirect
                .as_ref()
                .map(|r| r.expose_secret().to_owned()),
            orphaned: self.orphaned,
        }
    }

    /// [I] What may still be cancelled (the assumption of docs/belfius-facts.md §4): anything not
    /// yet signed; a signed payment only while its execution date is in the future; a standing
    /// order while it is active. Instant and settled payments are past the point of no return.
    fn cancellable(&self, today: NaiveDate) -> bool {
        match self.status {
            TransactionStatus::Rcvd | TransactionStatus::Pdng | TransactionStatus::Patc => true,
            TransactionStatus::Actc | TransactionStatus::Accp => match self.kind {
                PaymentKind::Periodic => true,
                PaymentKind::Single | PaymentKind::Bulk => self
                    .requested_execution_date
                    .is_some_and(|date| date > today),
            },
            TransactionStatus::Acsp
            | TransactionStatus::Acwc
            | TransactionStatus::Acfc
            | TransactionStatus::Acsc
            | TransactionStatus::Part
            | TransactionStatus::Rjct
            | TransactionStatus::Canc
            | TransactionStatus::Accc
            | TransactionStatus::Acwp
            | TransactionStatus::Acis
            | TransactionStatus::Acpd
            | TransactionStatus::Blck
            | TransactionStatus::Cpuc
            | TransactionStatus::Pres => false,
        }
    }

    /// Still waiting for its first signature.
    fn awaits_first_signature(&self) -> bool {
        match self.status {
            TransactionStatus::Rcvd => true,
            TransactionStatus::Pdng
            | TransactionStatus::Patc
            | TransactionStatus::Actc
            | TransactionStatus::Accp
            | TransactionStatus::Acsp
            | TransactionStatus::Acwc
            | TransactionStatus::Acfc
            | TransactionStatus::Acsc
            | TransactionStatus::Part
            | TransactionStatus::Rjct
            | TransactionStatus::Canc
            | TransactionStatus::Accc
            | TransactionStatus::Acwp
            | TransactionStatus::Acis
            | TransactionStatus::Acpd
            | TransactionStatus::Blck
            | TransactionStatus::Cpuc
            | TransactionStatus::Pres => false,
        }
    }

    /// Whether `e2e` names this payment (a bulk: also any of its transfers).
    fn has_e2e(&self, e2e: &str) -> bool {
        self.e2e == e2e
            || self
                .entries
                .iter()
                .any(|e| e.endtoend_identification == e2e)
    }
}

/// What a PSU action produced.
#[derive(Serialize)]
pub struct PsuOutcome {
    pub payment_id: String,
    pub status: &'static str,
    /// Where the PSU's browser goes next; `None` when the action happens in Belfius channels
    /// (later signers of a multi-signature payment) or the PSU walked away.
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
    #[error(
        "the initiation's answer was lost: nobody has this payment's SCA URL (orphans_signable is off)"
    )]
    Orphaned,
    #[error("payment is {0}, the PSU cannot act on it any more")]
    Conflict(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CancelError {
    #[error("no such payment")]
    NotFound,
    #[error("payment is {0}: cancellation not allowed")]
    NotAllowed(&'static str),
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
    #[error("refresh token expired")]
    RefreshTokenExpired,
}

/// Result of presenting an access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenCheck {
    Valid {
        psu: String,
        /// The accounts the pair covers: a CAF pair's one IBAN ("limited to a given type and
        /// given IBAN", docs/belfius-facts.md §13), the accounts an AIS consent granted; none
        /// for PIS.
        accounts: Vec<String>,
    },
    /// Replaced by a newer pair of the same PSU (one pair per PSU and scope
    /// [P docs/belfius-facts.md §3.2]).
    Invalidated,
    Expired,
    Unknown,
}

struct IssuedCode {
    /// The payment or the consent the code was issued for.
    payment_id: String,
    scope: Scope,
    /// The accounts a consent covers (none for a payment's code).
    accounts: Vec<String>,
    /// The brand host of the payment: the only one whose /token knows the code.
    brand: Brand,
    psu: String,
    redirect_uri: String,
    challenge: Challenge,
    issued: Instant,
    used: bool,
    /// The grant a successful redemption started: its live pair (the one issued, or the one
    /// refreshed from it) is revoked if the code is presented again (RFC 6749 §4.1.2).
    grant: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    Access,
    Refresh,
}

struct IssuedToken {
    kind: TokenKind,
    scope: Scope,
    accounts: Vec<String>,
    /// The brand host that issued it: the only one that accepts it.
    brand: Brand,
    /// The code redemption it descends from (through refreshes).
    grant: u64,
    psu: String,
    expires: Option<Instant>,
    /// Kept after replacement, so a late use is recognised and counted.
    invalidated: bool,
    /// Times this token was presented after its replacement. A TPP that lost the answer that
    /// replaced it (a lost exchange answer, a crash before it stored the new pair) presents it
    /// once and learns from the 401; presenting it again means it ignored the bank.
    invalid_uses: u32,
}

/// A freshly issued pair, in clear once, for the HTTP response.
pub struct IssuedPair {
    pub access_token: SecretString,
    pub refresh_token: SecretString,
    pub expires_in: Duration,
    pub scope: Scope,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Counters {
    /// Successful initiations of single payments and standing orders per end-to-end id:
    /// proves "no double initiation".
    pub initiations_by_e2e: BTreeMap<String, u64>,
    /// Initiations whose answer was lost (fault injection): orphans.
    pub orphaned_initiations: u64,
    /// Orphans that received a first signature (only possible with `orphans_signable`), by
    /// any path: operator, browser, automatic.
    pub orphans_signed: u64,
    /// Successful bulk initiations per end-to-end id of the bulk's first transfer.
    pub bulk_initiations: BTreeMap<String, u64>,
    /// Successful initiations, all kinds.
    pub initiations: u64,
    /// Successful initiations by what authorised them: PKCE (a code follows the signature)
    /// or a PSU's Bearer token.
    pub initiations_by_auth: AuthCounts,
    /// Every request that reached an initiation handler, refused ones included.
    pub initiation_requests: u64,
    /// Every request that reached the status handler.
    pub status_requests: u64,
    /// Every request that reached the details handler.
    pub details_requests: u64,
    /// Every request that reached the cancellation handler.
    pub cancel_requests: u64,
    /// Successful cancellations.
    pub cancellations: u64,
    /// Token pairs issued (code exchanges and refreshes).
    pub tokens_issued: u64,
    /// Successful refreshes.
    pub refreshes: u64,
    pub token_failures: u64,
    /// Presentations of a token that a newer pair had replaced (access or refresh).
    pub invalidated_token_uses: u64,
    /// Of those, presentations of a token already refused once as replaced: the TPP went on
    /// using a pair the bank had told it was dead.
    pub invalidated_token_reuses: u64,
    pub signatures_checked: u64,
    pub signatures_failed: u64,
    /// Every request that reached `POST /funds-confirmations`, refused ones included.
    pub funds_confirmation_requests: u64,
    /// Funds confirmations answered (either way).
    pub funds_confirmations: u64,
    /// Funds confirmations answered, per `{iban}/{amount in minor units}`: how many said the
    /// funds were there and how many said they were not (a checker ties a refusal for funds
    /// to the bank's answer).
    pub funds_answers: BTreeMap<String, FundsAnswers>,
    /// Unattended AIS history reads (`psu_involved=false`) served, per account.
    pub unattended_reads: BTreeMap<String, u64>,
    /// Unattended AIS history reads refused for the day's budget (429 `ACCESS_EXCEEDED`), per
    /// account: a TPP that counts its reads never sees one.
    pub unattended_refused: BTreeMap<String, u64>,
}

/// The bank's answers to funds confirmations of one account and amount.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FundsAnswers {
    pub available: u64,
    pub unavailable: u64,
}

/// Initiations per authentication method.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct AuthCounts {
    pub pkce: u64,
    pub bearer: u64,
    /// Through the fallback interface's session (`sandbox::fallback`).
    pub fallback_session: u64,
}

pub struct Store {
    pub settings: Settings,
    payments: HashMap<String, Payment>,
    /// Creation order, for listings and "latest payment with this e2e id".
    order: Vec<String>,
    codes: HashMap<Digest, IssuedCode>,
    tokens: HashMap<Digest, IssuedToken>,
    /// Digests of each PSU's live (not invalidated) tokens, per brand and scope: a Belfius and
    /// a Banx login are two customers of two channels, each with its own pair per scope.
    live: HashMap<(Brand, String, Scope), HashSet<Digest>>,
    consents: HashMap<String, Consent>,
    /// Unattended AIS calls per account in the last 24 h (`consent::UNATTENDED_PER_DAY`).
    unattended: HashMap<String, std::collections::VecDeque<Instant>>,
    /// Balances and bookings per account: what CAF answers from and settlement moves.
    pub ledger: super::ledger::Ledger,
    /// Code redemptions so far: the id of the latest grant.
    grants: u64,
    pub counters: Counters,
    /// Forget a final payment this long after a sweep first saw it final (`None`: keep
    /// everything). See [`Store::forgetting_final_after`].
    forget_final_after: Option<Duration>,
    last_sweep: Option<Instant>,
}

/// The longest pause between two sweeps of a forgetting store.
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(10);

impl Store {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            payments: HashMap::new(),
            order: Vec::new(),
            codes: HashMap::new(),
            tokens: HashMap::new(),
            live: HashMap::new(),
            consents: HashMap::new(),
            unattended: HashMap::new(),
            ledger: super::ledger::Ledger::default(),
            grants: 0,
            counters: Counters::default(),
            forget_final_after: None,
            last_sweep: None,
        }
    }

    /// A store that forgets final payments (ACSC, RJCT, CANC) `after` they ended, with their
    /// authorization codes, so that a long run (`pis-soak`: a million payments) keeps a bounded
    /// memory. A bank's history is out of scope for the simulator; a forgotten payment answers
    /// 404 like an unknown one. Its end-to-end id leaves `initiations_by_e2e` too, unless it
    /// was initiated more than once: the evidence of a double initiation stays.
    pub fn forgetting_final_after(mut self, after: Option<Duration>) -> Self {
        self.forget_final_after = after;
        self
    }

    /// Forgets payments, codes, tokens and counters; keeps the (possibly changed) settings.
    pub fn reset(&mut self) {
        *self = Self::new(self.settings).forgetting_final_after(self.forget_final_after);
    }

    /// Payments held in memory, forgotten ones not included.
    pub fn payment_count(&self) -> usize {
        self.payments.len()
    }

    /// With forgetting on, at most every `min(horizon, 10 s)`: brings every payment up to
    /// `now`, notes those newly final, and forgets those final for longer than the horizon.
    /// Runs on initiation, so a store nobody writes to does not need it.
    pub fn sweep(&mut self, now: Instant) {
        let Some(horizon) = self.forget_final_after else {
            return;
        };
        if self.last_sweep.is_some_and(|last| {
            now.saturating_duration_since(last) < horizon.min(MAX_SWEEP_INTERVAL)
        }) {
            return;
        }
        self.last_sweep = Some(now);
        let mut forgotten = Vec::new();
        for id in self.order.clone() {
            self.advance(&id, now);
            let Some(p) = self.payments.get_mut(&id) else {
                continue;
            };
            if !p.status.is_final() {
                continue;
            }
            let ended = *p.ended.get_or_insert(now);
            if now.saturating_duration_since(ended) >= horizon {
                forgotten.push(id);
            }
        }
        for id in &forgotten {
            let Some(p) = self.payments.remove(id) else {
                continue;
            };
            let by_e2e = match p.kind {
                PaymentKind::Single | PaymentKind::Periodic => {
                    &mut self.counters.initiations_by_e2e
                }
                PaymentKind::Bulk => &mut self.counters.bulk_initiations,
            };
            if by_e2e.get(&p.e2e) == Some(&1) {
                by_e2e.remove(&p.e2e);
            }
        }
        let (payments, codes) = (&self.payments, &mut self.codes);
        if !forgotten.is_empty() {
            self.order.retain(|id| payments.contains_key(id));
        }
        // A code outlives its payment only until it expires.
        codes.retain(|_, c| {
            payments.contains_key(&c.payment_id)
                || now.saturating_duration_since(c.issued) <= CODE_LIFETIME
        });
        tracing::debug!(
            forgotten = forgotten.len(),
            kept = self.payments.len(),
            "sandbox forgot final payments"
        );
    }

    pub fn count_initiation_request(&mut self) {
        self.counters.initiation_requests += 1;
    }

    pub fn count_status_request(&mut self) {
        self.counters.status_requests += 1;
    }

    pub fn count_details_request(&mut self) {
        self.counters.details_requests += 1;
    }

    pub fn count_cancel_request(&mut self) {
        self.counters.cancel_requests += 1;
    }

    pub fn count_token_failure(&mut self) {
        self.counters.token_failures += 1;
    }

    pub fn count_signature(&mut self, valid: bool) {
        self.counters.signatures_checked += 1;
        if !valid {
            self.counters.signatures_failed += 1;
        }
    }

    pub fn insert_payment(&mut self, new: NewPayment, now: Instant) -> &Payment {
        self.sweep(now);
        // 32 hex characters: inside the reported `^[a-zA-Z0-9-]{0,35}$` id format [T Exthand].
        let id = uuid::Uuid::new_v4().simple().to_string();
        let auto_delay = self
            .settings
            .auto_sign_after
            .unwrap_or(DEFAULT_SCENARIO_DELAY);
        let auto_at = match new.scenario.auto {
            Some(action) => Some((now + auto_delay, action)),
            None => self
                .settings
                .auto_sign_after
                .map(|after| (now + after, AutoAction::Sign)),
        };
        let by_e2e = match new.kind {
            PaymentKind::Single | PaymentKind::Periodic => &mut self.counters.initiations_by_e2e,
            PaymentKind::Bulk => &mut self.counters.bulk_initiations,
        };
        *by_e2e.entry(new.e2e.clone()).or_insert(0) += 1;
        self.counters.initiations += 1;
        // The dedicated API sets exactly one of the two: a challenge without a token, a PSU
        // with one; the fallback interface (a session, no PSU token) neither.
        match (&new.challenge, &new.psu) {
            (Some(_), _) => self.counters.initiations_by_auth.pkce += 1,
            (None, Some(_)) => self.counters.initiations_by_auth.bearer += 1,
            (None, None) => self.counters.initiations_by_auth.fallback_session += 1,
        }
        self.order.push(id.clone());
        self.payments.entry(id.clone()).or_insert(Payment {
            id,
            kind: new.kind,
            brand: new.brand,
            product: new.product,
            e2e: new.e2e,
            amount: new.amount,
            currency: new.currency,
            creditor_name: new.creditor_name,
            creditor_account: new.creditor_account,
            debtor_iban: new.debtor_iban,
            requested_execution_date: new.requested_execution_date,
            schedule: new.schedule,
            entries: new.entries,
            redirect_uri: new.redirect_uri,
            challenge: new.challenge,
            psu: new.psu,
            status: TransactionStatus::Rcvd,
            reason: None,
            created_at: Utc::now(),
            scenario: new.scenario,
            request: new.request,
            created: now,
            signed_at: None,
            auto_at,
            last_redirect: None,
            orphaned: false,
            ended: None,
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

    /// Whether a PSU may see and act on this payment: orphans only in `orphans_signable` mode.
    fn psu_sees(&self, p: &Payment) -> bool {
        !p.orphaned || self.settings.orphans_signable
    }

    /// The most recent payment with this end-to-end id that a PSU can see (there may be
    /// several: that is exactly what the counters are there to reveal; orphans are skipped
    /// unless signable). A bulk matches any of its transfers' ids.
    pub fn latest_by_e2e(&self, e2e: &str) -> Option<String> {
        self.order
            .iter()
            .rev()
            .find(|id| {
                self.payments
                    .get(*id)
                    .is_some_and(|p| p.has_e2e(e2e) && self.psu_sees(p))
            })
            .cloned()
    }

    /// The initiation's answer never reached the TPP. Unless orphans are signable, nobody
    /// can sign this payment, so its automatic signature goes too.
    pub fn orphan(&mut self, id: &str) {
        let signable = self.settings.orphans_signable;
        if let Some(p) = self.payments.get_mut(id) {
            p.orphaned = true;
            if !signable {
                p.auto_at = None;
            }
            self.counters.orphaned_initiations += 1;
        }
    }

    pub fn act(
        &mut self,
        id: &str,
        action: PsuAction,
        now: Instant,
    ) -> Result<PsuOutcome, PsuError> {
        self.advance(id, now);
        if self.payments.get(id).is_some_and(|p| !self.psu_sees(p)) {
            return Err(PsuError::Orphaned);
        }
        self.apply(id, action, now)
    }

    /// The PSU signs every payment with this end-to-end id that still waits for its first
    /// signature (RCVD), oldest first; orphans only when signable. Empty when there is none.
    pub fn sign_all(
        &mut self,
        e2e: &str,
        psu: &str,
        partial: bool,
        state: Option<&ScaState>,
        now: Instant,
    ) -> Vec<PsuOutcome> {
        let candidates: Vec<String> = self
            .order
            .iter()
            .filter(|id| self.payments.get(*id).is_some_and(|p| p.has_e2e(e2e)))
            .cloned()
            .collect();
        let mut outcomes = Vec::new();
        for id in candidates {
            self.advance(&id, now);
            let pending = self
                .payments
                .get(&id)
                .is_some_and(|p| p.awaits_first_signature() && self.psu_sees(p));
            if !pending {
                continue;
            }
            let action = PsuAction::Sign {
                psu: psu.to_owned(),
                partial,
                state: state.cloned(),
            };
            // Cannot conflict: the payment is RCVD.
            if let Ok(outcome) = self.apply(&id, action, now) {
                outcomes.push(outcome);
            }
        }
        outcomes
    }

    /// The PSU walks away: no automatic action will happen, the payment stays RCVD (or PATC)
    /// until the SCA expiry turns it RJCT.
    pub fn abandon(&mut self, id: &str, now: Instant) -> Result<PsuOutcome, PsuError> {
        self.advance(id, now);
        let p = self.payments.get_mut(id).ok_or(PsuError::NotFound)?;
        match p.status {
            TransactionStatus::Rcvd | TransactionStatus::Patc => {}
            TransactionStatus::Pdng
            | TransactionStatus::Actc
            | TransactionStatus::Accp
            | TransactionStatus::Acsp
            | TransactionStatus::Acwc
            | TransactionStatus::Acfc
            | TransactionStatus::Acsc
            | TransactionStatus::Part
            | TransactionStatus::Rjct
            | TransactionStatus::Canc
            | TransactionStatus::Accc
            | TransactionStatus::Acwp
            | TransactionStatus::Acis
            | TransactionStatus::Acpd
            | TransactionStatus::Blck
            | TransactionStatus::Cpuc
            | TransactionStatus::Pres => return Err(PsuError::Conflict(p.status.as_str())),
        }
        p.auto_at = None;
        Ok(PsuOutcome {
            payment_id: p.id.clone(),
            status: p.status.as_str(),
            redirect_url: None,
        })
    }

    /// DELETE by the TPP; the caller has checked the token.
    pub fn cancel(&mut self, id: &str, now: Instant) -> Result<&Payment, CancelError> {
        self.advance(id, now);
        let p = self.payments.get_mut(id).ok_or(CancelError::NotFound)?;
        if !p.cancellable(today()) {
            return Err(CancelError::NotAllowed(p.status.as_str()));
        }
        p.status = TransactionStatus::Canc;
        p.reason = Some("cancelled by the TPP".into());
        p.auto_at = None;
        for entry in &mut p.entries {
            entry.transaction_status = TransactionStatus::Canc.as_str();
        }
        self.counters.cancellations += 1;
        Ok(p)
    }

    /// Applies the transitions that were due by `now`, each at the instant it was due.
    /// Brings every payment from `iban` up to `now` (settlement is lazy, on read): the
    /// account's balance and history then show what has settled by now.
    pub fn advance_account(&mut self, iban: &str, now: Instant) {
        // In the order they were signed: the account books them in that order.
        let mut due: Vec<(Option<Instant>, Instant, String)> = self
            .payments
            .values()
            .filter(|p| p.debtor_iban.as_deref() == Some(iban))
            .filter(|p| p.status == TransactionStatus::Actc)
            .map(|p| (p.signed_at, p.created, p.id.clone()))
            .collect();
        due.sort();
        for (_, _, id) in due {
            self.advance(&id, now);
        }
    }

    fn advance(&mut self, id: &str, now: Instant) {
        let settings = self.settings;
        loop {
            let Some(p) = self.payments.get_mut(id) else {
                return;
            };
            match p.status {
                TransactionStatus::Rcvd => {
                    let expires = p.created + settings.sca_expiry;
                    // An orphan's automatic action waits while orphans are not signable (the
                    // mode may have been switched off since the answer was lost).
                    if let Some((at, action)) = p.auto_at
                        && at <= now
                        && at < expires
                        && (!p.orphaned || settings.orphans_signable)
                    {
                        p.auto_at = None;
                        // Automatic actions happen in the bank's channels: no TPP state.
                        let action = match action {
                            AutoAction::Sign => PsuAction::Sign {
                                psu: DEFAULT_PSU.into(),
                                partial: false,
                                state: None,
                            },
                            AutoAction::Reject => PsuAction::Reject {
                                psu: DEFAULT_PSU.into(),
                                state: None,
                            },
                        };
                        // Cannot conflict: the payment is RCVD.
                        let _ = self.apply(id, action, at);
                        continue;
                    }
                    if expires <= now {
                        p.status = TransactionStatus::Rjct;
                        p.reason = Some(format!(
                            "SCA not completed within {:?}",
                            settings.sca_expiry
                        ));
                        for entry in &mut p.entries {
                            entry.transaction_status = TransactionStatus::Rjct.as_str();
                        }
                    }
                    return;
                }
                TransactionStatus::Actc => {
                    let today = today();
                    match p.kind {
                        // [I] an active standing order stays ACTC; after its end date ACSC.
                        PaymentKind::Periodic => {
                            if p.schedule
                                .as_ref()
                                .and_then(|s| s.end_date)
                                .is_some_and(|end| end < today)
                            {
                                p.status = TransactionStatus::Acsc;
                            }
                        }
                        PaymentKind::Single | PaymentKind::Bulk => {
                            let settled = p
                                .signed_at
                                .is_some_and(|signed| signed + settings.settle_after <= now);
                            // [I] a future-dated payment waits for its execution date.
                            let due = p.requested_execution_date.is_none_or(|d| d <= today);
                            if settled && due {
                                settle(p);
                                book_settlement(&mut self.ledger, p, today);
                            }
                        }
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
                | TransactionStatus::Canc
                | TransactionStatus::Accc
                | TransactionStatus::Acwp
                | TransactionStatus::Acis
                | TransactionStatus::Acpd
                | TransactionStatus::Blck
                | TransactionStatus::Cpuc
                | TransactionStatus::Pres => return,
            }
        }
    }

    fn apply(&mut self, id: &str, action: PsuAction, at: Instant) -> Result<PsuOutcome, PsuError> {
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
            | TransactionStatus::Canc
            | TransactionStatus::Accc
            | TransactionStatus::Acwp
            | TransactionStatus::Acis
            | TransactionStatus::Acpd
            | TransactionStatus::Blck
            | TransactionStatus::Cpuc
            | TransactionStatus::Pres => return Err(PsuError::Conflict(p.status.as_str())),
        };
        p.auto_at = None;
        let redirect = match action {
            PsuAction::Sign {
                psu,
                partial,
                state,
            } => {
                if first_signer && p.orphaned {
                    self.counters.orphans_signed += 1;
                }
                if first_signer && p.psu.is_none() {
                    // The code issued now is bound to this PSU: its tokens are this PSU's.
                    p.psu = Some(psu);
                }
                // The signer holds the debtor account: AIS consents list it.
                if let (true, Some(debtor), Some(owner)) =
                    (first_signer, p.debtor_iban.as_deref(), p.psu.as_deref())
                {
                    self.ledger.claim(debtor, owner);
                }
                if (first_signer && p.scenario.multi_sign) || partial {
                    p.status = TransactionStatus::Patc;
                } else {
                    p.status = TransactionStatus::Actc;
                    p.signed_at = Some(at);
                }
                // Only the first signer comes through the TPP redirect [P FAQ multi-signature];
                // a code is issued only when no access token was given [P flows].
                match (first_signer, &p.challenge) {
                    (false, _) => None,
                    (true, None) => Some(redirect_url(&p.redirect_uri, &[], state.as_ref())),
                    (true, Some(challenge)) => {
                        let code = random_secret();
                        self.codes.insert(
                            digest(code.expose_secret()),
                            IssuedCode {
                                payment_id: p.id.clone(),
                                scope: Scope::Pis,
                                accounts: Vec::new(),
                                brand: p.brand,
                                psu: p.psu.clone().unwrap_or_else(|| DEFAULT_PSU.into()),
                                redirect_uri: p.redirect_uri.clone(),
                                challenge: challenge.clone(),
                                issued: at,
                                used: false,
                                grant: None,
                            },
                        );
                        Some(redirect_url(
                            &p.redirect_uri,
                            &[("code", code.expose_secret())],
                            state.as_ref(),
                        ))
                    }
                }
            }
            PsuAction::Reject { psu, state } => {
                p.status = TransactionStatus::Rjct;
                p.reason = Some("PSU refused".into());
                for entry in &mut p.entries {
                    entry.transaction_status = TransactionStatus::Rjct.as_str();
                }
                tracing::debug!(payment_id = p.id, psu, "PSU refused");
                first_signer.then(|| {
                    redirect_url(
                        &p.redirect_uri,
                        &[
                            ("error", "access_denied"),
                            ("error_description", "PSU refused"),
                        ],
                        state.as_ref(),
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

    /// `grant_type=authorization_code` at the /token of `brand`'s host. A failed attempt does
    /// not burn the code [I]: the verifier cannot be guessed (RFC 7636 §7.1), so a TPP that
    /// sent the wrong one may retry with the right one until the code expires. A successful
    /// one does (single use, RFC 6749 §4.1.2), and presenting the code again revokes the pair
    /// it issued (the same section's SHOULD): someone else may hold the code.
    pub fn redeem_code(
        &mut self,
        code: &str,
        verifier: &str,
        redirect_uri: &str,
        brand: Brand,
        now: Instant,
    ) -> Result<IssuedPair, GrantError> {
        let entry = self
            .codes
            .get_mut(&digest(code))
            // The other brand's host never issued it.
            .filter(|entry| entry.brand == brand)
            .ok_or(GrantError::UnknownCode)?;
        if entry.used {
            if let Some(grant) = entry.grant.take() {
                let key = (entry.brand, entry.psu.clone(), entry.scope);
                self.revoke_grant(key, grant);
            }
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
        let psu = entry.psu.clone();
        let (scope, accounts) = (entry.scope, entry.accounts.clone());
        self.grants += 1;
        let grant = self.grants;
        entry.grant = Some(grant);
        Ok(self.issue_pair(
            brand,
            &psu,
            Grant {
                id: grant,
                scope,
                accounts,
            },
            now,
        ))
    }

    /// Forgets the PSU's live pair if it descends from `grant`: from now on it is unknown,
    /// wherever presented. Pairs it replaced stay known as replaced.
    fn revoke_grant(&mut self, key: (Brand, String, Scope), grant: u64) {
        let Some(live) = self.live.get(&key) else {
            return;
        };
        if !live
            .iter()
            .any(|d| self.tokens.get(d).is_some_and(|t| t.grant == grant))
        {
            return;
        }
        for token in self.live.remove(&key).unwrap_or_default() {
            self.tokens.remove(&token);
        }
        tracing::info!("sandbox: authorization code replayed; the pair it granted is revoked");
    }

    /// `grant_type=refresh_token` at the /token of `brand`'s host: only the PSU's current,
    /// unexpired refresh token of that brand works, and it is replaced together with the
    /// access token [P docs/belfius-facts.md §3.2].
    pub fn refresh(
        &mut self,
        refresh_token: &str,
        brand: Brand,
        now: Instant,
    ) -> Result<IssuedPair, GrantError> {
        let (psu, grant) = match self.tokens.get_mut(&digest(refresh_token)) {
            Some(t) if t.kind != TokenKind::Refresh || t.brand != brand => {
                return Err(GrantError::InvalidRefreshToken);
            }
            Some(t) if t.invalidated => {
                count_invalidated_use(&mut self.counters, t);
                return Err(GrantError::InvalidRefreshToken);
            }
            Some(t) if t.expires.is_some_and(|expires| now >= expires) => {
                return Err(GrantError::RefreshTokenExpired);
            }
            Some(t) => (
                t.psu.clone(),
                Grant {
                    id: t.grant,
                    scope: t.scope,
                    accounts: t.accounts.clone(),
                },
            ),
            None => return Err(GrantError::InvalidRefreshToken),
        };
        self.counters.refreshes += 1;
        Ok(self.issue_pair(brand, &psu, grant, now))
    }

    /// ONE pair per (PSU, scope) [P docs/belfius-facts.md §3.2] and brand: issuing
    /// invalidates the PSU's previous pair of that scope at that brand.
    fn issue_pair(&mut self, brand: Brand, psu: &str, grant: Grant, now: Instant) -> IssuedPair {
        let key = (brand, psu.to_owned(), grant.scope);
        for old in self.live.remove(&key).unwrap_or_default() {
            if let Some(token) = self.tokens.get_mut(&old) {
                token.invalidated = true;
            }
        }
        let lifetime = self.settings.access_token_lifetime;
        let access_token = random_secret();
        let refresh_token = random_secret();
        let access = digest(access_token.expose_secret());
        let refresh = digest(refresh_token.expose_secret());
        for (digest, kind, expires) in [
            (access, TokenKind::Access, now + lifetime),
            (
                refresh,
                TokenKind::Refresh,
                now + self.settings.refresh_token_lifetime,
            ),
        ] {
            self.tokens.insert(
                digest,
                IssuedToken {
                    kind,
                    scope: grant.scope,
                    accounts: grant.accounts.clone(),
                    brand,
                    grant: grant.id,
                    psu: psu.to_owned(),
                    expires: Some(expires),
                    invalidated: false,
                    invalid_uses: 0,
                },
            );
        }
        self.live.insert(key, HashSet::from([access, refresh]));
        self.counters.tokens_issued += 1;
        IssuedPair {
            access_token,
            refresh_token,
            expires_in: lifetime,
            scope: grant.scope,
        }
    }

    /// Checks an access token of `scope` presented on `brand`'s host; a replaced one is
    /// counted (it reveals a TPP that lost track of its single pair). The other brand's
    /// tokens, and tokens of another scope, are unknown here.
    pub fn check_access_token(
        &mut self,
        token: &str,
        brand: Brand,
        scope: Scope,
        now: Instant,
    ) -> TokenCheck {
        let check = match self.tokens.get(&digest(token)) {
            Some(t) if t.kind != TokenKind::Access || t.brand != brand || t.scope != scope => {
                TokenCheck::Unknown
            }
            Some(t) if t.invalidated => TokenCheck::Invalidated,
            Some(t) if t.expires.is_some_and(|expires| now >= expires) => TokenCheck::Expired,
            Some(t) => TokenCheck::Valid {
                psu: t.psu.clone(),
                accounts: t.accounts.clone(),
            },
            None => TokenCheck::Unknown,
        };
        if check == TokenCheck::Invalidated {
            if let Some(t) = self.tokens.get_mut(&digest(token)) {
                count_invalidated_use(&mut self.counters, t);
            }
        }
        check
    }
}

/// The code redemption a pair descends from, and what it grants.
struct Grant {
    id: u64,
    scope: Scope,
    accounts: Vec<String>,
}

fn count_invalidated_use(counters: &mut Counters, token: &mut IssuedToken) {
    counters.invalidated_token_uses += 1;
    if token.invalid_uses > 0 {
        counters.invalidated_token_reuses += 1;
    }
    token.invalid_uses += 1;
}

/// Books what settled on the debtor account, when the payment names one (the ledger of
/// `super::ledger`): a single payment as one debit, a bulk as one per executed transfer.
fn book_settlement(ledger: &mut super::ledger::Ledger, p: &Payment, today: NaiveDate) {
    let Some(debtor) = p.debtor_iban.as_deref() else {
        return;
    };
    let remittance = p
        .request
        .get("remittance_information")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let execution_date = p.requested_execution_date.unwrap_or(today);
    match p.kind {
        PaymentKind::Single => {
            ledger.book_debit(
                debtor,
                super::ledger::Debit {
                    amount: p.amount,
                    currency: p.currency.clone(),
                    creditor_name: p.creditor_name.clone(),
                    creditor_account: p.creditor_account.clone(),
                    end_to_end_id: p.e2e.clone(),
                    remittance,
                    execution_date,
                    payment_id: p.id.clone(),
                },
            );
        }
        PaymentKind::Bulk => {
            for entry in &p.entries {
                if entry.transaction_status != TransactionStatus::Acsc.as_str() {
                    continue;
                }
                let Ok(amount) = Amount::parse(&entry.amount) else {
                    continue;
                };
                ledger.book_debit(
                    debtor,
                    super::ledger::Debit {
                        amount,
                        currency: entry.currency.clone(),
                        creditor_name: entry.creditor_name.clone(),
                        creditor_account: entry.creditor_iban.clone(),
                        end_to_end_id: entry.endtoend_identification.clone(),
                        remittance: None,
                        execution_date,
                        payment_id: p.id.clone(),
                    },
                );
            }
        }
        // A standing order books nothing in the simulator: its executions are not modelled.
        PaymentKind::Periodic => {}
    }
}

/// ACTC -> ACSC, or PART for a bulk with rejected transfers (scenario `REJECT-ENTRY`).
fn settle(p: &mut Payment) {
    let mut rejected = 0;
    for entry in &mut p.entries {
        entry.transaction_status = if entry.reject {
            rejected += 1;
            TransactionStatus::Rjct.as_str()
        } else {
            TransactionStatus::Acsc.as_str()
        };
    }
    if rejected == 0 {
        p.status = TransactionStatus::Acsc;
    } else if rejected == p.entries.len() {
        p.status = TransactionStatus::Rjct;
        p.reason = Some("every transfer of the bulk was rejected".into());
    } else {
        p.status = TransactionStatus::Part;
        p.reason = Some(format!(
            "{rejected} of {} transfers rejected",
            p.entries.len()
        ));
    }
}

/// `base?k=v&...[&state=S]` with proper query encoding; keeps the TPP's own query parameters.
/// `state` is the TPP's, echoed only when the PSU came with one: the bank cannot invent it.
/// An unparsable base is kept verbatim with the parameters appended (it was validated at
/// initiation, so this does not happen).
fn redirect_url(base: &str, params: &[(&str, &str)], state: Option<&ScaState>) -> String {
    let state = state.map(|s| ("state", s.as_str()));
    let params: Vec<(&str, &str)> = params.iter().copied().chain(state).collect();
    // `query_pairs_mut` would leave a bare `?` behind.
    if params.is_empty() {
        return base.to_owned();
    }
    match url::Url::parse(base) {
        Ok(mut url) => {
            url.query_pairs_mut().extend_pairs(params);
            url.to_string()
        }
        Err(_) => {
            let query = serde_urlencoded::to_string(&params).unwrap_or_default();
            format!("{base}?{query}")
        }
    }
}

/// The operator's patch of [`Settings`] (`POST /admin/config`); absent fields stay as they are.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsPatch {
    /// 0 switches global auto-signing off.
    pub auto_sign_after_ms: Option<u64>,
    pub settle_after_ms: Option<u64>,
    pub sca_expiry_ms: Option<u64>,
    pub access_token_lifetime_secs: Option<u64>,
    pub refresh_token_lifetime_secs: Option<u64>,
    pub verify_signatures: Option<bool>,
    pub cancel_status: Option<u16>,
    pub orphans_signable: Option<bool>,
    /// Rotates the client secret: from then on /token accepts only this one. Kept as a digest
    /// outside [`Settings`] (`Shared`); never shown back, Debug prints it redacted.
    pub client_secret: Option<SecretString>,
}

/// JSON view of [`Settings`]. The client secret is not a setting shown here.
#[derive(Debug, Clone, Serialize)]
pub struct SettingsView {
    pub auto_sign_after_ms: Option<u64>,
    pub settle_after_ms: u64,
    pub sca_expiry_ms: u64,
    pub access_token_lifetime_secs: u64,
    pub refresh_token_lifetime_secs: u64,
    pub verify_signatures: bool,
    pub cancel_status: u16,
    pub orphans_signable: bool,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Settings {
    pub fn view(&self) -> SettingsView {
        SettingsView {
            auto_sign_after_ms: self.auto_sign_after.map(millis),
            settle_after_ms: millis(self.settle_after),
            sca_expiry_ms: millis(self.sca_expiry),
            access_token_lifetime_secs: self.access_token_lifetime.as_secs(),
            refresh_token_lifetime_secs: self.refresh_token_lifetime.as_secs(),
            verify_signatures: self.verify_signatures,
            cancel_status: self.cancel_status,
            orphans_signable: self.orphans_signable,
        }
    }

    /// The patched settings, or why they are refused (the patch's client secret included:
    /// the caller applies it only when this succeeds).
    pub fn patched(&self, patch: &SettingsPatch) -> Result<Self, String> {
        let mut next = *self;
        if let Some(ms) = patch.auto_sign_after_ms {
            next.auto_sign_after = (ms > 0).then(|| Duration::from_millis(ms));
        }
        if let Some(ms) = patch.settle_after_ms {
            next.settle_after = Duration::from_millis(ms);
        }
        if let Some(ms) = patch.sca_expiry_ms {
            next.sca_expiry = Duration::from_millis(ms);
        }
        if let Some(secs) = patch.access_token_lifetime_secs {
            next.access_token_lifetime = Duration::from_secs(secs);
        }
        if let Some(secs) = patch.refresh_token_lifetime_secs {
            next.refresh_token_lifetime = Duration::from_secs(secs);
        }
        if let Some(verify) = patch.verify_signatures {
            next.verify_signatures = verify;
        }
        if let Some(status) = patch.cancel_status {
            if !matches!(status, 200 | 202 | 204) {
                return Err(format!(
                    "cancel_status must be 200, 202 or 204, not {status}"
                ));
            }
            next.cancel_status = status;
        }
        if let Some(signable) = patch.orphans_signable {
            next.orphans_signable = signable;
        }
        if patch
            .client_secret
            .as_ref()
            .is_some_and(|secret| secret.expose_secret().is_empty())
        {
            return Err("client_secret must not be empty".into());
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: Settings = Settings {
        auto_sign_after: None,
        settle_after: Duration::from_secs(2),
        sca_expiry: Duration::from_secs(900),
        access_token_lifetime: DEFAULT_ACCESS_TOKEN_LIFETIME,
        refresh_token_lifetime: DEFAULT_REFRESH_TOKEN_LIFETIME,
        verify_signatures: false,
        cancel_status: 204,
        orphans_signable: false,
    };
    const VERIFIER: &str = "verifier-verifier-verifier-verifier-verifier";
    const REDIRECT: &str = "https://tpp.example/cb?x=1";

    fn new_payment(e2e: &str, scenario: Scenario) -> NewPayment {
        NewPayment {
            kind: PaymentKind::Single,
            brand: Brand::Belfius,
            product: PaymentProduct::SepaCreditTransfers,
            e2e: e2e.into(),
            amount: Amount::from_minor(100),
            currency: "EUR".into(),
            creditor_name: "ACME".into(),
            creditor_account: "BE71096123456769".into(),
            debtor_iban: None,
            requested_execution_date: None,
            schedule: None,
            entries: Vec::new(),
            redirect_uri: REDIRECT.into(),
            challenge: Some(Challenge {
                value: challenge_for(VERIFIER),
                method: ChallengeMethod::S256,
            }),
            psu: None,
            scenario,
            request: serde_json::json!({}),
        }
    }

    fn sign(psu: &str) -> PsuAction {
        PsuAction::Sign {
            psu: psu.into(),
            partial: false,
            state: None,
        }
    }

    fn state(text: &str) -> ScaState {
        ScaState::parse(text).unwrap()
    }

    fn query_of(redirect: &str, key: &str) -> Vec<String> {
        url::Url::parse(redirect)
            .unwrap()
            .query_pairs()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
            .collect()
    }

    fn code_of(redirect: &str) -> String {
        let url = url::Url::parse(redirect).unwrap();
        url.query_pairs()
            .find(|(k, _)| k == "code")
            .map(|(_, v)| v.into_owned())
            .unwrap()
    }

    /// A signed payment of `psu` and the token pair from its code.
    fn pair_for(store: &mut Store, e2e: &str, psu: &str, t0: Instant) -> IssuedPair {
        let id = store
            .insert_payment(new_payment(e2e, Scenario::default()), t0)
            .id
            .clone();
        let code = code_of(&store.act(&id, sign(psu), t0).unwrap().redirect_url.unwrap());
        store
            .redeem_code(&code, VERIFIER, REDIRECT, Brand::Belfius, t0)
            .unwrap()
    }

    #[test]
    fn sign_settles_lazily_and_code_is_single_use() {
        let t0 = Instant::now();
        let mut store = Store::new(SETTINGS);
        let id = store
            .insert_payment(new_payment("E1", Scenario::default()), t0)
            .id
            .clone();
        let out = store.act(&id, sign("alice"), t0).unwrap();
        assert_eq!(out.status, "ACTC");
        let redirect = out.redirect_url.unwrap();
        assert!(
            redirect.starts_with("https://tpp.example/cb?x=1&code="),
            "{redirect}"
        );
        // No state came with the PSU: the bank invents none.
        assert!(query_of(&redirect, "state").is_empty(), "{redirect}");
        assert_eq!(
            store.payment(&id, t0).unwrap().psu.as_deref(),
            Some("alice")
        );
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
        assert_eq!(
            store
                .redeem_code(&code, "wrong", REDIRECT, Brand::Belfius, t0)
                .err(),
            Some(GrantError::VerifierMismatch)
        );
        assert_eq!(
            store
                .redeem_code(
                    &code,
                    VERIFIER,
                    "https://tpp.example/other",
                    Brand::Belfius,
                    t0
                )
                .err(),
            Some(GrantError::RedirectMismatch)
        );
        let pair = store
            .redeem_code(&code, VERIFIER, REDIRECT, Brand::Belfius, t0)
            .unwrap();
        assert_eq!(
            store.check_access_token(
                pair.access_token.expose_secret(),
                Brand::Belfius,
                Scope::Pis,
                t0
            ),
            TokenCheck::Valid {
                accounts: Vec::new(),
                psu: "alice".into()
            }
        );
        assert_eq!(
            store
                .redeem_code(&code, VERIFIER, REDIRECT, Brand::Belfius, t0)
                .err(),
            Some(GrantError::CodeUsed)
        );
        assert_eq!(
            store.act(&id, sign("alice"), t0).err(),
            Some(PsuError::Conflict("ACSC"))
        );
    }

    #[test]
    fn one_pair_per_psu() {
        let t0 = Instant::now();
        let mut store = Store::new(SETTINGS);
        let first = pair_for(&mut store, "E1", "alice", t0);
        let bob = pair_for(&mut store, "E2", "bob", t0);
        // A second code exchange for alice replaces her first pair, not bob's.
        let second = pair_for(&mut store, "E3", "alice", t0);
        assert_eq!(
            store.check_access_token(
                first.access_token.expose_secret(),
                Brand::Belfius,
                Scope::Pis,
                t0
            ),
            TokenCheck::Invalidated
        );
        assert!(matches!(
            store.check_access_token(
                bob.access_token.expose_secret(),
                Brand::Belfius,
                Scope::Pis,
                t0
            ),
            TokenCheck::Valid { .. }
        ));
        assert_eq!(
            store
                .refresh(first.refresh_token.expose_secret(), Brand::Belfius, t0)
                .err(),
            Some(GrantError::InvalidRefreshToken)
        );
        assert_eq!(store.counters.invalidated_token_uses, 2);
        // Each was presented once: learning from a 401 is not a reuse; ignoring it is.
        assert_eq!(store.counters.invalidated_token_reuses, 0);
        assert_eq!(
            store.check_access_token(
                first.access_token.expose_secret(),
                Brand::Belfius,
                Scope::Pis,
                t0
            ),
            TokenCheck::Invalidated
        );
        assert_eq!(store.counters.invalidated_token_uses, 3);
        assert_eq!(store.counters.invalidated_token_reuses, 1);

        let third = store
            .refresh(second.refresh_token.expose_secret(), Brand::Belfius, t0)
            .unwrap();
        assert_eq!(store.counters.refreshes, 1);
        assert_eq!(
            store.check_access_token(
                second.access_token.expose_secret(),
                Brand::Belfius,
                Scope::Pis,
                t0
            ),
            TokenCheck::Invalidated
        );
        assert_eq!(
            store.check_access_token(
                third.access_token.expose_secret(),
                Brand::Belfius,
                Scope::Pis,
                t0
            ),
            TokenCheck::Valid {
                accounts: Vec::new(),
                psu: "alice".into()
            }
        );
        // An access token is not a refresh token, and tokens expire.
        assert!(
            store
                .refresh(third.access_token.expose_secret(), Brand::Belfius, t0)
                .is_err()
        );
        assert_eq!(
            store.check_access_token(
                third.access_token.expose_secret(),
                Brand::Belfius,
                Scope::Pis,
                t0 + DEFAULT_ACCESS_TOKEN_LIFETIME
            ),
            TokenCheck::Expired
        );
        assert_eq!(
            store.check_access_token("nonsense", Brand::Belfius, Scope::Pis, t0),
            TokenCheck::Unknown
        );
        assert_eq!(store.counters.invalidated_token_uses, 4);
        assert_eq!(store.counters.invalidated_token_reuses, 1);
    }

    #[test]
    fn a_code_and_its_pair_belong_to_the_brand_host_of_the_payment() {
        let t0 = Instant::now();
        let mut store = Store::new(SETTINGS);
        let mut banx = new_payment("X1", Scenario::default());
        banx.brand = Brand::Banx;
        let id = store.insert_payment(banx, t0).id.clone();
        let code = code_of(
            &store
                .act(&id, sign("alice"), t0)
                .unwrap()
                .redirect_url
                .unwrap(),
        );
        // The Belfius host never issued this code; asking there does not burn it.
        assert_eq!(
            store
                .redeem_code(&code, VERIFIER, REDIRECT, Brand::Belfius, t0)
                .err(),
            Some(GrantError::UnknownCode)
        );
        let banx_pair = store
            .redeem_code(&code, VERIFIER, REDIRECT, Brand::Banx, t0)
            .unwrap();
        let access = banx_pair.access_token.expose_secret();
        let refresh = banx_pair.refresh_token.expose_secret();
        assert_eq!(
            store.check_access_token(access, Brand::Belfius, Scope::Pis, t0),
            TokenCheck::Unknown
        );
        assert_eq!(
            store.refresh(refresh, Brand::Belfius, t0).err(),
            Some(GrantError::InvalidRefreshToken)
        );
        assert_eq!(
            store.check_access_token(access, Brand::Banx, Scope::Pis, t0),
            TokenCheck::Valid {
                accounts: Vec::new(),
                psu: "alice".into()
            }
        );
        // alice's Belfius pair lives next to her Banx pair: one pair per PSU and brand.
        let belfius_pair = pair_for(&mut store, "B1", "alice", t0);
        assert!(matches!(
            store.check_access_token(access, Brand::Banx, Scope::Pis, t0),
            TokenCheck::Valid { .. }
        ));
        assert!(matches!(
            store.check_access_token(
                belfius_pair.access_token.expose_secret(),
                Brand::Belfius,
                Scope::Pis,
                t0
            ),
            TokenCheck::Valid { .. }
        ));
        // The refused presentations on the wrong host were not "replaced token" uses.
        assert_eq!(store.counters.invalidated_token_uses, 0);
    }

    #[test]
    fn refresh_tokens_expire() {
        let t0 = Instant::now();
        let lifetime = Duration::from_secs(60);
        let mut store = Store::new(Settings {
            refresh_token_lifetime: lifetime,
            ..SETTINGS
        });
        let pair = pair_for(&mut store, "E1", "alice", t0);
        let just_before = t0 + lifetime - Duration::from_millis(1);
        let next = store
            .refresh(
                pair.refresh_token.expose_secret(),
                Brand::Belfius,
                just_before,
            )
            .unwrap();
        // The new refresh token gets a full lifetime of its own.
        assert_eq!(
            store
                .refresh(
                    next.refresh_token.expose_secret(),
                    Brand::Belfius,
                    just_before + lifetime
                )
                .err(),
            Some(GrantError::RefreshTokenExpired)
        );
        assert_eq!(store.counters.refreshes, 1);
        assert_eq!(store.counters.invalidated_token_uses, 0);
    }

    #[test]
    fn a_replayed_code_revokes_the_pair_it_issued() {
        let t0 = Instant::now();
        let mut store = Store::new(SETTINGS);
        let id = store
            .insert_payment(new_payment("E1", Scenario::default()), t0)
            .id
            .clone();
        let code = code_of(
            &store
                .act(&id, sign("alice"), t0)
                .unwrap()
                .redirect_url
                .unwrap(),
        );
        let pair = store
            .redeem_code(&code, VERIFIER, REDIRECT, Brand::Belfius, t0)
            .unwrap();
        assert_eq!(
            store
                .redeem_code(&code, VERIFIER, REDIRECT, Brand::Belfius, t0)
                .err(),
            Some(GrantError::CodeUsed)
        );
        assert_eq!(
            store.check_access_token(
                pair.access_token.expose_secret(),
                Brand::Belfius,
                Scope::Pis,
                t0
            ),
            TokenCheck::Unknown
        );
        assert_eq!(
            store
                .refresh(pair.refresh_token.expose_secret(), Brand::Belfius, t0)
                .err(),
            Some(GrantError::InvalidRefreshToken)
        );
        // The grant's live pair goes even after a refresh; the pair that refresh replaced stays
        // known as replaced.
        let id = store
            .insert_payment(new_payment("E2", Scenario::default()), t0)
            .id
            .clone();
        let code = code_of(
            &store
                .act(&id, sign("bob"), t0)
                .unwrap()
                .redirect_url
                .unwrap(),
        );
        let first = store
            .redeem_code(&code, VERIFIER, REDIRECT, Brand::Belfius, t0)
            .unwrap();
        let second = store
            .refresh(first.refresh_token.expose_secret(), Brand::Belfius, t0)
            .unwrap();
        assert!(
            store
                .redeem_code(&code, VERIFIER, REDIRECT, Brand::Belfius, t0)
                .is_err()
        );
        assert_eq!(
            store.check_access_token(
                second.access_token.expose_secret(),
                Brand::Belfius,
                Scope::Pis,
                t0
            ),
            TokenCheck::Unknown
        );
        assert_eq!(
            store.check_access_token(
                first.access_token.expose_secret(),
                Brand::Belfius,
                Scope::Pis,
                t0
            ),
            TokenCheck::Invalidated
        );
        // A later code exchange of the same PSU is a new grant: a replay of the old code does
        // not reach it.
        let id = store
            .insert_payment(new_payment("E3", Scenario::default()), t0)
            .id
            .clone();
        let old_code = code_of(
            &store
                .act(&id, sign("carol"), t0)
                .unwrap()
                .redirect_url
                .unwrap(),
        );
        store
            .redeem_code(&old_code, VERIFIER, REDIRECT, Brand::Belfius, t0)
            .unwrap();
        let newer = pair_for(&mut store, "E4", "carol", t0);
        assert_eq!(
            store
                .redeem_code(&old_code, VERIFIER, REDIRECT, Brand::Belfius, t0)
                .err(),
            Some(GrantError::CodeUsed)
        );
        assert!(matches!(
            store.check_access_token(
                newer.access_token.expose_secret(),
                Brand::Belfius,
                Scope::Pis,
                t0
            ),
            TokenCheck::Valid { .. }
        ));
    }

    #[test]
    fn unsigned_payment_expires_and_auto_actions_happen_when_due() {
        let t0 = Instant::now();
        let mut store = Store::new(Settings {
            sca_expiry: Duration::from_secs(10),
            ..SETTINGS
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
    fn abandon_cancels_the_automatic_signature_and_lets_the_payment_expire() {
        let t0 = Instant::now();
        let mut store = Store::new(Settings {
            auto_sign_after: Some(Duration::from_secs(1)),
            sca_expiry: Duration::from_secs(5),
            ..SETTINGS
        });
        let id = store
            .insert_payment(new_payment("E1", Scenario::default()), t0)
            .id
            .clone();
        assert_eq!(store.abandon(&id, t0).unwrap().status, "RCVD");
        let p = store.payment(&id, t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(p.status, TransactionStatus::Rcvd);
        // The expiry is read at the time of the check: the operator may shorten it.
        store.settings.sca_expiry = Duration::from_secs(3);
        let p = store.payment(&id, t0 + Duration::from_secs(3)).unwrap();
        assert_eq!(p.status, TransactionStatus::Rjct);
        assert_eq!(
            store.abandon(&id, t0).err(),
            Some(PsuError::Conflict("RJCT"))
        );
    }

    #[test]
    fn global_auto_sign_signs_then_settles() {
        let t0 = Instant::now();
        let mut store = Store::new(Settings {
            auto_sign_after: Some(Duration::from_secs(3)),
            ..SETTINGS
        });
        let id = store
            .insert_payment(new_payment("E1", Scenario::default()), t0)
            .id
            .clone();
        let p = store.payment(&id, t0 + Duration::from_secs(3)).unwrap();
        assert_eq!(p.status, TransactionStatus::Actc);
        assert_eq!(p.psu.as_deref(), Some(DEFAULT_PSU));
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
        let mut store = Store::new(SETTINGS);
        let multi = Scenario {
            multi_sign: true,
            ..Scenario::default()
        };
        let id = store
            .insert_payment(new_payment("E1", multi), t0)
            .id
            .clone();
        let first = store.act(&id, sign("a"), t0).unwrap();
        assert_eq!(first.status, "PATC");
        assert!(first.redirect_url.is_some());
        let second = store.act(&id, sign("b"), t0).unwrap();
        assert_eq!(second.status, "ACTC");
        assert!(second.redirect_url.is_none());
        // The payment belongs to the first signer, whose code the TPP received.
        assert_eq!(store.payment(&id, t0).unwrap().psu.as_deref(), Some("a"));
    }

    #[test]
    fn partial_signatures_without_the_scenario() {
        let t0 = Instant::now();
        let mut store = Store::new(SETTINGS);
        let id = store
            .insert_payment(new_payment("E1", Scenario::default()), t0)
            .id
            .clone();
        let partial = |psu: &str| PsuAction::Sign {
            psu: psu.into(),
            partial: true,
            state: None,
        };
        let first = store.act(&id, partial("a"), t0).unwrap();
        assert_eq!((first.status, first.redirect_url.is_some()), ("PATC", true));
        let second = store.act(&id, partial("b"), t0).unwrap();
        assert_eq!(
            (second.status, second.redirect_url.is_some()),
            ("PATC", false)
        );
        assert_eq!(store.act(&id, sign("c"), t0).unwrap().status, "ACTC");
    }

    #[test]
    fn cancellation_rules() {
        let t0 = Instant::now();
        let mut store = Store::new(SETTINGS);
        let tomorrow = today().succ_opt().unwrap();

        let unsigned = store
            .insert_payment(new_payment("U", Scenario::default()), t0)
            .id
            .clone();
        assert_eq!(
            store.cancel(&unsigned, t0).unwrap().status,
            TransactionStatus::Canc
        );
        assert_eq!(
            store.cancel(&unsigned, t0).err(),
            Some(CancelError::NotAllowed("CANC"))
        );

        let signed = store
            .insert_payment(new_payment("S", Scenario::default()), t0)
            .id
            .clone();
        store.act(&signed, sign("a"), t0).unwrap();
        assert_eq!(
            store.cancel(&signed, t0).err(),
            Some(CancelError::NotAllowed("ACTC"))
        );

        let mut dated = new_payment("D", Scenario::default());
        dated.requested_execution_date = Some(tomorrow);
        let dated = store.insert_payment(dated, t0).id.clone();
        store.act(&dated, sign("a"), t0).unwrap();
        // Not settled while the execution date is ahead, and still cancellable.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            store.payment(&dated, later).unwrap().status,
            TransactionStatus::Actc
        );
        assert!(store.cancel(&dated, later).is_ok());

        let mut standing = new_payment("P", Scenario::default());
        standing.kind = PaymentKind::Periodic;
        standing.schedule = Some(Schedule::new(tomorrow, None, Frequency::Monthly, None));
        let standing = store.insert_payment(standing, t0).id.clone();
        store.act(&standing, sign("a"), t0).unwrap();
        assert_eq!(
            store.payment(&standing, later).unwrap().status,
            TransactionStatus::Actc
        );
        assert!(store.cancel(&standing, later).is_ok());
        assert_eq!(store.cancel("nope", t0).err(), Some(CancelError::NotFound));
        assert_eq!(store.counters.cancellations, 3);
    }

    #[test]
    fn standing_order_past_its_end_date_is_completed() {
        let t0 = Instant::now();
        let mut store = Store::new(SETTINGS);
        let mut standing = new_payment("P", Scenario::default());
        standing.kind = PaymentKind::Periodic;
        let yesterday = today().pred_opt().unwrap();
        standing.schedule = Some(Schedule::new(
            yesterday,
            Some(yesterday),
            Frequency::Monthly,
            None,
        ));
        let id = store.insert_payment(standing, t0).id.clone();
        store.act(&id, sign("a"), t0).unwrap();
        assert_eq!(
            store.payment(&id, t0).unwrap().status,
            TransactionStatus::Acsc
        );
    }

    #[test]
    fn bulk_with_rejected_entries_ends_part() {
        let t0 = Instant::now();
        let mut store = Store::new(SETTINGS);
        let line = |e2e: &str, reject: bool| BulkLine {
            endtoend_identification: e2e.into(),
            amount: "1.00".into(),
            currency: "EUR".into(),
            creditor_name: "X".into(),
            creditor_iban: "BE71096123456769".into(),
            transaction_status: "RCVD",
            reject,
        };
        let mut bulk = new_payment("B-1", Scenario::default());
        bulk.kind = PaymentKind::Bulk;
        bulk.entries = vec![line("B-1", false), line("B-2", true)];
        let id = store.insert_payment(bulk, t0).id.clone();
        assert_eq!(store.latest_by_e2e("B-2").as_deref(), Some(id.as_str()));
        store.act(&id, sign("a"), t0).unwrap();
        let p = store.payment(&id, t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(p.status, TransactionStatus::Part);
        let statuses: Vec<_> = p.entries.iter().map(|e| e.transaction_status).collect();
        assert_eq!(statuses, ["ACSC", "RJCT"]);
        assert_eq!(store.counters.bulk_initiations.get("B-1"), Some(&1));
        assert!(store.counters.initiations_by_e2e.is_empty());
    }

    #[test]
    fn counters_and_latest_by_e2e() {
        let t0 = Instant::now();
        let mut store = Store::new(SETTINGS);
        let a1 = store
            .insert_payment(new_payment("A", Scenario::default()), t0)
            .id
            .clone();
        let a2 = store
            .insert_payment(new_payment("A", Scenario::default()), t0)
            .id
            .clone();
        let mut with_token = new_payment("B", Scenario::default());
        with_token.challenge = None;
        with_token.psu = Some("alice".into());
        store.insert_payment(with_token, t0);
        assert_ne!(a1, a2);
        assert_eq!(store.latest_by_e2e("A"), Some(a2));
        assert_eq!(store.latest_by_e2e("C"), None);
        assert_eq!(store.counters.initiations, 3);
        assert_eq!(
            store.counters.initiations_by_auth,
            AuthCounts {
                pkce: 2,
                bearer: 1,
                fallback_session: 0
            }
        );
        assert_eq!(store.counters.initiations_by_e2e.get("A"), Some(&2));
        store.settings.sca_expiry = Duration::from_secs(1);
        store.reset();
        assert_eq!(store.counters.initiations, 0);
        assert!(store.payments(t0).is_empty());
        assert_eq!(store.settings.sca_expiry, Duration::from_secs(1));
    }

    #[test]
    fn settings_patch() {
        let patched = SETTINGS
            .patched(&SettingsPatch {
                auto_sign_after_ms: Some(0),
                sca_expiry_ms: Some(1500),
                cancel_status: Some(202),
                ..SettingsPatch::default()
            })
            .unwrap();
        assert_eq!(patched.sca_expiry, Duration::from_millis(1500));
        assert_eq!(patched.auto_sign_after, None);
        assert_eq!(patched.cancel_status, 202);
        assert!(
            SETTINGS
                .patched(&SettingsPatch {
                    cancel_status: Some(201),
                    ..SettingsPatch::default()
                })
                .is_err()
        );
        assert!(
            SETTINGS
                .patched(&SettingsPatch {
                    orphans_signable: Some(true),
                    ..SettingsPatch::default()
                })
                .unwrap()
                .orphans_signable
        );
        assert!(SETTINGS.view().orphans_signable == SETTINGS.orphans_signable);
        let empty = SettingsPatch {
            client_secret: Some(SecretString::from("")),
            ..SettingsPatch::default()
        };
        assert!(SETTINGS.patched(&empty).is_err());
        // A rotated secret parses from the operator's JSON and never shows in Debug.
        let patch: SettingsPatch =
            serde_json::from_str(r#"{"client_secret":"rotated-s3cret","orphans_signable":true}"#)
                .unwrap();
        assert_eq!(
            patch.client_secret.as_ref().map(|s| s.expose_secret()),
            Some("rotated-s3cret")
        );
        assert!(!format!("{patch:?}").contains("rotated-s3cret"));
        assert!(SETTINGS.patched(&patch).unwrap().orphans_signable);
    }

    #[test]
    fn state_is_unreserved_characters_only() {
        let longest = "x".repeat(MAX_STATE_LEN);
        for good in ["a", "A-z.0_9~", longest.as_str()] {
            assert_eq!(ScaState::parse(good).map(|s| s.0), Ok(good.to_owned()));
        }
        let too_long = "x".repeat(MAX_STATE_LEN + 1);
        for bad in [
            "",
            too_long.as_str(),
            "a b",
            "a&b",
            "a=b",
            "a#b",
            "%41",
            "caf\u{e9}",
            "a+b",
        ] {
            assert_eq!(ScaState::parse(bad), Err(InvalidState), "{bad:?}");
        }
    }

    #[test]
    fn redirect_echoes_the_state_the_psu_came_with_and_nothing_else() {
        let t0 = Instant::now();
        let mut store = Store::new(SETTINGS);
        let new = |store: &mut Store, e2e: &str| {
            store
                .insert_payment(new_payment(e2e, Scenario::default()), t0)
                .id
                .clone()
        };

        let signed = new(&mut store, "S");
        let action = PsuAction::Sign {
            psu: "alice".into(),
            partial: false,
            state: Some(state("tpp-Opaque_1.~")),
        };
        let redirect = store
            .act(&signed, action, t0)
            .unwrap()
            .redirect_url
            .unwrap();
        assert_eq!(query_of(&redirect, "state"), ["tpp-Opaque_1.~"]);
        assert_eq!(query_of(&redirect, "x"), ["1"], "the TPP's query is kept");
        assert_eq!(query_of(&redirect, "code").len(), 1);
        // The operator view keeps the last redirect, state included.
        assert_eq!(
            store.payment(&signed, t0).unwrap().view().redirect_url,
            Some(redirect)
        );

        let refused = new(&mut store, "R");
        let action = PsuAction::Reject {
            psu: "alice".into(),
            state: Some(state("s2")),
        };
        let redirect = store
            .act(&refused, action, t0)
            .unwrap()
            .redirect_url
            .unwrap();
        assert_eq!(query_of(&redirect, "error"), ["access_denied"]);
        assert_eq!(query_of(&redirect, "state"), ["s2"]);
        let refused = new(&mut store, "R2");
        let action = PsuAction::Reject {
            psu: "alice".into(),
            state: None,
        };
        let redirect = store
            .act(&refused, action, t0)
            .unwrap()
            .redirect_url
            .unwrap();
        assert!(query_of(&redirect, "state").is_empty(), "{redirect}");

        // Initiated with a token: no code; without a state the redirect is the bare URI.
        let mut by_token = new_payment("T", Scenario::default());
        by_token.challenge = None;
        by_token.psu = Some("alice".into());
        let by_token = store.insert_payment(by_token, t0).id.clone();
        let redirect = store
            .act(&by_token, sign("alice"), t0)
            .unwrap()
            .redirect_url;
        assert_eq!(redirect.as_deref(), Some(REDIRECT));
        let mut by_token = new_payment("T2", Scenario::default());
        by_token.challenge = None;
        let by_token = store.insert_payment(by_token, t0).id.clone();
        let action = PsuAction::Sign {
            psu: "alice".into(),
            partial: false,
            state: Some(state("s3")),
        };
        let redirect = store.act(&by_token, action, t0).unwrap().redirect_url;
        assert_eq!(redirect, Some(format!("{REDIRECT}&state=s3")));

        // An automatic signature carries no state either.
        let auto = Scenario {
            auto: Some(AutoAction::Sign),
            ..Scenario::default()
        };
        let auto = store.insert_payment(new_payment("A", auto), t0).id.clone();
        let view = store
            .payment(&auto, t0 + DEFAULT_SCENARIO_DELAY)
            .unwrap()
            .view();
        let redirect = view.redirect_url.unwrap();
        assert_eq!(query_of(&redirect, "code").len(), 1);
        assert!(query_of(&redirect, "state").is_empty(), "{redirect}");
    }

    #[test]
    fn orphans_are_refused_unless_signable() {
        let t0 = Instant::now();
        let mut store = Store::new(Settings {
            auto_sign_after: Some(Duration::from_secs(1)),
            ..SETTINGS
        });
        let id = store
            .insert_payment(new_payment("O", Scenario::default()), t0)
            .id
            .clone();
        store.orphan(&id);
        assert_eq!(
            store.act(&id, sign("alice"), t0).err(),
            Some(PsuError::Orphaned)
        );
        assert_eq!(store.latest_by_e2e("O"), None);
        // Its automatic signature went with the lost answer.
        let later = t0 + Duration::from_secs(2);
        assert_eq!(
            store.payment(&id, later).unwrap().status,
            TransactionStatus::Rcvd
        );
        assert_eq!(store.counters.orphaned_initiations, 1);
        assert_eq!(store.counters.orphans_signed, 0);

        // Switched on at run time: the same orphan is now visible and signable.
        store.settings.orphans_signable = true;
        assert_eq!(store.latest_by_e2e("O").as_deref(), Some(id.as_str()));
        let out = store.act(&id, sign("alice"), later).unwrap();
        assert_eq!(out.status, "ACTC");
        assert!(out.redirect_url.unwrap().contains("code="));
        assert_eq!(store.counters.orphans_signed, 1);
        // A second signature attempt is a conflict and counts nothing.
        assert!(store.act(&id, sign("alice"), later).is_err());
        // Signing a payment that is no orphan does not count either.
        let plain = store
            .insert_payment(new_payment("P", Scenario::default()), t0)
            .id
            .clone();
        store.act(&plain, sign("alice"), t0).unwrap();
        assert_eq!(store.counters.orphans_signed, 1);
    }

    #[test]
    fn signable_orphans_keep_their_automatic_signature() {
        let t0 = Instant::now();
        let mut store = Store::new(Settings {
            orphans_signable: true,
            ..SETTINGS
        });
        // Scenario AUTO-SIGN.
        let auto = Scenario {
            auto: Some(AutoAction::Sign),
            ..Scenario::default()
        };
        let scenario = store.insert_payment(new_payment("A", auto), t0).id.clone();
        store.orphan(&scenario);
        // Global auto-sign, set before the initiation.
        store.settings.auto_sign_after = Some(Duration::from_secs(2));
        let global = store
            .insert_payment(new_payment("G", Scenario::default()), t0)
            .id
            .clone();
        store.orphan(&global);
        // Partial first signature of a multi-signature orphan: a first signature too.
        let multi = Scenario {
            multi_sign: true,
            ..Scenario::default()
        };
        let multi = store.insert_payment(new_payment("M", multi), t0).id.clone();
        store.orphan(&multi);

        let done = t0 + Duration::from_secs(2);
        assert_eq!(
            store.payment(&scenario, done).unwrap().status,
            TransactionStatus::Actc
        );
        assert_eq!(
            store.payment(&global, done).unwrap().status,
            TransactionStatus::Actc
        );
        assert_eq!(
            store.payment(&multi, done).unwrap().status,
            TransactionStatus::Patc
        );
        assert_eq!(store.counters.orphans_signed, 3);
        assert_eq!(
            store.payment(&global, done).unwrap().psu.as_deref(),
            Some(DEFAULT_PSU)
        );

        // Switched off before it is due, an orphan's automatic signature waits.
        let pending = store
            .insert_payment(new_payment("W", Scenario::default()), t0)
            .id
            .clone();
        store.orphan(&pending);
        store.settings.orphans_signable = false;
        assert_eq!(
            store.payment(&pending, done).unwrap().status,
            TransactionStatus::Rcvd
        );
        assert_eq!(store.counters.orphans_signed, 3);
    }

    #[test]
    fn sign_all_signs_only_the_payments_waiting_for_a_first_signature() {
        let t0 = Instant::now();
        let mut store = Store::new(SETTINGS);
        let mut insert = |e2e: &str| {
            store
                .insert_payment(new_payment(e2e, Scenario::default()), t0)
                .id
                .clone()
        };
        let signed = insert("E");
        let first = insert("E");
        let orphan = insert("E");
        let refused = insert("E");
        let half = insert("E");
        let other = insert("F");
        let last = insert("E");
        store.act(&signed, sign("bob"), t0).unwrap();
        let partial = PsuAction::Sign {
            psu: "bob".into(),
            partial: true,
            state: None,
        };
        store.act(&half, partial, t0).unwrap();
        let reject = PsuAction::Reject {
            psu: "bob".into(),
            state: None,
        };
        store.act(&refused, reject, t0).unwrap();
        store.orphan(&orphan);

        let s = state("batch-1");
        let outcomes = store.sign_all("E", "alice", false, Some(&s), t0);
        let ids: Vec<_> = outcomes.iter().map(|o| o.payment_id.as_str()).collect();
        assert_eq!(
            ids,
            [first.as_str(), last.as_str()],
            "creation order, orphan left out"
        );
        for outcome in &outcomes {
            assert_eq!(outcome.status, "ACTC");
            let redirect = outcome.redirect_url.as_deref().unwrap();
            assert_eq!(query_of(redirect, "state"), ["batch-1"]);
        }
        assert_eq!(
            store.payment(&first, t0).unwrap().psu.as_deref(),
            Some("alice")
        );
        // Not touched: another end-to-end id, the earlier signers (one of several signatures
        // given: PATC), the orphan.
        assert_eq!(
            store.payment(&half, t0).unwrap().status,
            TransactionStatus::Patc
        );
        assert_eq!(
            store.payment(&other, t0).unwrap().status,
            TransactionStatus::Rcvd
        );
        assert_eq!(
            store.payment(&signed, t0).unwrap().psu.as_deref(),
            Some("bob")
        );
        assert_eq!(
            store.payment(&orphan, t0).unwrap().status,
            TransactionStatus::Rcvd
        );
        assert!(store.sign_all("E", "alice", false, None, t0).is_empty());

        store.settings.orphans_signable = true;
        let outcomes = store.sign_all("E", "alice", false, None, t0);
        let ids: Vec<_> = outcomes.iter().map(|o| o.payment_id.as_str()).collect();
        assert_eq!(ids, [orphan.as_str()]);
        assert_eq!(store.counters.orphans_signed, 1);
        assert!(store.sign_all("E", "alice", false, None, t0).is_empty());
        assert!(store.sign_all("NONE", "alice", false, None, t0).is_empty());
    }

    #[test]
    fn a_forgetting_store_forgets_final_payments_after_the_horizon() {
        let t0 = Instant::now();
        let after = |secs: u64| t0 + Duration::from_secs(secs);
        let mut store = Store::new(SETTINGS).forgetting_final_after(Some(Duration::from_secs(60)));
        // Settles (ACSC at t0 + 2 s), is rejected, stays waiting for the PSU.
        let settled = store
            .insert_payment(new_payment("SETTLED", Scenario::default()), t0)
            .id
            .clone();
        store.act(&settled, sign("alice"), t0).unwrap();
        let rejected = store
            .insert_payment(new_payment("REJECTED", Scenario::default()), t0)
            .id
            .clone();
        store
            .act(
                &rejected,
                PsuAction::Reject {
                    psu: "bob".into(),
                    state: None,
                },
                t0,
            )
            .unwrap();
        let waiting = store
            .insert_payment(new_payment("WAITING", Scenario::default()), t0)
            .id
            .clone();
        // Initiated twice: the double initiation stays visible after both are forgotten.
        for _ in 0..2 {
            let id = store
                .insert_payment(new_payment("TWICE", Scenario::default()), t0)
                .id
                .clone();
            store.act(&id, sign("carol"), t0).unwrap();
        }
        assert_eq!(store.payment_count(), 5);
        assert_eq!(store.codes.len(), 3);

        // The first sweep sees the final ones final; none has been final for the horizon yet.
        store.sweep(after(10));
        assert_eq!(store.payment_count(), 5);
        // Inside the horizon nothing goes.
        store.sweep(after(65));
        assert_eq!(store.payment_count(), 5);
        // An initiation sweeps too (sweeps are at least 10 s apart): 60 s after the final ones
        // were seen final, they go.
        let late = store
            .insert_payment(new_payment("LATE", Scenario::default()), after(75))
            .id
            .clone();
        assert!(store.payment(&settled, after(75)).is_none());
        assert!(store.payment(&rejected, after(75)).is_none());
        assert_eq!(
            store.payment(&waiting, after(75)).unwrap().status,
            TransactionStatus::Rcvd
        );
        assert!(store.payment(&late, after(75)).is_some());
        assert_eq!(store.payment_count(), 2);
        let order: HashSet<&String> = store.order.iter().collect();
        assert_eq!(order, HashSet::from([&waiting, &late]));
        assert_eq!(store.latest_by_e2e("SETTLED"), None);
        // Codes of forgotten payments within their lifetime are kept, until they expire.
        assert_eq!(store.codes.len(), 3);
        let counted: Vec<(&str, u64)> = store
            .counters
            .initiations_by_e2e
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        assert_eq!(counted, [("LATE", 1), ("TWICE", 2), ("WAITING", 1)]);
        // The one waiting expires (RJCT at 900 s) and goes 60 s after a sweep saw it.
        store.sweep(after(901));
        assert_eq!(store.payment_count(), 2);
        assert!(store.codes.is_empty(), "codes of forgotten payments expire");
        store.sweep(after(961));
        assert!(store.payment(&waiting, after(961)).is_none());
        assert!(store.payment(&late, after(961)).is_some());

        // A store that does not forget keeps everything (the default).
        let mut keeping = Store::new(SETTINGS);
        let id = keeping
            .insert_payment(new_payment("KEPT", Scenario::default()), t0)
            .id
            .clone();
        keeping.act(&id, sign("alice"), t0).unwrap();
        keeping.sweep(after(10_000));
        assert!(keeping.payment(&id, after(10_000)).is_some());
    }
}
