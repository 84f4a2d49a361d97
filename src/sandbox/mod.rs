//! The Belfius sandbox simulator: a faithful stand-in for the Belfius / Banx PSD2 PIS API, used
//! by tests and the demo. The real Belfius sandbox returns static answers without validation
//! (docs/belfius-facts.md §7), so this one models the production behaviour instead.
//!
//! Three listeners: the bank API of each brand (Belfius, Banx) over HTTPS with a REQUIRED
//! client certificate (mTLS, like the live API), and an operator/PSU API over plain HTTP meant
//! for loopback. See docs/belfius.md.

pub mod accounts;
pub mod admin;
pub mod api;
pub mod cli;
pub mod fallback;
pub mod faults;
pub mod ledger;
pub mod onboarding;
pub mod store;
pub mod tls;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use axum::{Extension, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use secrecy::{ExposeSecret as _, SecretString};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use crate::belfius::qseal::{self, QsealVerifier};
use crate::belfius::{
    ApiVersions, BelfiusConfig, QsealConfig, QwacIdentity, SignatureEncoding, SignatureFormat,
    SignedOperations,
};
use crate::domain::model::Brand;
use accounts::BankCodes;
pub use accounts::{DEFAULT_BANX_BANK_CODES, DEFAULT_BELFIUS_BANK_CODES};
use faults::Faults;
pub use onboarding::DEFAULT_REDIRECT_URIS;
use onboarding::{Onboarding, PeerCertificate};
use store::{Digest, Settings, Store};

/// A client that connects but never finishes the handshake must not hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Belfius-brand bank API (HTTPS, mutual TLS). Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Banx-brand bank API (HTTPS, mutual TLS), the second production host
    /// [P docs/belfius-facts.md §1.1].
    pub banx_listen: SocketAddr,
    /// Operator / PSU API (plain HTTP; keep it on loopback). Port 0 picks a free port.
    pub admin_listen: SocketAddr,
    /// Where the test PKI lives (`ca.pem`, `server.pem`, `client.pem`, `client-key.pem`, ...).
    pub tls_dir: PathBuf,
    /// The only Client-ID the simulated bank knows.
    pub client_id: String,
    /// SHA-256 fingerprints (hex, colons allowed) of the client certificates (QWAC leaves)
    /// registered for `client_id`; empty: the `client.pem` of `tls_dir`. A request naming
    /// `client_id` over a connection with another certificate is refused.
    pub client_certificates: Vec<String>,
    /// Redirect URIs registered for `client_id`: exact URLs, or prefixes ending in `*`
    /// (the prefix must reach the path). http only for loopback hosts, on any port.
    pub redirect_uris: Vec<String>,
    /// Its client secret (HTTP Basic at /token).
    pub client_secret: SecretString,
    /// When set, every payment is signed by the PSU this long after initiation.
    pub auto_sign_after: Option<Duration>,
    /// ACTC -> ACSC delay.
    pub settle_after: Duration,
    /// An unsigned (RCVD) payment becomes RJCT ("SCA not completed") after this.
    pub sca_expiry: Duration,
    /// PIS access-token lifetime (`expires_in`); [C] 900 s seen for AIS.
    pub access_token_lifetime: Duration,
    /// [I] PIS refresh-token lifetime (not documented).
    pub refresh_token_lifetime: Duration,
    /// Check the QSeal `Signature` header of initiations against the test QSeal certificate.
    pub verify_signatures: bool,
    /// The one Base64 encoding accepted in `Signature` headers.
    pub signature_encoding: SignatureEncoding,
    /// PSUs may see and sign orphans (payments whose initiation answer was lost); off, nobody
    /// can. Changeable at run time (`/admin/config`).
    pub orphans_signable: bool,
    /// [I] Belgian bank codes (IBAN characters 5-7, `050-099` ranges or single codes) of Banx
    /// accounts; looked at before `belfius_bank_codes`.
    pub banx_bank_codes: Vec<String>,
    /// [T] Belgian bank codes of Belfius accounts; a Belgian account with any other code is
    /// another bank's.
    pub belfius_bank_codes: Vec<String>,
    /// [I] beneficiary countries refused with B14821ZZ-1227-000000.
    pub denied_countries: Vec<String>,
    /// [I] countries whose cross-border transfers need a BIC (or bank national id), else
    /// B14821ZZ-2102-000000.
    pub bic_required_countries: Vec<String>,
    /// Forget final payments this long after they ended, so that a long run keeps a bounded
    /// memory (`pis-soak`); `None`, the default, keeps every payment.
    pub forget_final_after: Option<Duration>,
    /// Which plausible Belfius to be (`dialect`); the first of `dialect::DIALECTS` by default.
    pub dialect: crate::belfius::dialect::Dialect,
    /// The fallback interface's paths, session lifetime and `Date` tolerance.
    pub fallback: fallback::FallbackSettings,
}

