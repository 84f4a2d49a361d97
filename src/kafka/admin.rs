//! Topic creation and the partition-count invariant between commands and state.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use super::{KafkaEdgeError, KafkaSettings};

/// Creates the five topics if missing (idempotent). `payment-state` must have exactly as many
/// partitions as `payment-commands`: partition p of the state holds the payments of command
/// partition p. Topics are created with their final partition count because some brokers
/// (Tansu) cannot add partitions later.
pub async fn ensure_topics(
    settings: &KafkaSettings,
    partitions: i32,
    replication: i32,
) -> Result<(), KafkaEdgeError> {
    let admin: AdminClient<DefaultClientContext> = settings
        .client_config()
        .create()
        .map_err(|e| KafkaEdgeError::kafka("creating admin client", e))?;
    let topics = &settings.topics;
    // A superseded owner's late write must not make compaction drop the live owner's record
    // of the same key before the live owner re-writes it (docs/guarantees.md): the lag keeps
    // every record for an hour. No config at all when compaction is off: a `delete` policy
    // would expire state.
    // With snapshots, records older than the newest recorded snapshot are read by no restore:
    // the topic may also expire by time (docs/architecture.md, "Snapshots").
    let retention = settings.state_retention_ms.map(|ms| ms.to_string());
    let mut compact: Vec<(&str, &str)> = Vec::new();
    match (settings.state_compaction, retention.as_deref()) {
        (true, Some(ms)) => compact.extend([
            ("cleanup.policy", "compact,delete"),
            ("min.compaction.lag.ms", "3600000"),
            ("retention.ms", ms),
        ]),
        (true, None) => compact.extend([
            ("cleanup.policy", "compact"),
            ("min.compaction.lag.ms", "3600000"),
        ]),
        (false, Some(ms)) => compact.extend([("cleanup.policy", "delete"), ("retention.ms", ms)]),
        (false, None) => {}
    }
    let new_topics = [
        NewTopic::new(
            &topics.commands,
            partitions,
            TopicReplication::Fixed(replication),
        ),
        NewTopic::new(
            &topics.status,
            partitions,
            TopicReplication::Fixed(replication),
        ),
        NewTopic::new(
            &topics.consent_status,
            partitions,
            TopicReplication::Fixed(replication),
        ),
        compact.iter().fold(
            NewTopic::new(
                &topics.state,
                partitions,
                TopicReplication::Fixed(replication),
            ),
            |t, (k, v)| t.set(k, v),
        ),
        NewTopic::new(
            &topics.dlq,
            partitions,
            TopicReplication::Fixed(replication),
        ),
    ];
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(new_topics.iter(), &options)
        .await
        .map_err(|e| KafkaEdgeError::kafka("creating topics", e))?;
    for result in results {
        match result {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaEdgeError::Setup(format!(
                    "creating topic {topic} failed: {code}"
                )));
            }
        }
    }
    Ok(())
}

/// Number of partitions of a topic, from broker metadata.
pub fn partition_count(settings: &KafkaSettings, topic: &str) -> Result<i32, KafkaEdgeError> {
    let consumer: BaseConsumer = settings
        .client_config()
        .create()
        .map_err(|e| KafkaEdgeError::kafka("creating metadata client", e))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| KafkaEdgeError::kafka(format!("fetching metadata of {topic}"), e))?;
    let count = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    i32::try_from(count).map_err(|_| KafkaEdgeError::Setup("partition count overflow".into()))
}

/// Refuses to start when the state topic cannot hold the command partitions one-to-one.
pub fn check_partition_invariant(settings: &KafkaSettings) -> Result<i32, KafkaEdgeError> {
    let commands = partition_count(settings, &settings.topics.commands)?;
    let state = partition_count(settings, &settings.topics.state)?;
    if commands == 0 {
        return Err(KafkaEdgeError::Setup(format!(
            "topic {} does not exist",
            settings.topics.commands
        )));
    }
    if commands != state {
        return Err(KafkaEdgeError::Setup(format!(
            "topic {} has {commands} partitions but {} has {state}: they must match",
            settings.topics.commands, settings.topics.state
        )));
    }
    Ok(commands)
}
