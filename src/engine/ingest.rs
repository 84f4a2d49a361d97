//! The edge of the engine: raw Kafka record -> validated machine input, or a dead-letter verdict.
//! Two steps: [`decode`] (the owner's decoder, asynchronous because a schema may have to be
//! fetched from the registry) and [`to_input`] (pure, run by the owner's core).
//!
//! Metrics: a dead-letter verdict taken here counts `pis_dlq_records_total{class}` and
//! `pis_commands_consumed_total{type, outcome="dead_lettered"}`. Whether an applied command was
//! accepted, a duplicate, rejected or refused is decided by the state machine: the partition
//! owner counts it with [`CommandLabel::record`].

use chrono::NaiveDate;
use rdkafka::Message;
use rdkafka::message::OwnedMessage;

use crate::contract::DecodeErrorClass;
use crate::contract::command::{self, CommandBody, CommandEnvelope, ResolveAction, ResolveOutcome};
use crate::domain::machine::{Ignored, Input, Outcome, Resolution, ScaOutcome};
use crate::domain::model::Order;
use crate::domain::model::{CommandId, PaymentId, PsuId};
use crate::domain::validation::{
    ValidationLimits, validate_bulk, validate_command_id, validate_initiation, validate_payment_id,
    validate_periodic, validate_psu_id,
};

/// What to do with one decoded command.
#[derive(Debug)]
pub enum Ingested {
    Apply {
        payment_id: PaymentId,
        input: Box<Input>,
        kind: &'static str,
        /// `InitiatePayment.funds_check`: confirm the funds (CAF) before initiating.
        funds_check: bool,
    },
    /// A consent command, for the consent entity it names.
    Consent {
        target: ConsentTarget,
        input: Box<crate::domain::consent::ConsentInput>,
    },
    DeadLetter {
        class: &'static str,
        message: String,
        payment_id: Option<String>,
    },
}

/// The consent entity a consent command is for: a request names its brand and scope; a
/// redirect names only its consent id, which the owner looks up among the PSU's consents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsentTarget {
    Key(crate::kafka::state::consent::ConsentKey),
    Id {
        psu_id: PsuId,
        consent_id: crate::domain::model::ConsentId,
    },
}

/// The dead-letter class of a `RequestConsent` that fails validation (the reason code and
/// message are in the dead letter's message).
pub const INVALID_CONSENT_REQUEST: &str = "INVALID_CONSENT_REQUEST";

/// What decoding one record gave.
#[derive(Debug)]
pub enum Decoding {
    Command(Box<CommandEnvelope>),
    DeadLetter {
        class: &'static str,
        message: String,
    },
    /// The schema registry did not answer for this record's schema id: keep the record (and
    /// everything behind it on the partition) and ask again later. Never a dead letter.
    Wait {
        message: String,
    },
}

/// The `type` label of a command body in `pis_commands_consumed_total`.
pub fn body_type(body: &CommandBody) -> &'static str {
    match body {
        CommandBody::Initiate(_) => "initiate",
        CommandBody::InitiatePeriodic(_) => "initiate_periodic",
        CommandBody::InitiateBulk(_) => "initiate_bulk",
        CommandBody::CompleteSca(_) => "complete_sca",
        CommandBody::Cancel { .. } => "cancel",
        CommandBody::RefreshStatus => "refresh",
        CommandBody::Resolve(_) => "resolve",
        CommandBody::RequestConsent(_) => "request_consent",
        CommandBody::CompleteConsent(_) => "complete_consent",
    }
}

/// Label of a record that was not read as a command.
pub const UNKNOWN_TYPE: &str = "unknown";

/// Counts one dead-lettered command record (from here or from a refusal of the machine).
pub fn count_dead_letter(command_type: &str, class: &str) {
    let m = crate::metrics::metrics();
    m.dlq_records.with_label_values(&[class]).inc();
    m.commands_consumed
        .with_label_values(&[command_type, "dead_lettered"])
        .inc();
}

/// How a command input is labelled in the metrics once the machine has decided on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandLabel {
    pub command_type: &'static str,
    /// An initiation that failed validation: applying it means a `REJECTED` payment.
    invalid: bool,
}

