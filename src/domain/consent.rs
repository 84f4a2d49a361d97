//! A PSU's consent for account information (AIS) or funds confirmation (CAF): the pure state
//! machine the partition owner drives, apart from the payment machine because a consent
//! outlives payments and serves many (docs/architecture.md, "Consents").
//!
//! One consent entity per (brand, PSU, scope): the bank keeps one token pair per PSU, brand and
//! scope, so a new request for the same scope supersedes the one before it.
//!
//! ```text
//! Requested ──uris──▶ Pending ──code, tokens stored──▶ Granted ──refresh dies / deadline──▶ Expired
//!     │                 │ └──error / refused exchange──▶ Refused
//!     │                 └──SCA deadline──▶ Expired
//!     └──bank refuses the consent-uris call──▶ Refused
//! ```

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::machine::Millis;
use super::model::{Brand, CommandId, ConsentId, Language, PsuId};
use super::reason::{Reason, ReasonCode};

/// What a consent lets the worker do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ConsentScope {
    /// Account information: balances and transaction history (settlement evidence).
    Ais,
    /// Confirmation of the availability of funds on one account.
    Caf,
}

impl ConsentScope {
    pub const ALL: [ConsentScope; 2] = [ConsentScope::Ais, ConsentScope::Caf];

    /// The wire symbol (Avro enum, `scope` query parameter).
    pub fn symbol(self) -> &'static str {
        match self {
            ConsentScope::Ais => "AIS",
            ConsentScope::Caf => "CAF",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "AIS" => Some(ConsentScope::Ais),
            "CAF" => Some(ConsentScope::Caf),
            _ => None,
        }
    }
}

/// Where a consent is in its life. `Refused` and `Expired` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConsentState {
    /// Accepted; the consent URI is being asked for. No event: `Pending` follows.
    Requested,
    /// The PSU must open the consent URI and agree at the bank.
    Pending,
    /// The bank granted it: the worker holds the scope's token pair.
    Granted,
    Refused,
    Expired,
}

impl ConsentState {
    pub const ALL: [ConsentState; 5] = [
        ConsentState::Requested,
        ConsentState::Pending,
        ConsentState::Granted,
        ConsentState::Refused,
        ConsentState::Expired,
    ];

    pub fn symbol(self) -> &'static str {
        match self {
            ConsentState::Requested => "REQUESTED",
            ConsentState::Pending => "PENDING",
            ConsentState::Granted => "GRANTED",
            ConsentState::Refused => "REFUSED",
            ConsentState::Expired => "EXPIRED",
        }
    }

    pub fn is_final(self) -> bool {
        match self {
            ConsentState::Refused | ConsentState::Expired => true,
            ConsentState::Requested | ConsentState::Pending | ConsentState::Granted => false,
        }
    }
}

/// A validated request for a consent (`RequestConsent`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentRequest {
    pub brand: Brand,
    pub scope: ConsentScope,
    /// CAF: the account whose funds are checked (required). AIS: none (the PSU picks at the bank).
    pub account_iban: Option<String>,
    pub language: Language,
    pub redirect_uri: String,
}

/// Policy of the consent machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsentPolicy {
    /// How long the PSU has to agree at the bank.
    pub sca_timeout_ms: Millis,
    /// Delay before asking again for the consent URI, or exchanging again, after no answer.
    pub retry_ms: Millis,
    /// Bank calls (consent URI, code exchange) tried before the consent is refused.
    pub max_attempts: u32,
    /// Command ids remembered for de-duplication.
    pub remembered_commands: usize,
}

impl Default for ConsentPolicy {
    fn default() -> Self {
        Self {
            sca_timeout_ms: 15 * 60 * 1000,
            retry_ms: 2_000,
            max_attempts: 5,
            remembered_commands: 16,
        }
    }
}

