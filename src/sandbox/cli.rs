//! Command-line entry points: `sandbox` (run the simulator) and `psu` (act as the PSU from a
//! script and print the browser's redirect URL back to the TPP).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use secrecy::SecretString;

use super::store::{DEFAULT_PSU, DEFAULT_REFRESH_TOKEN_LIFETIME};
use super::{
    DEFAULT_BANX_BANK_CODES, DEFAULT_BELFIUS_BANK_CODES, DEFAULT_BIC_REQUIRED_COUNTRIES,
    DEFAULT_DENIED_COUNTRIES, DEFAULT_REDIRECT_URIS, SandboxConfig, start,
};
use crate::belfius::SignatureEncoding;

pub const DEFAULT_CLIENT_ID: &str = "pis-worker-demo";
pub const DEFAULT_CLIENT_SECRET: &str = "sandbox-secret";

fn secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(value.into())
}

/// Run the Belfius sandbox simulator.
#[derive(Debug, Clone, clap::Args)]
pub struct SandboxArgs {
    /// Belfius-brand bank API address (HTTPS with mandatory client certificate).
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// Banx-brand bank API address (HTTPS with mandatory client certificate).
    #[arg(long, default_value = "127.0.0.1:8445")]
    pub banx_listen: SocketAddr,
    /// Operator / PSU API address (plain HTTP; keep it on loopback).
    #[arg(long, default_value = "127.0.0.1:8444")]
    pub admin_listen: SocketAddr,
    /// Directory of the test PKI; reused across restarts.
    #[arg(long, default_value = ".run/tls")]
    pub tls_dir: PathBuf,
    /// The Client-ID the simulated bank accepts.
    #[arg(long, default_value = DEFAULT_CLIENT_ID)]
    pub client_id: String,
    /// The client secret the simulated bank accepts at /token.
    #[arg(
        long,
        env = "PIS_SANDBOX_CLIENT_SECRET",
        default_value = DEFAULT_CLIENT_SECRET,
        hide_env_values = true,
        hide_default_value = true,
        value_parser = secret
    )]
    pub client_secret: SecretString,
    /// SHA-256 fingerprints (hex) of the client certificates registered for the Client-ID;
    /// default: the client.pem of --tls-dir.
    #[arg(long = "client-cert-sha256", value_delimiter = ',')]
    pub client_certificates: Vec<String>,
    /// Redirect URIs registered for the Client-ID: exact URLs, or prefixes ending in `*`
    /// (http only for loopback hosts).
    #[arg(long, value_delimiter = ',', default_values_t = strings(DEFAULT_REDIRECT_URIS))]
    pub redirect_uris: Vec<String>,
    /// Sign every payment automatically this many milliseconds after initiation.
    #[arg(long)]
    pub auto_sign_after_ms: Option<u64>,
    /// Delay between ACTC (signed) and ACSC (settled), in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub settle_after_ms: u64,
    /// An unsigned payment turns RJCT after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub sca_expiry_secs: u64,
    /// Lifetime of PIS access tokens, in seconds.
    #[arg(long, default_value_t = 900)]
    pub access_token_lifetime_secs: u64,
    /// Lifetime of PIS refresh tokens, in seconds (default 90 days).
    #[arg(long, default_value_t = DEFAULT_REFRESH_TOKEN_LIFETIME.as_secs())]
    pub refresh_token_lifetime_secs: u64,
    /// Check the QSeal `Signature` header of initiations (test QSeal in --tls-dir); on by
    /// default, `--verify-signatures=false` turns it off.
    #[arg(
        long,
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub verify_signatures: bool,
    /// The one Base64 encoding accepted in signatures: `padded` (standard, with padding, as
    /// the worker sends by default) or `url` (base64url without padding). Default: the
    /// dialect's.
    #[arg(long, value_parser = ["padded", "url"])]
    pub signature_encoding: Option<String>,
    /// PSUs may see and sign orphans (payments whose initiation answer was lost).
    #[arg(long)]
    pub orphans_signable: bool,
    /// Belgian bank codes (IBAN characters 5-7) of Banx accounts: `977` or `970-979`.
    #[arg(long, value_delimiter = ',', default_values_t = strings(DEFAULT_BANX_BANK_CODES))]
    pub banx_bank_codes: Vec<String>,
    /// Belgian bank codes of Belfius accounts; other Belgian debtor accounts are refused.
    #[arg(long, value_delimiter = ',', default_values_t = strings(DEFAULT_BELFIUS_BANK_CODES))]
    pub belfius_bank_codes: Vec<String>,
    /// Beneficiary countries refused with B14821ZZ-1227-000000.
    #[arg(long, value_delimiter = ',', default_values_t = strings(DEFAULT_DENIED_COUNTRIES))]
    pub denied_countries: Vec<String>,
    /// Countries whose cross-border transfers need a BIC or bank national id.
    #[arg(
        long,
        value_delimiter = ',',
        default_values_t = strings(DEFAULT_BIC_REQUIRED_COUNTRIES)
    )]
    pub bic_required_countries: Vec<String>,
    /// Answer as this plausible Belfius (`--list-dialects`; docs/belfius.md, "Dialects").
    #[arg(long, env = "PIS_SANDBOX_DIALECT", default_value = "v3-links", value_parser = dialect)]
    pub dialect: crate::belfius::dialect::Dialect,
    /// Print the dialects, one line each, and exit.
    #[arg(long)]
    pub list_dialects: bool,
}

