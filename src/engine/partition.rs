//! The shell of a partition owner: claims the partition (restore marker), restores it through
//! the pure fold (`engine::restore`), then runs the pure core (`engine::core`) and carries out
//! its actions: state writes (waiting for the fence when the action says so), status events,
//! bank calls, dead letters and the committable offset. Every piece of spawned work lives in one
//! `JoinSet` and reports back as a core event; nothing is counted by hand.
//!
//! Commands reach the core through the owner's decoder task, in partition order: decoding may
//! wait for the schema registry (asynchronously, with back-off), so the core never blocks on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::core::{
    Action, CommandRecord, CoreConfig, Decoded, Event, OsRandom, OwnerCore, SnapshotCommit,
    StateWrite,
};
use super::ingest::{self, Decoding};
use super::restore::{RestoreFold, Restored};
use super::{EngineDeps, now_millis};
use crate::domain::machine::Payment;
use crate::kafka::fence::{self, Fence, FenceError};
use crate::kafka::state;

/// The consumer thread's side of an owner.
pub struct OwnerHandle {
    /// Records to the owner's decoder; full means the consumer waits (back-pressure).
    records: mpsc::Sender<OwnedMessage>,
    /// Next offset to consume; -1 while unknown.
    committable: Arc<AtomicI64>,
    /// Set on revoke: an owner still restoring gives up, a running one drains.
    revoked: Arc<AtomicBool>,
    revoke: watch::Sender<bool>,
    /// The owner says here that it released the partition.
    released: std::sync::mpsc::Receiver<()>,
}

impl OwnerHandle {
    /// Hands a record to the owner; blocks while its queue is full.
    pub fn dispatch(&self, record: OwnedMessage) -> Result<(), String> {
        self.records
            .blocking_send(record)
            .map_err(|_| "owner stopped".to_owned())
    }

    /// Asks the owner to stop. Never blocks: the request does not queue behind records.
    pub fn request_revoke(&self) {
        self.revoked.store(true, Ordering::Release);
        let _ = self.revoke.send(true);
    }

    /// Waits until the owner released the partition, at most `bound`; whether it did.
    pub fn wait_released(&self, bound: Duration) -> bool {
        self.released.recv_timeout(bound).is_ok()
    }

    pub fn committable(&self) -> i64 {
        self.committable.load(Ordering::Acquire)
    }
}

/// The owner's side of its handle.
struct OwnerSide {
    records: mpsc::Receiver<OwnedMessage>,
    committable: Arc<AtomicI64>,
    revoked: Arc<AtomicBool>,
    revoke: watch::Receiver<bool>,
    released: std::sync::mpsc::Sender<()>,
}

