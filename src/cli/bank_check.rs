//! `pis-worker bank-check`: the first command a TPP runs after onboarding. It runs the sequence
//! of `belfius::conformance` against the configured bank (the same settings as `run`), prints
//! what each answer showed, and ends with a one-line verdict: exit 0 when every answer is known
//! (naming the dialect when one matches), 1 when an answer matches nothing known.

use super::run::RunArgs;
use crate::belfius::conformance::{Observed, Verdict};
use crate::belfius::{
    AmountFormat, BankError, BelfiusClient, BelfiusConfig, SignatureEncoding, client, pkce,
};
use crate::domain::model::{Amount, Brand, Language, PaymentOrder, PaymentProduct};

#[derive(Debug, Clone, clap::Args)]
pub struct BankCheckArgs {
    /// The worker's own settings (bank URLs, Client-ID, secret, QWAC, QSeal, ...).
    #[command(flatten)]
    pub run: RunArgs,
    /// The brand host to check.
    #[arg(long, default_value = "belfius", value_parser = ["belfius", "banx"])]
    pub brand: String,
    /// A redirect URI registered for the Client-ID (the test payment's; never followed).
    #[arg(
        long,
        env = "PIS_BANK_CHECK_REDIRECT_URI",
        default_value = "https://localhost/pis-worker/bank-check"
    )]
    pub redirect_uri: String,
    /// The creditor of the test payment (0.01 EUR, never signed).
    #[arg(long, default_value = "BE71096123456769")]
    pub creditor_iban: String,
}

/// Runs the check; `Ok(false)` when an answer matched nothing known.
pub async fn run(args: BankCheckArgs) -> anyhow::Result<bool> {
    let config = args.run.bank_config()?;
    let brand = match args.brand.as_str() {
        "banx" => Brand::Banx,
        _ => Brand::Belfius,
    };
    let mut observed = Observed::default();
    let base =
        BelfiusClient::new(config.clone()).map_err(|e| anyhow::anyhow!("bank client: {e}"))?;

    // 1. Which /token versions are taken.
    for version in client::TOKEN_VERSIONS {
        match base
            .token_version_accepted(brand, version, &args.redirect_uri)
            .await
        {
            Ok(true) => {
                say(&format!("/token: version {version} taken"));
                observed.token_versions.push((*version).to_owned());
            }
            Ok(false) => say(&format!("/token: version {version} refused")),
            Err(e) => say(&format!("/token: version {version}: {e}")),
        }
    }

    // 2. One initiation, flipping the amount type or the signature alphabet once each if the
    // bank refuses them.
    let mut amount = config.amount_format;
    let mut encoding = config.qseal.as_ref().map(|q| q.format.encoding);
    let mut flipped_amount = false;
    let mut flipped_signature = false;
    let order = test_order(brand, &args);
    let initiated = loop {
        let client = BelfiusClient::new(variant(&config, amount, encoding))
            .map_err(|e| anyhow::anyhow!("bank client: {e}"))?;
        let challenge = pkce::Pkce::generate().challenge;
        let label = format!(
            "initiation (amount as {}{})",
            amount.as_str(),
            encoding.map_or(String::new(), |e| format!(", signature {}", alphabet(e)))
        );
        match client.initiate_payment_shaped(&order, &challenge).await {
            Ok((initiated, shape)) => {
                say(&format!(
                    "{label}: answered as {}, payment id {}, SCA link {}",
                    shape.as_str(),
                    initiated.bank_payment_id.as_str(),
                    initiated.sca_redirect_url
                ));
                observed.answer = Some(shape);
                observed.amount = Some(amount);
                observed.signature = encoding;
                break Some((client, initiated));
            }
            Err(BankError::Refused { status, body })
                if !flipped_amount
                    && body.error_description.contains("instructed_amount.amount") =>
            {
                say(&format!(
                    "{label}: refused ({status} {} {}): {}",
                    body.error, body.error_code, body.error_description
                ));
                flipped_amount = true;
                amount = match amount {
                    AmountFormat::String => AmountFormat::Number,
                    AmountFormat::Number => AmountFormat::String,
                };
            }
            Err(BankError::Refused { status, body })
                if !flipped_signature
                    && encoding.is_some()
                    && body
                        .error_description
                        .to_ascii_lowercase()
                        .contains("signature") =>
            {
                say(&format!(
                    "{label}: refused ({status} {} {}): {}",
                    body.error, body.error_code, body.error_description
                ));
                flipped_signature = true;
                encoding = encoding.map(|e| match e {
                    SignatureEncoding::Base64Padded => SignatureEncoding::Base64UrlNoPad,
                    SignatureEncoding::Base64UrlNoPad => SignatureEncoding::Base64Padded,
                });
            }
            Err(e) => {
                say(&format!("{label}: {e}"));
                break None;
            }
        }
    };

    // 3. The status of the unsigned payment.
    if let Some((client, initiated)) = &initiated {
        match client
            .payment_status(
                crate::domain::model::PaymentKind::Single,
                brand,
                order.product,
                &initiated.bank_payment_id,
            )
            .await
        {
            Ok(code) => {
                say(&format!(
                    "status of {}: {code}",
                    initiated.bank_payment_id.as_str()
                ));
                observed.pending_status = Some(code);
            }
            Err(e) => say(&format!("status: {e}")),
        }
    }

    let settings = observed.settings();
    let (line, ok) = match observed.verdict() {
        Verdict::Dialect(d) => (
            format!("dialect {} ({}); settings: {settings}", d.name, d.summary),
            true,
        ),
        Verdict::Known => (
            format!(
                "every answer is known, in a combination no named dialect has; settings: {settings}"
            ),
            true,
        ),
        Verdict::Unknown(why) => (
            format!(
                "the bank's answers match no known dialect: {}",
                why.join("; ")
            ),
            false,
        ),
    };
    println!("bank-check: verdict: {line}");
    Ok(ok)
}

fn say(line: &str) {
    println!("bank-check: {line}");
}

fn alphabet(encoding: SignatureEncoding) -> &'static str {
    match encoding {
        SignatureEncoding::Base64Padded => "standard Base64",
        SignatureEncoding::Base64UrlNoPad => "base64url",
    }
}

fn variant(
    config: &BelfiusConfig,
    amount: AmountFormat,
    encoding: Option<SignatureEncoding>,
) -> BelfiusConfig {
    let mut config = config.clone();
    config.amount_format = amount;
    if let (Some(qseal), Some(encoding)) = (config.qseal.as_mut(), encoding) {
        qseal.format.encoding = encoding;
    }
    config
}

fn test_order(brand: Brand, args: &BankCheckArgs) -> PaymentOrder {
    let stamp = chrono::Utc::now().format("%Y%m%d%H%M%S");
    PaymentOrder {
        product: PaymentProduct::SepaCreditTransfers,
        brand,
        amount: Amount::from_minor(1),
        currency: "EUR".into(),
        creditor_name: "pis-worker bank-check".into(),
        creditor_iban: args.creditor_iban.clone(),
        creditor_bic: None,
        debtor_iban: None,
        end_to_end_id: format!("BANKCHECK-{stamp}"),
        remittance_information: Some("bank-check, never signed".into()),
        requested_execution_date: None,
        language: Language::Fr,
        redirect_uri: args.redirect_uri.clone(),
        cross_border: None,
    }
}
