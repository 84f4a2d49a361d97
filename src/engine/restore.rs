//! Restore as a pure fold over the records of one state partition, in offset order: what a new
//! owner knows when it starts. No broker here: `kafka::state::read_partition` feeds it, tests
//! feed it records directly.
//!
//! Rules (docs/guarantees.md, "Owner fencing"):
//! - a restore marker is a claim: records of an older epoch after it are a superseded owner's
//!   and are skipped (their keys are reported for healing);
//! - a tombstone deletes its key, under the same epoch rule (its epoch is its `pis.epoch`
//!   header);
//! - a record that does not decode is quarantined, not fatal: the partition keeps running, and
//!   the payment it names is held (never acted on) until a later valid record replaces it.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::domain::consent::ConsentEvent;
use crate::domain::machine::{Payment, StatusEvent};
use crate::domain::model::{Brand, PaymentId, PsuId};
use crate::kafka::state::consent::{ConsentKey, ConsentRecord};
use crate::kafka::state::{
    self, Decoded, DecodedRecord, NO_EPOCH, PsuTokens, RecordKey, Retired, Sealing, SnapshotStart,
    TokenKey,
};
use crate::secret::StateKeyRing;

/// A state record that could not be read.
#[derive(Clone, PartialEq, Eq)]
pub struct Quarantined {
    pub offset: i64,
    /// `kafka::state::StateRecordError::class`: `unauthentic` (altered, copied under another
    /// key, or a wrong key of the right id), `epoch-mismatch` (replayed under another
    /// `pis.epoch` header), `unknown-key` (a key missing from the ring), `malformed`, ...
    pub class: &'static str,
    pub error: String,
    /// The record as read: a snapshot carries it on (`StateWrite::QuarantinedCopy`).
    pub epoch_header: Option<i64>,
    pub value: Vec<u8>,
}

impl std::fmt::Debug for Quarantined {
    // Not the value: it may be a format 1 record with personal data in the clear.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quarantined")
            .field("offset", &self.offset)
            .field("class", &self.class)
            .field("error", &self.error)
            .field("epoch_header", &self.epoch_header)
            .field("value_len", &self.value.len())
            .finish()
    }
}

/// Everything a partition owner needs, rebuilt from its state partition.
#[derive(Debug, Default)]
pub struct Restored {
    pub payments: HashMap<PaymentId, Payment>,
    /// Final payments past the retention horizon whose ids are still remembered (their latest
    /// record is a retired record).
    pub retired: HashMap<PaymentId, Retired>,
    pub tokens: HashMap<TokenKey, PsuTokens>,
    /// Events of records written after the last outbox checkpoint, in offset order: they may not
    /// have reached the status topic.
    pub unpublished: Vec<(i64, Vec<StatusEvent>)>,
    /// Consents by entity, with their scope's pair.
    pub consents: HashMap<ConsentKey, ConsentRecord>,
    /// Consent events of records after the last outbox checkpoint, in offset order.
    pub unpublished_consents: Vec<(i64, Vec<ConsentEvent>)>,
    pub checkpoint: i64,
    pub records_read: u64,
    /// The offset the next state write will get, at restore time.
    pub end_offset: i64,
    /// Records skipped because a superseded owner wrote them after a newer claim.
    pub zombie_records: u64,
    /// Keys whose latest record is such a skipped one: the new owner re-writes them, so the
    /// latest record of the key is valid again before compaction can drop the older valid one.
    pub zombie_keys: HashSet<String>,
    /// Records that did not decode, by record key (the latest of each key).
    pub quarantined: BTreeMap<String, Quarantined>,
    /// How the latest valid record of each live key is sealed (format, key id): what a key
    /// rotation or the format 2 migration waits on (`pis-worker state keys`).
    pub sealing: BTreeMap<String, Sealing>,
    /// The snapshot this restore started at (`None`: from the partition's first record).
    pub snapshot: Option<SnapshotStart>,
    /// Other owners' claims read, by offset: deleted once no restore reads them any more.
    pub markers: BTreeMap<i64, String>,
}

impl Restored {
    /// The payments a quarantined record names: held until a valid record replaces it.
    pub fn quarantined_payments(&self) -> impl Iterator<Item = PaymentId> + '_ {
        self.quarantined
            .keys()
            .filter_map(|key| match RecordKey::parse(key) {
                RecordKey::Payment(id) => Some(id),
                RecordKey::Tokens(_)
                | RecordKey::LegacyTokens(_)
                | RecordKey::Consent(_)
                | RecordKey::Checkpoint
                | RecordKey::RestoreMarker
                | RecordKey::Snapshot
                | RecordKey::Unknown => None,
            })
    }
}

/// One record of the state partition as the broker hands it over, for
/// [`RestoreFold::apply_batch`]: `value: None` is a tombstone; `epoch_header` its `pis.epoch`
/// header.
#[derive(Debug, Clone, Copy)]
pub struct RawRecord<'a> {
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub epoch_header: Option<i64>,
}

