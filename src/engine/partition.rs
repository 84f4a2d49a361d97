//! The owner of one command partition: restores its state, applies commands and bank answers to
//! the state machine, writes state before effects, publishes the outbox, runs durable timers,
//! and tells the consumer which offset is safe to commit.
//!
//! Concurrency: one task per partition owns all of the partition's state, so there are no locks.
//! Bank calls and broker acknowledgements run in spawned tasks that report back by message. A
//! payment is *busy* from a transition until its state is durable and its effect has answered;
//! inputs for a busy payment wait in its queue (one payment at a time per id), while other
//! payments proceed.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::bank;
use super::ingest::{Ingested, ingest};
use super::offsets::OffsetTracker;
use super::outbox::OutboxTracker;
use super::{EngineDeps, now_millis};
use crate::belfius::BankError;
use crate::belfius::pkce::Pkce;
use crate::domain::machine::{
    Effect, Input, Millis, Outcome, Payment, StateKind, StatusEvent, decide,
};
use crate::domain::model::{PaymentId, PsuId};
use crate::domain::reason::{Reason, ReasonCode};
use crate::kafka::fence::{self, Fence, FenceError};
use crate::kafka::state::{self, PsuTokens, RestoredPartition};

/// Messages to a partition owner.
pub enum ActorMsg {
    /// A command record from the consumer.
    Command(Box<OwnedMessage>),
    /// Stop: finish in-flight work within the drain bound, then acknowledge.
    Revoke(std::sync::mpsc::Sender<()>),
    // Reports from spawned tasks:
    Continue {
        payment_id: PaymentId,
        input: Box<Input>,
        /// The PSU whose token lane this continuation frees.
        release_lane: Option<PsuId>,
    },
    Persisted {
        payment_id: PaymentId,
        seq: u64,
        offset: i64,
        source: Option<Box<OwnedMessage>>,
        events: Vec<StatusEvent>,
        effects: Vec<Effect>,
    },
    TokensReceived {
        payment_id: PaymentId,
        tokens: Box<crate::belfius::TokenPair>,
        then: AfterTokens,
    },
    RefreshFailed {
        payment_id: PaymentId,
        psu_id: PsuId,
        error: Box<BankError>,
    },
    Published {
        state_offset: i64,
    },
    DeadLettered {
        command_offset: i64,
    },
    CheckpointWritten {
        seq: u64,
        offset: i64,
        through: i64,
    },
    AuxPersisted {
        seq: u64,
        offset: i64,
    },
}

/// The consumer's view of an owner: where to send records and what may be committed.
pub struct OwnerHandle {
    pub tx: mpsc::Sender<ActorMsg>,
    /// Next offset to consume; -1 while unknown.
    pub committable: Arc<AtomicI64>,
    /// Set by the consumer thread before it sends `Revoke`: an owner still restoring must not
    /// start work (writes) on a partition it no longer owns.
    pub revoked: Arc<std::sync::atomic::AtomicBool>,
}

/// What to do once a new token pair is durable.
pub enum AfterTokens {
    /// The payment's code exchange is done.
    Exchanged,
    /// The pair was refreshed to cancel this payment: cancel now.
    Cancel,
}

/// An operation on a PSU's token pair (see `token_op`).
enum TokenOp {
    Exchange(PaymentId),
    Cancel(PaymentId),
}

#[derive(Default)]
struct PsuLane {
    busy: bool,
    queue: VecDeque<TokenOp>,
}

/// A token this close to expiry (at most) is refreshed before use.
const TOKEN_MARGIN_MS: i64 = 30_000;

fn continue_with(payment_id: PaymentId, input: Input, release_lane: Option<PsuId>) -> ActorMsg {
    ActorMsg::Continue {
        payment_id,
        input: Box::new(input),
        release_lane,
    }
}

struct Queued {
    input: Input,
    source: Option<Box<OwnedMessage>>,
}

pub struct PartitionOwner {
    partition: i32,
    deps: Arc<EngineDeps>,
    rx: mpsc::Receiver<ActorMsg>,
    tx: mpsc::WeakSender<ActorMsg>,
    committable: Arc<AtomicI64>,
    payments: HashMap<PaymentId, Payment>,
    psus: HashMap<PsuId, PsuTokens>,
    lanes: HashMap<PsuId, PsuLane>,
    busy: HashSet<PaymentId>,
    queues: HashMap<PaymentId, VecDeque<Queued>>,
    timers: BTreeSet<(Millis, PaymentId)>,
    offsets: OffsetTracker,
    outbox: OutboxTracker,
    /// Spawned tasks not yet reported back (persists, publishes, bank calls).
    in_flight: usize,
    revoking: Option<(std::sync::mpsc::Sender<()>, tokio::time::Instant)>,
    /// Restored outbox events to re-publish before anything else.
    pending_republish: Vec<(i64, Vec<StatusEvent>)>,
    /// This owner's claim on the partition; its writes carry the claim's offset as epoch.
    fence: Arc<Fence>,
    /// When each payment entered its current state (for the age gauges; approximated by the
    /// last update for restored payments).
    entered: HashMap<PaymentId, Millis>,
    /// Payments a superseded owner wrote after our claim's predecessors: re-written on start.
    to_heal: HashSet<PaymentId>,
    /// Bank-call tasks, aborted when the owner finishes.
    bank_tasks: Vec<tokio::task::AbortHandle>,
    /// Command records waiting for the schema registry, in partition order (offsets begun, so
    /// nothing past them is committed); dropped on revoke for the next owner to read again.
    parked: VecDeque<Box<OwnedMessage>>,
    /// When to ask the registry again for the first parked record, and the back-off.
    parked_retry: Option<(tokio::time::Instant, crate::contract::registry::Backoff)>,
}

