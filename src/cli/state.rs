//! `pis-worker state quarantined`: the state records no owner could read, and the payments
//! they hold back (docs/runbooks.md, "A state record is quarantined"). It folds the state topic
//! as a restore does (`engine::restore`), per partition, with the worker's state key.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::Message;
use secrecy::SecretString;

use super::BrokerArgs;
use crate::engine::restore::{RestoreFold, Restored};
use crate::kafka::state::RecordKey;
use crate::kafka::state::Sealing;
use crate::secret::StateKeyRing;

#[derive(Debug, Clone, clap::Args)]
pub struct StateArgs {
    #[command(subcommand)]
    pub command: StateCommand,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum StateCommand {
    /// List quarantined state records: partition, offset, key, why, and the last good state of
    /// the payment each names.
    Quarantined(QuarantinedArgs),
    /// Count the live state records (the latest of each key) by how they are sealed: format 2
    /// per key id, or format 1. A key rotation (or the format 2 migration) is finished when
    /// nothing live is sealed with the old key (or in format 1) (docs/runbooks.md).
    Keys(QuarantinedArgs),
    /// List retired payment ids (final payments past the retention horizon, still remembered:
    /// a command for one is dead-lettered PAYMENT_RETIRED): partition, id, final state, when it
    /// became final, when it was retired.
    Retired(QuarantinedArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct QuarantinedArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[arg(long, env = "PIS_STATE_KEY", hide_env_values = true, value_parser = secret)]
    pub state_key: Option<SecretString>,
    #[arg(long, env = "PIS_STATE_KEY_FILE")]
    pub state_key_file: Option<PathBuf>,
    /// Previous (read-only) keys, as the worker is given them.
    #[command(flatten)]
    pub previous_keys: super::run::PreviousKeysArgs,
    /// Only this partition.
    #[arg(long)]
    pub partition: Option<i32>,
    #[arg(long)]
    pub json: bool,
    /// Once every partition reached its high watermark, stop after this long without a record.
    #[arg(long, default_value_t = 1_500)]
    pub quiet_ms: u64,
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
}

fn secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(value.into())
}

pub async fn run(args: StateArgs) -> anyhow::Result<()> {
    match args.command {
        StateCommand::Quarantined(args) => tokio::task::spawn_blocking(move || quarantined(&args))
            .await
            .context("the reader task")?,
        StateCommand::Keys(args) => tokio::task::spawn_blocking(move || keys(&args))
            .await
            .context("the reader task")?,
        StateCommand::Retired(args) => tokio::task::spawn_blocking(move || retired(&args))
            .await
            .context("the reader task")?,
    }
}

fn quarantined(args: &QuarantinedArgs) -> anyhow::Result<()> {
    let restored = fold_topic(args)?;
    let rows = rows(&restored);
    if args.json {
        println!("{}", serde_json::Value::Array(rows));
    } else if rows.is_empty() {
        println!("no quarantined state records");
    } else {
        for row in &rows {
            println!(
                "{}:{:<8} {:<40} {} | {}: {}",
                row["partition"],
                row["offset"],
                row["key"].as_str().unwrap_or_default(),
                row["last_good_state"].as_str().unwrap_or("-"),
                row["class"].as_str().unwrap_or_default(),
                row["error"].as_str().unwrap_or_default()
            );
        }
    }
    Ok(())
}

fn keys(args: &QuarantinedArgs) -> anyhow::Result<()> {
    let restored = fold_topic(args)?;
    let counts = sealing_counts(&restored);
    let quarantined: usize = restored.values().map(|r| r.quarantined.len()).sum();
    let retired: usize = restored.values().map(|r| r.retired.len()).sum();
    if args.json {
        let by: serde_json::Map<String, serde_json::Value> = counts
            .iter()
            .map(|(k, n)| (k.clone(), serde_json::Value::from(*n)))
            .collect();
        println!(
            "{}",
            serde_json::json!({ "live_records": by, "quarantined": quarantined, "retired": retired })
        );
    } else {
        if counts.is_empty() {
            println!("no live state records");
        }
        for (sealing, n) in &counts {
            println!("{sealing:<24} {n}");
        }
        println!("{:<24} {quarantined}", "quarantined");
        println!("{:<24} {retired}", "retired (of the live)");
    }
    Ok(())
}

fn retired(args: &QuarantinedArgs) -> anyhow::Result<()> {
    let restored = fold_topic(args)?;
    let rows = retired_rows(&restored);
    if args.json {
        println!("{}", serde_json::Value::Array(rows));
    } else if rows.is_empty() {
        println!("no retired payment ids");
    } else {
        for row in &rows {
            println!(
                "{}: {:<40} {:<18} final {} retired {}",
                row["partition"],
                row["payment_id"].as_str().unwrap_or_default(),
                row["final_state"].as_str().unwrap_or_default(),
                row["final_at"].as_str().unwrap_or_default(),
                row["retired_at"].as_str().unwrap_or_default(),
            );
        }
        println!("{} retired payment ids", rows.len());
    }
    Ok(())
}

/// One JSON row per retired id, sorted by partition and id (no PSU id: ids and states only).
fn retired_rows(restored: &BTreeMap<i32, Restored>) -> Vec<serde_json::Value> {
    let time = |at: i64| {
        chrono::DateTime::from_timestamp_millis(at)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_else(|| at.to_string())
    };
    let mut rows = Vec::new();
    for (partition, r) in restored {
        let mut ids: Vec<_> = r.retired.values().collect();
        ids.sort_by(|a, b| a.payment_id.cmp(&b.payment_id));
        for retired in ids {
            rows.push(serde_json::json!({
                "partition": partition,
                "payment_id": retired.payment_id.as_str(),
                "final_state": retired.final_state.symbol(),
                "last_sequence": retired.last_sequence,
                "final_at": time(retired.final_at),
                "retired_at": time(retired.retired_at),
            }));
        }
    }
    rows
}

/// Live records (the latest valid record of each key) by sealing: `v2 key <id>`, `v1
/// (unsealed)`.
fn sealing_counts(restored: &BTreeMap<i32, Restored>) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for r in restored.values() {
        for sealing in r.sealing.values() {
            match sealing {
                Sealing::Sealed { .. } | Sealing::V1 { .. } => {
                    *counts.entry(sealing.to_string()).or_insert(0) += 1;
                }
                Sealing::Marker => {}
            }
        }
    }
    counts
}

