//! The `pis-worker` command line: the worker itself and the tools around it.

pub mod bank_check;
pub mod dlq;
pub mod run;
pub mod send;
pub mod state;
pub mod watch;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "pis-worker",
    version,
    about = "Kafka-driven PSD2 payment initiation for Belfius and Banx"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "PIS_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker (a consumer-group member).
    Run(Box<run::RunArgs>),
    /// Run the Belfius sandbox simulator.
    Sandbox(Box<crate::sandbox::cli::SandboxArgs>),
    /// Act as the PSU in the sandbox (sign / reject) and print the redirect URL.
    Psu(crate::sandbox::cli::PsuArgs),
    /// Publish a payment command (Avro) to the command topic.
    Send(Box<send::SendArgs>),
    /// Print payment status events as they arrive.
    Watch(Box<watch::WatchArgs>),
    /// List or replay the dead-letter topic's records.
    Dlq(Box<dlq::DlqArgs>),
    /// Inspect the state topic (quarantined records).
    State(Box<state::StateArgs>),
    /// Which dialect does the configured bank speak? A short, harmless check (one unsigned
    /// 0.01 EUR initiation): run it first after onboarding (docs/belfius.md, "bank-check").
    BankCheck(Box<bank_check::BankCheckArgs>),
    /// Create the topics (idempotent).
    Topics(Box<run::TopicsArgs>),
    /// Print a fresh state-encryption key (64 hex characters).
    Keygen,
    /// Print the Avro schemas' single-object fingerprints (the 8 bytes after `C3 01`).
    Schemas,
}

/// Shared broker options.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "PIS_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    #[arg(
        long,
        env = "PIS_TOPIC_COMMANDS",
        default_value = "pis.payment-commands"
    )]
    pub topic_commands: String,
    #[arg(long, env = "PIS_TOPIC_STATUS", default_value = "pis.payment-status")]
    pub topic_status: String,
    /// Consent status events (AIS and CAF consents), keyed by psu_id.
    #[arg(
        long,
        env = "PIS_TOPIC_CONSENT_STATUS",
        default_value = "pis.consent-status"
    )]
    pub topic_consent_status: String,
    #[arg(long, env = "PIS_TOPIC_STATE", default_value = "pis.payment-state")]
    pub topic_state: String,
    #[arg(
        long,
        env = "PIS_TOPIC_DLQ",
        default_value = "pis.payment-commands.dlq"
    )]
    pub topic_dlq: String,
    /// Consumer-group assignment: cooperative-sticky (incremental rebalances), range, roundrobin.
    #[arg(
        long,
        env = "PIS_ASSIGNMENT_STRATEGY",
        default_value = "cooperative-sticky"
    )]
    pub assignment_strategy: String,
    /// Extra librdkafka property, `key=value` (repeatable): security.protocol, sasl.*, ssl.*...
    #[arg(long = "kafka-property", value_parser = parse_property)]
    pub kafka_properties: Vec<(String, String)>,
    /// Create the state topic compacted (needs a broker that honours min.compaction.lag.ms;
    /// false for Tansu 0.6, see docs/guarantees.md).
    #[arg(long, env = "PIS_STATE_COMPACTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub state_compaction: bool,
    /// Also expire the state topic's records by time (`cleanup.policy=compact,delete` with this
    /// `retention.ms`) when the worker creates it: safe because every snapshot re-writes what is
    /// live and restores start at the newest one (docs/architecture.md, "Snapshots"). Keep it
    /// far above PIS_SNAPSHOT_INTERVAL_SECS. Unset: kept forever.
    #[arg(long, env = "PIS_STATE_RETENTION_MS", value_parser = clap::value_parser!(i64).range(3_600_000..))]
    pub state_retention_ms: Option<i64>,
}

fn parse_property(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected key=value, got {text:?}"))
}

impl BrokerArgs {
    pub fn settings(&self, group_id: &str, session_timeout_ms: u32) -> crate::kafka::KafkaSettings {
        crate::kafka::KafkaSettings {
            brokers: self.brokers.clone(),
            group_id: group_id.to_owned(),
            topics: crate::kafka::Topics {
                commands: self.topic_commands.clone(),
                status: self.topic_status.clone(),
                consent_status: self.topic_consent_status.clone(),
                state: self.topic_state.clone(),
                dlq: self.topic_dlq.clone(),
            },
            session_timeout_ms,
            assignment_strategy: self.assignment_strategy.clone(),
            extra: self.kafka_properties.clone(),
            state_compaction: self.state_compaction,
            state_retention_ms: self.state_retention_ms,
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