impl CommandLabel {
    /// The label of a client command (`None` for the engine's own inputs). An initiation that
    /// failed validation does not say its kind any more: it counts as `initiate`.
    pub fn of(input: &Input) -> Option<CommandLabel> {
        let (command_type, invalid) = match input {
            Input::Initiate { order, .. } => (
                match order {
                    Order::Single(_) => "initiate",
                    Order::Standing(_) => "initiate_periodic",
                    Order::Bulk(_) => "initiate_bulk",
                },
                false,
            ),
            Input::InitiateInvalid { .. } => ("initiate", true),
            Input::CompleteSca { .. } => ("complete_sca", false),
            Input::Cancel { .. } => ("cancel", false),
            Input::RefreshStatus { .. } => ("refresh", false),
            Input::Resolve { .. } => ("resolve", false),
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
            | Input::Restored => return None,
        };
        Some(CommandLabel {
            command_type,
            invalid,
        })
    }

    /// The `outcome` label of the machine's decision.
    pub fn outcome(self, outcome: &Outcome) -> &'static str {
        match outcome {
            Outcome::Changed(_) if self.invalid => "rejected",
            Outcome::Changed(_) => "accepted",
            Outcome::Ignored(Ignored::DuplicateCommand | Ignored::DuplicateInitiation) => {
                "duplicate"
            }
            // A cancellation while one is under way, or a command with nothing left to do:
            // taken, and it changed nothing.
            Outcome::Ignored(Ignored::CancelInProgress | Ignored::Stale) => "accepted",
            Outcome::Refused(_) => "dead_lettered",
        }
    }

    /// Counts the decision on a command record; a refusal also counts as a DLQ record of its
    /// refusal code.
    pub fn record(self, outcome: &Outcome) {
        match outcome {
            Outcome::Refused(refusal) => {
                count_dead_letter(self.command_type, refusal.code.as_str());
            }
            other => {
                crate::metrics::metrics()
                    .commands_consumed
                    .with_label_values(&[self.command_type, self.outcome(other)])
                    .inc();
            }
        }
    }
}

fn dead(
    class: DecodeErrorClass,
    message: impl Into<String>,
    payment_id: Option<String>,
    command_type: &str,
) -> Ingested {
    count_dead_letter(command_type, class.as_str());
    Ingested::DeadLetter {
        class: class.as_str(),
        message: message.into(),
        payment_id,
    }
}

/// Decodes one command record. A record framed for a schema registry that does not answer is
/// [`Decoding::Wait`]: the owner's decoder keeps it (and the records behind it) and asks again
/// with back-off, without blocking the owner.
pub async fn decode(message: &OwnedMessage, max_bytes: usize) -> Decoding {
    let Some(payload) = message.payload() else {
        count_dead_letter(UNKNOWN_TYPE, DecodeErrorClass::Empty.as_str());
        return Decoding::DeadLetter {
            class: DecodeErrorClass::Empty.as_str(),
            message: "record has no value (null)".into(),
        };
    };
    match command::decode_async(payload, max_bytes).await {
        Ok(envelope) => Decoding::Command(Box::new(envelope)),
        // A transient failure never becomes a dead letter.
        Err(e) if e.class.is_transient() => Decoding::Wait { message: e.message },
        Err(e) => {
            count_dead_letter(UNKNOWN_TYPE, e.class.as_str());
            Decoding::DeadLetter {
                class: e.class.as_str(),
                message: e.message,
            }
        }
    }
}

