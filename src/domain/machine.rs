//! The payment state machine: `decide(payment, input, now, policy) -> Outcome`. Pure: no I/O, no
//! clock, no randomness (the engine passes in `now` and any generated secret).
//!
//! A transition returns the next durable record, the status events it emits and the effects the
//! engine must run *after* the record is durable (write-ahead intent, docs/architecture.md).
//! Timers are not effects: they are `next_check_at` in the record, so they survive restarts.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::bank::BankProgress;
use super::model::{BankPaymentId, CommandId, Order, PaymentId, PaymentKind, PsuId};
use super::reason::{Reason, ReasonCode};
use super::settlement::SettlementEvidence;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// Where a payment is in its life. `attempt` counts bank-side initiation calls made so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentState {
    /// Accepted and durable; waiting for the bank call to start.
    Received,
    /// An initiation call (attempt N) is made or about to be made.
    Initiating { attempt: u32 },
    /// The bank holds the payment; the PSU must sign through the SCA redirect.
    ScaPending,
    /// The PSU came back with an authorization code; exchanging it and confirming at the bank.
    Authorizing,
    /// Multi-signature: some signatures are in.
    PartiallySigned,
    /// Signed and accepted by the bank, not yet executed.
    Signed,
    /// A standing order in force: it executes on its schedule until its end or a cancellation.
    Active,
    /// The bank is asked to cancel; `Payment::resume_after_cancel` is where a refusal returns to.
    Cancelling,
    /// Executed. Terminal.
    Settled,
    /// A bulk payment executed with some of its transfers rejected. Terminal.
    PartiallySettled,
    /// A standing order that reached its end. Terminal.
    Completed,
    /// Terminal.
    Cancelled,
    /// Terminal: refused by validation, the bank or the PSU.
    Rejected,
    /// Terminal: the PSU did not sign in time.
    Expired,
    /// Terminal: the worker gave up (e.g. an outcome it could not resolve).
    Failed,
    /// A bank initiation call (attempt N) ended without an answer: the bank may or may not hold
    /// the payment. Resolved by a new attempt or by a person, per `Policy::unknown_outcome`.
    OutcomeUnknown { attempt: u32 },
    /// The worker asked the bank to end an unsigned payment (SCA deadline passed, or the PSU
    /// refused) and the bank has not confirmed within `Policy::expiry_horizon_ms`: the PSU may
    /// still sign it. Polled slowly until the bank reports a final status. Kind
    /// `OUTCOME_UNKNOWN`.
    Unconfirmed,
}

/// The state without its data: the `state` field of status events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StateKind {
    Received,
    Initiating,
    ScaPending,
    Authorizing,
    PartiallySigned,
    Signed,
    Settled,
    Cancelled,
    Rejected,
    Expired,
    Failed,
    OutcomeUnknown,
    Active,
    Cancelling,
    PartiallySettled,
    Completed,
}

impl StateKind {
    /// In the order of the Avro enum's symbols (new symbols are appended).
    pub const ALL: [StateKind; 16] = [
        StateKind::Received,
        StateKind::Initiating,
        StateKind::ScaPending,
        StateKind::Authorizing,
        StateKind::PartiallySigned,
        StateKind::Signed,
        StateKind::Settled,
        StateKind::Cancelled,
        StateKind::Rejected,
        StateKind::Expired,
        StateKind::Failed,
        StateKind::OutcomeUnknown,
        StateKind::Active,
        StateKind::Cancelling,
        StateKind::PartiallySettled,
        StateKind::Completed,
    ];

    pub fn is_terminal(self) -> bool {
        match self {
            StateKind::Settled
            | StateKind::Cancelled
            | StateKind::Rejected
            | StateKind::Expired
            | StateKind::Failed
            | StateKind::PartiallySettled
            | StateKind::Completed => true,
            StateKind::Received
            | StateKind::Initiating
            | StateKind::ScaPending
            | StateKind::Authorizing
            | StateKind::PartiallySigned
            | StateKind::Signed
            | StateKind::OutcomeUnknown
            | StateKind::Active
            | StateKind::Cancelling => false,
        }
    }

    /// States in which the PSU's signature is still outstanding, so the SCA deadline applies.
    pub fn awaits_signature(self) -> bool {
        match self {
            StateKind::ScaPending | StateKind::PartiallySigned => true,
            StateKind::Received
            | StateKind::Initiating
            | StateKind::Authorizing
            | StateKind::Signed
            | StateKind::Settled
            | StateKind::Cancelled
            | StateKind::Rejected
            | StateKind::Expired
            | StateKind::Failed
            | StateKind::OutcomeUnknown
            | StateKind::Active
            | StateKind::Cancelling
            | StateKind::PartiallySettled
            | StateKind::Completed => false,
        }
    }

    /// The Avro enum symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            StateKind::Received => "RECEIVED",
            StateKind::Initiating => "INITIATING",
            StateKind::ScaPending => "SCA_PENDING",
            StateKind::Authorizing => "AUTHORIZING",
            StateKind::PartiallySigned => "PARTIALLY_SIGNED",
            StateKind::Signed => "SIGNED",
            StateKind::Settled => "SETTLED",
            StateKind::Cancelled => "CANCELLED",
            StateKind::Rejected => "REJECTED",
            StateKind::Expired => "EXPIRED",
            StateKind::Failed => "FAILED",
            StateKind::OutcomeUnknown => "OUTCOME_UNKNOWN",
            StateKind::Active => "ACTIVE",
            StateKind::Cancelling => "CANCELLING",
            StateKind::PartiallySettled => "PARTIALLY_SETTLED",
            StateKind::Completed => "COMPLETED",
        }
    }

    pub fn from_symbol(symbol: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.symbol() == symbol)
    }
}

impl PaymentState {
    pub fn kind(self) -> StateKind {
        match self {
            PaymentState::Received => StateKind::Received,
            PaymentState::Initiating { .. } => StateKind::Initiating,
            PaymentState::ScaPending => StateKind::ScaPending,
            PaymentState::Authorizing => StateKind::Authorizing,
            PaymentState::PartiallySigned => StateKind::PartiallySigned,
            PaymentState::Signed => StateKind::Signed,
            PaymentState::Settled => StateKind::Settled,
            PaymentState::Cancelled => StateKind::Cancelled,
            PaymentState::Rejected => StateKind::Rejected,
            PaymentState::Expired => StateKind::Expired,
            PaymentState::Failed => StateKind::Failed,
            PaymentState::OutcomeUnknown { .. } | PaymentState::Unconfirmed => {
                StateKind::OutcomeUnknown
            }
            PaymentState::Active => StateKind::Active,
            PaymentState::Cancelling => StateKind::Cancelling,
            PaymentState::PartiallySettled => StateKind::PartiallySettled,
            PaymentState::Completed => StateKind::Completed,
        }
    }

    pub fn is_terminal(self) -> bool {
        self.kind().is_terminal()
    }
}

/// The durable record of one payment (one `payment-state` record).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Payment {
    pub payment_id: PaymentId,
    pub psu_id: PsuId,
    /// `None` only when the initiation was refused by validation.
    pub order: Option<Order>,
    pub state: PaymentState,
    /// Sequence number of the last status event emitted; the next one is `sequence + 1`.
    pub sequence: u64,
    /// The state kind of the last status event emitted.
    pub last_published: Option<StateKind>,
    /// Initiation calls made so far (each is a possible bank-side payment).
    pub initiation_attempts: u32,
    pub bank_payment_id: Option<BankPaymentId>,
    pub bank_status: Option<String>,
    pub sca_redirect_url: Option<String>,
    /// The PKCE verifier of the current initiation attempt. Sealed when stored.
    #[serde(skip)]
    pub pkce_verifier: Option<SecretString>,
    /// The authorization code while it is being exchanged. Sealed when stored.
    #[serde(skip)]
    pub authorization_code: Option<SecretString>,
    pub received_at: Millis,
    pub updated_at: Millis,
    /// When an unsigned payment expires.
    pub sca_deadline: Option<Millis>,
    /// Durable timer: when the engine must feed `Input::TimerFired`.
    pub next_check_at: Option<Millis>,
    /// Status polls made in the current state (drives the fast-then-slow schedule).
    pub polls_in_state: u32,
    /// Command ids already applied, for de-duplication of re-delivered commands.
    pub seen_commands: Vec<CommandId>,
    pub reason: Option<Reason>,
    /// While `Cancelling`: the state to return to if the bank does not cancel.
    #[serde(default)]
    pub resume_after_cancel: Option<PaymentState>,
    /// The OAuth `state` of the current initiation attempt: the worker appends it to the SCA
    /// URL and a `CompleteSca` must bring it back. `None` on records written before it existed.
    #[serde(default)]
    pub sca_state: Option<String>,
    /// Digests of the authorization codes received: a code is exchanged at most once per
    /// payment, however many commands the de-duplication window remembers.
    #[serde(default)]
    pub received_codes: Vec<String>,
    /// The worker is asking the bank to end this unsigned payment (deadline or PSU refusal).
    #[serde(default)]
    pub withdrawal: Option<Withdrawal>,
    /// Offset of the last command record applied to this payment (set by the engine): a
    /// re-delivered record at or below it is a duplicate, however many commands came since.
    #[serde(default)]
    pub last_command_offset: Option<i64>,
    /// The client asked for PKCE on every attempt (`InitiatePayment.always_pkce`), even when
    /// the worker holds a PIS token of the PSU: the owner then never initiates with the token.
    #[serde(default)]
    pub always_pkce: bool,
}

