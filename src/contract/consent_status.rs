//! Consent status events (`schemas/consent-status.avsc`) to and from Avro bytes. They go to a
//! topic of their own (`pis.consent-status`, key `psu_id`): with a schema registry and
//! TopicNameStrategy a topic's subject holds one record type, so they cannot share the payment
//! status topic.

use apache_avro::types::Value;

use super::command::{Fields, opt_string};
use super::framing::{frame, frame_confluent};
use super::{DecodeError, DecodeErrorClass, EncodeError, SchemaRole, schemas};
use crate::domain::consent::{ConsentEvent, ConsentScope, ConsentState};
use crate::domain::machine::Millis;
use crate::domain::model::Brand;

/// A consent status event as read back from the topic (by `watch`, tests, or any client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentStatusRecord {
    pub event_id: String,
    pub consent_id: String,
    pub psu_id: String,
    pub brand: Brand,
    pub scope: ConsentScope,
    pub account_iban: Option<String>,
    pub sequence: i64,
    /// Never `Requested`: that state is not published.
    pub state: ConsentState,
    pub is_final: bool,
    pub consent_uri: Option<String>,
    pub valid_until: Option<Millis>,
    pub reason_code: Option<String>,
    pub reason_message: Option<String>,
    pub causation_id: Option<String>,
    pub occurred_at: Millis,
}

/// The published states, in the schema's symbol order. `Requested` is internal: a consent is
/// first published `Pending`, with its URI.
const PUBLISHED_STATES: [ConsentState; 4] = [
    ConsentState::Pending,
    ConsentState::Granted,
    ConsentState::Refused,
    ConsentState::Expired,
];

/// The state's index among the schema's symbols, `None` for a state that is never published.
fn state_index(state: ConsentState) -> Option<u32> {
    match state {
        ConsentState::Requested => None,
        ConsentState::Pending => Some(0),
        ConsentState::Granted => Some(1),
        ConsentState::Refused => Some(2),
        ConsentState::Expired => Some(3),
    }
}

fn brand_index(brand: Brand) -> u32 {
    match brand {
        Brand::Belfius => 0,
        Brand::Banx => 1,
    }
}

fn scope_index(scope: ConsentScope) -> u32 {
    match scope {
        ConsentScope::Ais => 0,
        ConsentScope::Caf => 1,
    }
}

/// Encodes a consent event: with Confluent framing (the registered consent status schema's id)
/// when a schema registry is configured, single-object framing otherwise. A `Requested` event
/// is refused: the machine never emits one, and the schema has no such state.
pub fn encode(event: &ConsentEvent) -> Result<Vec<u8>, EncodeError> {
    let schemas = schemas().map_err(|e| EncodeError::Schema(e.message))?;
    let state = state_index(event.state).ok_or_else(|| {
        EncodeError::NotPublished(format!(
            "consent {} is {}: that state is internal, never published",
            event.consent_id,
            event.state.symbol()
        ))
    })?;
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
    let valid_until = match event.valid_until {
        Some(at) => Value::Union(1, Box::new(Value::TimestampMillis(at))),
        None => Value::Union(0, Box::new(Value::Null)),
    };
    let value = Value::Record(vec![
        ("event_id".into(), Value::Uuid(event.event_id())),
        (
            "consent_id".into(),
            Value::String(event.consent_id.to_string()),
        ),
        ("psu_id".into(), Value::String(event.psu_id.to_string())),
        (
            "brand".into(),
            Value::Enum(brand_index(event.brand), event.brand.as_str().into()),
        ),
        (
            "scope".into(),
            Value::Enum(scope_index(event.scope), event.scope.symbol().into()),
        ),
        (
            "account_iban".into(),
            opt_string(event.account_iban.as_deref()),
        ),
        ("sequence".into(), Value::Long(event.sequence as i64)),
        (
            "state".into(),
            Value::Enum(state, event.state.symbol().into()),
        ),
        ("is_final".into(), Value::Boolean(event.state.is_final())),
        (
            "consent_uri".into(),
            opt_string(event.consent_uri.as_deref()),
        ),
        ("valid_until".into(), valid_until),
        ("reason".into(), reason),
        ("causation_id".into(), opt_string(Some(&event.causation_id))),
        (
            "occurred_at".into(),
            Value::TimestampMillis(event.occurred_at),
        ),
    ]);
    let datum = apache_avro::to_avro_datum(&schemas.consent_status.schema, value)?;
    Ok(match super::registry::consent_status_schema_id() {
        Some(id) => frame_confluent(id, &datum),
        None => frame(&schemas.consent_status.fingerprint, &datum),
    })
}

