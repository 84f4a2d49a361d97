//! The wire contract with client systems: Avro schemas in `schemas/`, single-object framing, and
//! the mapping between Avro values and domain types.
//!
//! Values are built and read field by field rather than through serde, so that every decoding
//! failure names the field and the class of error (for the DLQ headers).

pub mod binary;
pub mod canonical;
pub mod command;
pub mod compat;
pub mod consent_status;
pub mod framing;
pub mod registry;
pub mod status;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, LazyLock, RwLock};

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
    /// A command on a partition its key does not hash to (a producer using another
    /// partitioner): it would miss its PSU's owner.
    WrongPartition,
    /// The schema registry did not answer (down, 5xx, timeout). Transient: the worker waits
    /// and retries; such a record is never dead-lettered.
    RegistryUnavailable,
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
            DecodeErrorClass::WrongPartition => "WRONG_PARTITION",
            DecodeErrorClass::RegistryUnavailable => "REGISTRY_UNAVAILABLE",
        }
    }

    /// Every class, for documentation checks.
    pub const ALL: [DecodeErrorClass; 9] = [
        DecodeErrorClass::Empty,
        DecodeErrorClass::Oversized,
        DecodeErrorClass::BadFraming,
        DecodeErrorClass::UnknownSchema,
        DecodeErrorClass::MalformedAvro,
        DecodeErrorClass::WrongRecordType,
        DecodeErrorClass::InvalidEnvelope,
        DecodeErrorClass::WrongPartition,
        DecodeErrorClass::RegistryUnavailable,
    ];

    /// Whether the cause may go away by itself (retry), rather than being in the record.
    pub fn is_transient(self) -> bool {
        matches!(self, DecodeErrorClass::RegistryUnavailable)
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
    /// A value the contract never carries (e.g. a consent's internal `REQUESTED` state).
    #[error("not published: {0}")]
    NotPublished(String),
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
pub const CONSENT_STATUS_SCHEMA_JSON: &str = include_str!("../../schemas/consent-status.avsc");

/// Earlier versions of the schemas: records written with them are still read (by name, with
/// defaults for what they lack). Never remove an entry while such records may exist.
pub const COMMAND_SCHEMA_HISTORY: &[(&str, &str)] = &[
    (
        "PaymentCommand v1",
        include_str!("../../schemas/history/payment-command.v1.avsc"),
    ),
    (
        "PaymentCommand v2",
        include_str!("../../schemas/history/payment-command.v2.avsc"),
    ),
    (
        "PaymentCommand v3",
        include_str!("../../schemas/history/payment-command.v3.avsc"),
    ),
    (
        "PaymentCommand v4",
        include_str!("../../schemas/history/payment-command.v4.avsc"),
    ),
];
pub const STATUS_SCHEMA_HISTORY: &[(&str, &str)] = &[
    (
        "PaymentStatusEvent v1",
        include_str!("../../schemas/history/payment-status.v1.avsc"),
    ),
    (
        "PaymentStatusEvent v2",
        include_str!("../../schemas/history/payment-status.v2.avsc"),
    ),
];
/// The consent status schema has one version so far (the current one).
pub const CONSENT_STATUS_SCHEMA_HISTORY: &[(&str, &str)] = &[];

/// A schema with its CRC-64-AVRO fingerprint (as the 8 little-endian bytes of single-object
/// encoding).
pub struct KnownSchema {
    pub name: &'static str,
    pub schema: Schema,
    pub fingerprint: [u8; 8],
}

/// What a writer schema writes: commands, payment status events or consent status events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaRole {
    Command,
    Status,
    ConsentStatus,
}

/// Full names of the root records, which tell a writer schema's role.
pub const COMMAND_RECORD: &str = "be.pisworker.v1.PaymentCommand";
pub const STATUS_RECORD: &str = "be.pisworker.v1.PaymentStatusEvent";
pub const CONSENT_STATUS_RECORD: &str = "be.pisworker.v1.ConsentStatus";

