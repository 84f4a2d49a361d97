//! The `payment-state` changelog: record format and restore.
//!
//! One record per change, keyed so that compaction keeps the latest of each:
//! - `payment/{payment_id}`: the payment's full state plus the status events this change emits
//!   (the outbox); once the payment is final and past the retention horizon, a compact *retired*
//!   record instead ([`Retired`]: enough to refuse a command for that id), and after the second
//!   horizon a tombstone;
//! - `psu/{brand}/{psu_id}`: the PSU's PIS token pair at that brand (Belfius and Banx are
//!   separate token hosts). Records of older versions are keyed `psu/{psu_id}` and name their
//!   brand inside; they are still read;
//! - `outbox-checkpoint/{partition}`: every event in records up to this offset is published;
//! - `restore-marker/{partition}/{owner}`: a new owner's claim on the partition. Unique per
//!   owner, so compaction keeps every claim until an owner deletes the ones no restore reads
//!   any more (a tombstone under a marker key is no claim);
//! - `snapshot/{partition}`: the begin and the end of a snapshot, in which the owner re-writes
//!   every live entity. A restore starts at the begin of the newest complete snapshot, which the
//!   owner records as the committed offset of the restore consumer group ([`SnapshotStart`];
//!   docs/architecture.md, "Snapshots").
//!
//! Formats (docs/architecture.md, "State record format"):
//! - format 3 ([`v3`], written unless `PIS_STATE_FORMAT=2`): format 2's storage types and
//!   envelope (version byte 3) with a binary (postcard) body;
//! - format 2 ([`v2`]): the record's own storage types (`v2::Stored*`, never the
//!   domain types), as JSON, sealed whole with XChaCha20-Poly1305 under the current key of the
//!   [`StateKeyRing`] in a binary envelope `"PISR" | 2 | key id | epoch | nonce | ciphertext`.
//!   The associated data is the record key and the writer's epoch (and the rest of the
//!   header), so a record that is altered, copied under another key, or replayed under another
//!   `pis.epoch` header does not decode ([`StateRecordError::class`] says which);
//! - format 1 ([`v1`], read only, during migration): JSON with only the secrets sealed;
//! - restore markers: unsealed JSON `{"type":"restore_marker","v":2,"owner":...}`. They carry
//!   no state: restore and the fence tail count a marker by its key alone, before and without
//!   any key (the fence reads them with no key ring at all), and a forged marker can do no more
//!   than any writer to the topic can (fence the current owner, which then restarts).
//!
//! Every record but a marker carries its writer's `epoch`: the offset of the writer's own
//! restore marker, in the sealed envelope and in the `pis.epoch` header (a tombstone has only
//! the header). A record whose epoch is older than a marker read before it was written by an
//! owner that had already been superseded (a zombie), and restore skips it
//! (docs/guarantees.md). The fold over the records is `engine::restore`; this module reads them
//! and encodes them.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::{KafkaEdgeError, KafkaSettings};
use crate::domain::consent::ConsentEvent;
use crate::domain::machine::{Millis, Payment, StateKind, StatusEvent};
use crate::domain::model::{Brand, PaymentId, PsuId};
use crate::secret::{StateFormat, StateKeyRing};

pub mod consent;
pub mod v1;
pub mod v2;
pub mod v3;

#[cfg(test)]
mod fixture_tests;

pub fn payment_key(payment_id: &PaymentId) -> String {
    format!("payment/{payment_id}")
}

/// Which PIS token pair: one per brand (token host) and PSU.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenKey {
    pub brand: Brand,
    pub psu_id: PsuId,
}

impl TokenKey {
    pub fn new(brand: Brand, psu_id: PsuId) -> Self {
        Self { brand, psu_id }
    }
}

impl std::fmt::Display for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.brand.as_str(), self.psu_id)
    }
}

pub fn psu_key(key: &TokenKey) -> String {
    format!("psu/{}/{}", key.brand.as_str(), key.psu_id)
}

/// What a state record's key names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordKey {
    Payment(PaymentId),
    Tokens(TokenKey),
    /// `psu/{psu_id}`, written before pairs were kept per brand: the brand is in the value.
    LegacyTokens(PsuId),
    Checkpoint,
    RestoreMarker,
    Snapshot,
    Consent(consent::ConsentKey),
    Unknown,
}

impl RecordKey {
    pub fn parse(key: &str) -> RecordKey {
        if key.starts_with(consent::PREFIX) {
            return match consent::ConsentKey::parse(key) {
                Some(k) => RecordKey::Consent(k),
                None => RecordKey::Unknown,
            };
        }
        if let Some(id) = key.strip_prefix("payment/") {
            return RecordKey::Payment(PaymentId::new(id));
        }
        if let Some(rest) = key.strip_prefix("psu/") {
            let brand = rest
                .split_once('/')
                .and_then(|(brand, psu)| Some((Brand::parse(brand)?, psu)));
            return match brand {
                Some((brand, psu)) => RecordKey::Tokens(TokenKey::new(brand, PsuId::new(psu))),
                None => RecordKey::LegacyTokens(PsuId::new(rest)),
            };
        }
        if key.starts_with("outbox-checkpoint/") {
            return RecordKey::Checkpoint;
        }
        if key.starts_with(RESTORE_MARKER_PREFIX) {
            return RecordKey::RestoreMarker;
        }
        if key.starts_with(SNAPSHOT_PREFIX) {
            return RecordKey::Snapshot;
        }
        RecordKey::Unknown
    }
}

