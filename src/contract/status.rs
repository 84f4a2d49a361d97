//! Payment status events (`schemas/payment-status.avsc`) to and from Avro bytes.

use apache_avro::types::Value;
use chrono::NaiveDate;

use super::command::{Fields, Patience, opt_string, writer_schema};
use super::framing::{frame, frame_confluent, unframe_any};
use super::{DecodeError, DecodeErrorClass, EncodeError, SchemaRole, schemas};
use crate::domain::machine::{StateKind, StatusEvent};
use crate::domain::settlement::{SettlementEvidence, SettlementOutcome};

/// A status event as read back from the topic (by `watch`, tests, or any client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRecord {
    pub event_id: String,
    pub payment_id: String,
    pub psu_id: String,
    pub sequence: i64,
    pub state: StateKind,
    pub is_final: bool,
    pub bank_status: Option<String>,
    pub bank_payment_id: Option<String>,
    pub sca_redirect_url: Option<String>,
    pub reason_code: Option<String>,
    pub reason_message: Option<String>,
    pub causation_id: Option<String>,
    pub occurred_at: i64,
    /// Status schema v3; absent (`None`) in events of earlier writers.
    pub settlement: Option<SettlementEvidence>,
}

const BOOKING_DATE: &str = "%Y-%m-%d";

fn outcome_index(outcome: SettlementOutcome) -> u32 {
    match outcome {
        SettlementOutcome::Booked => 0,
        SettlementOutcome::NotBooked => 1,
        SettlementOutcome::Ambiguous => 2,
        SettlementOutcome::Duplicated => 3,
    }
}

fn settlement_value(settlement: Option<&SettlementEvidence>) -> Value {
    match settlement {
        Some(s) => Value::Union(
            1,
            Box::new(Value::Record(vec![
                (
                    "outcome".into(),
                    Value::Enum(outcome_index(s.outcome), s.outcome.symbol().into()),
                ),
                (
                    "transaction_refs".into(),
                    Value::Array(
                        s.transaction_refs
                            .iter()
                            .map(|r| Value::String(r.clone()))
                            .collect(),
                    ),
                ),
                (
                    "booking_date".into(),
                    opt_string(
                        s.booking_date
                            .map(|d| d.format(BOOKING_DATE).to_string())
                            .as_deref(),
                    ),
                ),
                ("checked_at".into(), Value::TimestampMillis(s.checked_at)),
            ])),
        ),
        None => Value::Union(0, Box::new(Value::Null)),
    }
}