/// A writer schema this process can read records of.
#[derive(Debug)]
pub struct WriterSchema {
    pub role: SchemaRole,
    pub schema: Schema,
    /// Where it came from (`built-in`, `schemas/history`, a file, `registry id 7`), for logs.
    pub origin: String,
}

/// The schemas this build writes, and every writer schema it can read.
pub struct Schemas {
    pub command: KnownSchema,
    pub status: KnownSchema,
    pub consent_status: KnownSchema,
    /// Every writer schema this build reads: the current ones and the history.
    writers: HashMap<[u8; 8], Arc<WriterSchema>>,
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
        let consent_status = known("ConsentStatus", CONSENT_STATUS_SCHEMA_JSON)?;
        let writer = |role, schema: &Schema, origin: &str| {
            Arc::new(WriterSchema {
                role,
                schema: schema.clone(),
                origin: origin.to_owned(),
            })
        };
        let mut writers = HashMap::from([
            (
                command.fingerprint,
                writer(SchemaRole::Command, &command.schema, "built-in"),
            ),
            (
                status.fingerprint,
                writer(SchemaRole::Status, &status.schema, "built-in"),
            ),
            (
                consent_status.fingerprint,
                writer(
                    SchemaRole::ConsentStatus,
                    &consent_status.schema,
                    "built-in",
                ),
            ),
        ]);
        for (role, history) in [
            (SchemaRole::Command, COMMAND_SCHEMA_HISTORY),
            (SchemaRole::Status, STATUS_SCHEMA_HISTORY),
            (SchemaRole::ConsentStatus, CONSENT_STATUS_SCHEMA_HISTORY),
        ] {
            for (name, json) in history {
                let old = known("history", json).map_err(|e| format!("{name}: {e}"))?;
                writers
                    .entry(old.fingerprint)
                    .or_insert_with(|| writer(role, &old.schema, name));
            }
        }
        Ok(Self {
            command,
            status,
            consent_status,
            writers,
        })
    }

    /// The writer schema of a single-object fingerprint, if this process can read it: built in,
    /// or accepted at start-up from the writer-schemas directory.
    pub fn writer(&self, fingerprint: &[u8; 8]) -> Option<Arc<WriterSchema>> {
        if let Some(known) = self.writers.get(fingerprint) {
            return Some(known.clone());
        }
        extra_writers().get(fingerprint).cloned()
    }

    /// The reader schema JSON of a role.
    pub fn reader_json(role: SchemaRole) -> &'static str {
        match role {
            SchemaRole::Command => COMMAND_SCHEMA_JSON,
            SchemaRole::Status => STATUS_SCHEMA_JSON,
            SchemaRole::ConsentStatus => CONSENT_STATUS_SCHEMA_JSON,
        }
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

/// Writer schemas accepted at run time (single-object fingerprints), beside the built-in ones.
static EXTRA_WRITERS: LazyLock<RwLock<HashMap<[u8; 8], Arc<WriterSchema>>>> =
    LazyLock::new(|| RwLock::new(HashMap::new()));

fn extra_writers() -> std::sync::RwLockReadGuard<'static, HashMap<[u8; 8], Arc<WriterSchema>>> {
    // A poisoned lock only means a panic elsewhere; the map is always consistent.
    EXTRA_WRITERS.read().unwrap_or_else(|p| p.into_inner())
}