/// One consent, as held in memory and in its state record. The PKCE verifier is a secret,
/// kept only until the exchange.
#[derive(Debug, Clone)]
pub struct Consent {
    pub consent_id: ConsentId,
    pub psu_id: PsuId,
    pub request: ConsentRequest,
    pub state: ConsentState,
    /// Events emitted so far (the next event's sequence is this plus one).
    pub sequence: u64,
    pub consent_uri: Option<String>,
    /// The OAuth `state` put on the consent URI: the redirect must carry it back.
    pub sca_state: String,
    pub pkce_verifier: Option<SecretString>,
    /// When the PSU's time to agree ends (from `Pending`).
    pub sca_deadline: Option<Millis>,
    /// Granted: when the bank's grant ends (the refresh token's end), if the bank said.
    pub valid_until: Option<Millis>,
    /// Bank calls tried in the current step (consent URI or exchange).
    pub attempts: u32,
    /// A timer: retry the current step at this time.
    pub retry_at: Option<Millis>,
    /// The redirect's code is being exchanged (written before the call): a restart finds the
    /// code gone (never stored) and ends the consent instead of waiting for its deadline.
    pub exchanging: bool,
    pub reason: Option<Reason>,
    pub seen_commands: Vec<CommandId>,
    pub requested_at: Millis,
    pub updated_at: Millis,
}

/// A consent event, published on the consent status topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentEvent {
    pub consent_id: ConsentId,
    pub psu_id: PsuId,
    pub brand: Brand,
    pub scope: ConsentScope,
    pub account_iban: Option<String>,
    pub sequence: u64,
    pub state: ConsentState,
    pub consent_uri: Option<String>,
    pub valid_until: Option<Millis>,
    pub reason: Option<Reason>,
    pub causation_id: String,
    pub occurred_at: Millis,
}

impl ConsentEvent {
    /// Deterministic, so a re-published event carries the same id.
    pub fn event_id(&self) -> uuid::Uuid {
        uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!(
                "pis-worker/consent/v1/{}/{}/{}",
                self.psu_id, self.consent_id, self.sequence
            )
            .as_bytes(),
        )
    }
}

/// What the PSU's browser brought back from the consent screens.
#[derive(Debug, Clone)]
pub enum ConsentOutcome {
    Code(SecretString),
    Error {
        error: String,
        description: Option<String>,
    },
}

/// Everything that moves a consent.
#[derive(Debug, Clone)]
pub enum ConsentInput {
    /// `RequestConsent`. The engine passes a fresh verifier and OAuth state.
    Request {
        command_id: CommandId,
        consent_id: ConsentId,
        psu_id: PsuId,
        request: ConsentRequest,
        pkce_verifier: SecretString,
        sca_state: String,
    },
    /// `CompleteConsent`: the redirect.
    Complete {
        command_id: CommandId,
        outcome: ConsentOutcome,
        state: Option<String>,
    },
    /// The bank answered the consent-uris call with the URI for the consent's language.
    UriReceived { consent_uri: String },
    /// The consent-uris call failed: `definite` when the bank refused it.
    UriFailed { definite: bool, message: String },
    /// The scope's token pair is durable in the state topic.
    TokensStored { valid_until: Option<Millis> },
    /// The code exchange failed: `definite` when the bank refused the code.
    ExchangeFailed { definite: bool, message: String },
    /// The bank no longer honours the scope's pair (`invalid_grant` on refresh, 401 with a
    /// fresh token): the PSU must consent again.
    Revoked { message: String },
    /// Time passed.
    Tick,
    /// The consent was restored by a new owner: a bank call its predecessor had made (or was
    /// about to make) got no answer here.
    Restored,
}

/// A bank call the engine makes for the consent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsentEffect {
    /// `GET /consent-uris` with the verifier's challenge and the OAuth state.
    FetchUri,
    /// `POST /token` with this code and the consent's verifier; then store the pair.
    Exchange,
}

/// The result of one step.
#[derive(Debug, Clone)]
pub struct ConsentTransition {
    pub consent: Consent,
    pub events: Vec<ConsentEvent>,
    pub effect: Option<ConsentEffect>,
    /// The code to exchange (`Exchange` only): a secret, never stored.
    pub code: Option<SecretString>,
    /// A consent this request superseded, ended `Expired`: the engine writes it first.
    pub superseded: Option<Box<ConsentTransition>>,
}

/// Why an input changed nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsentRefusal {
    /// The command id was applied before (re-delivery): nothing to do.
    Duplicate,
    /// The input does not apply in this state (late answer, a timer that no longer matters).
    Ignored,
    /// A command that cannot be applied: dead-lettered with this class and message.
    DeadLetter {
        class: &'static str,
        message: String,
    },
}

pub type ConsentStep = Result<ConsentTransition, ConsentRefusal>;

/// Every class a [`ConsentRefusal::DeadLetter`] carries (docs/contract.md lists each).
pub const DEAD_LETTER_CLASSES: [&str; 4] = [
    "CONSENT_ID_REUSED",
    "UNKNOWN_CONSENT",
    "STATE_MISMATCH",
    "INVALID_TRANSITION",
];