fn read_settlement(value: Value) -> Result<Option<SettlementEvidence>, DecodeError> {
    let malformed = |m: String| DecodeError::new(DecodeErrorClass::MalformedAvro, m);
    let record = match value {
        Value::Union(_, inner) => *inner,
        other => other,
    };
    if record == Value::Null {
        return Ok(None);
    }
    let mut s = Fields::of(record, "settlement")?;
    let symbol = s.string("outcome")?;
    let outcome = SettlementOutcome::from_symbol(&symbol).ok_or_else(|| {
        malformed(format!(
            "settlement: unknown outcome {symbol} (a newer writer's symbol?)"
        ))
    })?;
    let transaction_refs = match s.value("transaction_refs")? {
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(r) => Ok(r),
                other => Err(malformed(format!(
                    "settlement.transaction_refs: expected strings, got {other:?}"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?,
        other => {
            return Err(malformed(format!(
                "settlement.transaction_refs: expected an array, got {other:?}"
            )));
        }
    };
    let booking_date = match s.opt_string("booking_date")? {
        Some(text) => Some(NaiveDate::parse_from_str(&text, BOOKING_DATE).map_err(|_| {
            malformed("settlement.booking_date: not an ISO date (yyyy-mm-dd)".into())
        })?),
        None => None,
    };
    Ok(Some(SettlementEvidence {
        outcome,
        transaction_refs,
        booking_date,
        checked_at: s.millis("checked_at")?,
    }))
}

/// Encodes a status event: with Confluent framing (the registered status schema's id) when a
/// schema registry is configured, single-object framing otherwise.
pub fn encode(event: &StatusEvent) -> Result<Vec<u8>, EncodeError> {
    let schemas = schemas().map_err(|e| EncodeError::Schema(e.message))?;
    let state_index = StateKind::ALL
        .iter()
        .position(|k| *k == event.state)
        .unwrap_or(0) as u32;
    let reason = match &event.reason {
        Some(r) => Value::Union(
            1,
            Box::new(Value::Record(vec![
                ("code".into(), Value::String(r.code.as_str().into())),
                ("message".into(), Value::String(r.message.clone())),
            ])),
        ),
        None => Value::Union(0, Box::new(Value::Null)),
    };
    let value = Value::Record(vec![
        ("event_id".into(), Value::Uuid(event.event_id())),
        (
            "payment_id".into(),
            Value::String(event.payment_id.to_string()),
        ),
        ("psu_id".into(), Value::String(event.psu_id.to_string())),
        ("sequence".into(), Value::Long(event.sequence as i64)),
        (
            "state".into(),
            Value::Enum(state_index, event.state.symbol().into()),
        ),
        ("is_final".into(), Value::Boolean(event.state.is_terminal())),
        (
            "bank_status".into(),
            opt_string(event.bank_status.as_deref()),
        ),
        (
            "bank_payment_id".into(),
            opt_string(event.bank_payment_id.as_ref().map(|b| b.as_str())),
        ),
        (
            "sca_redirect_url".into(),
            opt_string(event.sca_redirect_url.as_deref()),
        ),
        ("reason".into(), reason),
        ("causation_id".into(), opt_string(Some(&event.causation_id))),
        (
            "occurred_at".into(),
            Value::TimestampMillis(event.occurred_at),
        ),
        (
            "settlement".into(),
            settlement_value(event.settlement.as_ref()),
        ),
    ]);
    let datum = apache_avro::to_avro_datum(&schemas.status.schema, value)?;
    Ok(match super::registry::status_schema_id() {
        Some(id) => frame_confluent(id, &datum),
        None => frame(&schemas.status.fingerprint, &datum),
    })
}

/// The Avro value of an event of `role` in single-object encoding or (with a registry
/// configured in this process) Confluent framing, read with its writer's schema. Asks the
/// registry once: an event reader must not hang.
pub(super) fn read_event(bytes: &[u8], role: SchemaRole, what: &str) -> Result<Value, DecodeError> {
    let (writer_ref, mut datum) = unframe_any(bytes)?;
    let writer = writer_schema(writer_ref, Patience::Once)?;
    if writer.role != role {
        return Err(DecodeError::new(
            DecodeErrorClass::WrongRecordType,
            format!("a {:?} record, not {what}", writer.role),
        ));
    }
    let writer = &writer.schema;
    super::binary::check_datum(writer, datum)
        .map_err(|e| DecodeError::new(DecodeErrorClass::MalformedAvro, e))?;
    let value = apache_avro::from_avro_datum(writer, &mut datum, None)
        .map_err(|e| DecodeError::new(DecodeErrorClass::MalformedAvro, e.to_string()))?;
    if !datum.is_empty() {
        return Err(DecodeError::new(
            DecodeErrorClass::MalformedAvro,
            format!("{} trailing bytes after the event", datum.len()),
        ));
    }
    Ok(value)
}

/// An event's optional `reason {code, message}`.
pub(super) fn read_reason(f: &mut Fields) -> Result<(Option<String>, Option<String>), DecodeError> {
    Ok(match f.value_or_null("reason") {
        Value::Union(_, inner) => match *inner {
            Value::Null => (None, None),
            record => {
                let mut r = Fields::of(record, "reason")?;
                (Some(r.string("code")?), Some(r.string("message")?))
            }
        },
        _other => (None, None),
    })
}

/// Decodes a status event in single-object encoding or (with a registry configured in this
/// process) Confluent framing. Asks the registry once: a status reader must not hang.
pub fn decode(bytes: &[u8]) -> Result<StatusRecord, DecodeError> {
    let value = read_event(bytes, SchemaRole::Status, "a status event")?;
    let mut f = Fields::of(value, "PaymentStatusEvent")?;
    let state_symbol = f.string("state")?;
    let state = StateKind::from_symbol(&state_symbol).ok_or_else(|| {
        DecodeError::new(
            DecodeErrorClass::MalformedAvro,
            format!("unknown state {state_symbol}"),
        )
    })?;
    let (reason_code, reason_message) = read_reason(&mut f)?;
    Ok(StatusRecord {
        event_id: f.string("event_id")?,
        payment_id: f.string("payment_id")?,
        psu_id: f.string("psu_id")?,
        sequence: f.long("sequence")?,
        state,
        is_final: f.boolean("is_final")?,
        bank_status: f.opt_string("bank_status")?,
        bank_payment_id: f.opt_string("bank_payment_id")?,
        sca_redirect_url: f.opt_string("sca_redirect_url")?,
        reason_code,
        reason_message,
        causation_id: f.opt_string("causation_id")?,
        occurred_at: f.millis("occurred_at")?,
        // Absent before status schema v3.
        settlement: read_settlement(f.value_or_null("settlement"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::model::{BankPaymentId, PaymentId, PsuId};
    use crate::domain::reason::{Reason, ReasonCode};

    #[test]
    fn status_event_round_trips_through_avro_bytes() {
        let event = StatusEvent {
            payment_id: PaymentId::new("p-1"),
            psu_id: PsuId::new("psu-1"),
            sequence: 3,
            state: StateKind::Rejected,
            bank_status: Some("RJCT".into()),
            bank_payment_id: Some(BankPaymentId::new("b-9")),
            sca_redirect_url: None,
            reason: Some(Reason::new(ReasonCode::BankRejected, "no")),
            causation_id: "c-1".into(),
            occurred_at: 42,
            settlement: None,
        };
        let record = decode(&encode(&event).expect("encode")).expect("decode");
        assert_eq!(record.event_id, event.event_id().to_string());
        assert_eq!(record.sequence, 3);
        assert_eq!(record.state, StateKind::Rejected);
        assert!(record.is_final);
        assert_eq!(record.bank_payment_id.as_deref(), Some("b-9"));
        assert_eq!(record.reason_code.as_deref(), Some("BANK_REJECTED"));
        assert_eq!(record.causation_id.as_deref(), Some("c-1"));
        assert_eq!(record.occurred_at, 42);
        assert_eq!(record.settlement, None);
    }

    fn settled(settlement: Option<SettlementEvidence>) -> StatusEvent {
        StatusEvent {
            payment_id: PaymentId::new("p-2"),
            psu_id: PsuId::new("psu-2"),
            sequence: 5,
            state: StateKind::Settled,
            bank_status: Some("ACSC".into()),
            bank_payment_id: Some(BankPaymentId::new("b-2")),
            sca_redirect_url: None,
            reason: None,
            causation_id: "bank".into(),
            occurred_at: 1_000,
            settlement,
        }
    }

    #[test]
    fn settlement_evidence_round_trips_for_every_outcome() {
        for (outcome, refs, date) in [
            (
                SettlementOutcome::Booked,
                vec!["TX-1".to_owned()],
                NaiveDate::from_ymd_opt(2026, 3, 2),
            ),
            (SettlementOutcome::NotBooked, vec![], None),
            (
                SettlementOutcome::Ambiguous,
                vec!["TX-7".to_owned(), "TX-8".to_owned()],
                NaiveDate::from_ymd_opt(2026, 2, 28),
            ),
            (
                SettlementOutcome::Duplicated,
                vec!["TX-1".to_owned(), "TX-9".to_owned()],
                NaiveDate::from_ymd_opt(2025, 12, 31),
            ),
        ] {
            let evidence = SettlementEvidence {
                outcome,
                transaction_refs: refs,
                booking_date: date,
                checked_at: 1_700_000_000_999,
            };
            let record =
                decode(&encode(&settled(Some(evidence.clone()))).expect("encode")).expect("decode");
            assert_eq!(record.settlement, Some(evidence), "{outcome:?}");
            assert_eq!(record.state, StateKind::Settled);
        }
    }

    /// An event written with status schema v2 (no `settlement`) reads with none.
    #[test]
    fn events_written_with_schema_v2_have_no_settlement() {
        let (name, v2_json) = crate::contract::STATUS_SCHEMA_HISTORY[1];
        assert_eq!(name, "PaymentStatusEvent v2");
        let v2 = apache_avro::Schema::parse_str(v2_json).expect("v2");
        let fingerprint = crate::contract::canonical::fingerprint(v2_json).expect("fingerprint");
        // Our own encoding, less the field v2 lacks (the last one).
        let current = encode(&settled(None)).expect("encode");
        let ours = &schemas().expect("schemas").status.schema;
        let mut value =
            apache_avro::from_avro_datum(ours, &mut &current[10..], None).expect("read");
        if let Value::Record(fields) = &mut value {
            assert_eq!(fields.pop().map(|(n, _)| n).as_deref(), Some("settlement"));
        }
        let datum = apache_avro::to_avro_datum(&v2, value).expect("v2 datum");
        let record = decode(&super::frame(&fingerprint, &datum)).expect("a v2 event is still read");
        assert_eq!(record.settlement, None);
        assert_eq!(record.payment_id, "p-2");
        assert_eq!(record.state, StateKind::Settled);
    }

    #[test]
    fn every_settlement_outcome_is_a_schema_symbol_in_the_same_order() {
        let schemas = schemas().expect("schemas");
        let apache_avro::Schema::Record(record) = &schemas.status.schema else {
            panic!("status schema is not a record")
        };
        let field = record
            .fields
            .iter()
            .find(|f| f.name == "settlement")
            .expect("settlement field");
        let apache_avro::Schema::Union(union) = &field.schema else {
            panic!("settlement is not a union")
        };
        let Some(apache_avro::Schema::Record(evidence)) = union.variants().get(1) else {
            panic!("no SettlementEvidence branch")
        };
        let outcome = evidence
            .fields
            .iter()
            .find(|f| f.name == "outcome")
            .expect("outcome");
        let apache_avro::Schema::Enum(e) = &outcome.schema else {
            panic!("outcome is not an enum")
        };
        let ours: Vec<&str> = SettlementOutcome::ALL.iter().map(|o| o.symbol()).collect();
        assert_eq!(e.symbols, ours);
        for o in SettlementOutcome::ALL {
            assert_eq!(e.symbols[outcome_index(o) as usize], o.symbol());
        }
    }

    #[test]
    fn every_state_kind_is_a_schema_symbol_in_the_same_order() {
        let schemas = schemas().expect("schemas");
        let apache_avro::Schema::Record(record) = &schemas.status.schema else {
            panic!("status schema is not a record")
        };
        let state_field = record
            .fields
            .iter()
            .find(|f| f.name == "state")
            .expect("state field");
        let apache_avro::Schema::Enum(e) = &state_field.schema else {
            panic!("state is not an enum")
        };
        let ours: Vec<&str> = StateKind::ALL.iter().map(|k| k.symbol()).collect();
        assert_eq!(e.symbols, ours);
    }
}
