//! `pis-worker watch`: prints status events as a client system would receive them: payment
//! status events and, when its topic exists, consent status events.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::BrokerArgs;
use crate::contract::consent_status::{self, ConsentStatusRecord};
use crate::contract::status::{self, StatusRecord};

#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Start from the oldest event instead of new ones only.
    #[arg(long)]
    pub from_beginning: bool,
    /// Exit once this many distinct payments reached a final state (consents do not count).
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
    if let Some(s) = &r.settlement {
        line.push_str(&format!(
            " settlement={} refs=[{}]",
            s.outcome.symbol(),
            s.transaction_refs.join(",")
        ));
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
        "settlement": r.settlement.as_ref().map(|s| serde_json::json!({
            "outcome": s.outcome.symbol(),
            "transaction_refs": s.transaction_refs,
            "booking_date": s.booking_date.map(|d| d.to_string()),
            "checked_at": s.checked_at,
        })),
    })
    .to_string()
}

pub fn format_consent_text(r: &ConsentStatusRecord) -> String {
    let mut line = format!(
        "consent {:<14} #{:<2} {:<8} {} {}",
        r.consent_id,
        r.sequence,
        r.state.symbol(),
        r.brand.as_str(),
        r.scope.symbol()
    );
    if let Some(iban) = &r.account_iban {
        line.push_str(&format!(" account={iban}"));
    }
    if let Some(uri) = &r.consent_uri {
        line.push_str(&format!(" consent_uri={uri}"));
    }
    if let Some(until) = r.valid_until {
        line.push_str(&format!(" valid_until={until}"));
    }
    if let (Some(code), Some(message)) = (&r.reason_code, &r.reason_message) {
        line.push_str(&format!(" reason={code} ({message})"));
    }
    line
}

pub fn format_consent_json(r: &ConsentStatusRecord) -> String {
    serde_json::json!({
        "event_id": r.event_id,
        "consent_id": r.consent_id,
        "psu_id": r.psu_id,
        "brand": r.brand.as_str(),
        "scope": r.scope.symbol(),
        "account_iban": r.account_iban,
        "sequence": r.sequence,
        "state": r.state.symbol(),
        "is_final": r.is_final,
        "consent_uri": r.consent_uri,
        "valid_until": r.valid_until,
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
    // A missing topic would fail every poll: the consent topic only exists once a worker of
    // this version created it.
    let mut topics = vec![settings.topics.status.as_str()];
    match crate::kafka::admin::partition_count(&settings, &settings.topics.consent_status) {
        Ok(n) if n > 0 => topics.push(settings.topics.consent_status.as_str()),
        Ok(_) | Err(_) => eprintln!(
            "topic {} not found: consent status events are not shown",
            settings.topics.consent_status
        ),
    }
    consumer.subscribe(&topics).context("subscribing")?;
    // Consents de-duplicated like payments, by (psu_id, consent_id) and sequence.
    let mut consents: HashMap<(String, String), i64> = HashMap::new();
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
        if message.topic() == settings.topics.consent_status {
            match consent_status::decode(payload) {
                Ok(record) => {
                    let seen = consents
                        .entry((record.psu_id.clone(), record.consent_id.clone()))
                        .or_insert(0);
                    if record.sequence > *seen {
                        *seen = record.sequence;
                        if args.json {
                            println!("{}", format_consent_json(&record));
                        } else {
                            println!("{}", format_consent_text(&record));
                        }
                    }
                }
                Err(e) => eprintln!(
                    "undecodable consent status event at offset {}: {e}",
                    message.offset()
                ),
            }
            continue;
        }
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