/// Applies `input` to the scope's current consent (`None`: never requested).
pub fn step(
    current: Option<&Consent>,
    input: ConsentInput,
    policy: &ConsentPolicy,
    now: Millis,
) -> ConsentStep {
    match input {
        ConsentInput::Request {
            command_id,
            consent_id,
            psu_id,
            request,
            pkce_verifier,
            sca_state,
        } => {
            if let Some(c) = current {
                if c.seen_commands.contains(&command_id) {
                    return Err(ConsentRefusal::Duplicate);
                }
                if c.consent_id == consent_id {
                    // A consent id names one request: asking again takes a new id.
                    return Err(ConsentRefusal::DeadLetter {
                        class: "CONSENT_ID_REUSED",
                        message: format!(
                            "consent {consent_id} was already requested (it is {}): a new request needs a new consent id",
                            c.state.symbol()
                        ),
                    });
                }
            }
            let superseded = match current {
                Some(c) if !c.state.is_final() => Some(Box::new(end(
                    c.clone(),
                    ConsentState::Expired,
                    Reason::new(
                        ReasonCode::ConsentSuperseded,
                        format!("superseded by consent {consent_id}"),
                    ),
                    command_id.as_str(),
                    now,
                ))),
                Some(_) | None => None,
            };
            let mut consent = Consent {
                consent_id,
                psu_id,
                request,
                state: ConsentState::Requested,
                sequence: 0,
                consent_uri: None,
                sca_state,
                pkce_verifier: Some(pkce_verifier),
                sca_deadline: None,
                valid_until: None,
                attempts: 1,
                retry_at: None,
                exchanging: false,
                reason: None,
                // The entity remembers the commands of the consents it replaced: a command of
                // an older consent read again (a crash before its offset was committed) is a
                // duplicate, never a new request that would supersede this one.
                seen_commands: current.map(|c| c.seen_commands.clone()).unwrap_or_default(),
                requested_at: now,
                updated_at: now,
            };
            remember(&mut consent, command_id, policy);
            Ok(ConsentTransition {
                consent,
                events: vec![],
                effect: Some(ConsentEffect::FetchUri),
                code: None,
                superseded,
            })
        }
        ConsentInput::Complete {
            command_id,
            outcome,
            state,
        } => {
            let Some(c) = current else {
                return Err(ConsentRefusal::DeadLetter {
                    class: "UNKNOWN_CONSENT",
                    message: "no consent of this PSU, brand and scope was requested".into(),
                });
            };
            if c.seen_commands.contains(&command_id) {
                return Err(ConsentRefusal::Duplicate);
            }
            if state.as_deref() != Some(c.sca_state.as_str()) {
                return Err(ConsentRefusal::DeadLetter {
                    class: "STATE_MISMATCH",
                    message: "the redirect's state is not the one on the consent's URI".into(),
                });
            }
            match c.state {
                ConsentState::Pending => {}
                ConsentState::Requested
                | ConsentState::Granted
                | ConsentState::Refused
                | ConsentState::Expired => {
                    return Err(ConsentRefusal::DeadLetter {
                        class: "INVALID_TRANSITION",
                        message: format!(
                            "consent {} is {}: it waits for no redirect",
                            c.consent_id,
                            c.state.symbol()
                        ),
                    });
                }
            }
            let mut next = c.clone();
            remember(&mut next, command_id.clone(), policy);
            match outcome {
                ConsentOutcome::Code(code) => {
                    next.attempts = 1;
                    next.retry_at = None;
                    next.exchanging = true;
                    next.updated_at = now;
                    Ok(ConsentTransition {
                        consent: next,
                        events: vec![],
                        effect: Some(ConsentEffect::Exchange),
                        code: Some(code),
                        superseded: None,
                    })
                }
                ConsentOutcome::Error { error, description } => {
                    let message = match description {
                        Some(d) => format!("the PSU did not consent: {error}: {d}"),
                        None => format!("the PSU did not consent: {error}"),
                    };
                    Ok(end(
                        next,
                        ConsentState::Refused,
                        Reason::new(ReasonCode::ScaFailed, message),
                        command_id.as_str(),
                        now,
                    ))
                }
            }
        }
        ConsentInput::UriReceived { consent_uri } => {
            let c = live(current, ConsentState::Requested)?;
            let mut next = c.clone();
            next.state = ConsentState::Pending;
            next.consent_uri = Some(consent_uri);
            next.sca_deadline = Some(now.saturating_add(policy.sca_timeout_ms));
            next.attempts = 0;
            next.retry_at = None;
            next.updated_at = now;
            Ok(announce(next, "bank", now))
        }
        ConsentInput::UriFailed { definite, message } => {
            let c = live(current, ConsentState::Requested)?;
            failed_call(c, definite, message, "consent URI", policy, now)
        }
        ConsentInput::TokensStored { valid_until } => {
            let c = live(current, ConsentState::Pending)?;
            let mut next = c.clone();
            next.state = ConsentState::Granted;
            next.pkce_verifier = None;
            next.exchanging = false;
            next.valid_until = valid_until;
            next.sca_deadline = None;
            next.attempts = 0;
            next.retry_at = None;
            next.updated_at = now;
            Ok(announce(next, "bank", now))
        }
        ConsentInput::ExchangeFailed { definite, message } => {
            let c = live(current, ConsentState::Pending)?;
            // An authorization code is single-use: even a failure without an answer may have
            // consumed it, so the exchange is not repeated; the PSU consents again.
            Ok(exchange_failed(c, definite, &message, "bank", now))
        }
        ConsentInput::Restored => {
            let Some(c) = current else {
                return Err(ConsentRefusal::Ignored);
            };
            match c.state {
                // The consent-URI call was in flight (or not made yet): no timer would ever
                // ask again. An unanswered attempt, retried like one.
                ConsentState::Requested if c.retry_at.is_none() => {
                    if c.attempts >= policy.max_attempts {
                        return failed_call(
                            c,
                            false,
                            "the worker stopped before the answer".into(),
                            "consent URI",
                            policy,
                            now,
                        );
                    }
                    // Asked again at once, with the record's verifier and state.
                    let mut next = c.clone();
                    next.attempts += 1;
                    next.updated_at = now;
                    Ok(ConsentTransition {
                        consent: next,
                        events: vec![],
                        effect: Some(ConsentEffect::FetchUri),
                        code: None,
                        superseded: None,
                    })
                }
                // The PSU's code was being exchanged: the code is never stored, so it cannot
                // be exchanged now; waiting for the SCA deadline would end it EXPIRED as if
                // the PSU had not consented.
                ConsentState::Pending if c.exchanging => Ok(exchange_failed(
                    c,
                    false,
                    "the worker stopped before the answer (a code is single-use and never stored)",
                    "worker:restore",
                    now,
                )),
                ConsentState::Requested
                | ConsentState::Pending
                | ConsentState::Granted
                | ConsentState::Refused
                | ConsentState::Expired => Err(ConsentRefusal::Ignored),
            }
        }
        ConsentInput::Revoked { message } => {
            let c = live(current, ConsentState::Granted)?;
            Ok(end(
                c.clone(),
                ConsentState::Expired,
                Reason::new(ReasonCode::BankConsentRevoked, message),
                "bank",
                now,
            ))
        }
        ConsentInput::Tick => {
            let Some(c) = current else {
                return Err(ConsentRefusal::Ignored);
            };
            match c.state {
                ConsentState::Requested => match c.retry_at {
                    Some(at) if at <= now => {
                        let mut next = c.clone();
                        next.retry_at = None;
                        next.attempts += 1;
                        next.updated_at = now;
                        Ok(ConsentTransition {
                            consent: next,
                            events: vec![],
                            effect: Some(ConsentEffect::FetchUri),
                            code: None,
                            superseded: None,
                        })
                    }
                    Some(_) | None => Err(ConsentRefusal::Ignored),
                },
                ConsentState::Pending => match c.sca_deadline {
                    Some(deadline) if deadline <= now => Ok(end(
                        c.clone(),
                        ConsentState::Expired,
                        Reason::new(ReasonCode::ScaExpired, "the PSU did not consent in time"),
                        "timer",
                        now,
                    )),
                    Some(_) | None => Err(ConsentRefusal::Ignored),
                },
                ConsentState::Granted => match c.valid_until {
                    Some(until) if until <= now => Ok(end(
                        c.clone(),
                        ConsentState::Expired,
                        Reason::new(ReasonCode::ConsentExpired, "the bank's grant ended"),
                        "timer",
                        now,
                    )),
                    Some(_) | None => Err(ConsentRefusal::Ignored),
                },
                ConsentState::Refused | ConsentState::Expired => Err(ConsentRefusal::Ignored),
            }
        }
    }
}