/// Folds the whole state topic, per partition, as a restore does.
fn fold_topic(args: &QuarantinedArgs) -> anyhow::Result<BTreeMap<i32, Restored>> {
    let key_hex = match (&args.state_key, &args.state_key_file) {
        (Some(k), _) => k.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the state key from {}", path.display()))?
            .trim()
            .to_owned()
            .into(),
        (None, None) => {
            anyhow::bail!("the state key is required (PIS_STATE_KEY or --state-key-file)")
        }
    };
    let previous = args.previous_keys.read()?;
    let key = StateKeyRing::from_config(&key_hex, previous.as_ref())
        .map_err(|e| anyhow::anyhow!("state keys: {e}"))?
        .with_accept_v1(args.previous_keys.state_accept_v1);
    let settings = args.broker.settings("pis-state-reader", 6_000);
    let mut folds: BTreeMap<i32, RestoreFold<'_>> = BTreeMap::new();
    super::dlq::read_topic(
        &settings,
        &settings.topics.state,
        Duration::from_millis(args.quiet_ms),
        Duration::from_secs(args.timeout_secs),
        |message| {
            let partition = message.partition();
            if args.partition.is_some_and(|p| p != partition) {
                return;
            }
            folds
                .entry(partition)
                .or_insert_with(|| RestoreFold::new(&key, i64::MAX))
                .apply(
                    message.offset(),
                    message.key(),
                    message.payload(),
                    crate::kafka::fence::epoch_header(message),
                );
        },
    )?;
    Ok(folds
        .into_iter()
        .map(|(p, fold)| (p, fold.finish()))
        .collect())
}

/// One JSON row per quarantined record (no secrets: ids, states and the decode error only).
fn rows(restored: &BTreeMap<i32, Restored>) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for (partition, r) in restored {
        for (key, q) in &r.quarantined {
            let payment = match RecordKey::parse(key) {
                RecordKey::Payment(id) => r.payments.get(&id),
                RecordKey::Tokens(_)
                | RecordKey::LegacyTokens(_)
                | RecordKey::Consent(_)
                | RecordKey::Checkpoint
                | RecordKey::RestoreMarker
                | RecordKey::Snapshot
                | RecordKey::Unknown => None,
            };
            out.push(serde_json::json!({
                "partition": partition,
                "offset": q.offset,
                "key": key,
                "class": q.class,
                "error": q.error,
                "last_good_state": payment.map(|p| p.state.kind().symbol()),
                "psu_id": payment.map(|p| p.psu_id.to_string()),
                "bank_payment_id": payment.and_then(|p| p.bank_payment_id.as_ref().map(|b| b.to_string())),
                "last_good_sequence": payment.map(|p| p.sequence),
            }));
        }
    }
    out
}