pub fn checkpoint_key(partition: i32) -> String {
    format!("outbox-checkpoint/{partition}")
}

pub const RESTORE_MARKER_PREFIX: &str = "restore-marker/";

pub const SNAPSHOT_PREFIX: &str = "snapshot/";

/// The key of snapshots' end records (compaction keeps the latest).
pub fn snapshot_key(partition: i32) -> String {
    format!("{SNAPSHOT_PREFIX}{partition}")
}

/// The key of one snapshot's begin record: unique, like a claim's.
pub fn snapshot_begin_key(partition: i32, epoch: i64, seq: u64) -> String {
    format!("{SNAPSHOT_PREFIX}{partition}/{epoch}/{seq}")
}

pub fn restore_marker_key(partition: i32, owner: &str) -> String {
    format!("{RESTORE_MARKER_PREFIX}{partition}/{owner}")
}

/// Epoch of records written before epochs existed: never skipped.
pub const NO_EPOCH: i64 = -1;

/// A PSU's PIS token pair (Belfius keeps one pair per scope).
#[derive(Clone)]
pub struct PsuTokens {
    pub psu_id: PsuId,
    pub brand: Brand,
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    pub expires_at: Option<Millis>,
    pub updated_at: Millis,
}

impl std::fmt::Debug for PsuTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PsuTokens")
            .field("psu_id", &self.psu_id)
            .field("brand", &self.brand)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// What is kept of a final payment once it left memory (the retention horizon): enough to
/// refuse any later command for its id, until the retired-ids horizon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retired {
    pub payment_id: PaymentId,
    pub psu_id: PsuId,
    pub final_state: StateKind,
    /// The sequence of its last status event.
    pub last_sequence: u64,
    /// The offset of the last command it took: a re-delivery of it is no new command.
    pub last_command_offset: Option<i64>,
    /// When it reached its final state.
    pub final_at: Millis,
    pub retired_at: Millis,
}

impl Retired {
    /// The retired entry of a final payment.
    pub fn of(payment: &Payment, now: Millis) -> Self {
        Retired {
            payment_id: payment.payment_id.clone(),
            psu_id: payment.psu_id.clone(),
            final_state: payment.state.kind(),
            last_sequence: payment.sequence,
            last_command_offset: payment.last_command_offset,
            final_at: payment.updated_at,
            retired_at: now,
        }
    }
}

/// Why a state record does not decode. Restore quarantines such a record (`engine::restore`);
/// [`StateRecordError::class`] is the short class shown by `pis-worker state quarantined`.
/// Messages never contain record contents.
#[derive(Debug, thiserror::Error)]
pub enum StateRecordError {
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("unknown record format version {0}")]
    UnknownVersion(u8),
    #[error(
        "sealed with key id {0:?}, which is not in the key ring (add it to the previous keys: PIS_STATE_KEYS_PREVIOUS)"
    )]
    UnknownKey(String),
    #[error(
        "does not authenticate under key {key_id}: altered, copied from another record key, or sealed with another key of that id"
    )]
    Unauthentic { key_id: String },
    #[error(
        "sealed for epoch {sealed} but carries pis.epoch header {header}: replayed under another header"
    )]
    EpochMismatch { sealed: i64, header: i64 },
    #[error("a secret of this format 1 record does not open with any key of the ring")]
    V1SecretUnopened,
    #[error(
        "format 1 (unsealed) record refused: the migration to format 2 was declared finished (PIS_STATE_ACCEPT_V1=false)"
    )]
    V1Refused,
    #[error("record body does not convert: {0}")]
    Body(String),
    #[error("encoding: {0}")]
    Encode(String),
}

impl StateRecordError {
    /// A short, stable class name (for operators and metrics).
    pub fn class(&self) -> &'static str {
        match self {
            StateRecordError::Malformed(_) => "malformed",
            StateRecordError::UnknownVersion(_) => "unknown-version",
            StateRecordError::UnknownKey(_) => "unknown-key",
            StateRecordError::Unauthentic { .. } => "unauthentic",
            StateRecordError::EpochMismatch { .. } => "epoch-mismatch",
            StateRecordError::V1SecretUnopened => "unauthentic",
            StateRecordError::V1Refused => "v1-refused",
            StateRecordError::Body(_) => "invalid-body",
            StateRecordError::Encode(_) => "encode",
        }
    }
}

impl From<StateRecordError> for KafkaEdgeError {
    fn from(e: StateRecordError) -> Self {
        KafkaEdgeError::StateCodec(e.to_string())
    }
}

/// A JSON error without the text it was parsing (which may hold personal data or secrets).
pub(crate) fn json_error(e: &serde_json::Error) -> String {
    let class = match e.classify() {
        serde_json::error::Category::Io => "i/o error",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "unexpected data",
        serde_json::error::Category::Eof => "truncated",
    };
    format!("{class} at line {} column {}", e.line(), e.column())
}

/// Seals a body in the ring's write format.
fn seal(
    ring: &StateKeyRing,
    record_key: &str,
    epoch: i64,
    body: v2::Body,
) -> Result<Vec<u8>, StateRecordError> {
    match ring.write_format() {
        StateFormat::V2 => v2::seal(ring, record_key, epoch, &body),
        StateFormat::V3 => v3::seal(ring, record_key, epoch, body),
    }
}