/// The [I] account rules of the simulated bank, fixed at start.
#[derive(Debug, Clone)]
pub struct Rules {
    /// The JSON type `instructed_amount.amount` must have (the dialect's).
    pub amount: crate::belfius::AmountFormat,
    pub banx_bank_codes: BankCodes,
    pub belfius_bank_codes: BankCodes,
    pub denied_countries: Vec<String>,
    pub bic_required_countries: Vec<String>,
}

pub const DEFAULT_DENIED_COUNTRIES: &[&str] = &["KP", "IR"];
pub const DEFAULT_BIC_REQUIRED_COUNTRIES: &[&str] = &["US"];

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

impl SandboxConfig {
    /// Answer as `dialect`, its Signature alphabet included.
    pub fn set_dialect(&mut self, dialect: crate::belfius::dialect::Dialect) {
        self.dialect = dialect;
        self.signature_encoding = dialect.signature;
    }

    /// Loopback on free ports, demo credentials, default timings: what tests want.
    pub fn local(tls_dir: impl Into<PathBuf>) -> Self {
        let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        Self {
            listen: loopback,
            banx_listen: loopback,
            admin_listen: loopback,
            tls_dir: tls_dir.into(),
            client_id: cli::DEFAULT_CLIENT_ID.into(),
            client_secret: cli::DEFAULT_CLIENT_SECRET.into(),
            client_certificates: Vec::new(),
            redirect_uris: strings(DEFAULT_REDIRECT_URIS),
            auto_sign_after: None,
            settle_after: Duration::from_secs(2),
            sca_expiry: Duration::from_secs(15 * 60),
            access_token_lifetime: store::DEFAULT_ACCESS_TOKEN_LIFETIME,
            refresh_token_lifetime: store::DEFAULT_REFRESH_TOKEN_LIFETIME,
            verify_signatures: true,
            signature_encoding: crate::belfius::dialect::Dialect::default_dialect().signature,
            orphans_signable: false,
            banx_bank_codes: strings(DEFAULT_BANX_BANK_CODES),
            belfius_bank_codes: strings(DEFAULT_BELFIUS_BANK_CODES),
            denied_countries: strings(DEFAULT_DENIED_COUNTRIES),
            bic_required_countries: strings(DEFAULT_BIC_REQUIRED_COUNTRIES),
            forget_final_after: None,
            dialect: crate::belfius::dialect::Dialect::default_dialect(),
            fallback: fallback::FallbackSettings::default(),
        }
    }
}

/// State shared by all routers.
pub struct Shared {
    client_id: String,
    /// The secret /token accepts; the operator may rotate it (`/admin/config`).
    client_secret_digest: Mutex<Digest>,
    admin_base: url::Url,
    dialect: crate::belfius::dialect::Dialect,
    rules: Rules,
    /// The QWACs and redirect URIs registered for `client_id`, the signature encoding.
    onboarding: Onboarding,
    /// `None` when no test QSeal certificate could be made: signatures cannot be verified.
    verifier: Option<QsealVerifier>,
    store: Mutex<Store>,
    fallback: fallback::FallbackState,
}

impl Shared {
    /// No handler awaits while holding the lock, so a poisoned lock only means a handler
    /// panicked between two consistent updates: keep serving.
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `secret` is the client secret in force. Compared as digests.
    fn client_secret_matches(&self, secret: &str) -> bool {
        let current = *self
            .client_secret_digest
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        store::digest(secret) == current
    }

