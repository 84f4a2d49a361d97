//! Unit tests of the payment state machine against its intended lifecycle semantics: an
//! exhaustive (state × input) table, focused lifecycle scenarios, and property tests over random
//! input sequences.

use std::collections::BTreeSet;

use chrono::NaiveDate;
use proptest::prelude::*;

use super::*;
use crate::domain::model::{
    Amount, Brand, BulkEntry, BulkOrder, Frequency, Language, PaymentOrder, PaymentProduct,
    StandingOrder,
};

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// Start of every scenario.
const T0: Millis = 1_700_000_000_000;
/// Table time: every status-poll, retry or reconcile timer set while building the representative
/// records is due, and no SCA deadline (15 minutes under the default policy) has passed. An
/// active standing order's poll (an hour under the default policy) is not yet due.
const NOW: Millis = T0 + 60_000;
/// Table time before any timer set while building the representative records.
const EARLY: Millis = T0 + 500;
/// Table time past every SCA deadline of the representative records.
const LATE: Millis = T0 + 20 * 60 * 1000;
/// Table time past every timer of the representative records, the standing-order poll included.
const HOURS: Millis = T0 + 2 * 60 * 60 * 1000;

fn payment_id() -> PaymentId {
    PaymentId::new("pay-0001")
}

fn psu() -> PsuId {
    PsuId::new("psu-alice")
}

fn other_psu() -> PsuId {
    PsuId::new("psu-mallory")
}

fn order() -> PaymentOrder {
    PaymentOrder {
        product: PaymentProduct::SepaCreditTransfers,
        brand: Brand::Belfius,
        amount: Amount::from_minor(1234),
        currency: "EUR".into(),
        creditor_name: "Alice Dupont".into(),
        creditor_iban: "BE68539007547034".into(),
        creditor_bic: Some("GKCCBEBB".into()),
        debtor_iban: None,
        end_to_end_id: "e2e-0001".into(),
        remittance_information: Some("invoice 42".into()),
        requested_execution_date: None,
        language: Language::Nl,
        redirect_uri: "https://shop.example/return".into(),
        cross_border: None,
    }
}

fn other_order() -> PaymentOrder {
    PaymentOrder {
        amount: Amount::from_minor(9900),
        ..order()
    }
}

fn date(year: i32, month: u32, day: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(year, month, day).expect("a valid date")
}

/// A monthly standing order of the single order's transfer.
fn standing_order() -> Order {
    Order::Standing(StandingOrder {
        order: PaymentOrder {
            end_to_end_id: "e2e-standing".into(),
            ..order()
        },
        start_date: date(2030, 1, 15),
        end_date: Some(date(2030, 12, 15)),
        frequency: Frequency::Monthly,
        day_of_execution: Some(15),
    })
}

/// A bulk of two transfers.
fn bulk_order() -> Order {
    let entry = |n: u32, minor: i64| BulkEntry {
        amount: Amount::from_minor(minor),
        currency: "EUR".into(),
        creditor_name: format!("Creditor {n}"),
        creditor_iban: "BE68539007547034".into(),
        creditor_bic: None,
        end_to_end_id: format!("e2e-bulk-{n}"),
        remittance_information: Some(format!("salary {n}")),
    };
    Order::Bulk(BulkOrder {
        product: PaymentProduct::SepaCreditTransfers,
        brand: Brand::Belfius,
        debtor_iban: Some("BE71096123456769".into()),
        batch_booking: true,
        requested_execution_date: None,
        payments: vec![entry(1, 100_000), entry(2, 250_000)],
        language: Language::Fr,
        redirect_uri: "https://shop.example/return".into(),
    })
}

fn cmd(id: &str) -> CommandId {
    CommandId::new(id)
}

fn initiate(command_id: CommandId) -> Input {
    initiate_order(command_id, order().into())
}

fn initiate_order(command_id: CommandId, order: Order) -> Input {
    Input::Initiate {
        command_id,
        psu_id: psu(),
        order,
        always_pkce: false,
    }
}

fn initiate_invalid(command_id: CommandId) -> Input {
    Input::InitiateInvalid {
        command_id,
        psu_id: psu(),
        reason: Reason::new(ReasonCode::InvalidIban, "creditor IBAN checksum"),
    }
}

/// The OAuth `state` of every initiation attempt of these tests (`begin`).
const SCA_STATE: &str = "state-0123456789";

fn sca_code(command_id: CommandId) -> Input {
    sca_code_with(command_id, "auth-code-123", Some(SCA_STATE))
}

fn sca_code_with(command_id: CommandId, code: &str, state: Option<&str>) -> Input {
    Input::CompleteSca {
        command_id,
        psu_id: psu(),
        outcome: ScaOutcome::Code(SecretString::from(code)),
        state: state.map(str::to_owned),
    }
}

/// The redirect of a payment initiated with the PSU's token: the state only.
fn sca_returned(command_id: CommandId) -> Input {
    Input::CompleteSca {
        command_id,
        psu_id: psu(),
        outcome: ScaOutcome::Returned,
        state: Some(SCA_STATE.into()),
    }
}

fn sca_error(command_id: CommandId) -> Input {
    Input::CompleteSca {
        command_id,
        psu_id: psu(),
        outcome: ScaOutcome::Error {
            error: "access_denied".into(),
            description: Some("the PSU declined".into()),
        },
        state: Some(SCA_STATE.into()),
    }
}

fn resolve(command_id: CommandId, resolution: Resolution) -> Input {
    Input::Resolve {
        command_id,
        psu_id: psu(),
        resolution,
    }
}

fn adopt() -> Resolution {
    Resolution::Adopt {
        bank_payment_id: BankPaymentId::new("bank-orphan-1"),
    }
}

fn abandon() -> Resolution {
    Resolution::Abandon {
        note: Some("nothing at the bank".into()),
    }
}

/// A cancellation; `bank_token`: whether the worker holds a PIS token for the PSU.
fn cancel(command_id: CommandId, bank_token: bool) -> Input {
    Input::Cancel {
        command_id,
        psu_id: psu(),
        bank_token,
    }
}

fn refresh(command_id: CommandId) -> Input {
    Input::RefreshStatus {
        command_id,
        psu_id: psu(),
    }
}

fn begin() -> Input {
    Input::BeginInitiation {
        pkce_verifier: Some(SecretString::from("pkce-verifier-0123456789")),
        sca_state: SCA_STATE.into(),
    }
}

/// An attempt the owner initiates with the PSU's access token: no verifier.
fn begin_with_token() -> Input {
    Input::BeginInitiation {
        pkce_verifier: None,
        sca_state: SCA_STATE.into(),
    }
}

fn fall_back_to_pkce() -> Input {
    Input::FallBackToPkce {
        pkce_verifier: SecretString::from("pkce-verifier-fallback"),
    }
}

fn bank_initiated() -> Input {
    Input::BankInitiated {
        bank_payment_id: BankPaymentId::new("bank-pay-77"),
        sca_redirect_url: "https://bank.example/sca/77".into(),
        bank_status: Some("RCVD".into()),
    }
}

fn initiation_refused() -> Input {
    Input::InitiationFailed(InitiationFailure::Refused(Reason::new(
        ReasonCode::BankRejected,
        "400 FORMAT_ERROR",
    )))
}

fn not_processed() -> Input {
    Input::InitiationFailed(InitiationFailure::NotProcessed {
        message: "connection refused".into(),
        retry_after_ms: None,
    })
}

/// A 429 whose `Retry-After` (7 s) differs from the policy's retry delay.
fn rate_limited() -> Input {
    Input::InitiationFailed(InitiationFailure::NotProcessed {
        message: "rate limited by the bank (HTTP 429, Retry-After 7 s)".into(),
        retry_after_ms: Some(7_000),
    })
}

fn outcome_unknown() -> Input {
    Input::InitiationFailed(InitiationFailure::Unknown {
        message: "read timeout".into(),
    })
}

fn observed(progress: BankProgress) -> Input {
    let bank_status = match progress {
        BankProgress::AwaitingSca => "RCVD",
        BankProgress::PartiallySigned => "PATC",
        BankProgress::Signed => "ACTC",
        BankProgress::Settled => "ACSC",
        BankProgress::PartiallyAccepted => "PART",
        BankProgress::Rejected => "RJCT",
        BankProgress::Cancelled => "CANC",
    };
    Input::StatusObserved {
        progress,
        bank_status: bank_status.into(),
    }
}

fn check_failed() -> Input {
    Input::StatusCheckFailed {
        message: "503".into(),
    }
}

fn cancel_confirmed(bank_status: Option<&str>) -> Input {
    Input::CancelConfirmed {
        bank_status: bank_status.map(str::to_string),
    }
}

fn cancel_refused_reason() -> Reason {
    Reason::new(
        ReasonCode::CancelRefused,
        "409 CANCELLATION_INVALID: the payment can no longer be cancelled",
    )
}

fn cancel_refused() -> Input {
    Input::CancelRefused(cancel_refused_reason())
}

fn cancel_unconfirmed() -> Input {
    Input::CancelUnconfirmed {
        message: "read timeout".into(),
    }
}

fn reason_code(p: &Payment) -> Option<ReasonCode> {
    p.reason.as_ref().map(|r| r.code)
}

fn event_reason_code(e: &StatusEvent) -> Option<ReasonCode> {
    e.reason.as_ref().map(|r| r.code)
}

/// The psu_id a command carries (`Input::psu_id` is private to the machine).
fn command_psu(input: &Input) -> Option<&PsuId> {
    match input {
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

/// Every input variant and sub-variant, by name. Exhaustive on purpose: a new variant fails to
/// compile here until the table covers it.
fn input_key(input: &Input) -> &'static str {
    match input {
        Input::Initiate { order, .. } => match order {
            Order::Single(_) => "Initiate(Single)",
            Order::Standing(_) => "Initiate(Standing)",
            Order::Bulk(_) => "Initiate(Bulk)",
        },
        Input::InitiateInvalid { .. } => "InitiateInvalid",
        Input::CompleteSca {
            outcome: ScaOutcome::Code(_),
            ..
        } => "CompleteSca(Code)",
        Input::CompleteSca {
            outcome: ScaOutcome::Error { .. },
            ..
        } => "CompleteSca(Error)",
        Input::CompleteSca {
            outcome: ScaOutcome::Returned,
            ..
        } => "CompleteSca(Returned)",
        Input::Cancel {
            bank_token: true, ..
        } => "Cancel(token)",
        Input::Cancel {
            bank_token: false, ..
        } => "Cancel(no token)",
        Input::RefreshStatus { .. } => "RefreshStatus",
        Input::Resolve {
            resolution: Resolution::Reinitiate,
            ..
        } => "Resolve(Reinitiate)",
        Input::Resolve {
            resolution: Resolution::Adopt { .. },
            ..
        } => "Resolve(Adopt)",
        Input::Resolve {
            resolution: Resolution::Abandon { .. },
            ..
        } => "Resolve(Abandon)",
        Input::BeginInitiation {
            pkce_verifier: Some(_),
            ..
        } => "BeginInitiation(PKCE)",
        Input::BeginInitiation {
            pkce_verifier: None,
            ..
        } => "BeginInitiation(token)",
        Input::FallBackToPkce { .. } => "FallBackToPkce",
        Input::BankInitiated { .. } => "BankInitiated",
        Input::InitiationFailed(InitiationFailure::Refused(_)) => "InitiationFailed(Refused)",
        Input::InitiationFailed(InitiationFailure::NotProcessed {
            retry_after_ms: None,
            ..
        }) => "InitiationFailed(NotProcessed)",
        Input::InitiationFailed(InitiationFailure::NotProcessed {
            retry_after_ms: Some(_),
            ..
        }) => "InitiationFailed(NotProcessed, Retry-After)",
        Input::InitiationFailed(InitiationFailure::Unknown { .. }) => "InitiationFailed(Unknown)",
        Input::TokenExchanged => "TokenExchanged",
        Input::TokenExchangeFailed { .. } => "TokenExchangeFailed",
        Input::StatusObserved { progress, .. } => match progress {
            BankProgress::AwaitingSca => "StatusObserved(AwaitingSca)",
            BankProgress::PartiallySigned => "StatusObserved(PartiallySigned)",
            BankProgress::Signed => "StatusObserved(Signed)",
            BankProgress::Settled => "StatusObserved(Settled)",
            BankProgress::PartiallyAccepted => "StatusObserved(PartiallyAccepted)",
            BankProgress::Rejected => "StatusObserved(Rejected)",
            BankProgress::Cancelled => "StatusObserved(Cancelled)",
        },
        Input::StatusCheckFailed { .. } => "StatusCheckFailed",
        Input::CancelConfirmed {
            bank_status: Some(_),
        } => "CancelConfirmed(status)",
        Input::CancelConfirmed { bank_status: None } => "CancelConfirmed(no status)",
        Input::CancelRefused(_) => "CancelRefused",
        Input::CancelUnconfirmed { .. } => "CancelUnconfirmed",
        Input::TimerFired => "TimerFired",
        Input::Restored => "Restored",
    }
}

const ALL_INPUT_KEYS: [&str; 37] = [
    "Initiate(Single)",
    "Initiate(Standing)",
    "Initiate(Bulk)",
    "InitiateInvalid",
    "CompleteSca(Code)",
    "CompleteSca(Error)",
    "CompleteSca(Returned)",
    "Cancel(token)",
    "Cancel(no token)",
    "RefreshStatus",
    "Resolve(Reinitiate)",
    "Resolve(Adopt)",
    "Resolve(Abandon)",
    "BeginInitiation(PKCE)",
    "BeginInitiation(token)",
    "FallBackToPkce",
    "BankInitiated",
    "InitiationFailed(Refused)",
    "InitiationFailed(NotProcessed)",
    "InitiationFailed(NotProcessed, Retry-After)",
    "InitiationFailed(Unknown)",
    "TokenExchanged",
    "TokenExchangeFailed",
    "StatusObserved(AwaitingSca)",
    "StatusObserved(PartiallySigned)",
    "StatusObserved(Signed)",
    "StatusObserved(Settled)",
    "StatusObserved(PartiallyAccepted)",
    "StatusObserved(Rejected)",
    "StatusObserved(Cancelled)",
    "StatusCheckFailed",
    "CancelConfirmed(status)",
    "CancelConfirmed(no status)",
    "CancelRefused",
    "CancelUnconfirmed",
    "TimerFired",
    "Restored",
];

fn summary(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Changed(t) => format!(
            "Changed(to {:?}, events {:?}, effects {:?})",
            t.payment.state,
            t.events.iter().map(|e| e.state).collect::<Vec<_>>(),
            t.effects
        ),
        Outcome::Ignored(why) => format!("Ignored({why:?})"),
        Outcome::Refused(refusal) => format!("Refused({:?}: {})", refusal.code, refusal.message),
    }
}

fn has_secrets(p: &Payment) -> bool {
    p.pkce_verifier.is_some() || p.authorization_code.is_some()
}

/// One payment driven through the machine, with every event it published.
#[derive(Clone)]
struct Run {
    policy: Policy,
    now: Millis,
    payment: Option<Payment>,
    events: Vec<StatusEvent>,
    effects: Vec<Vec<Effect>>,
    commands: u32,
}

impl Run {
    fn new() -> Self {
        Self::with_policy(Policy::default())
    }

    fn with_policy(policy: Policy) -> Self {
        Run {
            policy,
            now: T0,
            payment: None,
            events: Vec::new(),
            effects: Vec::new(),
            commands: 0,
        }
    }

    fn payment(&self) -> &Payment {
        self.payment.as_ref().expect("no payment yet")
    }

    fn kind(&self) -> StateKind {
        self.payment().state.kind()
    }

    fn event_kinds(&self) -> Vec<StateKind> {
        self.events.iter().map(|e| e.state).collect()
    }

    fn sequences(&self) -> Vec<u64> {
        self.events.iter().map(|e| e.sequence).collect()
    }

    /// A fresh command id.
    fn cmd(&mut self) -> CommandId {
        self.commands += 1;
        CommandId::new(format!("cmd-{}", self.commands))
    }

    /// The next input is applied exactly at `at`.
    fn next_at(&mut self, at: Millis) {
        self.now = at - 1;
    }

    /// The next input is applied exactly when the record's timer is due.
    fn next_at_timer(&mut self) {
        let at = self.payment().next_check_at.expect("no timer set");
        self.next_at(at);
    }

    /// Applies `input` 1 ms after the previous one, keeping the result when it is a change.
    fn apply(&mut self, input: Input) -> Outcome {
        self.now += 1;
        let outcome = decide(
            &payment_id(),
            self.payment.as_ref(),
            input,
            self.now,
            &self.policy,
        );
        if let Outcome::Changed(t) = &outcome {
            self.payment = Some(t.payment.clone());
            self.events.extend(t.events.iter().cloned());
            self.effects.push(t.effects.clone());
        }
        outcome
    }

    /// Applies `input`, which must change the payment.
    #[track_caller]
    fn step(&mut self, input: Input) -> Transition {
        let label = input_key(&input);
        let from = self.payment.as_ref().map(|p| p.state);
        match self.apply(input) {
            Outcome::Changed(t) => *t,
            other => panic!(
                "{label} on {from:?}: expected a change, got {}",
                summary(&other)
            ),
        }
    }

    fn initiate(&mut self) -> Transition {
        self.initiate_order(order().into())
    }

    fn initiate_order(&mut self, order: Order) -> Transition {
        let id = self.cmd();
        self.step(initiate_order(id, order))
    }
}

// Realistic records, reached through the machine itself.

fn received_with(order: Order) -> Run {
    let mut run = Run::new();
    run.initiate_order(order);
    run
}

fn initiating_with(order: Order) -> Run {
    let mut run = received_with(order);
    run.step(begin());
    run
}

fn sca_pending_with(order: Order) -> Run {
    let mut run = initiating_with(order);
    run.step(bank_initiated());
    run
}

fn authorizing_with(order: Order) -> Run {
    let mut run = sca_pending_with(order);
    let id = run.cmd();
    run.step(sca_code(id));
    run
}

/// Signed through the SCA redirect (a single or bulk order: a standing order becomes active).
fn signed_with(order: Order) -> Run {
    let mut run = authorizing_with(order);
    run.step(Input::TokenExchanged);
    run.step(observed(BankProgress::Signed));
    run
}

/// The bank holds the payment and the PSU's token is at hand: the cancellation is under way.
fn cancelling_from(mut run: Run) -> Run {
    let id = run.cmd();
    run.step(cancel(id, true));
    run
}

fn received() -> Run {
    received_with(order().into())
}

fn initiating() -> Run {
    initiating_with(order().into())
}

fn sca_pending() -> Run {
    sca_pending_with(order().into())
}

/// A returning PSU: the owner initiates with the PSU's access token (no verifier).
fn initiating_with_token() -> Run {
    let mut run = received();
    run.step(begin_with_token());
    run
}

fn sca_pending_with_token() -> Run {
    let mut run = initiating_with_token();
    run.step(bank_initiated());
    run
}

fn authorizing() -> Run {
    authorizing_with(order().into())
}

fn partially_signed() -> Run {
    let mut run = sca_pending();
    run.step(observed(BankProgress::PartiallySigned));
    run
}

fn signed() -> Run {
    signed_with(order().into())
}

/// A standing order the bank reports signed.
fn active() -> Run {
    let mut run = sca_pending_with(standing_order());
    run.step(observed(BankProgress::Signed));
    run
}

fn cancelling() -> Run {
    cancelling_from(signed())
}

fn settled() -> Run {
    let mut run = signed();
    run.step(observed(BankProgress::Settled));
    run
}