pub fn encode_payment(
    ring: &StateKeyRing,
    epoch: i64,
    payment: &Payment,
    events: &[StatusEvent],
) -> Result<(String, Vec<u8>), KafkaEdgeError> {
    let record_key = payment_key(&payment.payment_id);
    let body = v2::payment_body(payment, events);
    let bytes = seal(ring, &record_key, epoch, body)?;
    Ok((record_key, bytes))
}

pub fn encode_retired(
    ring: &StateKeyRing,
    epoch: i64,
    retired: &Retired,
) -> Result<(String, Vec<u8>), KafkaEdgeError> {
    let record_key = payment_key(&retired.payment_id);
    let bytes = seal(ring, &record_key, epoch, v2::Body::Retired(retired.into()))?;
    Ok((record_key, bytes))
}

pub fn encode_psu(
    ring: &StateKeyRing,
    epoch: i64,
    tokens: &PsuTokens,
) -> Result<(String, Vec<u8>), KafkaEdgeError> {
    let record_key = psu_key(&TokenKey::new(tokens.brand, tokens.psu_id.clone()));
    let bytes = seal(ring, &record_key, epoch, v2::Body::Psu(tokens.into()))?;
    Ok((record_key, bytes))
}

pub fn encode_consent(
    ring: &StateKeyRing,
    epoch: i64,
    record: &consent::ConsentRecord,
    events: &[ConsentEvent],
) -> Result<(String, Vec<u8>), KafkaEdgeError> {
    let record_key = consent::ConsentKey::of(&record.consent).record_key();
    let body = v2::Body::Consent(Box::new(consent::StoredConsent::of(record, events)));
    let bytes = seal(ring, &record_key, epoch, body)?;
    Ok((record_key, bytes))
}

pub fn encode_checkpoint(
    ring: &StateKeyRing,
    partition: i32,
    epoch: i64,
    published_through: i64,
) -> Result<(String, Vec<u8>), KafkaEdgeError> {
    let record_key = checkpoint_key(partition);
    let body = v2::Body::OutboxCheckpoint { published_through };
    let bytes = seal(ring, &record_key, epoch, body)?;
    Ok((record_key, bytes))
}

/// The begin (`end_of: None`, under a key of its own: compaction must keep it while restores
/// start there) or the end (`end_of: Some((begin, entities))`, under [`snapshot_key`]) of a
/// snapshot; `at` is when it began.
pub fn encode_snapshot(
    ring: &StateKeyRing,
    record_key: &str,
    epoch: i64,
    end_of: Option<(i64, u64)>,
    at: Millis,
) -> Result<Vec<u8>, KafkaEdgeError> {
    let body = match end_of {
        None => v2::Body::SnapshotBegin { at },
        Some((begin, entities)) => v2::Body::SnapshotEnd { begin, entities },
    };
    Ok(seal(ring, record_key, epoch, body)?)
}

/// A copy of a record that could not be read (see [`v2::Body::QuarantinedCopy`]).
pub fn encode_quarantined_copy(
    ring: &StateKeyRing,
    record_key: &str,
    epoch: i64,
    original: &QuarantinedRecord,
) -> Result<Vec<u8>, KafkaEdgeError> {
    let body = v2::Body::QuarantinedCopy {
        offset: original.offset,
        epoch_header: original.epoch_header,
        value_hex: hex::encode(&original.value),
    };
    Ok(seal(ring, record_key, epoch, body)?)
}

/// A state record as read, kept because it could not be decoded. No `Debug`: the value may be
/// a format 1 record with personal data in the clear.
#[derive(Clone, PartialEq, Eq)]
pub struct QuarantinedRecord {
    /// Where it was first written.
    pub offset: i64,
    pub epoch_header: Option<i64>,
    pub value: Vec<u8>,
}

impl std::fmt::Debug for QuarantinedRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuarantinedRecord")
            .field("offset", &self.offset)
            .field("epoch_header", &self.epoch_header)
            .field("value_len", &self.value.len())
            .finish()
    }
}

/// A restore marker as written: unsealed (see the module doc).
#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum MarkerRecord {
    RestoreMarker { v: u32, owner: String },
}

/// The marker a new owner writes before restoring (see [`read_partition`]).
pub fn encode_restore_marker(
    partition: i32,
    owner: &str,
) -> Result<(String, Vec<u8>), KafkaEdgeError> {
    let record = MarkerRecord::RestoreMarker {
        v: u32::from(v2::VERSION),
        owner: owner.to_owned(),
    };
    let bytes = serde_json::to_vec(&record)
        .map_err(|e| KafkaEdgeError::StateCodec(format!("encoding marker: {e}")))?;
    Ok((restore_marker_key(partition, owner), bytes))
}

pub enum DecodedRecord {
    Payment {
        payment: Box<Payment>,
        events: Vec<StatusEvent>,
    },
    Psu(PsuTokens),
    Checkpoint(i64),
    RestoreMarker,
    /// A final payment past the retention horizon (under its `payment/{id}` key).
    Retired(Retired),
    /// A snapshot's begin (`end_of: None`, begun `at`) or end (`end_of: Some(begin)`).
    Snapshot {
        end_of: Option<i64>,
        at: Option<Millis>,
    },
    /// A record that could not be read, copied into a snapshot: to be decoded again.
    QuarantinedCopy(QuarantinedRecord),
    Consent {
        record: Box<consent::ConsentRecord>,
        events: Vec<ConsentEvent>,
    },
}

/// How a decoded record was protected.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Sealing {
    /// Format 2, sealed with the key of this id.
    Sealed { key_id: String },
    /// Format 1: body in the clear (its secrets sealed with the key of this id, if it had any).
    V1 { secrets_key_id: Option<String> },
    /// A restore marker: never sealed.
    Marker,
}