/// Why the worker wants the bank to end an unsigned payment, and how far it got. The payment
/// becomes final only when the bank agrees (RJCT or CANC); a signature meanwhile wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Withdrawal {
    pub cause: WithdrawalCause,
    /// When the worker started asking.
    pub since: Millis,
    /// Whether the bank's cancellation was asked for (it needs the PSU's PIS token).
    pub cancel_asked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WithdrawalCause {
    /// The SCA deadline passed: ends `EXPIRED`.
    Deadline,
    /// The PSU came back from the SCA redirect with an error: ends `REJECTED` (`SCA_FAILED`).
    PsuRefused { message: String },
}

impl WithdrawalCause {
    /// The final state once the bank confirms, and why.
    fn end(&self) -> (PaymentState, Reason) {
        match self {
            WithdrawalCause::Deadline => (
                PaymentState::Expired,
                Reason::new(
                    ReasonCode::ScaExpired,
                    "the PSU did not sign before the SCA deadline; the bank confirmed",
                ),
            ),
            WithdrawalCause::PsuRefused { message } => (
                PaymentState::Rejected,
                Reason::new(ReasonCode::ScaFailed, message.clone()),
            ),
        }
    }
}

/// How a person resolves a payment the worker cannot resolve itself (`ResolveOutcome`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Nothing of this attempt is at the bank: make a new attempt.
    Reinitiate,
    /// The bank holds this payment for the attempt: track it.
    Adopt { bank_payment_id: BankPaymentId },
    /// Nothing to track: end the payment (`FAILED`, or `EXPIRED` for an unconfirmed expiry).
    Abandon { note: Option<String> },
}

/// What to do with an initiation that got no answer (docs/guarantees.md, "Lost initiation
/// answers").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownOutcomePolicy {
    /// Stay `OUTCOME_UNKNOWN` until a person resolves it (`ResolveOutcome`): no second bank
    /// payment can exist for a PSU to sign twice.
    Hold,
    /// Make a new attempt after `reconcile_after_ms`: no person needed, but if the PSU can see
    /// and sign the unanswered attempt at the bank, money can move twice.
    Reinitiate,
}

impl UnknownOutcomePolicy {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "hold" => Some(UnknownOutcomePolicy::Hold),
            "reinitiate" => Some(UnknownOutcomePolicy::Reinitiate),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            UnknownOutcomePolicy::Hold => "hold",
            UnknownOutcomePolicy::Reinitiate => "reinitiate",
        }
    }
}

/// The digest under which an authorization code is remembered (never the code itself).
pub fn code_digest(code: &SecretString) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(code.expose_secret().as_bytes());
    hex::encode(&digest[..16])
}

/// The SCA URL the PSU is sent to: the bank's, with the attempt's OAuth `state` appended
/// (TPPs append it themselves, docs/belfius-facts.md §2.6). An unparsable URL gets it appended as
/// text.
pub fn sca_url_with_state(url: &str, state: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            parsed.query_pairs_mut().append_pair("state", state);
            parsed.to_string()
        }
        Err(_) => {
            let separator = if url.contains('?') { '&' } else { '?' };
            format!("{url}{separator}state={state}")
        }
    }
}

/// A status event as the machine emits it (the Avro encoding lives in `contract`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusEvent {
    pub payment_id: PaymentId,
    pub psu_id: PsuId,
    pub sequence: u64,
    pub state: StateKind,
    pub bank_status: Option<String>,
    pub bank_payment_id: Option<BankPaymentId>,
    pub sca_redirect_url: Option<String>,
    pub reason: Option<Reason>,
    /// The command id that caused this event, or an internal cause such as `timer`.
    pub causation_id: String,
    pub occurred_at: Millis,
    /// What the debtor's history showed after `SETTLED` (status schema v3). Always `None` so
    /// far: nothing reads the history yet. Skipped when `None`, so serialised events keep
    /// their earlier form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settlement: Option<SettlementEvidence>,
}

impl StatusEvent {
    /// Deterministic, so a re-published event carries the same id. The PSU is part of it: a
    /// `payment_id` is unique per PSU (two PSUs' payments can share one only across command
    /// partitions, which the worker cannot see together), so two payments never share an id.
    pub fn event_id(&self) -> uuid::Uuid {
        uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!(
                "pis-worker/v2/{}/{}/{}",
                self.psu_id, self.payment_id, self.sequence
            )
            .as_bytes(),
        )
    }
}

/// How the PSU came back from the SCA redirect.
#[derive(Debug, Clone)]
pub enum ScaOutcome {
    Code(SecretString),
    Error {
        error: String,
        description: Option<String>,
    },
    /// Neither code nor error: what Belfius' redirect carries (the `state` only) after the PSU
    /// signed a payment initiated with the PSU's access token.
    Returned,
}

/// Why an initiation call did not produce a payment at the bank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitiationFailure {
    /// The bank refused it (4xx): definite, nothing to retry.
    Refused(Reason),
    /// The request provably never reached the bank, or the bank turned it away before acting
    /// (connect error, 429): retry later, after `retry_after_ms` when the bank said so
    /// (`Retry-After`), else after `Policy::initiation_retry_ms`.
    NotProcessed {
        message: String,
        retry_after_ms: Option<Millis>,
    },
    /// No answer (timeout, reset, 5xx): the bank may hold the payment.
    Unknown { message: String },
}

/// Everything that can happen to a payment.
// An input lives for one `decide` call and is moved, never stored in bulk: boxing the order
// would cost an allocation per command for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Input {
    // Commands from clients.
    Initiate {
        command_id: CommandId,
        psu_id: PsuId,
        order: Order,
        /// Never initiate with the PSU's token (`InitiatePayment.always_pkce`).
        always_pkce: bool,
    },
    /// An initiation that failed validation at the edge.
    InitiateInvalid {
        command_id: CommandId,
        psu_id: PsuId,
        reason: Reason,
    },
    CompleteSca {
        command_id: CommandId,
        psu_id: PsuId,
        outcome: ScaOutcome,
        /// The redirect's OAuth `state`: must be the current attempt's.
        state: Option<String>,
    },
    Cancel {
        command_id: CommandId,
        psu_id: PsuId,
        /// Whether the worker holds a PIS token for this PSU: the bank's cancellation needs one.
        bank_token: bool,
    },
    RefreshStatus {
        command_id: CommandId,
        psu_id: PsuId,
    },
    /// A person's decision on a payment the worker cannot resolve itself.
    Resolve {
        command_id: CommandId,
        psu_id: PsuId,
        resolution: Resolution,
    },
    // Inputs from the engine.
    /// Start the next initiation attempt with a fresh OAuth `state` and a freshly generated
    /// PKCE verifier, or with none: the owner holds a PIS token pair of the PSU and initiates
    /// with its access token (no code comes back).
    BeginInitiation {
        pkce_verifier: Option<SecretString>,
        sca_state: String,
    },
    /// The bank refused the PSU's access token on an attempt initiated with it (a 401 creates
    /// nothing at the bank): the same attempt goes again with PKCE and this verifier.
    FallBackToPkce {
        pkce_verifier: SecretString,
    },
    BankInitiated {
        bank_payment_id: BankPaymentId,
        sca_redirect_url: String,
        bank_status: Option<String>,
    },
    InitiationFailed(InitiationFailure),
    /// The token pair is durable in the PSU record.
    TokenExchanged,
    TokenExchangeFailed {
        message: String,
    },
    StatusObserved {
        progress: BankProgress,
        bank_status: String,
    },
    StatusCheckFailed {
        message: String,
    },
    /// The bank cancelled the payment.
    CancelConfirmed {
        bank_status: Option<String>,
    },
    /// The bank refused the cancellation (definite).
    CancelRefused(Reason),
    /// The cancellation call got no usable answer: its outcome is unknown.
    CancelUnconfirmed {
        message: String,
    },
    /// `next_check_at` has passed.
    TimerFired,
    /// The partition was restored after a restart or rebalance: calls that were in flight when
    /// the previous owner stopped have unknown outcomes.
    Restored,
}

impl Input {
    pub fn command_id(&self) -> Option<&CommandId> {
        match self {
            Input::Initiate { command_id, .. }
            | Input::InitiateInvalid { command_id, .. }
            | Input::CompleteSca { command_id, .. }
            | Input::Cancel { command_id, .. }
            | Input::RefreshStatus { command_id, .. }
            | Input::Resolve { command_id, .. } => Some(command_id),
            Input::BeginInitiation { .. }
            | Input::FallBackToPkce { .. }
            | Input::BankInitiated { .. }
            | Input::InitiationFailed(_)
            | Input::TokenExchanged
            | Input::TokenExchangeFailed { .. }
            | Input::StatusObserved { .. }
            | Input::StatusCheckFailed { .. }
            | Input::CancelConfirmed { .. }
            | Input::CancelRefused(_)
            | Input::CancelUnconfirmed { .. }
            | Input::TimerFired
            | Input::Restored => None,
        }
    }

