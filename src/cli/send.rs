//! `pis-worker send`: publishes one command, as a client system would.

use std::time::Duration;

use anyhow::Context as _;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::BrokerArgs;
use crate::contract::command::{
    self, CommandBody, CommandEnvelope, ResolveAction, ResolveOutcome, ScaRedirect,
};
use crate::domain::model::{
    PostalAddress, RawBulkPayment, RawBulkTransfer, RawConsentRequest, RawInitiatePayment,
    RawPeriodicPayment,
};

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
    /// InitiatePeriodicPayment: a standing order.
    Periodic(Box<PeriodicArgs>),
    /// InitiateBulkPayment (Belfius brand only).
    Bulk(Box<BulkArgs>),
    /// CompleteSca: hand back what the PSU's browser brought to the redirect URI.
    CompleteSca(CompleteScaArgs),
    /// CancelPayment.
    Cancel(TargetArgs),
    /// RefreshStatus (operator).
    Refresh(TargetArgs),
    /// ResolveOutcome (operator): a person's decision on a payment held at OUTCOME_UNKNOWN,
    /// after checking at the bank (docs/runbooks.md).
    Resolve(ResolveArgs),
    /// RequestConsent: ask the PSU for an AIS or CAF consent.
    RequestConsent(RequestConsentArgs),
    /// CompleteConsent: hand back what the PSU's browser brought to a consent's redirect URI.
    CompleteConsent(CompleteConsentArgs),
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
    /// Cross-border: DEBT, CRED, SHAR or SLEV.
    #[arg(long)]
    pub charge_bearer: Option<String>,
    /// Cross-border: a national account number instead of --creditor-iban.
    #[arg(long)]
    pub creditor_bban: Option<String>,
    /// Cross-border: the creditor bank's national id (ABA, sort code...).
    #[arg(long)]
    pub creditor_bank_id: Option<String>,
    /// Cross-border: the creditor account's currency.
    #[arg(long)]
    pub creditor_currency: Option<String>,
    /// Cross-border: the creditor's country (ISO alpha-2); --creditor-town goes with it.
    #[arg(long)]
    pub creditor_country: Option<String>,
    #[arg(long)]
    pub creditor_town: Option<String>,
    /// Initiate with PKCE even when the worker holds a PIS token of the PSU.
    #[arg(long)]
    pub always_pkce: bool,
    /// Confirm the funds (CAF) before initiating, when the PSU holds a CAF consent for
    /// --debtor-iban.
    #[arg(long)]
    pub funds_check: bool,
}

