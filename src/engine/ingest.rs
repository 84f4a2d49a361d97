//! The edge of the engine: raw Kafka record -> validated machine input, or a dead-letter verdict.

use chrono::NaiveDate;
use rdkafka::Message;
use rdkafka::message::OwnedMessage;

use crate::contract::DecodeErrorClass;
use crate::contract::command::{self, CommandBody, CommandEnvelope};
use crate::domain::machine::{Input, ScaOutcome};
use crate::domain::model::Order;
use crate::domain::model::{CommandId, PaymentId, PsuId};
use crate::domain::validation::{
    ValidationLimits, validate_bulk, validate_command_id, validate_initiation, validate_payment_id,
    validate_periodic, validate_psu_id,
};

/// What to do with one command record.
#[derive(Debug)]
pub enum Ingested {
    Apply {
        payment_id: PaymentId,
        input: Box<Input>,
        kind: &'static str,
    },
    DeadLetter {
        class: &'static str,
        message: String,
        payment_id: Option<String>,
    },
}

fn dead(
    class: DecodeErrorClass,
    message: impl Into<String>,
    payment_id: Option<String>,
) -> Ingested {
    Ingested::DeadLetter {
        class: class.as_str(),
        message: message.into(),
        payment_id,
    }
}

/// `has_token` tells whether the worker holds a PIS token for a PSU (a cancellation needs one).
pub fn ingest(
    message: &OwnedMessage,
    max_bytes: usize,
    limits: &ValidationLimits,
    today: NaiveDate,
    has_token: &dyn Fn(&PsuId) -> bool,
) -> Ingested {
    let Some(payload) = message.payload() else {
        return dead(DecodeErrorClass::Empty, "record has no value", None);
    };
    let envelope = match command::decode(payload, max_bytes) {
        Ok(envelope) => envelope,
        Err(e) => return dead(e.class, e.message, None),
    };
    to_input(envelope, message.key(), limits, today, has_token)
}

fn to_input(
    envelope: CommandEnvelope,
    key: Option<&[u8]>,
    limits: &ValidationLimits,
    today: NaiveDate,
    has_token: &dyn Fn(&PsuId) -> bool,
) -> Ingested {
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
        );
    }
    let command_id = CommandId::new(envelope.command_id);
    let psu_id = PsuId::new(envelope.psu_id);
    let payment_id = PaymentId::new(envelope.payment_id);
    let kind = envelope.body.kind();
    let input = match envelope.body {
        CommandBody::Initiate(raw) => initiate(
            command_id,
            psu_id,
            validate_initiation(&raw, limits, today).map(Order::Single),
        ),
        CommandBody::InitiatePeriodic(raw) => initiate(
            command_id,
            psu_id,
            validate_periodic(&raw, limits, today).map(Order::Standing),
        ),
        CommandBody::InitiateBulk(raw) => initiate(
            command_id,
            psu_id,
            validate_bulk(&raw, limits, today).map(Order::Bulk),
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
                    );
                }
                (None, None) => {
                    return dead(
                        DecodeErrorClass::InvalidEnvelope,
                        "CompleteSca needs authorization_code or error",
                        Some(payment_id.to_string()),
                    );
                }
            };
            Input::CompleteSca {
                command_id,
                psu_id,
                outcome,
            }
        }
        CommandBody::Cancel { .. } => {
            let bank_token = has_token(&psu_id);
            Input::Cancel {
                command_id,
                psu_id,
                bank_token,
            }
        }
        CommandBody::RefreshStatus => Input::RefreshStatus { command_id, psu_id },
    };
    Ingested::Apply {
        payment_id,
        input: Box::new(input),
        kind,
    }
}

fn initiate(
    command_id: CommandId,
    psu_id: PsuId,
    validated: Result<Order, crate::domain::reason::Reason>,
) -> Input {
    match validated {
        Ok(order) => Input::Initiate {
            command_id,
            psu_id,
            order,
        },
        Err(reason) => Input::InitiateInvalid {
            command_id,
            psu_id,
            reason,
        },
    }
}