    pub fn psu_id(&self) -> Option<&PsuId> {
        match self {
            Input::Initiate { psu_id, .. }
            | Input::InitiateInvalid { psu_id, .. }
            | Input::CompleteSca { psu_id, .. }
            | Input::Cancel { psu_id, .. }
            | Input::RefreshStatus { psu_id, .. }
            | Input::Resolve { psu_id, .. } => Some(psu_id),
            Input::BeginInitiation { .. }
            | Input::FallBackToPkce { .. }
            | Input::BankInitiated { .. }
            | Input::InitiationFailed(_)
            | Input::TokenExchanged
            | Input::TokenExchangeFailed { .. }
            | Input::StatusObserved { .. }
            | Input::StatusCheckFailed { .. }
            | Input::CancelConfirmed { .. }
            | Input::CancelRefused(_)
            | Input::CancelUnconfirmed { .. }
            | Input::TimerFired
            | Input::Restored => None,
        }
    }

    fn causation(&self) -> String {
        match self {
            Input::Initiate { command_id, .. }
            | Input::InitiateInvalid { command_id, .. }
            | Input::CompleteSca { command_id, .. }
            | Input::Cancel { command_id, .. }
            | Input::RefreshStatus { command_id, .. }
            | Input::Resolve { command_id, .. } => command_id.to_string(),
            Input::BeginInitiation { .. } => "worker:begin-initiation".into(),
            Input::FallBackToPkce { .. } => "worker:fall-back-to-pkce".into(),
            Input::BankInitiated { .. } | Input::InitiationFailed(_) => "bank:initiation".into(),
            Input::CancelConfirmed { .. }
            | Input::CancelRefused(_)
            | Input::CancelUnconfirmed { .. } => "bank:cancellation".into(),
            Input::TokenExchanged | Input::TokenExchangeFailed { .. } => "bank:token".into(),
            Input::StatusObserved { .. } | Input::StatusCheckFailed { .. } => "bank:status".into(),
            Input::TimerFired => "worker:timer".into(),
            Input::Restored => "worker:restore".into(),
        }
    }
}

/// Work the engine does once the new record is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Generate a PKCE verifier and feed `Input::BeginInitiation`.
    StartInitiation,
    /// POST the initiation (the attempt number is in the state).
    CallInitiate,
    /// Exchange the stored authorization code for a token pair.
    ExchangeCode,
    /// GET the payment status.
    CheckStatus,
    /// DELETE the payment at the bank (needs the PSU's token).
    CallCancel,
}

impl Effect {
    /// Whether the effect may run before the transition that asked for it is durable. Only an
    /// idempotent read qualifies: if the process dies, the durable timer simply asks again.
    pub fn is_idempotent_read(self) -> bool {
        match self {
            Effect::CheckStatus => true,
            Effect::StartInitiation
            | Effect::CallInitiate
            | Effect::ExchangeCode
            | Effect::CallCancel => false,
        }
    }
}

impl Transition {
    /// Polling bookkeeping (timer consumed, poll counted, same state, no event, at most a
    /// status read): losing it in a crash costs one extra poll, so it need not be written.
    pub fn is_volatile(&self, previous: &Payment, from_command: bool) -> bool {
        !from_command
            && self.events.is_empty()
            && self.payment.state == previous.state
            && self.payment.withdrawal == previous.withdrawal
            && self.effects.iter().all(|e| e.is_idempotent_read())
    }
}

/// Why an input changed nothing and needs no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// The command id was applied before (re-delivery).
    DuplicateCommand,
    /// The same initiation again under a new command id: idempotent.
    DuplicateInitiation,
    /// An engine input that no longer applies (e.g. a stale timer).
    Stale,
    /// A cancellation while one is already under way.
    CancelInProgress,
}

/// A command that cannot be applied: it goes to the dead-letter topic with this reason, and the
/// payment is unaffected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalCode {
    UnknownPayment,
    PsuMismatch,
    DuplicatePaymentId,
    AlreadyFinal,
    NotAwaitingSca,
    CancelNotPossible,
    /// A `CompleteSca` whose OAuth `state` is not the current attempt's (forged, replayed, or
    /// from an older attempt): the payment is untouched.
    StateMismatch,
    /// A `ResolveOutcome` for a payment that is not waiting for a person.
    ResolutionNotApplicable,
    /// A `CompleteSca` with neither code nor error for an attempt initiated with PKCE, whose
    /// redirect carries the authorization code (and with it the PSU's token pair).
    CodeRequired,
}

impl RefusalCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::UnknownPayment => "UNKNOWN_PAYMENT",
            RefusalCode::PsuMismatch => "PSU_MISMATCH",
            RefusalCode::DuplicatePaymentId => "DUPLICATE_PAYMENT_ID",
            RefusalCode::AlreadyFinal => "ALREADY_FINAL",
            RefusalCode::NotAwaitingSca => "NOT_AWAITING_SCA",
            RefusalCode::CancelNotPossible => "CANCEL_NOT_POSSIBLE",
            RefusalCode::StateMismatch => "STATE_MISMATCH",
            RefusalCode::ResolutionNotApplicable => "RESOLUTION_NOT_APPLICABLE",
            RefusalCode::CodeRequired => "CODE_REQUIRED",
        }
    }
}

/// A change to persist.
#[derive(Debug, Clone)]
pub struct Transition {
    pub payment: Payment,
    pub events: Vec<StatusEvent>,
    pub effects: Vec<Effect>,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Changed(Box<Transition>),
    Ignored(Ignored),
    Refused(Refusal),
}

/// Timing rules of the lifecycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// How long the PSU has to sign before the payment expires.
    pub sca_timeout_ms: Millis,
    /// Status poll interval for the first `fast_polls` polls in a state, then `slow_poll_ms`.
    pub fast_poll_ms: Millis,
    pub fast_polls: u32,
    pub slow_poll_ms: Millis,
    /// Delay before retrying an initiation that the bank did not process.
    pub initiation_retry_ms: Millis,
    /// Delay before the reconciler acts on an unknown outcome.
    pub reconcile_after_ms: Millis,
    /// Initiation calls allowed per payment before it fails.
    pub max_initiation_attempts: u32,
    /// Command ids remembered per payment for de-duplication.
    pub remembered_commands: usize,
    /// Status poll interval of an active standing order (it changes rarely), and of a payment
    /// whose end the bank has not confirmed (`Unconfirmed`).
    pub standing_order_poll_ms: Millis,
    /// What to do with an initiation that got no answer.
    pub unknown_outcome: UnknownOutcomePolicy,
    /// How long after asking the bank to end an unsigned payment the worker waits for the
    /// bank's confirmation before reporting `OUTCOME_UNKNOWN` (`EXPIRY_UNCONFIRMED`).
    pub expiry_horizon_ms: Millis,
    /// Whether the partition owner initiates a returning PSU's payment with the PSU's PIS
    /// access token when it holds one (`PIS_INITIATE_WITH_TOKEN`). The owner decides (it holds
    /// the tokens) and tells the machine through `BeginInitiation`.
    pub initiate_with_token: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            sca_timeout_ms: 15 * 60 * 1000,
            fast_poll_ms: 2_000,
            fast_polls: 10,
            slow_poll_ms: 30_000,
            initiation_retry_ms: 2_000,
            reconcile_after_ms: 5_000,
            max_initiation_attempts: 3,
            remembered_commands: 32,
            standing_order_poll_ms: 3_600_000,
            unknown_outcome: UnknownOutcomePolicy::Hold,
            expiry_horizon_ms: 3_600_000,
            initiate_with_token: true,
        }
    }
}

impl Policy {
    fn next_poll(&self, now: Millis, polls_in_state: u32) -> Millis {
        if polls_in_state < self.fast_polls {
            now + self.fast_poll_ms
        } else {
            now + self.slow_poll_ms
        }
    }

    /// The next status poll, but never later than the SCA deadline of an unsigned payment, so
    /// expiry is noticed on time.
    fn poll_at(&self, payment: &Payment, now: Millis) -> Millis {
        let next = match payment.state {
            PaymentState::Active | PaymentState::Unconfirmed => now + self.standing_order_poll_ms,
            PaymentState::Received
            | PaymentState::Initiating { .. }
            | PaymentState::ScaPending
            | PaymentState::Authorizing
            | PaymentState::PartiallySigned
            | PaymentState::Signed
            | PaymentState::Cancelling
            | PaymentState::Settled
            | PaymentState::PartiallySettled
            | PaymentState::Completed
            | PaymentState::Cancelled
            | PaymentState::Rejected
            | PaymentState::Expired
            | PaymentState::Failed
            | PaymentState::OutcomeUnknown { .. } => self.next_poll(now, payment.polls_in_state),
        };
        // Once the worker has asked the bank to end the payment, poll at the slow rate; a PSU's
        // refusal can start that before the deadline, which still bounds the next poll.
        let next = if payment.withdrawal.is_some() && payment.state != PaymentState::Unconfirmed {
            now + self.slow_poll_ms
        } else {
            next
        };
        match payment.sca_deadline {
            Some(deadline) if payment.state.kind().awaits_signature() && deadline > now => {
                next.min(deadline)
            }
            Some(_) | None => next,
        }
    }
}