fn channel(capacity: usize) -> (OwnerHandle, OwnerSide) {
    let (records_tx, records_rx) = mpsc::channel(capacity.max(1));
    let (revoke_tx, revoke_rx) = watch::channel(false);
    let (released_tx, released_rx) = std::sync::mpsc::channel();
    let committable = Arc::new(AtomicI64::new(-1));
    let revoked = Arc::new(AtomicBool::new(false));
    (
        OwnerHandle {
            records: records_tx,
            committable: committable.clone(),
            revoked: revoked.clone(),
            revoke: revoke_tx,
            released: released_rx,
        },
        OwnerSide {
            records: records_rx,
            committable,
            revoked,
            revoke: revoke_rx,
            released: released_tx,
        },
    )
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

/// How often the owner looks for keys a superseded owner wrote, and publishes its gauges.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
const STATS_EVERY: u32 = 5;

/// How long a persisted write may wait for the state tail before the process gives up.
const FENCE_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts the owner of `partition`; it restores before handling any record.
pub fn spawn(
    partition: i32,
    deps: Arc<EngineDeps>,
    runtime: &tokio::runtime::Handle,
) -> OwnerHandle {
    let (handle, side) = channel(deps.queue_capacity);
    runtime.spawn(async move {
        let started = claim_and_restore(partition, &deps, &side).await;
        let Some((core, fence)) = started else {
            // Revoked while restoring, or fatal (already reported): nothing was started.
            let _ = side.released.send(());
            return;
        };
        let (commands_tx, commands_rx) = mpsc::channel(64);
        let waiting = Arc::new(AtomicBool::new(false));
        let decoder = tokio::spawn(decode_in_order(
            partition,
            side.records,
            commands_tx,
            deps.max_command_bytes,
            waiting.clone(),
        ));
        let shell = Shell {
            partition,
            deps,
            core,
            fence,
            tasks: JoinSet::new(),
            commands: commands_rx,
            revoke: side.revoke,
            committable: side.committable,
        };
        shell.run().await;
        decoder.abort();
        if waiting.load(Ordering::Acquire) {
            info!(
                partition,
                "commands waiting for the schema registry are not committed and will be read again"
            );
        }
        let _ = side.released.send(());
    });
    handle
}

/// Writes this owner's claim, restores the partition up to it, and starts the state tail.
/// `None` when revoked meanwhile (not an error) or after a fatal error (reported).
async fn claim_and_restore(
    partition: i32,
    deps: &Arc<EngineDeps>,
    side: &OwnerSide,
) -> Option<(OwnerCore, Arc<Fence>)> {
    let marker_offset = match write_restore_marker(deps, partition).await {
        Ok(offset) => offset,
        Err(e) => {
            deps.fatal(format!("restore marker of partition {partition}: {e}"));
            return None;
        }
    };
    if side.revoked.load(Ordering::Acquire) {
        info!(partition, "revoked before restoring: not starting");
        return None;
    }
    let m = crate::metrics::metrics();
    m.restores_in_progress.inc();
    let started = Instant::now();
    let read = {
        let deps = deps.clone();
        let revoked = side.revoked.clone();
        tokio::task::spawn_blocking(move || {
            let mut fold = RestoreFold::new(&deps.state_key, marker_offset).without_sealing();
            let (from, consumer) = state::read_partition(
                &deps.kafka,
                partition,
                marker_offset,
                deps.restore_timeout,
                &revoked,
                &mut fold,
            )?;
            let restored = fold.finish();
            // What the restore read and dropped is garbage now, much of it in this thread's
            // arena (src/memory.rs).
            crate::memory::release_free_heap();
            Ok::<(Restored, _, _), crate::kafka::KafkaEdgeError>((restored, from, consumer))
        })
        .await
    };
    m.restores_in_progress.dec();
    let (restored, from, tail) = match read {
        Ok(Ok(read)) => read,
        Ok(Err(_)) if side.revoked.load(Ordering::Acquire) => {
            info!(partition, "revoked while restoring: not starting");
            return None;
        }
        Ok(Err(e)) => {
            deps.fatal(format!("restoring partition {partition}: {e}"));
            return None;
        }
        Err(e) => {
            deps.fatal(format!("restore task of partition {partition} died: {e}"));
            return None;
        }
    };
    let took = started.elapsed();
    m.restore_duration.observe(took.as_secs_f64());
    m.restore_last_duration.set(took.as_secs_f64());
    m.restore_last_records
        .set(i64::try_from(restored.records_read).unwrap_or(i64::MAX));
    match &from {
        state::RestoreFrom::Snapshot(start) => {
            m.restores.with_label_values(&["snapshot"]).inc();
            info!(
                partition,
                records = restored.records_read,
                millis = took.as_millis() as u64,
                from = start.begin,
                snapshot_epoch = start.epoch,
                "partition read from its newest snapshot"
            );
        }
        state::RestoreFrom::Beginning { why } => {
            m.restores.with_label_values(&["beginning"]).inc();
            info!(
                partition,
                records = restored.records_read,
                millis = took.as_millis() as u64,
                from = 0,
                why = %why,
                "partition read from its first record"
            );
        }
    }
    let fence = Fence::new(partition, marker_offset);
    if let Err(e) = fence::spawn_tail(tail, fence.clone()) {
        deps.fatal(format!(
            "starting the state tail of partition {partition}: {e}"
        ));
        return None;
    }
    let config = CoreConfig {
        partition,
        partitions: deps.partitions,
        epoch: marker_offset,
        policy: deps.policy.clone(),
        limits: deps.limits,
        drain_timeout_ms: millis(deps.drain_timeout),
        checkpoint_interval_ms: millis(deps.checkpoint_interval),
        finish_timeout_ms: 2_000,
        retention_ms: millis(deps.retention),
        retired_ids_retention_ms: millis(deps.retired_ids_retention),
        snapshot_interval_ms: millis(deps.snapshot_interval),
        snapshot_min_records: deps.snapshot_min_records,
    };
    let core = OwnerCore::new(config, restored, Box::new(OsRandom), now_millis());
    Some((core, fence))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

async fn write_restore_marker(
    deps: &EngineDeps,
    partition: i32,
) -> Result<i64, crate::kafka::KafkaEdgeError> {
    let owner = format!("{}:{}", std::process::id(), uuid::Uuid::new_v4());
    let (key, value) = state::encode_restore_marker(partition, &owner)?;
    deps.producer
        .send_state(partition, &key, Some(&value), None)
        .await?
        .await
}

/// Decodes records in partition order and hands them to the owner. A record that waits for the
/// schema registry holds the ones behind it (nothing past it is begun, so nothing past it is
/// committed); the owner meanwhile goes on with bank answers and timers.
async fn decode_in_order(
    partition: i32,
    mut records: mpsc::Receiver<OwnedMessage>,
    commands: mpsc::Sender<Box<CommandRecord>>,
    max_bytes: usize,
    waiting: Arc<AtomicBool>,
) {
    while let Some(message) = records.recv().await {
        let mut backoff: Option<crate::contract::registry::Backoff> = None;
        let decoded = loop {
            match ingest::decode(&message, max_bytes).await {
                Decoding::Command(envelope) => break Decoded::Envelope(envelope),
                Decoding::DeadLetter { class, message } => {
                    break Decoded::Undecodable { class, message };
                }
                Decoding::Wait { message: why } => {
                    waiting.store(true, Ordering::Release);
                    let delay = backoff.get_or_insert_with(Default::default).next_delay();
                    warn!(
                        partition,
                        offset = message.offset(),
                        message = %why,
                        retry_in_ms = delay.as_millis() as u64,
                        "schema registry unavailable: waiting (the record is kept)"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        };
        if backoff.is_some() {
            waiting.store(false, Ordering::Release);
            info!(
                partition,
                "schema registry answered: the waiting commands go on"
            );
        }
        let record = Box::new(CommandRecord { message, decoded });
        if commands.send(record).await.is_err() {
            return;
        }
    }
}

/// Why the owner's loop woke up.
enum Woke {
    Event(Event),
    Housekeeping,
    Failed(String),
    Nothing,
}

struct Shell {
    partition: i32,
    deps: Arc<EngineDeps>,
    core: OwnerCore,
    fence: Arc<Fence>,
    tasks: JoinSet<Option<Event>>,
    commands: mpsc::Receiver<Box<CommandRecord>>,
    revoke: watch::Receiver<bool>,
    committable: Arc<AtomicI64>,
}

impl Shell {
    async fn run(mut self) {
        let actions = self.core.on(Event::Start, now_millis());
        self.execute(actions).await;
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u32;
        let mut revoke_seen = false;
        let fence = self.fence.clone();
        while !self.core.is_done() {
            let wait = match self.core.next_wake() {
                Some(at) => Duration::from_millis(u64::try_from(at - now_millis()).unwrap_or(0)),
                None => Duration::from_secs(1),
            }
            .min(Duration::from_secs(1));
            let accepts = self.core.accepts_commands();
            let woke = tokio::select! {
                biased;
                changed = self.revoke.changed(), if !revoke_seen => {
                    // A dropped handle (the partition was given to a new owner here) is a revoke.
                    let _ = changed;
                    revoke_seen = true;
                    Woke::Event(Event::Revoke)
                }
                claimed_at = fence.superseded() => Woke::Event(Event::Superseded { claimed_at }),
                Some(done) = self.tasks.join_next() => match done {
                    Ok(Some(event)) => Woke::Event(event),
                    Ok(None) => Woke::Nothing,
                    Err(e) if e.is_cancelled() => Woke::Nothing,
                    Err(e) => Woke::Failed(e.to_string()),
                },
                command = self.commands.recv(), if accepts => match command {
                    Some(record) => Woke::Event(Event::Command(record)),
                    // The decoder stopped: the handle is gone.
                    None => Woke::Event(Event::Revoke),
                },
                _ = tokio::time::sleep(wait) => Woke::Event(Event::Tick),
                _ = housekeeping.tick() => Woke::Housekeeping,
            };
            match woke {
                Woke::Event(event) => {
                    let actions = self.core.on(event, now_millis());
                    self.execute(actions).await;
                }
                Woke::Housekeeping => {
                    for (key, offset) in self.fence.take_stale_keys() {
                        let actions = self
                            .core
                            .on(Event::StaleRecord { key, offset }, now_millis());
                        self.execute(actions).await;
                    }
                    ticks += 1;
                    if ticks % STATS_EVERY == 0 {
                        super::stats::publish(self.partition, self.core.summary());
                    }
                }
                Woke::Failed(e) => {
                    self.deps
                        .fatal(format!("partition {} task failed: {e}", self.partition));
                }
                Woke::Nothing => {}
            }
        }
        super::stats::forget(self.partition);
        self.fence.stop();
        let abandoned = self.tasks.len();
        self.tasks.abort_all();
        if abandoned > 0 {
            info!(
                partition = self.partition,
                abandoned, "work abandoned at release; the next owner resolves it from state"
            );
        }
    }

    async fn execute(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Write { id, write, fence } => {
                    let what = write.key(self.partition);
                    let Some(delivered) = self.enqueue_write(&write).await else {
                        return;
                    };
                    let wait = fence.confirms().then(|| self.fence.clone());
                    let deps = self.deps.clone();
                    self.tasks.spawn(async move {
                        let offset = match delivered.await {
                            Ok(offset) => offset,
                            // State that cannot be made durable stops the process: the next
                            // owner restores from what the broker has.
                            Err(e) => {
                                deps.fatal(format!("state write of {what} failed: {e}"));
                                return None;
                            }
                        };
                        if let Some(fence) = wait {
                            if let Err(event) = confirmed(&fence, &deps, offset, &what).await {
                                return event;
                            }
                        }
                        Some(Event::Written { write: id, offset })
                    });
                }
                Action::Publish {
                    state_offset,
                    events,
                } => {
                    let mut deliveries = Vec::with_capacity(events.len());
                    for event in &events {
                        let sent = self.deps.producer.send_status(event).await;
                        let what = || format!("status of {}", event.payment_id);
                        let Some(d) = self.delivery(sent, what) else {
                            return;
                        };
                        deliveries.push(d);
                    }
                    self.await_published(state_offset, deliveries);
                }
                Action::PublishConsent {
                    state_offset,
                    events,
                } => {
                    let mut deliveries = Vec::with_capacity(events.len());
                    for event in &events {
                        let sent = self.deps.producer.send_consent_status(event).await;
                        let what = || format!("consent status of {}", event.consent_id);
                        let Some(d) = self.delivery(sent, what) else {
                            return;
                        };
                        deliveries.push(d);
                    }
                    self.await_published(state_offset, deliveries);
                }
                Action::ConsentCall { id, call } => {
                    if let Some(claimed_at) = self.fence.superseded_at() {
                        let actions = self.core.on(Event::Superseded { claimed_at }, now_millis());
                        Box::pin(self.execute(actions)).await;
                        return;
                    }
                    let bank_client = self.deps.bank.clone();
                    self.tasks.spawn(async move {
                        let answer = super::consent_calls::run(&bank_client, call).await;
                        Some(Event::Answered { call: id, answer })
                    });
                }
                Action::Call { id, payment, call } => {
                    // The write this call follows was confirmed, but a token operation may have
                    // waited in its lane since: check the fence again as the call leaves.
                    if let Some(claimed_at) = self.fence.superseded_at() {
                        let actions = self.core.on(Event::Superseded { claimed_at }, now_millis());
                        Box::pin(self.execute(actions)).await;
                        return;
                    }
                    let bank_client = self.deps.bank.clone();
                    let bank_route = self.deps.bank_route.clone();
                    let span = payment_span(&payment);
                    self.tasks.spawn(tracing::Instrument::instrument(
                        async move {
                            let answer = super::route::run_call(
                                &bank_client,
                                bank_route.as_deref(),
                                &payment,
                                call,
                            )
                            .await;
                            Some(Event::Answered { call: id, answer })
                        },
                        span,
                    ));
                }
                Action::DeadLetter {
                    record,
                    class,
                    message,
                    payment_id,
                } => {
                    let command_offset = record.offset();
                    let delivered = match self
                        .deps
                        .producer
                        .send_dlq(&record, class, &message, payment_id.as_deref())
                        .await
                    {
                        Ok(d) => d,
                        Err(e) => {
                            self.deps
                                .fatal(format!("dead-lettering offset {command_offset}: {e}"));
                            return;
                        }
                    };
                    let deps = self.deps.clone();
                    self.tasks.spawn(async move {
                        match delivered.await {
                            Ok(_) => Some(Event::DeadLettered { command_offset }),
                            Err(e) => {
                                deps.fatal(format!("DLQ write failed: {e}"));
                                None
                            }
                        }
                    });
                }
                Action::Committable(offset) => self.committable.store(offset, Ordering::Release),
                Action::CommitSnapshot(start) => {
                    let deps = self.deps.clone();
                    let partition = self.partition;
                    self.tasks.spawn(async move {
                        let committed = tokio::task::spawn_blocking(move || {
                            state::commit_snapshot(
                                &deps.kafka,
                                partition,
                                start.begin,
                                Duration::from_secs(10),
                            )
                        })
                        .await;
                        let outcome = match committed {
                            Ok(Ok(true)) => SnapshotCommit::Committed,
                            Ok(Ok(false)) => SnapshotCommit::Superseded,
                            Ok(Err(e)) => SnapshotCommit::Failed(e.to_string()),
                            Err(e) => SnapshotCommit::Failed(e.to_string()),
                        };
                        let label = match &outcome {
                            SnapshotCommit::Committed => "committed",
                            SnapshotCommit::Superseded => "superseded",
                            SnapshotCommit::Failed(_) => "failed",
                        };
                        crate::metrics::metrics()
                            .snapshots
                            .with_label_values(&[label])
                            .inc();
                        Some(Event::SnapshotCommitted { start, outcome })
                    });
                }
                Action::Released => {}
                Action::Fenced { claimed_at } => {
                    crate::metrics::metrics().fenced_owners.inc();
                    self.deps.fatal(format!(
                        "partition {} was claimed by a newer owner at state offset {claimed_at}: stopping",
                        self.partition
                    ));
                }
            }
        }
    }

    /// An enqueued event, or the process stops: an event that cannot be published would leave
    /// its record's outbox open for ever.
    fn delivery(
        &self,
        sent: Result<crate::kafka::producer::Delivered, crate::kafka::KafkaEdgeError>,
        what: impl FnOnce() -> String,
    ) -> Option<crate::kafka::producer::Delivered> {
        match sent {
            Ok(delivered) => Some(delivered),
            Err(e) => {
                self.deps.fatal(format!("publishing {}: {e}", what()));
                None
            }
        }
    }

    /// Reports `Published` once every event of the record at `state_offset` is delivered.
    fn await_published(
        &mut self,
        state_offset: i64,
        deliveries: Vec<crate::kafka::producer::Delivered>,
    ) {
        let deps = self.deps.clone();
        self.tasks.spawn(async move {
            for delivery in deliveries {
                if let Err(e) = delivery.await {
                    deps.fatal(format!("event delivery failed: {e}"));
                    return None;
                }
            }
            Some(Event::Published { state_offset })
        });
    }

    /// Encodes and enqueues a state write (in call order, so offsets follow the writes' ids).
    async fn enqueue_write(&self, write: &StateWrite) -> Option<crate::kafka::producer::Delivered> {
        let key = write.key(self.partition);
        let epoch = self.core.epoch();
        let value = match write {
            StateWrite::Payment { payment, events } => {
                state::encode_payment(&self.deps.state_key, epoch, payment, events)
                    .map(|(_, v)| Some(v))
            }
            StateWrite::Tokens(tokens) => {
                state::encode_psu(&self.deps.state_key, epoch, tokens).map(|(_, v)| Some(v))
            }
            StateWrite::Consent { record, events } => {
                state::encode_consent(&self.deps.state_key, epoch, record, events)
                    .map(|(_, v)| Some(v))
            }
            StateWrite::Retired(retired) => {
                state::encode_retired(&self.deps.state_key, epoch, retired).map(|(_, v)| Some(v))
            }
            StateWrite::Checkpoint { through } => {
                state::encode_checkpoint(&self.deps.state_key, self.partition, epoch, *through)
                    .map(|(_, v)| Some(v))
            }
            StateWrite::SnapshotBegin { key, at } => {
                state::encode_snapshot(&self.deps.state_key, key, epoch, None, *at).map(Some)
            }
            StateWrite::SnapshotEnd { begin, entities } => state::encode_snapshot(
                &self.deps.state_key,
                &key,
                epoch,
                Some((*begin, *entities)),
                0,
            )
            .map(Some),
            StateWrite::QuarantinedCopy { key, record } => {
                state::encode_quarantined_copy(&self.deps.state_key, key, epoch, record).map(Some)
            }
            StateWrite::DeleteTokens(_) | StateWrite::DeleteKey(_) => Ok(None),
        };
        let value = match value {
            Ok(value) => value,
            Err(e) => {
                self.deps.fatal(format!("encoding {key}: {e}"));
                return None;
            }
        };
        match self
            .deps
            .producer
            .send_state(self.partition, &key, value.as_deref(), Some(epoch))
            .await
        {
            Ok(delivered) => Some(delivered),
            Err(e) => {
                self.deps.fatal(format!("writing {key}: {e}"));
                None
            }
        }
    }
}

/// Waits until the fence lets this owner act on its write at `offset`. A newer claim becomes
/// the core's `Superseded` event; a stopped tail (the owner released the partition) means the
/// next owner resolves this write from state.
async fn confirmed(
    fence: &Fence,
    deps: &EngineDeps,
    offset: i64,
    what: &str,
) -> Result<(), Option<Event>> {
    match fence.confirm(offset, FENCE_TIMEOUT).await {
        Ok(()) => Ok(()),
        Err(FenceError::Stopped { .. }) => {
            debug!(%what, "partition released; not acting on a late write");
            Err(None)
        }
        Err(FenceError::Superseded { claimed_at, .. }) => {
            Err(Some(Event::Superseded { claimed_at }))
        }
        Err(e @ FenceError::Timeout { .. }) => {
            deps.fatal(format!("not acting on {what}: {e}"));
            Err(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: i64) -> OwnedMessage {
        OwnedMessage::new(
            Some(b"x".to_vec()),
            Some(b"k".to_vec()),
            "t".into(),
            rdkafka::Timestamp::NotAvailable,
            0,
            offset,
            None,
        )
    }

    /// Defect i: the revoke went through the owner's record mailbox with `blocking_send`, so
    /// a full mailbox (an owner still restoring) held the consumer thread until the restore
    /// timeout. Now the revoke never queues, and waiting for the owner is bounded.
    #[test]
    fn revoke_of_an_owner_with_a_full_mailbox_returns_within_its_bound() {
        let (handle, side) = channel(2);
        handle.dispatch(record(1)).expect("room");
        handle.dispatch(record(2)).expect("room");
        // The owner is busy restoring and reads nothing.
        let started = Instant::now();
        handle.request_revoke();
        assert!(side.revoked.load(Ordering::Acquire), "the restore sees it");
        assert!(*side.revoke.borrow(), "the running owner sees it");
        let released = handle.wait_released(Duration::from_millis(300));
        assert!(!released);
        assert!(started.elapsed() < Duration::from_secs(5));
        // Once the owner releases, the wait ends at once.
        side.released.send(()).expect("ack");
        assert!(handle.wait_released(Duration::from_secs(5)));
    }
}
