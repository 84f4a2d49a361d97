//! `pis-worker run` and `pis-worker topics`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use secrecy::SecretString;

use super::BrokerArgs;
use crate::belfius::{
    ApiVersions, BelfiusConfig, QsealConfig, QwacIdentity, SignatureEncoding, SignatureFormat,
    SignedOperations,
};
use crate::domain::machine::{Policy, UnknownOutcomePolicy};
use crate::domain::model::Amount;
use crate::domain::validation::ValidationLimits;
use crate::engine::WorkerConfig;

fn secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(value.into())
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[arg(long, env = "PIS_GROUP_ID", default_value = "pis-worker")]
    pub group_id: String,
    #[arg(long, env = "PIS_SESSION_TIMEOUT_MS", default_value_t = 30_000)]
    pub session_timeout_ms: u32,
    /// Create missing topics with this many partitions at start-up.
    #[arg(long, env = "PIS_CREATE_TOPICS")]
    pub create_topics: Option<i32>,
    /// Serve /metrics, /healthz and /readyz here; "off" to not serve them.
    #[arg(long, env = "PIS_HTTP_ADDR", default_value = "0.0.0.0:9400")]
    pub http_addr: String,
    /// Belfius-brand API base URL.
    #[arg(
        long,
        env = "PIS_BELFIUS_URL",
        default_value = "https://psd2.b2b.belfius.be:8443/"
    )]
    pub belfius_url: url::Url,
    /// Banx-brand API base URL.
    #[arg(
        long,
        env = "PIS_BANX_URL",
        default_value = "https://psd2.b2b.banx.be:8443/"
    )]
    pub banx_url: url::Url,
    #[arg(long, env = "PIS_CLIENT_ID")]
    pub client_id: String,
    /// The client secret from onboarding (prefer the env variable or --client-secret-file).
    #[arg(long, env = "PIS_CLIENT_SECRET", hide_env_values = true, value_parser = secret)]
    pub client_secret: Option<SecretString>,
    #[arg(long, env = "PIS_CLIENT_SECRET_FILE")]
    pub client_secret_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) to trust for the bank, e.g. the sandbox's test CA.
    #[arg(long, env = "PIS_BANK_CA_FILE")]
    pub bank_ca_file: Option<PathBuf>,
    /// QWAC certificate chain (PEM) for mutual TLS.
    #[arg(long, env = "PIS_QWAC_CERT_FILE")]
    pub qwac_cert_file: Option<PathBuf>,
    /// QWAC private key (PEM).
    #[arg(long, env = "PIS_QWAC_KEY_FILE")]
    pub qwac_key_file: Option<PathBuf>,
    /// QWAC as a PKCS#12 archive instead of PEM files.
    #[arg(long, env = "PIS_QWAC_P12_FILE")]
    pub qwac_p12_file: Option<PathBuf>,
    #[arg(long, env = "PIS_QWAC_P12_PASSWORD_FILE")]
    pub qwac_p12_password_file: Option<PathBuf>,
    /// QSeal private key (PEM): signs requests with a `Signature` header (JWS RS256).
    #[arg(long, env = "PIS_QSEAL_KEY_FILE")]
    pub qseal_key_file: Option<PathBuf>,
    /// QSeal certificate (PEM), for the JWS `x5c` header.
    #[arg(long, env = "PIS_QSEAL_CERT_FILE")]
    pub qseal_cert_file: Option<PathBuf>,
    /// `padded` (standard Base64, as Tink sent) or `url` (base64url, RFC 7515).
    #[arg(long, env = "PIS_SIGNATURE_ENCODING", default_value = "padded", value_parser = ["padded", "url"])]
    pub signature_encoding: String,
    #[arg(long, env = "PIS_SIGNATURE_X5C")]
    pub signature_x5c: bool,
    #[arg(long, env = "PIS_SIGNATURE_KID")]
    pub signature_kid: Option<String>,
    /// Also sign cancellations (DELETE).
    #[arg(long, env = "PIS_SIGN_CANCELLATION")]
    pub sign_cancellation: bool,
    /// The current state key: seals every state record written. 64 hex chars
    /// (`pis-worker keygen`; its id is derived from it) or `id:hex`; prefer --state-key-file.
    #[arg(long, env = "PIS_STATE_KEY", hide_env_values = true, value_parser = secret)]
    pub state_key: Option<SecretString>,
    #[arg(long, env = "PIS_STATE_KEY_FILE")]
    pub state_key_file: Option<PathBuf>,
    /// Previous state keys, read only (records sealed before a rotation): comma-separated,
    /// each `hex` or `id:hex`; prefer --state-keys-previous-file.
    #[command(flatten)]
    pub previous_keys: PreviousKeysArgs,
    /// The format of the state records written: 3 (binary body) or 2 (JSON body). Both are
    /// read. Write 2 during a rolling upgrade from a version that reads only format 2
    /// (docs/architecture.md, "State record format").
    #[arg(long, env = "PIS_STATE_FORMAT", default_value = "3")]
    pub state_format: crate::secret::StateFormat,
    #[arg(long, env = "PIS_API_VERSION_INITIATION", default_value = "3")]
    pub api_version_initiation: String,
    #[arg(long, env = "PIS_API_VERSION_STATUS", default_value = "1")]
    pub api_version_status: String,
    /// Tried first; if the bank refuses it, the other known versions are (3, 2, 1.1, 1).
    #[arg(long, env = "PIS_API_VERSION_TOKEN", default_value = "3")]
    pub api_version_token: String,
    /// `GET /consent-uris` for AIS consents ([P] version 4).
    #[arg(long, env = "PIS_API_VERSION_CONSENT_AIS", default_value = "4")]
    pub api_version_consent_ais: String,
    /// `GET /consent-uris` for CAF consents, which name one IBAN ([I] version 3).
    #[arg(long, env = "PIS_API_VERSION_CONSENT_CAF", default_value = "3")]
    pub api_version_consent_caf: String,
    /// `POST /funds-confirmations` ([P] version 1).
    #[arg(long, env = "PIS_API_VERSION_FUNDS", default_value = "1")]
    pub api_version_funds: String,
    /// `GET /accounts…` (AIS: settlement evidence, [P] version 3).
    #[arg(long, env = "PIS_API_VERSION_ACCOUNTS", default_value = "3")]
    pub api_version_accounts: String,
    /// `string` ("12.34") or `number` (12.34) for amounts in initiation bodies: undocumented
    /// for v3 (docs/belfius.md); `pis-worker bank-check` tells which one the bank takes.
    #[arg(long, env = "PIS_AMOUNT_FORMAT", default_value = "string")]
    pub amount_format: crate::belfius::AmountFormat,
    /// Status codes beyond the ISO 20022 list and what they mean, e.g. `XYZW=signed` (one of
    /// awaiting-sca, partially-signed, signed, settled, rejected, cancelled; comma-separated).
    #[arg(long, env = "PIS_BANK_STATUS_MAP", default_value = "")]
    pub bank_status_map: String,
    #[arg(long, env = "PIS_API_VERSION_PERIODIC", default_value = "2")]
    pub api_version_periodic: String,
    #[arg(long, env = "PIS_API_VERSION_BULK", default_value = "1")]
    pub api_version_bulk: String,
    #[arg(long, env = "PIS_API_VERSION_DETAILS", default_value = "1")]
    pub api_version_details: String,
    #[arg(long, env = "PIS_API_VERSION_CANCELLATION", default_value = "1")]
    pub api_version_cancellation: String,
    #[arg(long, env = "PIS_BANK_CONNECT_TIMEOUT_MS", default_value_t = 5_000)]
    pub bank_connect_timeout_ms: u64,
    #[arg(long, env = "PIS_BANK_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub bank_request_timeout_ms: u64,
    /// Retries, per-host limits and circuit breaker of bank calls (docs/belfius.md §1.5).
    #[command(flatten)]
    pub bank_guard: crate::belfius::guard::GuardArgs,
    /// The fallback interface and the switch-over to it (docs/belfius.md §7.5); off by default.
    #[command(flatten)]
    pub fallback: crate::belfius::route::FallbackArgs,
    /// How long the PSU has to sign.
    #[arg(long, env = "PIS_SCA_TIMEOUT_SECS", default_value_t = 900)]
    pub sca_timeout_secs: u64,
    #[arg(long, env = "PIS_POLL_FAST_MS", default_value_t = 2_000)]
    pub poll_fast_ms: u64,
    #[arg(long, env = "PIS_POLL_FAST_COUNT", default_value_t = 10)]
    pub poll_fast_count: u32,
    #[arg(long, env = "PIS_POLL_SLOW_MS", default_value_t = 30_000)]
    pub poll_slow_ms: u64,
    #[arg(long, env = "PIS_MAX_INITIATION_ATTEMPTS", default_value_t = 3)]
    pub max_initiation_attempts: u32,
    /// An initiation that got no answer: `hold` it at OUTCOME_UNKNOWN for a person to resolve
    /// (ResolveOutcome), or `reinitiate` it after a delay (docs/guarantees.md, "Lost
    /// initiation answers").
    #[arg(long, env = "PIS_UNKNOWN_OUTCOME", default_value = "hold", value_parser = ["hold", "reinitiate"])]
    pub unknown_outcome: String,
    /// Initiate a returning PSU's payment with the PSU's PIS access token when the worker holds
    /// the PSU's pair (no PKCE, no code on the redirect); `false`: every payment with PKCE
    /// (docs/architecture.md, "Tokens").
    #[arg(long, env = "PIS_INITIATE_WITH_TOKEN", default_value_t = true, action = clap::ArgAction::Set)]
    pub initiate_with_token: bool,
    /// After asking the bank to end an unsigned payment (SCA deadline, PSU refusal), how long to
    /// wait for the bank's confirmation before reporting OUTCOME_UNKNOWN (EXPIRY_UNCONFIRMED).
    #[arg(long, env = "PIS_EXPIRY_HORIZON_SECS", default_value_t = 3_600)]
    pub expiry_horizon_secs: u64,
    /// Largest amount accepted, e.g. 1000000.00.
    #[arg(long, env = "PIS_MAX_AMOUNT", default_value = "1000000.00")]
    pub max_amount: String,
    #[arg(long, env = "PIS_MAX_COMMAND_BYTES", default_value_t = 65_536)]
    pub max_command_bytes: usize,
    /// Bound for finishing in-flight work when a partition is revoked.
    #[arg(long, env = "PIS_DRAIN_TIMEOUT_MS", default_value_t = 10_000)]
    pub drain_timeout_ms: u64,
    /// How long a final payment is kept after its final event before it is retired: it leaves
    /// memory and its state record is replaced by a compact retired record (docs/contract.md,
    /// "Retention"). Default 7 days.
    #[arg(long, env = "PIS_RETENTION_SECS", default_value_t = 604_800, value_parser = clap::value_parser!(u64).range(1..))]
    pub retention_secs: u64,
    /// How long a retired payment id is remembered after the final event: until then any
    /// command for it is dead-lettered PAYMENT_RETIRED; afterwards the id is forgotten (keep
    /// the command topic's retention shorter). At least --retention-secs. Default 35 days.
    #[arg(long, env = "PIS_RETIRED_IDS_RETENTION_SECS", default_value_t = 3_024_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub retired_ids_retention_secs: u64,
    /// How often each owned state partition is snapshotted at least (if anything changed): a
    /// restore reads from the newest snapshot (docs/architecture.md, "Snapshots"). Default 1 h.
    #[arg(long, env = "PIS_SNAPSHOT_INTERVAL_SECS", default_value_t = 3_600, value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_interval_secs: u64,
    /// A snapshot is also written as soon as a restore would read this many records after the
    /// newest one (or twice the partition's live entities, if that is more).
    #[arg(long, env = "PIS_SNAPSHOT_MIN_RECORDS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_min_records: u64,
    /// Schema registry and extra writer schemas (docs/schemas.md).
    #[command(flatten)]
    pub contract: crate::contract::registry::ContractArgs,
}