fn exchange_failed(
    c: &Consent,
    definite: bool,
    message: &str,
    cause: &str,
    now: Millis,
) -> ConsentTransition {
    let code = if definite {
        ReasonCode::BankRejected
    } else {
        ReasonCode::BankUnavailable
    };
    end(
        c.clone(),
        ConsentState::Refused,
        Reason::new(code, format!("the code exchange failed: {message}")),
        cause,
        now,
    )
}

/// When the consent next needs a `Tick`.
pub fn next_wake(consent: &Consent) -> Option<Millis> {
    match consent.state {
        ConsentState::Requested => consent.retry_at,
        ConsentState::Pending => consent.sca_deadline,
        ConsentState::Granted => consent.valid_until,
        ConsentState::Refused | ConsentState::Expired => None,
    }
}

/// Whether a granted consent may be used now (its tokens are the engine's to check).
pub fn usable(consent: &Consent, now: Millis) -> bool {
    match consent.state {
        ConsentState::Granted => consent.valid_until.is_none_or(|until| until > now),
        ConsentState::Requested
        | ConsentState::Pending
        | ConsentState::Refused
        | ConsentState::Expired => false,
    }
}

fn live(current: Option<&Consent>, expected: ConsentState) -> Result<&Consent, ConsentRefusal> {
    match current {
        Some(c) if c.state == expected => Ok(c),
        Some(_) | None => Err(ConsentRefusal::Ignored),
    }
}