    /// The SCA page of a payment, as the bank's answers link it.
    fn sca_url(&self, payment_id: &str) -> Option<String> {
        self.admin_base
            .join(&format!("sca/{payment_id}"))
            .ok()
            .map(|u| u.to_string())
    }

    /// From now on only `secret` is accepted at /token.
    fn rotate_client_secret(&self, secret: &SecretString) {
        *self
            .client_secret_digest
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = store::digest(secret.expose_secret());
    }
}

/// A started simulator. Dropping it stops the listeners and all connections.
pub struct RunningSandbox {
    /// Belfius-brand host.
    pub api_addr: SocketAddr,
    /// Banx-brand host.
    pub banx_api_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub tls_dir: PathBuf,
    client_id: String,
    client_secret: SecretString,
    faults: Faults,
    /// (`qseal.pem`, `qseal-key.pem`) when the test QSeal material exists and verifies.
    qseal_files: Option<(PathBuf, PathBuf)>,
    fallback: fallback::FallbackSettings,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for RunningSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningSandbox")
            .field("api_addr", &self.api_addr)
            .field("banx_api_addr", &self.banx_api_addr)
            .field("admin_addr", &self.admin_addr)
            .field("tls_dir", &self.tls_dir)
            .finish_non_exhaustive()
    }
}

impl RunningSandbox {
    /// `https://127.0.0.1:PORT/`: the Belfius-brand host.
    pub fn api_base_url(&self) -> url::Url {
        base_url("https", self.api_addr)
    }

    /// `https://127.0.0.1:PORT/`: the Banx-brand host.
    pub fn banx_base_url(&self) -> url::Url {
        base_url("https", self.banx_api_addr)
    }

    /// The fault switchboard of both bank hosts (also at `/admin/faults`).
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// The test QSeal certificate the simulator verifies with, if any.
    pub fn qseal_cert_path(&self) -> Option<&Path> {
        self.qseal_files.as_ref().map(|(cert, _)| cert.as_path())
    }

    /// The test QSeal private key a client signs with, if any.
    pub fn qseal_key_path(&self) -> Option<&Path> {
        self.qseal_files.as_ref().map(|(_, key)| key.as_path())
    }

    /// `http://127.0.0.1:PORT/`: operator API and SCA pages.
    pub fn admin_base_url(&self) -> url::Url {
        base_url("http", self.admin_addr)
    }

    pub fn ca_pem_path(&self) -> PathBuf {
        self.tls_dir.join(tls::CA_FILE)
    }

    pub fn client_cert_path(&self) -> PathBuf {
        self.tls_dir.join(tls::CLIENT_CERT_FILE)
    }

    pub fn client_key_path(&self) -> PathBuf {
        self.tls_dir.join(tls::CLIENT_KEY_FILE)
    }

    /// Another TPP's certificate from the same test CA: accepted by the handshake, not
    /// registered for this simulator's Client-ID.
    pub fn other_client_cert_path(&self) -> PathBuf {
        self.tls_dir.join(tls::OTHER_CLIENT_CERT_FILE)
    }

    pub fn other_client_key_path(&self) -> PathBuf {
        self.tls_dir.join(tls::OTHER_CLIENT_KEY_FILE)
    }

    /// A client configuration that reaches this simulator's two brand hosts, trusting its CA,
    /// presenting its client certificate and (when the test QSeal exists) signing with it.
    pub fn belfius_config(&self) -> anyhow::Result<BelfiusConfig> {
        let read = |path: &Path| {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        };
        let key = String::from_utf8(read(&self.client_key_path())?)
            .context("client key is not UTF-8 PEM")?;
        let qseal = match &self.qseal_files {
            Some((cert, key)) => Some(QsealConfig {
                private_key_pem: String::from_utf8(read(key)?)
                    .context("QSeal key is not UTF-8 PEM")?
                    .into(),
                certificate_pem: Some(read(cert)?),
                format: SignatureFormat::default(),
                sign: SignedOperations::default(),
            }),
            None => None,
        };
        Ok(BelfiusConfig {
            belfius_base_url: self.api_base_url(),
            banx_base_url: self.banx_base_url(),
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone(),
            extra_ca_pem: Some(read(&self.ca_pem_path())?),
            qwac: Some(QwacIdentity {
                cert_chain_pem: read(&self.client_cert_path())?,
                private_key_pem: key.into(),
            }),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            versions: ApiVersions::default(),
            qseal,
            amount_format: crate::belfius::AmountFormat::default(),
            status_map: crate::belfius::status::StatusMap::default(),
        })
    }

