//! The `payment-state` changelog: record format and restore.
//!
//! One record per change, JSON (internal format, versioned by `v`), keyed so that compaction
//! keeps the latest of each:
//! - `payment/{payment_id}`: the payment's full state plus the status events this change emits
//!   (the outbox), secrets sealed with the state key;
//! - `psu/{brand}/{psu_id}`: the PSU's PIS token pair at that brand, sealed (Belfius and Banx
//!   are separate token hosts). Records of older versions are keyed `psu/{psu_id}` and name
//!   their brand inside; they are still read;
//! - `outbox-checkpoint/{partition}`: every event in records up to this offset is published;
//! - `restore-marker/{partition}/{owner}`: a new owner's claim on the partition. Unique per
//!   owner, so compaction keeps every claim.
//!
//! Every record but a marker carries its writer's `epoch`: the offset of the writer's own
//! restore marker, in the value and in the `pis.epoch` header (a tombstone has only the
//! header). A record whose epoch is older than a marker read before it was written by an owner
//! that had already been superseded (a zombie), and restore skips it (docs/guarantees.md). The
//! fold over the records is `engine::restore`; this module reads them and encodes them.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::{KafkaEdgeError, KafkaSettings};
use crate::domain::machine::{Millis, Payment, StatusEvent};
use crate::domain::model::{Brand, PaymentId, PsuId};
use crate::secret::{Sealed, StateKey};

const FORMAT_VERSION: u32 = 1;

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
    Unknown,
}

impl RecordKey {
    pub fn parse(key: &str) -> RecordKey {
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
        RecordKey::Unknown
    }
}

pub fn checkpoint_key(partition: i32) -> String {
    format!("outbox-checkpoint/{partition}")
}

pub const RESTORE_MARKER_PREFIX: &str = "restore-marker/";

pub fn restore_marker_key(partition: i32, owner: &str) -> String {
    format!("{RESTORE_MARKER_PREFIX}{partition}/{owner}")
}

/// Epoch of records written before epochs existed: never skipped.
pub const NO_EPOCH: i64 = -1;

fn no_epoch() -> i64 {
    NO_EPOCH
}

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

