//! The consumer-group member: one OS thread polls, hands records to partition owners, stores
//! the offsets they report as durable, and runs the rebalance protocol (revoke = drain, then
//! commit synchronously, then release).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::OwnedMessage;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{error, info, warn};

use super::{KafkaEdgeError, KafkaSettings};

/// What the consumer needs from the engine.
pub trait Partitions: Send + Sync + 'static {
    /// Start owning `partition` (restore happens inside the owner, before its first record).
    fn assign(&self, partition: i32);
    /// Stop owning `partitions`: blocks until their owners drained (all within one bound) and
    /// returns the next offset to consume of each that handled a record.
    fn revoke(&self, partitions: &[i32]) -> Vec<(i32, i64)>;
    /// Hands a record to its owner; blocks when the owner's queue is full (back-pressure).
    fn dispatch(&self, message: OwnedMessage) -> Result<(), String>;
    /// Next offsets to consume, per owned partition.
    fn committable(&self) -> Vec<(i32, i64)>;
}

struct GroupContext<P: Partitions> {
    partitions: Arc<P>,
    topic: String,
}

impl<P: Partitions> ClientContext for GroupContext<P> {
    /// librdkafka's statistics (every `statistics.interval.ms`): consumer lag per partition.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let lag = &crate::metrics::metrics().consumer_lag;
        for (partition, stats) in &topic.partitions {
            // -1 is the internal "unassigned" partition and partitions this member does not
            // fetch report a lag of -1.
            if *partition < 0 {
                continue;
            }
            let label = partition.to_string();
            if stats.consumer_lag >= 0 {
                lag.with_label_values(&[&self.topic, &label])
                    .set(stats.consumer_lag);
            } else {
                let _ = lag.remove_label_values(&[&self.topic, &label]);
            }
        }
    }
}

impl<P: Partitions> ConsumerContext for GroupContext<P> {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let revoked: Vec<i32> = list
                .elements_for_topic(&self.topic)
                .iter()
                .map(|e| e.partition())
                .collect();
            info!(?revoked, "partitions revoked: draining");
            let mut commit = TopicPartitionList::new();
            for (partition, offset) in self.partitions.revoke(&revoked) {
                if let Err(e) =
                    commit.add_partition_offset(&self.topic, partition, Offset::Offset(offset))
                {
                    error!(partition, error = %e, "cannot record offset to commit");
                }
            }
            if commit.count() > 0 {
                match consumer.commit(&commit, CommitMode::Sync) {
                    Ok(()) => info!(partitions = commit.count(), "offsets committed on revoke"),
                    // Not fatal: the next owner re-reads from the last commit and
                    // de-duplicates by command_id.
                    Err(e) => warn!(error = %e, "commit on revoke failed"),
                }
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                for element in list.elements_for_topic(&self.topic) {
                    info!(partition = element.partition(), "partition assigned");
                    self.partitions.assign(element.partition());
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => error!(error = %e, "rebalance error"),
        }
    }
}

/// Polls until `stop` is set; then revokes every partition (drain, commit) and leaves the group.
/// Blocking: run it on its own thread.
pub fn run<P: Partitions>(
    settings: &KafkaSettings,
    partitions: Arc<P>,
    stop: Arc<AtomicBool>,
) -> Result<(), KafkaEdgeError> {
    let context = GroupContext {
        partitions: partitions.clone(),
        topic: settings.topics.commands.clone(),
    };
    let consumer: BaseConsumer<GroupContext<P>> = settings
        .consumer_config(super::COMMANDS_QUEUED_KBYTES)
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        // Offsets are stored only once the state they produced is durable.
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            settings.session_timeout_ms.to_string(),
        )
        .set(
            "partition.assignment.strategy",
            &settings.assignment_strategy,
        )
        .set(
            "heartbeat.interval.ms",
            (settings.session_timeout_ms / 3).max(100).to_string(),
        )
        .set("statistics.interval.ms", "5000")
        .create_with_context(context)
        .map_err(|e| KafkaEdgeError::kafka("creating consumer", e))?;
    consumer
        .subscribe(&[&settings.topics.commands])
        .map_err(|e| KafkaEdgeError::kafka("subscribing", e))?;
    info!(topic = %settings.topics.commands, group = %settings.group_id, "consumer subscribed");
    let mut last_store = Instant::now();
    let mut stored: std::collections::HashMap<i32, i64> = std::collections::HashMap::new();
    while !stop.load(Ordering::Acquire) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                if let Err(e) = partitions.dispatch(message.detach()) {
                    // The owner is gone without a revoke: stop rather than commit past it.
                    return Err(KafkaEdgeError::Setup(format!("dispatch failed: {e}")));
                }
            }
            Some(Err(e)) => warn!(error = %e, "consumer error"),
            None => {}
        }
        if last_store.elapsed() >= Duration::from_millis(200) {
            last_store = Instant::now();
            store_committable(
                &consumer,
                &settings.topics.commands,
                &*partitions,
                &mut stored,
            );
        }
    }
    info!("consumer stopping: releasing partitions");
    store_committable(
        &consumer,
        &settings.topics.commands,
        &*partitions,
        &mut stored,
    );
    // Unsubscribing runs the revoke callback (drain + synchronous commit) for every partition.
    consumer.unsubscribe();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if consumer.poll(Duration::from_millis(100)).is_none()
            && consumer
                .assignment()
                .map(|a| a.count() == 0)
                .unwrap_or(true)
        {
            break;
        }
    }
    Ok(())
}

fn store_committable<C: ConsumerContext, P: Partitions>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partitions: &P,
    stored: &mut std::collections::HashMap<i32, i64>,
) {
    let mut list = TopicPartitionList::new();
    for (partition, offset) in partitions.committable() {
        if stored.get(&partition) == Some(&offset) {
            continue;
        }
        if list
            .add_partition_offset(topic, partition, Offset::Offset(offset))
            .is_ok()
        {
            stored.insert(partition, offset);
        }
    }
    if list.count() > 0 {
        if let Err(e) = consumer.store_offsets(&list) {
            // A partition just revoked can refuse; its offsets were committed on revoke.
            warn!(error = %e, "storing offsets failed");
        }
    }
}