/// Applies one input to the payment `payment_id` (`current` is `None` for an id never seen).
pub fn decide(
    payment_id: &PaymentId,
    current: Option<&Payment>,
    input: Input,
    now: Millis,
    policy: &Policy,
) -> Outcome {
    match current {
        None => decide_new(payment_id, input, now),
        Some(payment) => decide_existing(payment, input, now, policy),
    }
}

fn decide_new(payment_id: &PaymentId, input: Input, now: Millis) -> Outcome {
    match input {
        Input::Initiate {
            command_id,
            psu_id,
            order,
            always_pkce,
        } => {
            let payment = Payment::new(
                payment_id.clone(),
                psu_id,
                Some(order),
                command_id,
                now,
                always_pkce,
            );
            Step::from(payment, now).to(
                PaymentState::Received,
                |_| {},
                vec![Effect::StartInitiation],
            )
        }
        Input::InitiateInvalid {
            command_id,
            psu_id,
            reason,
        } => {
            let payment = Payment::new(payment_id.clone(), psu_id, None, command_id, now, false);
            Step::from(payment, now).to(PaymentState::Rejected, |p| p.reason = Some(reason), vec![])
        }
        Input::CompleteSca { .. }
        | Input::Cancel { .. }
        | Input::RefreshStatus { .. }
        | Input::Resolve { .. } => refuse(
            RefusalCode::UnknownPayment,
            "no payment with this payment_id for this psu_id",
        ),
        Input::BeginInitiation { .. }
        | Input::FallBackToPkce { .. }
        | Input::BankInitiated { .. }
        | Input::InitiationFailed(_)
        | Input::TokenExchanged
        | Input::TokenExchangeFailed { .. }
        | Input::StatusObserved { .. }
        | Input::StatusCheckFailed { .. }
        | Input::CancelConfirmed { .. }
        | Input::CancelRefused(_)
        | Input::CancelUnconfirmed { .. }
        | Input::TimerFired
        | Input::Restored => Outcome::Ignored(Ignored::Stale),
    }
}

impl Payment {
    /// Whether the current attempt's SCA redirect brings an authorization code: a PKCE attempt
    /// holds its verifier until the code is exchanged. An attempt initiated with the PSU's
    /// access token has no verifier, and Belfius issues no code for it (the redirect carries
    /// the `state` only); so does an attempt whose code was already exchanged.
    pub fn awaits_code(&self) -> bool {
        self.pkce_verifier.is_some()
    }

    fn new(
        payment_id: PaymentId,
        psu_id: PsuId,
        order: Option<Order>,
        command_id: CommandId,
        now: Millis,
        always_pkce: bool,
    ) -> Self {
        Payment {
            payment_id,
            psu_id,
            order,
            state: PaymentState::Received,
            sequence: 0,
            last_published: None,
            initiation_attempts: 0,
            bank_payment_id: None,
            bank_status: None,
            sca_redirect_url: None,
            pkce_verifier: None,
            authorization_code: None,
            received_at: now,
            updated_at: now,
            sca_deadline: None,
            next_check_at: None,
            polls_in_state: 0,
            seen_commands: vec![command_id],
            reason: None,
            resume_after_cancel: None,
            sca_state: None,
            received_codes: Vec::new(),
            withdrawal: None,
            last_command_offset: None,
            always_pkce,
        }
    }
}

fn refuse(code: RefusalCode, message: impl Into<String>) -> Outcome {
    Outcome::Refused(Refusal {
        code,
        message: message.into(),
    })
}

/// States in which the bank holds a payment that still waits for the PSU's signature, so the
/// SCA deadline applies and the PSU may still sign.
fn awaiting_signature(state: PaymentState) -> bool {
    match state {
        PaymentState::ScaPending | PaymentState::PartiallySigned | PaymentState::Unconfirmed => {
            true
        }
        PaymentState::Received
        | PaymentState::Initiating { .. }
        | PaymentState::Authorizing
        | PaymentState::Signed
        | PaymentState::Active
        | PaymentState::Cancelling
        | PaymentState::OutcomeUnknown { .. }
        | PaymentState::Settled
        | PaymentState::PartiallySettled
        | PaymentState::Completed
        | PaymentState::Cancelled
        | PaymentState::Rejected
        | PaymentState::Expired
        | PaymentState::Failed => false,
    }
}

/// The end-to-end id a person looks the payment up by at the bank (a bulk: its first transfer's).
fn end_to_end_id(payment: &Payment) -> &str {
    match &payment.order {
        Some(Order::Single(order)) => &order.end_to_end_id,
        Some(Order::Standing(standing)) => &standing.order.end_to_end_id,
        Some(Order::Bulk(bulk)) => bulk
            .payments
            .first()
            .map_or("", |entry| entry.end_to_end_id.as_str()),
        None => "",
    }
}

fn rfc3339(at: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(at)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| at.to_string())
}