/// Checks that this build can read records written with `json` and returns its role and parsed
/// form. A writer may add fields (with or without defaults: the reader ignores them), enum
/// symbols and union branches (a record that uses one is refused on its own); it may not remove
/// a field the reader needs nor change a type.
pub fn readable_writer(json: &str, origin: &str) -> Result<WriterSchema, String> {
    let parsed = compat::Parsed::parse(json).map_err(|e| format!("{origin}: {e}"))?;
    let role = match parsed.root_name() {
        Some(COMMAND_RECORD) => SchemaRole::Command,
        Some(STATUS_RECORD) => SchemaRole::Status,
        Some(CONSENT_STATUS_RECORD) => SchemaRole::ConsentStatus,
        other => {
            return Err(format!(
                "{origin}: the root type is {}, not {COMMAND_RECORD}, {STATUS_RECORD} or {CONSENT_STATUS_RECORD}",
                other.unwrap_or("unnamed")
            ));
        }
    };
    let reader = compat::Parsed::parse(Schemas::reader_json(role))
        .map_err(|e| format!("reader schema: {e}"))?;
    let blocking: Vec<String> = compat::can_read(&reader, &parsed)
        .into_iter()
        .filter(|p| !p.is_addition())
        .map(|p| p.to_string())
        .collect();
    if !blocking.is_empty() {
        return Err(format!(
            "{origin}: records written with it cannot be read: {}",
            blocking.join("; ")
        ));
    }
    let schema = Schema::parse_str(json).map_err(|e| format!("{origin}: {e}"))?;
    Ok(WriterSchema {
        role,
        schema,
        origin: origin.to_owned(),
    })
}

/// Accepts one more single-object writer schema (see [`readable_writer`]); returns its role and
/// fingerprint.
pub fn accept_writer_schema(json: &str, origin: &str) -> Result<(SchemaRole, [u8; 8]), String> {
    let writer = readable_writer(json, origin)?;
    let fingerprint = canonical::fingerprint(json).map_err(|e| format!("{origin}: {e}"))?;
    let role = writer.role;
    EXTRA_WRITERS
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(fingerprint, Arc::new(writer));
    Ok((role, fingerprint))
}