/// A bulk with some of its transfers rejected.
fn partially_settled() -> Run {
    let mut run = signed_with(bulk_order());
    run.step(observed(BankProgress::PartiallyAccepted));
    run
}

/// A standing order that ran to its end.
fn completed() -> Run {
    let mut run = active();
    run.step(observed(BankProgress::Settled));
    run
}

fn cancelled() -> Run {
    let mut run = received();
    let id = run.cmd();
    run.step(cancel(id, false));
    run
}

/// The PSU refused through the redirect, and the bank confirms.
fn rejected() -> Run {
    let mut run = sca_pending();
    let id = run.cmd();
    run.step(sca_error(id));
    run.step(observed(BankProgress::Rejected));
    run
}

/// Past the SCA deadline the worker asks the bank to cancel; the bank confirms.
fn expired() -> Run {
    let mut run = past_deadline();
    run.step(cancel_confirmed(None));
    run
}

/// The SCA deadline passed with the bank still waiting: the cancellation is asked for.
fn past_deadline() -> Run {
    let mut run = sca_pending();
    let deadline = run.payment().sca_deadline.expect("deadline");
    run.next_at(deadline);
    run.step(observed(BankProgress::AwaitingSca));
    run
}

/// Past the deadline, no token to cancel with, and the bank silent past the horizon.
fn unconfirmed() -> Run {
    let mut run = past_deadline();
    run.step(cancel_refused());
    let since = run.payment().withdrawal.as_ref().expect("withdrawal").since;
    run.next_at(since + run.policy.expiry_horizon_ms);
    run.step(observed(BankProgress::AwaitingSca));
    assert_eq!(run.payment().state, PaymentState::Unconfirmed);
    run
}

/// Three initiation attempts that the bank never processed.
fn failed() -> Run {
    let mut run = initiating();
    for _ in 1..3 {
        run.step(not_processed());
        run.next_at_timer();
        run.step(Input::TimerFired);
        run.step(begin());
    }
    run.step(not_processed());
    run
}

/// A lost initiation answer under the default policy: held for a person.
fn unknown_outcome() -> Run {
    let mut run = initiating();
    run.step(outcome_unknown());
    run
}

/// The reinitiate policy: the reconciler makes new attempts on its own.
fn reinitiating() -> Run {
    let mut run = Run::with_policy(Policy {
        unknown_outcome: UnknownOutcomePolicy::Reinitiate,
        ..Policy::default()
    });
    run.initiate();
    run.step(begin());
    run
}

fn representative(kind: StateKind) -> Run {
    let run = match kind {
        StateKind::Received => received(),
        StateKind::Initiating => initiating(),
        StateKind::ScaPending => sca_pending(),
        StateKind::Authorizing => authorizing(),
        StateKind::PartiallySigned => partially_signed(),
        StateKind::Signed => signed(),
        StateKind::Active => active(),
        StateKind::Cancelling => cancelling(),
        StateKind::Settled => settled(),
        StateKind::PartiallySettled => partially_settled(),
        StateKind::Completed => completed(),
        StateKind::Cancelled => cancelled(),
        StateKind::Rejected => rejected(),
        StateKind::Expired => expired(),
        StateKind::Failed => failed(),
        StateKind::OutcomeUnknown => unknown_outcome(),
    };
    assert_eq!(run.kind(), kind, "representative record for {kind:?}");
    run
}

// ---------------------------------------------------------------------------------------------
// The intended semantics, as an oracle
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// Not specified for this transition.
    Any,
    Cleared,
    At(Millis),
    /// A status poll: for an active standing order exactly `standing_order_poll_ms` after `now`;
    /// otherwise after `now`, within the slow interval, and never after the SCA deadline of an
    /// unsigned payment.
    Poll,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Change {
    to: StateKind,
    events: usize,
    effects: Vec<Effect>,
    reason: Option<ReasonCode>,
    timer: Timer,
    /// Whether the PKCE verifier / authorization code must be held afterwards (`None`: either).
    verifier: Option<bool>,
    code: Option<bool>,
    /// `Some(r)`: `resume_after_cancel` must be `r` afterwards.
    resume: Option<Option<PaymentState>>,
    /// `Some(s)`: `bank_status` must be `s` afterwards.
    bank_status: Option<Option<String>>,
}

impl Change {
    fn new(to: StateKind, events: usize, effects: Vec<Effect>) -> Self {
        Change {
            to,
            events,
            effects,
            reason: None,
            timer: Timer::Any,
            verifier: None,
            code: None,
            resume: None,
            bank_status: None,
        }
    }

    fn reason(mut self, code: ReasonCode) -> Self {
        self.reason = Some(code);
        self
    }

    fn timer(mut self, timer: Timer) -> Self {
        self.timer = timer;
        self
    }

    fn verifier(mut self, held: bool) -> Self {
        self.verifier = Some(held);
        self
    }

    fn code(mut self, held: bool) -> Self {
        self.code = Some(held);
        self
    }

    fn resume(mut self, resume: Option<PaymentState>) -> Self {
        self.resume = Some(resume);
        self
    }