/// The read-only state keys of a rotation, shared by `run` and `state`.
#[derive(Debug, Clone, clap::Args)]
pub struct PreviousKeysArgs {
    /// Previous state keys, read only: comma-separated, each `hex` or `id:hex`.
    #[arg(long = "state-key-previous", env = "PIS_STATE_KEYS_PREVIOUS", hide_env_values = true, value_parser = secret)]
    pub state_keys_previous: Option<SecretString>,
    /// A file of previous state keys, one per line (or comma-separated); `#` starts a comment.
    #[arg(
        long = "state-keys-previous-file",
        env = "PIS_STATE_KEYS_PREVIOUS_FILE"
    )]
    pub state_keys_previous_file: Option<PathBuf>,
    /// Read format 1 state records (written before records were sealed whole). Set to false
    /// once the migration is finished (docs/runbooks.md): a format 1 record is then quarantined.
    #[arg(long, env = "PIS_STATE_ACCEPT_V1", default_value_t = true, action = clap::ArgAction::Set)]
    pub state_accept_v1: bool,
}

impl PreviousKeysArgs {
    /// The list, from the flag/variable or the file (both: joined).
    pub fn read(&self) -> anyhow::Result<Option<SecretString>> {
        use secrecy::ExposeSecret as _;
        let file = self
            .state_keys_previous_file
            .as_ref()
            .map(|path| read_secret_file(path, "previous state keys"))
            .transpose()?;
        Ok(match (&self.state_keys_previous, file) {
            (Some(list), Some(file)) => Some(SecretString::from(format!(
                "{},{}",
                list.expose_secret(),
                file.expose_secret()
            ))),
            (Some(list), None) => Some(list.clone()),
            (None, file) => file,
        })
    }
}

