//! The owner's consents (AIS, CAF) and the funds check before an initiation
//! (docs/architecture.md, "Consents, funds checks and settlement evidence").
//!
//! A consent entity (`consent/{brand}/{scope}/{psu}`) is scheduled like a payment: one input
//! at a time, the rest queued, its record written (and confirmed by the fence) before its
//! events leave, its command's offset is committed, or its bank call goes out. Its token pair
//! lives in its record, so the entity is also the pair's lane: a refresh is one of its inputs.
//!
//! The funds check is advice: only a definite "not available" changes the payment's fate
//! (REJECTED `INSUFFICIENT_FUNDS`, before any initiation); no consent, an error, a timeout or
//! an open circuit lets the initiation go on unchecked, counted by outcome.

use std::collections::VecDeque;

use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use secrecy::SecretString;
use tracing::{info, warn};

use super::*;
use crate::domain::consent::{
    self, ConsentEffect, ConsentEvent, ConsentInput, ConsentRefusal, ConsentTransition,
};
use crate::domain::machine::Transition;
use crate::domain::model::{Amount, ConsentId, Order};
use crate::domain::settlement::{SettlementEvidence, SettlementOutcome};
use crate::kafka::state::consent::{ConsentKey, ConsentRecord};

/// A consent entity in memory.
#[derive(Debug)]
pub(super) struct ConsentEntry {
    pub(super) record: ConsentRecord,
    busy: bool,
    queue: VecDeque<ConsentWork>,
}

/// What waits for a busy consent.
#[derive(Debug)]
enum ConsentWork {
    Input {
        input: Box<ConsentInput>,
        source: Option<Box<OwnedMessage>>,
        /// The consent a redirect named (by its id), when it was routed here.
        named: Option<ConsentId>,
    },
    Hold(Held),
}

/// A payment's step held for a read under a consent's pair (the payment is busy meanwhile).
#[derive(Debug)]
pub(super) enum Held {
    Funds(Box<FundsHold>),
    Evidence(Box<EvidenceHold>),
}

/// A transition to `SETTLED` held until the debtor's history is read: its event carries what
/// the history shows.
#[derive(Debug)]
pub(super) struct EvidenceHold {
    payment_id: PaymentId,
    transition: Transition,
    source: Option<i64>,
    volatile: bool,
    iban: String,
    expected: ExpectedBooking,
    /// The unattended read is counted in the consent's record (durable before the call).
    reserved: bool,
}

/// What the settled payment should have booked (`domain::settlement::Expected`, owned).
#[derive(Debug, Clone)]
pub struct ExpectedBooking {
    pub amount: Amount,
    pub currency: String,
    pub creditor_account: String,
    pub end_to_end_id: String,
    pub remittance: Option<String>,
    /// Bookings before this day are not read.
    pub date_from: Option<chrono::NaiveDate>,
}

/// Unattended AIS reads the bank allows per account in 24 hours [C Yolt]; the worker uses
/// them for settlement evidence only (docs/architecture.md, "Consents").
pub const UNATTENDED_READS_PER_DAY: usize = 4;
const DAY_MS: Millis = 24 * 3_600_000;

/// An initiation held for its funds check: the payment is busy meanwhile.
#[derive(Debug)]
pub(super) struct FundsHold {
    payment_id: PaymentId,
    input: Input,
    source: Box<OwnedMessage>,
    iban: String,
    amount: Amount,
    currency: String,
}

/// A consent's bank call in flight.
#[derive(Debug)]
pub(super) enum ConsentPurpose {
    Uri,
    /// The code exchange; the pair answered is stored with the consent's next state.
    Exchange,
    /// A refresh of the pair, for this held step.
    Refresh(Held),
    Funds(Box<FundsHold>),
    Evidence(Box<EvidenceHold>),
}

/// A bank call for a consent, as the shell makes it.
#[derive(Debug)]
pub enum ConsentCall {
    /// `GET /consent-uris`: the URI for the consent's language, with the OAuth `state` added.
    Uri {
        request: consent::ConsentRequest,
        verifier: SecretString,
        sca_state: String,
    },
    Exchange {
        brand: Brand,
        code: SecretString,
        verifier: SecretString,
        redirect_uri: String,
    },
    Refresh {
        brand: Brand,
        refresh_token: SecretString,
    },
    Funds {
        brand: Brand,
        access_token: SecretString,
        iban: String,
        amount: Amount,
        currency: String,
    },
    /// The debtor account's newest bookings (`psu_involved=false`), matched against the
    /// settled payment.
    Evidence {
        brand: Brand,
        access_token: SecretString,
        iban: String,
        expected: ExpectedBooking,
    },
}

/// What a consent call gave.
#[derive(Debug)]
pub enum ConsentAnswer {
    Uri(Result<String, CallFailure>),
    Tokens(Result<TokenPair, CallFailure>),
    Refreshed(Result<TokenPair, RefreshFailure>),
    Funds(Result<bool, CallFailure>),
    Evidence(Result<SettlementEvidence, CallFailure>),
}