/// Validates a decoded command against its record (`key`, `partition` of `partitions`) and
/// turns it into the machine's input, or a dead-letter verdict. Pure.
pub fn to_input(
    envelope: CommandEnvelope,
    key: Option<&[u8]>,
    partition: i32,
    partitions: i32,
    limits: &ValidationLimits,
    today: NaiveDate,
) -> Ingested {
    let command_type = body_type(&envelope.body);
    let readable_id = validate_payment_id(&envelope.payment_id)
        .is_ok()
        .then(|| envelope.payment_id.clone());
    let envelope_checks = [
        ("command_id", validate_command_id(&envelope.command_id)),
        ("payment_id", validate_payment_id(&envelope.payment_id)),
        ("psu_id", validate_psu_id(&envelope.psu_id)),
    ];
    for (field, check) in envelope_checks {
        if let Err(reason) = check {
            return dead(
                DecodeErrorClass::InvalidEnvelope,
                format!("{field}: {}", reason.message),
                readable_id,
                command_type,
            );
        }
    }
    // The key routes the command to the PSU's partition owner; a mismatch would let a command
    // act outside the single writer of its PSU.
    if key != Some(envelope.psu_id.as_bytes()) {
        return dead(
            DecodeErrorClass::InvalidEnvelope,
            "the record key must equal psu_id",
            readable_id,
            command_type,
        );
    }
    // A PSU's commands must all reach the one owner of its partition; a producer that hashes
    // keys differently would split them (docs/contract.md, "Keys and partitions").
    let expected = crate::kafka::partitioner::partition_for(envelope.psu_id.as_bytes(), partitions);
    if partitions > 0 && expected != partition {
        return dead(
            DecodeErrorClass::WrongPartition,
            format!(
                "key {:?} belongs on partition {expected} of {partitions} (murmur2, Kafka's default partitioner: Java clients' default, librdkafka's partitioner=murmur2_random); the record is on partition {partition}: set your producer's partitioner",
                envelope.psu_id
            ),
            readable_id,
            command_type,
        );
    }
    let command_id = CommandId::new(envelope.command_id);
    let psu_id = PsuId::new(envelope.psu_id);
    let payment_id = PaymentId::new(envelope.payment_id);
    let kind = envelope.body.kind();
    // Single payments only (docs/contract.md, "Funds checks").
    let funds_check = match &envelope.body {
        CommandBody::Initiate(raw) => raw.funds_check,
        CommandBody::InitiatePeriodic(_)
        | CommandBody::InitiateBulk(_)
        | CommandBody::CompleteSca(_)
        | CommandBody::Cancel { .. }
        | CommandBody::RefreshStatus
        | CommandBody::Resolve(_)
        | CommandBody::RequestConsent(_)
        | CommandBody::CompleteConsent(_) => false,
    };
    let input = match envelope.body {
        CommandBody::Initiate(raw) => initiate(
            command_id,
            psu_id,
            validate_initiation(&raw, limits, today).map(Order::Single),
            raw.always_pkce,
        ),
        CommandBody::InitiatePeriodic(raw) => initiate(
            command_id,
            psu_id,
            validate_periodic(&raw, limits, today).map(Order::Standing),
            raw.payment.always_pkce,
        ),
        CommandBody::InitiateBulk(raw) => initiate(
            command_id,
            psu_id,
            validate_bulk(&raw, limits, today).map(Order::Bulk),
            raw.always_pkce,
        ),
        CommandBody::CompleteSca(sca) => {
            let outcome = match (sca.authorization_code, sca.error) {
                (Some(code), None) => ScaOutcome::Code(code),
                (None, Some(error)) => ScaOutcome::Error {
                    error,
                    description: sca.error_description,
                },
                (Some(_), Some(_)) => {
                    return dead(
                        DecodeErrorClass::InvalidEnvelope,
                        "CompleteSca carries both authorization_code and error",
                        Some(payment_id.to_string()),
                        command_type,
                    );
                }
                // Only the payment knows whether its redirect must carry a code: a payment
                // initiated with the PSU's token gets none (the machine decides).
                (None, None) => ScaOutcome::Returned,
            };
            Input::CompleteSca {
                command_id,
                psu_id,
                outcome,
                state: sca.state,
            }
        }
        // Whether a PIS token is at hand is the owner's to say (it knows the payment's brand).
        CommandBody::Cancel { .. } => Input::Cancel {
            command_id,
            psu_id,
            bank_token: false,
        },
        CommandBody::RefreshStatus => Input::RefreshStatus { command_id, psu_id },
        CommandBody::Resolve(resolve) => match resolution(&resolve) {
            Ok(resolution) => Input::Resolve {
                command_id,
                psu_id,
                resolution,
            },
            Err(message) => {
                return dead(
                    DecodeErrorClass::InvalidEnvelope,
                    message,
                    Some(payment_id.to_string()),
                    command_type,
                );
            }
        },
        CommandBody::RequestConsent(raw) => {
            let request = match crate::domain::validation::validate_consent_request(&raw) {
                Ok(request) => request,
                Err(reason) => {
                    count_dead_letter(command_type, INVALID_CONSENT_REQUEST);
                    return Ingested::DeadLetter {
                        class: INVALID_CONSENT_REQUEST,
                        message: format!("{}: {}", reason.code.as_str(), reason.message),
                        payment_id: Some(payment_id.to_string()),
                    };
                }
            };
            let key = crate::kafka::state::consent::ConsentKey {
                brand: request.brand,
                scope: request.scope,
                psu_id: psu_id.clone(),
            };
            let input = crate::domain::consent::ConsentInput::Request {
                command_id,
                consent_id: crate::domain::model::ConsentId::new(payment_id.as_str()),
                psu_id,
                request,
                // The owner draws these (its randomness): placeholders until then.
                pkce_verifier: secrecy::SecretString::from(String::new()),
                sca_state: String::new(),
            };
            return Ingested::Consent {
                target: ConsentTarget::Key(key),
                input: Box::new(input),
            };
        }
        CommandBody::CompleteConsent(redirect) => {
            let outcome = match (redirect.authorization_code, redirect.error) {
                (Some(code), None) => crate::domain::consent::ConsentOutcome::Code(code),
                (None, Some(error)) => crate::domain::consent::ConsentOutcome::Error {
                    error,
                    description: redirect.error_description,
                },
                (Some(_), Some(_)) | (None, None) => {
                    return dead(
                        DecodeErrorClass::InvalidEnvelope,
                        "CompleteConsent carries either an authorization_code or an error",
                        Some(payment_id.to_string()),
                        command_type,
                    );
                }
            };
            let input = crate::domain::consent::ConsentInput::Complete {
                command_id,
                outcome,
                state: redirect.state,
            };
            return Ingested::Consent {
                target: ConsentTarget::Id {
                    psu_id,
                    consent_id: crate::domain::model::ConsentId::new(payment_id.as_str()),
                },
                input: Box::new(input),
            };
        }
    };
    Ingested::Apply {
        payment_id,
        input: Box::new(input),
        kind,
        funds_check,
    }
}