fn dialect(name: &str) -> Result<crate::belfius::dialect::Dialect, String> {
    crate::belfius::dialect::Dialect::named(name).ok_or_else(|| {
        let names: Vec<&str> = crate::belfius::dialect::DIALECTS
            .iter()
            .map(|d| d.name)
            .collect();
        format!("unknown dialect {name:?}; one of {}", names.join(", "))
    })
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

impl SandboxArgs {
    pub fn config(&self) -> SandboxConfig {
        SandboxConfig {
            listen: self.listen,
            banx_listen: self.banx_listen,
            admin_listen: self.admin_listen,
            tls_dir: self.tls_dir.clone(),
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone(),
            client_certificates: self.client_certificates.clone(),
            redirect_uris: self.redirect_uris.clone(),
            auto_sign_after: self.auto_sign_after_ms.map(Duration::from_millis),
            settle_after: Duration::from_millis(self.settle_after_ms),
            sca_expiry: Duration::from_secs(self.sca_expiry_secs),
            access_token_lifetime: Duration::from_secs(self.access_token_lifetime_secs),
            refresh_token_lifetime: Duration::from_secs(self.refresh_token_lifetime_secs),
            verify_signatures: self.verify_signatures,
            // clap allows only these two values.
            signature_encoding: match self.signature_encoding.as_deref() {
                Some("url") => SignatureEncoding::Base64UrlNoPad,
                Some(_) => SignatureEncoding::Base64Padded,
                None => self.dialect.signature,
            },
            orphans_signable: self.orphans_signable,
            banx_bank_codes: self.banx_bank_codes.clone(),
            belfius_bank_codes: self.belfius_bank_codes.clone(),
            denied_countries: self.denied_countries.clone(),
            bic_required_countries: self.bic_required_countries.clone(),
            forget_final_after: None,
            dialect: self.dialect,
            fallback: super::fallback::FallbackSettings::default(),
        }
    }
}

/// Starts the simulator and serves until Ctrl-C or SIGTERM.
pub async fn run(args: SandboxArgs) -> anyhow::Result<()> {
    if args.list_dialects {
        print!("{}", crate::belfius::dialect::Dialect::listing());
        return Ok(());
    }
    let sandbox = start(args.config()).await?;
    println!(
        "sandbox: api {} banx-api {} admin {} tls-dir {}",
        sandbox.api_base_url(),
        sandbox.banx_base_url(),
        sandbox.admin_base_url(),
        sandbox.tls_dir.display()
    );
    wait_for_stop_signal().await?;
    sandbox.shutdown().await;
    Ok(())
}

async fn wait_for_stop_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.context("waiting for Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PsuAction {
    Sign,
    Reject,
    /// The PSU never signs: the payment turns RJCT when the SCA expires.
    Abandon,
}

impl PsuAction {
    fn path(self) -> &'static str {
        match self {
            PsuAction::Sign => "sign",
            PsuAction::Reject => "reject",
            PsuAction::Abandon => "abandon",
        }
    }
}

/// Act as the PSU on the sandbox: sign or refuse the latest payment with an end-to-end id, or
/// the payment behind the SCA URL the TPP gave, and print where the PSU's browser is sent back
/// to (feed it to the worker as the SCA outcome).
#[derive(Debug, Clone, clap::Args)]
pub struct PsuArgs {
    /// Base URL of the sandbox operator API.
    #[arg(long, default_value = "http://127.0.0.1:8444")]
    pub admin_url: url::Url,
    /// What the PSU does.
    #[arg(value_enum)]
    pub action: PsuAction,
    /// End-to-end id of the payment (the latest one with it).
    #[arg(long, required_unless_present = "sca_url", conflicts_with = "sca_url")]
    pub e2e: Option<String>,
    /// The SCA URL exactly as the TPP gave it to the PSU (its `state` comes back on the
    /// redirect). Kept as text, checked to be a URL: the simulator reads the link itself.
    #[arg(long, value_parser = absolute_url)]
    pub sca_url: Option<String>,
    /// Who signs or refuses: the authorization code (and so the tokens) belong to this PSU.
    #[arg(long, default_value = DEFAULT_PSU)]
    pub psu: String,
    /// One signature of several (multi-signature): the payment stays PATC.
    #[arg(long)]
    pub partial: bool,
}