fn decide_existing(payment: &Payment, input: Input, now: Millis, policy: &Policy) -> Outcome {
    if let Some(command_id) = input.command_id() {
        if payment.seen_commands.contains(command_id) {
            return Outcome::Ignored(Ignored::DuplicateCommand);
        }
    }
    if let Some(psu_id) = input.psu_id() {
        if psu_id != &payment.psu_id {
            return refuse(
                RefusalCode::PsuMismatch,
                "the command's psu_id differs from the payment's",
            );
        }
    }
    if let Input::CompleteSca { outcome, state, .. } = &input {
        // A code is exchanged at most once, whatever command id it comes under.
        if let ScaOutcome::Code(code) = outcome {
            if payment.received_codes.contains(&code_digest(code)) {
                return Outcome::Ignored(Ignored::DuplicateCommand);
            }
        }
        // The redirect must carry the state of the SCA URL this payment's PSU was sent to.
        if let Some(expected) = &payment.sca_state {
            if state.as_deref() != Some(expected.as_str()) {
                return refuse(
                    RefusalCode::StateMismatch,
                    match state {
                        None => {
                            "the redirect carries no OAuth state; pass the `state` query parameter the PSU's browser brought back"
                        }
                        Some(_) => {
                            "the redirect's OAuth state is not the one of this payment's SCA URL (forged, replayed, or from an earlier attempt)"
                        }
                    },
                );
            }
        }
    }
    let state = payment.state;
    let step = Step::new(payment, &input, now, policy);
    match input {
        Input::Initiate {
            order, always_pkce, ..
        } => {
            if payment.order.as_ref() == Some(&order) && payment.always_pkce == always_pkce {
                Outcome::Ignored(Ignored::DuplicateInitiation)
            } else {
                refuse(
                    RefusalCode::DuplicatePaymentId,
                    "payment_id already used for a different payment",
                )
            }
        }
        Input::InitiateInvalid { .. } => refuse(
            RefusalCode::DuplicatePaymentId,
            "payment_id already used; this initiation is also invalid",
        ),
        Input::CompleteSca { outcome, .. } => complete_sca(step, payment, outcome, now),
        Input::Cancel { bank_token, .. } => cancel(step, state, bank_token),
        Input::RefreshStatus { .. } => match state {
            PaymentState::ScaPending
            | PaymentState::Authorizing
            | PaymentState::PartiallySigned
            | PaymentState::Signed
            | PaymentState::Active
            | PaymentState::Cancelling
            | PaymentState::Unconfirmed => {
                step.same(|p| p.next_check_at = None, vec![Effect::CheckStatus])
            }
            // Nothing at the bank to ask about yet; record the command so it is not re-run.
            PaymentState::Received
            | PaymentState::Initiating { .. }
            | PaymentState::OutcomeUnknown { .. } => step.same(|_| {}, vec![]),
            PaymentState::Settled
            | PaymentState::PartiallySettled
            | PaymentState::Completed
            | PaymentState::Cancelled
            | PaymentState::Rejected
            | PaymentState::Expired
            | PaymentState::Failed => already_final(state),
        },
        Input::Resolve { resolution, .. } => resolve(step, payment, resolution, now, policy),
        Input::BeginInitiation {
            pkce_verifier,
            sca_state,
        } => match state {
            PaymentState::Received => {
                let attempt = payment.initiation_attempts + 1;
                step.to(
                    PaymentState::Initiating { attempt },
                    |p| {
                        p.initiation_attempts = attempt;
                        p.pkce_verifier = pkce_verifier;
                        p.sca_state = Some(sca_state);
                        p.next_check_at = None;
                    },
                    vec![Effect::CallInitiate],
                )
            }
            other => stale_unless(other, &[]),
        },
        // Same attempt: a refused token created nothing at the bank, so nothing can be signed
        // twice and the attempt is not counted again.
        Input::FallBackToPkce { pkce_verifier } => match state {
            PaymentState::Initiating { .. } if payment.pkce_verifier.is_none() => step.same(
                |p| p.pkce_verifier = Some(pkce_verifier),
                vec![Effect::CallInitiate],
            ),
            other => stale_unless(other, &[]),
        },
        Input::BankInitiated {
            bank_payment_id,
            sca_redirect_url,
            bank_status,
        } => match state {
            PaymentState::Initiating { .. } => step.to(
                PaymentState::ScaPending,
                |p| {
                    p.bank_payment_id = Some(bank_payment_id);
                    p.sca_redirect_url = Some(match &p.sca_state {
                        Some(state) => sca_url_with_state(&sca_redirect_url, state),
                        None => sca_redirect_url,
                    });
                    p.bank_status = bank_status;
                    p.sca_deadline = Some(now + policy.sca_timeout_ms);
                    p.withdrawal = None;
                    p.next_check_at = Some(policy.poll_at(p, now));
                },
                vec![],
            ),
            other => stale_unless(other, &[]),
        },
        Input::InitiationFailed(failure) => match state {
            PaymentState::Initiating { attempt } => {
                initiation_failed(step, attempt, failure, payment, now, policy)
            }
            other => stale_unless(other, &[]),
        },
        Input::TokenExchanged | Input::TokenExchangeFailed { .. } => match state {
            PaymentState::Authorizing => step.same(
                |p| {
                    p.authorization_code = None;
                    p.pkce_verifier = None;
                    p.next_check_at = None;
                },
                vec![Effect::CheckStatus],
            ),
            // A late code exchanged for its token only: nothing else changes.
            PaymentState::Signed | PaymentState::Active if payment.authorization_code.is_some() => {
                step.same(
                    |p| {
                        p.authorization_code = None;
                        p.pkce_verifier = None;
                    },
                    vec![],
                )
            }
            other => stale_unless(other, &[]),
        },
        Input::StatusObserved {
            progress,
            bank_status,
        } => match state {
            PaymentState::ScaPending
            | PaymentState::Authorizing
            | PaymentState::PartiallySigned
            | PaymentState::Signed
            | PaymentState::Active
            | PaymentState::Cancelling
            | PaymentState::Unconfirmed => {
                observe_status(step, payment, progress, bank_status, now, policy)
            }
            other => stale_unless(other, &[]),
        },
        Input::StatusCheckFailed { .. } => match state {
            PaymentState::ScaPending
            | PaymentState::Authorizing
            | PaymentState::PartiallySigned
            | PaymentState::Signed
            | PaymentState::Active
            | PaymentState::Cancelling
            | PaymentState::Unconfirmed => step.same(
                |p| {
                    p.next_check_at = Some(policy.poll_at(p, now));
                    p.polls_in_state = p.polls_in_state.saturating_add(1);
                },
                vec![],
            ),
            other => stale_unless(other, &[]),
        },
        Input::CancelConfirmed { bank_status } => match state {
            PaymentState::Cancelling => step.to(
                PaymentState::Cancelled,
                |p| {
                    // A cancellation the bank confirmed without a body (204) is ISO CANC.
                    p.bank_status = Some(bank_status.unwrap_or_else(|| "CANC".into()));
                    p.reason = Some(Reason::new(
                        ReasonCode::CancelledByClient,
                        "cancelled at the bank at the client's request",
                    ));
                    p.resume_after_cancel = None;
                },
                vec![],
            ),
            // The bank ended the unsigned payment the worker asked it to end.
            PaymentState::ScaPending
            | PaymentState::PartiallySigned
            | PaymentState::Unconfirmed
                if payment.withdrawal.is_some() =>
            {
                end_withdrawal(
                    step,
                    payment,
                    Some(bank_status.unwrap_or_else(|| "CANC".into())),
                )
            }
            other => stale_unless(other, &[]),
        },
        Input::CancelRefused(reason) => match state {
            PaymentState::Cancelling => back_from_cancel(step, payment, reason, None, now, policy),
            // The bank would not end it (or there was no token to ask with): the bank's own
            // expiry, a refusal or a signature will show in the status. Keep watching.
            PaymentState::ScaPending
            | PaymentState::PartiallySigned
            | PaymentState::Unconfirmed
                if payment.withdrawal.is_some() =>
            {
                step.same(|p| p.next_check_at = Some(policy.poll_at(p, now)), vec![])
            }
            other => stale_unless(other, &[]),
        },
        // The DELETE may or may not have been applied: ask the bank.
        Input::CancelUnconfirmed { .. } => match state {
            PaymentState::Cancelling => {
                step.same(|p| p.next_check_at = None, vec![Effect::CheckStatus])
            }
            PaymentState::ScaPending
            | PaymentState::PartiallySigned
            | PaymentState::Unconfirmed
                if payment.withdrawal.is_some() =>
            {
                step.same(|p| p.next_check_at = None, vec![Effect::CheckStatus])
            }
            other => stale_unless(other, &[]),
        },
        Input::TimerFired => {
            let due = payment.next_check_at.is_some_and(|at| at <= now);
            if !due {
                return Outcome::Ignored(Ignored::Stale);
            }
            match state {
                PaymentState::Received => {
                    step.same(|p| p.next_check_at = None, vec![Effect::StartInitiation])
                }
                PaymentState::ScaPending
                | PaymentState::Authorizing
                | PaymentState::PartiallySigned
                | PaymentState::Signed
                | PaymentState::Active
                | PaymentState::Cancelling
                | PaymentState::Unconfirmed => {
                    step.same(|p| p.next_check_at = None, vec![Effect::CheckStatus])
                }
                PaymentState::OutcomeUnknown { attempt } => match policy.unknown_outcome {
                    UnknownOutcomePolicy::Reinitiate => reconcile(step, attempt, payment, policy),
                    // A timer set under the other policy: the payment now waits for a person.
                    UnknownOutcomePolicy::Hold => step.same(|p| p.next_check_at = None, vec![]),
                },
                other => stale_unless(other, &[]),
            }
        }
        Input::Restored => restored(step, payment, now, policy),
    }
}

/// `Ignored(Stale)` for an engine input that does not apply in `state`. The `match` inside is
/// exhaustive so a new state forces a look at every engine input.
fn stale_unless(state: PaymentState, _applies: &[StateKind]) -> Outcome {
    match state {
        PaymentState::Received
        | PaymentState::Initiating { .. }
        | PaymentState::ScaPending
        | PaymentState::Authorizing
        | PaymentState::PartiallySigned
        | PaymentState::Signed
        | PaymentState::Active
        | PaymentState::Cancelling
        | PaymentState::OutcomeUnknown { .. }
        | PaymentState::Unconfirmed
        | PaymentState::Settled
        | PaymentState::PartiallySettled
        | PaymentState::Completed
        | PaymentState::Cancelled
        | PaymentState::Rejected
        | PaymentState::Expired
        | PaymentState::Failed => Outcome::Ignored(Ignored::Stale),
    }
}

fn complete_sca(step: Step<'_>, payment: &Payment, outcome: ScaOutcome, now: Millis) -> Outcome {
    let state = payment.state;
    match state {
        PaymentState::ScaPending | PaymentState::PartiallySigned | PaymentState::Unconfirmed => {
            match outcome {
                ScaOutcome::Code(code) => step.to(
                    PaymentState::Authorizing,
                    |p| {
                        p.received_codes.push(code_digest(&code));
                        p.authorization_code = Some(code);
                        p.withdrawal = None;
                        p.next_check_at = None;
                    },
                    vec![Effect::ExchangeCode],
                ),
                // Not final yet: a forged or mistaken error must not stop the worker from
                // tracking a payment the PSU can still sign. The bank confirms first.
                ScaOutcome::Error { error, description } => {
                    let message = match description {
                        Some(d) => format!("PSU returned from SCA with error {error}: {d}"),
                        None => format!("PSU returned from SCA with error {error}"),
                    };
                    step.same(
                        |p| {
                            let (since, cancel_asked) = p
                                .withdrawal
                                .as_ref()
                                .map_or((now, false), |w| (w.since, w.cancel_asked));
                            p.withdrawal = Some(Withdrawal {
                                cause: WithdrawalCause::PsuRefused { message },
                                since,
                                cancel_asked,
                            });
                            p.next_check_at = None;
                        },
                        vec![Effect::CheckStatus],
                    )
                }
                // Initiated with the PSU's token: nothing to exchange. The redirect proves
                // nothing on its own (a withdrawal stays), so the bank's status tells, now.
                ScaOutcome::Returned if !payment.awaits_code() => {
                    step.same(|p| p.next_check_at = None, vec![Effect::CheckStatus])
                }
                ScaOutcome::Returned => code_required(),
            }
        }
        // A status poll saw the signature before the redirect's code arrived. The code still
        // carries the PSU's PIS token pair (needed to cancel later): exchange it, state unchanged.
        PaymentState::Signed | PaymentState::Active => match outcome {
            ScaOutcome::Code(code) => step.same(
                |p| {
                    p.received_codes.push(code_digest(&code));
                    p.authorization_code = Some(code);
                },
                vec![Effect::ExchangeCode],
            ),
            ScaOutcome::Error { .. } => refuse(
                RefusalCode::NotAwaitingSca,
                format!(
                    "payment is already {} at the bank; the SCA error is stale",
                    state.kind().symbol()
                ),
            ),
            // The poll already saw what this redirect announces: recorded, nothing to do.
            ScaOutcome::Returned if !payment.awaits_code() => step.same(|_| {}, vec![]),
            ScaOutcome::Returned => code_required(),
        },
        PaymentState::Received
        | PaymentState::Initiating { .. }
        | PaymentState::OutcomeUnknown { .. }
        | PaymentState::Authorizing
        | PaymentState::Cancelling => refuse(
            RefusalCode::NotAwaitingSca,
            format!(
                "payment is {}, not awaiting an SCA outcome",
                state.kind().symbol()
            ),
        ),
        PaymentState::Settled
        | PaymentState::PartiallySettled
        | PaymentState::Completed
        | PaymentState::Cancelled
        | PaymentState::Rejected
        | PaymentState::Expired
        | PaymentState::Failed => already_final(state),
    }
}