pub(crate) fn read_secret_file(path: &PathBuf, what: &str) -> anyhow::Result<SecretString> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {what} from {}", path.display()))?;
    Ok(SecretString::from(text.trim().to_owned()))
}

impl RunArgs {
    /// The bank client's configuration (shared by `run` and `bank-check`).
    pub fn bank_config(&self) -> anyhow::Result<BelfiusConfig> {
        let client_secret = match (&self.client_secret, &self.client_secret_file) {
            (Some(s), _) => s.clone(),
            (None, Some(path)) => read_secret_file(path, "client secret")?,
            (None, None) => anyhow::bail!(
                "the client secret is required (PIS_CLIENT_SECRET or --client-secret-file)"
            ),
        };
        let extra_ca_pem = self
            .bank_ca_file
            .as_ref()
            .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
            .transpose()?;
        let qwac = match (
            &self.qwac_cert_file,
            &self.qwac_key_file,
            &self.qwac_p12_file,
        ) {
            (Some(cert), Some(key), None) => Some(QwacIdentity {
                cert_chain_pem: std::fs::read(cert)
                    .with_context(|| format!("reading {}", cert.display()))?,
                private_key_pem: read_secret_file(key, "QWAC key")?,
            }),
            (None, None, Some(p12)) => {
                let der =
                    std::fs::read(p12).with_context(|| format!("reading {}", p12.display()))?;
                let password = match &self.qwac_p12_password_file {
                    Some(path) => read_secret_file(path, "PKCS#12 password")?,
                    None => SecretString::from(String::new()),
                };
                Some(
                    crate::belfius::identity::qwac_from_pkcs12(&der, &password)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", p12.display()))?,
                )
            }
            (None, None, None) => None,
            _ => anyhow::bail!(
                "give the QWAC as --qwac-cert-file with --qwac-key-file, or as --qwac-p12-file"
            ),
        };
        let qseal = match &self.qseal_key_file {
            Some(key) => Some(QsealConfig {
                private_key_pem: read_secret_file(key, "QSeal key")?,
                certificate_pem: self
                    .qseal_cert_file
                    .as_ref()
                    .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
                    .transpose()?,
                format: SignatureFormat {
                    encoding: if self.signature_encoding == "url" {
                        SignatureEncoding::Base64UrlNoPad
                    } else {
                        SignatureEncoding::Base64Padded
                    },
                    include_x5c: self.signature_x5c,
                    kid: self.signature_kid.clone(),
                },
                sign: SignedOperations {
                    initiation: true,
                    cancellation: self.sign_cancellation,
                },
            }),
            None => None,
        };
        Ok(BelfiusConfig {
            belfius_base_url: self.belfius_url.clone(),
            banx_base_url: self.banx_url.clone(),
            client_id: self.client_id.clone(),
            client_secret,
            extra_ca_pem,
            qwac,
            connect_timeout: Duration::from_millis(self.bank_connect_timeout_ms),
            request_timeout: Duration::from_millis(self.bank_request_timeout_ms),
            versions: ApiVersions {
                payment_initiation: self.api_version_initiation.clone(),
                payment_status: self.api_version_status.clone(),
                token: self.api_version_token.clone(),
                periodic_initiation: self.api_version_periodic.clone(),
                bulk_initiation: self.api_version_bulk.clone(),
                payment_details: self.api_version_details.clone(),
                payment_cancellation: self.api_version_cancellation.clone(),
                consent_uris_ais: self.api_version_consent_ais.clone(),
                consent_uris_caf: self.api_version_consent_caf.clone(),
                funds_confirmation: self.api_version_funds.clone(),
                accounts: self.api_version_accounts.clone(),
            },
            qseal,
            amount_format: self.amount_format,
            status_map: crate::belfius::status::StatusMap::parse(&self.bank_status_map)
                .map_err(|e| anyhow::anyhow!("--bank-status-map: {e}"))?,
        })
    }

