//! The partition owner's decisions, without I/O: `OwnerCore::on(event, now) -> Vec<Action>`,
//! the way `decide()` is for one payment. The shell (`engine::partition`) runs the actions
//! (state writes, status events, bank calls, dead letters, offsets) and feeds their results
//! back as events. No tokio, no broker, no clock: every interleaving can be replayed in a test.
//!
//! What the core owns:
//! - per-payment scheduling: one input at a time per payment (busy set, FIFO queues), durable
//!   timers of idle payments only;
//! - the PSU token lanes: one operation at a time per (brand, PSU) pair, in arrival order;
//! - the outbox (events published once their record is confirmed), the command offsets, and the
//!   fence: nothing leaves the owner (bank call, event, dead letter, committed offset) before a
//!   write of this owner made after the decision was confirmed by the state tail;
//! - its phase: running, draining (with a deadline), finishing, released or fenced.
//!
//! Outstanding work is derived from what the core waits for (writes, calls, publications,
//! dead letters, deferred verdicts, token lanes); nothing is counted by hand.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use secrecy::SecretString;
use tracing::{debug, info, warn};

use super::ingest::{self, CommandLabel, Ingested};
use super::offsets::OffsetTracker;
use super::outbox::OutboxTracker;
use super::restore::{Quarantined, Restored};
use crate::belfius::TokenPair;
use crate::contract::command::CommandEnvelope;
use crate::domain::consent::{ConsentEffect, ConsentEvent};
use crate::domain::machine::{
    Effect, Ignored, Input, Millis, Outcome, Payment, Policy, StateKind, StatusEvent, decide,
};
use crate::domain::model::{Brand, PaymentId};
use crate::domain::reason::{Reason, ReasonCode};
use crate::domain::validation::ValidationLimits;
use crate::kafka::state::consent::{ConsentKey, ConsentRecord};
use crate::kafka::state::{
    PsuTokens, QuarantinedRecord, RecordKey, Retired, SnapshotStart, TokenKey, payment_key, psu_key,
};

mod consents;
pub use consents::{CallFailure, ConsentAnswer, ConsentCall, ExpectedBooking};

/// Numbers the owner's state writes, in the order they are enqueued (the outbox's send order).
pub type WriteId = u64;
/// Numbers the owner's bank calls.
pub type CallId = u64;

/// A token this close to expiry (at most) is refreshed before use.
const TOKEN_MARGIN_MS: Millis = 30_000;

/// A final payment (or retired id) whose turn came while it could not leave yet (busy, queued
/// commands, events not yet published) is looked at again this much later.
const RETIRE_RETRY_MS: Millis = 1_000;

/// What the core is configured with.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub partition: i32,
    /// Partitions of the command topic: a record must be on the partition its key hashes to.
    pub partitions: i32,
    /// This owner's claim (the offset of its restore marker): the epoch of its writes.
    pub epoch: i64,
    pub policy: Policy,
    pub limits: ValidationLimits,
    pub drain_timeout_ms: Millis,
    pub checkpoint_interval_ms: Millis,
    /// How long a released owner waits for its last checkpoint.
    pub finish_timeout_ms: Millis,
    /// How long a final payment stays after its final event before it is retired (leaves
    /// memory; its record is replaced by a retired record). Also how long a PSU token pair
    /// whose expiry is unknown is kept after its last update once no payment of the PSU is live.
    pub retention_ms: Millis,
    /// How long a retired id is remembered after the payment's final event (at least
    /// `retention_ms`); then its retired record is deleted and the id forgotten.
    pub retired_ids_retention_ms: Millis,
    /// A snapshot is written at least this often while anything was written since the last.
    pub snapshot_interval_ms: Millis,
    /// A snapshot is written as soon as a restore would read this many records after the last
    /// one, or twice the live entities if that is more (a restore then reads at most about
    /// three times what is live).
    pub snapshot_min_records: u64,
}

/// Snapshot copies waiting for their acknowledgement at most: a snapshot of 100,000 payments
/// must not crowd out the writes that move payments.
const SNAPSHOT_WINDOW: usize = 256;

/// Where secrets come from (PKCE verifiers, OAuth `state` values): random in the shell,
/// predictable in tests.
pub trait Randomness: Send + Sync {
    fn pkce_verifier(&mut self) -> SecretString;
    fn sca_state(&mut self) -> String;
}

/// The operating system's randomness.
pub struct OsRandom;

impl Randomness for OsRandom {
    fn pkce_verifier(&mut self) -> SecretString {
        crate::belfius::pkce::Pkce::generate().verifier
    }

    fn sca_state(&mut self) -> String {
        // 128 random bits, URL-safe: unguessable, so a forged redirect cannot carry it.
        uuid::Uuid::new_v4().simple().to_string()
    }
}

/// A command record as the shell hands it over: the record (kept for a dead letter) and what
/// decoding it gave.
#[derive(Debug)]
pub struct CommandRecord {
    pub message: OwnedMessage,
    pub decoded: Decoded,
}

#[derive(Debug)]
pub enum Decoded {
    Envelope(Box<CommandEnvelope>),
    /// Not a readable command: dead-lettered with this class.
    Undecodable {
        class: &'static str,
        message: String,
    },
}

/// Everything that can happen to an owner.
#[derive(Debug)]
pub enum Event {
    /// Restore is done: re-publish, heal, resume (once, first).
    Start,
    Command(Box<CommandRecord>),
    /// Stop taking work; finish what is in flight within the drain bound.
    Revoke,
    /// A state write is acknowledged at `offset` (and, if it asked to, confirmed by the fence).
    Written {
        write: WriteId,
        offset: i64,
    },
    /// Every event of the record at `state_offset` is on the status topic.
    Published {
        state_offset: i64,
    },
    DeadLettered {
        command_offset: i64,
    },
    Answered {
        call: CallId,
        answer: BankAnswer,
    },
    /// The state tail read a record of this key written by a superseded owner at `offset`.
    StaleRecord {
        key: String,
        offset: i64,
    },
    /// The state tail read a newer claim on the partition.
    Superseded {
        claimed_at: i64,
    },
    /// The shell recorded (or did not) where the next restore starts.
    SnapshotCommitted {
        start: SnapshotStart,
        outcome: SnapshotCommit,
    },
    /// Time passed (timers, checkpoints, deadlines).
    Tick,
}

/// What became of a snapshot's commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotCommit {
    Committed,
    /// A newer snapshot was already recorded (a later owner's): nothing changed.
    Superseded,
    Failed(String),
}

/// What the shell must do.
#[derive(Debug)]
pub enum Action {
    /// Encode and enqueue a state record (in order), then report `Event::Written`.
    Write {
        id: WriteId,
        write: StateWrite,
        fence: FenceWait,
    },
    /// Publish these events, then report `Event::Published`.
    Publish {
        state_offset: i64,
        events: Vec<StatusEvent>,
    },
    /// Publish these consent events (consent status topic), then report `Event::Published`.
    PublishConsent {
        state_offset: i64,
        events: Vec<ConsentEvent>,
    },
    /// A bank call for a consent (or a funds check), then report `Event::Answered`.
    ConsentCall { id: CallId, call: ConsentCall },
    /// Call the bank for this payment, then report `Event::Answered`. The shell checks the fence
    /// again right before the call leaves.
    Call {
        id: CallId,
        payment: Box<Payment>,
        call: BankCall,
    },
    /// Dead-letter the original record, then report `Event::DeadLettered`.
    DeadLetter {
        record: Box<OwnedMessage>,
        class: &'static str,
        message: String,
        payment_id: Option<String>,
    },
    /// The next command offset to consume after a restart (everything before it is done).
    Committable(i64),
    /// The partition is released (drain finished or its bound reached).
    Released,
    /// A newer owner claimed the partition: stop the process (crash-only).
    Fenced { claimed_at: i64 },
    /// A snapshot is complete and confirmed: record `start` as where the next restore begins,
    /// then report `Event::SnapshotCommitted`.
    CommitSnapshot(SnapshotStart),
}

/// A state record to write.
#[derive(Debug)]
pub enum StateWrite {
    Payment {
        payment: Box<Payment>,
        events: Vec<StatusEvent>,
    },
    Tokens(Box<PsuTokens>),
    /// A consent with its scope's pair, and the consent events of this change.
    Consent {
        record: Box<ConsentRecord>,
        events: Vec<ConsentEvent>,
    },
    /// A final payment's retired record, replacing its payment record under the same key.
    Retired(Box<Retired>),
    /// A tombstone of a pair's key.
    DeleteTokens(TokenKey),
    /// A tombstone of any other key (healing a key a superseded owner wrote).
    DeleteKey(String),
    /// "Every event in records up to `through` is published." Also the owner's fence barrier.
    Checkpoint {
        through: i64,
    },
    /// A snapshot's first record (under a key of its own): its offset is where a restore from
    /// it starts; `at` is when it began.
    SnapshotBegin {
        key: String,
        at: Millis,
    },
    /// A snapshot's last record: the live entities were re-written since `begin`.
    SnapshotEnd {
        begin: i64,
        entities: u64,
    },
    /// A record that could not be read, carried into a snapshot as it was: it stays
    /// quarantined for a person to resolve, wherever restore starts.
    QuarantinedCopy {
        key: String,
        record: Box<QuarantinedRecord>,
    },
}

impl StateWrite {
    pub fn key(&self, partition: i32) -> String {
        match self {
            StateWrite::Payment { payment, .. } => payment_key(&payment.payment_id),
            StateWrite::Retired(retired) => payment_key(&retired.payment_id),
            StateWrite::Tokens(tokens) => {
                psu_key(&TokenKey::new(tokens.brand, tokens.psu_id.clone()))
            }
            StateWrite::DeleteTokens(key) => psu_key(key),
            StateWrite::Consent { record, .. } => ConsentKey::of(&record.consent).record_key(),
            StateWrite::DeleteKey(key) => key.clone(),
            StateWrite::Checkpoint { .. } => crate::kafka::state::checkpoint_key(partition),
            StateWrite::SnapshotBegin { key, .. } => key.clone(),
            StateWrite::SnapshotEnd { .. } => crate::kafka::state::snapshot_key(partition),
            StateWrite::QuarantinedCopy { key, .. } => key.clone(),
        }
    }
}