    /// Where a fallback client finds this simulator's fallback interface (its own paths: the
    /// bank's are not public). The simulator does not interpret `keyId` [I].
    pub fn fallback_endpoints(&self) -> crate::belfius::fallback::FallbackEndpoints {
        crate::belfius::fallback::FallbackEndpoints::new(
            self.api_base_url(),
            self.banx_base_url(),
            self.fallback.session_path.clone(),
            self.fallback.payments_path.clone(),
            qseal::TEST_QSEAL_CN,
        )
    }

    /// Stops accepting, closes open connections and waits for the listener tasks.
    pub async fn shutdown(mut self) {
        self.shutdown.send_replace(true);
        for task in std::mem::take(&mut self.tasks) {
            // A listener task only ends by the signal above; its error (a panic) has been
            // logged by the runtime already.
            let _ = task.await;
        }
    }

    /// The secret at start. A rotation at `/admin/config` does not change it: a client built
    /// from [`Self::belfius_config`] then still presents this one, like a worker not yet told.
    pub fn client_secret(&self) -> &SecretString {
        &self.client_secret
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }
}

impl Drop for RunningSandbox {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn base_url(scheme: &str, addr: SocketAddr) -> url::Url {
    // A wildcard bind is reachable on loopback, which is also what the certificate names.
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        other => other,
    };
    let text = format!("{scheme}://{}/", SocketAddr::new(ip, addr.port()));
    url::Url::parse(&text).expect("a socket address always forms a valid URL authority")
}