    /// The fallback's settings when it is enabled; refused at start when they are incomplete,
    /// or when there is no QSeal key to sign its sessions with.
    fn fallback_setup(&self) -> anyhow::Result<Option<crate::belfius::route::FallbackSetup>> {
        let setup = self.fallback.setup(&self.bank_guard.config())?;
        if setup.is_some() && self.qseal_key_file.is_none() {
            anyhow::bail!(
                "the fallback interface is enabled (PIS_FALLBACK_ENABLED) but no QSeal key is configured (PIS_QSEAL_KEY_FILE): its sessions are opened with an HTTP signature made with that key"
            );
        }
        Ok(setup)
    }

    pub fn config(&self) -> anyhow::Result<WorkerConfig> {
        if self.retired_ids_retention_secs < self.retention_secs {
            anyhow::bail!(
                "--retired-ids-retention-secs ({}) must be at least --retention-secs ({}): a retired id is remembered from its retirement on",
                self.retired_ids_retention_secs,
                self.retention_secs
            );
        }
        let state_key = match (&self.state_key, &self.state_key_file) {
            (Some(s), _) => s.clone(),
            (None, Some(path)) => read_secret_file(path, "state key")?,
            (None, None) => anyhow::bail!(
                "the state key is required (PIS_STATE_KEY or --state-key-file; make one with `pis-worker keygen`)"
            ),
        };
        let max_amount =
            Amount::parse(&self.max_amount).map_err(|e| anyhow::anyhow!("--max-amount: {e}"))?;
        let policy = Policy {
            sca_timeout_ms: (self.sca_timeout_secs * 1000) as i64,
            fast_poll_ms: self.poll_fast_ms as i64,
            fast_polls: self.poll_fast_count,
            slow_poll_ms: self.poll_slow_ms as i64,
            max_initiation_attempts: self.max_initiation_attempts.max(1),
            unknown_outcome: UnknownOutcomePolicy::parse(&self.unknown_outcome)
                .ok_or_else(|| anyhow::anyhow!("--unknown-outcome: hold or reinitiate"))?,
            expiry_horizon_ms: i64::try_from(self.expiry_horizon_secs.saturating_mul(1000))
                .unwrap_or(i64::MAX),
            initiate_with_token: self.initiate_with_token,
            ..Policy::default()
        };
        Ok(WorkerConfig {
            kafka: self
                .broker
                .settings(&self.group_id, self.session_timeout_ms),
            bank: self.bank_config()?,
            state_key,
            state_keys_previous: self.previous_keys.read()?,
            state_accept_v1: self.previous_keys.state_accept_v1,
            state_format: self.state_format,
            policy,
            limits: ValidationLimits {
                max_amount,
                ..ValidationLimits::default()
            },
            max_command_bytes: self.max_command_bytes,
            queue_capacity: 1024,
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            restore_timeout: Duration::from_secs(300),
            checkpoint_interval: Duration::from_secs(1),
            retention: Duration::from_secs(self.retention_secs),
            retired_ids_retention: Duration::from_secs(self.retired_ids_retention_secs),
            snapshot_interval: Duration::from_secs(self.snapshot_interval_secs),
            snapshot_min_records: self.snapshot_min_records,
            create_topics: self.create_topics,
            bank_guard: self.bank_guard.config(),
            fallback: self.fallback_setup()?,
            http_addr: match self.http_addr.as_str() {
                "off" => None,
                addr => Some(
                    addr.parse()
                        .with_context(|| format!("--http-addr {addr:?} is not host:port"))?,
                ),
            },
        })
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    (args.contract)
        .install(
            &args.broker.topic_status,
            &args.broker.topic_consent_status,
            super::stop_signal(),
        )
        .await?;
    let result = crate::engine::run(config, super::stop_signal()).await;
    crate::contract::registry::exit_if_waiting(&result);
    result
}

#[derive(Debug, Clone, clap::Args)]
pub struct TopicsArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[arg(long, default_value_t = 3)]
    pub partitions: i32,
    #[arg(long, default_value_t = 1)]
    pub replication: i32,
}