/// A PKCE attempt's redirect without its code: the client dropped it, and with it the PSU's
/// token pair. Refused (visible in the DLQ, replayable with the code) rather than polled past.
fn code_required() -> Outcome {
    refuse(
        RefusalCode::CodeRequired,
        "the payment was initiated with PKCE: its redirect carries the authorization code (`code`); hand back the redirect as the PSU's browser brought it",
    )
}

fn cancel(step: Step<'_>, state: PaymentState, bank_token: bool) -> Outcome {
    match state {
        // No bank-side payment whose SCA URL reached anyone exists yet, so the cancellation is
        // final here.
        PaymentState::Received
        | PaymentState::Initiating { .. }
        | PaymentState::OutcomeUnknown { .. } => step.to(
            PaymentState::Cancelled,
            |p| {
                p.reason = Some(Reason::new(
                    ReasonCode::CancelledByClient,
                    "cancelled by the client before the bank held a payment",
                ));
                p.next_check_at = None;
                p.pkce_verifier = None;
            },
            vec![],
        ),
        // The bank holds the payment: only the bank's cancellation (with the PSU's PIS token)
        // can stop it. A local "cancelled" while the PSU can still sign would be a lie.
        PaymentState::ScaPending
        | PaymentState::Authorizing
        | PaymentState::PartiallySigned
        | PaymentState::Signed
        | PaymentState::Active
        | PaymentState::Unconfirmed => {
            if bank_token {
                step.to(
                    PaymentState::Cancelling,
                    |p| {
                        p.resume_after_cancel = Some(state);
                        p.next_check_at = None;
                    },
                    vec![Effect::CallCancel],
                )
            } else {
                refuse(
                    RefusalCode::CancelNotPossible,
                    format!(
                        "payment is {} at the bank and the worker holds no PIS token for this PSU to cancel it",
                        state.kind().symbol()
                    ),
                )
            }
        }
        PaymentState::Cancelling => Outcome::Ignored(Ignored::CancelInProgress),
        PaymentState::Settled
        | PaymentState::PartiallySettled
        | PaymentState::Completed
        | PaymentState::Cancelled
        | PaymentState::Rejected
        | PaymentState::Expired
        | PaymentState::Failed => already_final(state),
    }
}

/// A person's decision (`ResolveOutcome`) on a payment the worker cannot resolve itself.
fn resolve(
    step: Step<'_>,
    payment: &Payment,
    resolution: Resolution,
    now: Millis,
    policy: &Policy,
) -> Outcome {
    let state = payment.state;
    let with_note = |text: &str, note: &Option<String>| match note {
        Some(note) => format!("{text}: {note}"),
        None => text.to_owned(),
    };
    match state {
        PaymentState::OutcomeUnknown { .. } => match resolution {
            // Checked at the bank: nothing of the unanswered attempt is there.
            Resolution::Reinitiate => step.silently(
                PaymentState::Received,
                |p| {
                    p.reason = None;
                    p.next_check_at = None;
                    p.pkce_verifier = None;
                },
                vec![Effect::StartInitiation],
            ),
            // The bank holds the unanswered attempt's payment: track it from its status.
            Resolution::Adopt { bank_payment_id } => step.to(
                PaymentState::ScaPending,
                |p| {
                    p.bank_payment_id = Some(bank_payment_id);
                    p.sca_redirect_url = None;
                    p.bank_status = None;
                    p.sca_deadline = Some(now + policy.sca_timeout_ms);
                    p.next_check_at = None;
                },
                vec![Effect::CheckStatus],
            ),
            Resolution::Abandon { note } => step.to(
                PaymentState::Failed,
                |p| {
                    p.reason = Some(Reason::new(
                        ReasonCode::OutcomeUnresolved,
                        with_note(
                            "resolved by a person: no payment of this attempt to track at the bank",
                            &note,
                        ),
                    ));
                },
                vec![],
            ),
        },
        PaymentState::Unconfirmed => match resolution {
            Resolution::Abandon { note } => step.to(
                PaymentState::Expired,
                |p| {
                    p.reason = Some(Reason::new(
                        ReasonCode::ScaExpired,
                        with_note(
                            "a person confirmed at the bank that it will not be executed",
                            &note,
                        ),
                    ));
                    p.withdrawal = None;
                },
                vec![],
            ),
            Resolution::Reinitiate | Resolution::Adopt { .. } => refuse(
                RefusalCode::ResolutionNotApplicable,
                "the worker already tracks this payment at the bank; only ABANDON applies",
            ),
        },
        PaymentState::Received
        | PaymentState::Initiating { .. }
        | PaymentState::ScaPending
        | PaymentState::Authorizing
        | PaymentState::PartiallySigned
        | PaymentState::Signed
        | PaymentState::Active
        | PaymentState::Cancelling => refuse(
            RefusalCode::ResolutionNotApplicable,
            format!(
                "payment is {}: ResolveOutcome applies to OUTCOME_UNKNOWN only",
                state.kind().symbol()
            ),
        ),
        PaymentState::Settled
        | PaymentState::PartiallySettled
        | PaymentState::Completed
        | PaymentState::Cancelled
        | PaymentState::Rejected
        | PaymentState::Expired
        | PaymentState::Failed => already_final(state),
    }
}

/// The bank did not cancel: back to where the payment was, saying why, and keep watching it.
fn back_from_cancel(
    step: Step<'_>,
    payment: &Payment,
    reason: Reason,
    bank_status: Option<String>,
    now: Millis,
    policy: &Policy,
) -> Outcome {
    let resume = payment.resume_after_cancel.unwrap_or(PaymentState::Signed);
    step.to(
        resume,
        |p| {
            if bank_status.is_some() {
                p.bank_status = bank_status;
            }
            p.reason = Some(reason);
            p.resume_after_cancel = None;
            p.next_check_at = Some(policy.poll_at(p, now));
        },
        vec![],
    )
}

/// The bank ended (RJCT or CANC) the unsigned payment the worker asked it to end.
fn end_withdrawal(step: Step<'_>, payment: &Payment, bank_status: Option<String>) -> Outcome {
    let (end, reason) = match &payment.withdrawal {
        Some(w) => w.cause.end(),
        None => WithdrawalCause::Deadline.end(),
    };
    step.to(
        end,
        |p| {
            if bank_status.is_some() {
                p.bank_status = bank_status;
            }
            p.reason = Some(reason);
            p.withdrawal = None;
            p.resume_after_cancel = None;
        },
        vec![],
    )
}

/// Why the outcome of an initiation is unknown, with what a person needs to look it up.
fn unknown_reason(
    payment: &Payment,
    attempt: u32,
    cause: &str,
    now: Millis,
    policy: &Policy,
) -> Reason {
    let message = match policy.unknown_outcome {
        UnknownOutcomePolicy::Reinitiate => cause.to_owned(),
        UnknownOutcomePolicy::Hold => format!(
            "{cause}; attempt {attempt}, end-to-end id {}, sent by {}: held until a person checks the bank and sends ResolveOutcome",
            end_to_end_id(payment),
            rfc3339(now)
        ),
    };
    Reason::new(ReasonCode::OutcomeUnresolved, message)
}

/// The timer of an unknown outcome: the reconciler's, or none while it waits for a person.
fn unknown_timer(now: Millis, policy: &Policy) -> Option<Millis> {
    match policy.unknown_outcome {
        UnknownOutcomePolicy::Reinitiate => Some(now + policy.reconcile_after_ms),
        UnknownOutcomePolicy::Hold => None,
    }
}