fn absolute_url(text: &str) -> Result<String, url::ParseError> {
    url::Url::parse(text).map(|_| text.to_owned())
}

pub async fn run_psu(args: PsuArgs) -> anyhow::Result<()> {
    let url = psu_url(&args)?;
    let response = reqwest::Client::new()
        .post(url.clone())
        .send()
        .await
        .with_context(|| format!("calling {url}"))?;
    let status = response.status();
    let body: serde_json::Value = response
        .json()
        .await
        .with_context(|| format!("reading the answer of {url}"))?;
    if !status.is_success() {
        bail!("sandbox refused ({status}): {body}");
    }
    match body.get("redirect_url").and_then(|v| v.as_str()) {
        Some(redirect) => println!("{redirect}"),
        // Second signer of a multi-signature payment: nothing goes back to the TPP.
        None => eprintln!(
            "payment {} is now {} (no redirect to the TPP)",
            body.get("payment_id")
                .and_then(|v| v.as_str())
                .unwrap_or("?"),
            body.get("status").and_then(|v| v.as_str()).unwrap_or("?"),
        ),
    }
    Ok(())
}

/// `{admin}/admin/e2e/{e2e}/{action}?psu=…[&partial=true]` with the id percent-encoded as one
/// path segment, or `{admin}/admin/sca/{action}?url={sca_url}&psu=…[&partial=true]`.
pub fn psu_url(args: &PsuArgs) -> anyhow::Result<url::Url> {
    let admin = &args.admin_url;
    let mut url = admin.clone();
    let action = args.action.path();
    {
        let mut path = url
            .path_segments_mut()
            .map_err(|()| anyhow::anyhow!("admin URL {admin} cannot be a base"))?;
        path.pop_if_empty();
        // clap enforces one of the two; checked again for callers building PsuArgs by hand.
        match (&args.e2e, &args.sca_url) {
            (Some(e2e), None) => path.extend(["admin", "e2e", e2e.as_str(), action]),
            (None, Some(_)) => path.extend(["admin", "sca", action]),
            (Some(_), Some(_)) | (None, None) => bail!("give exactly one of --e2e and --sca-url"),
        };
    }
    let mut query = url.query_pairs_mut();
    if let Some(sca_url) = &args.sca_url {
        query.append_pair("url", sca_url);
    }
    match args.action {
        PsuAction::Sign | PsuAction::Reject => {
            query.append_pair("psu", &args.psu);
            if args.partial {
                query.append_pair("partial", "true");
            }
        }
        PsuAction::Abandon => {}
    }
    drop(query);
    // An abandon by end-to-end id has no query at all: no bare `?`.
    if url.query() == Some("") {
        url.set_query(None);
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    // A parser built once per test: the variants' sizes do not matter.
    #[allow(clippy::large_enum_variant)]
    #[derive(clap::Subcommand)]
    enum Command {
        Sandbox(SandboxArgs),
        Psu(PsuArgs),
    }

    #[test]
    fn sandbox_defaults() {
        let Command::Sandbox(args) = Cli::parse_from(["x", "sandbox"]).command else {
            panic!("wrong subcommand");
        };
        let config = args.config();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8443");
        assert_eq!(config.banx_listen.to_string(), "127.0.0.1:8445");
        assert_eq!(config.banx_bank_codes, ["977"]);
        assert_eq!(config.denied_countries, ["KP", "IR"]);
        assert_eq!(config.bic_required_countries, ["US"]);
        assert_eq!(config.access_token_lifetime, Duration::from_secs(900));
        assert_eq!(
            config.refresh_token_lifetime,
            Duration::from_secs(90 * 24 * 3600)
        );
        // Strict by default: signatures verified, in the worker's default encoding.
        assert!(config.verify_signatures);
        assert_eq!(config.signature_encoding, SignatureEncoding::Base64Padded);
        assert_eq!(config.redirect_uris, strings(DEFAULT_REDIRECT_URIS));
        assert!(config.client_certificates.is_empty());
        assert_eq!(config.belfius_bank_codes[0], "050-099");
        assert!(!config.orphans_signable);
        assert_eq!(config.admin_listen.to_string(), "127.0.0.1:8444");
        assert_eq!(config.client_id, DEFAULT_CLIENT_ID);
        assert_eq!(config.settle_after, Duration::from_secs(2));
        assert_eq!(config.auto_sign_after, None);
        assert_eq!(config.sca_expiry, Duration::from_secs(900));
        assert!(!format!("{args:?}").contains(DEFAULT_CLIENT_SECRET));
    }

    #[test]
    fn psu_args_and_url_encoding() {
        let Command::Psu(args) =
            Cli::parse_from(["x", "psu", "reject", "--e2e", "E2E/1 x"]).command
        else {
            panic!("wrong subcommand");
        };
        assert_eq!(args.action, PsuAction::Reject);
        let url = psu_url(&args).unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8444/admin/e2e/E2E%2F1%20x/reject?psu=psu-default"
        );
        let Command::Psu(args) = Cli::parse_from([
            "x",
            "psu",
            "sign",
            "--e2e",
            "E1",
            "--psu",
            "alice",
            "--partial",
        ])
        .command
        else {
            panic!("wrong subcommand");
        };
        assert_eq!(
            psu_url(&args).unwrap().as_str(),
            "http://127.0.0.1:8444/admin/e2e/E1/sign?psu=alice&partial=true"
        );
        let Command::Psu(args) = Cli::parse_from(["x", "psu", "abandon", "--e2e", "E1"]).command
        else {
            panic!("wrong subcommand");
        };
        assert_eq!(
            psu_url(&args).unwrap().as_str(),
            "http://127.0.0.1:8444/admin/e2e/E1/abandon"
        );
    }

    #[test]
    fn psu_by_sca_url() {
        let sca = "http://127.0.0.1:8444/sca/0123abcd?state=tpp-1";
        let Command::Psu(args) =
            Cli::parse_from(["x", "psu", "sign", "--sca-url", sca, "--psu", "alice"]).command
        else {
            panic!("wrong subcommand");
        };
        assert_eq!(args.e2e, None);
        let url = psu_url(&args).unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8444/admin/sca/sign?url=http%3A%2F%2F127.0.0.1%3A8444%2Fsca%2F0123abcd%3Fstate%3Dtpp-1&psu=alice"
        );
        // The simulator reads back exactly the link the PSU was given.
        let link = url.query_pairs().find(|(k, _)| k == "url").unwrap().1;
        assert_eq!(link, sca);
        let Command::Psu(args) = Cli::parse_from(["x", "psu", "abandon", "--sca-url", sca]).command
        else {
            panic!("wrong subcommand");
        };
        assert_eq!(
            psu_url(&args).unwrap().as_str(),
            "http://127.0.0.1:8444/admin/sca/abandon?url=http%3A%2F%2F127.0.0.1%3A8444%2Fsca%2F0123abcd%3Fstate%3Dtpp-1"
        );
        // Exactly one of --e2e and --sca-url.
        assert!(Cli::try_parse_from(["x", "psu", "sign"]).is_err());
        assert!(
            Cli::try_parse_from(["x", "psu", "sign", "--e2e", "E1", "--sca-url", sca]).is_err()
        );
        assert!(Cli::try_parse_from(["x", "psu", "sign", "--sca-url", "not a url"]).is_err());
        let mut both = args.clone();
        both.e2e = Some("E1".into());
        assert!(psu_url(&both).is_err());
    }

    #[test]
    fn sandbox_lists_and_switches() {
        let Command::Sandbox(args) = Cli::parse_from([
            "x",
            "sandbox",
            "--banx-listen",
            "127.0.0.1:9445",
            "--verify-signatures",
            "--orphans-signable",
            "--banx-bank-codes",
            "977,978",
            "--denied-countries",
            "KP",
            "--signature-encoding",
            "url",
            "--redirect-uris",
            "https://a.example/cb,https://b.example/*",
            "--client-cert-sha256",
            "ab:cd",
        ])
        .command
        else {
            panic!("wrong subcommand");
        };
        let config = args.config();
        assert_eq!(config.banx_listen.to_string(), "127.0.0.1:9445");
        assert!(config.verify_signatures);
        assert!(config.orphans_signable);
        assert_eq!(config.banx_bank_codes, ["977", "978"]);
        assert_eq!(config.denied_countries, ["KP"]);
        assert_eq!(config.signature_encoding, SignatureEncoding::Base64UrlNoPad);
        assert_eq!(
            config.redirect_uris,
            ["https://a.example/cb", "https://b.example/*"]
        );
        assert_eq!(config.client_certificates, ["ab:cd"]);

        let Command::Sandbox(args) =
            Cli::parse_from(["x", "sandbox", "--verify-signatures=false"]).command
        else {
            panic!("wrong subcommand");
        };
        assert!(!args.config().verify_signatures);
        assert!(Cli::try_parse_from(["x", "sandbox", "--signature-encoding", "raw"]).is_err());
    }
}