/// A failed call: `definite` when the bank answered with a refusal (nothing to retry).
#[derive(Debug, Clone)]
pub struct CallFailure {
    pub definite: bool,
    pub message: String,
}

/// A scope's pair as the bank issued it; a refresh answer without a refresh token keeps the
/// old one usable.
fn scope_pair(
    key: &ConsentKey,
    pair: TokenPair,
    old_refresh: Option<SecretString>,
    now: Millis,
) -> PsuTokens {
    PsuTokens {
        psu_id: key.psu_id.clone(),
        brand: key.brand,
        access_token: pair.access_token,
        refresh_token: pair.refresh_token.or(old_refresh),
        expires_at: pair
            .expires_in
            .map(|d| now + i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)),
        updated_at: now,
    }
}

/// The outcome label of `pis_funds_checks_total`.
fn count_evidence(outcome: &'static str) {
    crate::metrics::metrics()
        .settlement_checks
        .with_label_values(&[outcome])
        .inc();
}

/// The `type` label of a consent command in `pis_commands_consumed_total`; `None` for the
/// engine's own inputs.
fn consent_command_type(input: &ConsentInput) -> Option<&'static str> {
    match input {
        ConsentInput::Request { .. } => Some("request_consent"),
        ConsentInput::Complete { .. } => Some("complete_consent"),
        ConsentInput::UriReceived { .. }
        | ConsentInput::UriFailed { .. }
        | ConsentInput::TokensStored { .. }
        | ConsentInput::ExchangeFailed { .. }
        | ConsentInput::Revoked { .. }
        | ConsentInput::Tick
        | ConsentInput::Restored => None,
    }
}

fn count_consumed(command_type: &'static str, outcome: &'static str) {
    crate::metrics::metrics()
        .commands_consumed
        .with_label_values(&[command_type, outcome])
        .inc();
}

fn count_funds(outcome: &'static str) {
    crate::metrics::metrics()
        .funds_checks
        .with_label_values(&[outcome])
        .inc();
}

impl OwnerCore {
    pub fn consent(&self, key: &ConsentKey) -> Option<&ConsentRecord> {
        self.consents.get(key).map(|e| &e.record)
    }

    /// The restored consents; `OwnerCore::start` then gives each live one a `Restored` input,
    /// so that a bank call its predecessor had out is recovered (domain::consent).
    pub(super) fn restore_consents(&mut self, restored: HashMap<ConsentKey, ConsentRecord>) {
        for (key, record) in restored {
            if let Some(at) = consent::next_wake(&record.consent) {
                self.consent_timers.insert((at, key.clone()));
            }
            self.consents.insert(
                key,
                ConsentEntry {
                    record,
                    busy: false,
                    queue: VecDeque::new(),
                },
            );
        }
    }

    /// A consent command: the owner draws a request's secrets, and finds a redirect's consent
    /// among the PSU's by its id.
    pub(super) fn consent_command(
        &mut self,
        target: ingest::ConsentTarget,
        input: ConsentInput,
        source: Box<OwnedMessage>,
        now: Millis,
    ) {
        let input = match input {
            ConsentInput::Request {
                command_id,
                consent_id,
                psu_id,
                request,
                ..
            } => ConsentInput::Request {
                command_id,
                consent_id,
                psu_id,
                request,
                pkce_verifier: self.random.pkce_verifier(),
                sca_state: self.random.sca_state(),
            },
            other => other,
        };
        let key = match target {
            ingest::ConsentTarget::Key(key) => key,
            ingest::ConsentTarget::Id { psu_id, consent_id } => {
                let found = Brand::ALL.into_iter().flat_map(|brand| {
                    crate::domain::consent::ConsentScope::ALL.map(|scope| ConsentKey {
                        brand,
                        scope,
                        psu_id: psu_id.clone(),
                    })
                });
                let mut found = found.filter(|k| {
                    self.consents
                        .get(k)
                        .is_some_and(|e| e.record.consent.consent_id == consent_id)
                });
                match found.next() {
                    Some(key) => {
                        self.consent_input_named(key, input, Some(source), Some(consent_id), now);
                    }
                    None => self.unknown_consent(source, &consent_id),
                }
                return;
            }
        };
        self.consent_input(key, input, Some(source), now);
    }

    /// A redirect for a consent this PSU does not have (never requested, or superseded).
    fn unknown_consent(&mut self, source: Box<OwnedMessage>, consent_id: &ConsentId) {
        warn!(partition = self.config.partition, %consent_id, "redirect for an unknown consent dead-lettered");
        ingest::count_dead_letter("complete_consent", "UNKNOWN_CONSENT");
        self.defer(Verdict::DeadLetter {
            record: source,
            class: "UNKNOWN_CONSENT",
            message: format!(
                "no consent {consent_id} of this PSU is waiting (never requested, or superseded)"
            ),
            payment_id: Some(consent_id.to_string()),
        });
    }