fn initiation_failed(
    step: Step<'_>,
    attempt: u32,
    failure: InitiationFailure,
    payment: &Payment,
    now: Millis,
    policy: &Policy,
) -> Outcome {
    match failure {
        InitiationFailure::Refused(reason) => step.to(
            PaymentState::Rejected,
            |p| {
                p.reason = Some(reason);
                p.pkce_verifier = None;
                p.next_check_at = None;
            },
            vec![],
        ),
        InitiationFailure::NotProcessed {
            message,
            retry_after_ms,
        } => {
            if attempt >= policy.max_initiation_attempts {
                step.to(
                    PaymentState::Failed,
                    |p| {
                        p.reason = Some(Reason::new(
                            ReasonCode::BankUnavailable,
                            format!(
                                "the bank did not process the initiation after {attempt} attempts: {message}"
                            ),
                        ));
                        p.pkce_verifier = None;
                        p.next_check_at = None;
                    },
                    vec![],
                )
            } else {
                // Back to Received: the next attempt starts after the bank's Retry-After, or the
                // policy's retry delay.
                let delay = retry_after_ms.map_or(policy.initiation_retry_ms, |ms| ms.max(0));
                step.silently(
                    PaymentState::Received,
                    |p| {
                        p.next_check_at = Some(now + delay);
                        p.pkce_verifier = None;
                    },
                    vec![],
                )
            }
        }
        InitiationFailure::Unknown { message } => {
            let reason = unknown_reason(
                payment,
                attempt,
                &format!("no answer to the initiation: {message}"),
                now,
                policy,
            );
            step.to(
                PaymentState::OutcomeUnknown { attempt },
                |p| {
                    p.reason = Some(reason);
                    p.next_check_at = unknown_timer(now, policy);
                },
                vec![],
            )
        }
    }
}

/// What to resume after a restart or rebalance. Timers in the record cover everything that was
/// waiting; this covers what was *in flight*, which leaves no timer behind.
fn restored(step: Step<'_>, payment: &Payment, now: Millis, policy: &Policy) -> Outcome {
    let no_timer = payment.next_check_at.is_none();
    let cancel_in_flight = payment.withdrawal.as_ref().is_some_and(|w| w.cancel_asked);
    match payment.state {
        // The previous owner may have sent the call and died before recording the answer.
        PaymentState::Initiating { attempt } => {
            let reason = unknown_reason(
                payment,
                attempt,
                "the worker stopped while the initiation call was in flight",
                now,
                policy,
            );
            step.to(
                PaymentState::OutcomeUnknown { attempt },
                |p| {
                    p.reason = Some(reason);
                    p.next_check_at = unknown_timer(now, policy);
                },
                vec![],
            )
        }
        // Exchange the code again if it was not yet exchanged; if it was, the bank refuses the
        // reused code and status polling carries the payment on.
        PaymentState::Authorizing | PaymentState::Signed | PaymentState::Active
            if payment.authorization_code.is_some() =>
        {
            step.same(|_| {}, vec![Effect::ExchangeCode])
        }
        PaymentState::Received if no_timer => step.same(|_| {}, vec![Effect::StartInitiation]),
        // The DELETE may never have been sent: send it again (idempotent at the bank). Only its
        // answer can take the payment back; a status check alone would read "still alive".
        PaymentState::Cancelling if no_timer => step.same(|_| {}, vec![Effect::CallCancel]),
        PaymentState::ScaPending | PaymentState::PartiallySigned | PaymentState::Unconfirmed
            if no_timer && cancel_in_flight =>
        {
            step.same(|_| {}, vec![Effect::CallCancel])
        }
        // A status check was in flight: the bank's status tells.
        PaymentState::ScaPending
        | PaymentState::Authorizing
        | PaymentState::PartiallySigned
        | PaymentState::Signed
        | PaymentState::Active
        | PaymentState::Unconfirmed
            if no_timer =>
        {
            step.same(|_| {}, vec![Effect::CheckStatus])
        }
        PaymentState::OutcomeUnknown { .. } if no_timer => match policy.unknown_outcome {
            UnknownOutcomePolicy::Reinitiate => step.same(
                |p| p.next_check_at = Some(now + policy.reconcile_after_ms),
                vec![],
            ),
            UnknownOutcomePolicy::Hold => Outcome::Ignored(Ignored::Stale),
        },
        PaymentState::Received
        | PaymentState::ScaPending
        | PaymentState::Authorizing
        | PaymentState::PartiallySigned
        | PaymentState::Signed
        | PaymentState::Active
        | PaymentState::Cancelling
        | PaymentState::OutcomeUnknown { .. }
        | PaymentState::Unconfirmed
        | PaymentState::Settled
        | PaymentState::PartiallySettled
        | PaymentState::Completed
        | PaymentState::Cancelled
        | PaymentState::Rejected
        | PaymentState::Expired
        | PaymentState::Failed => Outcome::Ignored(Ignored::Stale),
    }
}

fn already_final(state: PaymentState) -> Outcome {
    refuse(
        RefusalCode::AlreadyFinal,
        format!("payment is already final ({})", state.kind().symbol()),
    )
}

/// The reconciler's decision for an unknown outcome (policy `Reinitiate`): without a bank
/// payment id there is nothing to look up, so make a new attempt (recorded as such:
/// `initiation_attempts` grows). The unanswered attempt's payment may still exist at the bank
/// (docs/guarantees.md says when that can move money twice).
fn reconcile(step: Step<'_>, attempt: u32, payment: &Payment, policy: &Policy) -> Outcome {
    if attempt >= policy.max_initiation_attempts {
        let attempts = payment.initiation_attempts;
        return step.to(
            PaymentState::Failed,
            |p| {
                p.reason = Some(Reason::new(
                    ReasonCode::OutcomeUnresolved,
                    format!("initiation outcome unknown after {attempts} attempts"),
                ));
                p.pkce_verifier = None;
                p.next_check_at = None;
            },
            vec![],
        );
    }
    step.silently(
        PaymentState::Received,
        |p| {
            p.next_check_at = None;
            p.pkce_verifier = None;
        },
        vec![Effect::StartInitiation],
    )
}

/// Where a bank status takes a payment, by the kind of order: a signed standing order is
/// `Active` and an ended one `Completed`; a bulk with rejected transfers is `PartiallySettled`.
/// A payment still waiting for its signature stays where it is (the deadline is handled by
/// `still_unsigned`).
fn target_for(
    state: PaymentState,
    progress: BankProgress,
    kind: Option<PaymentKind>,
) -> PaymentState {
    let standing = kind == Some(PaymentKind::Periodic);
    match progress {
        BankProgress::AwaitingSca => state,
        BankProgress::PartiallySigned if state == PaymentState::Unconfirmed => state,
        BankProgress::PartiallySigned => PaymentState::PartiallySigned,
        BankProgress::Signed if standing => PaymentState::Active,
        BankProgress::Signed => PaymentState::Signed,
        BankProgress::Settled if standing => PaymentState::Completed,
        BankProgress::Settled => PaymentState::Settled,
        BankProgress::PartiallyAccepted => PaymentState::PartiallySettled,
        BankProgress::Rejected => PaymentState::Rejected,
        BankProgress::Cancelled => PaymentState::Cancelled,
    }
}

fn observe_status(
    step: Step<'_>,
    payment: &Payment,
    progress: BankProgress,
    bank_status: String,
    now: Millis,
    policy: &Policy,
) -> Outcome {
    let state = payment.state;
    let kind = payment.order.as_ref().map(Order::kind);
    let target = target_for(state, progress, kind);
    if state == PaymentState::Cancelling {
        return match target.kind() {
            // Cancelled, or final by other means (settled before the cancellation took hold).
            StateKind::Cancelled
            | StateKind::Settled
            | StateKind::PartiallySettled
            | StateKind::Completed
            | StateKind::Rejected
            | StateKind::Expired
            | StateKind::Failed => status_transition(step, state, target, bank_status, now, policy),
            // Still alive at the bank: the cancellation did not happen.
            StateKind::Received
            | StateKind::Initiating
            | StateKind::ScaPending
            | StateKind::Authorizing
            | StateKind::PartiallySigned
            | StateKind::Signed
            | StateKind::Active
            | StateKind::Cancelling
            | StateKind::OutcomeUnknown => back_from_cancel(
                step,
                payment,
                Reason::new(
                    ReasonCode::CancelNotConfirmed,
                    format!("the bank still reports {bank_status} after the cancellation request"),
                ),
                Some(bank_status),
                now,
                policy,
            ),
        };
    }
    if !awaiting_signature(state) {
        return status_transition(step, state, target, bank_status, now, policy);
    }
    match progress {
        BankProgress::AwaitingSca | BankProgress::PartiallySigned => {
            still_unsigned(step, payment, target, bank_status, now, policy)
        }
        // The bank ended it: as the worker asked, or on its own.
        BankProgress::Rejected | BankProgress::Cancelled if payment.withdrawal.is_some() => {
            end_withdrawal(step, payment, Some(bank_status))
        }
        // Rejected before any signature: the PSU refused in the bank's screens, or the bank's
        // own SCA session ended. The same code as a refusal through the redirect.
        BankProgress::Rejected => step.to(
            PaymentState::Rejected,
            |p| {
                p.reason = Some(Reason::new(
                    ReasonCode::ScaFailed,
                    format!(
                        "the bank reports {bank_status} before the payment was signed: the PSU refused or the bank's SCA session ended"
                    ),
                ));
                p.bank_status = Some(bank_status);
                p.next_check_at = None;
            },
            vec![],
        ),
        BankProgress::Signed
        | BankProgress::Settled
        | BankProgress::PartiallyAccepted
        | BankProgress::Cancelled => status_transition(step, state, target, bank_status, now, policy),
    }
}