/// Generates or reuses the test PKI (TLS and QSeal), binds the three listeners and serves them
/// in spawned tasks.
pub async fn start(config: SandboxConfig) -> anyhow::Result<RunningSandbox> {
    let dir = config.tls_dir.clone();
    let (material, qseal_files) = tokio::task::spawn_blocking(move || {
        tls::load_or_create(&dir).map(|material| (material, qseal::ensure_test_qseal(&dir)))
    })
    .await
    .context("TLS material task failed")??;
    let acceptor = TlsAcceptor::from(tls::server_config(&material)?);
    let certificates = if config.client_certificates.is_empty() {
        vec![tls::leaf_fingerprint(&material.client_cert_pem)?]
    } else {
        config
            .client_certificates
            .iter()
            .map(|text| onboarding::parse_fingerprint(text))
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)?
    };
    let onboarding = Onboarding::new(
        certificates,
        &config.redirect_uris,
        config.signature_encoding,
    )
    .map_err(anyhow::Error::msg)?;
    config.fallback.validate().map_err(anyhow::Error::msg)?;
    let rules = Rules {
        amount: config.dialect.amount,
        banx_bank_codes: BankCodes::parse(&config.banx_bank_codes)
            .map_err(|e| anyhow::anyhow!("Banx bank codes: {e}"))?,
        belfius_bank_codes: BankCodes::parse(&config.belfius_bank_codes)
            .map_err(|e| anyhow::anyhow!("Belfius bank codes: {e}"))?,
        denied_countries: config.denied_countries.clone(),
        bic_required_countries: config.bic_required_countries.clone(),
    };

    // The QSeal verifier is optional: without it the simulator still serves, it just cannot
    // be asked to verify signatures.
    let qseal = qseal_files
        .map_err(|e| e.to_string())
        .and_then(|(cert, key)| {
            let pem =
                std::fs::read(&cert).map_err(|e| format!("reading {}: {e}", cert.display()))?;
            let verifier = QsealVerifier::from_certificate_pem(&pem).map_err(|e| e.to_string())?;
            Ok((verifier, (cert, key)))
        });
    let (verifier, qseal_files) = match qseal {
        Ok((verifier, files)) => (Some(verifier), Some(files)),
        Err(why) if config.verify_signatures => {
            anyhow::bail!("--verify-signatures needs a test QSeal certificate: {why}")
        }
        Err(why) => {
            tracing::warn!(why, "sandbox: no test QSeal; signatures cannot be verified");
            (None, None)
        }
    };

    let api_listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding Belfius API on {}", config.listen))?;
    let banx_listener = TcpListener::bind(config.banx_listen)
        .await
        .with_context(|| format!("binding Banx API on {}", config.banx_listen))?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding operator API on {}", config.admin_listen))?;
    let api_addr = api_listener.local_addr()?;
    let banx_api_addr = banx_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    if !admin_addr.ip().is_loopback() {
        tracing::warn!(%admin_addr, "sandbox operator API is plain HTTP and not on loopback");
    }

    let shared = Arc::new(Shared {
        client_id: config.client_id.clone(),
        client_secret_digest: Mutex::new(store::digest(config.client_secret.expose_secret())),
        admin_base: base_url("http", admin_addr),
        dialect: config.dialect,
        rules,
        onboarding,
        verifier,
        store: Mutex::new(
            Store::new(Settings {
                auto_sign_after: config.auto_sign_after,
                settle_after: config.settle_after,
                sca_expiry: config.sca_expiry,
                access_token_lifetime: config.access_token_lifetime,
                refresh_token_lifetime: config.refresh_token_lifetime,
                verify_signatures: config.verify_signatures,
                cancel_status: 204,
                orphans_signable: config.orphans_signable,
            })
            .forgetting_final_after(config.forget_final_after),
        ),
        fallback: fallback::FallbackState::new(config.fallback.clone()),
    });
    let faults = Faults::default();
    {
        let shared = shared.clone();
        faults.on_response_lost(move |id| shared.store().orphan(id));
    }

    let (shutdown, signal) = watch::channel(false);
    let tasks = vec![
        tokio::spawn(serve(
            api_listener,
            Some(acceptor.clone()),
            api::router(shared.clone(), Brand::Belfius, faults.clone()),
            signal.clone(),
        )),
        tokio::spawn(serve(
            banx_listener,
            Some(acceptor),
            api::router(shared.clone(), Brand::Banx, faults.clone()),
            signal.clone(),
        )),
        tokio::spawn(serve(
            admin_listener,
            None,
            admin::router(shared).merge(faults::admin_router(faults.clone())),
            signal,
        )),
    ];
    tracing::info!(%api_addr, %banx_api_addr, %admin_addr, tls_dir = %config.tls_dir.display(), "sandbox started");
    Ok(RunningSandbox {
        api_addr,
        banx_api_addr,
        admin_addr,
        tls_dir: config.tls_dir,
        client_id: config.client_id,
        client_secret: config.client_secret,
        faults,
        qseal_files,
        fallback: config.fallback,
        shutdown,
        tasks,
    })
}

/// Accept loop. Connections live in a JoinSet owned by this task, so ending or aborting the
/// task closes them all.
async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    connections.spawn(connection(tcp, peer, tls.clone(), app.clone()));
                }
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "sandbox accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
}

async fn connection(tcp: TcpStream, peer: SocketAddr, tls: Option<TlsAcceptor>, app: Router) {
    match tls {
        Some(acceptor) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
        {
            Ok(Ok(stream)) => {
                // Requests learn which certificate their connection presented: the API checks
                // it against the Client-ID they name.
                let peer = PeerCertificate::of(stream.get_ref().1.peer_certificates());
                http1(TokioIo::new(stream), app.layer(Extension(peer))).await
            }
            // The expected outcome for a client without a certificate from the test CA.
            Ok(Err(e)) => tracing::info!(%peer, error = %e, "sandbox: TLS handshake refused"),
            Err(_) => tracing::info!(%peer, "sandbox: TLS handshake timed out"),
        },
        None => http1(TokioIo::new(tcp), app).await,
    }
}

async fn http1<I>(io: I, app: Router)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app);
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await
    {
        tracing::debug!(error = %e, "sandbox connection ended with an error");
    }
}
