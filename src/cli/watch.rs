//! `pis-worker watch`: prints status events as a client system would receive them.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::BrokerArgs;
use crate::contract::status::{self, StatusRecord};

#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Start from the oldest event instead of new ones only.
    #[arg(long)]
    pub from_beginning: bool,
    /// Exit once this many distinct payments reached a final state.
    #[arg(long)]
    pub until_final: Option<usize>,
    /// Give up (exit 1) after this many seconds.
    #[arg(long)]
    pub timeout_secs: Option<u64>,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
    /// Confluent Schema Registry, to read registry-framed events (the worker's
    /// PIS_SCHEMA_REGISTRY_URL); single-object events are read either way.
    #[arg(long, env = "PIS_SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: Option<url::Url>,
}

pub fn format_text(r: &StatusRecord) -> String {
    let mut line = format!(
        "{:<14} #{:<2} {:<16}",
        r.payment_id,
        r.sequence,
        r.state.symbol()
    );
    if let Some(s) = &r.bank_status {
        line.push_str(&format!(" bank={s}"));
    }
    if let Some(id) = &r.bank_payment_id {
        line.push_str(&format!(" bank_id={id}"));
    }
    if let Some(url) = &r.sca_redirect_url {
        line.push_str(&format!(" sca={url}"));
    }
    if let (Some(code), Some(message)) = (&r.reason_code, &r.reason_message) {
        line.push_str(&format!(" reason={code} ({message})"));
    }
    line
}

pub fn format_json(r: &StatusRecord) -> String {
    serde_json::json!({
        "event_id": r.event_id,
        "payment_id": r.payment_id,
        "psu_id": r.psu_id,
        "sequence": r.sequence,
        "state": r.state.symbol(),
        "is_final": r.is_final,
        "bank_status": r.bank_status,
        "bank_payment_id": r.bank_payment_id,
        "sca_redirect_url": r.sca_redirect_url,
        "reason": r.reason_code.as_ref().map(|c| serde_json::json!({"code": c, "message": r.reason_message})),
        "causation_id": r.causation_id,
        "occurred_at": r.occurred_at,
    })
    .to_string()
}

pub fn run(args: WatchArgs) -> anyhow::Result<()> {
    if let Some(url) = &args.schema_registry_url {
        crate::contract::registry::configure(crate::contract::registry::RegistryConfig {
            url: url.clone(),
            auto_register: false,
            timeout: std::time::Duration::from_secs(5),
        })
        .map_err(|e| anyhow::anyhow!("schema registry: {e}"))?;
    }
    let settings = args
        .broker
        .settings(&format!("pis-watch-{}", uuid::Uuid::new_v4()), 6_000);
    let consumer: BaseConsumer = settings
        .client_config()
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "false")
        .set(
            "auto.offset.reset",
            if args.from_beginning {
                "earliest"
            } else {
                "latest"
            },
        )
        .set("session.timeout.ms", "6000")
        .create()
        .context("creating consumer")?;
    consumer
        .subscribe(&[&settings.topics.status])
        .context("subscribing")?;
    let started = Instant::now();
    let mut finals: HashSet<String> = HashSet::new();
    // De-duplicate re-published events as a client must: by (payment_id, sequence).
    let mut highest: HashMap<String, i64> = HashMap::new();
    loop {
        if let Some(limit) = args.timeout_secs {
            if started.elapsed() > Duration::from_secs(limit) {
                anyhow::bail!(
                    "timed out after {limit}s with {} payment(s) final",
                    finals.len()
                );
            }
        }
        let Some(result) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = result.context("reading status events")?;
        let Some(payload) = message.payload() else {
            continue;
        };
        let record = match status::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                eprintln!(
                    "undecodable status event at offset {}: {e}",
                    message.offset()
                );
                continue;
            }
        };
        let seen = highest.entry(record.payment_id.clone()).or_insert(0);
        if record.sequence <= *seen {
            continue;
        }
        *seen = record.sequence;
        if args.json {
            println!("{}", format_json(&record));
        } else {
            println!("{}", format_text(&record));
        }
        if record.is_final {
            finals.insert(record.payment_id.clone());
        }
        if args.until_final.is_some_and(|n| finals.len() >= n) {
            return Ok(());
        }
    }
}