/// The bank still waits for the PSU's signature. Past the SCA deadline the worker asks the bank
/// to end the payment and keeps watching: it is `EXPIRED` only when the bank agrees, and after
/// `expiry_horizon_ms` without an answer it is `OUTCOME_UNKNOWN` (`Unconfirmed`).
fn still_unsigned(
    step: Step<'_>,
    payment: &Payment,
    target: PaymentState,
    bank_status: String,
    now: Millis,
    policy: &Policy,
) -> Outcome {
    let past_deadline = payment.sca_deadline.is_some_and(|d| now >= d);
    match &payment.withdrawal {
        None if past_deadline => step.to(
            target,
            |p| {
                p.bank_status = Some(bank_status);
                p.withdrawal = Some(Withdrawal {
                    cause: WithdrawalCause::Deadline,
                    since: now,
                    cancel_asked: true,
                });
                p.next_check_at = None;
            },
            vec![Effect::CallCancel],
        ),
        None => status_transition(step, payment.state, target, bank_status, now, policy),
        Some(w) if !w.cancel_asked => step.to(
            target,
            |p| {
                p.bank_status = Some(bank_status);
                if let Some(w) = p.withdrawal.as_mut() {
                    w.cancel_asked = true;
                }
                p.next_check_at = None;
            },
            vec![Effect::CallCancel],
        ),
        Some(w)
            if now >= w.since + policy.expiry_horizon_ms && target != PaymentState::Unconfirmed =>
        {
            let since = rfc3339(w.since);
            step.to(
                PaymentState::Unconfirmed,
                |p| {
                    p.bank_status = Some(bank_status);
                    p.reason = Some(Reason::new(
                        ReasonCode::ExpiryUnconfirmed,
                        format!(
                            "the worker asked the bank to end this unsigned payment at {since} and the bank still reports it waiting for a signature; the PSU may still sign it"
                        ),
                    ));
                    p.next_check_at = Some(policy.poll_at(p, now));
                },
                vec![],
            )
        }
        Some(_) => step.to(
            target,
            |p| {
                p.bank_status = Some(bank_status);
                p.next_check_at = Some(policy.poll_at(p, now));
                p.polls_in_state = p.polls_in_state.saturating_add(1);
            },
            vec![],
        ),
    }
}

fn status_transition(
    step: Step<'_>,
    state: PaymentState,
    target: PaymentState,
    bank_status: String,
    now: Millis,
    policy: &Policy,
) -> Outcome {
    let reason = match target.kind() {
        StateKind::Expired => Some(Reason::new(
            ReasonCode::ScaExpired,
            "the PSU did not sign before the SCA deadline",
        )),
        StateKind::Rejected => Some(Reason::new(
            ReasonCode::BankRejected,
            format!("the bank reports status {bank_status}"),
        )),
        StateKind::Cancelled => Some(Reason::new(
            ReasonCode::CancelledAtBank,
            format!("the bank reports status {bank_status}"),
        )),
        StateKind::PartiallySettled => Some(Reason::new(
            ReasonCode::BulkPartiallyRejected,
            format!("the bank reports status {bank_status}: some transfers were rejected"),
        )),
        StateKind::Received
        | StateKind::Initiating
        | StateKind::ScaPending
        | StateKind::Authorizing
        | StateKind::PartiallySigned
        | StateKind::Signed
        | StateKind::Settled
        | StateKind::OutcomeUnknown
        | StateKind::Failed
        | StateKind::Active
        | StateKind::Cancelling
        | StateKind::Completed => None,
    };
    if target.kind() == state.kind() {
        return step.same(
            |p| {
                p.bank_status = Some(bank_status);
                p.next_check_at = Some(policy.poll_at(p, now));
                p.polls_in_state = p.polls_in_state.saturating_add(1);
            },
            vec![],
        );
    }
    step.to(
        target,
        |p| {
            p.bank_status = Some(bank_status);
            p.reason = reason;
            p.resume_after_cancel = None;
            if !awaiting_signature(target) {
                p.withdrawal = None;
            }
            p.next_check_at = if target.is_terminal() {
                None
            } else {
                Some(policy.poll_at(p, now))
            };
        },
        vec![],
    )
}

/// Builds a transition from the current record: bumps `updated_at`, remembers the command id,
/// and emits an event exactly when the state kind changes.
struct Step<'a> {
    base: std::borrow::Cow<'a, Payment>,
    command_id: Option<CommandId>,
    causation: String,
    now: Millis,
    remembered: usize,
}

impl<'a> Step<'a> {
    fn new(payment: &'a Payment, input: &Input, now: Millis, policy: &Policy) -> Self {
        Step {
            base: std::borrow::Cow::Borrowed(payment),
            command_id: input.command_id().cloned(),
            causation: input.causation(),
            now,
            remembered: policy.remembered_commands,
        }
    }

    /// A brand-new payment: its first transition always emits.
    fn from(payment: Payment, now: Millis) -> Step<'static> {
        let causation = payment
            .seen_commands
            .first()
            .map(|c| c.to_string())
            .unwrap_or_default();
        Step {
            base: std::borrow::Cow::Owned(payment),
            command_id: None,
            causation,
            now,
            remembered: usize::MAX,
        }
    }

    fn prepare(&self) -> Payment {
        let mut next = self.base.clone().into_owned();
        next.updated_at = self.now;
        if let Some(command_id) = &self.command_id {
            next.seen_commands.push(command_id.clone());
            if next.seen_commands.len() > self.remembered {
                let excess = next.seen_commands.len() - self.remembered;
                next.seen_commands.drain(..excess);
            }
        }
        next
    }

    /// Moves to `target`, emitting an event when its kind differs from the last one published.
    fn to(
        self,
        target: PaymentState,
        edit: impl FnOnce(&mut Payment),
        effects: Vec<Effect>,
    ) -> Outcome {
        let previous_kind = self.base.state.kind();
        let mut next = self.prepare();
        next.state = target;
        if target.kind() != previous_kind {
            next.polls_in_state = 0;
            // A reason explains the state it was given with (e.g. OUTCOME_UNKNOWN), not later ones.
            next.reason = None;
        }
        edit(&mut next);
        if target.is_terminal() {
            // Secrets have no use after the end.
            next.pkce_verifier = None;
            next.authorization_code = None;
            next.next_check_at = None;
        }
        let mut events = Vec::new();
        if next.last_published != Some(target.kind()) {
            next.sequence += 1;
            next.last_published = Some(target.kind());
            events.push(StatusEvent {
                payment_id: next.payment_id.clone(),
                psu_id: next.psu_id.clone(),
                sequence: next.sequence,
                state: target.kind(),
                bank_status: next.bank_status.clone(),
                bank_payment_id: next.bank_payment_id.clone(),
                sca_redirect_url: match target.kind() {
                    StateKind::ScaPending => next.sca_redirect_url.clone(),
                    StateKind::Received
                    | StateKind::Initiating
                    | StateKind::Authorizing
                    | StateKind::PartiallySigned
                    | StateKind::Signed
                    | StateKind::Settled
                    | StateKind::Cancelled
                    | StateKind::Rejected
                    | StateKind::Expired
                    | StateKind::Failed
                    | StateKind::OutcomeUnknown
                    | StateKind::Active
                    | StateKind::Cancelling
                    | StateKind::PartiallySettled
                    | StateKind::Completed => None,
                },
                reason: next.reason.clone(),
                causation_id: self.causation.clone(),
                occurred_at: self.now,
                // Evidence comes from reading the debtor's history, later than any transition.
                settlement: None,
            });
        }
        Outcome::Changed(Box::new(Transition {
            payment: next,
            events,
            effects,
        }))
    }

    /// Stays in the same state, updating data only: no event.
    fn same(self, edit: impl FnOnce(&mut Payment), effects: Vec<Effect>) -> Outcome {
        let mut next = self.prepare();
        edit(&mut next);
        Outcome::Changed(Box::new(Transition {
            payment: next,
            events: Vec::new(),
            effects,
        }))
    }

    /// Changes the state without emitting an event: only for going back to `Received` before a
    /// new initiation attempt, where clients gain nothing from a status flip-flop (the next
    /// `INITIATING` is not re-published either, as it equals the last published kind, or follows
    /// `OUTCOME_UNKNOWN`).
    fn silently(
        self,
        target: PaymentState,
        edit: impl FnOnce(&mut Payment),
        effects: Vec<Effect>,
    ) -> Outcome {
        let mut next = self.prepare();
        next.state = target;
        edit(&mut next);
        Outcome::Changed(Box::new(Transition {
            payment: next,
            events: Vec::new(),
            effects,
        }))
    }
}

/// Exposes a secret for the engine's bank call. Kept here so every exposure is greppable.
pub fn expose(secret: &SecretString) -> &str {
    secret.expose_secret()
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