/// Loads every `*.avsc` of `dir` as an accepted writer schema (sorted by name). Any file that is
/// not a readable command, status or consent status schema is an error: a configuration fault to fix before the
/// worker starts, not a reason to dead-letter the records later.
pub fn load_writer_schemas(dir: &Path) -> Result<Vec<(String, SchemaRole, [u8; 8])>, String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "avsc"))
        .collect();
    files.sort();
    let mut accepted = Vec::new();
    for path in files {
        let origin = path.display().to_string();
        let json = std::fs::read_to_string(&path).map_err(|e| format!("{origin}: {e}"))?;
        let (role, fingerprint) = accept_writer_schema(&json, &origin)?;
        accepted.push((origin, role, fingerprint));
    }
    Ok(accepted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemas_parse_and_have_distinct_fingerprints() {
        let s = schemas().expect("schemas load");
        assert_ne!(s.command.fingerprint, s.status.fingerprint);
        assert_ne!(s.command.fingerprint, s.consent_status.fingerprint);
        assert_ne!(s.status.fingerprint, s.consent_status.fingerprint);
        for (known, role) in [
            (&s.command, SchemaRole::Command),
            (&s.status, SchemaRole::Status),
            (&s.consent_status, SchemaRole::ConsentStatus),
        ] {
            let writer = s.writer(&known.fingerprint).expect("readable");
            assert_eq!(writer.role, role, "{}", known.name);
        }
    }

    /// The consent machine's dead-letter classes, as `consent::step` produces them: each one
    /// driven here, so the list the docs are checked against is the machine's.
    #[test]
    fn the_consent_machine_dead_letters_with_the_listed_classes() {
        use crate::domain::consent::{
            Consent, ConsentInput, ConsentOutcome, ConsentPolicy, ConsentRefusal, ConsentRequest,
            ConsentScope, ConsentState, DEAD_LETTER_CLASSES, step,
        };
        use crate::domain::model::{Brand, CommandId, ConsentId, Language, PsuId};
        use secrecy::SecretString;
        let policy = ConsentPolicy::default();
        let request = |command: &str, consent: &str| ConsentInput::Request {
            command_id: CommandId::new(command),
            consent_id: ConsentId::new(consent),
            psu_id: PsuId::new("psu-1"),
            request: ConsentRequest {
                brand: Brand::Belfius,
                scope: ConsentScope::Ais,
                account_iban: None,
                language: Language::Fr,
                redirect_uri: "https://c.example/consent".into(),
            },
            pkce_verifier: SecretString::from("verifier".to_owned()),
            sca_state: "st-1".into(),
        };
        let complete = |command: &str, state: &str| ConsentInput::Complete {
            command_id: CommandId::new(command),
            outcome: ConsentOutcome::Code(SecretString::from("code".to_owned())),
            state: Some(state.into()),
        };
        let class = |current: Option<&Consent>, input| match step(current, input, &policy, 10) {
            Err(ConsentRefusal::DeadLetter { class, .. }) => class,
            other => panic!("not a dead letter: {:?}", other.map(|t| t.consent.state)),
        };
        let requested = step(None, request("c-1", "consent-1"), &policy, 1)
            .expect("requested")
            .consent;
        let pending = step(
            Some(&requested),
            ConsentInput::UriReceived {
                consent_uri: "https://bank.example/consent".into(),
            },
            &policy,
            2,
        )
        .expect("pending")
        .consent;
        assert_eq!(pending.state, ConsentState::Pending);
        let produced = [
            class(Some(&pending), request("c-2", "consent-1")),
            class(None, complete("c-3", "st-1")),
            class(Some(&pending), complete("c-4", "forged")),
            class(Some(&requested), complete("c-5", "st-1")),
        ];
        assert_eq!(produced, DEAD_LETTER_CLASSES);
    }

    /// docs/contract.md lists every class a DLQ record can carry, and nothing else: the decode
    /// classes (but the transient one, which is never dead-lettered) and the machine's
    /// refusal codes.
    #[test]
    fn the_contract_documents_exactly_the_dead_letter_classes() {
        use crate::domain::machine::RefusalCode;
        // Exhaustive: a new refusal code does not compile until it is listed here.
        let refusal = |code: RefusalCode| match code {
            RefusalCode::UnknownPayment
            | RefusalCode::PsuMismatch
            | RefusalCode::DuplicatePaymentId
            | RefusalCode::AlreadyFinal
            | RefusalCode::NotAwaitingSca
            | RefusalCode::CancelNotPossible
            | RefusalCode::StateMismatch
            | RefusalCode::ResolutionNotApplicable
            | RefusalCode::CodeRequired => code.as_str(),
        };
        let mut ours: Vec<&str> = DecodeErrorClass::ALL
            .iter()
            .filter(|c| !c.is_transient())
            .map(|c| c.as_str())
            .collect();
        ours.extend(
            [
                RefusalCode::UnknownPayment,
                RefusalCode::PsuMismatch,
                RefusalCode::DuplicatePaymentId,
                RefusalCode::AlreadyFinal,
                RefusalCode::NotAwaitingSca,
                RefusalCode::CancelNotPossible,
                RefusalCode::StateMismatch,
                RefusalCode::ResolutionNotApplicable,
                RefusalCode::CodeRequired,
            ]
            .map(refusal),
        );
        // Classes of the owner's own: a command for a quarantined payment, for a retired id.
        ours.push(crate::engine::core::QUARANTINED);
        ours.push(crate::engine::core::PAYMENT_RETIRED);
        ours.push(crate::engine::ingest::INVALID_CONSENT_REQUEST);
        // The consent machine's refusals; STATE_MISMATCH is shared with the payment machine.
        ours.extend(crate::domain::consent::DEAD_LETTER_CLASSES);
        ours.sort_unstable();
        ours.dedup();
        let doc = include_str!("../../docs/contract.md");
        let mut documented: Vec<String> =
            crate::domain::reason::tests::table_codes(doc, "Dead-letter classes")
                .into_iter()
                .map(|(code, _)| code)
                .collect();
        documented.sort_unstable();
        assert_eq!(documented, ours);
    }

    /// The fingerprints fastavro computes for the schemas (checked end to end by
    /// tests/avro_interop.rs); apache-avro 0.21 computes a different one.
    #[test]
    fn command_fingerprint_is_the_standard_one() {
        let s = schemas().expect("schemas load");
        assert_eq!(hex::encode(s.command.fingerprint), "ca507973291f7c23");
        assert_eq!(hex::encode(s.status.fingerprint), "e4859835cf44f8e0");
        assert_eq!(
            hex::encode(s.consent_status.fingerprint),
            "e2f9efb765dd8b6c"
        );
    }
}
