//! The Belfius sandbox simulator: a faithful stand-in for the Belfius / Banx PSD2 PIS API, used
//! by tests and the demo. The real Belfius sandbox returns static answers without validation
//! (belfius-api.md §7), so this one models the production behaviour instead.
//!
//! Two listeners: the bank API over HTTPS with a REQUIRED client certificate (mTLS, like the
//! live API), and an operator/PSU API over plain HTTP meant for loopback. See docs/belfius.md.

pub mod faults;
pub mod admin;
pub mod api;
pub mod cli;
pub mod store;
pub mod tls;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use secrecy::{ExposeSecret as _, SecretString};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use crate::belfius::{ApiVersions, BelfiusConfig, QwacIdentity};
use store::{Digest, Store, Timing};

/// A client that connects but never finishes the handshake must not hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Bank API (HTTPS, mutual TLS). Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Operator / PSU API (plain HTTP; keep it on loopback). Port 0 picks a free port.
    pub admin_listen: SocketAddr,
    /// Where the test PKI lives (`ca.pem`, `server.pem`, `client.pem`, `client-key.pem`, ...).
    pub tls_dir: PathBuf,
    /// The only Client-ID the simulated bank knows.
    pub client_id: String,
    /// Its client secret (HTTP Basic at /token).
    pub client_secret: SecretString,
    /// When set, every payment is signed by the PSU this long after initiation.
    pub auto_sign_after: Option<Duration>,
    /// ACTC -> ACSC delay.
    pub settle_after: Duration,
    /// An unsigned (RCVD) payment becomes RJCT ("SCA not completed") after this.
    pub sca_expiry: Duration,
}

impl SandboxConfig {
    /// Loopback on free ports, demo credentials, default timings: what tests want.
    pub fn local(tls_dir: impl Into<PathBuf>) -> Self {
        let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        Self {
            listen: loopback,
            admin_listen: loopback,
            tls_dir: tls_dir.into(),
            client_id: cli::DEFAULT_CLIENT_ID.into(),
            client_secret: cli::DEFAULT_CLIENT_SECRET.into(),
            auto_sign_after: None,
            settle_after: Duration::from_secs(2),
            sca_expiry: Duration::from_secs(15 * 60),
        }
    }
}

/// State shared by both routers.
pub struct Shared {
    client_id: String,
    client_secret_digest: Digest,
    admin_base: url::Url,
    store: Mutex<Store>,
}

impl Shared {
    /// No handler awaits while holding the lock, so a poisoned lock only means a handler
    /// panicked between two consistent updates: keep serving.
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A started simulator. Dropping it stops both listeners and all connections.
pub struct RunningSandbox {
    pub api_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub tls_dir: PathBuf,
    client_id: String,
    client_secret: SecretString,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for RunningSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningSandbox")
            .field("api_addr", &self.api_addr)
            .field("admin_addr", &self.admin_addr)
            .field("tls_dir", &self.tls_dir)
            .finish_non_exhaustive()
    }
}

impl RunningSandbox {
    /// `https://127.0.0.1:PORT/`: the base URL for both brands.
    pub fn api_base_url(&self) -> url::Url {
        base_url("https", self.api_addr)
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

    /// A client configuration that reaches this simulator for both brands, trusting its CA and
    /// presenting its client certificate.
    pub fn belfius_config(&self) -> anyhow::Result<BelfiusConfig> {
        let read = |path: &Path| {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        };
        let key = String::from_utf8(read(&self.client_key_path())?)
            .context("client key is not UTF-8 PEM")?;
        Ok(BelfiusConfig {
            belfius_base_url: self.api_base_url(),
            banx_base_url: self.api_base_url(),
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
            qseal: None,
        })
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

/// Generates or reuses the test PKI, binds both listeners and serves them in spawned tasks.
pub async fn start(config: SandboxConfig) -> anyhow::Result<RunningSandbox> {
    let dir = config.tls_dir.clone();
    let material = tokio::task::spawn_blocking(move || tls::load_or_create(&dir))
        .await
        .context("TLS material task failed")??;
    let acceptor = TlsAcceptor::from(tls::server_config(&material)?);

    let api_listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding bank API on {}", config.listen))?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding operator API on {}", config.admin_listen))?;
    let api_addr = api_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    if !admin_addr.ip().is_loopback() {
        tracing::warn!(%admin_addr, "sandbox operator API is plain HTTP and not on loopback");
    }

    let shared = Arc::new(Shared {
        client_id: config.client_id.clone(),
        client_secret_digest: store::digest(config.client_secret.expose_secret()),
        admin_base: base_url("http", admin_addr),
        store: Mutex::new(Store::new(Timing {
            auto_sign_after: config.auto_sign_after,
            settle_after: config.settle_after,
            sca_expiry: config.sca_expiry,
        })),
    });

    let (shutdown, signal) = watch::channel(false);
    let tasks = vec![
        tokio::spawn(serve(
            api_listener,
            Some(acceptor),
            api::router(shared.clone()),
            signal.clone(),
        )),
        tokio::spawn(serve(admin_listener, None, admin::router(shared), signal)),
    ];
    tracing::info!(%api_addr, %admin_addr, tls_dir = %config.tls_dir.display(), "sandbox started");
    Ok(RunningSandbox {
        api_addr,
        admin_addr,
        tls_dir: config.tls_dir,
        client_id: config.client_id,
        client_secret: config.client_secret,
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
            Ok(Ok(stream)) => http1(TokioIo::new(stream), app).await,
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