pub async fn topics(args: TopicsArgs) -> anyhow::Result<()> {
    let settings = args.broker.settings("pis-worker-admin", 30_000);
    crate::kafka::admin::ensure_topics(&settings, args.partitions, args.replication).await?;
    let count = tokio::task::spawn_blocking(move || {
        crate::kafka::admin::check_partition_invariant(&settings)
    })
    .await??;
    println!("topics ready: {count} partitions");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        keys: PreviousKeysArgs,
    }

    #[test]
    fn previous_state_keys_come_from_the_flag_and_the_file_and_build_a_ring() {
        use clap::Parser as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("previous");
        std::fs::write(
            &file,
            format!("# rotated 2026-12\nold-2:{}\n", "22".repeat(32)),
        )
        .expect("write");
        let cli = Cli::try_parse_from([
            "x",
            "--state-key-previous",
            &format!("old-1:{}", "11".repeat(32)),
            "--state-keys-previous-file",
            file.to_str().expect("utf-8 path"),
            "--state-accept-v1",
            "false",
        ])
        .expect("parses");
        assert!(!cli.keys.state_accept_v1);
        let previous = cli.keys.read().expect("read").expect("some");
        let ring = crate::secret::StateKeyRing::from_config(
            &SecretString::from(format!("new:{}", "33".repeat(32))),
            Some(&previous),
        )
        .expect("ring");
        assert!(ring.get("old-1").is_some() && ring.get("old-2").is_some());
        assert_eq!(ring.current().id().as_str(), "new");
        assert!(!format!("{:?}", cli.keys).contains(&"11".repeat(32)));
        assert!(previous.expose_secret().contains("old-2"));
        let none = Cli::try_parse_from(["x"]).expect("parses");
        assert!(none.keys.state_accept_v1);
        assert!(none.keys.read().expect("read").is_none());
    }
}
