//! `pis-worker bank-check`: the first command a TPP runs after onboarding. It runs the sequence
//! of `belfius::conformance` against the configured bank (the same settings as `run`), prints
//! what each answer showed, and ends with a one-line verdict: exit 0 when every answer is known
//! (naming the dialect when one matches), 1 when an answer matches nothing known.

use super::run::RunArgs;
use crate::belfius::client::portal::{ConsentRequest, ConsentScope};
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
    /// A redirect URI registered for the Client-ID at onboarding (the test payment's; never
    /// followed). Banks refuse unregistered ones.
    #[arg(long, env = "PIS_BANK_CHECK_REDIRECT_URI")]
    pub redirect_uri: String,
    /// The creditor of the test payment (0.01 EUR, never signed).
    #[arg(long, default_value = "BE71096123456769")]
    pub creditor_iban: String,
    /// An account of the brand for the CAF consent probe (none: CAF is not probed). The
    /// consent is requested, never granted.
    #[arg(long, env = "PIS_BANK_CHECK_CAF_IBAN")]
    pub caf_iban: Option<String>,
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
                if !flipped_signature && encoding.is_some() && signature_refused(status, &body) =>
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
            Err(BankError::Refused { status, body }) => {
                say(&format!(
                    "{label}: refused ({status} {} {}): {}",
                    body.error, body.error_code, body.error_description
                ));
                break None;
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

    // 4. Which `GET /consent-uris` versions are taken, per scope (the consents are requested,
    // never granted: they expire at the bank). Informational: the verdict is about PIS.
    let mut consent_settings = Vec::new();
    for (scope, iban, setting, versions) in [
        (
            ConsentScope::Ais,
            None,
            "PIS_API_VERSION_CONSENT_AIS",
            ["4", "3"],
        ),
        (
            ConsentScope::Caf,
            args.caf_iban.as_deref(),
            "PIS_API_VERSION_CONSENT_CAF",
            ["3", "4"],
        ),
    ] {
        if scope == ConsentScope::Caf && iban.is_none() {
            say("consent-uris CAF: not probed (no --caf-iban)");
            continue;
        }
        for version in versions {
            let mut probe = config.clone();
            match scope {
                ConsentScope::Ais => probe.versions.consent_uris_ais = version.to_owned(),
                ConsentScope::Caf => probe.versions.consent_uris_caf = version.to_owned(),
            }
            let client =
                BelfiusClient::new(probe).map_err(|e| anyhow::anyhow!("bank client: {e}"))?;
            let challenge = pkce::Pkce::generate().challenge;
            let request = ConsentRequest {
                brand,
                scope,
                iban,
                language: None,
                redirect_uri: &args.redirect_uri,
                code_challenge: &challenge,
            };
            let label = format!("consent-uris {}: version {version}", scope.as_str());
            match client.consent_uris(&request).await {
                Ok(uris) => {
                    let languages: Vec<&str> = uris.iter().map(|u| u.language.as_str()).collect();
                    say(&format!(
                        "{label} taken, {} URI(s) ({})",
                        uris.len(),
                        languages.join(", ")
                    ));
                    consent_settings.push(format!("{setting}={version}"));
                    break;
                }
                Err(BankError::Refused { status, body }) => say(&format!(
                    "{label} refused ({status} {} {}): {}",
                    body.error, body.error_code, body.error_description
                )),
                Err(e) => {
                    say(&format!("{label}: {e}"));
                    break;
                }
            }
        }
    }
    if !consent_settings.is_empty() {
        say(&format!("consent settings: {}", consent_settings.join(" ")));
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

/// A refusal of the `Signature` [I]: the error table's "invalid security parameter"
/// (`GEN-1203-100008`), or a description naming the signature.
fn signature_refused(status: u16, body: &crate::belfius::ErrorBody) -> bool {
    let text = body.error_description.to_ascii_lowercase();
    status == 401
        && (body.error_code == "GEN-1203-100008"
            || text.contains("signature")
            || text.contains("jws"))
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
