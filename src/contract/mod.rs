//! The wire contract with client systems: Avro schemas in `schemas/`, single-object framing, and
//! the mapping between Avro values and domain types.
//!
//! Values are built and read field by field rather than through serde, so that every decoding
//! failure names the field and the class of error (for the DLQ headers).

pub mod canonical;
pub mod command;
pub mod framing;
pub mod status;

use std::collections::HashMap;
use std::sync::LazyLock;

use apache_avro::Schema;

/// Why bytes could not be turned into a command. The class is the DLQ `pis.error.class` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {message}")]
pub struct DecodeError {
    pub class: DecodeErrorClass,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecodeErrorClass {
    /// Empty record value.
    Empty,
    /// Larger than the configured maximum.
    Oversized,
    /// Not single-object encoded (wrong marker bytes), or too short for the header.
    BadFraming,
    /// Single-object encoded, but with a writer schema this worker does not know.
    UnknownSchema,
    /// The Avro body could not be read (truncated or corrupt) with the writer schema.
    MalformedAvro,
    /// Valid Avro of a known schema, but not a payment command.
    WrongRecordType,
    /// A payment command whose envelope fields are invalid (ids, key mismatch).
    InvalidEnvelope,
}

impl DecodeErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            DecodeErrorClass::Empty => "EMPTY",
            DecodeErrorClass::Oversized => "OVERSIZED",
            DecodeErrorClass::BadFraming => "BAD_FRAMING",
            DecodeErrorClass::UnknownSchema => "UNKNOWN_SCHEMA",
            DecodeErrorClass::MalformedAvro => "MALFORMED_AVRO",
            DecodeErrorClass::WrongRecordType => "WRONG_RECORD_TYPE",
            DecodeErrorClass::InvalidEnvelope => "INVALID_ENVELOPE",
        }
    }
}

impl std::fmt::Display for DecodeErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a value could not be encoded: a build defect (bad schema) or a value the schema refuses.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("schema unavailable: {0}")]
    Schema(String),
    #[error("avro encoding failed: {0}")]
    Avro(#[from] apache_avro::Error),
}

impl DecodeError {
    pub fn new(class: DecodeErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
        }
    }
}

pub const COMMAND_SCHEMA_JSON: &str = include_str!("../../schemas/payment-command.avsc");
pub const STATUS_SCHEMA_JSON: &str = include_str!("../../schemas/payment-status.avsc");

/// Earlier versions of the schemas: records written with them are still read (by name, with
/// defaults for what they lack). Never remove an entry while such records may exist.
pub const COMMAND_SCHEMA_HISTORY: &[(&str, &str)] = &[(
    "PaymentCommand v1",
    include_str!("../../schemas/history/payment-command.v1.avsc"),
)];
pub const STATUS_SCHEMA_HISTORY: &[(&str, &str)] = &[(
    "PaymentStatusEvent v1",
    include_str!("../../schemas/history/payment-status.v1.avsc"),
)];

/// A schema with its CRC-64-AVRO fingerprint (as the 8 little-endian bytes of single-object
/// encoding).
pub struct KnownSchema {
    pub name: &'static str,
    pub schema: Schema,
    pub fingerprint: [u8; 8],
}

/// The schemas this build writes, and every writer schema it can read.
pub struct Schemas {
    pub command: KnownSchema,
    pub status: KnownSchema,
    /// Every writer schema this build reads: the current ones and the history.
    writers: HashMap<[u8; 8], (SchemaRole, Schema)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SchemaRole {
    Command,
    Status,
}

fn known(name: &'static str, json: &str) -> Result<KnownSchema, String> {
    let schema = Schema::parse_str(json).map_err(|e| format!("schema {name}: {e}"))?;
    let fingerprint = canonical::fingerprint(json).map_err(|e| format!("schema {name}: {e}"))?;
    Ok(KnownSchema {
        name,
        schema,
        fingerprint,
    })
}

impl Schemas {
    fn load() -> Result<Self, String> {
        let command = known("PaymentCommand", COMMAND_SCHEMA_JSON)?;
        let status = known("PaymentStatusEvent", STATUS_SCHEMA_JSON)?;
        let mut writers = HashMap::from([
            (
                command.fingerprint,
                (SchemaRole::Command, command.schema.clone()),
            ),
            (
                status.fingerprint,
                (SchemaRole::Status, status.schema.clone()),
            ),
        ]);
        for (role, history) in [
            (SchemaRole::Command, COMMAND_SCHEMA_HISTORY),
            (SchemaRole::Status, STATUS_SCHEMA_HISTORY),
        ] {
            for (name, json) in history {
                let old = known("history", json).map_err(|e| format!("{name}: {e}"))?;
                writers.entry(old.fingerprint).or_insert((role, old.schema));
            }
        }
        Ok(Self {
            command,
            status,
            writers,
        })
    }

    /// The role and schema of a writer fingerprint, if this build can read it.
    fn writer(&self, fingerprint: &[u8; 8]) -> Option<(SchemaRole, &Schema)> {
        self.writers
            .get(fingerprint)
            .map(|(role, schema)| (*role, schema))
    }
}

static SCHEMAS: LazyLock<Result<Schemas, String>> = LazyLock::new(Schemas::load);

/// The compiled-in schemas. They are checked by tests and at start-up (`schemas()?` in `main`),
/// so an error here is a build defect, reported rather than panicking.
pub fn schemas() -> Result<&'static Schemas, DecodeError> {
    SCHEMAS
        .as_ref()
        .map_err(|e| DecodeError::new(DecodeErrorClass::UnknownSchema, e.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemas_parse_and_have_distinct_fingerprints() {
        let s = schemas().expect("schemas load");
        assert_ne!(s.command.fingerprint, s.status.fingerprint);
    }

    /// The fingerprint fastavro computes for the command schema (checked end to end by
    /// tests/avro_interop.rs); apache-avro 0.21 computes a different one.
    #[test]
    fn command_fingerprint_is_the_standard_one() {
        let s = schemas().expect("schemas load");
        assert_eq!(hex::encode(s.command.fingerprint), "a29859248b354fe4");
    }
}