/// The span of a payment's bank call: every log line of the call (client, guard) carries the
/// payment and its state. Ids only: secrets are typed and never formatted.
fn payment_span(payment: &Payment) -> tracing::Span {
    tracing::info_span!(
        "payment",
        payment_id = %payment.payment_id,
        state = payment.state.kind().symbol()
    )
}

/// How often an owner refreshes its share of the payment gauges.
const STATS_INTERVAL: Duration = Duration::from_secs(5);

/// How long a persisted write may wait for the state tail before the process gives up.
const FENCE_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until the fence lets this owner act on its write at `offset`; a superseded owner stops
/// the process (crash-only: nothing it wrote after the newer claim is acted on or restored).
async fn confirmed(fence: &Fence, deps: &EngineDeps, offset: i64, what: &str) -> bool {
    match fence.confirm(offset, FENCE_TIMEOUT).await {
        Ok(()) => true,
        // The owner released the partition (revoked past its drain bound): the next owner
        // resolves this write from state.
        Err(FenceError::Stopped { .. }) => {
            debug!(%what, "partition released; not acting on a late write");
            false
        }
        Err(e) => {
            if matches!(e, FenceError::Superseded { .. }) {
                crate::metrics::metrics().fenced_owners.inc();
            }
            deps.fatal(format!("not acting on {what}: {e}"));
            false
        }
    }
}

/// Starts the owner of `partition`; it restores before handling any record.
pub fn spawn(
    partition: i32,
    deps: Arc<EngineDeps>,
    runtime: &tokio::runtime::Handle,
) -> OwnerHandle {
    let (tx, rx) = mpsc::channel(deps.queue_capacity);
    let committable = Arc::new(AtomicI64::new(-1));
    let owner_committable = committable.clone();
    let revoked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let owner_revoked = revoked.clone();
    let weak = tx.downgrade();
    runtime.spawn(async move {
        let marker_offset = match write_restore_marker(&deps, partition).await {
            Ok(offset) => offset,
            Err(e) => {
                deps.fatal(format!("restore marker of partition {partition}: {e}"));
                return;
            }
        };
        let m = crate::metrics::metrics();
        m.restores_in_progress.inc();
        let restored = {
            let deps = deps.clone();
            tokio::task::spawn_blocking(move || {
                state::restore(
                    &deps.kafka,
                    &deps.state_key,
                    partition,
                    marker_offset,
                    deps.restore_timeout,
                )
            })
            .await
        };
        m.restores_in_progress.dec();
        let (restored, tail) = match restored {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                deps.fatal(format!("restoring partition {partition}: {e}"));
                return;
            }
            Err(e) => {
                deps.fatal(format!("restore task of partition {partition} died: {e}"));
                return;
            }
        };
        m.restore_duration.observe(restored.duration.as_secs_f64());
        m.restore_last_duration.set(restored.duration.as_secs_f64());
        let fence = Fence::new(partition, marker_offset);
        if let Err(e) = fence::spawn_tail(tail, fence.clone()) {
            deps.fatal(format!(
                "starting the state tail of partition {partition}: {e}"
            ));
            return;
        }
        let owner = PartitionOwner::new(
            partition,
            deps,
            rx,
            weak,
            owner_committable,
            restored,
            fence,
        );
        owner.run(owner_revoked).await;
    });
    OwnerHandle {
        tx,
        committable,
        revoked,
    }
}

async fn write_restore_marker(
    deps: &EngineDeps,
    partition: i32,
) -> Result<i64, crate::kafka::KafkaEdgeError> {
    let owner = format!("{}:{}", std::process::id(), uuid::Uuid::new_v4());
    let (key, value) = state::encode_restore_marker(partition, &owner)?;
    deps.producer
        .send_state(partition, &key, &value, None)
        .await?
        .await
}

impl PartitionOwner {
    fn new(
        partition: i32,
        deps: Arc<EngineDeps>,
        rx: mpsc::Receiver<ActorMsg>,
        tx: mpsc::WeakSender<ActorMsg>,
        committable: Arc<AtomicI64>,
        restored: RestoredPartition,
        fence: Arc<Fence>,
    ) -> Self {
        info!(
            partition,
            payments = restored.payments.len(),
            psus = restored.psus.len(),
            records = restored.records_read,
            unpublished = restored.unpublished.len(),
            millis = restored.duration.as_millis() as u64,
            "partition restored"
        );
        let mut owner = PartitionOwner {
            partition,
            deps,
            rx,
            tx,
            committable,
            payments: HashMap::new(),
            psus: restored.psus,
            lanes: HashMap::new(),
            busy: HashSet::new(),
            queues: HashMap::new(),
            timers: BTreeSet::new(),
            offsets: OffsetTracker::default(),
            outbox: OutboxTracker::new(restored.end_offset, restored.checkpoint),
            in_flight: 0,
            revoking: None,
            pending_republish: restored.unpublished,
            fence,
            entered: HashMap::new(),
            to_heal: restored.zombie_payments,
            bank_tasks: Vec::new(),
            parked: VecDeque::new(),
            parked_retry: None,
        };
        for (id, payment) in restored.payments {
            owner.set_payment(id, payment);
        }
        owner
    }
}