#[derive(Serialize, Deserialize)]
struct PaymentSecrets {
    pkce_verifier: Option<Sealed>,
    authorization_code: Option<Sealed>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StoredRecord {
    Payment {
        v: u32,
        #[serde(default = "no_epoch")]
        epoch: i64,
        payment: Box<Payment>,
        secrets: PaymentSecrets,
        events: Vec<StatusEvent>,
    },
    Psu {
        v: u32,
        #[serde(default = "no_epoch")]
        epoch: i64,
        psu_id: PsuId,
        brand: Brand,
        access_token: Sealed,
        refresh_token: Option<Sealed>,
        expires_at: Option<Millis>,
        updated_at: Millis,
    },
    OutboxCheckpoint {
        v: u32,
        #[serde(default = "no_epoch")]
        epoch: i64,
        published_through: i64,
    },
    /// Written by a new owner before it restores; reading up to it reads every write that was
    /// acknowledged before it. Carries no state.
    RestoreMarker { v: u32, owner: String },
}

fn codec_error(context: &str, e: impl std::fmt::Display) -> KafkaEdgeError {
    KafkaEdgeError::StateCodec(format!("{context}: {e}"))
}

pub fn encode_payment(
    key: &StateKey,
    epoch: i64,
    payment: &Payment,
    events: &[StatusEvent],
) -> Result<(String, Vec<u8>), KafkaEdgeError> {
    let record_key = payment_key(&payment.payment_id);
    let seal = |s: &Option<SecretString>| -> Result<Option<Sealed>, KafkaEdgeError> {
        s.as_ref()
            .map(|s| key.seal(s, &record_key))
            .transpose()
            .map_err(|e| codec_error("sealing", e))
    };
    let record = StoredRecord::Payment {
        v: FORMAT_VERSION,
        epoch,
        payment: Box::new(payment.clone()),
        secrets: PaymentSecrets {
            pkce_verifier: seal(&payment.pkce_verifier)?,
            authorization_code: seal(&payment.authorization_code)?,
        },
        events: events.to_vec(),
    };
    let bytes = serde_json::to_vec(&record).map_err(|e| codec_error("encoding payment", e))?;
    Ok((record_key, bytes))
}

pub fn encode_psu(
    key: &StateKey,
    epoch: i64,
    tokens: &PsuTokens,
) -> Result<(String, Vec<u8>), KafkaEdgeError> {
    let record_key = psu_key(&TokenKey::new(tokens.brand, tokens.psu_id.clone()));
    let seal = |s: &SecretString| {
        key.seal(s, &record_key)
            .map_err(|e| codec_error("sealing", e))
    };
    let record = StoredRecord::Psu {
        v: FORMAT_VERSION,
        epoch,
        psu_id: tokens.psu_id.clone(),
        brand: tokens.brand,
        access_token: seal(&tokens.access_token)?,
        refresh_token: tokens.refresh_token.as_ref().map(seal).transpose()?,
        expires_at: tokens.expires_at,
        updated_at: tokens.updated_at,
    };
    let bytes = serde_json::to_vec(&record).map_err(|e| codec_error("encoding psu", e))?;
    Ok((record_key, bytes))
}

pub fn encode_checkpoint(
    partition: i32,
    epoch: i64,
    published_through: i64,
) -> Result<(String, Vec<u8>), KafkaEdgeError> {
    let record = StoredRecord::OutboxCheckpoint {
        v: FORMAT_VERSION,
        epoch,
        published_through,
    };
    let bytes = serde_json::to_vec(&record).map_err(|e| codec_error("encoding checkpoint", e))?;
    Ok((checkpoint_key(partition), bytes))
}

/// The marker a new owner writes before restoring (see [`restore`]).
pub fn encode_restore_marker(
    partition: i32,
    owner: &str,
) -> Result<(String, Vec<u8>), KafkaEdgeError> {
    let record = StoredRecord::RestoreMarker {
        v: FORMAT_VERSION,
        owner: owner.to_owned(),
    };
    let bytes = serde_json::to_vec(&record).map_err(|e| codec_error("encoding marker", e))?;
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
}

pub fn decode(
    key: &StateKey,
    record_key: &str,
    bytes: &[u8],
) -> Result<DecodedRecord, KafkaEdgeError> {
    decode_with_epoch(key, record_key, bytes).map(|(record, _)| record)
}

/// Like [`decode`], with the writer's epoch (-1 for a marker or a record older than epochs).
pub fn decode_with_epoch(
    key: &StateKey,
    record_key: &str,
    bytes: &[u8],
) -> Result<(DecodedRecord, i64), KafkaEdgeError> {
    let record: StoredRecord = serde_json::from_slice(bytes)
        .map_err(|e| codec_error(&format!("decoding {record_key}"), e))?;
    let open = |s: &Sealed| {
        key.open(s, record_key)
            .map_err(|e| codec_error(&format!("opening a secret of {record_key}"), e))
    };
    match record {
        StoredRecord::Payment {
            payment,
            secrets,
            events,
            epoch,
            ..
        } => {
            let mut payment = payment;
            payment.pkce_verifier = secrets.pkce_verifier.as_ref().map(open).transpose()?;
            payment.authorization_code =
                secrets.authorization_code.as_ref().map(open).transpose()?;
            Ok((DecodedRecord::Payment { payment, events }, epoch))
        }
        StoredRecord::Psu {
            epoch,
            psu_id,
            brand,
            access_token,
            refresh_token,
            expires_at,
            updated_at,
            ..
        } => Ok((
            DecodedRecord::Psu(PsuTokens {
                psu_id,
                brand,
                access_token: open(&access_token)?,
                refresh_token: refresh_token.as_ref().map(open).transpose()?,
                expires_at,
                updated_at,
            }),
            epoch,
        )),
        StoredRecord::OutboxCheckpoint {
            published_through,
            epoch,
            ..
        } => Ok((DecodedRecord::Checkpoint(published_through), epoch)),
        StoredRecord::RestoreMarker { .. } => Ok((DecodedRecord::RestoreMarker, NO_EPOCH)),
    }
}

/// Reads state partition `partition` from the beginning up to and including the restore marker
/// at `marker_offset`, which the caller wrote and saw acknowledged (blocking), and folds every
/// record into `fold`. Returns the consumer, positioned after the marker, for the fence's tail.
/// Gives up early (an error) once `stop` is set: the partition was revoked meanwhile.
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
) -> Result<BaseConsumer, KafkaEdgeError> {
    let started = Instant::now();
    let topic = &settings.topics.state;
    let consumer: BaseConsumer = settings
        .client_config()
        .set("group.id", format!("{}-restore", settings.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // The same consumer then tails the partition for the fence: answer fetches quickly.
        .set("fetch.wait.max.ms", "20")
        .create()
        .map_err(|e| KafkaEdgeError::kafka("creating restore consumer", e))?;
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, partition, Offset::Beginning)
        .map_err(|e| KafkaEdgeError::kafka("building restore assignment", e))?;
    consumer
        .assign(&assignment)
        .map_err(|e| KafkaEdgeError::kafka(format!("assigning {topic}/{partition}"), e))?;
    let mut next = 0;
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
        let Some(result) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        // Consumer errors here are librdkafka's reports of a broker going away or a leader
        // moving (a broker restart): it reconnects by itself, so keep reading until the
        // timeout instead of giving the partition up.
        let message = match result {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(%topic, partition, next, error = %e, "restore read failed; retrying");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        let offset = message.offset();
        next = offset + 1;
        fold.apply(
            offset,
            message.key(),
            message.payload(),
            super::fence::epoch_header(&message),
        );
    }
    Ok(consumer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::machine::{Input, Outcome, Policy, decide};
    use crate::domain::model::{Amount, CommandId, Language, PaymentOrder, PaymentProduct};
    use secrecy::ExposeSecret;

    fn key() -> StateKey {
        StateKey::from_hex(&StateKey::generate_hex()).expect("key")
    }

    fn order() -> PaymentOrder {
        PaymentOrder {
            product: PaymentProduct::SepaCreditTransfers,
            brand: Brand::Belfius,
            amount: Amount::from_minor(1234),
            currency: "EUR".into(),
            creditor_name: "Alice".into(),
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

    #[test]
    fn payment_record_round_trips_with_sealed_secrets() {
        let k = key();
        let id = PaymentId::new("p-1");
        let Outcome::Changed(t) = decide(
            &id,
            None,
            Input::Initiate {
                command_id: CommandId::new("c-1"),
                psu_id: PsuId::new("u-1"),
                order: order().into(),
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
                pkce_verifier: SecretString::from("the-verifier"),
                sca_state: "state-1".into(),
            },
            2,
            &Policy::default(),
        ) else {
            panic!("not changed")
        };
        let (record_key, bytes) = encode_payment(&k, 7, &t2.payment, &t2.events).expect("encode");
        assert_eq!(record_key, "payment/p-1");
        assert!(!String::from_utf8_lossy(&bytes).contains("the-verifier"));
        let DecodedRecord::Payment { payment, events } =
            decode(&k, &record_key, &bytes).expect("decode")
        else {
            panic!("wrong record")
        };
        assert_eq!(payment.state, t2.payment.state);
        assert_eq!(payment.sequence, 2);
        assert_eq!(events, t2.events);
        assert_eq!(
            payment
                .pkce_verifier
                .as_ref()
                .map(|v| v.expose_secret().to_owned()),
            Some("the-verifier".into())
        );
        // A record moved under another key does not open.
        assert!(decode(&k, "payment/p-2", &bytes).is_err());
    }

    #[test]
    fn psu_and_checkpoint_records_round_trip() {
        let k = key();
        let tokens = PsuTokens {
            psu_id: PsuId::new("u-1"),
            brand: Brand::Banx,
            access_token: SecretString::from("at"),
            refresh_token: Some(SecretString::from("rt")),
            expires_at: Some(99),
            updated_at: 5,
        };
        let (record_key, bytes) = encode_psu(&k, 7, &tokens).expect("encode");
        assert!(!String::from_utf8_lossy(&bytes).contains("\"at\""));
        let DecodedRecord::Psu(back) = decode(&k, &record_key, &bytes).expect("decode") else {
            panic!("wrong record")
        };
        assert_eq!(back.access_token.expose_secret(), "at");
        assert_eq!(back.brand, Brand::Banx);
        let (record_key, bytes) = encode_checkpoint(3, 7, 41).expect("encode");
        assert_eq!(record_key, "outbox-checkpoint/3");
        assert!(matches!(
            decode(&k, &record_key, &bytes).expect("decode"),
            DecodedRecord::Checkpoint(41)
        ));
    }
}
