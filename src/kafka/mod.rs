//! Edge: the Kafka broker. Topic administration, the ordered producer for state / status / DLQ,
//! the changelog codec and restore, and the consumer-group thread with rebalance handling.

pub mod admin;
pub mod consumer;
pub mod fence;
pub mod partitioner;
pub mod producer;
pub mod state;

use rdkafka::ClientConfig;

/// Topic names (configurable; the defaults are in the README).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub commands: String,
    pub status: String,
    /// Consent status events: a topic of their own, so that each topic carries one record
    /// type (one schema registry subject, `{topic}-value`).
    pub consent_status: String,
    pub state: String,
    pub dlq: String,
}

impl Topics {
    /// `{prefix}.commands`, `{prefix}.status`, ...: one isolated set of topics per test or run.
    pub fn prefixed(prefix: &str) -> Self {
        Self {
            commands: format!("{prefix}.commands"),
            status: format!("{prefix}.status"),
            consent_status: format!("{prefix}.consent-status"),
            state: format!("{prefix}.state"),
            dlq: format!("{prefix}.dlq"),
        }
    }
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            commands: "pis.payment-commands".into(),
            status: "pis.payment-status".into(),
            consent_status: "pis.consent-status".into(),
            state: "pis.payment-state".into(),
            dlq: "pis.payment-commands.dlq".into(),
        }
    }
}

/// Broker connection settings shared by every client this process creates.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    pub group_id: String,
    pub topics: Topics,
    pub session_timeout_ms: u32,
    /// `partition.assignment.strategy`: `cooperative-sticky` moves only the partitions that
    /// must move on a rebalance; `range` / `roundrobin` stop the whole group.
    pub assignment_strategy: String,
    /// Extra librdkafka properties (`key=value`), e.g. security.protocol, sasl.*, ssl.*.
    pub extra: Vec<(String, String)>,
    /// Create the state topic compacted (with `min.compaction.lag.ms`, see admin.rs). Off only
    /// for brokers that compact without honouring the lag (Tansu 0.6 with sqlite).
    pub state_compaction: bool,
    /// `retention.ms` of the state topic when the worker creates it (None: no time limit).
    pub state_retention_ms: Option<i64>,
}

impl KafkaSettings {
    /// The base client configuration: brokers plus operator overrides.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in &self.extra {
            config.set(key, value);
        }
        config
    }

    /// A consumer's base configuration: [`Self::client_config`] with a bounded read-ahead.
    /// librdkafka's defaults let a consumer hold up to 100,000 records or 64 MiB fetched
    /// ahead, so a worker's memory after a restart grew with the backlog that queued while
    /// it was away (docs/architecture.md, "Memory"). `queued_kbytes` bounds it; operators'
    /// `--kafka-property` values still win.
    pub fn consumer_config(&self, queued_kbytes: u32) -> ClientConfig {
        let mut config = self.client_config();
        for (key, value) in [
            ("queued.max.messages.kbytes", queued_kbytes.to_string()),
            (
                "queued.min.messages",
                CONSUMER_QUEUED_MIN_MESSAGES.to_string(),
            ),
        ] {
            if !self.extra.iter().any(|(k, _)| k == key) {
                config.set(key, value);
            }
        }
        config
    }
}

/// Records a consumer tries to keep fetched ahead (librdkafka's default is 100,000): a few
/// batches of the restore fold or of the command loop.
const CONSUMER_QUEUED_MIN_MESSAGES: u32 = 5_000;
/// Read-ahead of the group consumer of the commands topic, in KiB.
pub const COMMANDS_QUEUED_KBYTES: u32 = 16 * 1024;
/// Read-ahead of each state-partition consumer (restore, then the fence's tail), in KiB.
pub const STATE_QUEUED_KBYTES: u32 = 4 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum KafkaEdgeError {
    #[error("kafka: {context}: {source}")]
    Kafka {
        context: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("kafka: {0}")]
    Setup(String),
    #[error("state record: {0}")]
    StateCodec(String),
}

impl KafkaEdgeError {
    pub fn kafka(context: impl Into<String>, source: rdkafka::error::KafkaError) -> Self {
        KafkaEdgeError::Kafka {
            context: context.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(extra: &[(&str, &str)]) -> KafkaSettings {
        KafkaSettings {
            brokers: "127.0.0.1:9092".into(),
            group_id: "g".into(),
            topics: Topics::default(),
            session_timeout_ms: 10_000,
            assignment_strategy: "cooperative-sticky".into(),
            extra: extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            state_compaction: true,
            state_retention_ms: None,
        }
    }

    #[test]
    fn consumers_get_a_bounded_read_ahead_unless_the_operator_sets_one() {
        let bounded = settings(&[]).consumer_config(STATE_QUEUED_KBYTES);
        assert_eq!(bounded.get("queued.max.messages.kbytes"), Some("4096"));
        assert_eq!(bounded.get("queued.min.messages"), Some("5000"));
        let chosen = settings(&[("queued.max.messages.kbytes", "65536")])
            .consumer_config(STATE_QUEUED_KBYTES);
        assert_eq!(chosen.get("queued.max.messages.kbytes"), Some("65536"));
        assert_eq!(chosen.get("queued.min.messages"), Some("5000"));
        // Producers and admin clients get none of it.
        assert_eq!(
            settings(&[]).client_config().get("queued.min.messages"),
            None
        );
    }
}