/// A person's resolution, checked: ADOPT names the bank's payment id, the others do not.
fn resolution(resolve: &ResolveOutcome) -> Result<Resolution, String> {
    let note = resolve.note.clone();
    if let Some(note) = &note {
        crate::domain::validation::validate_note(note)
            .map_err(|r| format!("note: {}", r.message))?;
    }
    match (resolve.action, &resolve.bank_payment_id) {
        (ResolveAction::Reinitiate, None) => Ok(Resolution::Reinitiate),
        (ResolveAction::Abandon, None) => Ok(Resolution::Abandon { note }),
        (ResolveAction::Adopt, Some(id)) => {
            crate::domain::validation::validate_bank_payment_id(id)
                .map_err(|r| format!("bank_payment_id: {}", r.message))?;
            Ok(Resolution::Adopt {
                bank_payment_id: crate::domain::model::BankPaymentId::new(id.clone()),
            })
        }
        (ResolveAction::Adopt, None) => Err("ADOPT needs bank_payment_id".into()),
        (ResolveAction::Reinitiate | ResolveAction::Abandon, Some(_)) => {
            Err("bank_payment_id is only for ADOPT".into())
        }
    }
}

fn initiate(
    command_id: CommandId,
    psu_id: PsuId,
    validated: Result<Order, crate::domain::reason::Reason>,
    always_pkce: bool,
) -> Input {
    match validated {
        Ok(order) => Input::Initiate {
            command_id,
            psu_id,
            order,
            always_pkce,
        },
        Err(reason) => Input::InitiateInvalid {
            command_id,
            psu_id,
            reason,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::command::ScaRedirect;
    use crate::contract::framing;
    use crate::domain::machine::{Policy, decide};
    use crate::domain::model::RawInitiatePayment;
    use crate::domain::reason::ReasonCode;
    use rdkafka::Timestamp;
    use rdkafka::message::OwnedHeaders;

    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 3, 2).expect("date")
    }

    fn raw() -> RawInitiatePayment {
        RawInitiatePayment {
            payment_product: "SEPA_CREDIT_TRANSFERS".into(),
            brand: "BELFIUS".into(),
            amount: "12.34".into(),
            currency: "EUR".into(),
            creditor_name: "Alice".into(),
            creditor_iban: "BE68539007547034".into(),
            end_to_end_id: "E2E-1".into(),
            language: "fr".into(),
            redirect_uri: "https://client.example/cb".into(),
            ..Default::default()
        }
    }

    fn envelope(body: CommandBody) -> CommandEnvelope {
        CommandEnvelope {
            command_id: "c-1".into(),
            payment_id: "p-1".into(),
            psu_id: "psu-1".into(),
            issued_at: 1,
            body,
        }
    }

    fn record(key: Option<&str>, value: Option<Vec<u8>>) -> OwnedMessage {
        OwnedMessage::new(
            value,
            key.map(|k| k.as_bytes().to_vec()),
            "commands".into(),
            Timestamp::NotAvailable,
            0,
            7,
            Some(OwnedHeaders::new()),
        )
    }

    /// Decodes and validates a record on partition 0 of `partitions`.
    fn run_on(message: &OwnedMessage, partitions: i32) -> Ingested {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        match runtime.block_on(decode(message, 65_536)) {
            Decoding::Command(envelope) => to_input(
                *envelope,
                message.key(),
                message.partition(),
                partitions,
                &ValidationLimits::default(),
                today(),
            ),
            Decoding::DeadLetter { class, message } => Ingested::DeadLetter {
                class,
                message,
                payment_id: None,
            },
            Decoding::Wait { message } => panic!("waits: {message}"),
        }
    }

    fn run(message: &OwnedMessage, _has_token: bool) -> Ingested {
        run_on(message, 1)
    }

    fn class_of(verdict: &Ingested) -> Option<&'static str> {
        match verdict {
            Ingested::DeadLetter { class, .. } => Some(class),
            Ingested::Apply { .. } | Ingested::Consent { .. } => None,
        }
    }

    fn encoded(envelope: &CommandEnvelope) -> Vec<u8> {
        command::encode(envelope).expect("encode")
    }

    #[test]
    fn a_valid_initiation_becomes_an_initiate_input() {
        let verdict = run(
            &record(
                Some("psu-1"),
                Some(encoded(&envelope(CommandBody::Initiate(Box::new(raw()))))),
            ),
            false,
        );
        let Ingested::Apply {
            payment_id, input, ..
        } = verdict
        else {
            panic!("not applied: {verdict:?}")
        };
        assert_eq!(payment_id.as_str(), "p-1");
        assert!(matches!(*input, Input::Initiate { .. }));
    }

    /// Every validation failure reaches the machine as an invalid initiation that carries the
    /// reason: a `REJECTED` status with that code, not a dead letter.
    #[test]
    fn an_invalid_initiation_becomes_a_rejection_with_its_reason() {
        type Edit = Box<dyn Fn(&mut RawInitiatePayment)>;
        let cases: Vec<(ReasonCode, Edit)> = vec![
            (
                ReasonCode::InvalidIban,
                Box::new(|r| r.creditor_iban = "BE68539007547035".into()),
            ),
            (
                ReasonCode::InvalidBic,
                Box::new(|r| r.creditor_bic = Some("GKCC".into())),
            ),
            (
                ReasonCode::InvalidAmount,
                Box::new(|r| r.amount = "1.234".into()),
            ),
            (
                ReasonCode::AmountTooLarge,
                Box::new(|r| r.amount = "1000000.01".into()),
            ),
            (
                ReasonCode::InvalidCurrency,
                Box::new(|r| r.currency = "USD".into()),
            ),
            (
                ReasonCode::InvalidCharacters,
                Box::new(|r| r.creditor_name = "Zoë".into()),
            ),
            (
                ReasonCode::FieldTooLong,
                Box::new(|r| r.end_to_end_id = "E".repeat(36)),
            ),
            (
                ReasonCode::InvalidExecutionDate,
                Box::new(|r| r.requested_execution_date = Some("2026-03-01".into())),
            ),
            (
                ReasonCode::InvalidLanguage,
                Box::new(|r| r.language = "de".into()),
            ),
            (
                ReasonCode::InvalidRedirectUri,
                Box::new(|r| r.redirect_uri = "http://client.example/cb".into()),
            ),
            (
                ReasonCode::MissingField,
                Box::new(|r| r.creditor_name = String::new()),
            ),
        ];
        for (code, edit) in cases {
            let mut raw = raw();
            edit(&mut raw);
            let verdict = run(
                &record(
                    Some("psu-1"),
                    Some(encoded(&envelope(CommandBody::Initiate(Box::new(raw))))),
                ),
                false,
            );
            match verdict {
                Ingested::Apply { input, .. } => match *input {
                    Input::InitiateInvalid { reason, .. } => {
                        assert_eq!(reason.code, code, "{}", reason.message)
                    }
                    other => panic!("{code:?}: not an invalid initiation: {other:?}"),
                },
                other => panic!("{code:?}: dead-lettered: {other:?}"),
            }
        }
    }

    #[test]
    fn a_key_that_is_not_the_psu_id_is_an_invalid_envelope() {
        let bytes = encoded(&envelope(CommandBody::RefreshStatus));
        for key in [Some("psu-2"), None] {
            let verdict = run(&record(key, Some(bytes.clone())), false);
            assert_eq!(class_of(&verdict), Some("INVALID_ENVELOPE"), "{key:?}");
            let Ingested::DeadLetter {
                payment_id,
                message,
                ..
            } = verdict
            else {
                unreachable!()
            };
            assert_eq!(payment_id.as_deref(), Some("p-1"), "the id is readable");
            assert!(message.contains("key"), "{message}");
        }
    }

    #[test]
    fn invalid_ids_are_invalid_envelopes() {
        for edit in [
            (|e: &mut CommandEnvelope| e.command_id = String::new()) as fn(&mut CommandEnvelope),
            |e| e.payment_id = "has space".into(),
            |e| e.payment_id = "p".repeat(36),
            |e| e.psu_id = "psu/1".into(),
        ] {
            let mut env = envelope(CommandBody::RefreshStatus);
            edit(&mut env);
            let key = env.psu_id.clone();
            let verdict = run(&record(Some(&key), Some(encoded(&env))), false);
            assert_eq!(class_of(&verdict), Some("INVALID_ENVELOPE"), "{env:?}");
        }
    }

    /// Both a code and an error is a contradiction; neither is what the redirect of a payment
    /// initiated with the PSU's token carries, so the machine decides on it.
    #[test]
    fn complete_sca_carries_at_most_one_of_code_and_error() {
        let sca = |url: &str| {
            CommandBody::CompleteSca(ScaRedirect::from_redirect_url(
                &url::Url::parse(url).expect("url"),
            ))
        };
        let verdict = run(
            &record(
                Some("psu-1"),
                Some(encoded(&envelope(sca(
                    "https://c.example/cb?code=x&error=access_denied",
                )))),
            ),
            false,
        );
        assert_eq!(class_of(&verdict), Some("INVALID_ENVELOPE"));
        let verdict = run(
            &record(
                Some("psu-1"),
                Some(encoded(&envelope(sca("https://c.example/cb?state=p-1")))),
            ),
            false,
        );
        let Ingested::Apply { input, .. } = verdict else {
            panic!("a code-less redirect is the machine's to judge: {verdict:?}");
        };
        assert!(matches!(
            *input,
            Input::CompleteSca {
                outcome: ScaOutcome::Returned,
                state: Some(ref s),
                ..
            } if s == "p-1"
        ));
        let verdict = run(
            &record(
                Some("psu-1"),
                Some(encoded(&envelope(sca("https://c.example/cb?code=x")))),
            ),
            false,
        );
        assert!(matches!(verdict, Ingested::Apply { .. }));
    }

    #[test]
    fn undecodable_records_are_dead_lettered_by_class() {
        let good = encoded(&envelope(CommandBody::RefreshStatus));
        let mut unknown = good.clone();
        unknown[3] ^= 0xFF;
        let status = crate::contract::status::encode(&crate::domain::machine::StatusEvent {
            payment_id: PaymentId::new("p-1"),
            psu_id: PsuId::new("psu-1"),
            sequence: 1,
            state: crate::domain::machine::StateKind::Received,
            bank_status: None,
            bank_payment_id: None,
            sca_redirect_url: None,
            reason: None,
            causation_id: "c".into(),
            occurred_at: 0,
            settlement: None,
        })
        .expect("status");
        let cases: Vec<(Option<Vec<u8>>, &str)> = vec![
            (None, "EMPTY"),
            (Some(vec![]), "EMPTY"),
            (Some(vec![b'x'; 70_000]), "OVERSIZED"),
            (Some(b"{\"json\":1}".to_vec()), "BAD_FRAMING"),
            (Some(unknown), "UNKNOWN_SCHEMA"),
            (Some(good[..good.len() - 2].to_vec()), "MALFORMED_AVRO"),
            (Some(status), "WRONG_RECORD_TYPE"),
            // Confluent framing without a registry configured in this process.
            (
                Some(framing::frame_confluent(3, &good[10..])),
                "UNKNOWN_SCHEMA",
            ),
        ];
        for (value, class) in cases {
            let verdict = run(&record(Some("psu-1"), value.clone()), false);
            assert_eq!(class_of(&verdict), Some(class), "{value:?}");
        }
    }

    /// Part 4: a client whose library hashes keys differently (librdkafka's default CRC32)
    /// put a PSU's commands on another partition, where they met no payment. Now such a
    /// record is dead-lettered with its own class and a message that says what to fix.
    #[test]
    fn a_command_on_the_wrong_partition_for_its_key_is_dead_lettered() {
        let bytes = encoded(&envelope(CommandBody::RefreshStatus));
        let right = crate::kafka::partitioner::partition_for(b"psu-1", 6);
        let wrong = (right + 1) % 6;
        let on = |partition: i32| {
            OwnedMessage::new(
                Some(bytes.clone()),
                Some(b"psu-1".to_vec()),
                "commands".into(),
                Timestamp::NotAvailable,
                7,
                partition as i64,
                None,
            )
        };
        let mut message = on(wrong);
        // OwnedMessage::new(payload, key, topic, timestamp, partition, offset, headers)
        message = OwnedMessage::new(
            message.payload().map(<[u8]>::to_vec),
            Some(b"psu-1".to_vec()),
            "commands".into(),
            Timestamp::NotAvailable,
            wrong,
            7,
            None,
        );
        let verdict = run_on(&message, 6);
        assert_eq!(class_of(&verdict), Some("WRONG_PARTITION"));
        let Ingested::DeadLetter { message: why, .. } = verdict else {
            unreachable!()
        };
        assert!(why.contains(&format!("partition {right}")), "{why}");
        assert!(why.contains("murmur2"), "{why}");
        let _ = on(right);
        let ok = OwnedMessage::new(
            Some(bytes.clone()),
            Some(b"psu-1".to_vec()),
            "commands".into(),
            Timestamp::NotAvailable,
            right,
            7,
            None,
        );
        assert!(matches!(run_on(&ok, 6), Ingested::Apply { .. }));
    }

    #[test]
    fn complete_sca_carries_the_redirects_state() {
        let body = CommandBody::CompleteSca(ScaRedirect::from_redirect_url(
            &url::Url::parse("https://c.example/cb?code=x&state=abc").expect("url"),
        ));
        let Ingested::Apply { input, .. } = run(
            &record(Some("psu-1"), Some(encoded(&envelope(body)))),
            false,
        ) else {
            panic!("not applied")
        };
        assert!(matches!(*input, Input::CompleteSca { state: Some(ref s), .. } if s == "abc"));
    }

    #[test]
    fn resolve_outcome_needs_a_bank_id_exactly_for_adopt() {
        use crate::contract::command::{ResolveAction, ResolveOutcome};
        let resolve = |action, bank_payment_id: Option<&str>| {
            CommandBody::Resolve(ResolveOutcome {
                action,
                bank_payment_id: bank_payment_id.map(str::to_owned),
                note: Some("checked at the bank".into()),
            })
        };
        let cases = [
            (resolve(ResolveAction::Adopt, Some("bank-1")), true),
            (resolve(ResolveAction::Adopt, None), false),
            (resolve(ResolveAction::Reinitiate, None), true),
            (resolve(ResolveAction::Reinitiate, Some("bank-1")), false),
            (resolve(ResolveAction::Abandon, None), true),
            (resolve(ResolveAction::Adopt, Some("bad id!")), false),
        ];
        for (body, ok) in cases {
            let what = format!("{body:?}");
            let verdict = run(
                &record(Some("psu-1"), Some(encoded(&envelope(body)))),
                false,
            );
            match (ok, &verdict) {
                (true, Ingested::Apply { input, .. }) => {
                    assert!(matches!(**input, Input::Resolve { .. }), "{what}")
                }
                (false, Ingested::DeadLetter { class, .. }) => {
                    assert_eq!(*class, "INVALID_ENVELOPE", "{what}")
                }
                (_, other) => panic!("{what}: {other:?}"),
            }
        }
    }

    #[test]
    fn dead_letters_are_counted_per_class_and_type() {
        let m = crate::metrics::metrics();
        let dlq = || m.dlq_records.with_label_values(&["BAD_FRAMING"]).get();
        let consumed = || {
            m.commands_consumed
                .with_label_values(&["unknown", "dead_lettered"])
                .get()
        };
        let (dlq_before, consumed_before) = (dlq(), consumed());
        run(
            &record(Some("psu-1"), Some(b"garbage!!!!!!".to_vec())),
            false,
        );
        assert!(dlq() > dlq_before);
        assert!(consumed() > consumed_before);
        let refresh = || {
            m.commands_consumed
                .with_label_values(&["refresh", "dead_lettered"])
                .get()
        };
        let before = refresh();
        run(
            &record(
                Some("someone-else"),
                Some(encoded(&envelope(CommandBody::RefreshStatus))),
            ),
            false,
        );
        assert!(refresh() > before, "a decoded command keeps its type");
    }

    #[test]
    fn decisions_are_labelled() {
        let policy = Policy::default();
        let id = PaymentId::new("p-1");
        let Ingested::Apply { input, .. } = run(
            &record(
                Some("psu-1"),
                Some(encoded(&envelope(CommandBody::Initiate(Box::new(raw()))))),
            ),
            false,
        ) else {
            panic!("not applied")
        };
        let label = CommandLabel::of(&input).expect("a command");
        assert_eq!(label.command_type, "initiate");
        let outcome = decide(&id, None, (*input).clone(), 0, &policy);
        assert_eq!(label.outcome(&outcome), "accepted");
        let Outcome::Changed(transition) = outcome else {
            panic!("not changed")
        };
        let again = decide(&id, Some(&transition.payment), *input, 1, &policy);
        assert_eq!(label.outcome(&again), "duplicate");
        let cancel_unknown = decide(
            &PaymentId::new("nope"),
            None,
            Input::Cancel {
                command_id: CommandId::new("c-9"),
                psu_id: PsuId::new("psu-1"),
                bank_token: false,
            },
            0,
            &policy,
        );
        assert_eq!(
            CommandLabel::of(&Input::Cancel {
                command_id: CommandId::new("c-9"),
                psu_id: PsuId::new("psu-1"),
                bank_token: false,
            })
            .expect("command")
            .outcome(&cancel_unknown),
            "dead_lettered"
        );
        let invalid = Input::InitiateInvalid {
            command_id: CommandId::new("c-2"),
            psu_id: PsuId::new("psu-1"),
            reason: crate::domain::reason::Reason::new(ReasonCode::InvalidIban, "x"),
        };
        let label = CommandLabel::of(&invalid).expect("command");
        let outcome = decide(&PaymentId::new("p-2"), None, invalid, 0, &policy);
        assert_eq!(label.outcome(&outcome), "rejected");
        assert_eq!(CommandLabel::of(&Input::TimerFired), None);
    }
}