impl InitiateArgs {
    fn raw(&self) -> RawInitiatePayment {
        RawInitiatePayment {
            payment_product: self.product.clone(),
            brand: self.brand.clone(),
            amount: self.amount.clone(),
            currency: self.currency.clone(),
            creditor_name: self.creditor_name.clone(),
            creditor_iban: self.creditor_iban.clone(),
            creditor_bic: self.creditor_bic.clone(),
            debtor_iban: self.debtor_iban.clone(),
            end_to_end_id: self
                .end_to_end_id
                .clone()
                .unwrap_or(self.target.payment_id.clone()),
            remittance_information: self.remittance.clone(),
            requested_execution_date: self.execution_date.clone(),
            language: self.language.clone(),
            redirect_uri: self.redirect_uri.clone(),
            charge_bearer: self.charge_bearer.clone(),
            creditor_address: self.creditor_country.as_ref().map(|country| PostalAddress {
                town: self.creditor_town.clone(),
                country: country.clone(),
                ..PostalAddress::default()
            }),
            creditor_bban: self.creditor_bban.clone(),
            creditor_bank_national_id: self.creditor_bank_id.clone(),
            creditor_currency: self.creditor_currency.clone(),
            always_pkce: self.always_pkce,
            funds_check: self.funds_check,
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct PeriodicArgs {
    #[command(flatten)]
    pub payment: InitiateArgs,
    /// First execution, yyyy-mm-dd (in the future).
    #[arg(long)]
    pub start_date: String,
    #[arg(long)]
    pub end_date: Option<String>,
    /// DAILY, WEEKLY, EVERY_TWO_WEEKS, MONTHLY, EVERY_TWO_MONTHS, QUARTERLY, SEMI_ANNUAL, ANNUAL.
    #[arg(long, default_value = "MONTHLY")]
    pub frequency: String,
    #[arg(long)]
    pub day_of_execution: Option<i32>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BulkArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[arg(long, default_value = "SEPA_CREDIT_TRANSFERS")]
    pub product: String,
    #[arg(long, default_value = "BELFIUS")]
    pub brand: String,
    #[arg(long)]
    pub debtor_iban: Option<String>,
    #[arg(long)]
    pub batch_booking: bool,
    /// Initiate with PKCE even when the worker holds a PIS token of the PSU.
    #[arg(long)]
    pub always_pkce: bool,
    /// InitiateBulkPayment.funds_check (read, not acted on for a bulk).
    #[arg(long)]
    pub funds_check: bool,
    #[arg(long)]
    pub execution_date: Option<String>,
    #[arg(long, default_value = "fr")]
    pub language: String,
    #[arg(long, default_value = "https://client.example/callback")]
    pub redirect_uri: String,
    /// One transfer, `AMOUNT:IBAN:CREDITOR NAME:END-TO-END-ID` (repeat for each; EUR).
    #[arg(long = "transfer", required = true, value_parser = parse_transfer)]
    pub transfers: Vec<RawBulkTransfer>,
}

fn parse_transfer(text: &str) -> Result<RawBulkTransfer, String> {
    let parts: Vec<&str> = text.splitn(4, ':').collect();
    match parts.as_slice() {
        [amount, iban, name, e2e] => Ok(RawBulkTransfer {
            amount: (*amount).to_owned(),
            currency: "EUR".into(),
            creditor_name: (*name).to_owned(),
            creditor_iban: (*iban).to_owned(),
            creditor_bic: None,
            end_to_end_id: (*e2e).to_owned(),
            remittance_information: None,
        }),
        _other => Err("expected AMOUNT:IBAN:CREDITOR NAME:END-TO-END-ID".into()),
    }
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
pub struct ResolveArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// reinitiate: nothing of the unanswered attempt is at the bank; adopt: the bank holds it
    /// (give --bank-payment-id); abandon: nothing to track.
    #[arg(long, value_parser = ["reinitiate", "adopt", "abandon"])]
    pub action: String,
    #[arg(long)]
    pub bank_payment_id: Option<String>,
    /// Why, for the audit trail (it goes into the status event's reason).
    #[arg(long)]
    pub note: Option<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ConsentTargetArgs {
    /// The client's consent id (sent in the envelope's payment_id).
    #[arg(long)]
    pub consent_id: String,
    #[arg(long)]
    pub psu_id: String,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RequestConsentArgs {
    #[command(flatten)]
    pub target: ConsentTargetArgs,
    #[arg(long, default_value = "BELFIUS")]
    pub brand: String,
    /// AIS or CAF.
    #[arg(long)]
    pub scope: String,
    /// CAF: the account the funds checks are for (required). AIS: not allowed.
    #[arg(long)]
    pub account_iban: Option<String>,
    #[arg(long, default_value = "fr")]
    pub language: String,
    #[arg(long, default_value = "https://client.example/callback")]
    pub redirect_uri: String,
}

#[derive(Debug, Clone, clap::Args)]
pub struct CompleteConsentArgs {
    #[command(flatten)]
    pub target: ConsentTargetArgs,
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
        SendCommand::Initiate(a) => envelope_bytes(
            &CommandEnvelope {
                command_id: command_id.clone(),
                payment_id: a.target.payment_id.clone(),
                psu_id: a.target.psu_id.clone(),
                issued_at: now,
                body: CommandBody::Initiate(Box::new(a.raw())),
            },
            "InitiatePayment",
        )?,
        SendCommand::Periodic(a) => envelope_bytes(
            &CommandEnvelope {
                command_id: command_id.clone(),
                payment_id: a.payment.target.payment_id.clone(),
                psu_id: a.payment.target.psu_id.clone(),
                issued_at: now,
                body: CommandBody::InitiatePeriodic(Box::new(RawPeriodicPayment {
                    payment: a.payment.raw(),
                    start_date: a.start_date.clone(),
                    end_date: a.end_date.clone(),
                    frequency: a.frequency.clone(),
                    day_of_execution: a.day_of_execution,
                })),
            },
            "InitiatePeriodicPayment",
        )?,
        SendCommand::Bulk(a) => envelope_bytes(
            &CommandEnvelope {
                command_id: command_id.clone(),
                payment_id: a.target.payment_id.clone(),
                psu_id: a.target.psu_id.clone(),
                issued_at: now,
                body: CommandBody::InitiateBulk(Box::new(RawBulkPayment {
                    payment_product: a.product.clone(),
                    brand: a.brand.clone(),
                    debtor_iban: a.debtor_iban.clone(),
                    batch_booking: a.batch_booking,
                    requested_execution_date: a.execution_date.clone(),
                    language: a.language.clone(),
                    redirect_uri: a.redirect_uri.clone(),
                    payments: a.transfers.clone(),
                    always_pkce: a.always_pkce,
                    funds_check: a.funds_check,
                })),
            },
            "InitiateBulkPayment",
        )?,
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
        SendCommand::RequestConsent(a) => envelope_bytes(
            &CommandEnvelope {
                command_id: command_id.clone(),
                payment_id: a.target.consent_id,
                psu_id: a.target.psu_id,
                issued_at: now,
                body: CommandBody::RequestConsent(RawConsentRequest {
                    brand: a.brand,
                    scope: a.scope,
                    account_iban: a.account_iban,
                    language: a.language,
                    redirect_uri: a.redirect_uri,
                }),
            },
            "RequestConsent",
        )?,
        SendCommand::CompleteConsent(a) => envelope_bytes(
            &CommandEnvelope {
                command_id: command_id.clone(),
                payment_id: a.target.consent_id,
                psu_id: a.target.psu_id,
                issued_at: now,
                body: CommandBody::CompleteConsent(ScaRedirect::from_redirect_url(&a.redirect_url)),
            },
            "CompleteConsent",
        )?,
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
        SendCommand::Resolve(a) => {
            let action = match a.action.as_str() {
                "adopt" => ResolveAction::Adopt,
                "abandon" => ResolveAction::Abandon,
                _ => ResolveAction::Reinitiate,
            };
            match (action, &a.bank_payment_id) {
                (ResolveAction::Adopt, None) => {
                    anyhow::bail!("--action adopt needs --bank-payment-id")
                }
                (ResolveAction::Reinitiate | ResolveAction::Abandon, Some(_)) => {
                    anyhow::bail!("--bank-payment-id goes with --action adopt only")
                }
                (ResolveAction::Adopt, Some(_))
                | (ResolveAction::Reinitiate | ResolveAction::Abandon, None) => {}
            }
            envelope_bytes(
                &CommandEnvelope {
                    command_id: command_id.clone(),
                    payment_id: a.target.payment_id,
                    psu_id: a.target.psu_id,
                    issued_at: now,
                    body: CommandBody::Resolve(ResolveOutcome {
                        action,
                        bank_payment_id: a.bank_payment_id,
                        note: a.note,
                    }),
                },
                "ResolveOutcome",
            )?
        }
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