type DecodeResult = Result<state::Decoded, state::StateRecordError>;

/// At most this many threads decode a batch.
const MAX_DECODE_THREADS: usize = 8;
/// A thread is worth starting for at least this many records.
const MIN_RECORDS_PER_THREAD: usize = 64;

/// Decodes what `RestoreFold::apply_decoded` would decode of these records (valued records up to
/// the marker, claims excepted); `None` for the rest.
fn predecode(
    ring: &StateKeyRing,
    marker_offset: i64,
    records: &[RawRecord<'_>],
) -> Vec<Option<DecodeResult>> {
    records
        .iter()
        .map(|record| {
            let value = record.value?;
            if record.offset > marker_offset {
                return None;
            }
            let record_key = record.key.map(String::from_utf8_lossy).unwrap_or_default();
            // A claim is not decoded (`RecordKey::parse` of it is `RestoreMarker`).
            if record_key.starts_with(state::RESTORE_MARKER_PREFIX) {
                return None;
            }
            Some(state::decode_record(
                ring,
                &record_key,
                value,
                record.epoch_header,
            ))
        })
        .collect()
}

/// The fold. Feed every record of the partition up to the owner's own marker, then `finish`.
pub struct RestoreFold<'k> {
    key: &'k StateKeyRing,
    marker_offset: i64,
    out: Restored,
    /// The newest claim (or writer epoch) read so far.
    epoch_floor: i64,
    events_by_offset: BTreeMap<i64, Vec<StatusEvent>>,
    consent_events_by_offset: BTreeMap<i64, (ConsentKey, Vec<ConsentEvent>)>,
    /// The brand of each PSU's latest legacy (`psu/{psu}`) record, for its tombstone.
    legacy_brands: HashMap<PsuId, Brand>,
    /// Whether `Restored::sealing` is kept (for `pis-worker state keys`; a worker's restore
    /// does not need it, and it costs a map entry per record).
    track_sealing: bool,
}

impl<'k> RestoreFold<'k> {
    pub fn new(key: &'k StateKeyRing, marker_offset: i64) -> Self {
        Self {
            key,
            marker_offset,
            out: Restored {
                checkpoint: -1,
                end_offset: marker_offset.saturating_add(1),
                ..Restored::default()
            },
            epoch_floor: NO_EPOCH,
            events_by_offset: BTreeMap::new(),
            consent_events_by_offset: BTreeMap::new(),
            legacy_brands: HashMap::new(),
            track_sealing: true,
        }
    }

    /// A fold that does not keep `Restored::sealing` (a worker's restore).
    pub fn without_sealing(mut self) -> Self {
        self.track_sealing = false;
        self
    }

    /// Starts at the snapshot recorded at `begin`, instead of the partition's first record,
    /// given the first record read there: it must be that snapshot's begin record (at `begin`,
    /// under a snapshot key, sealed). Then what the records before it said is in the snapshot,
    /// its owner's claim is the epoch floor, and every event before it is published. Call
    /// [`apply`](Self::apply) with the record next. An error says why the snapshot is not
    /// usable: the caller reads the partition from its first record instead.
    pub fn start_at(
        &mut self,
        begin: i64,
        offset: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        epoch_header: Option<i64>,
    ) -> Result<(), String> {
        if offset != begin {
            return Err(format!(
                "the recorded snapshot begins at {begin} but the first record there is at {offset} (deleted?)"
            ));
        }
        let record_key = key
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        if RecordKey::parse(&record_key) != RecordKey::Snapshot {
            return Err(format!(
                "the record at {begin}, where the recorded snapshot begins, is no snapshot record"
            ));
        }
        let value = value.ok_or_else(|| format!("the snapshot begin at {begin} is deleted"))?;
        let decoded = state::decode_record(self.key, &record_key, value, epoch_header)
            .map_err(|e| format!("the snapshot begin at {begin} does not decode: {e}"))?;
        let DecodedRecord::Snapshot {
            end_of: None,
            at: Some(at),
        } = decoded.record
        else {
            return Err(format!("the record at {begin} is no snapshot begin"));
        };
        let start = SnapshotStart {
            begin,
            epoch: decoded.epoch,
            at,
        };
        self.epoch_floor = self.epoch_floor.max(start.epoch);
        self.out.checkpoint = self.out.checkpoint.max(start.begin - 1);
        self.out.snapshot = Some(start);
        Ok(())
    }

    /// Forgets everything read: the caller reads again from the partition's first record.
    pub fn reset(&mut self) {
        let track_sealing = self.track_sealing;
        *self = RestoreFold::new(self.key, self.marker_offset);
        self.track_sealing = track_sealing;
    }

    /// The snapshot this fold started at, if any.
    pub fn snapshot(&self) -> Option<SnapshotStart> {
        self.out.snapshot
    }