impl PartitionOwner {
    async fn run(mut self, revoked: Arc<std::sync::atomic::AtomicBool>) {
        if revoked.load(Ordering::Acquire) {
            info!(
                partition = self.partition,
                "revoked while restoring: not starting"
            );
            self.fence.stop();
            // The Revoke message is waiting in the mailbox; acknowledge it without any work.
            while let Ok(message) = self.rx.try_recv() {
                if let ActorMsg::Revoke(ack) = message {
                    let _ = ack.send(());
                }
            }
            return;
        }
        self.republish_restored().await;
        self.heal_restored().await;
        self.resume_restored().await;
        let mut checkpoint_tick = tokio::time::interval(self.deps.checkpoint_interval);
        checkpoint_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stats_tick = tokio::time::interval(STATS_INTERVAL);
        stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.revoke_complete() {
                break;
            }
            let sleep_for = self.next_timer_in();
            tokio::select! {
                message = self.rx.recv() => match message {
                    Some(message) => self.handle(message).await,
                    None => break,
                },
                _ = tokio::time::sleep(sleep_for) => {}
                _ = checkpoint_tick.tick() => self.write_checkpoint_if_due().await,
                _ = stats_tick.tick() => {
                    self.publish_stats();
                    self.heal_stale().await;
                }
            }
            // After every wake-up, not only when the sleep wins: a steady stream of messages
            // must not starve the timers.
            self.fire_due_timers().await;
            self.retry_parked().await;
        }
        super::stats::forget(self.partition);
        self.finish().await;
    }

    async fn handle(&mut self, message: ActorMsg) {
        match message {
            ActorMsg::Command(record) => {
                if self.revoking.is_some() {
                    // Not begun, so not committed: the next owner gets it.
                    return;
                }
                self.on_command(record).await;
            }
            ActorMsg::Revoke(ack) => {
                let deadline = tokio::time::Instant::now() + self.deps.drain_timeout;
                info!(
                    partition = self.partition,
                    in_flight = self.in_flight,
                    "revoking: draining"
                );
                self.revoking = Some((ack, deadline));
            }
            ActorMsg::Continue {
                payment_id,
                input,
                release_lane,
            } => {
                self.in_flight -= 1;
                if let Some(psu_id) = release_lane {
                    self.lane_done(psu_id).await;
                }
                self.apply(payment_id, *input, None).await;
            }
            ActorMsg::RefreshFailed {
                payment_id,
                psu_id,
                error,
            } => {
                self.in_flight -= 1;
                self.on_refresh_failed(payment_id, psu_id, *error).await;
            }
            ActorMsg::Persisted {
                payment_id,
                seq,
                offset,
                source,
                events,
                effects,
            } => {
                self.in_flight -= 1;
                self.on_persisted(payment_id, seq, offset, source, events, effects)
                    .await;
            }
            ActorMsg::TokensReceived {
                payment_id,
                tokens,
                then,
            } => {
                self.in_flight -= 1;
                self.on_tokens(payment_id, *tokens, then).await;
            }
            ActorMsg::Published { state_offset } => {
                self.in_flight -= 1;
                self.outbox.published(state_offset);
            }
            ActorMsg::DeadLettered { command_offset } => {
                self.in_flight -= 1;
                self.offsets.done(command_offset);
                self.publish_committable();
            }
            ActorMsg::CheckpointWritten {
                seq,
                offset,
                through,
            } => {
                self.in_flight -= 1;
                self.outbox.acked(seq, offset, false);
                self.outbox.checkpoint_written(through);
            }
            ActorMsg::AuxPersisted { seq, offset } => {
                self.in_flight -= 1;
                self.outbox.acked(seq, offset, false);
            }
        }
    }

    async fn on_command(&mut self, record: Box<OwnedMessage>) {
        self.offsets.begin(record.offset());
        if !self.parked.is_empty() {
            // Behind a record that waits for the schema registry: keep the partition's order.
            self.parked.push_back(record);
            return;
        }
        if let Some(record) = self.ingest_record(record).await {
            self.parked.push_back(record);
        }
    }

    /// Asks the registry again for the first parked record once its back-off is over, then
    /// handles the records behind it in order until one has to wait again.
    async fn retry_parked(&mut self) {
        let due = self
            .parked_retry
            .as_ref()
            .is_some_and(|(at, _)| tokio::time::Instant::now() >= *at);
        if !due || self.revoking.is_some() {
            return;
        }
        while let Some(record) = self.parked.pop_front() {
            if let Some(record) = self.ingest_record(record).await {
                self.parked.push_front(record);
                return;
            }
        }
        info!(
            partition = self.partition,
            "schema registry answered: parked commands handled"
        );
        self.parked_retry = None;
    }

    /// Decodes, validates and applies (or dead-letters) one command record whose offset is
    /// begun. Returns the record if it must wait for the schema registry.
    async fn ingest_record(&mut self, record: Box<OwnedMessage>) -> Option<Box<OwnedMessage>> {
        let offset = record.offset();
        let today = chrono::Utc::now().date_naive();
        let psus = &self.psus;
        let has_token = |psu: &PsuId| psus.contains_key(psu);
        match ingest(
            &record,
            self.deps.max_command_bytes,
            &self.deps.limits,
            today,
            &has_token,
        ) {
            Ingested::Wait { message } => {
                let backoff = &mut self
                    .parked_retry
                    .get_or_insert_with(|| {
                        (
                            tokio::time::Instant::now(),
                            crate::contract::registry::Backoff::default(),
                        )
                    })
                    .1;
                let delay = backoff.next_delay();
                warn!(
                    partition = self.partition,
                    offset,
                    %message,
                    retry_in_ms = delay.as_millis() as u64,
                    "schema registry unavailable: waiting (the record is kept)"
                );
                if let Some((at, _)) = self.parked_retry.as_mut() {
                    *at = tokio::time::Instant::now() + delay;
                }
                return Some(record);
            }
            Ingested::DeadLetter {
                class,
                message,
                payment_id,
            } => {
                warn!(partition = self.partition, offset, class, %message, "command dead-lettered");
                self.dead_letter(record, class, &message, payment_id.as_deref())
                    .await;
            }
            Ingested::Apply {
                payment_id,
                input,
                kind,
            } => {
                debug!(partition = self.partition, offset, %payment_id, kind, "command");
                if self.busy.contains(&payment_id) {
                    self.queues
                        .entry(payment_id)
                        .or_default()
                        .push_back(Queued {
                            input: *input,
                            source: Some(record),
                        });
                } else {
                    self.apply(payment_id, *input, Some(record)).await;
                }
            }
        }
        None
    }

    /// Applies one input. `source` is the command record, if the input is a command.
    async fn apply(
        &mut self,
        payment_id: PaymentId,
        input: Input,
        source: Option<Box<OwnedMessage>>,
    ) {
        let now = now_millis();
        let current = self.payments.get(&payment_id);
        // Client commands are counted once the machine has decided on them.
        let label = source
            .as_ref()
            .and_then(|_| super::ingest::CommandLabel::of(&input));
        let outcome = decide(&payment_id, current, input, now, &self.deps.policy);
        if let Some(label) = label {
            label.record(&outcome);
        }
        match outcome {
            Outcome::Changed(transition) => {
                let transition = *transition;
                let previous = current.map(|p| p.state.kind());
                let volatile = current.is_some_and(|p| transition.is_volatile(p, source.is_some()));
                let next = transition.payment.state.kind();
                if previous != Some(next) {
                    crate::metrics::metrics()
                        .state_transitions
                        .with_label_values(&[
                            previous.map(StateKind::symbol).unwrap_or("NONE"),
                            next.symbol(),
                        ])
                        .inc();
                    info!(
                        partition = self.partition,
                        payment_id = %payment_id,
                        from = previous.map(StateKind::symbol).unwrap_or("NEW"),
                        to = next.symbol(),
                        events = transition.events.len(),
                        "transition"
                    );
                }
                self.busy.insert(payment_id.clone());
                if volatile {
                    self.set_payment(payment_id.clone(), transition.payment);
                    if transition.effects.is_empty() {
                        self.release(payment_id).await;
                        return;
                    }
                    for effect in transition.effects {
                        self.run_effect(payment_id.clone(), effect).await;
                    }
                    return;
                }
                self.persist(
                    payment_id,
                    transition.payment,
                    transition.events,
                    transition.effects,
                    source,
                )
                .await;
            }
            Outcome::Ignored(why) => {
                debug!(partition = self.partition, %payment_id, ?why, "input ignored");
                if let Some(record) = source {
                    self.offsets.done(record.offset());
                    self.publish_committable();
                }
                self.release(payment_id).await;
            }
            Outcome::Refused(refusal) => {
                warn!(
                    partition = self.partition,
                    %payment_id,
                    code = refusal.code.as_str(),
                    message = %refusal.message,
                    "command refused"
                );
                if let Some(record) = source {
                    self.dead_letter(
                        record,
                        refusal.code.as_str(),
                        &refusal.message,
                        Some(payment_id.as_str()),
                    )
                    .await;
                }
                self.release(payment_id).await;
            }
        }
    }

    /// Writes the new state (with its events) and, once it is acknowledged, continues in
    /// `on_persisted`. The in-memory state is ahead of the broker only while the payment is busy.
    async fn persist(
        &mut self,
        payment_id: PaymentId,
        payment: Payment,
        events: Vec<StatusEvent>,
        effects: Vec<Effect>,
        source: Option<Box<OwnedMessage>>,
    ) {
        let encoded = state::encode_payment(&self.deps.state_key, self.epoch(), &payment, &events);
        self.set_payment(payment_id.clone(), payment);
        let (key, value) = match encoded {
            Ok(kv) => kv,
            Err(e) => {
                self.deps
                    .fatal(format!("encoding state of {payment_id}: {e}"));
                return;
            }
        };
        let seq = self.outbox.sent();
        let delivered = match self
            .deps
            .producer
            .send_state(self.partition, &key, &value, Some(self.epoch()))
            .await
        {
            Ok(d) => d,
            Err(e) => {
                self.deps
                    .fatal(format!("writing state of {payment_id}: {e}"));
                return;
            }
        };
        let reply = self.reply_to();
        let deps = self.deps.clone();
        let fence = self.fence.clone();
        self.in_flight += 1;
        tokio::spawn(async move {
            match delivered.await {
                Ok(offset) => {
                    if !confirmed(&fence, &deps, offset, &format!("state of {payment_id}")).await {
                        return;
                    }
                    send(
                        &reply,
                        ActorMsg::Persisted {
                            payment_id,
                            seq,
                            offset,
                            source,
                            events,
                            effects,
                        },
                    )
                    .await
                }
                // State that cannot be made durable stops the process: the next owner restores
                // from what the broker has.
                Err(e) => deps.fatal(format!("state write of {payment_id} failed: {e}")),
            }
        });
    }

    async fn on_persisted(
        &mut self,
        payment_id: PaymentId,
        seq: u64,
        offset: i64,
        source: Option<Box<OwnedMessage>>,
        events: Vec<StatusEvent>,
        effects: Vec<Effect>,
    ) {
        self.outbox.acked(seq, offset, !events.is_empty());
        if !events.is_empty() {
            self.publish(offset, events).await;
        }
        if let Some(record) = source {
            self.offsets.done(record.offset());
            self.publish_committable();
        }
        if effects.is_empty() {
            self.release(payment_id).await;
            return;
        }
        for effect in effects {
            self.run_effect(payment_id.clone(), effect).await;
        }
    }

    async fn publish(&mut self, state_offset: i64, events: Vec<StatusEvent>) {
        let mut deliveries = Vec::with_capacity(events.len());
        for event in &events {
            match self.deps.producer.send_status(event).await {
                Ok(d) => deliveries.push(d),
                Err(e) => {
                    self.deps
                        .fatal(format!("publishing status of {}: {e}", event.payment_id));
                    return;
                }
            }
        }
        let reply = self.reply_to();
        let deps = self.deps.clone();
        self.in_flight += 1;
        tokio::spawn(async move {
            for delivery in deliveries {
                if let Err(e) = delivery.await {
                    deps.fatal(format!("status event delivery failed: {e}"));
                    return;
                }
            }
            send(&reply, ActorMsg::Published { state_offset }).await;
        });
    }

    async fn run_effect(&mut self, payment_id: PaymentId, effect: Effect) {
        let Some(payment) = self.payments.get(&payment_id).cloned() else {
            self.release(payment_id).await;
            return;
        };
        let reply = self.reply_to();
        let bank_client = self.deps.bank.clone();
        match effect {
            Effect::StartInitiation => {
                let pkce = Pkce::generate();
                // A continuation, applied right away: the payment stays busy.
                Box::pin(self.apply(
                    payment_id,
                    Input::BeginInitiation {
                        pkce_verifier: pkce.verifier,
                    },
                    None,
                ))
                .await;
            }
            Effect::CallInitiate => {
                self.in_flight += 1;
                self.spawn_bank(payment_span(&payment), async move {
                    let input = bank::initiate(&bank_client, &payment).await;
                    send(&reply, continue_with(payment_id, input, None)).await;
                });
            }
            Effect::CheckStatus => {
                self.in_flight += 1;
                self.spawn_bank(payment_span(&payment), async move {
                    let input = bank::check_status(&bank_client, &payment).await;
                    send(&reply, continue_with(payment_id, input, None)).await;
                });
            }
            Effect::ExchangeCode => {
                self.token_op(payment.psu_id.clone(), TokenOp::Exchange(payment_id))
                    .await;
            }
            Effect::CallCancel => {
                self.token_op(payment.psu_id.clone(), TokenOp::Cancel(payment_id))
                    .await;
            }
        }
    }

    /// Queues an operation that issues or uses the PSU's token pair. Belfius keeps one pair per
    /// scope and issuing a new one kills the old: one operation per PSU at a time (DESIGN.md
    /// invariant 1), in arrival order.
    async fn token_op(&mut self, psu_id: PsuId, op: TokenOp) {
        self.lanes
            .entry(psu_id.clone())
            .or_default()
            .queue
            .push_back(op);
        self.next_token_op(psu_id).await;
    }

    async fn next_token_op(&mut self, psu_id: PsuId) {
        let Some(lane) = self.lanes.get_mut(&psu_id) else {
            return;
        };
        if lane.busy {
            return;
        }
        let Some(op) = lane.queue.pop_front() else {
            self.lanes.remove(&psu_id);
            return;
        };
        lane.busy = true;
        let reply = self.reply_to();
        let bank_client = self.deps.bank.clone();
        match op {
            TokenOp::Exchange(payment_id) => {
                let Some(payment) = self.payments.get(&payment_id).cloned() else {
                    self.lane_done(psu_id).await;
                    return;
                };
                self.in_flight += 1;
                self.spawn_bank(payment_span(&payment), async move {
                    let message = match bank::exchange_code(&bank_client, &payment).await {
                        Ok(tokens) => ActorMsg::TokensReceived {
                            payment_id,
                            tokens: Box::new(tokens),
                            then: AfterTokens::Exchanged,
                        },
                        Err(message) => continue_with(
                            payment_id,
                            Input::TokenExchangeFailed { message },
                            Some(psu_id),
                        ),
                    };
                    send(&reply, message).await;
                });
            }
            TokenOp::Cancel(payment_id) => {
                let Some(payment) = self.payments.get(&payment_id).cloned() else {
                    self.lane_done(psu_id).await;
                    return;
                };
                let now = now_millis();
                let usable = self.psus.get(&psu_id).map(|t| {
                    // Refresh a little before expiry: a quarter of the lifetime, at most 30 s.
                    let margin = t
                        .expires_at
                        .map(|at| ((at - t.updated_at) / 4).clamp(0, TOKEN_MARGIN_MS))
                        .unwrap_or(0);
                    let fresh = t.expires_at.is_none_or(|at| at > now + margin);
                    (
                        fresh,
                        t.access_token.clone(),
                        t.refresh_token.clone(),
                        t.brand,
                    )
                });
                match usable {
                    Some((true, access, _, _)) => {
                        self.in_flight += 1;
                        self.spawn_bank(payment_span(&payment), async move {
                            let input = bank::cancel(&bank_client, &payment, &access).await;
                            send(&reply, continue_with(payment_id, input, Some(psu_id))).await;
                        });
                    }
                    Some((false, _, Some(refresh), brand)) => {
                        self.in_flight += 1;
                        self.spawn_bank(payment_span(&payment), async move {
                            let message = match bank_client.refresh_token(brand, &refresh).await {
                                Ok(tokens) => ActorMsg::TokensReceived {
                                    payment_id,
                                    tokens: Box::new(tokens),
                                    then: AfterTokens::Cancel,
                                },
                                Err(error) => ActorMsg::RefreshFailed {
                                    payment_id,
                                    psu_id,
                                    error: Box::new(error),
                                },
                            };
                            send(&reply, message).await;
                        });
                    }
                    Some((false, _, None, _)) | None => {
                        let input = Input::CancelRefused(Reason::new(
                            ReasonCode::CancelRefused,
                            "no valid PIS token for this PSU: the PSU must authorize again",
                        ));
                        self.lane_done(psu_id).await;
                        Box::pin(self.apply(payment_id, input, None)).await;
                    }
                }
            }
        }
    }

    async fn lane_done(&mut self, psu_id: PsuId) {
        if let Some(lane) = self.lanes.get_mut(&psu_id) {
            lane.busy = false;
        }
        Box::pin(self.next_token_op(psu_id)).await;
    }

    /// A refresh failed. A definite refusal means the pair is dead: forget it (durably), so the
    /// next operation does not try it again.
    async fn on_refresh_failed(&mut self, payment_id: PaymentId, psu_id: PsuId, error: BankError) {
        let input = match &error {
            BankError::Refused { .. } => {
                self.psus.remove(&psu_id);
                let key = state::psu_key(&psu_id);
                let seq = self.outbox.sent();
                match self
                    .deps
                    .producer
                    .send_state_tombstone(self.partition, &key)
                    .await
                {
                    Ok(delivered) => {
                        let reply = self.reply_to();
                        let deps = self.deps.clone();
                        self.in_flight += 1;
                        tokio::spawn(async move {
                            match delivered.await {
                                Ok(offset) => {
                                    send(&reply, ActorMsg::AuxPersisted { seq, offset }).await
                                }
                                Err(e) => deps.fatal(format!("PSU token removal failed: {e}")),
                            }
                        });
                    }
                    Err(e) => {
                        self.deps.fatal(format!("removing PSU tokens: {e}"));
                        return;
                    }
                }
                Input::CancelRefused(Reason::new(
                    ReasonCode::BankSecurityFailure,
                    format!(
                        "the bank refused to refresh the PIS token ({error}); the PSU must authorize again"
                    ),
                ))
            }
            BankError::NotSent(_)
            | BankError::NoResponse(_)
            | BankError::RateLimited { .. }
            | BankError::Unavailable { .. }
            | BankError::Protocol(_) => Input::CancelUnconfirmed {
                message: format!("token refresh failed before the cancellation: {error}"),
            },
        };
        self.lane_done(psu_id).await;
        Box::pin(self.apply(payment_id, input, None)).await;
    }

    /// A new token pair is persisted in the PSU record before anything uses it (Belfius
    /// invalidates the previous pair, so losing the new one would lock the PSU out).
    async fn on_tokens(
        &mut self,
        payment_id: PaymentId,
        tokens: crate::belfius::TokenPair,
        then: AfterTokens,
    ) {
        let Some(payment) = self.payments.get(&payment_id).cloned() else {
            self.release(payment_id).await;
            return;
        };
        let brand = match &payment.order {
            Some(order) => order.brand(),
            None => crate::domain::model::Brand::Belfius,
        };
        let now = now_millis();
        let psu_id = payment.psu_id.clone();
        let record = PsuTokens {
            psu_id: psu_id.clone(),
            brand,
            access_token: tokens.access_token.clone(),
            // A refresh answer without a new refresh token keeps the old one usable.
            refresh_token: tokens
                .refresh_token
                .clone()
                .or_else(|| self.psus.get(&psu_id).and_then(|t| t.refresh_token.clone())),
            expires_at: tokens.expires_in.map(|d| now + d.as_millis() as i64),
            updated_at: now,
        };
        let (key, value) = match state::encode_psu(&self.deps.state_key, self.epoch(), &record) {
            Ok(kv) => kv,
            Err(e) => {
                self.deps
                    .fatal(format!("encoding tokens of PSU {}: {e}", record.psu_id));
                return;
            }
        };
        let access = record.access_token.clone();
        self.psus.insert(psu_id.clone(), record);
        let seq = self.outbox.sent();
        let delivered = match self
            .deps
            .producer
            .send_state(self.partition, &key, &value, Some(self.epoch()))
            .await
        {
            Ok(d) => d,
            Err(e) => {
                self.deps.fatal(format!("writing PSU tokens: {e}"));
                return;
            }
        };
        let reply = self.reply_to();
        let deps = self.deps.clone();
        let bank_client = self.deps.bank.clone();
        let fence = self.fence.clone();
        // `AuxPersisted` and the continuation each decrement once.
        self.in_flight += 2;
        self.spawn_bank(payment_span(&payment), async move {
            match delivered.await {
                Ok(offset) => {
                    if !confirmed(&fence, &deps, offset, "new PSU tokens").await {
                        return;
                    }
                    send(&reply, ActorMsg::AuxPersisted { seq, offset }).await;
                    let input = match then {
                        AfterTokens::Exchanged => Input::TokenExchanged,
                        AfterTokens::Cancel => bank::cancel(&bank_client, &payment, &access).await,
                    };
                    send(&reply, continue_with(payment_id, input, Some(psu_id))).await;
                }
                Err(e) => deps.fatal(format!("PSU token write failed: {e}")),
            }
        });
    }

    /// The payment is idle again: apply the next queued input, if any.
    async fn release(&mut self, payment_id: PaymentId) {
        self.busy.remove(&payment_id);
        let next = self
            .queues
            .get_mut(&payment_id)
            .and_then(|queue| queue.pop_front());
        if self.queues.get(&payment_id).is_some_and(VecDeque::is_empty) {
            self.queues.remove(&payment_id);
        }
        if let Some(queued) = next {
            if self.revoking.is_some() {
                // Leave it (and its offset) for the next owner.
                return;
            }
            Box::pin(self.apply(payment_id, queued.input, queued.source)).await;
        }
    }

    async fn dead_letter(
        &mut self,
        record: Box<OwnedMessage>,
        class: &str,
        message: &str,
        payment_id: Option<&str>,
    ) {
        let command_offset = record.offset();
        let delivered = match self
            .deps
            .producer
            .send_dlq(&record, class, message, payment_id)
            .await
        {
            Ok(d) => d,
            Err(e) => {
                self.deps
                    .fatal(format!("dead-lettering offset {command_offset}: {e}"));
                return;
            }
        };
        let reply = self.reply_to();
        let deps = self.deps.clone();
        self.in_flight += 1;
        tokio::spawn(async move {
            match delivered.await {
                Ok(_) => send(&reply, ActorMsg::DeadLettered { command_offset }).await,
                Err(e) => deps.fatal(format!("DLQ write failed: {e}")),
            }
        });
    }

    fn set_payment(&mut self, id: PaymentId, payment: Payment) {
        let kind = payment.state.kind();
        let previous = self.payments.get(&id).map(|old| old.state.kind());
        if previous != Some(kind) {
            let now = now_millis();
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
        if let Some(old) = self.payments.get(&id) {
            if let Some(at) = old.next_check_at {
                self.timers.remove(&(at, id.clone()));
            }
        }
        if let Some(at) = payment.next_check_at {
            self.timers.insert((at, id.clone()));
        }
        self.payments.insert(id, payment);
    }

    fn next_timer_in(&self) -> Duration {
        const IDLE: Duration = Duration::from_millis(500);
        match self.timers.first() {
            Some((at, _)) => {
                let wait = at.saturating_sub(now_millis()).max(0) as u64;
                Duration::from_millis(wait).min(IDLE)
            }
            None => IDLE,
        }
    }

    async fn fire_due_timers(&mut self) {
        if self.revoking.is_some() {
            return;
        }
        let now = now_millis();
        let due: Vec<PaymentId> = self
            .timers
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, id)| id.clone())
            .filter(|id| !self.busy.contains(id))
            .collect();
        for id in due {
            self.busy.insert(id.clone());
            self.apply(id, Input::TimerFired, None).await;
        }
    }

    async fn republish_restored(&mut self) {
        let unpublished = std::mem::take(&mut self.pending_republish);
        if !unpublished.is_empty() {
            info!(
                partition = self.partition,
                records = unpublished.len(),
                "re-publishing outbox after restore"
            );
        }
        for (offset, events) in unpublished {
            self.outbox.restored_unpublished(offset);
            self.publish(offset, events).await;
        }
    }

    /// Re-writes (under this owner's epoch) the payments whose latest record a superseded owner
    /// wrote: with compaction, that stale record could otherwise outlive the valid one. Each
    /// payment resumes (below) once its copy is durable.
    async fn heal_restored(&mut self) {
        let ids: Vec<PaymentId> = std::mem::take(&mut self.to_heal).into_iter().collect();
        if !ids.is_empty() {
            warn!(
                partition = self.partition,
                payments = ids.len(),
                "re-writing payments a superseded owner wrote last"
            );
        }
        for id in ids {
            let Some(payment) = self.payments.get(&id).cloned() else {
                continue;
            };
            let terminal = payment.state.is_terminal();
            self.busy.insert(id.clone());
            if !terminal {
                self.queues
                    .entry(id.clone())
                    .or_default()
                    .push_back(Queued {
                        input: Input::Restored,
                        source: None,
                    });
            }
            self.persist(id, payment, Vec::new(), Vec::new(), None)
                .await;
        }
    }

    /// Re-writes idle payments that a superseded owner wrote after this owner's claim (seen by
    /// the state tail); a busy one is re-written by its own next write anyway.
    async fn heal_stale(&mut self) {
        for id in self.fence.take_stale_payments() {
            let id = PaymentId::new(id);
            if self.busy.contains(&id) {
                continue;
            }
            let Some(payment) = self.payments.get(&id).cloned() else {
                continue;
            };
            warn!(partition = self.partition, payment_id = %id, "re-writing a payment a superseded owner wrote");
            self.busy.insert(id.clone());
            self.persist(id, payment, Vec::new(), Vec::new(), None)
                .await;
        }
    }

    /// Gives every restored payment the chance to resume work that was in flight.
    async fn resume_restored(&mut self) {
        let ids: Vec<PaymentId> = self
            .payments
            .iter()
            .filter(|(id, p)| !p.state.is_terminal() && !self.busy.contains(*id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            self.busy.insert(id.clone());
            self.apply(id, Input::Restored, None).await;
        }
    }

    async fn write_checkpoint_if_due(&mut self) {
        let Some(through) = self.outbox.checkpoint_due() else {
            return;
        };
        let (key, value) = match state::encode_checkpoint(self.partition, self.epoch(), through) {
            Ok(kv) => kv,
            Err(e) => {
                self.deps.fatal(format!("encoding checkpoint: {e}"));
                return;
            }
        };
        let seq = self.outbox.sent();
        let delivered = match self
            .deps
            .producer
            .send_state(self.partition, &key, &value, Some(self.epoch()))
            .await
        {
            Ok(d) => d,
            Err(e) => {
                self.deps.fatal(format!("writing checkpoint: {e}"));
                return;
            }
        };
        // Not written again until acknowledged.
        self.outbox.checkpoint_written(through);
        let reply = self.reply_to();
        let deps = self.deps.clone();
        self.in_flight += 1;
        tokio::spawn(async move {
            match delivered.await {
                Ok(offset) => {
                    send(
                        &reply,
                        ActorMsg::CheckpointWritten {
                            seq,
                            offset,
                            through,
                        },
                    )
                    .await
                }
                Err(e) => deps.fatal(format!("checkpoint write failed: {e}")),
            }
        });
    }

    fn publish_committable(&self) {
        if let Some(offset) = self.offsets.committable() {
            self.committable.store(offset, Ordering::Release);
        }
    }

    fn revoke_complete(&self) -> bool {
        match &self.revoking {
            Some((_, deadline)) => self.in_flight == 0 || tokio::time::Instant::now() >= *deadline,
            None => false,
        }
    }

    async fn finish(mut self) {
        if self.in_flight > 0 {
            warn!(
                partition = self.partition,
                in_flight = self.in_flight,
                "drain bound reached with work in flight; the next owner resolves it from state"
            );
        } else {
            self.write_checkpoint_if_due().await;
            // Wait briefly for the checkpoint itself.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while self.in_flight > 0 && tokio::time::Instant::now() < deadline {
                match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                    Ok(Some(ActorMsg::CheckpointWritten { .. })) => self.in_flight -= 1,
                    Ok(Some(_other)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
        self.publish_committable();
        info!(
            partition = self.partition,
            committable = self.committable.load(Ordering::Acquire),
            "partition released"
        );
        if !self.parked.is_empty() {
            info!(
                partition = self.partition,
                records = self.parked.len(),
                "commands waiting for the schema registry are not committed and will be read again"
            );
        }
        let abandoned = self.bank_tasks.iter().filter(|t| !t.is_finished()).count();
        for task in self.bank_tasks.drain(..) {
            task.abort();
        }
        if abandoned > 0 {
            info!(
                partition = self.partition,
                abandoned, "bank calls abandoned at release; the next owner reconciles from state"
            );
        }
        self.fence.stop();
        if let Some((ack, _)) = self.revoking.take() {
            let _ = ack.send(());
        }
    }

    /// Spawns a task that calls the bank; `finish` aborts those still running, so no call of
    /// this owner leaves after it released the partition (a call held behind an open circuit
    /// would otherwise go out later, e.g. a token refresh behind the next owner's back).
    fn spawn_bank(
        &mut self,
        span: tracing::Span,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        if self.bank_tasks.len() >= 256 {
            self.bank_tasks.retain(|t| !t.is_finished());
        }
        let task = tracing::Instrument::instrument(task, span);
        self.bank_tasks.push(tokio::spawn(task).abort_handle());
    }

    /// Publishes this partition's payment counts and oldest entries for the gauges.
    fn publish_stats(&self) {
        let mut summary = super::stats::Summary::default();
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
        super::stats::publish(self.partition, summary);
    }

    /// The epoch stamped on this owner's writes: the offset of its restore marker.
    fn epoch(&self) -> i64 {
        self.fence.own_marker()
    }

    fn reply_to(&self) -> mpsc::WeakSender<ActorMsg> {
        self.tx.clone()
    }
}

/// Reports back to the owner; if it is gone (revoked), the report is dropped on purpose: the
/// next owner works from the durable state only.
async fn send(reply: &mpsc::WeakSender<ActorMsg>, message: ActorMsg) {
    if let Some(tx) = reply.upgrade() {
        if tx.send(message).await.is_err() {
            debug!("owner gone; report dropped");
        }
    }
}
