//! `pis-worker send`: publishes one command, as a client system would.

use std::time::Duration;

use anyhow::Context as _;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::BrokerArgs;
use crate::contract::command::{self, CommandBody, CommandEnvelope, ScaRedirect};
use crate::domain::model::RawInitiatePayment;

#[derive(Debug, Clone, clap::Args)]
pub struct SendArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Defaults to a fresh UUID.
    #[arg(long, global = true)]
    pub command_id: Option<String>,
    #[command(subcommand)]
    pub command: SendCommand,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum SendCommand {
    /// InitiatePayment.
    Initiate(Box<InitiateArgs>),
    /// CompleteSca: hand back what the PSU's browser brought to the redirect URI.
    CompleteSca(CompleteScaArgs),
    /// CancelPayment.
    Cancel(TargetArgs),
    /// RefreshStatus (operator).
    Refresh(TargetArgs),
    /// Raw bytes with a key: for testing the dead-letter path.
    Raw(RawArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    #[arg(long)]
    pub payment_id: String,
    #[arg(long)]
    pub psu_id: String,
}

#[derive(Debug, Clone, clap::Args)]
pub struct InitiateArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[arg(long, default_value = "SEPA_CREDIT_TRANSFERS")]
    pub product: String,
    #[arg(long, default_value = "BELFIUS")]
    pub brand: String,
    #[arg(long)]
    pub amount: String,
    #[arg(long, default_value = "EUR")]
    pub currency: String,
    #[arg(long)]
    pub creditor_name: String,
    #[arg(long)]
    pub creditor_iban: String,
    #[arg(long)]
    pub creditor_bic: Option<String>,
    #[arg(long)]
    pub debtor_iban: Option<String>,
    /// Defaults to the payment id.
    #[arg(long)]
    pub end_to_end_id: Option<String>,
    #[arg(long)]
    pub remittance: Option<String>,
    /// yyyy-mm-dd
    #[arg(long)]
    pub execution_date: Option<String>,
    #[arg(long, default_value = "fr")]
    pub language: String,
    #[arg(long, default_value = "https://client.example/callback")]
    pub redirect_uri: String,
}

#[derive(Debug, Clone, clap::Args)]
pub struct CompleteScaArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// The full redirect URL (with `code` or `error`), as the PSU's browser arrived with it.
    #[arg(long)]
    pub redirect_url: url::Url,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RawArgs {
    #[arg(long)]
    pub key: String,
    /// The record value, as text.
    #[arg(long)]
    pub value: String,
}

pub async fn run(args: SendArgs) -> anyhow::Result<()> {
    let settings = args.broker.settings("pis-worker-send", 30_000);
    let producer: FutureProducer = settings
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .create()
        .context("creating producer")?;
    let command_id = args
        .command_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let now = chrono::Utc::now().timestamp_millis();
    let (key, value, label) = match args.command {
        SendCommand::Raw(raw) => (raw.key, raw.value.into_bytes(), "raw".to_owned()),
        SendCommand::Initiate(a) => {
            let a = *a;
            let envelope = CommandEnvelope {
                command_id: command_id.clone(),
                payment_id: a.target.payment_id.clone(),
                psu_id: a.target.psu_id.clone(),
                issued_at: now,
                body: CommandBody::Initiate(Box::new(RawInitiatePayment {
                    payment_product: a.product,
                    brand: a.brand,
                    amount: a.amount,
                    currency: a.currency,
                    creditor_name: a.creditor_name,
                    creditor_iban: a.creditor_iban,
                    creditor_bic: a.creditor_bic,
                    debtor_iban: a.debtor_iban,
                    end_to_end_id: a.end_to_end_id.unwrap_or(a.target.payment_id.clone()),
                    remittance_information: a.remittance,
                    requested_execution_date: a.execution_date,
                    language: a.language,
                    redirect_uri: a.redirect_uri,
                    ..Default::default()
                })),
            };
            envelope_bytes(&envelope, "InitiatePayment")?
        }
        SendCommand::CompleteSca(a) => {
            let envelope = CommandEnvelope {
                command_id: command_id.clone(),
                payment_id: a.target.payment_id,
                psu_id: a.target.psu_id,
                issued_at: now,
                body: CommandBody::CompleteSca(ScaRedirect::from_redirect_url(&a.redirect_url)),
            };
            envelope_bytes(&envelope, "CompleteSca")?
        }
        SendCommand::Cancel(t) => envelope_bytes(
            &CommandEnvelope {
                command_id: command_id.clone(),
                payment_id: t.payment_id,
                psu_id: t.psu_id,
                issued_at: now,
                body: CommandBody::Cancel { reason: None },
            },
            "CancelPayment",
        )?,
        SendCommand::Refresh(t) => envelope_bytes(
            &CommandEnvelope {
                command_id: command_id.clone(),
                payment_id: t.payment_id,
                psu_id: t.psu_id,
                issued_at: now,
                body: CommandBody::RefreshStatus,
            },
            "RefreshStatus",
        )?,
    };
    let record = FutureRecord::to(&settings.topics.commands)
        .key(key.as_bytes())
        .payload(&value);
    let delivered = producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| anyhow::anyhow!("sending to {}: {e}", settings.topics.commands))?;
    println!(
        "sent {label} command_id={command_id} key={key} partition={} offset={}",
        delivered.partition, delivered.offset
    );
    Ok(())
}

fn envelope_bytes(
    envelope: &CommandEnvelope,
    label: &str,
) -> anyhow::Result<(String, Vec<u8>, String)> {
    let bytes = command::encode(envelope).map_err(|e| anyhow::anyhow!("encoding {label}: {e}"))?;
    Ok((envelope.psu_id.clone(), bytes, label.to_owned()))
}