    /// A consent command (or engine input) for `key`.
    pub(super) fn consent_input(
        &mut self,
        key: ConsentKey,
        input: ConsentInput,
        source: Option<Box<OwnedMessage>>,
        now: Millis,
    ) {
        self.consent_input_named(key, input, source, None, now);
    }

    /// [`Self::consent_input`] of a redirect that named the consent `named` by its id.
    fn consent_input_named(
        &mut self,
        key: ConsentKey,
        input: ConsentInput,
        source: Option<Box<OwnedMessage>>,
        named: Option<ConsentId>,
        now: Millis,
    ) {
        if let Some(entry) = self.consents.get_mut(&key) {
            if entry.busy {
                entry.queue.push_back(ConsentWork::Input {
                    input: Box::new(input),
                    source,
                    named,
                });
                return;
            }
            entry.busy = true;
        }
        self.step_consent(key, input, source, named, None, now);
    }

    /// Applies an input to a consent marked busy (or new). `source`: the command record, whose
    /// fate is counted (`pis_commands_consumed_total`, `pis_dlq_records_total`); `named`: the
    /// consent a redirect named; `tokens`: a pair to store with it.
    fn step_consent(
        &mut self,
        key: ConsentKey,
        input: ConsentInput,
        source: Option<Box<OwnedMessage>>,
        named: Option<ConsentId>,
        tokens: Option<PsuTokens>,
        now: Millis,
    ) {
        let command_type = source.as_ref().and_then(|_| consent_command_type(&input));
        let current_id = self
            .consents
            .get(&key)
            .map(|e| e.record.consent.consent_id.clone());
        // A redirect that waited in the queue while a newer request superseded its consent.
        if let Some(named) = &named
            && current_id.as_ref() != Some(named)
        {
            if let Some(record) = source {
                self.unknown_consent(record, named);
            }
            self.consent_idle(&key, now);
            return;
        }
        // The consent a dead-lettered command was for, for the DLQ record's header.
        let dlq_consent = match &input {
            ConsentInput::Request { consent_id, .. } => Some(consent_id.to_string()),
            ConsentInput::Complete { .. }
            | ConsentInput::UriReceived { .. }
            | ConsentInput::UriFailed { .. }
            | ConsentInput::TokensStored { .. }
            | ConsentInput::ExchangeFailed { .. }
            | ConsentInput::Revoked { .. }
            | ConsentInput::Tick
            | ConsentInput::Restored => named
                .as_ref()
                .or(current_id.as_ref())
                .map(ToString::to_string),
        };
        let current = self.consents.get(&key).map(|e| &e.record.consent);
        // A consent's SCA gets the time a payment's does.
        let policy = consent::ConsentPolicy {
            sca_timeout_ms: self.config.policy.sca_timeout_ms,
            ..consent::ConsentPolicy::default()
        };
        match consent::step(current, input, &policy, now) {
            Ok(transition) => {
                let ConsentTransition {
                    consent,
                    events,
                    effect,
                    code,
                    superseded,
                } = transition;
                let old_tokens = self
                    .consents
                    .get(&key)
                    .and_then(|e| e.record.tokens.clone());
                // The bank counts unattended reads per account, whatever the consent.
                let reads = self
                    .consents
                    .get(&key)
                    .map(|e| e.record.unattended_reads.clone())
                    .unwrap_or_default();
                if let Some(old) = superseded {
                    // The old consent's end is written (and published) first; its pair goes with
                    // it, since the new consent is granted with a pair of its own.
                    let record = ConsentRecord {
                        consent: old.consent,
                        tokens: None,
                        unattended_reads: reads.clone(),
                    };
                    self.write_consent(key.clone(), record, old.events, None, None, None, false);
                }
                let same = self
                    .consents
                    .get(&key)
                    .is_some_and(|e| e.record.consent.consent_id == consent.consent_id);
                let tokens = match tokens {
                    Some(t) => Some(t),
                    None if same && !consent.state.is_final() => old_tokens,
                    None => None,
                };
                let record = ConsentRecord {
                    consent,
                    tokens,
                    unattended_reads: reads,
                };
                if let Some(command_type) = command_type {
                    count_consumed(command_type, "accepted");
                }
                self.write_consent(
                    key,
                    record,
                    events,
                    source.map(|s| s.offset()),
                    effect,
                    code,
                    true,
                );
            }
            Err(ConsentRefusal::Duplicate) => {
                if let Some(command_type) = command_type {
                    count_consumed(command_type, "duplicate");
                }
                self.consent_unchanged(&key, source, now);
            }
            Err(ConsentRefusal::Ignored) => {
                if let Some(command_type) = command_type {
                    count_consumed(command_type, "accepted");
                }
                self.consent_unchanged(&key, source, now);
            }
            Err(ConsentRefusal::DeadLetter { class, message }) => {
                warn!(partition = self.config.partition, consent = %key, class, %message, "consent command dead-lettered");
                if let Some(command_type) = command_type {
                    ingest::count_dead_letter(command_type, class);
                }
                if let Some(record) = source {
                    self.defer(Verdict::DeadLetter {
                        record,
                        class,
                        message,
                        payment_id: dlq_consent,
                    });
                }
                self.consent_idle(&key, now);
            }
        }
    }

