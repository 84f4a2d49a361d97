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
    }
}

fn initiate_invalid(command_id: CommandId) -> Input {
    Input::InitiateInvalid {
        command_id,
        psu_id: psu(),
        reason: Reason::new(ReasonCode::InvalidIban, "creditor IBAN checksum"),
    }
}

fn sca_code(command_id: CommandId) -> Input {
    Input::CompleteSca {
        command_id,
        psu_id: psu(),
        outcome: ScaOutcome::Code(SecretString::from("auth-code-123")),
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
        pkce_verifier: SecretString::from("pkce-verifier-0123456789"),
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
        | Input::RefreshStatus { psu_id, .. } => Some(psu_id),
        Input::BeginInitiation { .. }
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
        Input::Cancel {
            bank_token: true, ..
        } => "Cancel(token)",
        Input::Cancel {
            bank_token: false, ..
        } => "Cancel(no token)",
        Input::RefreshStatus { .. } => "RefreshStatus",
        Input::BeginInitiation { .. } => "BeginInitiation",
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

const ALL_INPUT_KEYS: [&str; 31] = [
    "Initiate(Single)",
    "Initiate(Standing)",
    "Initiate(Bulk)",
    "InitiateInvalid",
    "CompleteSca(Code)",
    "CompleteSca(Error)",
    "Cancel(token)",
    "Cancel(no token)",
    "RefreshStatus",
    "BeginInitiation",
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

fn rejected() -> Run {
    let mut run = sca_pending();
    let id = run.cmd();
    run.step(sca_error(id));
    run
}

fn expired() -> Run {
    let mut run = sca_pending();
    let deadline = run.payment().sca_deadline.expect("deadline");
    run.next_at(deadline);
    run.step(observed(BankProgress::AwaitingSca));
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

fn unknown_outcome() -> Run {
    let mut run = initiating();
    run.step(outcome_unknown());
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
    let terminal = kind.is_terminal();
    let polling = is_polling(kind);
    let awaiting_sca = matches!(kind, K::ScaPending | K::PartiallySigned);
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
            if terminal {
                already_final
            } else if late_code {
                stay(vec![Effect::ExchangeCode]).code(true).into()
            } else if !awaiting_sca {
                Expect::Refused(RefusalCode::NotAwaitingSca)
            } else {
                match outcome {
                    ScaOutcome::Code(_) => go(K::Authorizing, vec![Effect::ExchangeCode])
                        .code(true)
                        .into(),
                    ScaOutcome::Error { .. } => {
                        go(K::Rejected, vec![]).reason(ReasonCode::ScaFailed).into()
                    }
                }
            }
        }
        Input::Cancel { bank_token, .. } => match kind {
            // No bank-side payment anyone can sign yet: cancelled here, token or not.
            K::Received | K::Initiating | K::OutcomeUnknown => go(K::Cancelled, vec![])
                .reason(ReasonCode::CancelledByClient)
                .timer(Timer::Cleared)
                .verifier(false)
                .into(),
            // The bank holds the payment: only the bank's cancellation, with the PSU's token.
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
        },
        Input::RefreshStatus { .. } => {
            if terminal {
                already_final
            } else if polling {
                stay(vec![Effect::CheckStatus]).into()
            } else {
                stay(vec![]).into()
            }
        }
        Input::BeginInitiation { .. } => match kind {
            K::Received => Change::new(
                K::Initiating,
                usize::from(p.last_published != Some(K::Initiating)),
                vec![Effect::CallInitiate],
            )
            .verifier(true)
            .into(),
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
                    .timer(Timer::At(now + policy.reconcile_after_ms))
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
            // The SCA deadline applies only while the PSU's signature is outstanding.
            let expired = awaiting_sca && p.sca_deadline.is_some_and(|d| now >= d);
            let change = match progress {
                BankProgress::AwaitingSca | BankProgress::PartiallySigned if expired => {
                    go(K::Expired, vec![]).reason(ReasonCode::ScaExpired)
                }
                BankProgress::AwaitingSca => stay(vec![]).timer(Timer::Poll),
                BankProgress::PartiallySigned => go(K::PartiallySigned, vec![]).timer(Timer::Poll),
                BankProgress::Signed => {
                    let signed = if standing { K::Active } else { K::Signed };
                    go(signed, vec![]).timer(Timer::Poll)
                }
                BankProgress::Settled => go(settled, vec![]),
                BankProgress::PartiallyAccepted => {
                    go(K::PartiallySettled, vec![]).reason(ReasonCode::BulkPartiallyRejected)
                }
                BankProgress::Rejected => go(K::Rejected, vec![]).reason(ReasonCode::BankRejected),
                BankProgress::Cancelled => {
                    go(K::Cancelled, vec![]).reason(ReasonCode::CancelledAtBank)
                }
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
        Input::CancelConfirmed { bank_status } => match kind {
            K::Cancelling => go(K::Cancelled, vec![])
                .reason(ReasonCode::CancelledByClient)
                .resume(None)
                // Confirmed without a body (204): the cancellation itself is ISO CANC.
                .bank_status(bank_status.clone().or_else(|| Some("CANC".into())))
                .into(),
            _ => stale,
        },
        Input::CancelRefused(reason) => match kind {
            K::Cancelling => go(resume, vec![])
                .reason(reason.code)
                .timer(Timer::Poll)
                .resume(None)
                .into(),
            _ => stale,
        },
        Input::CancelUnconfirmed { .. } => match kind {
            K::Cancelling => stay(vec![Effect::CheckStatus]).into(),
            _ => stale,
        },
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
                | PaymentState::Cancelling => {
                    stay(vec![Effect::CheckStatus]).timer(Timer::Cleared).into()
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
            match kind {
                K::Initiating => go(K::OutcomeUnknown, vec![])
                    .timer(Timer::At(now + policy.reconcile_after_ms))
                    .into(),
                K::Authorizing if p.authorization_code.is_some() => {
                    stay(vec![Effect::ExchangeCode]).into()
                }
                K::Received if no_timer => stay(vec![Effect::StartInitiation]).into(),
                _ if polling && no_timer => stay(vec![Effect::CheckStatus]).into(),
                // Not reachable through the machine (an unknown outcome always has its reconcile
                // timer); resuming it means re-arming that timer.
                K::OutcomeUnknown if no_timer => stay(vec![])
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
        Timer::Poll if kind == StateKind::Active => {
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
        (StateKind::Cancelling, Some(resume)) if is_polling(resume) && resume != kind => {}
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
        case("Cancel (bank token)", At::Now, |_| {
            cancel(cmd("t-cancel"), true)
        }),
        case("Cancel (no bank token)", At::Now, |_| {
            cancel(cmd("t-cancel-no-token"), false)
        }),
        case("RefreshStatus", At::Now, |_| refresh(cmd("t-refresh"))),
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
        case("BeginInitiation", At::Now, |_| begin()),
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
    assert_eq!(checked, 16 * 39);
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
            "CompleteSca(Code)" | "CompleteSca(Error)" | "Cancel(token)" | "Cancel(no token)"
            | "RefreshStatus" => {
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
    assert_eq!(
        e.sca_redirect_url.as_deref(),
        Some("https://bank.example/sca/77")
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

#[test]
fn psu_rejection_at_sca() {
    let mut run = sca_pending();
    assert!(run.payment().pkce_verifier.is_some());
    let id = run.cmd();
    let t = run.step(sca_error(id.clone()));
    assert_eq!(t.payment.state, PaymentState::Rejected);
    assert_eq!(
        t.payment.reason.as_ref().map(|r| r.code),
        Some(ReasonCode::ScaFailed)
    );
    assert!(t.effects.is_empty());
    assert!(!has_secrets(&t.payment));
    assert_eq!(t.payment.next_check_at, None);
    let e = &t.events[0];
    assert_eq!((e.sequence, e.state), (4, StateKind::Rejected));
    assert_eq!(
        e.reason.as_ref().map(|r| r.code),
        Some(ReasonCode::ScaFailed)
    );
    assert_eq!(e.causation_id, id.to_string());
    // The re-delivered command and any later one change nothing.
    assert!(matches!(
        run.apply(sca_error(id)),
        Outcome::Ignored(Ignored::DuplicateCommand)
    ));
    let id = run.cmd();
    assert!(matches!(
        run.apply(sca_code(id)),
        Outcome::Refused(r) if r.code == RefusalCode::AlreadyFinal
    ));
    assert_eq!(
        run.event_kinds(),
        vec![
            StateKind::Received,
            StateKind::Initiating,
            StateKind::ScaPending,
            StateKind::Rejected
        ]
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

#[test]
fn unsigned_payment_expires_at_the_deadline() {
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
        if t.payment.state.is_terminal() {
            break;
        }
        assert_eq!(t.payment.state, PaymentState::ScaPending);
        assert!(t.events.is_empty());
    }
    let p = run.payment();
    assert_eq!(p.state, PaymentState::Expired);
    assert!(run.now >= deadline && run.now <= deadline + 1);
    assert_eq!(
        p.reason.as_ref().map(|r| r.code),
        Some(ReasonCode::ScaExpired)
    );
    assert!(!has_secrets(p));
    assert_eq!(p.next_check_at, None);
    assert_eq!(
        run.event_kinds(),
        vec![
            StateKind::Received,
            StateKind::Initiating,
            StateKind::ScaPending,
            StateKind::Expired
        ]
    );
    assert_eq!(
        run.events[3].reason.as_ref().map(|r| r.code),
        Some(ReasonCode::ScaExpired)
    );
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
    assert_eq!(t.payment.state, PaymentState::Expired);
    assert_eq!(
        t.payment.reason.as_ref().map(|r| r.code),
        Some(ReasonCode::ScaExpired)
    );

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
    let mut run = unknown_outcome();
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
    let mut run = initiating();
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
    let mut run = initiating();
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
    // An initiation call in flight has an unknown outcome.
    let mut run = initiating();
    let t = run.step(Input::Restored);
    assert_eq!(t.payment.state, PaymentState::OutcomeUnknown { attempt: 1 });
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

    // A cancellation call may have been in flight: the bank's status tells.
    let mut run = cancelling();
    assert_eq!(run.payment().next_check_at, None);
    let t = run.step(Input::Restored);
    assert_eq!(t.payment.state, PaymentState::Cancelling);
    assert_eq!(t.effects, vec![Effect::CheckStatus]);
    assert!(t.events.is_empty());
    assert_eq!(t.payment.resume_after_cancel, Some(PaymentState::Signed));
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
        run.apply(sca_code(id)),
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
    Cancel {
        cmd: u8,
        stranger: bool,
        bank_token: bool,
    },
    Refresh {
        cmd: u8,
        stranger: bool,
    },
    Begin,
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
            },
            Op::InitiateInvalid { cmd, stranger } => Input::InitiateInvalid {
                command_id: id(cmd),
                psu_id: who(stranger),
                reason: Reason::new(ReasonCode::InvalidAmount, "negative"),
            },
            Op::ScaCode { cmd, stranger } => Input::CompleteSca {
                command_id: id(cmd),
                psu_id: who(stranger),
                outcome: ScaOutcome::Code(SecretString::from("code")),
            },
            Op::ScaError { cmd, stranger } => Input::CompleteSca {
                command_id: id(cmd),
                psu_id: who(stranger),
                outcome: ScaOutcome::Error {
                    error: "access_denied".into(),
                    description: None,
                },
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
            Op::Begin => begin(),
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
        2 => (cmd(), stranger(), prop::bool::weighted(0.7)).prop_map(
            |(cmd, stranger, bank_token)| Op::Cancel { cmd, stranger, bank_token }
        ),
        3 => (cmd(), stranger()).prop_map(|(cmd, stranger)| Op::Refresh { cmd, stranger }),
        6 => Just(Op::Begin),
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
    let policy = prop_policy();
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
                is_polling(resume) && resume != StateKind::Cancelling,
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
}