fn failed_call(
    c: &Consent,
    definite: bool,
    message: String,
    what: &str,
    policy: &ConsentPolicy,
    now: Millis,
) -> ConsentStep {
    if definite {
        return Ok(end(
            c.clone(),
            ConsentState::Refused,
            Reason::new(
                ReasonCode::BankRejected,
                format!("the bank refused the {what}: {message}"),
            ),
            "bank",
            now,
        ));
    }
    if c.attempts >= policy.max_attempts {
        return Ok(end(
            c.clone(),
            ConsentState::Refused,
            Reason::new(
                ReasonCode::BankUnavailable,
                format!(
                    "no answer to the {what} after {} attempts: {message}",
                    c.attempts
                ),
            ),
            "bank",
            now,
        ));
    }
    let mut next = c.clone();
    next.retry_at = Some(now.saturating_add(policy.retry_ms));
    next.updated_at = now;
    Ok(ConsentTransition {
        consent: next,
        events: vec![],
        effect: None,
        code: None,
        superseded: None,
    })
}

fn end(
    mut consent: Consent,
    state: ConsentState,
    reason: Reason,
    cause: &str,
    now: Millis,
) -> ConsentTransition {
    consent.state = state;
    consent.reason = Some(reason);
    consent.pkce_verifier = None;
    consent.retry_at = None;
    consent.exchanging = false;
    consent.sca_deadline = None;
    consent.updated_at = now;
    announce(consent, cause, now)
}

/// The consent as changed, with the event that says so.
fn announce(mut consent: Consent, cause: &str, now: Millis) -> ConsentTransition {
    let event = event(&mut consent, cause, now);
    ConsentTransition {
        consent,
        events: vec![event],
        effect: None,
        code: None,
        superseded: None,
    }
}

fn event(consent: &mut Consent, cause: &str, now: Millis) -> ConsentEvent {
    consent.sequence += 1;
    ConsentEvent {
        consent_id: consent.consent_id.clone(),
        psu_id: consent.psu_id.clone(),
        brand: consent.request.brand,
        scope: consent.request.scope,
        account_iban: consent.request.account_iban.clone(),
        sequence: consent.sequence,
        state: consent.state,
        consent_uri: match consent.state {
            ConsentState::Pending => consent.consent_uri.clone(),
            ConsentState::Requested
            | ConsentState::Granted
            | ConsentState::Refused
            | ConsentState::Expired => None,
        },
        valid_until: consent.valid_until,
        reason: consent.reason.clone(),
        causation_id: cause.to_owned(),
        occurred_at: now,
    }
}

fn remember(consent: &mut Consent, command_id: CommandId, policy: &ConsentPolicy) {
    consent.seen_commands.push(command_id);
    let excess = consent
        .seen_commands
        .len()
        .saturating_sub(policy.remembered_commands.max(1));
    consent.seen_commands.drain(..excess);
}

#[cfg(test)]
#[path = "consent_tests.rs"]
mod tests;