/// Whether the shell waits for the fence (the state tail read past the write with no newer
/// claim before it) before reporting the write. The reason is part of the action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceWait {
    Confirm { why: &'static str },
    AckOnly { why: &'static str },
}

impl FenceWait {
    pub fn confirms(self) -> bool {
        match self {
            FenceWait::Confirm { .. } => true,
            FenceWait::AckOnly { .. } => false,
        }
    }
}

const ACTED_ON: FenceWait = FenceWait::Confirm {
    why: "its events, its command's offset and the effect that follows act on it",
};
const TOKENS_USED: FenceWait = FenceWait::Confirm {
    why: "a new token pair is used only once it is durable for the current owner",
};
const HEAL: FenceWait = FenceWait::Confirm {
    why: "a re-write must be the current owner's, or it heals nothing",
};
const BARRIER: FenceWait = FenceWait::Confirm {
    why: "releases dead letters and ignored commands decided before it: they act on the owner's view",
};
const RETIRE: FenceWait = FenceWait::Confirm {
    why: "a retired record replaces the payment's state and refuses its commands: only the current owner may write it",
};
const FORGET: FenceWait = FenceWait::Confirm {
    why: "forgetting a retired id lets the id start a new payment: only the current owner may decide it",
};
const TOKENS_EXPIRED: FenceWait = FenceWait::Confirm {
    why: "deleting a pair must be the current owner's decision, or it could delete a newer owner's pair",
};
const SNAPSHOT_END: FenceWait = FenceWait::Confirm {
    why: "a snapshot becomes where restores start: only a complete snapshot of the current owner may",
};
const SNAPSHOT_COPY: FenceWait = FenceWait::AckOnly {
    why: "a copy repeats what is already written; the snapshot's end is what is confirmed",
};
const CHECKPOINT: FenceWait = FenceWait::AckOnly {
    why: "a checkpoint only lets a restore skip re-publishing; a superseded owner's carries an old epoch and restore skips it",
};

/// A bank call the shell makes.
#[derive(Debug)]
pub enum BankCall {
    /// The initiation of the payment's current attempt: with its PKCE verifier's challenge, or
    /// with the PSU's access token (a returning PSU: `Authorization: Bearer`, no code).
    Initiate {
        access_token: Option<SecretString>,
    },
    Status,
    Exchange,
    Cancel {
        access_token: SecretString,
    },
    Refresh {
        brand: Brand,
        refresh_token: SecretString,
    },
}

/// A bank call's result, as the shell classifies it.
#[derive(Debug)]
pub enum BankAnswer {
    Input(Box<Input>),
    Tokens(TokenPair),
    RefreshFailed(RefreshFailure),
    /// A cancellation, or an initiation with the PSU's token, refused because of the PSU's
    /// access token itself (replaced or revoked at the bank, e.g. by a code exchange whose
    /// answer this worker never stored).
    AccessTokenRejected {
        message: String,
    },
    Consent(ConsentAnswer),
}

/// Why a token refresh failed: only a definitive refusal of the grant deletes the pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshFailure {
    /// `invalid_grant` (Belfius: invalid refresh token): the pair is dead.
    Revoked { message: String },
    /// Refused for another reason (a rotated client secret, a refused certificate...): the pair
    /// may be fine; an operator must look.
    Refused { message: String },
    /// No usable answer: nothing is known.
    Transient { message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Draining {
        deadline: Millis,
    },
    Finishing {
        checkpoint: WriteId,
        deadline: Millis,
    },
    Released,
    Fenced,
}

#[derive(Debug)]
enum LaneOp {
    Exchange(PaymentId),
    Cancel(PaymentId),
    /// An attempt initiated with the PSU's access token: it must not overlap an exchange or a
    /// refresh of the same pair, which would kill the token on its way.
    Initiate(PaymentId),
}

/// What a lane's pair allows now.
enum PairUse {
    /// The access token, fresh enough to present.
    Present(SecretString),
    /// Expired (or about to): refresh with this refresh token first.
    RefreshFirst(SecretString),
    /// No pair, or an expired one without a refresh token.
    Unusable,
}

/// Which operation a lane refresh serves: what a failure means depends on it.
#[derive(Debug, Clone, Copy)]
enum LaneUse {
    Cancel,
    Initiate,
}

#[derive(Debug, Default)]
struct Lane {
    running: bool,
    queue: VecDeque<LaneOp>,
}

#[derive(Debug)]
enum Purpose {
    Payment,
    Exchange { lane: TokenKey },
    Cancel { lane: TokenKey },
    RefreshToCancel { lane: TokenKey },
    InitiateWithToken { lane: TokenKey },
    RefreshToInitiate { lane: TokenKey },
}

#[derive(Debug)]
struct PendingCall {
    payment_id: PaymentId,
    purpose: Purpose,
}

#[derive(Debug)]
enum AfterWrite {
    Payment {
        payment_id: PaymentId,
        source: Option<i64>,
        events: Vec<StatusEvent>,
        effect: Option<Effect>,
    },
    Tokens {
        lane: TokenKey,
        payment_id: PaymentId,
        then: AfterTokens,
    },
    /// A dead pair's tombstone, or a refused pair's record marked expired: then the lane
    /// operation that found it so ends with `input`.
    PairSettled {
        lane: TokenKey,
        payment_id: PaymentId,
        input: Box<Input>,
    },
    Heal {
        key: String,
    },
    Consent {
        key: ConsentKey,
        source: Option<i64>,
        events: Vec<ConsentEvent>,
        effect: Option<ConsentEffect>,
        code: Option<SecretString>,
        carry_on: bool,
    },
    /// A consent's refreshed pair is durable: the held funds check goes on with it.
    ConsentTokens {
        key: ConsentKey,
        held: consents::Held,
    },
    /// A final payment's retired record is durable: it leaves memory.
    Retired(Box<Retired>),
    /// A retired record re-written under this owner's epoch (healing).
    RetiredRewritten {
        payment_id: PaymentId,
    },
    /// A retired id's tombstone is durable: the id is forgotten.
    Forgotten {
        payment_id: PaymentId,
    },
    Checkpoint,
    SnapshotBegin,
    SnapshotCopy,
    SnapshotEnd,
    /// Nothing follows (an old claim's tombstone).
    Nothing,
}

/// A snapshot being written: every live entity is re-written after its begin record, a few at a
/// time, then its end record is confirmed by the fence, and once every event before its begin
/// is published the shell records it as where restores start.
#[derive(Debug)]
struct SnapshotRun {
    /// The begin record's offset, once acknowledged.
    begin: Option<i64>,
    /// Entities still to copy (taken when the snapshot began; gone ones are skipped).
    todo: VecDeque<SnapshotItem>,
    /// Entities that were busy when their turn came: copied once idle.
    waiting: Vec<SnapshotItem>,
    copies_in_flight: usize,
    entities: u64,
    /// Writes issued before the begin: what the next snapshot is counted from.
    writes_before: u64,
    /// The begin record's key, and when it began.
    key: String,
    at: Millis,
    end: SnapshotEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SnapshotEnd {
    NotYet,
    Writing,
    /// Confirmed at this offset: waits for the outbox to pass the begin.
    Confirmed(i64),
    Committing,
}

#[derive(Debug, Clone)]
enum SnapshotItem {
    Payment(PaymentId),
    Tokens(TokenKey),
    Consent(ConsentKey),
    Quarantined(String),
}

#[derive(Debug, Clone, Copy)]
enum AfterTokens {
    Exchanged,
    Cancel,
    Initiate,
}

#[derive(Debug)]
struct PendingWrite {
    after: AfterWrite,
    confirmed: bool,
}

/// A decision on a command that needs no state write: it leaves the owner only once a later
/// write of this owner is confirmed by the fence (a superseded owner's view may be stale).
#[derive(Debug)]
enum Verdict {
    Done(i64),
    DeadLetter {
        record: Box<OwnedMessage>,
        class: &'static str,
        message: String,
        payment_id: Option<String>,
    },
}

#[derive(Debug)]
struct Deferred {
    /// Released by a confirmed write with an id at least this.
    after: WriteId,
    verdict: Verdict,
}

#[derive(Debug)]
struct Queued {
    input: Input,
    source: Option<Box<OwnedMessage>>,
}

/// The owner of one command partition, without I/O.
pub struct OwnerCore {
    config: CoreConfig,
    random: Box<dyn Randomness>,
    phase: Phase,
    payments: HashMap<PaymentId, Payment>,
    /// Final payments retired after the retention horizon, until the retired-ids horizon.
    retired: HashMap<PaymentId, Retired>,
    /// When each final payment is due to retire (final event + retention).
    retire_at: BTreeSet<(Millis, PaymentId)>,
    /// When each retired id is due to be forgotten (final event + retired-ids retention).
    forget_at: BTreeSet<(Millis, PaymentId)>,
    /// The payment of each state record whose events are being published.
    publishing_for: HashMap<i64, PaymentId>,
    /// When token pairs are next looked at for expiry.
    next_token_sweep_at: Millis,
    tokens: HashMap<TokenKey, PsuTokens>,
    lanes: HashMap<TokenKey, Lane>,
    consents: HashMap<ConsentKey, consents::ConsentEntry>,
    /// Timers of idle consents.
    consent_timers: BTreeSet<(Millis, ConsentKey)>,
    consent_calls: HashMap<CallId, (ConsentKey, consents::ConsentPurpose)>,
    busy: HashSet<PaymentId>,
    queues: HashMap<PaymentId, VecDeque<Queued>>,
    /// Timers of idle payments only: a busy payment's timer is looked at when it is released.
    timers: BTreeSet<(Millis, PaymentId)>,
    offsets: OffsetTracker,
    outbox: OutboxTracker,
    writes: BTreeMap<WriteId, PendingWrite>,
    calls: HashMap<CallId, PendingCall>,
    next_call: CallId,
    publishing: HashSet<i64>,
    dead_lettering: HashSet<i64>,
    deferred: VecDeque<Deferred>,
    /// Record keys a superseded owner wrote, with the offset of that record (-1: seen by
    /// restore): healed by a write of this owner after it.
    stale: HashMap<String, i64>,
    quarantined: BTreeMap<String, Quarantined>,
    quarantined_payments: HashSet<PaymentId>,
    restored: Option<Restored>,
    /// Payments whose queue or timer may have work now.
    ready: VecDeque<PaymentId>,
    next_checkpoint_at: Millis,
    /// Offset of this owner's latest acknowledged checkpoint record.
    last_checkpoint_record: Option<i64>,
    last_committable: Option<i64>,
    /// When each payment entered its current state (the age gauges).
    entered: HashMap<PaymentId, Millis>,
    /// Cancellations already retried once after their access token was refused.
    token_retried: HashSet<PaymentId>,
    snapshot: Option<SnapshotRun>,
    next_snapshot_at: Millis,
    /// No snapshot begins before this (after one that could not be recorded).
    snapshot_not_before: Millis,
    /// State writes issued by this owner.
    writes_issued: u64,
    /// Records a restore would read after the newest snapshot, not counting this owner's
    /// writes (those are `writes_issued - snapshot_writes_base`).
    restore_backlog: u64,
    snapshot_writes_base: u64,
    /// The newest snapshot known to be recorded (the one restore started at, then this
    /// owner's): claims before its begin are read by no restore.
    newest_snapshot: Option<SnapshotStart>,
    /// Records under keys of their own known to this owner (other owners' claims, snapshot
    /// begins), by offset: deleted once no restore starts before them.
    markers: BTreeMap<i64, String>,
    snapshots_begun: u64,
    /// When this owner started: the snapshot age counts from it while none is recorded.
    started_at: Millis,
    out: Vec<Action>,
}

impl OwnerCore {
    pub fn new(
        config: CoreConfig,
        restored: Restored,
        random: Box<dyn Randomness>,
        now: Millis,
    ) -> Self {
        let outbox = OutboxTracker::new(restored.end_offset, restored.checkpoint);
        let quarantined_payments = restored.quarantined_payments().collect();
        let next_checkpoint_at = now + config.checkpoint_interval_ms;
        let next_token_sweep_at = now.saturating_add(token_sweep_interval(&config));
        let next_snapshot_at = now.saturating_add(config.snapshot_interval_ms);
        let restore_backlog = restored.records_read;
        let newest_snapshot = restored.snapshot;
        let markers = restored.markers.clone();
        OwnerCore {
            config,
            random,
            phase: Phase::Running,
            payments: HashMap::new(),
            retired: HashMap::new(),
            retire_at: BTreeSet::new(),
            forget_at: BTreeSet::new(),
            publishing_for: HashMap::new(),
            next_token_sweep_at,
            tokens: HashMap::new(),
            lanes: HashMap::new(),
            consents: HashMap::new(),
            consent_timers: BTreeSet::new(),
            consent_calls: HashMap::new(),
            busy: HashSet::new(),
            queues: HashMap::new(),
            timers: BTreeSet::new(),
            offsets: OffsetTracker::default(),
            outbox,
            writes: BTreeMap::new(),
            calls: HashMap::new(),
            next_call: 0,
            publishing: HashSet::new(),
            dead_lettering: HashSet::new(),
            deferred: VecDeque::new(),
            stale: HashMap::new(),
            quarantined: restored.quarantined.clone(),
            quarantined_payments,
            restored: Some(restored),
            ready: VecDeque::new(),
            next_checkpoint_at,
            last_checkpoint_record: None,
            last_committable: None,
            entered: HashMap::new(),
            token_retried: HashSet::new(),
            snapshot: None,
            next_snapshot_at,
            snapshot_not_before: now,
            writes_issued: 0,
            restore_backlog,
            snapshot_writes_base: 0,
            newest_snapshot,
            markers,
            snapshots_begun: 0,
            started_at: now,
            out: Vec::new(),
        }
    }

    /// Handles one event; returns what the shell must do, in order.
    pub fn on(&mut self, event: Event, now: Millis) -> Vec<Action> {
        match self.phase {
            Phase::Released | Phase::Fenced => return Vec::new(),
            Phase::Running | Phase::Draining { .. } | Phase::Finishing { .. } => {}
        }
        match event {
            Event::Start => self.start(now),
            Event::Command(record) => self.on_command(*record, now),
            Event::Revoke => {
                if self.phase == Phase::Running {
                    info!(
                        partition = self.config.partition,
                        outstanding = self.outstanding(),
                        "revoking: draining"
                    );
                    self.phase = Phase::Draining {
                        deadline: now + self.config.drain_timeout_ms,
                    };
                }
            }
            Event::Written { write, offset } => self.on_written(write, offset, now),
            Event::Published { state_offset } => {
                self.publishing.remove(&state_offset);
                self.publishing_for.remove(&state_offset);
                self.outbox.published(state_offset);
            }
            Event::DeadLettered { command_offset } => {
                self.dead_lettering.remove(&command_offset);
                self.offsets.done(command_offset);
            }
            Event::Answered { call, answer } => self.on_answer(call, answer, now),
            Event::StaleRecord { key, offset } => self.on_stale(key, offset, now),
            Event::SnapshotCommitted { start, outcome } => {
                self.snapshot_committed(start, outcome, now);
            }
            Event::Superseded { claimed_at } => {
                warn!(
                    partition = self.config.partition,
                    claimed_at, "a newer owner claimed the partition"
                );
                self.phase = Phase::Fenced;
                self.out.push(Action::Fenced { claimed_at });
                return std::mem::take(&mut self.out);
            }
            Event::Tick => {}
        }
        self.settle(now);
        std::mem::take(&mut self.out)
    }

    /// When the shell must wake the core up at the latest (`Event::Tick`).
    pub fn next_wake(&self) -> Option<Millis> {
        let timer = match self.phase {
            Phase::Running => [
                self.timers.first().map(|(at, _)| *at),
                self.consent_timers.first().map(|(at, _)| *at),
                self.retire_at.first().map(|(at, _)| *at),
                self.forget_at.first().map(|(at, _)| *at),
                Some(self.next_token_sweep_at),
                Some(self.next_snapshot_at),
            ]
            .into_iter()
            .flatten()
            .min(),
            Phase::Draining { .. } | Phase::Finishing { .. } | Phase::Released | Phase::Fenced => {
                None
            }
        };
        let deadline = match self.phase {
            Phase::Draining { deadline } | Phase::Finishing { deadline, .. } => Some(deadline),
            Phase::Running | Phase::Released | Phase::Fenced => None,
        };
        let checkpoint = match self.phase {
            Phase::Running | Phase::Draining { .. } => Some(self.next_checkpoint_at),
            Phase::Finishing { .. } | Phase::Released | Phase::Fenced => None,
        };
        [timer, deadline, checkpoint].into_iter().flatten().min()
    }

    /// Whether the shell should hand over command records (it keeps them otherwise).
    pub fn accepts_commands(&self) -> bool {
        self.phase == Phase::Running
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Released | Phase::Fenced)
    }

    pub fn epoch(&self) -> i64 {
        self.config.epoch
    }

    pub fn partition(&self) -> i32 {
        self.config.partition
    }

    pub fn payment(&self, id: &PaymentId) -> Option<&Payment> {
        self.payments.get(id)
    }

    pub fn retired(&self, id: &PaymentId) -> Option<&Retired> {
        self.retired.get(id)
    }

    pub fn tokens(&self, key: &TokenKey) -> Option<&PsuTokens> {
        self.tokens.get(key)
    }

    pub fn quarantined(&self) -> &BTreeMap<String, Quarantined> {
        &self.quarantined
    }

    /// Work the owner still waits for. A drain ends when there is none.
    pub fn outstanding(&self) -> usize {
        self.writes.len()
            + self.calls.len()
            + self.consent_calls.len()
            + self.publishing.len()
            + self.dead_lettering.len()
            + self.deferred.len()
            + self.lanes.values().map(|l| l.queue.len()).sum::<usize>()
    }

    /// Records a restore of this partition would read now (from the newest snapshot).
    pub fn restore_backlog(&self) -> u64 {
        self.restore_backlog
            .saturating_add(self.writes_issued - self.snapshot_writes_base)
    }

    /// The newest snapshot known to be recorded for this partition.
    pub fn newest_snapshot(&self) -> Option<SnapshotStart> {
        self.newest_snapshot
    }

    /// Per-state counts and oldest entries, for the gauges.
    pub fn summary(&self) -> super::stats::Summary {
        let mut summary = super::stats::Summary {
            quarantined: self.quarantined.len() as i64,
            retired: self.retired.len() as i64,
            snapshot_at: Some(self.newest_snapshot.map_or(self.started_at, |s| s.at)),
            restore_backlog: i64::try_from(self.restore_backlog()).unwrap_or(i64::MAX),
            ..super::stats::Summary::default()
        };
        for (id, payment) in &self.payments {
            let kind = payment.state.kind();
            *summary.per_state.entry(kind).or_default() += 1;
            if super::stats::AGED_STATES.contains(&kind) {
                if let Some(&since) = self.entered.get(id) {
                    let oldest = summary.oldest_entry.entry(kind).or_insert(since);
                    *oldest = (*oldest).min(since);
                }
            }
        }
        summary
    }

    // -----------------------------------------------------------------------------------------
    // Start

    fn start(&mut self, now: Millis) {
        let Some(restored) = self.restored.take() else {
            return;
        };
        info!(
            partition = self.config.partition,
            payments = restored.payments.len(),
            token_pairs = restored.tokens.len(),
            records = restored.records_read,
            unpublished = restored.unpublished.len(),
            quarantined = restored.quarantined.len(),
            retired = restored.retired.len(),
            "partition restored"
        );
        for (key, q) in &restored.quarantined {
            warn!(
                partition = self.config.partition,
                record_key = %key,
                offset = q.offset,
                class = q.class,
                error = %q.error,
                "state record quarantined: the payment it names is held (pis-worker state quarantined)"
            );
        }
        self.tokens = restored.tokens;
        self.restore_consents(restored.consents);
        for (offset, events) in restored.unpublished_consents {
            self.outbox.restored_unpublished(offset);
            self.publishing.insert(offset);
            self.out.push(Action::PublishConsent {
                state_offset: offset,
                events,
            });
        }
        for (id, retired) in restored.retired {
            self.forget_at
                .insert((self.forget_time(&retired), id.clone()));
            self.retired.insert(id, retired);
        }
        for (id, payment) in restored.payments {
            self.set_payment(id, payment, now);
        }
        for (offset, events) in restored.unpublished {
            self.outbox.restored_unpublished(offset);
            self.publish(offset, events);
        }
        let mut zombies: Vec<String> = restored.zombie_keys.into_iter().collect();
        zombies.sort();
        if !zombies.is_empty() {
            warn!(
                partition = self.config.partition,
                keys = zombies.len(),
                "re-writing keys a superseded owner wrote last"
            );
        }
        for key in zombies {
            self.on_stale(key, -1, now);
        }
        // A consent whose predecessor had a bank call out recovers it (domain::consent,
        // `Restored`).
        let mut consents: Vec<ConsentKey> = self
            .consents
            .iter()
            .filter(|(_, e)| !e.record.consent.state.is_final())
            .map(|(k, _)| k.clone())
            .collect();
        consents.sort();
        for key in consents {
            self.consent_input(
                key,
                crate::domain::consent::ConsentInput::Restored,
                None,
                now,
            );
        }
        let mut resume: Vec<PaymentId> = self
            .payments
            .iter()
            .filter(|(id, p)| !p.state.is_terminal() && !self.quarantined_payments.contains(*id))
            .map(|(id, _)| id.clone())
            .collect();
        resume.sort();
        for id in resume {
            if self.busy.contains(&id) {
                // Being healed: resume once the copy is durable.
                self.queues.entry(id).or_default().push_back(Queued {
                    input: Input::Restored,
                    source: None,
                });
            } else {
                self.set_busy(&id);
                self.apply(id, Input::Restored, None, now);
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Commands

    fn on_command(&mut self, record: CommandRecord, now: Millis) {
        if self.phase != Phase::Running {
            // Not begun, so not committed: the next owner reads it again.
            return;
        }
        let CommandRecord { message, decoded } = record;
        let offset = message.offset();
        self.offsets.begin(offset);
        let today = chrono::DateTime::from_timestamp_millis(now)
            .map(|t| t.date_naive())
            .unwrap_or_default();
        let verdict = match decoded {
            Decoded::Undecodable {
                class,
                message: why,
            } => Ingested::DeadLetter {
                class,
                message: why,
                payment_id: None,
            },
            Decoded::Envelope(envelope) => ingest::to_input(
                *envelope,
                message.key(),
                message.partition(),
                self.config.partitions,
                &self.config.limits,
                today,
            ),
        };
        match verdict {
            Ingested::DeadLetter {
                class,
                message: why,
                payment_id,
            } => {
                warn!(partition = self.config.partition, offset, class, message = %why, "command dead-lettered");
                self.defer(Verdict::DeadLetter {
                    record: Box::new(message),
                    class,
                    message: why,
                    payment_id,
                });
            }
            Ingested::Consent { target, input } => {
                self.consent_command(target, *input, Box::new(message), now);
            }
            Ingested::Apply {
                payment_id,
                input,
                funds_check,
                ..
            } => {
                if self.quarantined_payments.contains(&payment_id) {
                    let label =
                        CommandLabel::of(&input).map_or(ingest::UNKNOWN_TYPE, |l| l.command_type);
                    ingest::count_dead_letter(label, QUARANTINED);
                    self.defer(Verdict::DeadLetter {
                        record: Box::new(message),
                        class: QUARANTINED,
                        message: "the payment's state record could not be read and is quarantined (pis-worker state quarantined); replay this command once it is resolved".into(),
                        payment_id: Some(payment_id.to_string()),
                    });
                } else if self.busy.contains(&payment_id) {
                    self.queues
                        .entry(payment_id)
                        .or_default()
                        .push_back(Queued {
                            input: *input,
                            source: Some(Box::new(message)),
                        });
                } else {
                    self.set_busy(&payment_id);
                    let held = funds_check
                        .then(|| self.hold_for_funds(&payment_id, &input, now))
                        .flatten();
                    match held {
                        Some(key) => {
                            self.start_funds_check(key, payment_id, *input, Box::new(message), now)
                        }
                        None => self.apply(payment_id, *input, Some(Box::new(message)), now),
                    }
                }
            }
        }
    }

    /// Applies one input to a payment marked busy. `source` is the command record, if any.
    fn apply(
        &mut self,
        payment_id: PaymentId,
        input: Input,
        source: Option<Box<OwnedMessage>>,
        now: Millis,
    ) {
        let label = source.as_ref().and_then(|_| CommandLabel::of(&input));
        if let Some(retired) = self.retired.get(&payment_id) {
            self.retired_input(payment_id, retired.clone(), source, label);
            return;
        }
        // A re-delivered record (a crash before its offset was committed) is recognised by its
        // offset: exact, however many commands the payment took since.
        if let (Some(record), Some(current)) = (&source, self.payments.get(&payment_id)) {
            if current
                .last_command_offset
                .is_some_and(|last| record.offset() <= last)
            {
                if let Some(label) = label {
                    label.record(&Outcome::Ignored(Ignored::DuplicateCommand));
                }
                debug!(partition = self.config.partition, %payment_id, offset = record.offset(), "re-delivered command ignored");
                self.defer(Verdict::Done(record.offset()));
                self.release(&payment_id);
                return;
            }
        }
        let input = self.with_token_knowledge(&payment_id, input);
        let current = self.payments.get(&payment_id);
        let outcome = decide(&payment_id, current, input, now, &self.config.policy);
        if let Some(label) = label {
            label.record(&outcome);
        }
        match outcome {
            Outcome::Changed(transition) => {
                let mut transition = *transition;
                let previous = current.map(|p| p.state.kind());
                let volatile = current.is_some_and(|p| transition.is_volatile(p, source.is_some()));
                let next = transition.payment.state.kind();
                if previous == Some(StateKind::Initiating)
                    && matches!(
                        transition.payment.state,
                        crate::domain::machine::PaymentState::OutcomeUnknown { .. }
                    )
                {
                    crate::metrics::metrics()
                        .orphans_suspected
                        .with_label_values(&[self.config.policy.unknown_outcome.as_str()])
                        .inc();
                }
                if previous != Some(next) {
                    crate::metrics::metrics()
                        .state_transitions
                        .with_label_values(&[
                            previous.map(StateKind::symbol).unwrap_or("NONE"),
                            next.symbol(),
                        ])
                        .inc();
                    info!(
                        partition = self.config.partition,
                        payment_id = %payment_id,
                        from = previous.map(StateKind::symbol).unwrap_or("NEW"),
                        to = next.symbol(),
                        events = transition.events.len(),
                        "transition"
                    );
                }
                debug_assert!(
                    transition.effects.len() <= 1,
                    "a transition asks for one effect at most"
                );
                if let Some(record) = &source {
                    transition.payment.last_command_offset = Some(record.offset());
                }
                // A settlement is confirmed from the debtor's history first, when it can be.
                if let Some(plan) = self.evidence_plan(&transition, now) {
                    self.hold_for_evidence(plan, payment_id, transition, source, volatile, now);
                    return;
                }
                self.commit(
                    payment_id,
                    transition,
                    source.map(|r| r.offset()),
                    volatile,
                    now,
                );
            }
            Outcome::Ignored(why) => {
                debug!(partition = self.config.partition, %payment_id, ?why, "input ignored");
                if let Some(record) = source {
                    self.defer(Verdict::Done(record.offset()));
                }
                self.release(&payment_id);
            }
            Outcome::Refused(refusal) => {
                warn!(
                    partition = self.config.partition,
                    %payment_id,
                    code = refusal.code.as_str(),
                    message = %refusal.message,
                    "command refused"
                );
                if let Some(record) = source {
                    self.defer(Verdict::DeadLetter {
                        record,
                        class: refusal.code.as_str(),
                        message: refusal.message,
                        payment_id: Some(payment_id.to_string()),
                    });
                }
                self.release(&payment_id);
            }
        }
    }

    /// Writes (or, for polling bookkeeping, only keeps) a transition of a busy payment, then
    /// its effect runs once the write is confirmed.
    fn commit(
        &mut self,
        payment_id: PaymentId,
        transition: crate::domain::machine::Transition,
        source: Option<i64>,
        volatile: bool,
        now: Millis,
    ) {
        let effect = transition.effects.first().copied();
        if volatile {
            // Polling bookkeeping: not written (see `Transition::is_volatile`).
            self.set_payment(payment_id.clone(), transition.payment, now);
            match effect {
                Some(effect) => self.run_effect(payment_id, effect, now),
                None => self.release(&payment_id),
            }
            return;
        }
        let events = transition.events;
        self.write(
            StateWrite::Payment {
                payment: Box::new(transition.payment.clone()),
                events: events.clone(),
            },
            ACTED_ON,
            AfterWrite::Payment {
                payment_id: payment_id.clone(),
                source,
                events,
                effect,
            },
        );
        self.set_payment(payment_id, transition.payment, now);
    }

    /// A cancellation needs the PSU's pair at the payment's own brand.
    fn with_token_knowledge(&self, payment_id: &PaymentId, input: Input) -> Input {
        match input {
            Input::Cancel {
                command_id, psu_id, ..
            } => {
                let bank_token = self
                    .payments
                    .get(payment_id)
                    .and_then(|p| p.order.as_ref())
                    .is_some_and(|order| {
                        self.tokens
                            .contains_key(&TokenKey::new(order.brand(), psu_id.clone()))
                    });
                Input::Cancel {
                    command_id,
                    psu_id,
                    bank_token,
                }
            }
            other => other,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Effects and token lanes

    fn run_effect(&mut self, payment_id: PaymentId, effect: Effect, now: Millis) {
        if !self.payments.contains_key(&payment_id) {
            self.release(&payment_id);
            return;
        }
        match effect {
            Effect::StartInitiation => {
                // A new bank-side intent: not while draining (the next owner starts it; a
                // `RECEIVED` payment without a timer resumes with it).
                if self.phase != Phase::Running {
                    self.release(&payment_id);
                    return;
                }
                // A returning PSU: no verifier, the attempt goes with the PSU's access token.
                let with_token = self.may_initiate_with_token(&payment_id, now);
                let pkce_verifier = (!with_token).then(|| self.random.pkce_verifier());
                let input = Input::BeginInitiation {
                    pkce_verifier,
                    sca_state: self.random.sca_state(),
                };
                self.apply(payment_id, input, None, now);
            }
            Effect::CallInitiate => {
                let with_token = self
                    .payments
                    .get(&payment_id)
                    .is_some_and(|p| !p.awaits_code());
                if with_token {
                    self.lane_op(payment_id, LaneOp::Initiate, now);
                } else {
                    crate::metrics::metrics()
                        .initiation_calls
                        .with_label_values(&["pkce"])
                        .inc();
                    self.call(
                        payment_id,
                        BankCall::Initiate { access_token: None },
                        Purpose::Payment,
                    );
                }
            }
            Effect::CheckStatus => self.call(payment_id, BankCall::Status, Purpose::Payment),
            Effect::ExchangeCode => self.lane_op(payment_id, LaneOp::Exchange, now),
            Effect::CallCancel => self.lane_op(payment_id, LaneOp::Cancel, now),
        }
    }

    /// Queues an operation on the pair of the payment's brand and PSU.
    fn lane_op(&mut self, payment_id: PaymentId, op: fn(PaymentId) -> LaneOp, now: Millis) {
        let lane = self
            .payments
            .get(&payment_id)
            .and_then(|p| Some(TokenKey::new(p.order.as_ref()?.brand(), p.psu_id.clone())));
        let Some(lane) = lane else {
            self.release(&payment_id);
            return;
        };
        self.lanes
            .entry(lane.clone())
            .or_default()
            .queue
            .push_back(op(payment_id));
        self.next_lane_op(lane, now);
    }

    fn call(&mut self, payment_id: PaymentId, call: BankCall, purpose: Purpose) {
        let Some(payment) = self.payments.get(&payment_id) else {
            return;
        };
        let id = self.next_call;
        self.next_call += 1;
        self.out.push(Action::Call {
            id,
            payment: Box::new(payment.clone()),
            call,
        });
        self.calls.insert(
            id,
            PendingCall {
                payment_id,
                purpose,
            },
        );
    }

    /// Starts the lane's next operation if none is running. Operations issue or use the PSU's
    /// pair, and Belfius kills the old pair when it issues a new one: one at a time.
    fn next_lane_op(&mut self, key: TokenKey, now: Millis) {
        match self.phase {
            Phase::Running | Phase::Draining { .. } => {}
            Phase::Finishing { .. } | Phase::Released | Phase::Fenced => return,
        }
        let Some(lane) = self.lanes.get_mut(&key) else {
            return;
        };
        if lane.running {
            return;
        }
        let Some(op) = lane.queue.pop_front() else {
            self.lanes.remove(&key);
            return;
        };
        lane.running = true;
        match op {
            LaneOp::Exchange(payment_id) => {
                let has_code = self
                    .payments
                    .get(&payment_id)
                    .is_some_and(|p| p.authorization_code.is_some());
                if has_code {
                    self.call(
                        payment_id,
                        BankCall::Exchange,
                        Purpose::Exchange { lane: key },
                    );
                } else {
                    self.lane_done(&key, now);
                    let input = Input::TokenExchangeFailed {
                        message: "internal: no authorization code to exchange".into(),
                    };
                    self.apply(payment_id, input, None, now);
                }
            }
            LaneOp::Cancel(payment_id) => match self.pair_use(&key, now) {
                PairUse::Present(access_token) => self.call(
                    payment_id,
                    BankCall::Cancel { access_token },
                    Purpose::Cancel { lane: key },
                ),
                PairUse::RefreshFirst(refresh_token) => self.call(
                    payment_id,
                    BankCall::Refresh {
                        brand: key.brand,
                        refresh_token,
                    },
                    Purpose::RefreshToCancel { lane: key },
                ),
                PairUse::Unusable => {
                    self.lane_done(&key, now);
                    let input = Input::CancelRefused(Reason::new(
                        ReasonCode::CancelRefused,
                        "no valid PIS token for this PSU: the PSU must authorize again",
                    ));
                    self.apply(payment_id, input, None, now);
                }
            },
            LaneOp::Initiate(payment_id) => match self.pair_use(&key, now) {
                PairUse::Present(access_token) => {
                    self.call_initiate_with(key, payment_id, access_token)
                }
                PairUse::RefreshFirst(refresh_token) => self.call(
                    payment_id,
                    BankCall::Refresh {
                        brand: key.brand,
                        refresh_token,
                    },
                    Purpose::RefreshToInitiate { lane: key },
                ),
                // Gone since the attempt was begun (a dead grant deleted it, say).
                PairUse::Unusable => {
                    self.lane_done(&key, now);
                    let input = self.pkce_fallback(
                        &payment_id,
                        "no_token",
                        "no usable PIS token of the PSU any more",
                    );
                    self.apply(payment_id, input, None, now);
                }
            },
        }
    }

    /// What the pair of `key` allows now. A token is refreshed a little before its expiry: a
    /// quarter of its lifetime, at most 30 s.
    fn pair_use(&self, key: &TokenKey, now: Millis) -> PairUse {
        let Some(t) = self.tokens.get(key) else {
            return PairUse::Unusable;
        };
        let margin = t
            .expires_at
            .map(|at| ((at - t.updated_at) / 4).clamp(0, TOKEN_MARGIN_MS))
            .unwrap_or(0);
        let fresh = t.expires_at.is_none_or(|at| at > now + margin);
        match (fresh, &t.refresh_token) {
            (true, _) => PairUse::Present(t.access_token.clone()),
            (false, Some(refresh_token)) => PairUse::RefreshFirst(refresh_token.clone()),
            (false, None) => PairUse::Unusable,
        }
    }

    /// Whether the next attempt of this payment goes with the PSU's access token: the
    /// deployment allows it, the client did not ask for PKCE, and the owner holds a pair of the
    /// payment's (brand, PSU) it can present or refresh. Belfius documents the pair from a
    /// signed payment's code as usable "for future payment initiations" [P].
    fn may_initiate_with_token(&self, payment_id: &PaymentId, now: Millis) -> bool {
        if !self.config.policy.initiate_with_token {
            return false;
        }
        let Some(payment) = self.payments.get(payment_id) else {
            return false;
        };
        let Some(order) = payment.order.as_ref().filter(|_| !payment.always_pkce) else {
            return false;
        };
        let key = TokenKey::new(order.brand(), payment.psu_id.clone());
        match self.pair_use(&key, now) {
            PairUse::Present(_) | PairUse::RefreshFirst(_) => true,
            PairUse::Unusable => false,
        }
    }

    /// The initiation POST with the PSU's access token; the lane stays with it until it answers.
    fn call_initiate_with(
        &mut self,
        lane: TokenKey,
        payment_id: PaymentId,
        access_token: SecretString,
    ) {
        crate::metrics::metrics()
            .initiation_calls
            .with_label_values(&["token"])
            .inc();
        self.call(
            payment_id,
            BankCall::Initiate {
                access_token: Some(access_token),
            },
            Purpose::InitiateWithToken { lane },
        );
    }

    /// The input that sends an attempt meant for the PSU's token with PKCE instead. Nothing
    /// was created at the bank (a refused token, or no call at all), so it is the same attempt.
    fn pkce_fallback(&mut self, payment_id: &PaymentId, why: &'static str, detail: &str) -> Input {
        crate::metrics::metrics()
            .token_initiation_fallbacks
            .with_label_values(&[why])
            .inc();
        info!(
            partition = self.config.partition,
            %payment_id,
            why,
            detail,
            "initiating with PKCE instead of the PSU's token"
        );
        Input::FallBackToPkce {
            pkce_verifier: self.random.pkce_verifier(),
        }
    }

    fn lane_done(&mut self, key: &TokenKey, now: Millis) {
        if let Some(lane) = self.lanes.get_mut(key) {
            lane.running = false;
        }
        self.next_lane_op(key.clone(), now);
    }

    fn on_answer(&mut self, call: CallId, answer: BankAnswer, now: Millis) {
        if let Some((key, purpose)) = self.consent_calls.remove(&call) {
            self.on_consent_answer(key, purpose, answer, now);
            return;
        }
        let Some(PendingCall {
            payment_id,
            purpose,
        }) = self.calls.remove(&call)
        else {
            return;
        };
        match (purpose, answer) {
            (Purpose::Payment, BankAnswer::Input(input)) => {
                self.apply(payment_id, *input, None, now);
            }
            (Purpose::Exchange { lane }, BankAnswer::Tokens(pair)) => {
                self.store_tokens(lane, payment_id, pair, AfterTokens::Exchanged, now);
            }
            (Purpose::RefreshToCancel { lane }, BankAnswer::Tokens(pair)) => {
                self.store_tokens(lane, payment_id, pair, AfterTokens::Cancel, now);
            }
            (Purpose::RefreshToInitiate { lane }, BankAnswer::Tokens(pair)) => {
                self.store_tokens(lane, payment_id, pair, AfterTokens::Initiate, now);
            }
            (Purpose::InitiateWithToken { lane }, BankAnswer::Input(input)) => {
                self.lane_done(&lane, now);
                self.apply(payment_id, *input, None, now);
            }
            (Purpose::InitiateWithToken { lane }, BankAnswer::AccessTokenRejected { message }) => {
                self.initiation_token_rejected(lane, payment_id, message);
            }
            (Purpose::RefreshToInitiate { lane }, BankAnswer::RefreshFailed(failure)) => {
                self.refresh_failed(lane, payment_id, failure, LaneUse::Initiate, now);
            }
            (Purpose::Cancel { lane }, BankAnswer::AccessTokenRejected { message }) => {
                self.access_token_rejected(lane, payment_id, message, now);
            }
            (Purpose::Exchange { lane } | Purpose::Cancel { lane }, BankAnswer::Input(input)) => {
                self.token_retried.remove(&payment_id);
                self.lane_done(&lane, now);
                self.apply(payment_id, *input, None, now);
            }
            (Purpose::RefreshToCancel { lane }, BankAnswer::RefreshFailed(failure)) => {
                self.refresh_failed(lane, payment_id, failure, LaneUse::Cancel, now);
            }
            (purpose, answer) => {
                warn!(
                    ?purpose,
                    ?answer,
                    "internal: a bank answer that does not fit its call"
                );
                if let Purpose::Exchange { lane }
                | Purpose::Cancel { lane }
                | Purpose::RefreshToCancel { lane }
                | Purpose::InitiateWithToken { lane }
                | Purpose::RefreshToInitiate { lane } = purpose
                {
                    self.lane_done(&lane, now);
                }
                self.release(&payment_id);
            }
        }
    }

    /// A new pair is durable (and confirmed) before anything uses it: Belfius invalidated the
    /// previous one, so losing the new one would lock the PSU out.
    fn store_tokens(
        &mut self,
        lane: TokenKey,
        payment_id: PaymentId,
        pair: TokenPair,
        then: AfterTokens,
        now: Millis,
    ) {
        let record = PsuTokens {
            psu_id: lane.psu_id.clone(),
            brand: lane.brand,
            access_token: pair.access_token,
            // A refresh answer without a new refresh token keeps the old one usable.
            refresh_token: pair
                .refresh_token
                .or_else(|| self.tokens.get(&lane).and_then(|t| t.refresh_token.clone())),
            expires_at: pair
                .expires_in
                .map(|d| now + i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)),
            updated_at: now,
        };
        self.tokens.insert(lane.clone(), record.clone());
        self.write(
            StateWrite::Tokens(Box::new(record)),
            TOKENS_USED,
            AfterWrite::Tokens {
                lane,
                payment_id,
                then,
            },
        );
    }

    /// The bank refused the PSU's access token: presenting it again would be refused again
    /// (the sandbox counts such reuses). Refresh once and retry the cancellation; a dead grant
    /// then deletes the pair (see `refresh_failed`), and a second refusal ends the attempt.
    fn access_token_rejected(
        &mut self,
        lane: TokenKey,
        payment_id: PaymentId,
        message: String,
        now: Millis,
    ) {
        let first = self.token_retried.insert(payment_id.clone());
        let refreshable = self
            .tokens
            .get(&lane)
            .is_some_and(|t| t.refresh_token.is_some());
        if first && refreshable {
            if let Some(tokens) = self.tokens.get_mut(&lane) {
                // Treated as expired from now on: the next cancellation refreshes first.
                tokens.expires_at = Some(Millis::MIN / 2);
            }
            if let Some(queue) = self.lanes.get_mut(&lane).map(|l| &mut l.queue) {
                queue.push_front(LaneOp::Cancel(payment_id));
            }
            self.lane_done(&lane, now);
        } else if !refreshable {
            // Nothing left to try the pair with: forget it, as a dead grant.
            self.refresh_failed(
                lane,
                payment_id,
                RefreshFailure::Revoked { message },
                LaneUse::Cancel,
                now,
            );
        } else {
            self.token_retried.remove(&payment_id);
            self.lane_done(&lane, now);
            let input = Input::CancelRefused(Reason::new(
                ReasonCode::BankSecurityFailure,
                format!(
                    "the bank refused the PSU's PIS token again after a refresh ({message}); the PSU must authorize again"
                ),
            ));
            self.apply(payment_id, input, None, now);
        }
    }

    /// The bank refused the PSU's access token on an initiation made with it (a 401 creates
    /// nothing at the bank): the attempt goes again with PKCE once the pair is settled, as a
    /// refused cancellation token's is. With a refresh token the pair is marked expired (the
    /// next use refreshes first, and a dead grant then deletes it); without one it is deleted.
    /// No refresh-and-retry here: PKCE always works, and its code brings a new pair anyway.
    fn initiation_token_rejected(
        &mut self,
        lane: TokenKey,
        payment_id: PaymentId,
        message: String,
    ) {
        let detail = format!("the bank refused the PSU's access token: {message}");
        let input = self.pkce_fallback(&payment_id, "refused", &detail);
        let marked = self.tokens.get_mut(&lane).and_then(|tokens| {
            tokens.refresh_token.as_ref()?;
            tokens.expires_at = Some(Millis::MIN / 2);
            Some(tokens.clone())
        });
        if let Some(marked) = marked {
            // Durably: a restart must not present the refused token again (the bank counts a
            // replaced token presented twice as a TPP that lost track of its pair).
            self.write(
                StateWrite::Tokens(Box::new(marked)),
                TOKENS_USED,
                AfterWrite::PairSettled {
                    lane,
                    payment_id,
                    input: Box::new(input),
                },
            );
        } else {
            self.delete_pair_then(lane, payment_id, input);
        }
    }

    /// Forgets a dead pair, durably (fenced like any write), then `input` ends the lane
    /// operation that found it dead.
    fn delete_pair_then(&mut self, lane: TokenKey, payment_id: PaymentId, input: Input) {
        self.tokens.remove(&lane);
        self.write(
            StateWrite::DeleteTokens(lane.clone()),
            TOKENS_USED,
            AfterWrite::PairSettled {
                lane,
                payment_id,
                input: Box::new(input),
            },
        );
    }

    fn refresh_failed(
        &mut self,
        lane: TokenKey,
        payment_id: PaymentId,
        failure: RefreshFailure,
        used_for: LaneUse,
        now: Millis,
    ) {
        self.token_retried.remove(&payment_id);
        let m = crate::metrics::metrics();
        match failure {
            // The grant is dead: forget the pair (durably, fenced like any write), so the next
            // operation does not try it again.
            RefreshFailure::Revoked { message } => {
                m.token_refresh_refusals
                    .with_label_values(&["revoked"])
                    .inc();
                let input = match used_for {
                    LaneUse::Cancel => Input::CancelRefused(Reason::new(
                        ReasonCode::BankSecurityFailure,
                        format!(
                            "the bank refused to refresh the PIS token ({message}); the PSU must authorize again"
                        ),
                    )),
                    LaneUse::Initiate => self.pkce_fallback(
                        &payment_id,
                        "refresh_failed",
                        &format!("the bank refused to refresh the PIS token: {message}"),
                    ),
                };
                self.delete_pair_then(lane, payment_id, input);
            }
            // Perhaps our credentials, not the PSU's grant: keep the pair, alert.
            RefreshFailure::Refused { message } => {
                m.token_refresh_refusals.with_label_values(&["other"]).inc();
                warn!(partition = self.config.partition, psu = %lane, %message, "token refresh refused for a reason other than a dead grant: the pair is kept");
                self.lane_done(&lane, now);
                let input = match used_for {
                    LaneUse::Cancel => Input::CancelRefused(Reason::new(
                        ReasonCode::BankSecurityFailure,
                        format!(
                            "the bank refused the token refresh ({message}); the PIS token is kept: an operator must check the worker's credentials"
                        ),
                    )),
                    LaneUse::Initiate => self.pkce_fallback(
                        &payment_id,
                        "refresh_failed",
                        &format!("the bank refused the token refresh: {message}"),
                    ),
                };
                self.apply(payment_id, input, None, now);
            }
            // Nothing was sent to cancel: say so; the client may send CancelPayment again. An
            // initiation needs no pair: it goes with PKCE, whose code brings a new pair.
            RefreshFailure::Transient { message } => {
                self.lane_done(&lane, now);
                let input = match used_for {
                    LaneUse::Cancel => Input::CancelRefused(Reason::new(
                        ReasonCode::CancelNotConfirmed,
                        format!(
                            "the cancellation was not sent: the token refresh failed ({message}); send CancelPayment again"
                        ),
                    )),
                    LaneUse::Initiate => self.pkce_fallback(
                        &payment_id,
                        "refresh_failed",
                        &format!("the token refresh failed: {message}"),
                    ),
                };
                self.apply(payment_id, input, None, now);
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Retention: final payments leave, their ids are remembered, then forgotten

    /// When a retired id is forgotten: the retired-ids horizon after the final event (never
    /// before the retention horizon).
    fn forget_time(&self, retired: &Retired) -> Millis {
        let horizon = self
            .config
            .retired_ids_retention_ms
            .max(self.config.retention_ms);
        retired.final_at.saturating_add(horizon)
    }

    /// An input for a retired id (the payment is marked busy): a re-delivered command is done,
    /// any other command is dead-lettered `PAYMENT_RETIRED` once a later write is confirmed;
    /// anything else (a timer, a resumption) has nothing left to act on.
    fn retired_input(
        &mut self,
        payment_id: PaymentId,
        retired: Retired,
        source: Option<Box<OwnedMessage>>,
        label: Option<CommandLabel>,
    ) {
        if let Some(record) = source {
            if retired
                .last_command_offset
                .is_some_and(|last| record.offset() <= last)
            {
                if let Some(label) = label {
                    label.record(&Outcome::Ignored(Ignored::DuplicateCommand));
                }
                self.defer(Verdict::Done(record.offset()));
            } else {
                let command_type = label.map_or(ingest::UNKNOWN_TYPE, |l| l.command_type);
                ingest::count_dead_letter(command_type, PAYMENT_RETIRED);
                let message = format!(
                    "payment {payment_id} reached its final state {} at {} and was retired at {}; its id is remembered until {} and never starts a new payment before then: use a new payment_id",
                    retired.final_state.symbol(),
                    rfc3339(retired.final_at),
                    rfc3339(retired.retired_at),
                    rfc3339(self.forget_time(&retired)),
                );
                warn!(partition = self.config.partition, %payment_id, offset = record.offset(), "command for a retired payment dead-lettered");
                self.defer(Verdict::DeadLetter {
                    record,
                    class: PAYMENT_RETIRED,
                    message,
                    payment_id: Some(payment_id.to_string()),
                });
            }
        }
        self.release(&payment_id);
    }

    /// Final payments whose retention horizon passed: each one that is idle, has no queued
    /// command and whose events are all published gets its retired record (fenced); the others
    /// are looked at again a little later.
    fn retire_due(&mut self, now: Millis) {
        let due: Vec<(Millis, PaymentId)> = self
            .retire_at
            .iter()
            .take_while(|(at, _)| *at <= now)
            .cloned()
            .collect();
        for entry in due {
            self.retire_at.remove(&entry);
            let id = entry.1;
            let Some(payment) = self.payments.get(&id) else {
                continue;
            };
            if !payment.state.is_terminal() || self.quarantined_payments.contains(&id) {
                // A quarantined payment is held for a person; it is not retired.
                continue;
            }
            let waiting = self.busy.contains(&id)
                || self.queues.contains_key(&id)
                || self.stale.contains_key(&payment_key(&id))
                || self.publishing_for.values().any(|p| p == &id);
            if waiting {
                self.retire_at
                    .insert((now.saturating_add(RETIRE_RETRY_MS), id));
                continue;
            }
            let retired = Retired::of(payment, now);
            debug!(partition = self.config.partition, payment_id = %id, "retiring a final payment");
            self.set_busy(&id);
            self.write(
                StateWrite::Retired(Box::new(retired.clone())),
                RETIRE,
                AfterWrite::Retired(Box::new(retired)),
            );
        }
    }

    /// The retired record is durable and confirmed: the payment leaves memory; commands queued
    /// meanwhile are dead-lettered as for a retired id.
    fn retired_written(&mut self, retired: Retired, offset: i64) {
        let id = retired.payment_id.clone();
        self.healed(&payment_key(&id), offset);
        if let Some(payment) = self.payments.remove(&id) {
            if let Some(at) = payment.next_check_at {
                self.timers.remove(&(at, id.clone()));
            }
        }
        self.entered.remove(&id);
        self.token_retried.remove(&id);
        self.forget_at
            .insert((self.forget_time(&retired), id.clone()));
        info!(
            partition = self.config.partition,
            payment_id = %id,
            final_state = retired.final_state.symbol(),
            "final payment retired"
        );
        self.retired.insert(id.clone(), retired);
        crate::metrics::metrics().payments_retired.inc();
        self.release(&id);
    }

    /// Retired ids past the retired-ids horizon: their record is deleted (fenced), then the id
    /// is forgotten (a new `InitiatePayment` with it is a new payment).
    fn forget_due(&mut self, now: Millis) {
        let due: Vec<(Millis, PaymentId)> = self
            .forget_at
            .iter()
            .take_while(|(at, _)| *at <= now)
            .cloned()
            .collect();
        for entry in due {
            self.forget_at.remove(&entry);
            let id = entry.1;
            if !self.retired.contains_key(&id) {
                continue;
            }
            if self.busy.contains(&id) || self.queues.contains_key(&id) {
                self.forget_at
                    .insert((now.saturating_add(RETIRE_RETRY_MS), id));
                continue;
            }
            self.set_busy(&id);
            self.write(
                StateWrite::DeleteKey(payment_key(&id)),
                FORGET,
                AfterWrite::Forgotten { payment_id: id },
            );
        }
    }

    /// Token pairs of a (brand, PSU) with no live payment in the partition, no operation on
    /// their lane, and nothing left to use them for: deleted (fenced). A pair is gone for good
    /// when it has no refresh token and its access token expired (its expiry known), or, since
    /// a refresh token's lifetime is not known (Belfius does not document it), once the
    /// retention horizon passed since the pair was last updated.
    fn sweep_tokens(&mut self, now: Millis) {
        if now < self.next_token_sweep_at {
            return;
        }
        self.next_token_sweep_at = now.saturating_add(token_sweep_interval(&self.config));
        let live: HashSet<TokenKey> = self
            .payments
            .values()
            .filter(|p| !p.state.is_terminal())
            .filter_map(|p| Some(TokenKey::new(p.order.as_ref()?.brand(), p.psu_id.clone())))
            .collect();
        let mut gone: Vec<TokenKey> = self
            .tokens
            .iter()
            .filter(|(key, _)| !live.contains(*key) && !self.lanes.contains_key(*key))
            .filter(|(_, t)| {
                let access_expired = t.expires_at.is_some_and(|at| at <= now);
                let dead = t.refresh_token.is_none() && access_expired;
                let old = t.updated_at.saturating_add(self.config.retention_ms) <= now;
                dead || old
            })
            .map(|(key, _)| key.clone())
            .collect();
        gone.sort();
        for key in gone {
            info!(partition = self.config.partition, psu = %key, "deleting an expired PIS token pair of a PSU without live payments");
            self.tokens.remove(&key);
            let record_key = psu_key(&key);
            self.write(
                StateWrite::DeleteTokens(key),
                TOKENS_EXPIRED,
                AfterWrite::Heal { key: record_key },
            );
        }
    }

    // -----------------------------------------------------------------------------------------
    // Snapshots (docs/architecture.md, "Snapshots")

    fn live_entities(&self) -> u64 {
        (self.payments.len()
            + self.retired.len()
            + self.tokens.len()
            + self.consents.len()
            + self.quarantined.len()) as u64
    }

    fn snapshot_due(&self, now: Millis) -> bool {
        let backlog = self.restore_backlog();
        let bound = self
            .config
            .snapshot_min_records
            .max(self.live_entities().saturating_mul(2));
        now >= self.snapshot_not_before
            && (backlog >= bound || (now >= self.next_snapshot_at && backlog > 0))
    }

    fn snapshot_step(&mut self, now: Millis) {
        if self.snapshot.is_none() {
            if !self.snapshot_due(now) {
                if now >= self.next_snapshot_at {
                    self.next_snapshot_at = now.saturating_add(self.config.snapshot_interval_ms);
                }
                return;
            }
            self.begin_snapshot(now);
        }
        self.copy_snapshot_items();
        self.finish_snapshot(now);
    }

    fn begin_snapshot(&mut self, now: Millis) {
        self.next_snapshot_at = now.saturating_add(self.config.snapshot_interval_ms);
        let mut todo: Vec<SnapshotItem> = Vec::with_capacity(self.live_entities() as usize);
        let mut ids: Vec<&PaymentId> = self.payments.keys().chain(self.retired.keys()).collect();
        ids.sort();
        todo.extend(ids.into_iter().map(|id| SnapshotItem::Payment(id.clone())));
        let mut pairs: Vec<&TokenKey> = self.tokens.keys().collect();
        pairs.sort();
        todo.extend(pairs.into_iter().map(|k| SnapshotItem::Tokens(k.clone())));
        todo.extend(self.consent_snapshot_items());
        todo.extend(
            self.quarantined
                .keys()
                .map(|k| SnapshotItem::Quarantined(k.clone())),
        );
        let writes_before = self.writes_issued;
        self.snapshots_begun += 1;
        let key = crate::kafka::state::snapshot_begin_key(
            self.config.partition,
            self.config.epoch,
            self.snapshots_begun,
        );
        debug!(
            partition = self.config.partition,
            entities = todo.len(),
            backlog = self.restore_backlog(),
            "snapshot begins"
        );
        self.snapshot = Some(SnapshotRun {
            begin: None,
            todo: todo.into(),
            waiting: Vec::new(),
            copies_in_flight: 0,
            entities: 0,
            writes_before,
            key: key.clone(),
            at: now,
            end: SnapshotEnd::NotYet,
        });
        self.write(
            StateWrite::SnapshotBegin { key, at: now },
            SNAPSHOT_COPY,
            AfterWrite::SnapshotBegin,
        );
    }

    /// The write that copies `item` now, `Ok(None)` if it is gone, `Err(item)` if it is busy
    /// (its in-memory state may be ahead of, or behind, what it last wrote: a retirement or a
    /// forgetting is written before memory follows).
    fn snapshot_copy(&self, item: SnapshotItem) -> Result<Option<StateWrite>, SnapshotItem> {
        match &item {
            // A quarantined payment's last good state is copied too: its quarantined record is
            // copied after it (items of quarantined keys come last), so it stays held.
            SnapshotItem::Payment(id) => {
                if self.busy.contains(id) {
                    return Err(item);
                }
                if let Some(payment) = self.payments.get(id) {
                    return Ok(Some(StateWrite::Payment {
                        payment: Box::new(payment.clone()),
                        events: Vec::new(),
                    }));
                }
                Ok(self
                    .retired
                    .get(id)
                    .map(|r| StateWrite::Retired(Box::new(r.clone()))))
            }
            SnapshotItem::Tokens(key) => {
                if self.lanes.contains_key(key) {
                    return Err(item);
                }
                Ok(self
                    .tokens
                    .get(key)
                    .map(|t| StateWrite::Tokens(Box::new(t.clone()))))
            }
            SnapshotItem::Consent(key) => self.consent_snapshot_copy(key).map_err(|()| item),
            SnapshotItem::Quarantined(key) => {
                Ok(self
                    .quarantined
                    .get(key)
                    .map(|q| StateWrite::QuarantinedCopy {
                        key: key.clone(),
                        record: Box::new(QuarantinedRecord {
                            offset: q.offset,
                            epoch_header: q.epoch_header,
                            value: q.value.clone(),
                        }),
                    }))
            }
        }
    }

    fn copy_snapshot_items(&mut self) {
        let Some(mut run) = self.snapshot.take() else {
            return;
        };
        if run.begin.is_some() {
            if run.todo.is_empty() {
                // The ones that were busy, once the others are done (quarantined keys were
                // never busy, so they stay after every copy of their payment).
                run.todo.extend(std::mem::take(&mut run.waiting));
            }
            let mut pass = run.todo.len();
            while run.copies_in_flight < SNAPSHOT_WINDOW && pass > 0 {
                let Some(item) = run.todo.pop_front() else {
                    break;
                };
                pass -= 1;
                match self.snapshot_copy(item) {
                    Ok(Some(write)) => {
                        run.copies_in_flight += 1;
                        run.entities += 1;
                        self.write(write, SNAPSHOT_COPY, AfterWrite::SnapshotCopy);
                    }
                    Ok(None) => {}
                    Err(busy) => run.waiting.push(busy),
                }
            }
        }
        self.snapshot = Some(run);
    }

    fn finish_snapshot(&mut self, now: Millis) {
        let Some(run) = &mut self.snapshot else {
            return;
        };
        let Some(begin) = run.begin else {
            return;
        };
        match run.end {
            SnapshotEnd::NotYet => {
                if run.todo.is_empty() && run.waiting.is_empty() && run.copies_in_flight == 0 {
                    run.end = SnapshotEnd::Writing;
                    let entities = run.entities;
                    self.write(
                        StateWrite::SnapshotEnd { begin, entities },
                        SNAPSHOT_END,
                        AfterWrite::SnapshotEnd,
                    );
                }
            }
            SnapshotEnd::Confirmed(end) => {
                // A restore from `begin` re-publishes nothing before it: every event of an
                // earlier record must be out first.
                if self.outbox.last_checkpoint() < begin - 1 {
                    self.write_checkpoint_if_due();
                }
                if self.outbox.last_checkpoint() >= begin - 1 {
                    let at = self.snapshot.as_ref().map_or(now, |r| r.at);
                    if let Some(run) = &mut self.snapshot {
                        run.end = SnapshotEnd::Committing;
                    }
                    debug!(
                        partition = self.config.partition,
                        begin, end, "snapshot complete"
                    );
                    self.out.push(Action::CommitSnapshot(SnapshotStart {
                        begin,
                        epoch: self.config.epoch,
                        at,
                    }));
                }
            }
            SnapshotEnd::Writing | SnapshotEnd::Committing => {}
        }
    }

    fn snapshot_committed(&mut self, start: SnapshotStart, outcome: SnapshotCommit, now: Millis) {
        let Some(run) = self.snapshot.take() else {
            return;
        };
        match outcome {
            SnapshotCommit::Committed => {
                info!(
                    partition = self.config.partition,
                    begin = start.begin,
                    entities = run.entities,
                    "snapshot recorded: restores start at its begin"
                );
                self.restore_backlog = 0;
                self.snapshot_writes_base = run.writes_before;
                // Claims before the previous snapshot's begin are read by no restore, even one
                // that a paused owner's late commit sent back to that snapshot.
                let previous = self.newest_snapshot.map_or(i64::MIN, |s| s.begin);
                self.newest_snapshot = Some(start);
                let old: Vec<i64> = self.markers.range(..previous).map(|(o, _)| *o).collect();
                for offset in old {
                    if let Some(key) = self.markers.remove(&offset) {
                        self.write(
                            StateWrite::DeleteKey(key),
                            SNAPSHOT_COPY,
                            AfterWrite::Nothing,
                        );
                    }
                }
            }
            SnapshotCommit::Superseded => {
                info!(
                    partition = self.config.partition,
                    begin = start.begin,
                    "a newer snapshot is already recorded"
                );
                self.snapshot_not_before = now.saturating_add(self.config.snapshot_interval_ms);
            }
            SnapshotCommit::Failed(error) => {
                warn!(
                    partition = self.config.partition,
                    begin = start.begin,
                    %error,
                    "recording a snapshot failed; tried again in a minute at most"
                );
                self.snapshot_not_before =
                    now.saturating_add(self.config.snapshot_interval_ms.min(60_000));
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Writes

    fn write(&mut self, write: StateWrite, fence: FenceWait, after: AfterWrite) -> WriteId {
        self.writes_issued += 1;
        let id = self.outbox.sent();
        self.writes.insert(
            id,
            PendingWrite {
                after,
                confirmed: fence.confirms(),
            },
        );
        self.out.push(Action::Write { id, write, fence });
        id
    }

    fn on_written(&mut self, write: WriteId, offset: i64, now: Millis) {
        let Some(PendingWrite { after, confirmed }) = self.writes.remove(&write) else {
            return;
        };
        let has_events = match &after {
            AfterWrite::Payment { events, .. } => !events.is_empty(),
            AfterWrite::Consent { events, .. } => !events.is_empty(),
            AfterWrite::Tokens { .. }
            | AfterWrite::ConsentTokens { .. }
            | AfterWrite::PairSettled { .. }
            | AfterWrite::Heal { .. }
            | AfterWrite::Retired(_)
            | AfterWrite::RetiredRewritten { .. }
            | AfterWrite::Forgotten { .. }
            | AfterWrite::Checkpoint
            | AfterWrite::SnapshotBegin
            | AfterWrite::SnapshotCopy
            | AfterWrite::SnapshotEnd
            | AfterWrite::Nothing => false,
        };
        self.outbox.acked(write, offset, has_events);
        if confirmed {
            self.release_deferred(write);
        }
        match after {
            AfterWrite::Payment {
                payment_id,
                source,
                events,
                effect,
            } => {
                self.healed(&payment_key(&payment_id), offset);
                if !events.is_empty() {
                    self.publish(offset, events);
                }
                if let Some(command_offset) = source {
                    self.offsets.done(command_offset);
                }
                match effect {
                    Some(effect) => self.run_effect(payment_id, effect, now),
                    None => self.release(&payment_id),
                }
            }
            AfterWrite::Tokens {
                lane,
                payment_id,
                then,
            } => {
                self.healed(&psu_key(&lane), offset);
                match then {
                    AfterTokens::Exchanged => {
                        self.lane_done(&lane, now);
                        self.apply(payment_id, Input::TokenExchanged, None, now);
                    }
                    // The lane stays with this operation: the cancellation uses the new pair.
                    AfterTokens::Cancel => match self.tokens.get(&lane) {
                        Some(tokens) => {
                            let access_token = tokens.access_token.clone();
                            self.call(
                                payment_id,
                                BankCall::Cancel { access_token },
                                Purpose::Cancel { lane },
                            );
                        }
                        None => {
                            self.lane_done(&lane, now);
                            self.release(&payment_id);
                        }
                    },
                    // The lane stays with the initiation too: it presents the new pair.
                    AfterTokens::Initiate => match self.tokens.get(&lane) {
                        Some(tokens) => {
                            let access_token = tokens.access_token.clone();
                            self.call_initiate_with(lane, payment_id, access_token);
                        }
                        None => {
                            self.lane_done(&lane, now);
                            let input = self.pkce_fallback(
                                &payment_id,
                                "no_token",
                                "the refreshed pair is gone",
                            );
                            self.apply(payment_id, input, None, now);
                        }
                    },
                }
            }
            AfterWrite::PairSettled {
                lane,
                payment_id,
                input,
            } => {
                self.healed(&psu_key(&lane), offset);
                self.lane_done(&lane, now);
                self.apply(payment_id, *input, None, now);
            }
            AfterWrite::Heal { key } => self.healed(&key, offset),
            AfterWrite::Consent {
                key,
                source,
                events,
                effect,
                code,
                carry_on,
            } => self.consent_written(key, offset, source, events, effect, code, carry_on, now),
            AfterWrite::ConsentTokens { key, held } => {
                self.consent_tokens_written(key, offset, held, now);
            }
            AfterWrite::Retired(retired) => self.retired_written(*retired, offset),
            AfterWrite::RetiredRewritten { payment_id } => {
                self.healed(&payment_key(&payment_id), offset);
                self.release(&payment_id);
            }
            AfterWrite::Forgotten { payment_id } => {
                self.healed(&payment_key(&payment_id), offset);
                self.retired.remove(&payment_id);
                info!(partition = self.config.partition, %payment_id, "retired payment id forgotten");
                self.release(&payment_id);
            }
            AfterWrite::SnapshotBegin => {
                if let Some(run) = &mut self.snapshot {
                    run.begin = Some(offset);
                    // Deleted, like a claim, once no restore can start at it.
                    self.markers.insert(offset, run.key.clone());
                }
            }
            AfterWrite::SnapshotCopy => {
                if let Some(run) = &mut self.snapshot {
                    run.copies_in_flight = run.copies_in_flight.saturating_sub(1);
                }
            }
            AfterWrite::SnapshotEnd => {
                if let Some(run) = &mut self.snapshot {
                    run.end = SnapshotEnd::Confirmed(offset);
                }
            }
            AfterWrite::Nothing => {}
            AfterWrite::Checkpoint => {
                self.last_checkpoint_record = Some(offset);
                if let Phase::Finishing { checkpoint, .. } = self.phase {
                    if checkpoint == write {
                        self.release_partition();
                    }
                }
            }
        }
    }

    fn publish(&mut self, state_offset: i64, events: Vec<StatusEvent>) {
        self.publishing.insert(state_offset);
        if let Some(first) = events.first() {
            self.publishing_for
                .insert(state_offset, first.payment_id.clone());
        }
        self.out.push(Action::Publish {
            state_offset,
            events,
        });
    }

    // -----------------------------------------------------------------------------------------
    // Verdicts that wait for the fence

    fn defer(&mut self, verdict: Verdict) {
        self.deferred.push_back(Deferred {
            after: self.outbox.next_send(),
            verdict,
        });
    }

    fn release_deferred(&mut self, confirmed: WriteId) {
        while self.deferred.front().is_some_and(|d| d.after <= confirmed) {
            let Some(Deferred { verdict, .. }) = self.deferred.pop_front() else {
                break;
            };
            match verdict {
                Verdict::Done(offset) => self.offsets.done(offset),
                Verdict::DeadLetter {
                    record,
                    class,
                    message,
                    payment_id,
                } => {
                    self.dead_lettering.insert(record.offset());
                    self.out.push(Action::DeadLetter {
                        record,
                        class,
                        message,
                        payment_id,
                    });
                }
            }
        }
    }

    /// Deferred verdicts need a confirmed write after them; write a barrier if none is coming.
    fn ensure_barrier(&mut self) {
        let Some(last) = self.deferred.back().map(|d| d.after) else {
            return;
        };
        let coming = self
            .writes
            .range(last..)
            .any(|(_, pending)| pending.confirmed);
        if !coming {
            let through = self.outbox.last_checkpoint();
            self.write(
                StateWrite::Checkpoint { through },
                BARRIER,
                AfterWrite::Checkpoint,
            );
        }
    }

    // -----------------------------------------------------------------------------------------
    // Healing keys a superseded owner wrote

    fn on_stale(&mut self, key: String, offset: i64, _now: Millis) {
        match self.phase {
            Phase::Running | Phase::Draining { .. } => {}
            Phase::Finishing { .. } | Phase::Released | Phase::Fenced => return,
        }
        let known = self.stale.get(&key).copied().unwrap_or(i64::MIN);
        self.stale.insert(key.clone(), known.max(offset));
        match RecordKey::parse(&key) {
            RecordKey::Payment(id) => {
                if self.quarantined_payments.contains(&id) {
                    // Its last good state may be older than the unreadable record: re-writing it
                    // would lift the quarantine with that older state. A person resolves it.
                    self.stale.remove(&key);
                    return;
                }
                if self.busy.contains(&id) {
                    // Healed by its next write, or when it is released.
                    return;
                }
                match self.payments.get(&id) {
                    Some(_) => {
                        self.set_busy(&id);
                        self.heal_payment(id);
                    }
                    None if self.retired.contains_key(&id) => {
                        self.set_busy(&id);
                        self.heal_payment(id);
                    }
                    // A payment this owner does not know: delete what the zombie wrote.
                    None => {
                        self.write(
                            StateWrite::DeleteKey(key.clone()),
                            HEAL,
                            AfterWrite::Heal { key },
                        );
                    }
                }
            }
            RecordKey::Tokens(token_key) => {
                let write = match self.tokens.get(&token_key) {
                    Some(tokens) => StateWrite::Tokens(Box::new(tokens.clone())),
                    None => StateWrite::DeleteTokens(token_key),
                };
                self.write(write, HEAL, AfterWrite::Heal { key });
            }
            RecordKey::LegacyTokens(_) => {
                self.write(
                    StateWrite::DeleteKey(key.clone()),
                    HEAL,
                    AfterWrite::Heal { key },
                );
            }
            RecordKey::Consent(consent_key) => self.heal_consent(consent_key, key),
            RecordKey::Checkpoint
            | RecordKey::RestoreMarker
            | RecordKey::Snapshot
            | RecordKey::Unknown => {
                self.stale.remove(&key);
            }
        }
    }

    /// Re-writes a (busy) payment as it is, under this owner's epoch.
    fn heal_payment(&mut self, id: PaymentId) {
        let Some(payment) = self.payments.get(&id) else {
            if let Some(retired) = self.retired.get(&id) {
                warn!(partition = self.config.partition, payment_id = %id, "re-writing a retired record a superseded owner wrote over");
                self.write(
                    StateWrite::Retired(Box::new(retired.clone())),
                    HEAL,
                    AfterWrite::RetiredRewritten { payment_id: id },
                );
            } else {
                self.release(&id);
            }
            return;
        };
        warn!(partition = self.config.partition, payment_id = %id, "re-writing a payment a superseded owner wrote");
        self.write(
            StateWrite::Payment {
                payment: Box::new(payment.clone()),
                events: Vec::new(),
            },
            HEAL,
            AfterWrite::Payment {
                payment_id: id,
                source: None,
                events: Vec::new(),
                effect: None,
            },
        );
    }

    fn healed(&mut self, key: &str, written_at: i64) {
        if self.stale.get(key).is_some_and(|&stale| written_at > stale) {
            self.stale.remove(key);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Scheduling

    fn set_busy(&mut self, id: &PaymentId) {
        self.busy.insert(id.clone());
        if let Some(at) = self.payments.get(id).and_then(|p| p.next_check_at) {
            self.timers.remove(&(at, id.clone()));
        }
    }

    /// The payment is idle again: heal it if a superseded owner wrote it meanwhile, else its
    /// next queued input or its timer gets a turn (in `settle`).
    fn release(&mut self, id: &PaymentId) {
        if self.stale.contains_key(&payment_key(id))
            && (self.payments.contains_key(id) || self.retired.contains_key(id))
        {
            self.heal_payment(id.clone());
            return;
        }
        self.busy.remove(id);
        if let Some(at) = self.payments.get(id).and_then(|p| p.next_check_at) {
            if !self.quarantined_payments.contains(id) {
                self.timers.insert((at, id.clone()));
            }
        }
        self.ready.push_back(id.clone());
    }

    fn set_payment(&mut self, id: PaymentId, payment: Payment, now: Millis) {
        let kind = payment.state.kind();
        let previous = self.payments.get(&id).map(|old| old.state.kind());
        if previous != Some(kind) {
            if previous == Some(StateKind::ScaPending) {
                if let Some(since) = self.entered.get(&id) {
                    crate::metrics::metrics()
                        .sca_pending_duration
                        .observe(((now - since).max(0) as f64) / 1000.0);
                }
            }
            let since = if previous.is_none() {
                payment.updated_at
            } else {
                now
            };
            self.entered.insert(id.clone(), since);
        }
        if let Some(old) = self.payments.get(&id).filter(|p| p.state.is_terminal()) {
            let at = old.updated_at.saturating_add(self.config.retention_ms);
            self.retire_at.remove(&(at, id.clone()));
        }
        if payment.state.is_terminal() {
            let at = payment.updated_at.saturating_add(self.config.retention_ms);
            self.retire_at.insert((at, id.clone()));
        }
        if !self.busy.contains(&id) {
            if let Some(at) = self.payments.get(&id).and_then(|p| p.next_check_at) {
                self.timers.remove(&(at, id.clone()));
            }
            if let Some(at) = payment.next_check_at {
                if !self.quarantined_payments.contains(&id) {
                    self.timers.insert((at, id.clone()));
                }
            }
        }
        self.payments.insert(id, payment);
    }

    /// After every event: queued inputs and due timers get their turn, checkpoints and
    /// barriers are written, the drain is checked, and the committable offset is reported.
    fn settle(&mut self, now: Millis) {
        if self.phase == Phase::Running {
            loop {
                if let Some(id) = self.ready.pop_front() {
                    if self.busy.contains(&id) {
                        continue;
                    }
                    let next = self.queues.get_mut(&id).and_then(VecDeque::pop_front);
                    if self.queues.get(&id).is_some_and(VecDeque::is_empty) {
                        self.queues.remove(&id);
                    }
                    if let Some(queued) = next {
                        self.set_busy(&id);
                        self.apply(id, queued.input, queued.source, now);
                    }
                    continue;
                }
                let due = self
                    .timers
                    .first()
                    .filter(|(at, _)| *at <= now)
                    .map(|(_, id)| id.clone());
                let Some(id) = due else {
                    break;
                };
                self.set_busy(&id);
                self.apply(id, Input::TimerFired, None, now);
            }
            self.consent_timers_due(now);
            self.retire_due(now);
            self.forget_due(now);
            self.sweep_tokens(now);
            self.snapshot_step(now);
        } else {
            self.ready.clear();
            // A snapshot is only recorded while running; a draining owner's next one is the
            // next owner's business.
            self.snapshot = None;
        }
        match self.phase {
            Phase::Running | Phase::Draining { .. } if now >= self.next_checkpoint_at => {
                self.next_checkpoint_at = now + self.config.checkpoint_interval_ms;
                self.write_checkpoint_if_due();
            }
            Phase::Running
            | Phase::Draining { .. }
            | Phase::Finishing { .. }
            | Phase::Released
            | Phase::Fenced => {}
        }
        self.ensure_barrier();
        match self.phase {
            Phase::Draining { deadline } => {
                if self.outstanding() == 0 {
                    match self.write_checkpoint_if_due() {
                        Some(id) => {
                            self.phase = Phase::Finishing {
                                checkpoint: id,
                                deadline: now + self.config.finish_timeout_ms,
                            };
                        }
                        None => self.release_partition(),
                    }
                } else if now >= deadline {
                    warn!(
                        partition = self.config.partition,
                        outstanding = self.outstanding(),
                        "drain bound reached with work in flight; the next owner resolves it from state"
                    );
                    self.release_partition();
                }
            }
            Phase::Finishing { deadline, .. } if now >= deadline => self.release_partition(),
            Phase::Running | Phase::Finishing { .. } | Phase::Released | Phase::Fenced => {}
        }
        self.report_committable();
    }

    fn write_checkpoint_if_due(&mut self) -> Option<WriteId> {
        let through = self.outbox.checkpoint_due()?;
        // The only record after the last checkpoint is that checkpoint itself: a restore would
        // re-publish nothing more, and writing another would only be followed by another.
        if self.last_checkpoint_record == Some(through)
            && self.outbox.last_checkpoint() + 1 >= through
        {
            self.outbox.checkpoint_written(through);
            return None;
        }
        let id = self.write(
            StateWrite::Checkpoint { through },
            CHECKPOINT,
            AfterWrite::Checkpoint,
        );
        // Not written again until a later one is due.
        self.outbox.checkpoint_written(through);
        Some(id)
    }

    fn release_partition(&mut self) {
        self.report_committable();
        self.phase = Phase::Released;
        info!(
            partition = self.config.partition,
            committable = self.last_committable,
            "partition released"
        );
        self.out.push(Action::Released);
    }

    fn report_committable(&mut self) {
        let Some(offset) = self.offsets.committable() else {
            return;
        };
        if self.last_committable != Some(offset) {
            self.last_committable = Some(offset);
            self.out.push(Action::Committable(offset));
        }
    }
}

/// Dead-letter class of a command for a payment whose state record is quarantined.
pub const QUARANTINED: &str = "QUARANTINED";

/// Dead-letter class of a command for a retired payment id (final, past the retention horizon,
/// still remembered).
pub const PAYMENT_RETIRED: &str = "PAYMENT_RETIRED";

/// How often token pairs are looked at for expiry: a tenth of the retention, 1 s to 1 min.
fn token_sweep_interval(config: &CoreConfig) -> Millis {
    (config.retention_ms / 10).clamp(1_000, 60_000)
}

fn rfc3339(at: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(at)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| at.to_string())
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