impl std::fmt::Display for Sealing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sealing::Sealed { key_id } => write!(f, "v2 key {key_id}"),
            Sealing::V1 { .. } => f.write_str("v1 (unsealed)"),
            Sealing::Marker => f.write_str("marker"),
        }
    }
}

/// A record as decoded, with its writer's epoch and how it was sealed.
pub struct Decoded {
    pub record: DecodedRecord,
    /// The writer's epoch ([`NO_EPOCH`] for a marker or a record older than epochs).
    pub epoch: i64,
    pub sealing: Sealing,
}

pub fn decode(
    ring: &StateKeyRing,
    record_key: &str,
    bytes: &[u8],
) -> Result<DecodedRecord, StateRecordError> {
    decode_record(ring, record_key, bytes, None).map(|d| d.record)
}

/// Like [`decode`], with the writer's epoch; `epoch_header` is the record's `pis.epoch`
/// header, which must equal the sealed epoch when present.
pub fn decode_with_epoch(
    ring: &StateKeyRing,
    record_key: &str,
    bytes: &[u8],
    epoch_header: Option<i64>,
) -> Result<(DecodedRecord, i64), StateRecordError> {
    decode_record(ring, record_key, bytes, epoch_header).map(|d| (d.record, d.epoch))
}

/// Decodes a record of any format restore reads.
pub fn decode_record(
    ring: &StateKeyRing,
    record_key: &str,
    bytes: &[u8],
    epoch_header: Option<i64>,
) -> Result<Decoded, StateRecordError> {
    if v2::is_envelope(bytes) {
        let (body, epoch, key_id) = v2::open(ring, record_key, bytes, epoch_header)?;
        let record = match body {
            v2::Body::Payment { payment, events } => DecodedRecord::Payment {
                payment: Box::new(
                    (*payment)
                        .try_into()
                        .map_err(|e| StateRecordError::Body(format!("payment: {e}")))?,
                ),
                events: events.into_iter().map(Into::into).collect(),
            },
            v2::Body::PaymentExt {
                payment,
                events,
                ext,
            } => {
                let mut payment: Payment = (*payment)
                    .try_into()
                    .map_err(|e| StateRecordError::Body(format!("payment: {e}")))?;
                ext.apply(&mut payment);
                DecodedRecord::Payment {
                    payment: Box::new(payment),
                    events: events.into_iter().map(Into::into).collect(),
                }
            }
            v2::Body::PaymentSettled {
                payment,
                events,
                ext,
                settlement,
            } => {
                let mut payment: Payment = (*payment)
                    .try_into()
                    .map_err(|e| StateRecordError::Body(format!("payment: {e}")))?;
                ext.apply(&mut payment);
                let mut events: Vec<StatusEvent> = events.into_iter().map(Into::into).collect();
                if let Some(settled) = events.iter_mut().find(|e| e.state == StateKind::Settled) {
                    settled.settlement = Some(settlement.into());
                }
                DecodedRecord::Payment {
                    payment: Box::new(payment),
                    events,
                }
            }
            v2::Body::Psu(tokens) => DecodedRecord::Psu(tokens.into()),
            v2::Body::Consent(stored) => {
                let (record, events) = stored.open();
                DecodedRecord::Consent {
                    record: Box::new(record),
                    events,
                }
            }
            v2::Body::Retired(retired) => DecodedRecord::Retired(retired.into()),
            v2::Body::OutboxCheckpoint { published_through } => {
                DecodedRecord::Checkpoint(published_through)
            }
            v2::Body::SnapshotBegin { at } => DecodedRecord::Snapshot {
                end_of: None,
                at: Some(at),
            },
            v2::Body::SnapshotEnd { begin, .. } => DecodedRecord::Snapshot {
                end_of: Some(begin),
                at: None,
            },
            v2::Body::QuarantinedCopy {
                offset,
                epoch_header,
                value_hex,
            } => DecodedRecord::QuarantinedCopy(QuarantinedRecord {
                offset,
                epoch_header,
                value: hex::decode(value_hex).map_err(|_| {
                    StateRecordError::Body("quarantined copy: the value is not hex".into())
                })?,
            }),
        };
        return Ok(Decoded {
            record,
            epoch,
            sealing: Sealing::Sealed { key_id },
        });
    }
    #[derive(Deserialize)]
    struct Peek {
        #[serde(rename = "type")]
        kind: Option<String>,
        v: Option<u32>,
    }
    let peek: Peek = serde_json::from_slice(bytes).map_err(|e| {
        StateRecordError::Malformed(format!("neither sealed nor JSON: {}", json_error(&e)))
    })?;
    if peek.kind.as_deref() == Some("restore_marker") {
        return Ok(Decoded {
            record: DecodedRecord::RestoreMarker,
            epoch: NO_EPOCH,
            sealing: Sealing::Marker,
        });
    }
    match peek.v {
        Some(1) if ring.accepts_v1() => {
            let (record, epoch, secrets_key_id) = v1::decode(ring, record_key, bytes)?;
            Ok(Decoded {
                record,
                epoch,
                sealing: Sealing::V1 { secrets_key_id },
            })
        }
        Some(1) => Err(StateRecordError::V1Refused),
        Some(v) => Err(StateRecordError::UnknownVersion(
            u8::try_from(v).unwrap_or(u8::MAX),
        )),
        None => Err(StateRecordError::Malformed(
            "a JSON record without a version".into(),
        )),
    }
}