    /// An input that changed nothing: its command (if any) is done.
    fn consent_unchanged(
        &mut self,
        key: &ConsentKey,
        source: Option<Box<OwnedMessage>>,
        now: Millis,
    ) {
        if let Some(record) = source {
            self.defer(Verdict::Done(record.offset()));
        }
        self.consent_idle(key, now);
    }

    #[allow(clippy::too_many_arguments)]
    fn write_consent(
        &mut self,
        key: ConsentKey,
        record: ConsentRecord,
        events: Vec<ConsentEvent>,
        source: Option<i64>,
        effect: Option<ConsentEffect>,
        code: Option<SecretString>,
        carry_on: bool,
    ) {
        let previous = self.consents.get(&key).map(|e| e.record.consent.state);
        if previous != Some(record.consent.state) {
            crate::metrics::metrics()
                .consent_transitions
                .with_label_values(&[
                    record.consent.request.scope.symbol(),
                    record.consent.state.symbol(),
                ])
                .inc();
            info!(
                partition = self.config.partition,
                consent = %key,
                consent_id = %record.consent.consent_id,
                to = record.consent.state.symbol(),
                "consent transition"
            );
        }
        if let Some(at) = self
            .consents
            .get(&key)
            .and_then(|e| consent::next_wake(&e.record.consent))
        {
            self.consent_timers.remove(&(at, key.clone()));
        }
        self.write(
            StateWrite::Consent {
                record: Box::new(record.clone()),
                events: events.clone(),
            },
            ACTED_ON,
            AfterWrite::Consent {
                key: key.clone(),
                source,
                events,
                effect,
                code,
                carry_on,
            },
        );
        let entry = self.consents.entry(key).or_insert_with(|| ConsentEntry {
            record: record.clone(),
            busy: true,
            queue: VecDeque::new(),
        });
        entry.record = record;
        entry.busy = true;
    }