    /// One record: `value: None` is a tombstone; `epoch_header` its `pis.epoch` header.
    pub fn apply(
        &mut self,
        offset: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        epoch_header: Option<i64>,
    ) {
        self.apply_decoded(offset, key, value, epoch_header, None);
    }

    /// Records in offset order, as [`RestoreFold::apply`] one by one would fold them (the same
    /// result), but opening and decoding them first on up to `available_parallelism` threads:
    /// decoding is most of a record's cost and needs nothing of the fold. Only the fold itself
    /// runs in order, on the calling thread. Batches of a few hundred to a few thousand records
    /// suit it (small batches are decoded on the calling thread).
    pub fn apply_batch(&mut self, records: &[RawRecord<'_>]) {
        let threads = std::thread::available_parallelism()
            .map_or(1, std::num::NonZeroUsize::get)
            .clamp(1, MAX_DECODE_THREADS)
            .min(records.len() / MIN_RECORDS_PER_THREAD)
            .max(1);
        let (ring, marker) = (self.key, self.marker_offset);
        if threads == 1 {
            let decoded = predecode(ring, marker, records);
            self.apply_all(records, decoded);
            return;
        }
        // The calling thread decodes and folds the first part while the others decode the
        // rest; it then folds their parts in order. Folding costs about half of decoding, so
        // the first part is the smaller: 5 to every 8 of each other thread.
        let mine = records.len() * 5 / (5 + 8 * (threads - 1));
        let (first, rest) = records.split_at(mine);
        let per_thread = rest.len().div_ceil(threads - 1).max(1);
        std::thread::scope(|scope| {
            let parts: Vec<_> = rest
                .chunks(per_thread)
                .map(|part| (part, scope.spawn(move || predecode(ring, marker, part))))
                .collect();
            let decoded = predecode(ring, marker, first);
            self.apply_all(first, decoded);
            for (part, handle) in parts {
                // A decoding thread that panicked: its records are decoded here instead.
                let decoded = handle
                    .join()
                    .unwrap_or_else(|_| part.iter().map(|_| None).collect());
                self.apply_all(part, decoded);
            }
        });
    }

    fn apply_all(&mut self, records: &[RawRecord<'_>], decoded: Vec<Option<DecodeResult>>) {
        for (record, decoded) in records.iter().zip(decoded) {
            self.apply_decoded(
                record.offset,
                record.key,
                record.value,
                record.epoch_header,
                decoded,
            );
        }
    }

    /// [`RestoreFold::apply`], with the record already decoded if `decoded` is given.
    fn apply_decoded(
        &mut self,
        offset: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        epoch_header: Option<i64>,
        decoded: Option<DecodeResult>,
    ) {
        if offset > self.marker_offset {
            return;
        }
        self.out.records_read += 1;
        let record_key = key
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        let parsed = RecordKey::parse(&record_key);
        // A claim counts whatever its value says: the key alone makes it one. A tombstone
        // under a marker key is an old claim being deleted, no claim.
        if parsed == RecordKey::RestoreMarker {
            if value.is_some() {
                self.epoch_floor = self.epoch_floor.max(offset);
                if offset < self.marker_offset {
                    self.out.markers.insert(offset, record_key);
                }
            } else {
                self.out.markers.retain(|_, key| *key != record_key);
            }
            return;
        }
        let Some(value) = value else {
            self.tombstone(&record_key, parsed, epoch_header);
            return;
        };
        // A record that is altered, copied under another key, replayed under another epoch
        // header or sealed with a key the ring lacks does not decode: quarantined like garbage.
        let decoded = decoded
            .unwrap_or_else(|| state::decode_record(self.key, &record_key, value, epoch_header));
        let decoded = match decoded {
            Ok(decoded) => decoded,
            Err(e) => {
                self.quarantine(
                    record_key,
                    &e,
                    state::QuarantinedRecord {
                        offset,
                        epoch_header,
                        value: value.to_vec(),
                    },
                );
                return;
            }
        };
        if self.is_zombie(decoded.epoch) {
            self.zombie(&record_key);
            return;
        }
        self.epoch_floor = self.epoch_floor.max(decoded.epoch);
        if let DecodedRecord::QuarantinedCopy(original) = decoded.record {
            // Tried again: it decodes now if the key it needs was added to the ring since. It
            // was the latest record of its key when copied, so the copy's place is its place.
            match state::decode_record(
                self.key,
                &record_key,
                &original.value,
                original.epoch_header,
            ) {
                Ok(inner) => self.accept(offset, record_key, &parsed, inner),
                Err(e) => self.quarantine(record_key, &e, original),
            }
            return;
        }
        self.accept(offset, record_key, &parsed, decoded);
    }

    fn quarantine(
        &mut self,
        record_key: String,
        error: &state::StateRecordError,
        record: state::QuarantinedRecord,
    ) {
        self.out.quarantined.insert(
            record_key,
            Quarantined {
                offset: record.offset,
                class: error.class(),
                error: error.to_string(),
                epoch_header: record.epoch_header,
                value: record.value,
            },
        );
    }

    /// A valid record, the latest of its key so far.
    fn accept(&mut self, offset: i64, record_key: String, parsed: &RecordKey, decoded: Decoded) {
        let record = decoded.record;
        // A valid record replaces whatever could not be read before it.
        self.out.quarantined.remove(&record_key);
        self.out.zombie_keys.remove(&record_key);
        if self.track_sealing {
            self.out.sealing.insert(record_key.clone(), decoded.sealing);
        }
        match record {
            DecodedRecord::Payment { payment, events } => {
                if !events.is_empty() {
                    self.events_by_offset.insert(offset, events);
                }
                self.out.retired.remove(&payment.payment_id);
                self.out
                    .payments
                    .insert(payment.payment_id.clone(), *payment);
            }
            DecodedRecord::Retired(retired) => {
                let id = retired.payment_id.clone();
                // Retired only once its events were published: nothing left to re-publish.
                self.forget_events(&id);
                self.out.payments.remove(&id);
                self.out.retired.insert(id, retired);
            }
            DecodedRecord::Consent { record, events } => {
                let key = ConsentKey::of(&record.consent);
                if !events.is_empty() {
                    self.consent_events_by_offset
                        .insert(offset, (key.clone(), events));
                }
                self.out.consents.insert(key, *record);
            }
            DecodedRecord::Psu(tokens) => {
                if let RecordKey::LegacyTokens(psu) = parsed {
                    self.legacy_brands.insert(psu.clone(), tokens.brand);
                }
                let key = TokenKey::new(tokens.brand, tokens.psu_id.clone());
                self.out.tokens.insert(key, tokens);
            }
            DecodedRecord::Checkpoint(through) => {
                self.out.checkpoint = self.out.checkpoint.max(through);
                // Events at or below the checkpoint are published: `finish` drops them anyway.
                // Dropping them now keeps `forget_events` (a scan) short on a long partition.
                self.events_by_offset = self
                    .events_by_offset
                    .split_off(&self.out.checkpoint.saturating_add(1));
                self.consent_events_by_offset = self
                    .consent_events_by_offset
                    .split_off(&self.out.checkpoint.saturating_add(1));
            }
            DecodedRecord::RestoreMarker | DecodedRecord::Snapshot { .. } => {}
            // A copy of a copy is never written (the original is copied); read as garbage.
            DecodedRecord::QuarantinedCopy(original) => {
                let error = state::StateRecordError::Malformed("a copy of a copy".into());
                self.quarantine(record_key, &error, original);
            }
        }
    }

    fn is_zombie(&self, epoch: i64) -> bool {
        epoch != NO_EPOCH && epoch < self.epoch_floor
    }

    fn zombie(&mut self, record_key: &str) {
        self.out.zombie_records += 1;
        match RecordKey::parse(record_key) {
            RecordKey::Payment(_)
            | RecordKey::Tokens(_)
            | RecordKey::LegacyTokens(_)
            | RecordKey::Consent(_) => {
                self.out.zombie_keys.insert(record_key.to_owned());
            }
            RecordKey::Checkpoint
            | RecordKey::RestoreMarker
            | RecordKey::Snapshot
            | RecordKey::Unknown => {}
        }
    }

    fn tombstone(&mut self, record_key: &str, parsed: RecordKey, epoch: Option<i64>) {
        let epoch = epoch.unwrap_or(NO_EPOCH);
        if self.is_zombie(epoch) {
            self.zombie(record_key);
            return;
        }
        self.epoch_floor = self.epoch_floor.max(epoch);
        self.out.quarantined.remove(record_key);
        self.out.zombie_keys.remove(record_key);
        self.out.sealing.remove(record_key);
        match parsed {
            RecordKey::Payment(id) => {
                self.out.payments.remove(&id);
                self.out.retired.remove(&id);
                // A deleted payment has nothing left to re-publish.
                self.forget_events(&id);
            }
            RecordKey::Tokens(key) => {
                self.out.tokens.remove(&key);
            }
            RecordKey::LegacyTokens(psu) => {
                if let Some(brand) = self.legacy_brands.remove(&psu) {
                    self.out.tokens.remove(&TokenKey::new(brand, psu));
                }
            }
            RecordKey::Consent(key) => {
                self.out.consents.remove(&key);
                self.consent_events_by_offset.retain(|_, (k, _)| *k != key);
            }
            RecordKey::Checkpoint
            | RecordKey::RestoreMarker
            | RecordKey::Snapshot
            | RecordKey::Unknown => {}
        }
    }

    fn forget_events(&mut self, id: &PaymentId) {
        self.events_by_offset
            .retain(|_, events| events.first().is_none_or(|e| &e.payment_id != id));
    }

    pub fn finish(mut self) -> Restored {
        let checkpoint = self.out.checkpoint;
        self.out.unpublished = self
            .events_by_offset
            .into_iter()
            .filter(|(offset, _)| *offset > checkpoint)
            .collect();
        self.out.unpublished_consents = self
            .consent_events_by_offset
            .into_iter()
            .filter(|(offset, _)| *offset > checkpoint)
            .map(|(offset, (_, events))| (offset, events))
            .collect();
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::machine::{Input, Outcome, Policy, decide};
    use crate::domain::model::{Amount, CommandId, Language, PaymentOrder, PaymentProduct};
    use secrecy::{ExposeSecret, SecretString};

    fn key() -> StateKeyRing {
        StateKeyRing::generate()
    }

    fn payment(id: &str) -> (Payment, Vec<StatusEvent>) {
        let order = PaymentOrder {
            product: PaymentProduct::SepaCreditTransfers,
            brand: Brand::Belfius,
            amount: Amount::from_minor(1234),
            currency: "EUR".into(),
            creditor_name: "Alice".into(),
            creditor_iban: "BE68539007547034".into(),
            creditor_bic: None,
            debtor_iban: None,
            end_to_end_id: format!("E2E-{id}"),
            remittance_information: None,
            requested_execution_date: None,
            language: Language::Fr,
            redirect_uri: "https://c.example/cb".into(),
            cross_border: None,
        };
        let Outcome::Changed(t) = decide(
            &PaymentId::new(id),
            None,
            Input::Initiate {
                command_id: CommandId::new(format!("c-{id}")),
                psu_id: PsuId::new("psu-1"),
                order: order.into(),
                always_pkce: false,
            },
            1,
            &Policy::default(),
        ) else {
            panic!("not changed")
        };
        (t.payment, t.events)
    }

    fn tokens(brand: Brand, access: &str) -> PsuTokens {
        PsuTokens {
            psu_id: PsuId::new("psu-1"),
            brand,
            access_token: SecretString::from(access),
            refresh_token: None,
            expires_at: None,
            updated_at: 1,
        }
    }

    /// A record as the broker hands it over: key, value (None: a tombstone), epoch header.
    type Record = (Option<String>, Option<Vec<u8>>, Option<i64>);

    /// A partition written record by record, as the broker would hand it to restore.
    struct Log<'k> {
        key: &'k StateKeyRing,
        records: Vec<Record>,
    }

    impl<'k> Log<'k> {
        fn new(key: &'k StateKeyRing) -> Self {
            Self {
                key,
                records: Vec::new(),
            }
        }
        fn offset(&self) -> i64 {
            self.records.len() as i64
        }
        /// A claim: returns its offset (the claimant's epoch).
        fn marker(&mut self, owner: &str) -> i64 {
            let (k, v) = state::encode_restore_marker(0, owner).expect("marker");
            self.records.push((Some(k), Some(v), None));
            self.offset() - 1
        }
        fn payment(&mut self, epoch: i64, p: &Payment, events: &[StatusEvent]) -> i64 {
            let (k, v) = state::encode_payment(self.key, epoch, p, events).expect("encode");
            self.records.push((Some(k), Some(v), Some(epoch)));
            self.offset() - 1
        }
        fn tokens(&mut self, epoch: i64, t: &PsuTokens) {
            let (k, v) = state::encode_psu(self.key, epoch, t).expect("encode");
            self.records.push((Some(k), Some(v), Some(epoch)));
        }
        fn raw(&mut self, key: &str, value: Option<&[u8]>, epoch: Option<i64>) {
            self.records
                .push((Some(key.to_owned()), value.map(<[u8]>::to_vec), epoch));
        }
        /// Everything written so far, as a reader (not a new owner) sees it.
        fn read_all(&self) -> Restored {
            self.restore(self.offset() - 1)
        }
        fn restore(&self, marker: i64) -> Restored {
            let mut fold = RestoreFold::new(self.key, marker);
            for (offset, (k, v, e)) in self.records.iter().enumerate() {
                fold.apply(
                    offset as i64,
                    k.as_deref().map(str::as_bytes),
                    v.as_deref(),
                    *e,
                );
            }
            fold.finish()
        }
    }

    /// Everything a restore reports, in a comparable form (maps sorted).
    fn summary(r: &Restored) -> String {
        let mut payments: Vec<_> = r.payments.iter().map(|p| format!("{p:?}")).collect();
        payments.sort();
        let mut retired: Vec<_> = r.retired.iter().map(|p| format!("{p:?}")).collect();
        retired.sort();
        let mut tokens: Vec<_> = r
            .tokens
            .iter()
            .map(|(k, t)| format!("{k:?} {t:?} {}", t.access_token.expose_secret()))
            .collect();
        tokens.sort();
        let mut zombie_keys: Vec<_> = r.zombie_keys.iter().collect();
        zombie_keys.sort();
        format!(
            "{payments:?}\n{retired:?}\n{tokens:?}\n{:?}\n{} {} {} {}\n{zombie_keys:?}\n{:?}\n{:?}",
            r.unpublished,
            r.checkpoint,
            r.records_read,
            r.end_offset,
            r.zombie_records,
            r.quarantined,
            r.sealing
        )
    }

    /// `apply_batch`, whatever the batch size and however many threads decode, folds as
    /// `apply` record by record does: payments with events, checkpoints, retired records,
    /// tombstones, garbage, zombies, tokens, claims, and records after the marker.
    #[test]
    fn apply_batch_folds_as_apply_does() {
        let k = key();
        let mut log = Log::new(&k);
        let old = log.marker("a");
        for i in 0..150 {
            let (p, e) = payment(&format!("p-{}", i % 60));
            log.payment(old, &p, &e);
            match i % 10 {
                0 => {
                    let (ck, cv) =
                        state::encode_checkpoint(&k, 0, old, log.offset() - 3).expect("ck");
                    log.raw(&ck, Some(&cv), Some(old));
                }
                3 => {
                    let (rk, rv) =
                        state::encode_retired(&k, old, &Retired::of(&p, 5)).expect("retired");
                    log.raw(&rk, Some(&rv), Some(old));
                }
                5 => log.raw(&format!("payment/p-{}", i % 60), None, Some(old)),
                7 => log.raw(
                    &format!("payment/p-{}", i % 70),
                    Some(b"garbage"),
                    Some(old),
                ),
                9 => log.tokens(old, &tokens(Brand::Belfius, &format!("t-{i}"))),
                _ => {}
            }
        }
        let new = log.marker("b");
        for i in 0..40 {
            let (p, e) = payment(&format!("p-{}", i * 3));
            // A superseded owner's writes, then the new owner's.
            log.payment(old, &p, &e);
            if i % 2 == 0 {
                log.payment(new, &p, &[]);
            }
        }
        let mine = log.marker("c");
        let (late, late_events) = payment("after-the-marker");
        log.payment(new, &late, &late_events);

        let expected = summary(&log.restore(mine));
        assert!(expected.contains("garbage") || expected.contains("malformed"));
        for batch in [1, 7, 64, 130, 1000] {
            let mut fold = RestoreFold::new(&k, mine);
            for (i, chunk) in log.records.chunks(batch).enumerate() {
                let raw: Vec<RawRecord<'_>> = chunk
                    .iter()
                    .enumerate()
                    .map(|(j, (key, value, epoch))| RawRecord {
                        offset: (i * batch + j) as i64,
                        key: key.as_deref().map(str::as_bytes),
                        value: value.as_deref(),
                        epoch_header: *epoch,
                    })
                    .collect();
                fold.apply_batch(&raw);
            }
            assert_eq!(summary(&fold.finish()), expected, "batches of {batch}");
        }
        // A worker's fold keeps no sealing map, and differs in nothing else; a reset keeps
        // that choice.
        let mut with = log.restore(mine);
        assert!(!with.sealing.is_empty());
        with.sealing.clear();
        let mut fold = RestoreFold::new(&k, mine).without_sealing();
        fold.reset();
        for (offset, (key, value, epoch)) in log.records.iter().enumerate() {
            fold.apply(
                offset as i64,
                key.as_deref().map(str::as_bytes),
                value.as_deref(),
                *epoch,
            );
        }
        assert_eq!(summary(&fold.finish()), summary(&with));
    }

    #[test]
    fn the_latest_valid_record_of_each_key_wins_and_events_after_the_checkpoint_are_unpublished() {
        let k = key();
        let mut log = Log::new(&k);
        let first = log.marker("a");
        let (p1, e1) = payment("p-1");
        log.payment(first, &p1, &e1);
        let (ck, cv) = state::encode_checkpoint(&k, 0, first, 1).expect("checkpoint");
        log.raw(&ck, Some(&cv), Some(first));
        let (p2, e2) = payment("p-2");
        let p2_at = log.payment(first, &p2, &e2);
        let mine = log.marker("b");
        let restored = log.restore(mine);
        assert_eq!(restored.payments.len(), 2);
        assert_eq!(restored.checkpoint, 1);
        assert_eq!(
            restored
                .unpublished
                .iter()
                .map(|(o, _)| *o)
                .collect::<Vec<_>>(),
            vec![p2_at]
        );
        assert_eq!(restored.records_read, 5);
        assert_eq!(restored.end_offset, mine + 1);
    }

    /// Defect d: a superseded owner's tombstone (its epoch only in the header) deleted the
    /// live owner's freshly written token pair, because restore applied tombstones before any
    /// epoch check.
    #[test]
    fn zombie_token_tombstone_after_a_newer_claim_does_not_delete_the_live_pair() {
        let k = key();
        let mut log = Log::new(&k);
        let old = log.marker("old");
        let new = log.marker("new");
        log.tokens(new, &tokens(Brand::Belfius, "fresh"));
        log.raw("psu/BELFIUS/psu-1", None, Some(old));
        let mine = log.marker("next");
        let restored = log.restore(mine);
        let pair = restored
            .tokens
            .get(&TokenKey::new(Brand::Belfius, PsuId::new("psu-1")))
            .expect("the live pair survives");
        assert_eq!(pair.access_token.expose_secret(), "fresh");
        assert_eq!(restored.zombie_records, 1);
        assert!(restored.zombie_keys.contains("psu/BELFIUS/psu-1"));
    }

    #[test]
    fn a_tombstone_of_the_current_owner_deletes_its_key() {
        let k = key();
        let mut log = Log::new(&k);
        let epoch = log.marker("a");
        log.tokens(epoch, &tokens(Brand::Belfius, "t"));
        log.raw("psu/BELFIUS/psu-1", None, Some(epoch));
        let marker = log.marker("b");
        let restored = log.restore(marker);
        assert!(restored.tokens.is_empty());
        assert!(restored.zombie_keys.is_empty());
    }

    /// Defect g: one pair per brand and PSU; a legacy `psu/{psu}` record maps to its brand.
    #[test]
    fn token_pairs_are_kept_per_brand_and_legacy_records_map_to_their_brand() {
        let k = key();
        let mut log = Log::new(&k);
        let epoch = log.marker("a");
        // A record of the previous format: keyed by PSU only, brand inside, sealed under its key.
        let legacy = tokens(Brand::Banx, "legacy-banx");
        let legacy_key = "psu/psu-1";
        let sealed = k
            .current()
            .seal_v1(&legacy.access_token, legacy_key)
            .expect("seal");
        let value = serde_json::json!({
            "type": "psu", "v": 1, "epoch": epoch, "psu_id": "psu-1", "brand": "BANX",
            "access_token": sealed, "refresh_token": null, "expires_at": null, "updated_at": 1
        });
        log.raw(
            legacy_key,
            Some(&serde_json::to_vec(&value).expect("json")),
            Some(epoch),
        );
        log.tokens(epoch, &tokens(Brand::Belfius, "belfius"));
        let restored = log.read_all();
        let at = |brand| {
            restored
                .tokens
                .get(&TokenKey::new(brand, PsuId::new("psu-1")))
                .map(|t| t.access_token.expose_secret().to_owned())
        };
        assert_eq!(at(Brand::Banx).as_deref(), Some("legacy-banx"));
        assert_eq!(at(Brand::Belfius).as_deref(), Some("belfius"));
        // The legacy tombstone deletes the legacy pair only.
        log.raw(legacy_key, None, Some(epoch));
        let restored = log.read_all();
        assert_eq!(restored.tokens.len(), 1);
        assert!(
            restored
                .tokens
                .contains_key(&TokenKey::new(Brand::Belfius, PsuId::new("psu-1")))
        );
    }

    /// Defect n: one undecodable record stopped every replica in turn. Now it is quarantined
    /// with the payment it names, and restore goes on.
    #[test]
    fn an_undecodable_record_is_quarantined_and_restore_goes_on() {
        let k = key();
        let mut log = Log::new(&k);
        let epoch = log.marker("a");
        let (p1, e1) = payment("p-1");
        log.payment(epoch, &p1, &e1);
        let garbage_at = log.offset();
        log.raw("payment/p-1", Some(b"{not json"), Some(epoch));
        let (p2, e2) = payment("p-2");
        log.payment(epoch, &p2, &e2);
        let marker = log.marker("b");
        let restored = log.restore(marker);
        assert_eq!(restored.payments.len(), 2, "the last good state is kept");
        let q = restored
            .quarantined
            .get("payment/p-1")
            .expect("quarantined");
        assert_eq!(q.offset, garbage_at);
        assert_eq!(
            restored.quarantined_payments().collect::<Vec<_>>(),
            vec![PaymentId::new("p-1")]
        );
    }

    #[test]
    fn a_later_valid_record_lifts_the_quarantine() {
        let k = key();
        let mut log = Log::new(&k);
        let epoch = log.marker("a");
        log.raw("payment/p-1", Some(b"garbage"), Some(epoch));
        let (p1, e1) = payment("p-1");
        log.payment(epoch, &p1, &e1);
        let marker = log.marker("b");
        let restored = log.restore(marker);
        assert!(restored.quarantined.is_empty());
        assert_eq!(restored.payments.len(), 1);
    }

    #[test]
    fn a_zombie_payment_record_is_skipped_and_its_key_reported_until_rewritten() {
        let k = key();
        let mut log = Log::new(&k);
        let old = log.marker("old");
        let (p1, e1) = payment("p-1");
        log.payment(old, &p1, &e1);
        let new = log.marker("new");
        let mut zombie = p1.clone();
        zombie.sequence = 99;
        log.payment(old, &zombie, &[]);
        let restored = log.read_all();
        assert_eq!(restored.payments[&PaymentId::new("p-1")].sequence, 1);
        assert!(restored.zombie_keys.contains("payment/p-1"));
        // The live owner re-wrote it: no longer stale.
        log.payment(new, &p1, &[]);
        let restored = log.read_all();
        assert!(restored.zombie_keys.is_empty());
    }

    #[test]
    fn records_after_the_marker_are_not_read() {
        let k = key();
        let mut log = Log::new(&k);
        let epoch = log.marker("a");
        let mine = log.marker("b");
        let (p1, e1) = payment("p-1");
        log.payment(epoch, &p1, &e1);
        let restored = log.restore(mine);
        assert!(restored.payments.is_empty());
    }

    /// A sealed record whose bytes were altered, one copied under another payment's key, and
    /// one replayed under another `pis.epoch` header: each is quarantined with its class, the
    /// last good state of its key is kept, and restore goes on.
    #[test]
    fn tampered_swapped_and_wrong_epoch_records_are_quarantined_not_fatal() {
        let k = key();
        let mut log = Log::new(&k);
        let epoch = log.marker("a");
        let (p1, e1) = payment("p-1");
        let (p2, e2) = payment("p-2");
        let (p3, e3) = payment("p-3");
        log.payment(epoch, &p1, &e1);
        log.payment(epoch, &p2, &e2);
        log.payment(epoch, &p3, &e3);
        // Tampered: one bit flipped in the ciphertext of a valid p-1 record.
        let (key1, mut tampered) = state::encode_payment(&k, epoch, &p1, &[]).expect("encode");
        let last = tampered.len() - 1;
        tampered[last] ^= 0x80;
        log.raw(&key1, Some(&tampered), Some(epoch));
        // Swapped: p-3's valid record written under p-2's key.
        let (_, p3_value) = state::encode_payment(&k, epoch, &p3, &[]).expect("encode");
        log.raw("payment/p-2", Some(&p3_value), Some(epoch));
        // Rolled back: p-3's record of this epoch replayed under a newer epoch header.
        log.raw("payment/p-3", Some(&p3_value), Some(epoch + 1));
        // A record sealed with a key this ring does not hold.
        let stranger = StateKeyRing::generate();
        let (key4, v4) =
            state::encode_payment(&stranger, epoch, &payment("p-4").0, &[]).expect("encode");
        log.raw(&key4, Some(&v4), Some(epoch));
        let (p5, e5) = payment("p-5");
        log.payment(epoch, &p5, &e5);
        let marker = log.marker("b");
        let restored = log.restore(marker);
        let class = |key: &str| restored.quarantined.get(key).map(|q| q.class);
        assert_eq!(class("payment/p-1"), Some("unauthentic"));
        assert_eq!(class("payment/p-2"), Some("unauthentic"));
        assert_eq!(class("payment/p-3"), Some("epoch-mismatch"));
        assert_eq!(class("payment/p-4"), Some("unknown-key"));
        // The last good state of each key is kept, and the records after them were read.
        assert_eq!(restored.payments.len(), 4);
        assert_eq!(
            restored.payments[&PaymentId::new("p-2")].payment_id,
            PaymentId::new("p-2")
        );
        assert!(restored.payments.contains_key(&PaymentId::new("p-5")));
        let mut held: Vec<_> = restored.quarantined_payments().collect();
        held.sort();
        assert_eq!(
            held,
            ["p-1", "p-2", "p-3", "p-4"].map(PaymentId::new).to_vec()
        );
    }

    #[test]
    fn the_fold_reports_how_each_live_key_is_sealed() {
        let old_cfg = SecretString::from(format!("old:{}", "01".repeat(32)));
        let new_cfg = SecretString::from(format!("new:{}", "02".repeat(32)));
        let before = StateKeyRing::from_config(&old_cfg, None).expect("ring");
        let after = StateKeyRing::from_config(&new_cfg, Some(&old_cfg)).expect("ring");
        let mut log = Log::new(&after);
        let epoch = log.marker("a");
        let (p1, e1) = payment("p-1");
        let (p2, e2) = payment("p-2");
        let (k1, v1) = state::encode_payment(&before, epoch, &p1, &e1).expect("encode");
        log.raw(&k1, Some(&v1), Some(epoch));
        log.payment(epoch, &p2, &e2);
        let (k3, v3) = state::v1::write::payment(before.current(), epoch, &payment("p-3").0, &[]);
        log.raw(&k3, Some(&v3), Some(epoch));
        let restored = log.read_all();
        assert_eq!(restored.payments.len(), 3);
        let sealing = |key: &str| restored.sealing.get(key).map(ToString::to_string);
        assert_eq!(sealing("payment/p-1").as_deref(), Some("v2 key old"));
        assert_eq!(sealing("payment/p-2").as_deref(), Some("v2 key new"));
        assert_eq!(sealing("payment/p-3").as_deref(), Some("v1 (unsealed)"));
        // Re-written with the current key: the old key is no longer needed for p-1.
        log.payment(epoch, &p1, &[]);
        let restored = log.read_all();
        assert_eq!(
            restored
                .sealing
                .get("payment/p-1")
                .map(ToString::to_string)
                .as_deref(),
            Some("v2 key new")
        );
    }
}