/// Where a restore starts: the begin of the newest complete snapshot. Its owner records the
/// begin's offset as the committed offset of the restore consumer group (`{group}-restore`)
/// once the fence confirmed the snapshot's end (no newer claim before it) and every event of
/// the records before the begin was published, so a restore from there misses nothing
/// (docs/architecture.md, "Snapshots"). The rest is read from the begin record itself (not
/// from commit metadata, which Tansu does not keep).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotStart {
    pub begin: i64,
    /// The epoch of the owner that wrote it: no claim lies between its marker and the
    /// snapshot's end, so a restore from `begin` starts with this as its epoch floor.
    pub epoch: i64,
    /// When the snapshot began (milliseconds since the Unix epoch).
    pub at: Millis,
}

/// Why a restore reads from where it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreFrom {
    Snapshot(SnapshotStart),
    /// No usable snapshot: from the partition's first record. The reason is for the log.
    Beginning {
        why: String,
    },
}

fn restore_group(settings: &KafkaSettings) -> String {
    format!("{}-restore", settings.group_id)
}

fn restore_consumer(settings: &KafkaSettings) -> Result<BaseConsumer, KafkaEdgeError> {
    settings
        .consumer_config(super::STATE_QUEUED_KBYTES)
        .set("group.id", restore_group(settings))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A snapshot whose records the broker no longer has is an error, never a silent jump
        // to the end of the partition.
        .set("auto.offset.reset", "error")
        // The same consumer then tails the partition for the fence: answer fetches quickly.
        .set("fetch.wait.max.ms", "20")
        .create()
        .map_err(|e| KafkaEdgeError::kafka("creating restore consumer", e))
}

/// The begin offset of the newest snapshot recorded for `partition`, if any (blocking).
pub fn committed_snapshot(
    settings: &KafkaSettings,
    consumer: &BaseConsumer,
    partition: i32,
    timeout: Duration,
) -> Result<Option<i64>, KafkaEdgeError> {
    let topic = &settings.topics.state;
    let mut wanted = TopicPartitionList::new();
    wanted.add_partition(topic, partition);
    let committed = consumer.committed_offsets(wanted, timeout).map_err(|e| {
        KafkaEdgeError::kafka(format!("reading the snapshot of {topic}/{partition}"), e)
    })?;
    Ok(committed
        .find_partition(topic, partition)
        .and_then(|elem| match elem.offset() {
            Offset::Offset(begin) => Some(begin),
            _ => None,
        }))
}

/// Records `begin` as where the next restore of `partition` starts (blocking). Returns `false`
/// (and commits nothing) when a newer snapshot is already recorded: a paused owner's late
/// commit must not move restores back.
pub fn commit_snapshot(
    settings: &KafkaSettings,
    partition: i32,
    begin: i64,
    timeout: Duration,
) -> Result<bool, KafkaEdgeError> {
    let consumer = restore_consumer(settings)?;
    if committed_snapshot(settings, &consumer, partition, timeout)?.is_some_and(|c| c > begin) {
        return Ok(false);
    }
    let topic = &settings.topics.state;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(begin))
        .map_err(|e| KafkaEdgeError::kafka("building the snapshot commit", e))?;
    consumer
        .commit(&tpl, rdkafka::consumer::CommitMode::Sync)
        .map_err(|e| {
            KafkaEdgeError::kafka(format!("committing the snapshot of {topic}/{partition}"), e)
        })?;
    Ok(true)
}

/// Records folded at once during a restore (`RestoreFold::apply_batch`).
const RESTORE_BATCH: usize = 1000;