    fn bank_status(mut self, bank_status: Option<String>) -> Self {
        self.bank_status = Some(bank_status);
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Changed(Change),
    Ignored(Ignored),
    Refused(RefusalCode),
}

impl From<Change> for Expect {
    fn from(change: Change) -> Self {
        Expect::Changed(change)
    }
}

/// States in which the bank holds the payment and its status is polled.
fn is_polling(kind: StateKind) -> bool {
    use StateKind as K;
    match kind {
        K::ScaPending
        | K::Authorizing
        | K::PartiallySigned
        | K::Signed
        | K::Active
        | K::Cancelling => true,
        K::Received
        | K::Initiating
        | K::OutcomeUnknown
        | K::Settled
        | K::PartiallySettled
        | K::Completed
        | K::Cancelled
        | K::Rejected
        | K::Expired
        | K::Failed => false,
    }
}

/// What `decide` must do with `input` on the existing record `p` at `now`.
fn expect(p: &Payment, input: &Input, now: Millis, policy: &Policy) -> Expect {
    use StateKind as K;
    let kind = p.state.kind();
    if let Some(id) = input.command_id() {
        if p.seen_commands.contains(id) {
            return Expect::Ignored(Ignored::DuplicateCommand);
        }
    }
    if let Some(psu_id) = command_psu(input) {
        if *psu_id != p.psu_id {
            return Expect::Refused(RefusalCode::PsuMismatch);
        }
    }
    if let Input::CompleteSca { outcome, state, .. } = input {
        // A code is exchanged at most once, under whatever command id it comes again.
        if let ScaOutcome::Code(code) = outcome {
            if p.received_codes.contains(&code_digest(code)) {
                return Expect::Ignored(Ignored::DuplicateCommand);
            }
        }
        // Only the state of the SCA URL the PSU was sent to completes the SCA.
        if p.sca_state.is_some() && state != &p.sca_state {
            return Expect::Refused(RefusalCode::StateMismatch);
        }
    }
    let terminal = kind.is_terminal();
    let unconfirmed = p.state == PaymentState::Unconfirmed;
    // The bank holds the payment and its status is polled.
    let polling = is_polling(kind) || unconfirmed;
    // The bank holds the payment and the PSU may still sign it.
    let awaiting_sca = matches!(kind, K::ScaPending | K::PartiallySigned) || unconfirmed;
    let withdrawing = awaiting_sca && p.withdrawal.is_some();
    let standing = p.order.as_ref().map(Order::kind) == Some(PaymentKind::Periodic);
    // Where a cancellation the bank did not carry out returns to (a record the machine made in
    // `Cancelling` always knows).
    let resume = p.resume_after_cancel.map_or(K::Signed, PaymentState::kind);
    // A change of state kind emits exactly one event; the same kind emits none.
    let go =
        |to: StateKind, effects: Vec<Effect>| Change::new(to, usize::from(to != kind), effects);
    let stay = |effects: Vec<Effect>| Change::new(kind, 0, effects);
    let stale = Expect::Ignored(Ignored::Stale);
    let already_final = Expect::Refused(RefusalCode::AlreadyFinal);
    let hold = policy.unknown_outcome == UnknownOutcomePolicy::Hold;
    // An unknown initiation outcome waits for a person (hold) or for the reconciler.
    let unknown_timer = if hold {
        Timer::Cleared
    } else {
        Timer::At(now + policy.reconcile_after_ms)
    };
    // What a withdrawal ends in once the bank agrees.
    let withdrawn = || match p.withdrawal.as_ref().map(|w| &w.cause) {
        Some(WithdrawalCause::PsuRefused { .. }) => {
            go(K::Rejected, vec![]).reason(ReasonCode::ScaFailed)
        }
        Some(WithdrawalCause::Deadline) | None => {
            go(K::Expired, vec![]).reason(ReasonCode::ScaExpired)
        }
    };
    match input {
        Input::Initiate { order, .. } => {
            if p.order.as_ref() == Some(order) {
                Expect::Ignored(Ignored::DuplicateInitiation)
            } else {
                Expect::Refused(RefusalCode::DuplicatePaymentId)
            }
        }
        // An invalid order is never the order the payment was created with.
        Input::InitiateInvalid { .. } => Expect::Refused(RefusalCode::DuplicatePaymentId),
        Input::CompleteSca { outcome, .. } => {
            // A code that arrives after a poll already saw the signature is still exchanged:
            // it carries the PSU's token pair. The state does not change.
            let late_code =
                matches!(kind, K::Signed | K::Active) && matches!(outcome, ScaOutcome::Code(_));
            // A redirect without code or error: the one of an attempt initiated with the
            // PSU's token (no verifier held). A PKCE attempt's redirect must bring its code.
            let returned = matches!(outcome, ScaOutcome::Returned);
            let pkce_attempt = p.pkce_verifier.is_some();
            if terminal {
                already_final
            } else if returned && matches!(kind, K::Signed | K::Active) {
                if pkce_attempt {
                    Expect::Refused(RefusalCode::CodeRequired)
                } else {
                    // Recorded, nothing else: the poll already saw what it announces.
                    let unchanged = p.next_check_at.map_or(Timer::Cleared, Timer::At);
                    stay(vec![]).timer(unchanged).into()
                }
            } else if late_code {
                stay(vec![Effect::ExchangeCode]).code(true).into()
            } else if !awaiting_sca {
                Expect::Refused(RefusalCode::NotAwaitingSca)
            } else {
                match outcome {
                    ScaOutcome::Code(_) => go(K::Authorizing, vec![Effect::ExchangeCode])
                        .code(true)
                        .into(),
                    // Not final on the redirect's word: the bank's status is asked first.
                    ScaOutcome::Error { .. } => {
                        stay(vec![Effect::CheckStatus]).timer(Timer::Cleared).into()
                    }
                    ScaOutcome::Returned if pkce_attempt => {
                        Expect::Refused(RefusalCode::CodeRequired)
                    }
                    // Nothing to exchange: the bank's status tells whether it is signed.
                    ScaOutcome::Returned => stay(vec![Effect::CheckStatus])
                        .timer(Timer::Cleared)
                        .verifier(false)
                        .code(false)
                        .into(),
                }
            }
        }
        Input::Cancel { bank_token, .. } => {
            if unconfirmed {
                return if *bank_token {
                    go(K::Cancelling, vec![Effect::CallCancel])
                        .timer(Timer::Cleared)
                        .resume(Some(p.state))
                        .into()
                } else {
                    Expect::Refused(RefusalCode::CancelNotPossible)
                };
            }
            match kind {
                // No bank-side payment whose SCA URL reached anyone: cancelled here.
                K::Received | K::Initiating | K::OutcomeUnknown => go(K::Cancelled, vec![])
                    .reason(ReasonCode::CancelledByClient)
                    .timer(Timer::Cleared)
                    .verifier(false)
                    .into(),
                // The bank holds the payment: only the bank's cancellation, with the PSU's
                // token.
                K::ScaPending | K::Authorizing | K::PartiallySigned | K::Signed | K::Active => {
                    if *bank_token {
                        go(K::Cancelling, vec![Effect::CallCancel])
                            .timer(Timer::Cleared)
                            .resume(Some(p.state))
                            .into()
                    } else {
                        Expect::Refused(RefusalCode::CancelNotPossible)
                    }
                }
                K::Cancelling => Expect::Ignored(Ignored::CancelInProgress),
                K::Settled
                | K::PartiallySettled
                | K::Completed
                | K::Cancelled
                | K::Rejected
                | K::Expired
                | K::Failed => already_final,
            }
        }
        Input::RefreshStatus { .. } => {
            if terminal {
                already_final
            } else if polling {
                stay(vec![Effect::CheckStatus]).into()
            } else {
                stay(vec![]).into()
            }
        }
        Input::Resolve { resolution, .. } => match (p.state, resolution) {
            (PaymentState::OutcomeUnknown { .. }, Resolution::Reinitiate) => {
                // Silently back to RECEIVED, to start a new attempt.
                Change::new(K::Received, 0, vec![Effect::StartInitiation])
                    .timer(Timer::Cleared)
                    .into()
            }
            (PaymentState::OutcomeUnknown { .. }, Resolution::Adopt { .. }) => {
                go(K::ScaPending, vec![Effect::CheckStatus])
                    .timer(Timer::Cleared)
                    .into()
            }
            (PaymentState::OutcomeUnknown { .. }, Resolution::Abandon { .. }) => {
                go(K::Failed, vec![])
                    .reason(ReasonCode::OutcomeUnresolved)
                    .into()
            }
            (PaymentState::Unconfirmed, Resolution::Abandon { .. }) => {
                go(K::Expired, vec![]).reason(ReasonCode::ScaExpired).into()
            }
            _ if terminal => already_final,
            _ => Expect::Refused(RefusalCode::ResolutionNotApplicable),
        },
        // The verifier is held exactly when the owner gave one (none: the PSU's token).
        Input::BeginInitiation { pkce_verifier, .. } => match kind {
            K::Received => Change::new(
                K::Initiating,
                usize::from(p.last_published != Some(K::Initiating)),
                vec![Effect::CallInitiate],
            )
            .verifier(pkce_verifier.is_some())
            .into(),
            _ => stale,
        },
        // Only an attempt meant for the PSU's token goes again, with PKCE, as the same attempt.
        Input::FallBackToPkce { .. } => match p.state {
            PaymentState::Initiating { .. } if p.pkce_verifier.is_none() => {
                stay(vec![Effect::CallInitiate]).verifier(true).into()
            }
            _ => stale,
        },
        Input::BankInitiated { .. } => match kind {
            K::Initiating => go(K::ScaPending, vec![]).timer(Timer::Poll).into(),
            _ => stale,
        },
        Input::InitiationFailed(failure) => match (p.state, failure) {
            (PaymentState::Initiating { .. }, InitiationFailure::Refused(reason)) => {
                go(K::Rejected, vec![]).reason(reason.code).into()
            }
            (
                PaymentState::Initiating { attempt },
                InitiationFailure::NotProcessed { retry_after_ms, .. },
            ) => {
                if attempt >= policy.max_initiation_attempts {
                    go(K::Failed, vec![]).into()
                } else {
                    // Silently back to Received, to retry after the bank's Retry-After or the
                    // policy's delay.
                    let delay = retry_after_ms.unwrap_or(policy.initiation_retry_ms);
                    Change::new(K::Received, 0, vec![])
                        .timer(Timer::At(now + delay))
                        .verifier(false)
                        .into()
                }
            }
            (PaymentState::Initiating { .. }, InitiationFailure::Unknown { .. }) => {
                go(K::OutcomeUnknown, vec![])
                    .reason(ReasonCode::OutcomeUnresolved)
                    .timer(unknown_timer)
                    .into()
            }
            _ => stale,
        },
        Input::TokenExchanged | Input::TokenExchangeFailed { .. } => match kind {
            K::Authorizing => stay(vec![Effect::CheckStatus])
                .code(false)
                .verifier(false)
                .into(),
            K::Signed | K::Active if p.authorization_code.is_some() => {
                stay(vec![]).code(false).verifier(false).into()
            }
            _ => stale,
        },
        Input::StatusObserved { progress, .. } => {
            if !polling {
                return stale;
            }
            let settled = if standing { K::Completed } else { K::Settled };
            if kind == K::Cancelling {
                let change = match progress {
                    // Cancelled: the reason (by the client, or at the bank) is not prescribed.
                    BankProgress::Cancelled => go(K::Cancelled, vec![]),
                    BankProgress::Settled => go(settled, vec![]),
                    BankProgress::PartiallyAccepted => {
                        go(K::PartiallySettled, vec![]).reason(ReasonCode::BulkPartiallyRejected)
                    }
                    BankProgress::Rejected => {
                        go(K::Rejected, vec![]).reason(ReasonCode::BankRejected)
                    }
                    // Still alive at the bank: the cancellation did not happen (and no SCA
                    // deadline applies while cancelling).
                    BankProgress::AwaitingSca
                    | BankProgress::PartiallySigned
                    | BankProgress::Signed => go(resume, vec![])
                        .reason(ReasonCode::CancelNotConfirmed)
                        .timer(Timer::Poll)
                        .resume(None),
                };
                return change.into();
            }
            let signed = if standing { K::Active } else { K::Signed };
            // Where a status leads once the PSU's signature is no longer awaited.
            let follow = |progress: BankProgress| match progress {
                BankProgress::Signed => go(signed, vec![]).timer(Timer::Poll),
                BankProgress::Settled => go(settled, vec![]),
                BankProgress::PartiallyAccepted => {
                    go(K::PartiallySettled, vec![]).reason(ReasonCode::BulkPartiallyRejected)
                }
                BankProgress::Rejected => go(K::Rejected, vec![]).reason(ReasonCode::BankRejected),
                BankProgress::Cancelled => {
                    go(K::Cancelled, vec![]).reason(ReasonCode::CancelledAtBank)
                }
                BankProgress::AwaitingSca => stay(vec![]).timer(Timer::Poll),
                BankProgress::PartiallySigned => go(K::PartiallySigned, vec![]).timer(Timer::Poll),
            };
            if !awaiting_sca {
                return follow(*progress).into();
            }
            // Unsigned at the bank: the deadline and the withdrawal decide.
            let past_deadline = p.sca_deadline.is_some_and(|d| now >= d);
            // The state an unsigned payment stays in (PATC moves SCA_PENDING to
            // PARTIALLY_SIGNED; an unconfirmed one stays unconfirmed).
            let unsigned = match progress {
                BankProgress::PartiallySigned if !unconfirmed => K::PartiallySigned,
                _ => kind,
            };
            let change = match progress {
                BankProgress::AwaitingSca | BankProgress::PartiallySigned => {
                    match &p.withdrawal {
                        // Past the deadline: ask the bank to end it; not final yet.
                        None if past_deadline => {
                            go(unsigned, vec![Effect::CallCancel]).timer(Timer::Cleared)
                        }
                        None => go(unsigned, vec![]).timer(Timer::Poll),
                        Some(w) if !w.cancel_asked => {
                            go(unsigned, vec![Effect::CallCancel]).timer(Timer::Cleared)
                        }
                        Some(w) if now >= w.since + policy.expiry_horizon_ms && !unconfirmed => {
                            go(K::OutcomeUnknown, vec![])
                                .reason(ReasonCode::ExpiryUnconfirmed)
                                .timer(Timer::Poll)
                        }
                        Some(_) => go(unsigned, vec![]).timer(Timer::Poll),
                    }
                }
                BankProgress::Rejected | BankProgress::Cancelled if withdrawing => withdrawn(),
                // Rejected before any signature: the PSU refused, or the bank's session ended.
                BankProgress::Rejected => go(K::Rejected, vec![]).reason(ReasonCode::ScaFailed),
                BankProgress::Signed
                | BankProgress::Settled
                | BankProgress::PartiallyAccepted
                | BankProgress::Cancelled => follow(*progress),
            };
            change.into()
        }
        Input::StatusCheckFailed { .. } => {
            if polling {
                stay(vec![]).timer(Timer::Poll).into()
            } else {
                stale
            }
        }
        Input::CancelConfirmed { bank_status } => {
            if withdrawing {
                // The bank ended the unsigned payment the worker asked it to end.
                return withdrawn()
                    .bank_status(bank_status.clone().or_else(|| Some("CANC".into())))
                    .into();
            }
            match kind {
                K::Cancelling => go(K::Cancelled, vec![])
                    .reason(ReasonCode::CancelledByClient)
                    .resume(None)
                    // Confirmed without a body (204): the cancellation itself is ISO CANC.
                    .bank_status(bank_status.clone().or_else(|| Some("CANC".into())))
                    .into(),
                _ => stale,
            }
        }
        Input::CancelRefused(reason) => {
            if withdrawing {
                // Keep watching: the bank's expiry, a refusal or a signature will show.
                return stay(vec![]).timer(Timer::Poll).into();
            }
            match kind {
                K::Cancelling => go(resume, vec![])
                    .reason(reason.code)
                    .timer(Timer::Poll)
                    .resume(None)
                    .into(),
                _ => stale,
            }
        }
        Input::CancelUnconfirmed { .. } => {
            if withdrawing || kind == K::Cancelling {
                stay(vec![Effect::CheckStatus]).timer(Timer::Cleared).into()
            } else {
                stale
            }
        }
        Input::TimerFired => {
            let due = p.next_check_at.is_some_and(|at| at <= now);
            if !due {
                return stale;
            }
            match p.state {
                PaymentState::Received => stay(vec![Effect::StartInitiation])
                    .timer(Timer::Cleared)
                    .into(),
                PaymentState::ScaPending
                | PaymentState::Authorizing
                | PaymentState::PartiallySigned
                | PaymentState::Signed
                | PaymentState::Active
                | PaymentState::Cancelling
                | PaymentState::Unconfirmed => {
                    stay(vec![Effect::CheckStatus]).timer(Timer::Cleared).into()
                }
                // A timer left from the reinitiate policy: a held payment keeps waiting.
                PaymentState::OutcomeUnknown { .. } if hold => {
                    stay(vec![]).timer(Timer::Cleared).into()
                }
                PaymentState::OutcomeUnknown { attempt } => {
                    if attempt < policy.max_initiation_attempts {
                        // Silently back to Received for a new attempt.
                        Change::new(K::Received, 0, vec![Effect::StartInitiation]).into()
                    } else {
                        go(K::Failed, vec![])
                            .reason(ReasonCode::OutcomeUnresolved)
                            .into()
                    }
                }
                PaymentState::Initiating { .. }
                | PaymentState::Settled
                | PaymentState::PartiallySettled
                | PaymentState::Completed
                | PaymentState::Cancelled
                | PaymentState::Rejected
                | PaymentState::Expired
                | PaymentState::Failed => stale,
            }
        }
        Input::Restored => {
            let no_timer = p.next_check_at.is_none();
            let cancel_in_flight = p.withdrawal.as_ref().is_some_and(|w| w.cancel_asked);
            match kind {
                K::Initiating => go(K::OutcomeUnknown, vec![])
                    .reason(ReasonCode::OutcomeUnresolved)
                    .timer(unknown_timer)
                    .into(),
                K::Authorizing | K::Signed | K::Active if p.authorization_code.is_some() => {
                    stay(vec![Effect::ExchangeCode]).into()
                }
                K::Received if no_timer => stay(vec![Effect::StartInitiation]).into(),
                // The DELETE may never have left: send it again (idempotent at the bank).
                K::Cancelling if no_timer => stay(vec![Effect::CallCancel]).into(),
                _ if awaiting_sca && no_timer && cancel_in_flight => {
                    stay(vec![Effect::CallCancel]).into()
                }
                _ if polling && no_timer => stay(vec![Effect::CheckStatus]).into(),
                K::OutcomeUnknown if no_timer && !hold => stay(vec![])
                    .timer(Timer::At(now + policy.reconcile_after_ms))
                    .into(),
                _ => stale,
            }
        }
    }
}

/// Checks a transition against the expected change and the invariants of every transition.
fn check_change(
    before: &Payment,
    want: &Change,
    t: &Transition,
    command: Option<&CommandId>,
    now: Millis,
    policy: &Policy,
) -> Result<(), String> {
    let mut problems = Vec::new();
    let after = &t.payment;
    let kind = after.state.kind();
    if kind != want.to {
        problems.push(format!("state {:?}, want {:?}", after.state, want.to));
    }
    if t.events.len() != want.events {
        problems.push(format!(
            "{} events {:?}, want {}",
            t.events.len(),
            t.events.iter().map(|e| e.state).collect::<Vec<_>>(),
            want.events
        ));
    }
    if t.effects != want.effects {
        problems.push(format!("effects {:?}, want {:?}", t.effects, want.effects));
    }
    for (i, e) in t.events.iter().enumerate() {
        let sequence = before.sequence + 1 + i as u64;
        if e.sequence != sequence {
            problems.push(format!("event sequence {}, want {sequence}", e.sequence));
        }
        if e.state != kind {
            problems.push(format!("event state {:?} but record is {kind:?}", e.state));
        }
        if e.payment_id != before.payment_id || e.psu_id != before.psu_id {
            problems.push("event for another payment or PSU".into());
        }
        if e.occurred_at != now {
            problems.push(format!("event occurred_at {}, want {now}", e.occurred_at));
        }
        if let Some(code) = want.reason {
            if e.reason.as_ref().map(|r| r.code) != Some(code) {
                problems.push(format!("event reason {:?}, want {code:?}", e.reason));
            }
        }
    }
    let published = before.sequence + t.events.len() as u64;
    if after.sequence != published {
        problems.push(format!(
            "record sequence {}, want {published}",
            after.sequence
        ));
    }
    let last_published = t
        .events
        .last()
        .map_or(before.last_published, |e| Some(e.state));
    if after.last_published != last_published {
        problems.push(format!(
            "last_published {:?}, want {last_published:?}",
            after.last_published
        ));
    }
    if after.payment_id != before.payment_id
        || after.psu_id != before.psu_id
        || after.order != before.order
        || after.received_at != before.received_at
    {
        problems.push("identity, order or received_at changed".into());
    }
    if after.updated_at != now {
        problems.push(format!("updated_at {}, want {now}", after.updated_at));
    }
    if let Some(code) = want.reason {
        if after.reason.as_ref().map(|r| r.code) != Some(code) {
            problems.push(format!("reason {:?}, want {code:?}", after.reason));
        }
    }
    if kind.is_terminal() && (has_secrets(after) || after.next_check_at.is_some()) {
        problems.push("terminal record still holds a secret or a timer".into());
    }
    match want.timer {
        Timer::Any => {}
        Timer::Cleared => {
            if after.next_check_at.is_some() {
                problems.push(format!("timer {:?}, want none", after.next_check_at));
            }
        }
        Timer::At(at) => {
            if after.next_check_at != Some(at) {
                problems.push(format!("timer {:?}, want {at}", after.next_check_at));
            }
        }
        Timer::Poll if kind == StateKind::Active || after.state == PaymentState::Unconfirmed => {
            let at = now + policy.standing_order_poll_ms;
            if after.next_check_at != Some(at) {
                problems.push(format!(
                    "timer {:?}, want the standing-order poll at {at}",
                    after.next_check_at
                ));
            }
        }
        Timer::Poll => {
            let latest = now + policy.fast_poll_ms.max(policy.slow_poll_ms);
            match after.next_check_at {
                Some(at) if at > now && at <= latest => {
                    if let Some(deadline) = after.sca_deadline {
                        if kind.awaits_signature() && deadline > now && at > deadline {
                            problems.push(format!("poll at {at} after the deadline {deadline}"));
                        }
                    }
                }
                other => problems.push(format!("timer {other:?}, want a poll after {now}")),
            }
        }
    }
    if let Some(held) = want.verifier {
        if after.pkce_verifier.is_some() != held {
            problems.push(format!("verifier held: {}, want {held}", !held));
        }
    }
    if let Some(held) = want.code {
        if after.authorization_code.is_some() != held {
            problems.push(format!("authorization code held: {}, want {held}", !held));
        }
    }
    if let Some(resume) = want.resume {
        if after.resume_after_cancel != resume {
            problems.push(format!(
                "resume_after_cancel {:?}, want {resume:?}",
                after.resume_after_cancel
            ));
        }
    }
    // Where to resume is known exactly while cancelling, and is a state the bank holds.
    match (kind, after.resume_after_cancel.map(PaymentState::kind)) {
        (StateKind::Cancelling, Some(resume))
            if (is_polling(resume) && resume != kind)
                || after.resume_after_cancel == Some(PaymentState::Unconfirmed) => {}
        (StateKind::Cancelling, other) => {
            problems.push(format!("cancelling with resume_after_cancel {other:?}"));
        }
        (_, None) => {}
        (_, Some(resume)) => {
            problems.push(format!("resume_after_cancel {resume:?} outside CANCELLING"))
        }
    }
    if let Some(bank_status) = &want.bank_status {
        if after.bank_status != *bank_status {
            problems.push(format!(
                "bank_status {:?}, want {bank_status:?}",
                after.bank_status
            ));
        }
    }
    if let Some(id) = command {
        if !after.seen_commands.contains(id) {
            problems.push(format!("command {id} not recorded"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Decides `input` on `p` and compares the outcome with the oracle.
fn check_pair(p: &Payment, input: Input, now: Millis, policy: &Policy) -> Result<(), String> {
    let want = expect(p, &input, now, policy);
    let command = input.command_id().cloned();
    let outcome = decide(&p.payment_id, Some(p), input, now, policy);
    match (&want, &outcome) {
        (Expect::Ignored(w), Outcome::Ignored(got)) if w == got => Ok(()),
        (Expect::Refused(w), Outcome::Refused(got)) if *w == got.code => Ok(()),
        (Expect::Changed(change), Outcome::Changed(t)) => {
            check_change(p, change, t, command.as_ref(), now, policy)
                .map_err(|problems| format!("{problems} (got {})", summary(&outcome)))
        }
        _ => Err(format!("want {want:?}, got {}", summary(&outcome))),
    }
}

#[derive(Debug, Clone, Copy)]
enum At {
    Early,
    Now,
    Late,
    Hours,
}

impl At {
    fn millis(self) -> Millis {
        match self {
            At::Early => EARLY,
            At::Now => NOW,
            At::Late => LATE,
            At::Hours => HOURS,
        }
    }
}

/// One input case of the table: an input built for the record at hand, and when it arrives.
struct Case {
    name: &'static str,
    at: At,
    make: fn(&Payment) -> Input,
}

fn case(name: &'static str, at: At, make: fn(&Payment) -> Input) -> Case {
    Case { name, at, make }
}

fn cases() -> Vec<Case> {
    vec![
        case("Initiate (same order)", At::Now, |p| {
            initiate_order(
                cmd("t-initiate"),
                p.order.clone().unwrap_or_else(|| order().into()),
            )
        }),
        case("Initiate (other order)", At::Now, |_| {
            initiate_order(cmd("t-initiate-other"), other_order().into())
        }),
        case("Initiate (standing order)", At::Now, |_| {
            initiate_order(cmd("t-initiate-standing"), standing_order())
        }),
        case("Initiate (bulk)", At::Now, |_| {
            initiate_order(cmd("t-initiate-bulk"), bulk_order())
        }),
        case("InitiateInvalid", At::Now, |_| {
            initiate_invalid(cmd("t-invalid"))
        }),
        case("CompleteSca(Code)", At::Now, |_| {
            sca_code(cmd("t-sca-code"))
        }),
        case("CompleteSca(Error)", At::Now, |_| {
            sca_error(cmd("t-sca-error"))
        }),
        case("CompleteSca(Returned)", At::Now, |_| {
            sca_returned(cmd("t-sca-returned"))
        }),
        case("Cancel (bank token)", At::Now, |_| {
            cancel(cmd("t-cancel"), true)
        }),
        case("Cancel (no bank token)", At::Now, |_| {
            cancel(cmd("t-cancel-no-token"), false)
        }),
        case("RefreshStatus", At::Now, |_| refresh(cmd("t-refresh"))),
        case("CompleteSca(Code) with a forged state", At::Now, |_| {
            sca_code_with(cmd("t-sca-forged"), "auth-code-456", Some("forged"))
        }),
        case("CompleteSca(Code) without a state", At::Now, |_| {
            sca_code_with(cmd("t-sca-stateless"), "auth-code-789", None)
        }),
        case(
            "CompleteSca(Code) re-sent under a new command id",
            At::Now,
            |_| sca_code(cmd("t-sca-again")),
        ),
        case("Resolve(Reinitiate)", At::Now, |_| {
            resolve(cmd("t-resolve-re"), Resolution::Reinitiate)
        }),
        case("Resolve(Adopt)", At::Now, |_| {
            resolve(cmd("t-resolve-adopt"), adopt())
        }),
        case("Resolve(Abandon)", At::Now, |_| {
            resolve(cmd("t-resolve-abandon"), abandon())
        }),
        case("Cancel (re-delivered command id)", At::Now, |p| {
            cancel(
                p.seen_commands.last().expect("a seen command").clone(),
                true,
            )
        }),
        case("RefreshStatus (other PSU)", At::Now, |_| {
            Input::RefreshStatus {
                command_id: cmd("t-stranger"),
                psu_id: other_psu(),
            }
        }),
        case("BeginInitiation (PKCE)", At::Now, |_| begin()),
        case("BeginInitiation (token)", At::Now, |_| begin_with_token()),
        case("FallBackToPkce", At::Now, |_| fall_back_to_pkce()),
        case("BankInitiated", At::Now, |_| bank_initiated()),
        case("InitiationFailed(Refused)", At::Now, |_| {
            initiation_refused()
        }),
        case("InitiationFailed(NotProcessed)", At::Now, |_| {
            not_processed()
        }),
        case(
            "InitiationFailed(NotProcessed, Retry-After)",
            At::Now,
            |_| rate_limited(),
        ),
        case("InitiationFailed(Unknown)", At::Now, |_| outcome_unknown()),
        case("TokenExchanged", At::Now, |_| Input::TokenExchanged),
        case("TokenExchangeFailed", At::Now, |_| {
            Input::TokenExchangeFailed {
                message: "invalid_grant".into(),
            }
        }),
        case("StatusObserved(AwaitingSca)", At::Now, |_| {
            observed(BankProgress::AwaitingSca)
        }),
        case("StatusObserved(PartiallySigned)", At::Now, |_| {
            observed(BankProgress::PartiallySigned)
        }),
        case("StatusObserved(Signed)", At::Now, |_| {
            observed(BankProgress::Signed)
        }),
        case("StatusObserved(Settled)", At::Now, |_| {
            observed(BankProgress::Settled)
        }),
        case("StatusObserved(PartiallyAccepted)", At::Now, |_| {
            observed(BankProgress::PartiallyAccepted)
        }),
        case("StatusObserved(Rejected)", At::Now, |_| {
            observed(BankProgress::Rejected)
        }),
        case("StatusObserved(Cancelled)", At::Now, |_| {
            observed(BankProgress::Cancelled)
        }),
        case(
            "StatusObserved(AwaitingSca) past the deadline",
            At::Late,
            |_| observed(BankProgress::AwaitingSca),
        ),
        case(
            "StatusObserved(PartiallySigned) past the deadline",
            At::Late,
            |_| observed(BankProgress::PartiallySigned),
        ),
        case("StatusObserved(Signed) past the deadline", At::Late, |_| {
            observed(BankProgress::Signed)
        }),
        case("StatusCheckFailed", At::Now, |_| check_failed()),
        case("CancelConfirmed (with a bank status)", At::Now, |_| {
            cancel_confirmed(Some("CANC"))
        }),
        case("CancelConfirmed (without a bank status)", At::Now, |_| {
            cancel_confirmed(None)
        }),
        case("CancelRefused", At::Now, |_| cancel_refused()),
        case("CancelUnconfirmed", At::Now, |_| cancel_unconfirmed()),
        // Due for every timer but an active standing order's (an hour away).
        case("TimerFired (due)", At::Now, |_| Input::TimerFired),
        case("TimerFired (not yet due)", At::Early, |_| Input::TimerFired),
        case("TimerFired (hours later)", At::Hours, |_| Input::TimerFired),
        case("Restored", At::Now, |_| Input::Restored),
    ]
}

/// Every input variant and sub-variant appears among the cases.
fn assert_every_input_variant_covered(cases: &[Case], sample: &Payment) {
    let covered: BTreeSet<&str> = cases.iter().map(|c| input_key(&(c.make)(sample))).collect();
    let all: BTreeSet<&str> = ALL_INPUT_KEYS.into_iter().collect();
    let missing: Vec<_> = all.difference(&covered).collect();
    assert!(
        missing.is_empty(),
        "input variants not in the table: {missing:?}"
    );
}

/// A (state, input) pair that deviates from the semantics: state, input, what went wrong.
type Deviation = (String, &'static str, String);

/// Runs every case on every record; returns the number of pairs checked and the deviations.
fn run_table(
    records: &[(String, Payment)],
    cases: &[Case],
    policy: &Policy,
) -> (usize, Vec<Deviation>) {
    let mut checked = 0;
    let mut deviations = Vec::new();
    for (state, record) in records {
        for case in cases {
            let input = (case.make)(record);
            if let Err(problem) = check_pair(record, input, case.at.millis(), policy) {
                deviations.push((state.clone(), case.name, problem));
            }
            checked += 1;
        }
    }
    (checked, deviations)
}

fn representatives() -> Vec<(String, Payment)> {
    StateKind::ALL
        .into_iter()
        .map(|kind| {
            (
                kind.symbol().to_string(),
                representative(kind).payment().clone(),
            )
        })
        .collect()
}

fn report(deviations: &[Deviation]) -> String {
    deviations
        .iter()
        .map(|(state, input, problem)| format!("  state {state} x input {input}: {problem}"))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------
// 1. Every (state, input) pair
// ---------------------------------------------------------------------------------------------

#[test]
fn every_state_input_pair_follows_the_semantics() {
    let policy = Policy::default();
    let records = representatives();
    let cases = cases();
    assert_every_input_variant_covered(&cases, &records[0].1);
    let (checked, deviations) = run_table(&records, &cases, &policy);
    assert_eq!(checked, StateKind::ALL.len() * cases.len(), "pairs skipped");
    assert_eq!(checked, 16 * 48);
    assert!(
        deviations.is_empty(),
        "{} of {checked} (state, input) pairs deviate from the intended semantics:\n{}",
        deviations.len(),
        report(&deviations)
    );
}

/// Records in the same states with other data: timers pending or cleared, secrets exchanged,
/// last attempts, an order refused by validation, standing orders and bulks, cancellations from
/// each state the bank holds.
#[test]
fn variant_records_follow_the_semantics() {
    let policy = Policy::default();
    let mut records = Vec::new();

    let mut run = initiating();
    run.step(not_processed());
    records.push(("RECEIVED (retry pending)", run.payment().clone()));

    let mut run = initiating();
    for _ in 1..3 {
        run.step(not_processed());
        run.next_at_timer();
        run.step(Input::TimerFired);
        run.step(begin());
    }
    assert_eq!(run.payment().state, PaymentState::Initiating { attempt: 3 });
    records.push(("INITIATING (last attempt)", run.payment().clone()));
    run.step(outcome_unknown());
    records.push(("OUTCOME_UNKNOWN (last attempt)", run.payment().clone()));

    let mut run = sca_pending();
    run.next_at_timer();
    run.step(Input::TimerFired);
    records.push(("SCA_PENDING (poll in flight)", run.payment().clone()));

    let mut run = authorizing();
    run.step(Input::TokenExchanged);
    records.push(("AUTHORIZING (code exchanged)", run.payment().clone()));
    run.step(observed(BankProgress::AwaitingSca));
    records.push(("AUTHORIZING (polling)", run.payment().clone()));

    let mut run = partially_signed();
    let id = run.cmd();
    run.step(sca_code(id));
    records.push(("AUTHORIZING (second signature)", run.payment().clone()));

    let mut run = signed();
    let id = run.cmd();
    run.step(refresh(id));
    records.push(("SIGNED (refresh in flight)", run.payment().clone()));

    let mut run = Run::new();
    let id = run.cmd();
    run.step(initiate_invalid(id));
    records.push(("REJECTED (invalid initiation)", run.payment().clone()));

    // The order's kind decides where a signature or a settlement leads.
    records.push((
        "RECEIVED (standing order)",
        received_with(standing_order()).payment().clone(),
    ));
    records.push((
        "SCA_PENDING (standing order)",
        sca_pending_with(standing_order()).payment().clone(),
    ));
    let mut run = authorizing_with(standing_order());
    records.push(("AUTHORIZING (standing order)", run.payment().clone()));
    run.step(Input::TokenExchanged);
    records.push((
        "AUTHORIZING (standing order, code exchanged)",
        run.payment().clone(),
    ));
    let mut run = sca_pending_with(standing_order());
    run.step(observed(BankProgress::PartiallySigned));
    records.push(("PARTIALLY_SIGNED (standing order)", run.payment().clone()));
    records.push((
        "SCA_PENDING (bulk)",
        sca_pending_with(bulk_order()).payment().clone(),
    ));
    records.push(("SIGNED (bulk)", signed_with(bulk_order()).payment().clone()));

    // An active standing order between polls and with a poll in flight.
    let mut run = active();
    run.next_at_timer();
    run.step(Input::TimerFired);
    records.push(("ACTIVE (poll in flight)", run.payment().clone()));
    run.step(observed(BankProgress::Signed));
    records.push(("ACTIVE (polled)", run.payment().clone()));

    // Cancellations from every state the bank holds, and what follows them.
    records.push((
        "CANCELLING (from SCA_PENDING)",
        cancelling_from(sca_pending()).payment().clone(),
    ));
    records.push((
        "CANCELLING (from AUTHORIZING, code not exchanged)",
        cancelling_from(authorizing()).payment().clone(),
    ));
    records.push((
        "CANCELLING (from PARTIALLY_SIGNED)",
        cancelling_from(partially_signed()).payment().clone(),
    ));
    records.push((
        "CANCELLING (from ACTIVE)",
        cancelling_from(active()).payment().clone(),
    ));
    records.push((
        "CANCELLING (bulk, from SIGNED)",
        cancelling_from(signed_with(bulk_order())).payment().clone(),
    ));
    let mut run = cancelling();
    run.step(cancel_unconfirmed());
    records.push((
        "CANCELLING (unconfirmed, check in flight)",
        run.payment().clone(),
    ));
    run.step(check_failed());
    records.push((
        "CANCELLING (unconfirmed, poll pending)",
        run.payment().clone(),
    ));
    let mut run = cancelling();
    run.step(cancel_refused());
    records.push(("SIGNED (cancellation refused)", run.payment().clone()));
    let mut run = cancelling_from(active());
    run.step(cancel_unconfirmed());
    run.step(observed(BankProgress::Signed));
    records.push(("ACTIVE (cancellation not confirmed)", run.payment().clone()));
    let mut run = cancelling();
    run.step(cancel_confirmed(None));
    records.push(("CANCELLED (at the bank)", run.payment().clone()));
    let mut run = cancelling_from(active());
    run.step(observed(BankProgress::Settled));
    records.push(("COMPLETED (while cancelling)", run.payment().clone()));

    // Withdrawals: the worker asks the bank to end an unsigned payment.
    records.push((
        "SCA_PENDING (past the deadline, cancellation asked)",
        past_deadline().payment().clone(),
    ));
    let mut run = past_deadline();
    run.step(cancel_refused());
    records.push((
        "SCA_PENDING (past the deadline, no token, polling)",
        run.payment().clone(),
    ));
    let mut run = past_deadline();
    run.step(cancel_unconfirmed());
    records.push((
        "SCA_PENDING (past the deadline, cancellation unconfirmed)",
        run.payment().clone(),
    ));
    let mut run = sca_pending();
    let id = run.cmd();
    run.step(sca_error(id));
    records.push((
        "SCA_PENDING (PSU refused, status check in flight)",
        run.payment().clone(),
    ));
    run.step(observed(BankProgress::AwaitingSca));
    records.push((
        "SCA_PENDING (PSU refused, cancellation asked)",
        run.payment().clone(),
    ));
    let mut run = partially_signed();
    let deadline = run.payment().sca_deadline.expect("deadline");
    run.next_at(deadline);
    run.step(observed(BankProgress::PartiallySigned));
    records.push((
        "PARTIALLY_SIGNED (past the deadline, cancellation asked)",
        run.payment().clone(),
    ));
    let run = unconfirmed();
    records.push((
        "OUTCOME_UNKNOWN (unconfirmed expiry)",
        run.payment().clone(),
    ));
    let mut run = unconfirmed();
    run.next_at_timer();
    run.step(Input::TimerFired);
    records.push((
        "OUTCOME_UNKNOWN (unconfirmed expiry, poll in flight)",
        run.payment().clone(),
    ));
    records.push((
        "CANCELLING (from an unconfirmed expiry)",
        cancelling_from(unconfirmed()).payment().clone(),
    ));
    // Returning PSUs: attempts initiated with the PSU's access token (no verifier, no code).
    records.push((
        "INITIATING (with the PSU's token)",
        initiating_with_token().payment().clone(),
    ));
    let mut run = initiating_with_token();
    run.step(fall_back_to_pkce());
    records.push((
        "INITIATING (token refused, again with PKCE)",
        run.payment().clone(),
    ));
    records.push((
        "SCA_PENDING (initiated with the PSU's token)",
        sca_pending_with_token().payment().clone(),
    ));
    let mut run = sca_pending_with_token();
    let id = run.cmd();
    run.step(sca_returned(id));
    records.push((
        "SCA_PENDING (token, PSU back, check in flight)",
        run.payment().clone(),
    ));
    run.step(observed(BankProgress::PartiallySigned));
    records.push((
        "PARTIALLY_SIGNED (initiated with the PSU's token)",
        run.payment().clone(),
    ));
    let mut run = sca_pending_with_token();
    run.step(observed(BankProgress::Signed));
    records.push((
        "SIGNED (initiated with the PSU's token)",
        run.payment().clone(),
    ));
    let mut run = sca_pending_with_token();
    let deadline = run.payment().sca_deadline.expect("deadline");
    run.next_at(deadline);
    run.step(observed(BankProgress::AwaitingSca));
    records.push((
        "SCA_PENDING (token, past the deadline, cancellation asked)",
        run.payment().clone(),
    ));
    // A payment adopted by a person after a lost initiation answer.
    let mut run = unknown_outcome();
    let id = run.cmd();
    run.step(resolve(id, adopt()));
    records.push((
        "SCA_PENDING (adopted, check in flight)",
        run.payment().clone(),
    ));

    let records: Vec<(String, Payment)> = records
        .into_iter()
        .map(|(name, p)| (name.to_string(), p))
        .collect();
    let cases = cases();
    let (checked, deviations) = run_table(&records, &cases, &policy);
    assert_eq!(checked, records.len() * cases.len());
    assert!(
        deviations.is_empty(),
        "{} pairs deviate:\n{}",
        deviations.len(),
        report(&deviations)
    );
}

/// The same table under the other policy for lost initiation answers: the reconciler makes a
/// new attempt instead of waiting for a person.
#[test]
fn every_state_input_pair_follows_the_semantics_when_lost_answers_are_reinitiated() {
    let policy = Policy {
        unknown_outcome: UnknownOutcomePolicy::Reinitiate,
        ..Policy::default()
    };
    let records: Vec<(String, Payment)> = StateKind::ALL
        .into_iter()
        .map(|kind| {
            let mut run = representative(kind);
            if kind == StateKind::OutcomeUnknown {
                // As the reinitiate policy leaves it: with its reconcile timer.
                run = Run::with_policy(policy.clone());
                run.initiate();
                run.step(begin());
                run.step(outcome_unknown());
            }
            (kind.symbol().to_string(), run.payment().clone())
        })
        .collect();
    let cases = cases();
    let (checked, deviations) = run_table(&records, &cases, &policy);
    assert_eq!(checked, StateKind::ALL.len() * cases.len());
    assert!(
        deviations.is_empty(),
        "{} pairs deviate:\n{}",
        deviations.len(),
        report(&deviations)
    );
}

/// Inputs for a payment id never seen.
#[test]
fn inputs_for_an_unknown_payment_id() {
    let policy = Policy::default();
    let sample = received().payment().clone();
    let cases = cases();
    let mut checked = 0;
    for case in &cases {
        let input = (case.make)(&sample);
        let key = input_key(&input);
        let command = input.command_id().cloned();
        let initiated = match &input {
            Input::Initiate { order, .. } => Some(order.clone()),
            _ => None,
        };
        let now = case.at.millis();
        let outcome = decide(&payment_id(), None, input, now, &policy);
        let context = format!(
            "input {} on an unknown id: {}",
            case.name,
            summary(&outcome)
        );
        match key {
            "Initiate(Single)" | "Initiate(Standing)" | "Initiate(Bulk)" | "InitiateInvalid" => {
                let Outcome::Changed(t) = &outcome else {
                    panic!("{context}")
                };
                let (state, effects) = if key == "InitiateInvalid" {
                    (StateKind::Rejected, vec![])
                } else {
                    (StateKind::Received, vec![Effect::StartInitiation])
                };
                assert_eq!(t.payment.state.kind(), state, "{context}");
                assert_eq!(t.payment.order, initiated, "{context}");
                assert_eq!(t.effects, effects, "{context}");
                assert_eq!(t.events.len(), 1, "{context}");
                assert_eq!(t.events[0].state, state, "{context}");
                assert_eq!(t.events[0].sequence, 1, "{context}");
                assert_eq!(t.payment.sequence, 1, "{context}");
                assert_eq!(t.payment.last_published, Some(state), "{context}");
                assert_eq!(t.payment.seen_commands, vec![command.expect("a command")]);
                assert_eq!(t.payment.payment_id, payment_id(), "{context}");
                assert_eq!(t.payment.received_at, now, "{context}");
                assert_eq!(t.payment.resume_after_cancel, None, "{context}");
            }
            "CompleteSca(Code)"
            | "CompleteSca(Error)"
            | "CompleteSca(Returned)"
            | "Cancel(token)"
            | "Cancel(no token)"
            | "RefreshStatus"
            | "Resolve(Reinitiate)"
            | "Resolve(Adopt)"
            | "Resolve(Abandon)" => {
                assert!(
                    matches!(&outcome, Outcome::Refused(r) if r.code == RefusalCode::UnknownPayment),
                    "{context}"
                );
            }
            _ => assert!(
                matches!(outcome, Outcome::Ignored(Ignored::Stale)),
                "{context}"
            ),
        }
        checked += 1;
    }
    assert_eq!(checked, cases.len());
}

// ---------------------------------------------------------------------------------------------
// 2. Focused scenarios
// ---------------------------------------------------------------------------------------------

#[test]
fn initiate_creates_a_received_payment() {
    let mut run = Run::new();
    let t = run.initiate();
    let p = &t.payment;
    assert_eq!(p.state, PaymentState::Received);
    assert_eq!(p.psu_id, psu());
    assert_eq!(p.order, Some(Order::Single(order())));
    assert_eq!(p.resume_after_cancel, None);
    assert_eq!(p.seen_commands, vec![cmd("cmd-1")]);
    assert_eq!(p.initiation_attempts, 0);
    assert_eq!(p.reason, None);
    assert!(!has_secrets(p));
    assert_eq!(t.effects, vec![Effect::StartInitiation]);
    let e = &t.events[..];
    assert_eq!(e.len(), 1);
    assert_eq!((e[0].sequence, e[0].state), (1, StateKind::Received));
    assert_eq!(e[0].causation_id, "cmd-1");
    assert_eq!(e[0].occurred_at, run.now);
    assert_eq!(e[0].reason, None);

    // The same initiation again, under a new command id: idempotent.
    let id = run.cmd();
    assert!(matches!(
        run.apply(initiate(id)),
        Outcome::Ignored(Ignored::DuplicateInitiation)
    ));
    // Another order under the same payment id: refused, payment unchanged.
    let id = run.cmd();
    let outcome = run.apply(initiate_order(id, other_order().into()));
    assert!(
        matches!(&outcome, Outcome::Refused(r) if r.code == RefusalCode::DuplicatePaymentId),
        "{}",
        summary(&outcome)
    );
    // Nor is the same transfer as a standing order or a bulk the same payment.
    for other in [standing_order(), bulk_order()] {
        let id = run.cmd();
        let outcome = run.apply(initiate_order(id, other));
        assert!(
            matches!(&outcome, Outcome::Refused(r) if r.code == RefusalCode::DuplicatePaymentId),
            "{}",
            summary(&outcome)
        );
    }
    assert_eq!(run.events.len(), 1);
    assert_eq!(run.payment().order, Some(order().into()));
}

#[test]
fn invalid_initiation_is_rejected_with_its_reason() {
    let mut run = Run::new();
    let t = run.step(initiate_invalid(cmd("bad-1")));
    assert_eq!(t.payment.state, PaymentState::Rejected);
    assert_eq!(t.payment.order, None);
    assert_eq!(
        t.payment.reason,
        Some(Reason::new(
            ReasonCode::InvalidIban,
            "creditor IBAN checksum"
        ))
    );
    assert!(t.effects.is_empty());
    assert_eq!(t.events.len(), 1);
    assert_eq!(
        (t.events[0].sequence, t.events[0].state),
        (1, StateKind::Rejected)
    );
    assert_eq!(
        t.events[0].reason.as_ref().map(|r| r.code),
        Some(ReasonCode::InvalidIban)
    );
    assert_eq!(t.events[0].causation_id, "bad-1");
    // A valid initiation under the refused payment id is another payment.
    let outcome = run.apply(initiate(cmd("good-1")));
    assert!(
        matches!(&outcome, Outcome::Refused(r) if r.code == RefusalCode::DuplicatePaymentId),
        "{}",
        summary(&outcome)
    );
}

#[test]
fn happy_path_settles_with_six_events() {
    let mut run = Run::new();
    assert_eq!(run.initiate().effects, vec![Effect::StartInitiation]);

    let t = run.step(begin());
    assert_eq!(t.payment.state, PaymentState::Initiating { attempt: 1 });
    assert_eq!(t.payment.initiation_attempts, 1);
    assert_eq!(
        t.payment.pkce_verifier.as_ref().map(expose),
        Some("pkce-verifier-0123456789")
    );
    assert_eq!(t.effects, vec![Effect::CallInitiate]);

    let at = run.now + 1;
    let t = run.step(bank_initiated());
    assert_eq!(t.payment.state, PaymentState::ScaPending);
    let deadline = at + run.policy.sca_timeout_ms;
    assert_eq!(t.payment.sca_deadline, Some(deadline));
    let poll = t.payment.next_check_at.expect("a poll is scheduled");
    assert!(poll > at && poll <= deadline, "poll at {poll}");
    assert_eq!(
        t.payment.bank_payment_id,
        Some(BankPaymentId::new("bank-pay-77"))
    );
    let e = &t.events[0];
    assert_eq!(e.state, StateKind::ScaPending);
    // The bank's SCA URL with the attempt's OAuth state appended: the redirect must bring it
    // back.
    assert_eq!(
        e.sca_redirect_url.as_deref(),
        Some("https://bank.example/sca/77?state=state-0123456789")
    );
    assert_eq!(e.bank_payment_id, Some(BankPaymentId::new("bank-pay-77")));

    // A status poll while the PSU is still signing changes nothing visible.
    run.next_at_timer();
    let t = run.step(Input::TimerFired);
    assert_eq!(t.effects, vec![Effect::CheckStatus]);
    assert_eq!(t.payment.next_check_at, None);
    let t = run.step(observed(BankProgress::AwaitingSca));
    assert!(t.events.is_empty());
    assert!(t.payment.next_check_at.is_some());

    let id = run.cmd();
    let t = run.step(sca_code(id));
    assert_eq!(t.payment.state, PaymentState::Authorizing);
    assert_eq!(
        t.payment.authorization_code.as_ref().map(expose),
        Some("auth-code-123")
    );
    assert_eq!(t.effects, vec![Effect::ExchangeCode]);

    let t = run.step(Input::TokenExchanged);
    assert_eq!(t.payment.state, PaymentState::Authorizing);
    assert!(!has_secrets(&t.payment));
    assert!(t.events.is_empty());
    assert_eq!(t.effects, vec![Effect::CheckStatus]);

    run.step(observed(BankProgress::Signed));
    let t = run.step(observed(BankProgress::Settled));
    assert_eq!(t.payment.state, PaymentState::Settled);
    assert_eq!(t.payment.next_check_at, None);
    assert_eq!(t.payment.bank_status.as_deref(), Some("ACSC"));
    assert!(!has_secrets(&t.payment));

    assert_eq!(
        run.event_kinds(),
        vec![
            StateKind::Received,
            StateKind::Initiating,
            StateKind::ScaPending,
            StateKind::Authorizing,
            StateKind::Signed,
            StateKind::Settled,
        ]
    );
    assert_eq!(run.sequences(), (1..=6).collect::<Vec<u64>>());
    assert_eq!(run.payment().sequence, 6);

    // Settled absorbs everything.
    for bank_token in [true, false] {
        let id = run.cmd();
        assert!(matches!(
            run.apply(cancel(id, bank_token)),
            Outcome::Refused(r) if r.code == RefusalCode::AlreadyFinal
        ));
    }
    assert!(matches!(
        run.apply(observed(BankProgress::Rejected)),
        Outcome::Ignored(Ignored::Stale)
    ));
}

#[test]
fn event_ids_are_deterministic_per_payment_and_sequence() {
    let run = settled();
    let ids: BTreeSet<uuid::Uuid> = run.events.iter().map(StatusEvent::event_id).collect();
    assert_eq!(
        ids.len(),
        run.events.len(),
        "event ids collide across sequences"
    );
    let first = &run.events[0];
    assert_eq!(first.event_id(), first.clone().event_id());
    // Only (payment_id, sequence) matter: a re-published event keeps its id.
    let republished = StatusEvent {
        state: StateKind::Failed,
        causation_id: "elsewhere".into(),
        occurred_at: first.occurred_at + 1,
        ..first.clone()
    };
    assert_eq!(republished.event_id(), first.event_id());
    let other_payment = StatusEvent {
        payment_id: PaymentId::new("pay-0002"),
        ..first.clone()
    };
    assert_ne!(other_payment.event_id(), first.event_id());
    // Two independent runs of the same payment id produce the same ids.
    let again: Vec<uuid::Uuid> = settled().events.iter().map(StatusEvent::event_id).collect();
    let ids_in_order: Vec<uuid::Uuid> = run.events.iter().map(StatusEvent::event_id).collect();
    assert_eq!(again, ids_in_order);
}

/// Defect f: a `payment_id` was unique only within a partition, and `event_id` derived from
/// `(payment_id, sequence)` alone: two PSUs on two partitions initiating `pay-1` gave two streams
/// with identical event ids. The PSU is part of the id now; the same PSU reusing the id with
/// another body is refused.
#[test]
fn two_psus_payments_under_one_payment_id_never_share_an_event_id() {
    let mine = received();
    let mut theirs = Run::new();
    let id = theirs.cmd();
    theirs.step(Input::Initiate {
        command_id: id,
        psu_id: other_psu(),
        order: order().into(),
        always_pkce: false,
    });
    let (a, b) = (&mine.events[0], &theirs.events[0]);
    assert_eq!((&a.payment_id, a.sequence), (&b.payment_id, b.sequence));
    assert_ne!(a.event_id(), b.event_id());
    // What the worker can see, it refuses: the same PSU, another body under the same id.
    let mut again = received();
    let id = again.cmd();
    assert!(matches!(
        again.apply(initiate_order(id, other_order().into())),
        Outcome::Refused(r) if r.code == RefusalCode::DuplicatePaymentId
    ));
}

/// Defect c: an `error` on the redirect made the payment final at once, so a forged or
/// replayed `?error=access_denied` stopped the worker from tracking a payment the PSU could
/// still sign. Now the bank confirms first.
#[test]
fn psu_refusal_through_the_redirect_is_final_only_once_the_bank_agrees() {
    let mut run = sca_pending();
    assert!(run.payment().pkce_verifier.is_some());
    let id = run.cmd();
    let t = run.step(sca_error(id.clone()));
    assert_eq!(t.payment.state, PaymentState::ScaPending);
    assert!(t.events.is_empty(), "nothing final on the redirect's word");
    assert_eq!(t.effects, vec![Effect::CheckStatus]);
    assert!(matches!(
        t.payment.withdrawal.as_ref().map(|w| &w.cause),
        Some(WithdrawalCause::PsuRefused { .. })
    ));
    // The bank still waits for a signature: ask it to cancel.
    let t = run.step(observed(BankProgress::AwaitingSca));
    assert_eq!(t.effects, vec![Effect::CallCancel]);
    assert!(t.events.is_empty());
    // Confirmed: REJECTED with the PSU's own words.
    let mut confirmed = run.clone();
    let t = confirmed.step(cancel_confirmed(None));
    assert_eq!(t.payment.state, PaymentState::Rejected);
    assert_eq!(reason_code(&t.payment), Some(ReasonCode::ScaFailed));
    assert!(
        t.payment
            .reason
            .as_ref()
            .is_some_and(|r| r.message.contains("the PSU declined")),
        "{:?}",
        t.payment.reason
    );
    assert!(!has_secrets(&t.payment));
    let e = &t.events[0];
    assert_eq!((e.sequence, e.state), (4, StateKind::Rejected));
    assert_eq!(e.causation_id, "bank:cancellation");
    // No token to cancel with: keep watching; the bank's own RJCT ends it the same way.
    let mut no_token = run.clone();
    // The refusal of the cancellation arrives shortly before the SCA deadline.
    let deadline = no_token.payment().sca_deadline.expect("an SCA deadline");
    no_token.now = deadline - no_token.policy.slow_poll_ms / 2;
    let t = no_token.step(cancel_refused());
    assert_eq!(t.payment.state, PaymentState::ScaPending);
    // Watched at the slow rate, but never past the SCA deadline: the deadline's own withdrawal
    // (and the expiry horizon) must still happen (found by the held-policy proptest).
    let (next, deadline) = (t.payment.next_check_at, t.payment.sca_deadline);
    assert!(
        next.zip(deadline).is_some_and(|(n, d)| n <= d),
        "next poll {next:?} after the deadline {deadline:?}"
    );
    let t = no_token.step(observed(BankProgress::Rejected));
    assert_eq!(t.payment.state, PaymentState::Rejected);
    assert_eq!(reason_code(&t.payment), Some(ReasonCode::ScaFailed));
    // The error was forged or mistaken and the PSU signs: the payment goes on.
    let mut signed_after_all = run.clone();
    let t = signed_after_all.step(observed(BankProgress::Signed));
    assert_eq!(t.payment.state, PaymentState::Signed);
    assert_eq!(t.payment.withdrawal, None);
}

/// Defect c: the OAuth `state` was parsed and ignored. A `CompleteSca` must bring back the
/// state of the SCA URL its payment's PSU was sent to; anything else leaves the payment as it
/// is (the command goes to the DLQ as `STATE_MISMATCH`).
#[test]
fn complete_sca_with_a_forged_or_missing_state_leaves_the_payment_untouched() {
    let run = sca_pending();
    let p = run.payment().clone();
    assert_eq!(p.sca_state.as_deref(), Some(SCA_STATE));
    let attempts = [
        sca_code_with(cmd("forged"), "right-code", Some("forged-state")),
        sca_code_with(cmd("missing"), "right-code", None),
        Input::CompleteSca {
            command_id: cmd("forged-error"),
            psu_id: psu(),
            outcome: ScaOutcome::Error {
                error: "access_denied".into(),
                description: None,
            },
            state: Some("replayed-from-another-attempt".into()),
        },
    ];
    for input in attempts {
        let outcome = decide(&p.payment_id, Some(&p), input, NOW, &run.policy);
        assert!(
            matches!(&outcome, Outcome::Refused(r) if r.code == RefusalCode::StateMismatch),
            "{}",
            summary(&outcome)
        );
    }
    // The right state completes it.
    let outcome = decide(
        &p.payment_id,
        Some(&p),
        sca_code_with(cmd("right"), "right-code", Some(SCA_STATE)),
        NOW,
        &run.policy,
    );
    assert!(matches!(outcome, Outcome::Changed(t) if t.payment.state == PaymentState::Authorizing));
    // A record written before states existed accepts any (an upgrade in the middle of an SCA).
    let mut old = p.clone();
    old.sca_state = None;
    let outcome = decide(
        &old.payment_id,
        Some(&old),
        sca_code_with(cmd("old"), "right-code", None),
        NOW,
        &run.policy,
    );
    assert!(matches!(outcome, Outcome::Changed(_)));
}

// ---------------------------------------------------------------------------------------------
// Returning PSUs: attempts initiated with the PSU's access token
// ---------------------------------------------------------------------------------------------

/// Belfius issues no code for a payment initiated with the PSU's token: the redirect brings the
/// state only, and the bank's status carries the payment on. No AUTHORIZING, no exchange.
#[test]
fn a_payment_initiated_with_the_psus_token_is_signed_through_a_redirect_without_code() {
    let mut run = initiating_with_token();
    assert!(run.payment().pkce_verifier.is_none());
    assert_eq!(run.effects.last(), Some(&vec![Effect::CallInitiate]));
    let t = run.step(bank_initiated());
    let url = t.events[0].sca_redirect_url.clone().expect("an SCA URL");
    assert!(url.ends_with(&format!("state={SCA_STATE}")), "{url}");
    let id = run.cmd();
    let t = run.step(sca_returned(id.clone()));
    assert_eq!(t.effects, vec![Effect::CheckStatus]);
    assert!(t.events.is_empty());
    assert_eq!(run.payment().state, PaymentState::ScaPending);
    assert!(run.payment().seen_commands.contains(&id));
    assert!(run.payment().received_codes.is_empty());
    // The same redirect again is a re-delivery.
    assert!(matches!(
        run.apply(sca_returned(id)),
        Outcome::Ignored(Ignored::DuplicateCommand)
    ));
    run.step(observed(BankProgress::Signed));
    run.step(observed(BankProgress::Settled));
    assert_eq!(
        run.event_kinds(),
        vec![
            StateKind::Received,
            StateKind::Initiating,
            StateKind::ScaPending,
            StateKind::Signed,
            StateKind::Settled,
        ]
    );
    assert!(!has_secrets(run.payment()));
}

/// A redirect with only the state, for a payment whose redirect must carry a code (PKCE): the
/// code was dropped on the way. Refused (a refusal changes nothing); the real redirect works.
#[test]
fn a_redirect_without_code_for_a_pkce_payment_is_refused_and_changes_nothing() {
    let mut run = sca_pending();
    let id = run.cmd();
    match run.apply(sca_returned(id)) {
        Outcome::Refused(r) => assert_eq!(r.code, RefusalCode::CodeRequired),
        other => panic!("{}", summary(&other)),
    }
    let id = run.cmd();
    run.step(sca_code(id));
    assert_eq!(run.payment().state, PaymentState::Authorizing);
    // Signed before its code came: a code-less redirect is still refused (the code is what
    // brings the PSU's pair).
    let mut run = sca_pending();
    run.step(observed(BankProgress::Signed));
    let id = run.cmd();
    assert!(matches!(
        run.apply(sca_returned(id)),
        Outcome::Refused(r) if r.code == RefusalCode::CodeRequired
    ));
}

/// The PSU refuses a payment initiated with the token: as for any payment, not final on the
/// redirect's word; REJECTED once the bank confirms.
#[test]
fn a_redirect_with_an_error_still_refuses_a_payment_initiated_with_the_token() {
    let mut run = sca_pending_with_token();
    let id = run.cmd();
    let t = run.step(sca_error(id));
    assert_eq!(t.effects, vec![Effect::CheckStatus]);
    assert!(matches!(
        run.payment().withdrawal.as_ref().map(|w| &w.cause),
        Some(WithdrawalCause::PsuRefused { .. })
    ));
    run.step(observed(BankProgress::Rejected));
    assert_eq!(run.payment().state, PaymentState::Rejected);
    assert_eq!(reason_code(run.payment()), Some(ReasonCode::ScaFailed));
    // A forged code-less redirect still needs the attempt's state.
    let mut run = sca_pending_with_token();
    let forged = Input::CompleteSca {
        command_id: cmd("forged"),
        psu_id: psu(),
        outcome: ScaOutcome::Returned,
        state: Some("forged".into()),
    };
    assert!(matches!(
        run.apply(forged),
        Outcome::Refused(r) if r.code == RefusalCode::StateMismatch
    ));
}

/// The bank refused the token: the same attempt goes with PKCE. Nothing was created, so the
/// attempt is not counted again and no event tells the client anything happened.
#[test]
fn a_refused_token_sends_the_same_attempt_again_with_pkce() {
    let mut run = initiating_with_token();
    let t = run.step(fall_back_to_pkce());
    assert_eq!(run.payment().state, PaymentState::Initiating { attempt: 1 });
    assert_eq!(run.payment().initiation_attempts, 1);
    assert!(run.payment().awaits_code());
    assert_eq!(t.effects, vec![Effect::CallInitiate]);
    assert!(t.events.is_empty());
    // Only once: the attempt is a PKCE attempt now.
    assert!(matches!(
        run.apply(fall_back_to_pkce()),
        Outcome::Ignored(Ignored::Stale)
    ));
    run.step(bank_initiated());
    let id = run.cmd();
    assert!(matches!(
        run.apply(sca_returned(id)),
        Outcome::Refused(r) if r.code == RefusalCode::CodeRequired
    ));
    let id = run.cmd();
    run.step(sca_code(id));
    assert_eq!(run.payment().state, PaymentState::Authorizing);
    // A stopped worker left it in flight: an unknown outcome like any attempt.
    let mut run = initiating_with_token();
    run.step(Input::Restored);
    assert_eq!(
        run.payment().state,
        PaymentState::OutcomeUnknown { attempt: 1 }
    );
}

/// `always_pkce` is part of the payment: kept on the record, and part of what makes a re-sent
/// initiation the same one.
#[test]
fn always_pkce_is_kept_and_belongs_to_the_initiation_body() {
    let mut run = Run::new();
    let id = run.cmd();
    run.step(Input::Initiate {
        command_id: id,
        psu_id: psu(),
        order: order().into(),
        always_pkce: true,
    });
    assert!(run.payment().always_pkce);
    let same = Input::Initiate {
        command_id: cmd("again"),
        psu_id: psu(),
        order: order().into(),
        always_pkce: true,
    };
    assert!(matches!(
        run.apply(same),
        Outcome::Ignored(Ignored::DuplicateInitiation)
    ));
    let other = Input::Initiate {
        command_id: cmd("other"),
        psu_id: psu(),
        order: order().into(),
        always_pkce: false,
    };
    assert!(matches!(
        run.apply(other),
        Outcome::Refused(r) if r.code == RefusalCode::DuplicatePaymentId
    ));
    run.step(begin());
    run.step(not_processed());
    assert!(run.payment().always_pkce, "kept across attempts");
}

/// Each attempt has its own state: a redirect of an earlier attempt does not complete the
/// current one.
#[test]
fn every_initiation_attempt_gets_its_own_state_in_its_sca_url() {
    let mut run = sca_pending();
    let first_url = run.payment().sca_redirect_url.clone().expect("url");
    assert!(
        first_url.ends_with(&format!("state={SCA_STATE}")),
        "{first_url}"
    );
    // The answer to a second attempt (a person re-initiated) under a new state.
    let mut again = unknown_outcome();
    let id = again.cmd();
    again.step(resolve(id, Resolution::Reinitiate));
    again.step(Input::BeginInitiation {
        pkce_verifier: Some(SecretString::from("v2")),
        sca_state: "second-state".into(),
    });
    let t = again.step(bank_initiated());
    assert!(
        t.events[0]
            .sca_redirect_url
            .as_deref()
            .is_some_and(|u| u.ends_with("state=second-state")),
        "{:?}",
        t.events[0].sca_redirect_url
    );
    let outcome = again.apply(sca_code_with(cmd("old-redirect"), "c", Some(SCA_STATE)));
    assert!(
        matches!(&outcome, Outcome::Refused(r) if r.code == RefusalCode::StateMismatch),
        "{}",
        summary(&outcome)
    );
    let _ = run.step(sca_code(cmd("ok")));
}

/// Defect k: a code is exchanged at most once per payment, whatever command id it comes
/// under and however many commands the de-duplication window has forgotten.
#[test]
fn an_authorization_code_is_exchanged_at_most_once() {
    let mut run = authorizing();
    assert_eq!(run.payment().received_codes.len(), 1);
    assert!(
        !run.payment()
            .received_codes
            .iter()
            .any(|d| d.contains("auth-code-123")),
        "a digest, never the code"
    );
    run.step(Input::TokenExchanged);
    // More commands than the window remembers.
    for _ in 0..(run.policy.remembered_commands + 5) {
        let id = run.cmd();
        run.step(refresh(id));
    }
    let id = run.cmd();
    let outcome = run.apply(sca_code(id));
    assert!(
        matches!(outcome, Outcome::Ignored(Ignored::DuplicateCommand)),
        "{}",
        summary(&outcome)
    );
}

#[test]
fn final_bank_statuses_carry_their_reason() {
    for (progress, state, reason) in [
        (
            BankProgress::Rejected,
            StateKind::Rejected,
            Some(ReasonCode::BankRejected),
        ),
        (
            BankProgress::Cancelled,
            StateKind::Cancelled,
            Some(ReasonCode::CancelledAtBank),
        ),
        (
            BankProgress::PartiallyAccepted,
            StateKind::PartiallySettled,
            Some(ReasonCode::BulkPartiallyRejected),
        ),
        (BankProgress::Settled, StateKind::Settled, None),
    ] {
        for mut run in [
            sca_pending(),
            authorizing(),
            partially_signed(),
            signed(),
            signed_with(bulk_order()),
        ] {
            let from = run.kind();
            let t = run.step(observed(progress));
            let context = format!("{progress:?} observed on {from:?}");
            assert_eq!(t.payment.state.kind(), state, "{context}");
            // Rejected before any signature: the PSU refused or the bank's session ended.
            let reason = match (progress, from) {
                (BankProgress::Rejected, StateKind::ScaPending | StateKind::PartiallySigned) => {
                    Some(ReasonCode::ScaFailed)
                }
                _ => reason,
            };
            assert_eq!(
                t.payment.reason.as_ref().map(|r| r.code),
                reason,
                "{context}"
            );
            assert_eq!(t.events.len(), 1, "{context}");
            assert_eq!(
                t.events[0].reason.as_ref().map(|r| r.code),
                reason,
                "{context}"
            );
            assert!(!has_secrets(&t.payment), "{context}");
            assert_eq!(t.payment.next_check_at, None, "{context}");
        }
    }
}

#[test]
fn final_bank_statuses_of_a_standing_order() {
    for (progress, state, reason) in [
        (
            BankProgress::Rejected,
            StateKind::Rejected,
            Some(ReasonCode::BankRejected),
        ),
        (
            BankProgress::Cancelled,
            StateKind::Cancelled,
            Some(ReasonCode::CancelledAtBank),
        ),
        (
            BankProgress::PartiallyAccepted,
            StateKind::PartiallySettled,
            Some(ReasonCode::BulkPartiallyRejected),
        ),
        (BankProgress::Settled, StateKind::Completed, None),
    ] {
        for mut run in [
            sca_pending_with(standing_order()),
            authorizing_with(standing_order()),
            active(),
        ] {
            let from = run.kind();
            let t = run.step(observed(progress));
            let context = format!("{progress:?} observed on a standing order {from:?}");
            assert_eq!(t.payment.state.kind(), state, "{context}");
            // Rejected before any signature: the PSU refused or the bank's session ended.
            let reason = match (progress, from) {
                (BankProgress::Rejected, StateKind::ScaPending) => Some(ReasonCode::ScaFailed),
                _ => reason,
            };
            assert_eq!(reason_code(&t.payment), reason, "{context}");
            assert_eq!(t.events.len(), 1, "{context}");
            assert_eq!(t.events[0].state, state, "{context}");
            assert_eq!(event_reason_code(&t.events[0]), reason, "{context}");
            assert!(!has_secrets(&t.payment), "{context}");
            assert_eq!(t.payment.next_check_at, None, "{context}");
        }
    }
}

#[test]
fn cancel_before_the_bank_holds_the_payment() {
    for (mut run, bank_token) in [received(), initiating(), unknown_outcome()]
        .into_iter()
        .flat_map(|run| [(run.clone(), true), (run, false)])
    {
        let from = run.kind();
        let id = run.cmd();
        let t = run.step(cancel(id.clone(), bank_token));
        assert_eq!(
            t.payment.state,
            PaymentState::Cancelled,
            "from {from:?}, bank token {bank_token}"
        );
        assert_eq!(
            t.payment.reason.as_ref().map(|r| r.code),
            Some(ReasonCode::CancelledByClient)
        );
        assert!(!has_secrets(&t.payment) && t.payment.next_check_at.is_none());
        assert_eq!(t.events.len(), 1);
        assert_eq!(t.events[0].causation_id, id.to_string());
        assert!(t.effects.is_empty());
    }
}

/// Defect b: at the SCA deadline the worker declared the payment EXPIRED on its own while the
/// bank still held it, and never looked again: a late signature moved money under a final
/// EXPIRED. Now it asks the bank to end it and keeps watching; EXPIRED only when the bank
/// agrees.
#[test]
fn unsigned_payment_past_the_deadline_expires_only_when_the_bank_agrees() {
    let policy = Policy {
        sca_timeout_ms: 25_000,
        ..Policy::default()
    };
    let mut run = Run::with_policy(policy);
    run.initiate();
    run.step(begin());
    run.step(bank_initiated());
    let deadline = run.payment().sca_deadline.expect("deadline");
    // Poll until the bank's answer arrives on or after the deadline; polls never overshoot it.
    let mut at_deadline = None;
    for _ in 0..100 {
        let poll = run.payment().next_check_at.expect("a poll is scheduled");
        assert!(
            poll <= deadline,
            "poll at {poll} after the deadline {deadline}"
        );
        run.next_at(poll - 1);
        assert!(matches!(
            run.apply(Input::TimerFired),
            Outcome::Ignored(Ignored::Stale)
        ));
        let t = run.step(Input::TimerFired);
        assert_eq!(t.effects, vec![Effect::CheckStatus]);
        let t = run.step(observed(BankProgress::AwaitingSca));
        assert_eq!(t.payment.state, PaymentState::ScaPending);
        assert!(t.events.is_empty());
        if t.payment.withdrawal.is_some() {
            at_deadline = Some(t);
            break;
        }
    }
    let t = at_deadline.expect("the deadline was reached");
    assert!(run.now >= deadline && run.now <= deadline + 1);
    assert_eq!(
        t.effects,
        vec![Effect::CallCancel],
        "ask the bank to cancel"
    );
    assert_eq!(t.payment.next_check_at, None);

    // The bank cancels: EXPIRED, with the bank's word.
    let mut cancelled = run.clone();
    let t = cancelled.step(cancel_confirmed(None));
    assert_eq!(t.payment.state, PaymentState::Expired);
    assert_eq!(reason_code(&t.payment), Some(ReasonCode::ScaExpired));
    assert_eq!(t.payment.bank_status.as_deref(), Some("CANC"));
    assert!(!has_secrets(&t.payment) && t.payment.next_check_at.is_none());
    assert_eq!(
        cancelled.event_kinds(),
        vec![
            StateKind::Received,
            StateKind::Initiating,
            StateKind::ScaPending,
            StateKind::Expired
        ]
    );

    // No token to cancel with: polled slowly until the bank's own expiry says RJCT.
    let mut waiting = run.clone();
    let t = waiting.step(cancel_refused());
    assert_eq!(t.payment.state, PaymentState::ScaPending);
    let poll = t.payment.next_check_at.expect("polled");
    assert_eq!(poll, waiting.now + waiting.policy.slow_poll_ms);
    waiting.next_at_timer();
    waiting.step(Input::TimerFired);
    let t = waiting.step(observed(BankProgress::AwaitingSca));
    assert!(t.effects.is_empty() && t.events.is_empty());
    let mut rejected = waiting.clone();
    let t = rejected.step(observed(BankProgress::Rejected));
    assert_eq!(t.payment.state, PaymentState::Expired);
    assert_eq!(t.payment.bank_status.as_deref(), Some("RJCT"));

    // The PSU signs late: the payment goes on and settles; never EXPIRED.
    let mut late = waiting.clone();
    let t = late.step(observed(BankProgress::Signed));
    assert_eq!(t.payment.state, PaymentState::Signed);
    assert_eq!(t.payment.withdrawal, None);
    let t = late.step(observed(BankProgress::Settled));
    assert_eq!(t.payment.state, PaymentState::Settled);
    assert!(!late.event_kinds().contains(&StateKind::Expired));

    // The bank stays silent past the horizon: OUTCOME_UNKNOWN (alerted), still watched hourly,
    // and the bank's final word ends it.
    let mut silent = waiting.clone();
    let since = silent.payment().withdrawal.as_ref().expect("w").since;
    silent.next_at(since + silent.policy.expiry_horizon_ms);
    let t = silent.step(observed(BankProgress::AwaitingSca));
    assert_eq!(t.payment.state, PaymentState::Unconfirmed);
    assert_eq!(t.events.len(), 1);
    assert_eq!(t.events[0].state, StateKind::OutcomeUnknown);
    assert_eq!(reason_code(&t.payment), Some(ReasonCode::ExpiryUnconfirmed));
    assert_eq!(
        t.payment.next_check_at,
        Some(silent.now + silent.policy.standing_order_poll_ms)
    );
    silent.next_at_timer();
    assert_eq!(
        silent.step(Input::TimerFired).effects,
        vec![Effect::CheckStatus]
    );
    let mut ends = silent.clone();
    let t = ends.step(observed(BankProgress::Rejected));
    assert_eq!(t.payment.state, PaymentState::Expired);
    let t = silent.step(observed(BankProgress::Settled));
    assert_eq!(t.payment.state, PaymentState::Settled);
}

#[test]
fn sca_deadline_bounds_the_first_poll() {
    let policy = Policy {
        sca_timeout_ms: 500,
        ..Policy::default()
    };
    let mut run = Run::with_policy(policy);
    run.initiate();
    run.step(begin());
    let t = run.step(bank_initiated());
    assert_eq!(t.payment.sca_deadline, Some(run.now + 500));
    assert_eq!(t.payment.next_check_at, Some(run.now + 500));
}

#[test]
fn partially_signed_payment_expires_unless_fully_signed() {
    let mut run = partially_signed();
    let deadline = run.payment().sca_deadline.expect("deadline");
    assert!(run.payment().next_check_at.is_some_and(|at| at <= deadline));
    run.next_at(deadline - 1);
    let t = run.step(observed(BankProgress::PartiallySigned));
    assert_eq!(t.payment.state, PaymentState::PartiallySigned);
    assert!(t.events.is_empty());
    assert_eq!(t.payment.next_check_at, Some(deadline));

    let mut late = run.clone();
    let t = late.step(observed(BankProgress::PartiallySigned));
    assert_eq!(t.payment.state, PaymentState::PartiallySigned);
    assert_eq!(t.effects, vec![Effect::CallCancel]);
    let t = late.step(cancel_confirmed(Some("CANC")));
    assert_eq!(t.payment.state, PaymentState::Expired);
    assert_eq!(reason_code(&t.payment), Some(ReasonCode::ScaExpired));

    // All signatures in: no longer waiting for the PSU, so the deadline does not apply.
    let t = run.step(observed(BankProgress::Signed));
    assert_eq!(t.payment.state, PaymentState::Signed);
    assert_eq!(t.events.len(), 1);
}

#[test]
fn not_processed_initiation_retries_silently() {
    let mut run = initiating();
    let t = run.step(not_processed());
    assert_eq!(t.payment.state, PaymentState::Received);
    assert!(t.events.is_empty(), "no event on a silent retry");
    assert!(t.effects.is_empty());
    assert_eq!(t.payment.pkce_verifier.as_ref().map(expose), None);
    assert_eq!(
        t.payment.next_check_at,
        Some(run.now + run.policy.initiation_retry_ms)
    );
    // The retry timer is durable: nothing happens before it is due.
    assert!(matches!(
        run.apply(Input::TimerFired),
        Outcome::Ignored(Ignored::Stale)
    ));
    run.next_at_timer();
    let t = run.step(Input::TimerFired);
    assert_eq!(t.effects, vec![Effect::StartInitiation]);
    assert_eq!(t.payment.next_check_at, None);
    let t = run.step(begin());
    assert_eq!(t.payment.state, PaymentState::Initiating { attempt: 2 });
    assert_eq!(t.payment.initiation_attempts, 2);
    assert_eq!(t.effects, vec![Effect::CallInitiate]);
    assert!(t.events.is_empty(), "INITIATING is not published twice");
    run.step(bank_initiated());
    assert_eq!(
        run.event_kinds(),
        vec![
            StateKind::Received,
            StateKind::Initiating,
            StateKind::ScaPending
        ]
    );
    assert_eq!(run.sequences(), vec![1, 2, 3]);
}

/// A 429 with `Retry-After`: the next attempt waits as long as the bank asked, not the policy's
/// fixed delay; the attempt still counts, and the last one still ends in FAILED.
#[test]
fn rate_limited_initiation_retries_after_the_banks_delay() {
    let mut run = initiating();
    assert_ne!(run.policy.initiation_retry_ms, 7_000);
    let t = run.step(rate_limited());
    assert_eq!(t.payment.state, PaymentState::Received);
    assert!(t.events.is_empty());
    assert_eq!(t.payment.initiation_attempts, 1);
    assert_eq!(t.payment.next_check_at, Some(run.now + 7_000));
    // Not due at the policy's delay, only at the bank's.
    run.next_at(run.now + run.policy.initiation_retry_ms);
    assert!(matches!(
        run.apply(Input::TimerFired),
        Outcome::Ignored(Ignored::Stale)
    ));
    run.next_at_timer();
    assert_eq!(
        run.step(Input::TimerFired).effects,
        vec![Effect::StartInitiation]
    );
    run.step(begin());
    assert_eq!(run.kind(), StateKind::Initiating);

    // A negative delay (clock skew in a header parser) is treated as "now".
    let t = run.step(Input::InitiationFailed(InitiationFailure::NotProcessed {
        message: "429".into(),
        retry_after_ms: Some(-5),
    }));
    assert_eq!(t.payment.next_check_at, Some(run.now));

    // The attempt limit applies to rate-limited attempts too.
    let mut last = initiating();
    last.policy.max_initiation_attempts = 1;
    let t = last.step(rate_limited());
    assert_eq!(t.payment.state, PaymentState::Failed);
    assert_eq!(
        t.payment.reason.as_ref().map(|r| r.code),
        Some(ReasonCode::BankUnavailable)
    );
}

#[test]
fn initiation_retries_exhaust_into_failed() {
    let run = failed();
    let p = run.payment();
    assert_eq!(p.state, PaymentState::Failed);
    assert_eq!(p.initiation_attempts, 3);
    assert!(p.reason.is_some());
    assert!(!has_secrets(p) && p.next_check_at.is_none());
    assert_eq!(
        run.event_kinds(),
        vec![
            StateKind::Received,
            StateKind::Initiating,
            StateKind::Failed
        ]
    );
    assert_eq!(run.sequences(), vec![1, 2, 3]);
    assert_eq!(run.events[2].reason, p.reason);
}

#[test]
fn refused_initiation_is_rejected_with_the_banks_reason() {
    let mut run = initiating();
    let t = run.step(initiation_refused());
    assert_eq!(t.payment.state, PaymentState::Rejected);
    assert_eq!(
        t.payment.reason,
        Some(Reason::new(ReasonCode::BankRejected, "400 FORMAT_ERROR"))
    );
    assert!(!has_secrets(&t.payment));
    assert_eq!(t.events.len(), 1);
    assert_eq!(t.events[0].reason, t.payment.reason);
}

#[test]
fn reconcile_returns_silently_to_received() {
    let mut run = reinitiating();
    run.step(outcome_unknown());
    run.next_at_timer();
    let t = run.step(Input::TimerFired);
    assert_eq!(t.payment.state, PaymentState::Received);
    assert_eq!(t.effects, vec![Effect::StartInitiation]);
    assert_eq!(
        t.events.iter().map(|e| e.state).collect::<Vec<_>>(),
        vec![],
        "the return to Received before a new attempt is silent"
    );
}

#[test]
fn unknown_outcome_reconciles_into_a_successful_second_attempt() {
    let mut run = reinitiating();
    let t = run.step(outcome_unknown());
    assert_eq!(t.payment.state, PaymentState::OutcomeUnknown { attempt: 1 });
    assert_eq!(
        t.payment.next_check_at,
        Some(run.now + run.policy.reconcile_after_ms)
    );
    assert_eq!(t.events.len(), 1);
    // The reconciler waits for its timer.
    assert!(matches!(
        run.apply(Input::TimerFired),
        Outcome::Ignored(Ignored::Stale)
    ));
    run.next_at_timer();
    let t = run.step(Input::TimerFired);
    assert_eq!(t.payment.state, PaymentState::Received);
    assert_eq!(t.effects, vec![Effect::StartInitiation]);
    let t = run.step(begin());
    assert_eq!(t.payment.state, PaymentState::Initiating { attempt: 2 });
    assert_eq!(t.effects, vec![Effect::CallInitiate]);
    run.step(bank_initiated());
    let id = run.cmd();
    run.step(sca_code(id));
    run.step(Input::TokenExchanged);
    run.step(observed(BankProgress::Settled));
    let p = run.payment();
    assert_eq!(p.state, PaymentState::Settled);
    assert_eq!(p.initiation_attempts, 2);
    assert_eq!(
        run.sequences(),
        (1..=run.events.len() as u64).collect::<Vec<_>>()
    );
    assert_eq!(
        run.event_kinds(),
        vec![
            StateKind::Received,
            StateKind::Initiating,
            StateKind::OutcomeUnknown,
            StateKind::Initiating,
            StateKind::ScaPending,
            StateKind::Authorizing,
            StateKind::Settled,
        ]
    );
}

#[test]
fn unresolved_outcomes_exhaust_into_failed() {
    let mut run = reinitiating();
    for attempt in 1..=3 {
        let t = run.step(outcome_unknown());
        assert_eq!(t.payment.state, PaymentState::OutcomeUnknown { attempt });
        run.next_at_timer();
        let t = run.step(Input::TimerFired);
        if attempt < 3 {
            assert_eq!(t.payment.state, PaymentState::Received);
            assert_eq!(t.effects, vec![Effect::StartInitiation]);
            run.step(begin());
        }
    }
    let p = run.payment();
    assert_eq!(p.state, PaymentState::Failed);
    assert_eq!(p.initiation_attempts, 3);
    assert_eq!(
        p.reason.as_ref().map(|r| r.code),
        Some(ReasonCode::OutcomeUnresolved)
    );
    assert!(!has_secrets(p) && p.next_check_at.is_none());
    let last = run.events.last().expect("events");
    assert_eq!(last.state, StateKind::Failed);
    assert_eq!(
        last.reason.as_ref().map(|r| r.code),
        Some(ReasonCode::OutcomeUnresolved)
    );
    assert_eq!(
        run.sequences(),
        (1..=run.events.len() as u64).collect::<Vec<_>>()
    );
}

#[test]
fn restored_resumes_what_was_in_flight() {
    // An initiation call in flight has an unknown outcome: held for a person (the default).
    let mut run = initiating();
    let t = run.step(Input::Restored);
    assert_eq!(t.payment.state, PaymentState::OutcomeUnknown { attempt: 1 });
    assert_eq!(t.payment.next_check_at, None);
    assert!(matches!(
        run.apply(Input::Restored),
        Outcome::Ignored(Ignored::Stale)
    ));
    // ... or reconciled after a delay (the reinitiate policy).
    let mut run = reinitiating();
    let t = run.step(Input::Restored);
    assert_eq!(
        t.payment.next_check_at,
        Some(run.now + run.policy.reconcile_after_ms)
    );
    assert_eq!(t.events.len(), 1);
    assert_eq!(t.events[0].state, StateKind::OutcomeUnknown);
    assert_eq!(t.events[0].causation_id, "worker:restore");

    // A code not yet exchanged is exchanged again.
    let mut run = authorizing();
    let t = run.step(Input::Restored);
    assert_eq!(t.effects, vec![Effect::ExchangeCode]);
    assert!(t.events.is_empty());

    // Waiting states without a timer resume with their effect; with a timer, the timer does it.
    let mut run = received();
    assert_eq!(
        run.step(Input::Restored).effects,
        vec![Effect::StartInitiation]
    );
    for mut run in [sca_pending(), active()] {
        assert!(matches!(
            run.apply(Input::Restored),
            Outcome::Ignored(Ignored::Stale)
        ));
        run.next_at_timer();
        run.step(Input::TimerFired);
        assert_eq!(run.step(Input::Restored).effects, vec![Effect::CheckStatus]);
    }

    // Defect h: a cancellation may never have been sent. Only asking the status left the
    // payment SIGNED with "the bank still reports ACTC after the cancellation request" when no
    // request existed. The DELETE is sent again (idempotent at the bank).
    let mut run = cancelling();
    assert_eq!(run.payment().next_check_at, None);
    let t = run.step(Input::Restored);
    assert_eq!(t.payment.state, PaymentState::Cancelling);
    assert_eq!(t.effects, vec![Effect::CallCancel]);
    assert!(t.events.is_empty());
    assert_eq!(t.payment.resume_after_cancel, Some(PaymentState::Signed));
    // The same for a withdrawal's cancellation past the SCA deadline.
    let mut run = past_deadline();
    assert_eq!(run.step(Input::Restored).effects, vec![Effect::CallCancel]);
    // A status check after an unconfirmed cancellation is a status check again.
    let mut run = cancelling();
    run.step(cancel_unconfirmed());
    assert_eq!(run.step(Input::Restored).effects, vec![Effect::CallCancel]);
}

/// Part 3: under the default policy a lost initiation answer is not re-initiated: the payment
/// waits at OUTCOME_UNKNOWN, with what a person needs to look it up at the bank.
#[test]
fn a_lost_initiation_answer_waits_for_a_person_by_default() {
    assert_eq!(
        Policy::default().unknown_outcome,
        UnknownOutcomePolicy::Hold
    );
    let mut run = initiating();
    let t = run.step(outcome_unknown());
    assert_eq!(t.payment.state, PaymentState::OutcomeUnknown { attempt: 1 });
    assert_eq!(t.payment.next_check_at, None, "no reconcile timer");
    let reason = t.payment.reason.clone().expect("a reason");
    assert_eq!(reason.code, ReasonCode::OutcomeUnresolved);
    assert!(reason.message.contains("e2e-0001"), "{}", reason.message);
    assert!(reason.message.contains("attempt 1"), "{}", reason.message);
    assert!(
        reason.message.contains("ResolveOutcome"),
        "{}",
        reason.message
    );
    assert_eq!(t.events[0].reason.as_ref(), Some(&reason));
    // Nothing the worker does on its own moves it.
    for input in [Input::TimerFired, Input::Restored] {
        assert!(matches!(run.apply(input), Outcome::Ignored(Ignored::Stale)));
    }
    // A timer set under the reinitiate policy (before a switch) is consumed, not acted on.
    let mut switched = run.clone();
    let mut p = switched.payment().clone();
    p.next_check_at = Some(switched.now);
    switched.payment = Some(p);
    let t = switched.step(Input::TimerFired);
    assert_eq!(t.payment.state, PaymentState::OutcomeUnknown { attempt: 1 });
    assert!(t.effects.is_empty() && t.payment.next_check_at.is_none());
}

/// A person's three answers to a held payment, and where they do not apply.
#[test]
fn a_person_resolves_a_held_payment() {
    // Nothing at the bank: a new attempt.
    let mut run = unknown_outcome();
    let id = run.cmd();
    let t = run.step(resolve(id, Resolution::Reinitiate));
    assert_eq!(t.payment.state, PaymentState::Received);
    assert_eq!(t.effects, vec![Effect::StartInitiation]);
    assert!(t.events.is_empty());
    run.step(begin());
    assert_eq!(run.payment().initiation_attempts, 2);

    // The bank holds it: tracked from its status.
    let mut run = unknown_outcome();
    let id = run.cmd();
    let t = run.step(resolve(id, adopt()));
    assert_eq!(t.payment.state, PaymentState::ScaPending);
    assert_eq!(
        t.payment.bank_payment_id,
        Some(BankPaymentId::new("bank-orphan-1"))
    );
    assert_eq!(t.effects, vec![Effect::CheckStatus]);
    assert_eq!(t.events[0].sca_redirect_url, None);
    let t = run.step(observed(BankProgress::Signed));
    assert_eq!(t.payment.state, PaymentState::Signed);

    // Nothing to track: FAILED, with the person's note.
    let mut run = unknown_outcome();
    let id = run.cmd();
    let t = run.step(resolve(id, abandon()));
    assert_eq!(t.payment.state, PaymentState::Failed);
    assert!(
        t.payment
            .reason
            .as_ref()
            .is_some_and(|r| r.message.contains("nothing at the bank")),
        "{:?}",
        t.payment.reason
    );

    // An unconfirmed expiry can only be abandoned (EXPIRED); other states refuse.
    let mut run = unconfirmed();
    let id = run.cmd();
    assert!(matches!(
        run.apply(resolve(id, Resolution::Reinitiate)),
        Outcome::Refused(r) if r.code == RefusalCode::ResolutionNotApplicable
    ));
    let id = run.cmd();
    assert_eq!(
        run.step(resolve(id, abandon())).payment.state,
        PaymentState::Expired
    );
    let mut run = signed();
    let id = run.cmd();
    assert!(matches!(
        run.apply(resolve(id, abandon())),
        Outcome::Refused(r) if r.code == RefusalCode::ResolutionNotApplicable
    ));
}

#[test]
fn refresh_status_polls_now_or_is_recorded() {
    let mut run = signed();
    let id = run.cmd();
    let t = run.step(refresh(id.clone()));
    assert_eq!(t.effects, vec![Effect::CheckStatus]);
    assert!(t.events.is_empty());
    assert!(t.payment.seen_commands.contains(&id));

    let mut run = received();
    let id = run.cmd();
    let t = run.step(refresh(id.clone()));
    assert_eq!(t.payment.state, PaymentState::Received);
    assert!(t.effects.is_empty() && t.events.is_empty());
    assert!(t.payment.seen_commands.contains(&id));
    assert!(matches!(
        run.apply(refresh(id)),
        Outcome::Ignored(Ignored::DuplicateCommand)
    ));
}

#[test]
fn status_polls_go_from_fast_to_slow() {
    let mut run = signed();
    let policy = run.policy.clone();
    for poll in 0..policy.fast_polls + 2 {
        let t = run.step(check_failed());
        let interval = t.payment.next_check_at.expect("a poll") - run.now;
        // The observation that entered Signed started its count at zero.
        let want = if poll < policy.fast_polls {
            policy.fast_poll_ms
        } else {
            policy.slow_poll_ms
        };
        assert_eq!(interval, want, "poll {poll}");
    }
}

#[test]
fn duplicate_and_psu_checks_come_first() {
    let mut run = settled();
    let seen = run.payment().seen_commands.clone();
    for id in &seen {
        let stranger = Input::Cancel {
            command_id: id.clone(),
            psu_id: other_psu(),
            bank_token: true,
        };
        assert!(matches!(
            run.apply(stranger),
            Outcome::Ignored(Ignored::DuplicateCommand)
        ));
    }
    let stranger = Input::Cancel {
        command_id: cmd("new"),
        psu_id: other_psu(),
        bank_token: true,
    };
    assert!(matches!(
        run.apply(stranger),
        Outcome::Refused(r) if r.code == RefusalCode::PsuMismatch
    ));
    // A stranger's re-sent initiation is not an idempotent duplicate either.
    let stranger = Input::Initiate {
        command_id: cmd("new-2"),
        psu_id: other_psu(),
        order: order().into(),
        always_pkce: false,
    };
    assert!(matches!(
        run.apply(stranger),
        Outcome::Refused(r) if r.code == RefusalCode::PsuMismatch
    ));
}

#[test]
fn seen_commands_are_bounded_by_the_policy() {
    let policy = Policy {
        remembered_commands: 3,
        ..Policy::default()
    };
    let mut run = Run::with_policy(policy);
    run.step(initiate(cmd("init")));
    run.step(begin());
    run.step(bank_initiated());
    let ids: Vec<CommandId> = (1..=5).map(|i| cmd(&format!("refresh-{i}"))).collect();
    for id in &ids {
        let t = run.step(refresh(id.clone()));
        assert!(t.payment.seen_commands.len() <= 3);
        assert_eq!(t.payment.seen_commands.last(), Some(id));
    }
    assert_eq!(run.payment().seen_commands, ids[2..].to_vec());
    // Remembered ones are de-duplicated ...
    for id in &ids[2..] {
        assert!(matches!(
            run.apply(refresh(id.clone())),
            Outcome::Ignored(Ignored::DuplicateCommand)
        ));
    }
    // ... the oldest are forgotten (and a forgotten initiation is still idempotent by content).
    assert!(matches!(
        run.apply(refresh(ids[0].clone())),
        Outcome::Changed(_)
    ));
    assert!(matches!(
        run.apply(initiate(cmd("init"))),
        Outcome::Ignored(Ignored::DuplicateInitiation)
    ));
    assert_eq!(run.payment().seen_commands.len(), 3);
}

#[test]
fn standing_order_is_active_until_it_completes() {
    let mut run = Run::new();
    let t = run.initiate_order(standing_order());
    assert_eq!(t.payment.order, Some(standing_order()));
    assert_eq!(t.effects, vec![Effect::StartInitiation]);
    run.step(begin());
    run.step(bank_initiated());
    let deadline = run.payment().sca_deadline.expect("deadline");
    let policy = run.policy.clone();

    // Signed at the bank: the standing order is in force.
    let t = run.step(observed(BankProgress::Signed));
    assert_eq!(t.payment.state, PaymentState::Active);
    assert_eq!(t.payment.bank_status.as_deref(), Some("ACTC"));
    assert_eq!(
        t.payment.next_check_at,
        Some(run.now + policy.standing_order_poll_ms)
    );
    assert_eq!(t.events.len(), 1);
    assert_eq!(t.events[0].state, StateKind::Active);
    assert_eq!(t.events[0].reason, None);
    assert_eq!(t.events[0].sca_redirect_url, None);
    assert_eq!(t.events[0].bank_status.as_deref(), Some("ACTC"));

    // Polled every standing_order_poll_ms, without events while nothing changes.
    for _ in 0..3 {
        assert!(matches!(
            run.apply(Input::TimerFired),
            Outcome::Ignored(Ignored::Stale)
        ));
        run.next_at_timer();
        let t = run.step(Input::TimerFired);
        assert_eq!(t.effects, vec![Effect::CheckStatus]);
        assert_eq!(t.payment.next_check_at, None);
        let t = run.step(observed(BankProgress::Signed));
        assert_eq!(t.payment.state, PaymentState::Active);
        assert!(t.events.is_empty());
        assert_eq!(
            t.payment.next_check_at,
            Some(run.now + policy.standing_order_poll_ms)
        );
    }
    let t = run.step(check_failed());
    assert_eq!(t.payment.state, PaymentState::Active);
    assert_eq!(
        t.payment.next_check_at,
        Some(run.now + policy.standing_order_poll_ms)
    );
    // Signed long ago: the SCA deadline no longer applies.
    assert!(run.now > deadline);
    let t = run.step(observed(BankProgress::AwaitingSca));
    assert_eq!(t.payment.state, PaymentState::Active);
    assert!(t.events.is_empty());
    // A late code is exchanged for the PSU's token, and nothing else changes.
    let id = run.cmd();
    let t = run.step(sca_code(id));
    assert_eq!(t.payment.state, PaymentState::Active);
    assert_eq!(t.effects, vec![Effect::ExchangeCode]);
    assert!(t.events.is_empty());
    let t = run.step(Input::TokenExchanged);
    assert!(t.payment.authorization_code.is_none());
    assert!(t.effects.is_empty() && t.events.is_empty());
    // A refresh polls now.
    let id = run.cmd();
    let t = run.step(refresh(id));
    assert_eq!(t.effects, vec![Effect::CheckStatus]);
    assert!(t.events.is_empty());

    // The last execution is done.
    let t = run.step(observed(BankProgress::Settled));
    assert_eq!(t.payment.state, PaymentState::Completed);
    assert_eq!(t.payment.reason, None);
    assert_eq!(t.payment.bank_status.as_deref(), Some("ACSC"));
    assert_eq!(t.payment.next_check_at, None);
    assert!(!has_secrets(&t.payment));
    assert_eq!(
        run.event_kinds(),
        vec![
            StateKind::Received,
            StateKind::Initiating,
            StateKind::ScaPending,
            StateKind::Active,
            StateKind::Completed,
        ]
    );
    assert_eq!(run.sequences(), (1..=5).collect::<Vec<u64>>());

    // Completed absorbs everything.
    let id = run.cmd();
    assert!(matches!(
        run.apply(cancel(id, true)),
        Outcome::Refused(r) if r.code == RefusalCode::AlreadyFinal
    ));
    for input in [
        observed(BankProgress::Signed),
        Input::TimerFired,
        Input::Restored,
        cancel_confirmed(Some("CANC")),
    ] {
        assert!(matches!(run.apply(input), Outcome::Ignored(Ignored::Stale)));
    }
    assert_eq!(run.events.len(), 5);
}

#[test]
fn bank_cancellation_confirmed() {
    let mut run = signed();
    let published = run.events.len() as u64;
    let id = run.cmd();
    let t = run.step(cancel(id.clone(), true));
    assert_eq!(t.payment.state, PaymentState::Cancelling);
    assert_eq!(t.payment.resume_after_cancel, Some(PaymentState::Signed));
    assert_eq!(t.effects, vec![Effect::CallCancel]);
    assert_eq!(t.payment.next_check_at, None);
    assert_eq!(t.events.len(), 1);
    let e = &t.events[0];
    assert_eq!(
        (e.sequence, e.state),
        (published + 1, StateKind::Cancelling)
    );
    assert_eq!(e.causation_id, id.to_string());

    // The re-delivered command is a duplicate; another cancellation waits for this one.
    assert!(matches!(
        run.apply(cancel(id, true)),
        Outcome::Ignored(Ignored::DuplicateCommand)
    ));
    for bank_token in [true, false] {
        let id = run.cmd();
        assert!(matches!(
            run.apply(cancel(id, bank_token)),
            Outcome::Ignored(Ignored::CancelInProgress)
        ));
    }
    let id = run.cmd();
    assert!(matches!(
        run.apply(sca_code_with(id, "a-fresh-code", Some(SCA_STATE))),
        Outcome::Refused(r) if r.code == RefusalCode::NotAwaitingSca
    ));

    let t = run.step(cancel_confirmed(Some("CANC")));
    assert_eq!(t.payment.state, PaymentState::Cancelled);
    assert_eq!(reason_code(&t.payment), Some(ReasonCode::CancelledByClient));
    assert_eq!(t.payment.bank_status.as_deref(), Some("CANC"));
    assert_eq!(t.payment.resume_after_cancel, None);
    assert_eq!(t.payment.next_check_at, None);
    assert!(!has_secrets(&t.payment));
    assert!(t.effects.is_empty());
    assert_eq!(t.events.len(), 1);
    let e = &t.events[0];
    assert_eq!((e.sequence, e.state), (published + 2, StateKind::Cancelled));
    assert_eq!(event_reason_code(e), Some(ReasonCode::CancelledByClient));
    assert_eq!(e.bank_status.as_deref(), Some("CANC"));
    assert_eq!(
        run.sequences(),
        (1..=run.events.len() as u64).collect::<Vec<_>>()
    );
    assert_eq!(
        run.event_kinds()[run.events.len() - 3..],
        [
            StateKind::Signed,
            StateKind::Cancelling,
            StateKind::Cancelled
        ]
    );

    // Cancelled absorbs everything.
    assert!(matches!(
        run.apply(cancel_confirmed(None)),
        Outcome::Ignored(Ignored::Stale)
    ));
    let id = run.cmd();
    assert!(matches!(
        run.apply(cancel(id, true)),
        Outcome::Refused(r) if r.code == RefusalCode::AlreadyFinal
    ));
}

#[test]
fn bank_cancellation_from_every_state_the_bank_holds() {
    for (run, from) in [
        (sca_pending(), PaymentState::ScaPending),
        (authorizing(), PaymentState::Authorizing),
        (partially_signed(), PaymentState::PartiallySigned),
        (signed(), PaymentState::Signed),
        (signed_with(bulk_order()), PaymentState::Signed),
        (active(), PaymentState::Active),
    ] {
        let mut run = cancelling_from(run);
        let p = run.payment();
        assert_eq!(p.state, PaymentState::Cancelling, "from {from:?}");
        assert_eq!(p.resume_after_cancel, Some(from));
        assert_eq!(p.next_check_at, None, "from {from:?}");
        assert_eq!(run.effects.last(), Some(&vec![Effect::CallCancel]));
        // Confirmed without a status (204): the cancellation itself is ISO CANC.
        let t = run.step(cancel_confirmed(None));
        assert_eq!(t.payment.state, PaymentState::Cancelled, "from {from:?}");
        assert_eq!(reason_code(&t.payment), Some(ReasonCode::CancelledByClient));
        assert_eq!(
            t.payment.bank_status.as_deref(),
            Some("CANC"),
            "from {from:?}"
        );
        assert_eq!(t.events.len(), 1, "from {from:?}");
        assert!(!has_secrets(&t.payment), "from {from:?}");
    }
}

#[test]
fn bank_cancellation_refused_returns_to_where_it_was() {
    let mut run = cancelling();
    let t = run.step(cancel_refused());
    assert_eq!(t.payment.state, PaymentState::Signed);
    assert_eq!(t.payment.reason, Some(cancel_refused_reason()));
    assert_eq!(t.payment.resume_after_cancel, None);
    assert_eq!(
        t.payment.next_check_at,
        Some(run.now + run.policy.fast_poll_ms)
    );
    assert!(t.effects.is_empty());
    assert_eq!(t.events.len(), 1);
    assert_eq!(t.events[0].state, StateKind::Signed);
    assert_eq!(t.events[0].reason, Some(cancel_refused_reason()));
    assert_eq!(
        run.event_kinds()[run.events.len() - 3..],
        [StateKind::Signed, StateKind::Cancelling, StateKind::Signed]
    );
    assert_eq!(
        run.sequences(),
        (1..=run.events.len() as u64).collect::<Vec<_>>()
    );
    // Polling carries on, and the payment can still settle or be cancelled again.
    run.next_at_timer();
    assert_eq!(
        run.step(Input::TimerFired).effects,
        vec![Effect::CheckStatus]
    );
    let mut again = run.clone();
    let id = again.cmd();
    assert_eq!(
        again.step(cancel(id, true)).payment.state,
        PaymentState::Cancelling
    );
    let t = run.step(observed(BankProgress::Settled));
    assert_eq!(t.payment.state, PaymentState::Settled);

    // An active standing order stays active, polled at its own pace.
    let mut run = cancelling_from(active());
    let t = run.step(cancel_refused());
    assert_eq!(t.payment.state, PaymentState::Active);
    assert_eq!(reason_code(&t.payment), Some(ReasonCode::CancelRefused));
    assert_eq!(
        t.payment.next_check_at,
        Some(run.now + run.policy.standing_order_poll_ms)
    );
    assert_eq!(t.events.len(), 1);
    assert_eq!(t.events[0].state, StateKind::Active);
}

#[test]
fn unconfirmed_cancellation_resolved_as_cancelled_by_the_banks_status() {
    let mut run = cancelling();
    let t = run.step(cancel_unconfirmed());
    assert_eq!(t.payment.state, PaymentState::Cancelling);
    assert_eq!(t.effects, vec![Effect::CheckStatus]);
    assert!(t.events.is_empty());
    assert_eq!(t.payment.resume_after_cancel, Some(PaymentState::Signed));
    // The check fails: poll again later, still cancelling.
    let t = run.step(check_failed());
    assert_eq!(t.payment.state, PaymentState::Cancelling);
    assert!(t.events.is_empty());
    assert!(t.payment.next_check_at.is_some());
    run.next_at_timer();
    assert_eq!(
        run.step(Input::TimerFired).effects,
        vec![Effect::CheckStatus]
    );

    let t = run.step(observed(BankProgress::Cancelled));
    assert_eq!(t.payment.state, PaymentState::Cancelled);
    assert_eq!(t.payment.bank_status.as_deref(), Some("CANC"));
    assert!(
        matches!(
            reason_code(&t.payment),
            Some(ReasonCode::CancelledByClient | ReasonCode::CancelledAtBank)
        ),
        "{:?}",
        t.payment.reason
    );
    assert_eq!(t.payment.resume_after_cancel, None);
    assert_eq!(t.payment.next_check_at, None);
    assert_eq!(t.events.len(), 1);
    assert_eq!(t.events[0].state, StateKind::Cancelled);
    assert_eq!(t.events[0].reason, t.payment.reason);
    assert_eq!(
        run.event_kinds()[run.events.len() - 3..],
        [
            StateKind::Signed,
            StateKind::Cancelling,
            StateKind::Cancelled
        ]
    );
}

#[test]
fn unconfirmed_cancellation_of_a_payment_still_alive_returns_with_a_reason() {
    let mut run = cancelling();
    run.step(cancel_unconfirmed());
    let t = run.step(observed(BankProgress::Signed));
    assert_eq!(t.payment.state, PaymentState::Signed);
    assert_eq!(
        reason_code(&t.payment),
        Some(ReasonCode::CancelNotConfirmed)
    );
    assert_eq!(t.payment.resume_after_cancel, None);
    assert!(t.payment.next_check_at.is_some_and(|at| at > run.now));
    assert_eq!(t.events.len(), 1);
    assert_eq!(t.events[0].state, StateKind::Signed);
    assert_eq!(
        event_reason_code(&t.events[0]),
        Some(ReasonCode::CancelNotConfirmed)
    );
    assert_eq!(
        run.event_kinds()[run.events.len() - 3..],
        [StateKind::Signed, StateKind::Cancelling, StateKind::Signed]
    );

    // Whatever the bank reports of a live payment, it goes back where it was.
    for (from, progress) in [
        (active(), BankProgress::Signed),
        (active(), BankProgress::AwaitingSca),
        (sca_pending(), BankProgress::AwaitingSca),
        (sca_pending(), BankProgress::Signed),
        (partially_signed(), BankProgress::PartiallySigned),
        (authorizing(), BankProgress::PartiallySigned),
    ] {
        let state = from.payment().state;
        let mut run = cancelling_from(from);
        run.step(cancel_unconfirmed());
        let t = run.step(observed(progress));
        let context = format!("{progress:?} while cancelling from {state:?}");
        assert_eq!(t.payment.state, state, "{context}");
        assert_eq!(
            reason_code(&t.payment),
            Some(ReasonCode::CancelNotConfirmed),
            "{context}"
        );
        assert_eq!(t.events.len(), 1, "{context}");
        assert_eq!(t.payment.resume_after_cancel, None, "{context}");
    }
}

#[test]
fn cancellation_overtaken_by_a_final_status() {
    for (from, progress, state, reason) in [
        (signed(), BankProgress::Settled, StateKind::Settled, None),
        (active(), BankProgress::Settled, StateKind::Completed, None),
        (
            signed_with(bulk_order()),
            BankProgress::PartiallyAccepted,
            StateKind::PartiallySettled,
            Some(ReasonCode::BulkPartiallyRejected),
        ),
        (
            sca_pending(),
            BankProgress::Rejected,
            StateKind::Rejected,
            Some(ReasonCode::BankRejected),
        ),
    ] {
        let mut run = cancelling_from(from);
        let t = run.step(observed(progress));
        let context = format!("{progress:?} while cancelling");
        assert_eq!(t.payment.state.kind(), state, "{context}");
        assert_eq!(reason_code(&t.payment), reason, "{context}");
        assert_eq!(t.events.len(), 1, "{context}");
        assert_eq!(t.payment.next_check_at, None, "{context}");
        assert!(!has_secrets(&t.payment), "{context}");
        assert!(matches!(
            run.apply(cancel_confirmed(None)),
            Outcome::Ignored(Ignored::Stale)
        ));
    }
}

#[test]
fn cancel_without_a_token_is_refused_while_the_bank_holds_the_payment() {
    for mut run in [
        sca_pending(),
        authorizing(),
        partially_signed(),
        signed(),
        active(),
    ] {
        let before = run.payment().clone();
        let id = run.cmd();
        let outcome = run.apply(cancel(id.clone(), false));
        let context = format!("on {:?}: {}", before.state, summary(&outcome));
        assert!(
            matches!(&outcome, Outcome::Refused(r) if r.code == RefusalCode::CancelNotPossible),
            "{context}"
        );
        // The payment is unaffected: the same command with a token is a new command.
        assert_eq!(run.payment().state, before.state, "{context}");
        assert_eq!(run.payment().sequence, before.sequence, "{context}");
        let t = run.step(cancel(id, true));
        assert_eq!(t.payment.state, PaymentState::Cancelling, "{context}");
    }
}

#[test]
fn sca_deadline_applies_only_while_awaiting_signature() {
    // Signed by the PSU: a slow bank does not expire the payment.
    let mut run = authorizing();
    run.step(Input::TokenExchanged);
    run.next_at(LATE);
    let t = run.step(observed(BankProgress::AwaitingSca));
    assert_eq!(t.payment.state, PaymentState::Authorizing);
    assert!(t.events.is_empty());

    // Nor does a cancellation: it returns, and the next poll expires the payment.
    let mut run = cancelling_from(sca_pending());
    run.next_at(LATE);
    let t = run.step(observed(BankProgress::AwaitingSca));
    assert_eq!(t.payment.state, PaymentState::ScaPending);
    assert_eq!(
        reason_code(&t.payment),
        Some(ReasonCode::CancelNotConfirmed)
    );
    let t = run.step(observed(BankProgress::AwaitingSca));
    assert_eq!(t.payment.state, PaymentState::ScaPending);
    assert_eq!(t.effects, vec![Effect::CallCancel]);
    let t = run.step(observed(BankProgress::Rejected));
    assert_eq!(t.payment.state, PaymentState::Expired);
    assert_eq!(reason_code(&t.payment), Some(ReasonCode::ScaExpired));
}

#[test]
fn bulk_partially_settled() {
    let mut run = Run::new();
    let t = run.initiate_order(bulk_order());
    assert_eq!(t.payment.order, Some(bulk_order()));
    run.step(begin());
    run.step(bank_initiated());
    let id = run.cmd();
    run.step(sca_code(id));
    run.step(Input::TokenExchanged);
    // A signed bulk is signed (only a standing order becomes active).
    let t = run.step(observed(BankProgress::Signed));
    assert_eq!(t.payment.state, PaymentState::Signed);
    let t = run.step(observed(BankProgress::PartiallyAccepted));
    assert_eq!(t.payment.state, PaymentState::PartiallySettled);
    assert_eq!(
        reason_code(&t.payment),
        Some(ReasonCode::BulkPartiallyRejected)
    );
    assert_eq!(t.payment.bank_status.as_deref(), Some("PART"));
    assert_eq!(t.payment.next_check_at, None);
    assert!(!has_secrets(&t.payment));
    assert!(t.effects.is_empty());
    assert_eq!(t.events.len(), 1);
    assert_eq!(
        event_reason_code(&t.events[0]),
        Some(ReasonCode::BulkPartiallyRejected)
    );
    assert_eq!(t.events[0].bank_status.as_deref(), Some("PART"));
    assert_eq!(
        run.event_kinds(),
        vec![
            StateKind::Received,
            StateKind::Initiating,
            StateKind::ScaPending,
            StateKind::Authorizing,
            StateKind::Signed,
            StateKind::PartiallySettled,
        ]
    );
    assert_eq!(run.sequences(), (1..=6).collect::<Vec<u64>>());

    // Terminal: absorbs everything.
    let id = run.cmd();
    assert!(matches!(
        run.apply(cancel(id, true)),
        Outcome::Refused(r) if r.code == RefusalCode::AlreadyFinal
    ));
    assert!(matches!(
        run.apply(observed(BankProgress::Settled)),
        Outcome::Ignored(Ignored::Stale)
    ));

    // A bulk with every transfer executed is settled.
    let mut run = signed_with(bulk_order());
    let t = run.step(observed(BankProgress::Settled));
    assert_eq!(t.payment.state, PaymentState::Settled);
    assert_eq!(t.payment.reason, None);
}

// ---------------------------------------------------------------------------------------------
// 3. Properties over random input sequences
// ---------------------------------------------------------------------------------------------

/// A short SCA window, a short standing-order poll and a small command memory, so expiry,
/// polling and forgetting happen in 40 steps.
fn prop_policy() -> Policy {
    Policy {
        sca_timeout_ms: 60_000,
        fast_poll_ms: 2_000,
        fast_polls: 3,
        slow_poll_ms: 10_000,
        initiation_retry_ms: 2_000,
        reconcile_after_ms: 5_000,
        max_initiation_attempts: 3,
        remembered_commands: 4,
        standing_order_poll_ms: 30_000,
        unknown_outcome: UnknownOutcomePolicy::Reinitiate,
        expiry_horizon_ms: 120_000,
        initiate_with_token: true,
    }
}

/// Which order an initiation carries.
#[derive(Debug, Clone, Copy)]
enum Pick {
    Single,
    OtherSingle,
    Standing,
    Bulk,
}

impl Pick {
    fn order(self) -> Order {
        match self {
            Pick::Single => order().into(),
            Pick::OtherSingle => other_order().into(),
            Pick::Standing => standing_order(),
            Pick::Bulk => bulk_order(),
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Initiate {
        cmd: u8,
        stranger: bool,
        pick: Pick,
    },
    InitiateInvalid {
        cmd: u8,
        stranger: bool,
    },
    ScaCode {
        cmd: u8,
        stranger: bool,
    },
    ScaError {
        cmd: u8,
        stranger: bool,
    },
    /// A redirect with the state only (a payment initiated with the PSU's token).
    ScaReturned {
        cmd: u8,
    },
    Cancel {
        cmd: u8,
        stranger: bool,
        bank_token: bool,
    },
    Refresh {
        cmd: u8,
        stranger: bool,
    },
    /// A person's resolution: 0 re-initiate, 1 adopt, 2 abandon.
    Resolve {
        cmd: u8,
        which: u8,
    },
    Begin,
    BeginWithToken,
    FallBackToPkce,
    BankInitiated,
    InitiationRefused,
    NotProcessed,
    Unknown,
    TokenExchanged,
    TokenExchangeFailed,
    Observed(BankProgress),
    CheckFailed,
    CancelConfirmed {
        with_status: bool,
    },
    CancelRefused,
    CancelUnconfirmed,
    Timer,
    Restored,
    /// What the engine does next: answers the last effect asked for (the bank answering a status
    /// check with this progress, or a cancellation as this progress suggests), or else fires the
    /// timer.
    Follow(BankProgress),
}

impl Op {
    fn input(&self, last_effect: Option<Effect>) -> Input {
        let id = |n: u8| CommandId::new(format!("c{n}"));
        let who = |stranger: bool| if stranger { other_psu() } else { psu() };
        match *self {
            Op::Initiate {
                cmd,
                stranger,
                pick,
            } => Input::Initiate {
                command_id: id(cmd),
                psu_id: who(stranger),
                order: pick.order(),
                always_pkce: false,
            },
            Op::InitiateInvalid { cmd, stranger } => Input::InitiateInvalid {
                command_id: id(cmd),
                psu_id: who(stranger),
                reason: Reason::new(ReasonCode::InvalidAmount, "negative"),
            },
            Op::ScaCode { cmd, stranger } => Input::CompleteSca {
                command_id: id(cmd),
                psu_id: who(stranger),
                outcome: ScaOutcome::Code(SecretString::from(format!("code-{cmd}"))),
                state: Some(SCA_STATE.into()),
            },
            Op::ScaError { cmd, stranger } => Input::CompleteSca {
                command_id: id(cmd),
                psu_id: who(stranger),
                outcome: ScaOutcome::Error {
                    error: "access_denied".into(),
                    description: None,
                },
                state: Some(SCA_STATE.into()),
            },
            Op::Cancel {
                cmd,
                stranger,
                bank_token,
            } => Input::Cancel {
                command_id: id(cmd),
                psu_id: who(stranger),
                bank_token,
            },
            Op::Refresh { cmd, stranger } => Input::RefreshStatus {
                command_id: id(cmd),
                psu_id: who(stranger),
            },
            Op::Resolve { cmd, which } => resolve(
                id(cmd),
                match which {
                    0 => Resolution::Reinitiate,
                    1 => adopt(),
                    _ => abandon(),
                },
            ),
            Op::ScaReturned { cmd } => sca_returned(id(cmd)),
            Op::Begin => begin(),
            Op::BeginWithToken => begin_with_token(),
            Op::FallBackToPkce => fall_back_to_pkce(),
            Op::BankInitiated => bank_initiated(),
            Op::InitiationRefused => initiation_refused(),
            Op::NotProcessed => not_processed(),
            Op::Unknown => outcome_unknown(),
            Op::TokenExchanged => Input::TokenExchanged,
            Op::TokenExchangeFailed => Input::TokenExchangeFailed {
                message: "invalid_grant".into(),
            },
            Op::Observed(progress) => observed(progress),
            Op::CheckFailed => check_failed(),
            Op::CancelConfirmed { with_status } => cancel_confirmed(with_status.then_some("CANC")),
            Op::CancelRefused => cancel_refused(),
            Op::CancelUnconfirmed => cancel_unconfirmed(),
            Op::Timer => Input::TimerFired,
            Op::Restored => Input::Restored,
            Op::Follow(progress) => match last_effect {
                Some(Effect::StartInitiation) => begin(),
                Some(Effect::CallInitiate) => bank_initiated(),
                Some(Effect::ExchangeCode) => Input::TokenExchanged,
                Some(Effect::CheckStatus) => observed(progress),
                Some(Effect::CallCancel) => match progress {
                    BankProgress::Cancelled | BankProgress::Settled => {
                        cancel_confirmed(Some("CANC"))
                    }
                    BankProgress::Rejected | BankProgress::PartiallyAccepted => cancel_refused(),
                    BankProgress::AwaitingSca
                    | BankProgress::PartiallySigned
                    | BankProgress::Signed => cancel_unconfirmed(),
                },
                None => Input::TimerFired,
            },
        }
    }
}

fn pick_strategy() -> impl Strategy<Value = Pick> {
    prop_oneof![
        4 => Just(Pick::Single),
        1 => Just(Pick::OtherSingle),
        2 => Just(Pick::Standing),
        2 => Just(Pick::Bulk),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let cmd = || 0u8..6;
    let stranger = || prop::bool::weighted(0.1);
    prop_oneof![
        3 => (cmd(), stranger(), pick_strategy()).prop_map(
            |(cmd, stranger, pick)| Op::Initiate { cmd, stranger, pick }
        ),
        1 => (cmd(), stranger()).prop_map(|(cmd, stranger)| Op::InitiateInvalid { cmd, stranger }),
        5 => (cmd(), stranger()).prop_map(|(cmd, stranger)| Op::ScaCode { cmd, stranger }),
        1 => (cmd(), stranger()).prop_map(|(cmd, stranger)| Op::ScaError { cmd, stranger }),
        2 => cmd().prop_map(|cmd| Op::ScaReturned { cmd }),
        2 => (cmd(), stranger(), prop::bool::weighted(0.7)).prop_map(
            |(cmd, stranger, bank_token)| Op::Cancel { cmd, stranger, bank_token }
        ),
        3 => (cmd(), stranger()).prop_map(|(cmd, stranger)| Op::Refresh { cmd, stranger }),
        2 => (cmd(), 0u8..3).prop_map(|(cmd, which)| Op::Resolve { cmd, which }),
        6 => Just(Op::Begin),
        3 => Just(Op::BeginWithToken),
        1 => Just(Op::FallBackToPkce),
        6 => Just(Op::BankInitiated),
        1 => Just(Op::InitiationRefused),
        3 => Just(Op::NotProcessed),
        3 => Just(Op::Unknown),
        3 => Just(Op::TokenExchanged),
        1 => Just(Op::TokenExchangeFailed),
        8 => bank_progress().prop_map(Op::Observed),
        2 => Just(Op::CheckFailed),
        1 => any::<bool>().prop_map(|with_status| Op::CancelConfirmed { with_status }),
        1 => Just(Op::CancelRefused),
        1 => Just(Op::CancelUnconfirmed),
        6 => Just(Op::Timer),
        2 => Just(Op::Restored),
        12 => bank_progress().prop_map(Op::Follow),
    ]
}

/// Weighted towards progress, so runs reach the later states.
fn bank_progress() -> impl Strategy<Value = BankProgress> {
    prop_oneof![
        3 => Just(BankProgress::AwaitingSca),
        2 => Just(BankProgress::PartiallySigned),
        3 => Just(BankProgress::Signed),
        2 => Just(BankProgress::Settled),
        1 => Just(BankProgress::PartiallyAccepted),
        1 => Just(BankProgress::Rejected),
        1 => Just(BankProgress::Cancelled),
    ]
}

/// Up to 40 inputs, most runs opening with a valid initiation of a single, standing or bulk
/// order.
fn steps_strategy() -> impl Strategy<Value = Vec<(Op, Millis)>> {
    let opening = prop_oneof![
        2 => Just(Pick::Single),
        1 => Just(Pick::Standing),
        1 => Just(Pick::Bulk),
    ];
    (
        prop::bool::weighted(0.8),
        opening,
        prop::collection::vec((op_strategy(), delay_strategy()), 0..=39),
    )
        .prop_map(|(open, pick, mut steps)| {
            if open || steps.is_empty() {
                let opening = Op::Initiate {
                    cmd: 0,
                    stranger: false,
                    pick,
                };
                steps.insert(0, (opening, 0));
            }
            steps
        })
}

/// Time between two inputs: mostly short, sometimes past a poll or reconcile timer, now and
/// then past the SCA deadline.
fn delay_strategy() -> impl Strategy<Value = Millis> {
    prop_oneof![
        6 => 0i64..3_000,
        3 => 3_000i64..20_000,
        1 => 20_000i64..120_000,
    ]
}

fn check_sequence(steps: &[(Op, Millis)]) -> Result<(), TestCaseError> {
    check_sequence_with(steps, &prop_policy())
}

fn check_sequence_with(steps: &[(Op, Millis)], policy: &Policy) -> Result<(), TestCaseError> {
    let policy = policy.clone();
    let id = payment_id();
    let mut now = T0;
    let mut current: Option<Payment> = None;
    let mut published: Vec<StatusEvent> = Vec::new();
    // The effect the engine still owes, answered by `Op::Follow`.
    let mut owed: Option<Effect> = None;
    for (i, (op, delay)) in steps.iter().enumerate() {
        now += delay;
        let input = op.input(owed);
        if matches!(op, Op::Follow(_)) {
            owed = None;
        }
        let before = current.as_ref().map(|p| p.state);
        let outcome = decide(&id, current.as_ref(), input.clone(), now, &policy);
        let context = format!("step {i}: {op:?} on {before:?} -> {}", summary(&outcome));

        // (a) A terminal payment absorbs every later input.
        if before.is_some_and(PaymentState::is_terminal) {
            prop_assert!(!matches!(outcome, Outcome::Changed(_)), "{}", context);
        }
        // (d) A command already applied (and still remembered) is a duplicate.
        if let (Some(p), Some(command)) = (&current, input.command_id()) {
            if p.seen_commands.contains(command) {
                prop_assert!(
                    matches!(outcome, Outcome::Ignored(Ignored::DuplicateCommand)),
                    "{}",
                    context
                );
            }
        }

        let Outcome::Changed(t) = outcome else {
            continue;
        };
        if let Some(effect) = t.effects.first() {
            owed = Some(*effect);
        }
        let after = t.payment.state.kind();
        prop_assert!(t.events.len() <= 1, "{}", context);
        match before.map(PaymentState::kind) {
            None => prop_assert_eq!(t.events.len(), 1, "{}", context),
            Some(kind) if kind == after => prop_assert!(t.events.is_empty(), "{}", context),
            Some(_) if t.events.is_empty() => {
                // Only the silent ways back into an initiation attempt publish nothing.
                let last = current.as_ref().and_then(|p| p.last_published);
                prop_assert!(
                    after == StateKind::Received
                        || (after == StateKind::Initiating && last == Some(StateKind::Initiating)),
                    "{}",
                    context
                );
            }
            Some(_) => {}
        }
        for event in &t.events {
            // (b) Gap-free sequence numbers from 1.
            prop_assert_eq!(event.sequence, published.len() as u64 + 1, "{}", context);
            // (e) The event tells the state the payment is in.
            prop_assert_eq!(event.state, after, "{}", context);
            prop_assert_eq!(&event.payment_id, &id, "{}", context);
            // (c) At most one terminal event.
            if event.state.is_terminal() {
                prop_assert!(
                    !published.iter().any(|e| e.state.is_terminal()),
                    "{}",
                    context
                );
            }
            published.push(event.clone());
        }
        prop_assert_eq!(t.payment.sequence, published.len() as u64, "{}", context);
        prop_assert_eq!(
            t.payment.last_published,
            published.last().map(|e| e.state),
            "{}",
            context
        );
        // (f) A terminal record holds no secret and no timer.
        if after.is_terminal() {
            prop_assert!(!has_secrets(&t.payment), "{}", context);
            prop_assert_eq!(t.payment.next_check_at, None, "{}", context);
        }
        // Where to resume is known exactly while cancelling, and is a state the bank holds.
        match (after, t.payment.resume_after_cancel.map(PaymentState::kind)) {
            (StateKind::Cancelling, Some(resume)) => prop_assert!(
                (is_polling(resume) && resume != StateKind::Cancelling)
                    || t.payment.resume_after_cancel == Some(PaymentState::Unconfirmed),
                "{}",
                context
            ),
            (StateKind::Cancelling, None) => prop_assert!(false, "{}: nowhere to resume", context),
            (_, resume) => prop_assert_eq!(resume, None, "{}", context),
        }
        // The order's kind decides the states a payment can be in.
        let standing = t.payment.order.as_ref().map(Order::kind) == Some(PaymentKind::Periodic);
        if standing {
            prop_assert!(
                !matches!(after, StateKind::Signed | StateKind::Settled),
                "{}",
                context
            );
        } else {
            prop_assert!(
                !matches!(after, StateKind::Active | StateKind::Completed),
                "{}",
                context
            );
        }
        // An unsigned payment is polled no later than its deadline.
        if let (true, Some(at), Some(deadline)) = (
            after.awaits_signature(),
            t.payment.next_check_at,
            t.payment.sca_deadline,
        ) {
            if deadline > now {
                prop_assert!(at <= deadline, "{}", context);
            }
        }
        // (d) Re-applying the command just applied is a duplicate and changes nothing.
        if let Some(command) = input.command_id() {
            prop_assert!(t.payment.seen_commands.contains(command), "{}", context);
            prop_assert!(
                t.payment.seen_commands.len() <= policy.remembered_commands,
                "{}",
                context
            );
            let again = decide(&id, Some(&t.payment), input.clone(), now, &policy);
            prop_assert!(
                matches!(again, Outcome::Ignored(Ignored::DuplicateCommand)),
                "{}: re-applied -> {}",
                context,
                summary(&again)
            );
        }
        current = Some(t.payment);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_input_sequences_keep_the_invariants(
        steps in steps_strategy()
    ) {
        check_sequence(&steps)?;
    }

    /// The same under the default policy for lost answers (held for a person).
    #[test]
    fn random_input_sequences_keep_the_invariants_when_lost_answers_are_held(
        steps in steps_strategy()
    ) {
        check_sequence_with(&steps, &Policy {
            unknown_outcome: UnknownOutcomePolicy::Hold,
            ..prop_policy()
        })?;
    }
}