    /// The consent's write is confirmed: its events leave, its command is done, its call goes
    /// (unless `carry_on` is false: a superseded consent's end, with a newer write behind it).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn consent_written(
        &mut self,
        key: ConsentKey,
        offset: i64,
        source: Option<i64>,
        events: Vec<ConsentEvent>,
        effect: Option<ConsentEffect>,
        code: Option<SecretString>,
        carry_on: bool,
        now: Millis,
    ) {
        self.healed(&key.record_key(), offset);
        if !events.is_empty() {
            self.publishing.insert(offset);
            self.out.push(Action::PublishConsent {
                state_offset: offset,
                events,
            });
        }
        if let Some(command_offset) = source {
            self.offsets.done(command_offset);
        }
        if !carry_on {
            return;
        }
        let Some(entry) = self.consents.get(&key) else {
            return;
        };
        // Only the entity's latest write carries on (a superseded consent's end has no effect).
        let consent = entry.record.consent.clone();
        match effect {
            Some(ConsentEffect::FetchUri) => match consent.pkce_verifier.clone() {
                Some(verifier) if self.phase == Phase::Running => self.consent_call(
                    key,
                    ConsentCall::Uri {
                        request: consent.request.clone(),
                        verifier,
                        sca_state: consent.sca_state.clone(),
                    },
                    ConsentPurpose::Uri,
                ),
                Some(_) | None => self.consent_idle(&key, now),
            },
            Some(ConsentEffect::Exchange) => match (consent.pkce_verifier.clone(), code) {
                (Some(verifier), Some(code)) => self.consent_call(
                    key,
                    ConsentCall::Exchange {
                        brand: consent.request.brand,
                        code,
                        verifier,
                        redirect_uri: consent.request.redirect_uri.clone(),
                    },
                    ConsentPurpose::Exchange,
                ),
                (Some(_) | None, Some(_) | None) => {
                    self.step_consent(
                        key,
                        ConsentInput::ExchangeFailed {
                            definite: true,
                            message: "internal: no code or verifier to exchange".into(),
                        },
                        None,
                        None,
                        None,
                        now,
                    );
                }
            },
            None => self.consent_idle(&key, now),
        }
    }

    fn consent_call(&mut self, key: ConsentKey, call: ConsentCall, purpose: ConsentPurpose) {
        let id = self.next_call;
        self.next_call += 1;
        self.out.push(Action::ConsentCall { id, call });
        self.consent_calls.insert(id, (key, purpose));
    }

    /// The consent is idle: its next queued work, or its timer.
    fn consent_idle(&mut self, key: &ConsentKey, now: Millis) {
        let Some(entry) = self.consents.get_mut(key) else {
            return;
        };
        entry.busy = false;
        if self.stale.contains_key(&key.record_key()) {
            self.rewrite_consent(key.clone());
            return;
        }
        if let Some(at) = consent::next_wake(&entry.record.consent) {
            self.consent_timers.insert((at, key.clone()));
        }
        let Some(work) = entry.queue.pop_front() else {
            return;
        };
        entry.busy = true;
        match work {
            ConsentWork::Input {
                input,
                source,
                named,
            } => {
                self.step_consent(key.clone(), *input, source, named, None, now);
            }
            ConsentWork::Hold(held) => self.held_with(key.clone(), held, now),
        }
    }

    /// Due consent timers.
    pub(super) fn consent_timers_due(&mut self, now: Millis) {
        while let Some((at, key)) = self.consent_timers.first().cloned() {
            if at > now {
                break;
            }
            self.consent_timers.remove(&(at, key.clone()));
            self.consent_input(key, ConsentInput::Tick, None, now);
        }
    }

    pub(super) fn on_consent_answer(
        &mut self,
        key: ConsentKey,
        purpose: ConsentPurpose,
        answer: BankAnswer,
        now: Millis,
    ) {
        let BankAnswer::Consent(answer) = answer else {
            warn!(consent = %key, "internal: a bank answer that does not fit a consent call");
            self.give_up_purpose(purpose, now);
            self.consent_idle(&key, now);
            return;
        };
        match (purpose, answer) {
            (ConsentPurpose::Uri, ConsentAnswer::Uri(Ok(consent_uri))) => {
                self.step_consent(
                    key,
                    ConsentInput::UriReceived { consent_uri },
                    None,
                    None,
                    None,
                    now,
                );
            }
            (ConsentPurpose::Uri, ConsentAnswer::Uri(Err(f))) => {
                let input = ConsentInput::UriFailed {
                    definite: f.definite,
                    message: f.message,
                };
                self.step_consent(key, input, None, None, None, now);
            }
            (ConsentPurpose::Exchange, ConsentAnswer::Tokens(Ok(pair))) => {
                let tokens = scope_pair(&key, pair, None, now);
                let input = ConsentInput::TokensStored { valid_until: None };
                self.step_consent(key, input, None, None, Some(tokens), now);
            }
            (ConsentPurpose::Exchange, ConsentAnswer::Tokens(Err(f))) => {
                let input = ConsentInput::ExchangeFailed {
                    definite: f.definite,
                    message: f.message,
                };
                self.step_consent(key, input, None, None, None, now);
            }
            (ConsentPurpose::Refresh(held), ConsentAnswer::Refreshed(Ok(pair))) => {
                let Some(entry) = self.consents.get(&key) else {
                    self.give_up(held, "error", now);
                    return;
                };
                let old_refresh = entry
                    .record
                    .tokens
                    .as_ref()
                    .and_then(|t| t.refresh_token.clone());
                let mut record = entry.record.clone();
                record.tokens = Some(scope_pair(&key, pair, old_refresh, now));
                // The new pair is durable before it is used: the bank killed the old one.
                self.write(
                    StateWrite::Consent {
                        record: Box::new(record.clone()),
                        events: Vec::new(),
                    },
                    TOKENS_USED,
                    AfterWrite::ConsentTokens {
                        key: key.clone(),
                        held,
                    },
                );
                if let Some(entry) = self.consents.get_mut(&key) {
                    entry.record = record;
                }
            }
            (ConsentPurpose::Refresh(held), ConsentAnswer::Refreshed(Err(failure))) => {
                self.give_up(held, "error", now);
                match failure {
                    RefreshFailure::Revoked { message } => {
                        self.step_consent(
                            key,
                            ConsentInput::Revoked { message },
                            None,
                            None,
                            None,
                            now,
                        );
                    }
                    RefreshFailure::Refused { message } | RefreshFailure::Transient { message } => {
                        warn!(consent = %key, %message, "the consent's pair could not be refreshed; the payment goes on unchecked");
                        self.consent_idle(&key, now);
                    }
                }
            }
            (ConsentPurpose::Funds(hold), ConsentAnswer::Funds(result)) => {
                let verdict = match result {
                    Ok(true) => {
                        count_funds("available");
                        None
                    }
                    Ok(false) => {
                        count_funds("insufficient");
                        Some(Reason::new(
                            ReasonCode::InsufficientFunds,
                            format!(
                                "the bank's funds confirmation says {} cannot cover {} {}",
                                hold.iban, hold.amount, hold.currency
                            ),
                        ))
                    }
                    Err(f) => {
                        count_funds("error");
                        warn!(consent = %key, message = %f.message, "funds check failed; the payment goes on unchecked");
                        None
                    }
                };
                self.release_hold(*hold, verdict, now);
                self.consent_idle(&key, now);
            }
            (ConsentPurpose::Evidence(hold), ConsentAnswer::Evidence(result)) => {
                let evidence = match result {
                    Ok(evidence) => Some(evidence),
                    Err(f) => {
                        warn!(consent = %key, message = %f.message, "reading the debtor's history failed; SETTLED goes out without evidence");
                        count_evidence("error");
                        None
                    }
                };
                self.finish_evidence(*hold, evidence, now);
                self.consent_idle(&key, now);
            }
            (purpose, answer) => {
                warn!(consent = %key, ?answer, "internal: a bank answer that does not fit its consent call");
                self.give_up_purpose(purpose, now);
                self.consent_idle(&key, now);
            }
        }
    }

    /// The refreshed pair (or a reserved read) is durable: the held step goes on.
    pub(super) fn consent_tokens_written(
        &mut self,
        key: ConsentKey,
        offset: i64,
        held: Held,
        now: Millis,
    ) {
        self.healed(&key.record_key(), offset);
        self.proceed(key, held, now);
    }

    /// A held step whose call cannot be made: the payment goes on without it.
    fn give_up(&mut self, held: Held, outcome: &'static str, now: Millis) {
        match held {
            Held::Funds(hold) => {
                count_funds(outcome);
                self.release_hold(*hold, None, now);
            }
            Held::Evidence(hold) => {
                count_evidence(outcome);
                self.finish_evidence(*hold, None, now);
            }
        }
    }

    fn give_up_purpose(&mut self, purpose: ConsentPurpose, now: Millis) {
        match purpose {
            ConsentPurpose::Refresh(held) => self.give_up(held, "error", now),
            ConsentPurpose::Funds(hold) => self.give_up(Held::Funds(hold), "error", now),
            ConsentPurpose::Evidence(hold) => self.give_up(Held::Evidence(hold), "error", now),
            ConsentPurpose::Uri | ConsentPurpose::Exchange => {}
        }
    }

    /// The consent is busy for this held step, its pair fresh: make the step's call.
    fn proceed(&mut self, key: ConsentKey, held: Held, now: Millis) {
        match held {
            Held::Funds(hold) => self.funds_call(key, hold, now),
            Held::Evidence(mut hold) if !hold.reserved => {
                // The read is counted before it is made: a crash after the call must not
                // give the account's budget back.
                let Some(entry) = self.consents.get_mut(&key) else {
                    self.give_up(Held::Evidence(hold), "error", now);
                    return;
                };
                entry
                    .record
                    .unattended_reads
                    .retain(|(_, at)| now - *at < DAY_MS);
                // Checked again: the plan counted the reads when the payment settled, and reads
                // of settlements queued before this one may have used the budget since.
                let used = entry
                    .record
                    .unattended_reads
                    .iter()
                    .filter(|(account, _)| *account == hold.iban)
                    .count();
                if used >= UNATTENDED_READS_PER_DAY {
                    self.give_up(Held::Evidence(hold), "budget_exhausted", now);
                    self.consent_idle(&key, now);
                    return;
                }
                entry.record.unattended_reads.push((hold.iban.clone(), now));
                let record = entry.record.clone();
                hold.reserved = true;
                self.write(
                    StateWrite::Consent {
                        record: Box::new(record),
                        events: Vec::new(),
                    },
                    TOKENS_USED,
                    AfterWrite::ConsentTokens {
                        key,
                        held: Held::Evidence(hold),
                    },
                );
            }
            Held::Evidence(hold) => {
                let access = self
                    .consents
                    .get(&key)
                    .and_then(|e| e.record.tokens.as_ref().map(|t| t.access_token.clone()));
                let Some(access_token) = access else {
                    self.give_up(Held::Evidence(hold), "no_consent", now);
                    self.consent_idle(&key, now);
                    return;
                };
                let call = ConsentCall::Evidence {
                    brand: key.brand,
                    access_token,
                    iban: hold.iban.clone(),
                    expected: hold.expected.clone(),
                };
                self.consent_call(key, call, ConsentPurpose::Evidence(hold));
            }
        }
    }

    /// What the history showed goes on the `SETTLED` event; then the transition is written.
    fn finish_evidence(
        &mut self,
        hold: EvidenceHold,
        evidence: Option<SettlementEvidence>,
        now: Millis,
    ) {
        let EvidenceHold {
            payment_id,
            mut transition,
            source,
            volatile,
            ..
        } = hold;
        if let Some(evidence) = evidence {
            count_evidence(match evidence.outcome {
                SettlementOutcome::Booked => "booked",
                SettlementOutcome::NotBooked => "not_booked",
                SettlementOutcome::Ambiguous => "ambiguous",
                SettlementOutcome::Duplicated => "duplicated",
            });
            if evidence.outcome == SettlementOutcome::Duplicated {
                warn!(
                    partition = self.config.partition,
                    %payment_id,
                    bookings = ?evidence.transaction_refs,
                    "the debtor's history shows this payment booked more than once: money moved twice (docs/runbooks.md, PisDuplicateBooking)"
                );
            }
            if let Some(event) = transition
                .events
                .iter_mut()
                .find(|e| e.state == StateKind::Settled)
            {
                event.settlement = Some(evidence);
            }
        }
        self.commit(payment_id, transition, source, volatile, now);
    }

    /// Whether a transition to `SETTLED` waits for the debtor's history: the PSU holds an AIS
    /// consent with a pair, the payment names its debtor account, and the account has
    /// unattended reads left today.
    pub(super) fn evidence_plan(
        &mut self,
        transition: &Transition,
        now: Millis,
    ) -> Option<(ConsentKey, String, ExpectedBooking)> {
        if !transition
            .events
            .iter()
            .any(|e| e.state == StateKind::Settled)
        {
            return None;
        }
        let Some(Order::Single(order)) = transition.payment.order.as_ref() else {
            return None;
        };
        let key = ConsentKey {
            brand: order.brand,
            scope: crate::domain::consent::ConsentScope::Ais,
            psu_id: transition.payment.psu_id.clone(),
        };
        // No granted AIS consent with a pair, whether the PSU never asked for one or it ended:
        // counted alike (docs/metrics.md).
        let Some(entry) = self
            .consents
            .get(&key)
            .filter(|e| consent::usable(&e.record.consent, now) && e.record.tokens.is_some())
        else {
            count_evidence("no_consent");
            return None;
        };
        let Some(iban) = order.debtor_iban.clone() else {
            count_evidence("no_debtor");
            return None;
        };
        let used = entry
            .record
            .unattended_reads
            .iter()
            .filter(|(account, at)| *account == iban && now - *at < DAY_MS)
            .count();
        if used >= UNATTENDED_READS_PER_DAY {
            count_evidence("budget_exhausted");
            return None;
        }
        let created = chrono::DateTime::from_timestamp_millis(transition.payment.received_at)
            .map(|t| t.date_naive() - chrono::Duration::days(1));
        let expected = ExpectedBooking {
            amount: order.amount,
            currency: order.currency.clone(),
            creditor_account: order.creditor_iban.clone(),
            end_to_end_id: order.end_to_end_id.clone(),
            remittance: order.remittance_information.clone(),
            date_from: created,
        };
        Some((key, iban, expected))
    }

    pub(super) fn hold_for_evidence(
        &mut self,
        (key, iban, expected): (ConsentKey, String, ExpectedBooking),
        payment_id: PaymentId,
        transition: Transition,
        source: Option<Box<OwnedMessage>>,
        volatile: bool,
        now: Millis,
    ) {
        let hold = Box::new(EvidenceHold {
            payment_id,
            transition,
            source: source.map(|s| s.offset()),
            volatile,
            iban,
            expected,
            reserved: false,
        });
        match self.consents.get_mut(&key) {
            Some(entry) if entry.busy => entry
                .queue
                .push_back(ConsentWork::Hold(Held::Evidence(hold))),
            Some(entry) => {
                entry.busy = true;
                self.held_with(key, Held::Evidence(hold), now);
            }
            None => self.give_up(Held::Evidence(hold), "no_consent", now),
        }
    }

    /// Whether an initiation is held for a funds check: `false` lets it go on now.
    pub(super) fn hold_for_funds(
        &mut self,
        payment_id: &PaymentId,
        input: &Input,
        now: Millis,
    ) -> Option<ConsentKey> {
        let Input::Initiate { psu_id, order, .. } = input else {
            return None;
        };
        if self.payments.contains_key(payment_id) || self.retired.contains_key(payment_id) {
            return None;
        }
        let Order::Single(single) = order else {
            count_funds("not_single");
            return None;
        };
        let Some(iban) = single.debtor_iban.clone() else {
            count_funds("no_debtor");
            return None;
        };
        let key = ConsentKey {
            brand: single.brand,
            scope: crate::domain::consent::ConsentScope::Caf,
            psu_id: psu_id.clone(),
        };
        let usable = self.consents.get(&key).is_some_and(|e| {
            consent::usable(&e.record.consent, now)
                && e.record.tokens.is_some()
                && e.record.consent.request.account_iban.as_deref() == Some(iban.as_str())
        });
        if !usable {
            count_funds("no_consent");
            return None;
        }
        Some(key)
    }

    /// Holds the (busy) payment's initiation until the bank's funds confirmation answers.
    pub(super) fn start_funds_check(
        &mut self,
        key: ConsentKey,
        payment_id: PaymentId,
        input: Input,
        source: Box<OwnedMessage>,
        now: Millis,
    ) {
        let (amount, currency, iban) = match &input {
            Input::Initiate {
                order: Order::Single(single),
                ..
            } => (
                single.amount,
                single.currency.clone(),
                single.debtor_iban.clone().unwrap_or_default(),
            ),
            _ => {
                self.apply(payment_id, input, Some(source), now);
                return;
            }
        };
        let hold = Box::new(FundsHold {
            payment_id,
            input,
            source,
            iban,
            amount,
            currency,
        });
        match self.consents.get_mut(&key) {
            Some(entry) if entry.busy => {
                entry.queue.push_back(ConsentWork::Hold(Held::Funds(hold)))
            }
            Some(entry) => {
                entry.busy = true;
                self.held_with(key, Held::Funds(hold), now);
            }
            None => self.release_hold(*hold, None, now),
        }
    }

    /// The consent is busy for this held step: refresh its pair first if it is about to
    /// expire.
    fn held_with(&mut self, key: ConsentKey, held: Held, now: Millis) {
        let tokens = self.consents.get(&key).and_then(|e| {
            consent::usable(&e.record.consent, now)
                .then(|| e.record.tokens.clone())
                .flatten()
        });
        let Some(tokens) = tokens else {
            self.give_up(held, "no_consent", now);
            self.consent_idle(&key, now);
            return;
        };
        let fresh = tokens
            .expires_at
            .is_none_or(|at| at - TOKEN_MARGIN_MS > now);
        match (fresh, tokens.refresh_token) {
            (true, _) => self.proceed(key, held, now),
            (false, Some(refresh_token)) => self.consent_call(
                key.clone(),
                ConsentCall::Refresh {
                    brand: key.brand,
                    refresh_token,
                },
                ConsentPurpose::Refresh(held),
            ),
            (false, None) => {
                self.give_up(held, "no_consent", now);
                self.consent_idle(&key, now);
            }
        }
    }

    fn funds_call(&mut self, key: ConsentKey, hold: Box<FundsHold>, now: Millis) {
        let access = self
            .consents
            .get(&key)
            .and_then(|e| e.record.tokens.as_ref().map(|t| t.access_token.clone()));
        let Some(access_token) = access else {
            count_funds("no_consent");
            self.release_hold(*hold, None, now);
            self.consent_idle(&key, now);
            return;
        };
        let call = ConsentCall::Funds {
            brand: key.brand,
            access_token,
            iban: hold.iban.clone(),
            amount: hold.amount,
            currency: hold.currency.clone(),
        };
        self.consent_call(key, call, ConsentPurpose::Funds(hold));
    }

    /// The held initiation goes on: as it came, or refused for `insufficient` funds.
    fn release_hold(&mut self, hold: FundsHold, insufficient: Option<Reason>, now: Millis) {
        let FundsHold {
            payment_id,
            input,
            source,
            ..
        } = hold;
        let input = match (insufficient, input) {
            (
                Some(reason),
                Input::Initiate {
                    command_id, psu_id, ..
                },
            ) => Input::InitiateInvalid {
                command_id,
                psu_id,
                reason,
            },
            (_, input) => input,
        };
        self.apply(payment_id, input, Some(source), now);
    }

    /// Consents with no state worth keeping in a snapshot are still copied: a consent is
    /// small and one per PSU, brand and scope.
    pub(super) fn consent_snapshot_items(&self) -> Vec<SnapshotItem> {
        let mut keys: Vec<&ConsentKey> = self.consents.keys().collect();
        keys.sort();
        keys.into_iter()
            .map(|k| SnapshotItem::Consent(k.clone()))
            .collect()
    }

    pub(super) fn consent_snapshot_copy(&self, key: &ConsentKey) -> Result<Option<StateWrite>, ()> {
        match self.consents.get(key) {
            Some(entry) if entry.busy => Err(()),
            Some(entry) => Ok(Some(StateWrite::Consent {
                record: Box::new(entry.record.clone()),
                events: Vec::new(),
            })),
            None => Ok(None),
        }
    }

    /// A consent record a superseded owner wrote: re-written as this owner knows it.
    /// Re-writes the consent as it is, under this owner's epoch (it is busy until durable).
    fn rewrite_consent(&mut self, key: ConsentKey) {
        let Some(entry) = self.consents.get_mut(&key) else {
            return;
        };
        entry.busy = true;
        let record = entry.record.clone();
        self.write(
            StateWrite::Consent {
                record: Box::new(record),
                events: Vec::new(),
            },
            HEAL,
            AfterWrite::Consent {
                key,
                source: None,
                events: Vec::new(),
                effect: None,
                code: None,
                carry_on: true,
            },
        );
    }

    pub(super) fn heal_consent(&mut self, key: ConsentKey, record_key: String) {
        match self.consents.get_mut(&key) {
            // Healed by its next write, or when it goes idle.
            Some(entry) if entry.busy => {}
            Some(_) => {
                warn!(partition = self.config.partition, consent = %key, "re-writing a consent a superseded owner wrote");
                self.rewrite_consent(key);
            }
            None => {
                self.write(
                    StateWrite::DeleteKey(record_key.clone()),
                    HEAL,
                    AfterWrite::Heal { key: record_key },
                );
            }
        }
    }
}