fn unknown(what: &str, symbol: &str) -> DecodeError {
    DecodeError::new(
        DecodeErrorClass::MalformedAvro,
        format!("unknown {what} {symbol} (a newer writer's symbol?)"),
    )
}

/// Decodes a consent status event in single-object encoding or (with a registry configured in
/// this process) Confluent framing. Asks the registry once: a status reader must not hang.
pub fn decode(bytes: &[u8]) -> Result<ConsentStatusRecord, DecodeError> {
    let value =
        super::status::read_event(bytes, SchemaRole::ConsentStatus, "a consent status event")?;
    let mut f = Fields::of(value, "ConsentStatus")?;
    let brand_symbol = f.string("brand")?;
    let brand = Brand::parse(&brand_symbol).ok_or_else(|| unknown("brand", &brand_symbol))?;
    let scope_symbol = f.string("scope")?;
    let scope =
        ConsentScope::parse(&scope_symbol).ok_or_else(|| unknown("scope", &scope_symbol))?;
    let state_symbol = f.string("state")?;
    let state = PUBLISHED_STATES
        .into_iter()
        .find(|s| s.symbol() == state_symbol)
        .ok_or_else(|| unknown("state", &state_symbol))?;
    let (reason_code, reason_message) = super::status::read_reason(&mut f)?;
    Ok(ConsentStatusRecord {
        event_id: f.string("event_id")?,
        consent_id: f.string("consent_id")?,
        psu_id: f.string("psu_id")?,
        brand,
        scope,
        account_iban: f.opt_string("account_iban")?,
        sequence: f.long("sequence")?,
        state,
        is_final: f.boolean("is_final")?,
        consent_uri: f.opt_string("consent_uri")?,
        valid_until: f.opt_millis("valid_until")?,
        reason_code,
        reason_message,
        causation_id: f.opt_string("causation_id")?,
        occurred_at: f.millis("occurred_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::model::{ConsentId, PsuId};
    use crate::domain::reason::{Reason, ReasonCode};

    fn event(state: ConsentState) -> ConsentEvent {
        ConsentEvent {
            consent_id: ConsentId::new("consent-1"),
            psu_id: PsuId::new("psu-1"),
            brand: Brand::Banx,
            scope: ConsentScope::Caf,
            account_iban: Some("BE68539007547034".into()),
            sequence: 2,
            state,
            consent_uri: None,
            valid_until: None,
            reason: None,
            causation_id: "bank".into(),
            occurred_at: 1_700_000_000_000,
        }
    }

    #[test]
    fn a_pending_event_round_trips_with_its_consent_uri() {
        let pending = ConsentEvent {
            sequence: 1,
            consent_uri: Some("https://bank.example/consent?state=s".into()),
            causation_id: "c-1".into(),
            ..event(ConsentState::Pending)
        };
        let bytes = encode(&pending).expect("encode");
        assert_eq!(&bytes[..2], &[0xC3, 0x01]);
        assert_eq!(
            &bytes[2..10],
            &schemas().expect("schemas").consent_status.fingerprint
        );
        let record = decode(&bytes).expect("decode");
        assert_eq!(
            record,
            ConsentStatusRecord {
                event_id: pending.event_id().to_string(),
                consent_id: "consent-1".into(),
                psu_id: "psu-1".into(),
                brand: Brand::Banx,
                scope: ConsentScope::Caf,
                account_iban: Some("BE68539007547034".into()),
                sequence: 1,
                state: ConsentState::Pending,
                is_final: false,
                consent_uri: Some("https://bank.example/consent?state=s".into()),
                valid_until: None,
                reason_code: None,
                reason_message: None,
                causation_id: Some("c-1".into()),
                occurred_at: 1_700_000_000_000,
            }
        );
    }

    #[test]
    fn granted_refused_and_expired_round_trip() {
        let granted = ConsentEvent {
            scope: ConsentScope::Ais,
            brand: Brand::Belfius,
            account_iban: None,
            valid_until: Some(1_790_000_000_000),
            ..event(ConsentState::Granted)
        };
        let record = decode(&encode(&granted).expect("encode")).expect("decode");
        assert_eq!(record.state, ConsentState::Granted);
        assert!(!record.is_final);
        assert_eq!(record.valid_until, Some(1_790_000_000_000));
        assert_eq!(
            (record.brand, record.scope),
            (Brand::Belfius, ConsentScope::Ais)
        );
        assert_eq!(record.account_iban, None);
        for (state, code) in [
            (ConsentState::Refused, ReasonCode::ScaFailed),
            (ConsentState::Expired, ReasonCode::ConsentSuperseded),
        ] {
            let ended = ConsentEvent {
                reason: Some(Reason::new(code, "why")),
                sequence: 3,
                ..event(state)
            };
            let record = decode(&encode(&ended).expect("encode")).expect("decode");
            assert_eq!(record.state, state);
            assert!(record.is_final, "{state:?}");
            assert_eq!(record.sequence, 3);
            assert_eq!(record.reason_code.as_deref(), Some(code.as_str()));
            assert_eq!(record.reason_message.as_deref(), Some("why"));
        }
    }

    #[test]
    fn a_requested_event_is_refused_not_published() {
        let result = encode(&event(ConsentState::Requested));
        assert!(
            matches!(&result, Err(EncodeError::NotPublished(m)) if m.contains("REQUESTED")),
            "{result:?}"
        );
    }

    /// The schema's symbols are the domain's, in the same order (what `state_index`,
    /// `brand_index` and `scope_index` encode).
    #[test]
    fn the_schemas_symbols_are_the_domains() {
        let schema = &schemas().expect("schemas").consent_status.schema;
        let apache_avro::Schema::Record(record) = schema else {
            panic!("not a record")
        };
        let symbols = |name: &str| -> Vec<String> {
            let field = record
                .fields
                .iter()
                .find(|f| f.name == name)
                .unwrap_or_else(|| panic!("no field {name}"));
            let apache_avro::Schema::Enum(e) = &field.schema else {
                panic!("{name} is not an enum")
            };
            e.symbols.clone()
        };
        let published: Vec<&str> = ConsentState::ALL
            .into_iter()
            .filter(|s| state_index(*s).is_some())
            .map(ConsentState::symbol)
            .collect();
        assert_eq!(symbols("state"), published);
        for state in ConsentState::ALL {
            if let Some(i) = state_index(state) {
                assert_eq!(symbols("state")[i as usize], state.symbol());
            }
        }
        for brand in Brand::ALL {
            assert_eq!(
                symbols("brand")[brand_index(brand) as usize],
                brand.as_str()
            );
        }
        assert_eq!(symbols("brand").len(), Brand::ALL.len());
        for scope in ConsentScope::ALL {
            assert_eq!(
                symbols("scope")[scope_index(scope) as usize],
                scope.symbol()
            );
        }
        assert_eq!(symbols("scope").len(), ConsentScope::ALL.len());
    }

    #[test]
    fn other_records_and_damaged_bytes_are_refused() {
        let good = encode(&event(ConsentState::Granted)).expect("encode");
        let class = |b: &[u8]| decode(b).map(|_| ()).map_err(|e| e.class);
        assert_eq!(
            class(&good[..good.len() - 1]),
            Err(DecodeErrorClass::MalformedAvro)
        );
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(class(&trailing), Err(DecodeErrorClass::MalformedAvro));
        let status = crate::contract::status::encode(&crate::domain::machine::StatusEvent {
            payment_id: crate::domain::model::PaymentId::new("p-1"),
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
        assert_eq!(class(&status), Err(DecodeErrorClass::WrongRecordType));
        // And a consent event is not a payment status event.
        assert_eq!(
            crate::contract::status::decode(&good)
                .map(|_| ())
                .map_err(|e| e.class),
            Err(DecodeErrorClass::WrongRecordType)
        );
    }
}