/// Reads state partition `partition` up to and including the restore marker at
/// `marker_offset`, which the caller wrote and saw acknowledged (blocking), and folds every
/// record into `fold`: from the begin of the newest committed snapshot, or from the first
/// record when there is none. Returns where it started and the consumer, positioned after the
/// marker, for the fence's tail. Gives up early (an error) once `stop` is set: the partition
/// was revoked meanwhile.
///
/// The end is the caller's own marker, not the high watermark: Tansu 0.6 reports a high
/// watermark that counts produce batches, not records (a 3-record batch moved it by 1), and a
/// marker also orders the restore after every write the previous owner had acknowledged.
pub fn read_partition(
    settings: &KafkaSettings,
    partition: i32,
    marker_offset: i64,
    timeout: Duration,
    stop: &std::sync::atomic::AtomicBool,
    fold: &mut crate::engine::restore::RestoreFold<'_>,
) -> Result<(RestoreFrom, BaseConsumer), KafkaEdgeError> {
    let started = Instant::now();
    let topic = &settings.topics.state;
    let consumer = restore_consumer(settings)?;
    // A group coordinator that does not answer (a broker restarting) must not hold the
    // restore for its whole timeout: after a while, read everything instead.
    let committed = committed_snapshot(
        settings,
        &consumer,
        partition,
        timeout.min(Duration::from_secs(30)),
    );
    let (mut from, mut next) = match committed {
        Ok(Some(begin)) if begin < marker_offset => (None, begin),
        Ok(Some(begin)) => (
            Some(format!(
                "the recorded snapshot begins at {begin}, after this owner's claim at {marker_offset} (a re-created topic?)"
            )),
            0,
        ),
        Ok(None) => (Some("no snapshot recorded yet".to_owned()), 0),
        Err(e) => (
            Some(format!("the recorded snapshot could not be read: {e}")),
            0,
        ),
    };
    let assign = |first: i64| -> Result<(), KafkaEdgeError> {
        let mut assignment = TopicPartitionList::new();
        let offset = if first == 0 {
            Offset::Beginning
        } else {
            Offset::Offset(first)
        };
        assignment
            .add_partition_offset(topic, partition, offset)
            .map_err(|e| KafkaEdgeError::kafka("building restore assignment", e))?;
        consumer
            .assign(&assignment)
            .map_err(|e| KafkaEdgeError::kafka(format!("assigning {topic}/{partition}"), e))
    };
    assign(next)?;
    let mut at_snapshot = from.is_none();
    // Records are folded in batches: `apply_batch` decodes a batch on every core (decoding
    // is most of a record's cost, docs/benchmarks.md "Restore throughput"). A batch is what
    // the consumer already holds, up to `RESTORE_BATCH`: it never waits to fill one.
    let mut batch: Vec<rdkafka::message::BorrowedMessage<'_>> = Vec::with_capacity(RESTORE_BATCH);
    while next <= marker_offset {
        if stop.load(std::sync::atomic::Ordering::Acquire) {
            return Err(KafkaEdgeError::Setup(format!(
                "restore of {topic}/{partition} stopped at offset {next}: the partition was revoked"
            )));
        }
        if started.elapsed() > timeout {
            return Err(KafkaEdgeError::Setup(format!(
                "restore of {topic}/{partition} timed out at offset {next}, marker at {marker_offset}"
            )));
        }
        batch.clear();
        let mut failed = None;
        while batch.len() < RESTORE_BATCH && next <= marker_offset {
            let wait = if batch.is_empty() {
                Duration::from_millis(200)
            } else {
                Duration::ZERO
            };
            let Some(result) = consumer.poll(wait) else {
                break;
            };
            let message = match result {
                Ok(message) => message,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            let offset = message.offset();
            if at_snapshot {
                at_snapshot = false;
                let epoch = super::fence::epoch_header(&message);
                if let Err(why) =
                    fold.start_at(next, offset, message.key(), message.payload(), epoch)
                {
                    // Never guess: read everything instead. (The batch is empty: this is
                    // the first record read.)
                    from = Some(why);
                    fold.reset();
                    next = 0;
                    assign(0)?;
                    break;
                }
            }
            next = offset + 1;
            batch.push(message);
        }
        let records: Vec<crate::engine::restore::RawRecord<'_>> = batch
            .iter()
            .map(|message| crate::engine::restore::RawRecord {
                offset: message.offset(),
                key: message.key(),
                value: message.payload(),
                epoch_header: super::fence::epoch_header(message),
            })
            .collect();
        fold.apply_batch(&records);
        drop(records);
        match failed {
            None => {}
            // The snapshot's first records are gone (time-based retention shorter than the
            // snapshot's age): reading on from elsewhere would miss live payments.
            Some(rdkafka::error::KafkaError::MessageConsumption(
                rdkafka::types::RDKafkaErrorCode::AutoOffsetReset
                | rdkafka::types::RDKafkaErrorCode::OffsetOutOfRange,
            )) => {
                return Err(KafkaEdgeError::Setup(format!(
                    "restore of {topic}/{partition}: the broker no longer has offset {next}, where the newest snapshot begins; \
                     the state topic's retention is shorter than the snapshots' age (docs/runbooks.md, \"Snapshot too old\")"
                )));
            }
            // Other consumer errors here are librdkafka's reports of a broker going away or a
            // leader moving (a broker restart): it reconnects by itself, so keep reading until
            // the timeout instead of giving the partition up.
            Some(e) => {
                tracing::warn!(%topic, partition, next, error = %e, "restore read failed; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    drop(batch);
    let from = match from {
        None => fold.snapshot().map_or_else(
            || RestoreFrom::Beginning {
                why: "no snapshot".into(),
            },
            RestoreFrom::Snapshot,
        ),
        Some(why) => RestoreFrom::Beginning { why },
    };
    Ok((from, consumer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::machine::{Input, Outcome, Policy, decide};
    use crate::domain::model::{Amount, CommandId, Language, PaymentOrder, PaymentProduct};
    use crate::secret::StateKey;
    use secrecy::ExposeSecret;

    fn key(id: &str) -> StateKey {
        let hex = StateKey::generate_hex();
        StateKey::parse(&SecretString::from(format!("{id}:{}", hex.expose_secret()))).expect("key")
    }

    fn ring() -> StateKeyRing {
        StateKeyRing::generate()
    }

    fn order() -> PaymentOrder {
        PaymentOrder {
            product: PaymentProduct::SepaCreditTransfers,
            brand: Brand::Belfius,
            amount: Amount::from_minor(987_654),
            currency: "EUR".into(),
            creditor_name: "Alice Creditor".into(),
            creditor_iban: "BE68539007547034".into(),
            creditor_bic: None,
            debtor_iban: None,
            end_to_end_id: "E2E-1".into(),
            remittance_information: None,
            requested_execution_date: None,
            language: Language::Fr,
            redirect_uri: "https://c.example/cb".into(),
            cross_border: None,
        }
    }

    fn sca_pending_payment() -> (Payment, Vec<StatusEvent>) {
        let id = PaymentId::new("p-1");
        let Outcome::Changed(t) = decide(
            &id,
            None,
            Input::Initiate {
                command_id: CommandId::new("c-1"),
                psu_id: PsuId::new("u-1"),
                order: order().into(),
                always_pkce: false,
            },
            1,
            &Policy::default(),
        ) else {
            panic!("not changed")
        };
        let Outcome::Changed(t2) = decide(
            &id,
            Some(&t.payment),
            Input::BeginInitiation {
                pkce_verifier: Some(SecretString::from("the-verifier")),
                sca_state: "state-1".into(),
            },
            2,
            &Policy::default(),
        ) else {
            panic!("not changed")
        };
        (t2.payment, t2.events)
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn payment_record_round_trips_sealed_with_xchacha() {
        for (format, magic) in [
            (StateFormat::V2, b"PISR\x02"),
            (StateFormat::V3, b"PISR\x03"),
        ] {
            let k = ring().with_write_format(format);
            let (p, events) = sca_pending_payment();
            let (record_key, bytes) = encode_payment(&k, 7, &p, &events).expect("encode");
            assert_eq!(record_key, "payment/p-1");
            assert!(bytes.starts_with(magic));
            let decoded = decode_record(&k, &record_key, &bytes, Some(7)).expect("decode");
            assert_eq!(decoded.epoch, 7);
            assert_eq!(
                decoded.sealing,
                Sealing::Sealed {
                    key_id: k.current().id().to_string()
                }
            );
            let DecodedRecord::Payment {
                payment,
                events: back,
            } = decoded.record
            else {
                panic!("wrong record")
            };
            assert_eq!(payment.state, p.state);
            assert_eq!(payment.sequence, 2);
            assert_eq!(payment.order, p.order);
            assert_eq!(back, events);
            assert_eq!(
                payment
                    .pkce_verifier
                    .as_ref()
                    .map(|v| v.expose_secret().to_owned()),
                Some("the-verifier".into())
            );
        }
    }

    #[test]
    fn nothing_of_the_plaintext_appears_in_the_encoded_bytes() {
        let k = ring();
        let (p, events) = sca_pending_payment();
        let (_, bytes) = encode_payment(&k, 7, &p, &events).expect("encode");
        for needle in [
            "BE68539007547034",
            "Alice Creditor",
            "987654",
            "the-verifier",
            "SEPA_CREDIT_TRANSFERS",
            "state-1",
            "u-1",
        ] {
            assert!(!contains(&bytes, needle.as_bytes()), "{needle} is visible");
        }
        let tokens = PsuTokens {
            psu_id: PsuId::new("u-1"),
            brand: Brand::Banx,
            access_token: SecretString::from("access-token-value"),
            refresh_token: Some(SecretString::from("refresh-token-value")),
            expires_at: Some(99),
            updated_at: 5,
        };
        let (_, bytes) = encode_psu(&k, 7, &tokens).expect("encode");
        assert!(!contains(&bytes, b"access-token-value"));
        assert!(!contains(&bytes, b"refresh-token-value"));
        assert!(!contains(&bytes, b"BANX"));
    }

    #[test]
    fn psu_and_checkpoint_records_round_trip() {
        let k = ring();
        let tokens = PsuTokens {
            psu_id: PsuId::new("u-1"),
            brand: Brand::Banx,
            access_token: SecretString::from("at"),
            refresh_token: Some(SecretString::from("rt")),
            expires_at: Some(99),
            updated_at: 5,
        };
        let (record_key, bytes) = encode_psu(&k, 7, &tokens).expect("encode");
        let DecodedRecord::Psu(back) = decode(&k, &record_key, &bytes).expect("decode") else {
            panic!("wrong record")
        };
        assert_eq!(back.access_token.expose_secret(), "at");
        assert_eq!(
            back.refresh_token.as_ref().map(|t| t.expose_secret()),
            Some("rt")
        );
        assert_eq!(back.brand, Brand::Banx);
        assert_eq!((back.expires_at, back.updated_at), (Some(99), 5));
        let (record_key, bytes) = encode_checkpoint(&k, 3, 7, 41).expect("encode");
        assert_eq!(record_key, "outbox-checkpoint/3");
        assert!(matches!(
            decode_with_epoch(&k, &record_key, &bytes, Some(7)).expect("decode"),
            (DecodedRecord::Checkpoint(41), 7)
        ));
    }

    #[test]
    fn a_record_sealed_with_an_old_key_opens_through_the_ring() {
        let (p, events) = sca_pending_payment();
        // Rings built from configuration, as a rotation configures them.
        let old_hex = StateKey::generate_hex();
        let new_hex = StateKey::generate_hex();
        let old_cfg = SecretString::from(format!("old:{}", old_hex.expose_secret()));
        let new_cfg = SecretString::from(format!("new:{}", new_hex.expose_secret()));
        let before = StateKeyRing::from_config(&old_cfg, None).expect("ring");
        let after = StateKeyRing::from_config(&new_cfg, Some(&old_cfg)).expect("ring");
        let new_only = StateKeyRing::from_config(&new_cfg, None).expect("ring");
        let (record_key, sealed_old) = encode_payment(&before, 3, &p, &events).expect("encode");
        let opened = decode_record(&after, &record_key, &sealed_old, Some(3)).expect("opens");
        assert_eq!(
            opened.sealing,
            Sealing::Sealed {
                key_id: "old".into()
            }
        );
        // New writes are sealed with the new key, which the old-only ring cannot open.
        let (_, sealed_new) = encode_payment(&after, 4, &p, &events).expect("encode");
        assert!(decode(&new_only, &record_key, &sealed_new).is_ok());
        let err = decode(&before, &record_key, &sealed_new)
            .err()
            .expect("fails");
        assert_eq!(err.class(), "unknown-key");
    }

    #[test]
    fn an_unknown_key_id_gives_a_clear_error() {
        let (p, events) = sca_pending_payment();
        let (record_key, bytes) =
            encode_payment(&StateKeyRing::single(key("gone")), 3, &p, &events).expect("encode");
        let err = decode(&StateKeyRing::single(key("other")), &record_key, &bytes)
            .err()
            .expect("fails");
        assert!(matches!(&err, StateRecordError::UnknownKey(id) if id == "gone"));
        assert_eq!(err.class(), "unknown-key");
        assert!(err.to_string().contains("\"gone\""));
    }

    #[test]
    fn a_bit_flip_anywhere_is_detected() {
        let k = ring();
        let (p, events) = sca_pending_payment();
        let (record_key, bytes) = encode_payment(&k, 7, &p, &events).expect("encode");
        let id_len = k.current().id().as_str().len();
        // Past the magic, version and key id (which change the error, not the outcome).
        for at in [
            6 + id_len,
            6 + id_len + 8,
            6 + id_len + 8 + 24,
            bytes.len() - 1,
        ] {
            let mut tampered = bytes.clone();
            tampered[at] ^= 0x01;
            let err = decode(&k, &record_key, &tampered).err().expect("detected");
            assert_eq!(err.class(), "unauthentic", "flip at {at}: {err}");
        }
        let mut tampered = bytes.clone();
        tampered[4] = 9;
        assert_eq!(
            decode(&k, &record_key, &tampered).err().map(|e| e.class()),
            Some("unknown-version")
        );
        assert_eq!(
            decode(&k, &record_key, &bytes[..20])
                .err()
                .map(|e| e.class()),
            Some("malformed")
        );
    }

    #[test]
    fn a_record_copied_under_another_key_is_detected() {
        let k = ring();
        let (p, events) = sca_pending_payment();
        let (_, bytes) = encode_payment(&k, 7, &p, &events).expect("encode");
        let err = decode(&k, "payment/p-2", &bytes).err().expect("detected");
        assert_eq!(err.class(), "unauthentic");
    }

    #[test]
    fn a_record_under_another_epoch_header_is_detected() {
        let k = ring();
        let (p, events) = sca_pending_payment();
        let (record_key, bytes) = encode_payment(&k, 7, &p, &events).expect("encode");
        let err = decode_with_epoch(&k, &record_key, &bytes, Some(9))
            .err()
            .expect("detected");
        assert!(matches!(
            err,
            StateRecordError::EpochMismatch {
                sealed: 7,
                header: 9
            }
        ));
        assert_eq!(err.class(), "epoch-mismatch");
        // Rewriting the clear epoch to match the header breaks the seal instead.
        let id_len = k.current().id().as_str().len();
        let mut forged = bytes.clone();
        forged[6 + id_len..6 + id_len + 8].copy_from_slice(&9i64.to_be_bytes());
        let err = decode_with_epoch(&k, &record_key, &forged, Some(9))
            .err()
            .expect("detected");
        assert_eq!(err.class(), "unauthentic");
    }

    #[test]
    fn format_1_records_are_read_during_migration_only() {
        let k = ring();
        let (p, events) = sca_pending_payment();
        let (record_key, bytes) = v1::write::payment(k.current(), 7, &p, &events);
        let decoded = decode_record(&k, &record_key, &bytes, Some(7)).expect("v1 reads");
        assert_eq!(
            decoded.sealing,
            Sealing::V1 {
                secrets_key_id: Some(k.current().id().to_string())
            }
        );
        let DecodedRecord::Payment { payment, .. } = decoded.record else {
            panic!("wrong record")
        };
        assert_eq!(
            payment.pkce_verifier.as_ref().map(|v| v.expose_secret()),
            Some("the-verifier")
        );
        let done = StateKeyRing::generate().with_accept_v1(false);
        let err = decode(&done, &record_key, &bytes).err().expect("refused");
        assert_eq!(err.class(), "v1-refused");
        // A format 1 secret moved under another record key does not open.
        let err = decode(&k, "payment/p-2", &bytes).err().expect("fails");
        assert_eq!(err.class(), "unauthentic");
    }

    #[test]
    fn markers_stay_unsealed_and_decode_without_a_key() {
        let (record_key, bytes) = encode_restore_marker(2, "owner-1").expect("marker");
        assert!(bytes.starts_with(b"{"));
        assert!(matches!(
            decode(&ring(), &record_key, &bytes).expect("decode"),
            DecodedRecord::RestoreMarker
        ));
    }

    #[test]
    fn errors_and_debug_output_hold_no_record_contents() {
        let k = ring();
        let (p, events) = sca_pending_payment();
        let (_, bytes) = encode_payment(&k, 7, &p, &events).expect("encode");
        let err = decode(&k, "payment/p-2", &bytes).err().expect("fails");
        assert!(!err.to_string().contains("BE68"));
        let garbage = br#"{"type":"payment","v":1,"payment":{"payment_id":"BE68539007547034"}}"#;
        let err = decode(&k, "payment/p-1", garbage).err().expect("fails");
        assert!(!err.to_string().contains("BE68"), "{err}");
        let body = v2::StoredPsuTokens {
            psu_id: "u".into(),
            brand: v2::StoredBrand::Banx,
            access_token: (&SecretString::from("tok-secret")).into(),
            refresh_token: None,
            expires_at: None,
            updated_at: 0,
        };
        assert!(!format!("{body:?}").contains("tok-secret"));
    }
}
