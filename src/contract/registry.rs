//! Confluent Schema Registry support, used when a registry is configured
//! (`PIS_SCHEMA_REGISTRY_URL`), and the start-up configuration of the wire contract.
//!
//! Reading: a record framed `00` + 4-byte big-endian schema id is read with the writer schema the
//! registry holds under that id (`GET {url}/schemas/ids/{id}`), fetched once and cached (ids are
//! immutable). An id the registry does not know (404, `error_code` 40403) is permanent: the
//! record is dead-lettered as `UNKNOWN_SCHEMA`. A registry that does not answer (connection
//! refused, timeout, 5xx, 429, or any other answer) is transient: the worker waits and asks again
//! with exponential back-off and jitter, without dead-lettering or skipping the record.
//!
//! Writing: with a registry, status events are framed with the id of the status schema under the
//! subject `{status topic}-value` (TopicNameStrategy), and consent status events with the id of
//! the consent status schema under `{consent status topic}-value`: each registered at start-up
//! (`POST {url}/subjects/{subject}/versions`) or, with auto-registration off, looked up
//! (`POST {url}/subjects/{subject}`).
//!
//! HTTP runs on a dedicated thread with its own runtime, so that the synchronous decode path can
//! wait for an answer from any context (a partition owner, a CLI thread, a test).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

use rand::Rng as _;
use tracing::{info, warn};
use url::Url;

use super::{
    COMMAND_RECORD, CONSENT_STATUS_RECORD, CONSENT_STATUS_SCHEMA_JSON, DecodeError,
    DecodeErrorClass, STATUS_RECORD, STATUS_SCHEMA_JSON, WriterSchema, compat, readable_writer,
};

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// Wire-contract options of `pis-worker run`.
#[derive(Debug, Clone, clap::Args)]
pub struct ContractArgs {
    /// Confluent Schema Registry base URL. When set, records framed `00` + schema id are read
    /// with the registry's schema, and status events are written with registry framing.
    #[arg(long, env = "PIS_SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: Option<Url>,
    /// Register the status schemas under `{status topic}-value` and `{consent status
    /// topic}-value` at start-up (off: they must be registered already, and are only looked up).
    #[arg(
        long,
        env = "PIS_SCHEMA_REGISTRY_AUTO_REGISTER",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub schema_registry_auto_register: bool,
    /// Timeout of one registry request.
    #[arg(long, env = "PIS_SCHEMA_REGISTRY_TIMEOUT_MS", default_value_t = 5_000)]
    pub schema_registry_timeout_ms: u64,
    /// A directory of extra accepted writer schemas (`*.avsc`), e.g. a newer PaymentCommand
    /// that clients started writing before this worker was upgraded (single-object framing).
    #[arg(long, env = "PIS_WRITER_SCHEMAS_DIR")]
    pub writer_schemas_dir: Option<PathBuf>,
}

impl ContractArgs {
    /// Loads the extra writer schemas and, with a registry, obtains the ids of the status and
    /// consent status schemas (waiting for a registry that is down, until `stop` resolves).
    pub async fn install(
        &self,
        status_topic: &str,
        consent_status_topic: &str,
        stop: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        if let Some(dir) = &self.writer_schemas_dir {
            let accepted = super::load_writer_schemas(dir)
                .map_err(|e| anyhow::anyhow!("writer schemas: {e}"))?;
            for (origin, role, fingerprint) in &accepted {
                info!(%origin, ?role, fingerprint = %hex::encode(fingerprint), "accepted writer schema");
            }
        }
        let Some(url) = &self.schema_registry_url else {
            return Ok(());
        };
        let registry = configure(RegistryConfig {
            url: url.clone(),
            auto_register: self.schema_registry_auto_register,
            timeout: Duration::from_millis(self.schema_registry_timeout_ms),
        })
        .map_err(|e| anyhow::anyhow!("schema registry: {e}"))?;
        tokio::pin!(stop);
        for published in [Published::Status, Published::ConsentStatus] {
            let subject = match published {
                Published::Status => format!("{status_topic}-value"),
                Published::ConsentStatus => format!("{consent_status_topic}-value"),
            };
            let mut backoff = Backoff::default();
            loop {
                match registry.published_schema_id(published, &subject).await {
                    Ok(id) => {
                        info!(url = %redacted(url), %subject, id, schema = published.name(), "events use schema registry framing");
                        break;
                    }
                    Err(Fault::Permanent(e)) => {
                        anyhow::bail!(
                            "schema registry: {} schema under {subject}: {e}",
                            published.name()
                        )
                    }
                    Err(Fault::Transient(e)) => {
                        let wait = backoff.next_delay();
                        warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "schema registry not reachable yet");
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = &mut stop => anyhow::bail!("stopped while waiting for the schema registry"),
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// A schema this process writes records with, registered under its topic's subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// `PaymentStatusEvent`, on the status topic.
    Status,
    /// `ConsentStatus`, on the consent status topic.
    ConsentStatus,
}

impl Published {
    fn json(self) -> &'static str {
        match self {
            Published::Status => STATUS_SCHEMA_JSON,
            Published::ConsentStatus => CONSENT_STATUS_SCHEMA_JSON,
        }
    }

    /// For logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            Published::Status => "status",
            Published::ConsentStatus => "consent status",
        }
    }
}

/// The URL without credentials, for logs.
fn redacted(url: &Url) -> String {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.to_string()
}

#[derive(Debug, Clone)]
pub struct RegistryConfig {
    pub url: Url,
    pub auto_register: bool,
    pub timeout: Duration,
}

/// Exponential back-off with jitter: 250 ms doubling to 10 s, each wait drawn from [d/2, d].
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: Duration::from_millis(250),
        }
    }
}

impl Backoff {
    pub const MAX: Duration = Duration::from_secs(10);

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let millis = ceiling.as_millis() as u64;
        Duration::from_millis(rand::thread_rng().gen_range(millis / 2..=millis))
    }
}

/// A registry failure: transient (retry) or permanent (a fact about the request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    Transient(String),
    Permanent(String),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Transient(m) | Fault::Permanent(m) => f.write_str(m),
        }
    }
}

type Reply = Box<dyn FnOnce(Result<(u16, String), String>) + Send>;

/// One HTTP request for the registry thread.
struct Job {
    post: Option<String>,
    path: String,
    reply: Reply,
}

/// A configured registry: its HTTP thread and what it answered so far.
pub struct Registry {
    base: Url,
    auto_register: bool,
    timeout: Duration,
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    by_id: RwLock<HashMap<u32, Arc<WriterSchema>>>,
    status_id: RwLock<Option<u32>>,
    consent_status_id: RwLock<Option<u32>>,
}

static CURRENT: LazyLock<RwLock<Option<Arc<Registry>>>> = LazyLock::new(|| RwLock::new(None));

/// Decodes waiting for the registry right now (a gauge for logs and shutdown).
static WAITING: AtomicUsize = AtomicUsize::new(0);

/// The registry of this process, if one is configured.
pub fn current() -> Option<Arc<Registry>> {
    CURRENT.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The schema id status events are written with, when registry framing is on.
pub fn status_schema_id() -> Option<u32> {
    current().and_then(|r| {
        *r.id_slot(Published::Status)
            .read()
            .unwrap_or_else(|p| p.into_inner())
    })
}

/// The schema id consent status events are written with, when registry framing is on.
pub fn consent_status_schema_id() -> Option<u32> {
    current().and_then(|r| {
        *r.id_slot(Published::ConsentStatus)
            .read()
            .unwrap_or_else(|p| p.into_inner())
    })
}

/// Decodes currently waiting for an unreachable registry.
pub fn waiting() -> usize {
    WAITING.load(Ordering::Acquire)
}

/// Makes `config` this process's registry (replacing any earlier one) and starts its HTTP thread.
pub fn configure(config: RegistryConfig) -> Result<Arc<Registry>, String> {
    let registry = Registry::start(config)?;
    *CURRENT.write().unwrap_or_else(|p| p.into_inner()) = Some(registry.clone());
    Ok(registry)
}

impl Registry {
    /// A registry client with its own HTTP thread, not installed for the process (see
    /// [`configure`]).
    pub fn start(config: RegistryConfig) -> Result<Arc<Registry>, String> {
        start(config)
    }
}

fn start(config: RegistryConfig) -> Result<Arc<Registry>, String> {
    let mut base = config.url.clone();
    if !base.path().ends_with('/') {
        base.set_path(&format!("{}/", base.path()));
    }
    let (jobs, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
    let client = reqwest::Client::builder()
        .timeout(config.timeout)
        .connect_timeout(config.timeout)
        .build()
        .map_err(|e| format!("http client: {e}"))?;
    let url_base = base.clone();
    std::thread::Builder::new()
        .name("pis-registry".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::error!(error = %e, "schema registry thread cannot start");
                    return;
                }
            };
            runtime.block_on(async move {
                while let Some(job) = rx.recv().await {
                    let client = client.clone();
                    let url_base = url_base.clone();
                    tokio::spawn(async move {
                        let result = request(&client, &url_base, &job.path, job.post).await;
                        (job.reply)(result);
                    });
                }
            });
        })
        .map_err(|e| format!("registry thread: {e}"))?;
    let registry = Arc::new(Registry {
        base,
        auto_register: config.auto_register,
        timeout: config.timeout,
        jobs,
        by_id: RwLock::new(HashMap::new()),
        status_id: RwLock::new(None),
        consent_status_id: RwLock::new(None),
    });
    Ok(registry)
}

/// Removes the process's registry (tests).
pub fn unconfigure() {
    *CURRENT.write().unwrap_or_else(|p| p.into_inner()) = None;
}

async fn request(
    client: &reqwest::Client,
    base: &Url,
    path: &str,
    post: Option<String>,
) -> Result<(u16, String), String> {
    let url = base.join(path).map_err(|e| format!("url {path}: {e}"))?;
    let builder = match post {
        Some(body) => client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .body(body),
        None => client.get(url),
    };
    let response = builder
        .header(reqwest::header::ACCEPT, CONTENT_TYPE)
        .send()
        .await
        .map_err(|e| format!("registry request failed: {e}"))?;
    let status = response.status().as_u16();
    let body = response
        .text()
        .await
        .map_err(|e| format!("registry answer unreadable: {e}"))?;
    Ok((status, body))
}

/// Runs `f`, which blocks, without starving the tokio runtime it may be called from.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _other => f(),
    }
}

/// The `error_code` of a registry error body, if it has one.
fn error_code(body: &str) -> Option<i64> {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()?
        .get("error_code")?
        .as_i64()
}

/// How a registry answer is classified: only an explicit "not found" (40403) or an invalid
/// schema is permanent; anything else (5xx, 429, 401, a 404 page from a wrong URL) may be fixed
/// without touching the record, so it is waited out.
fn classify_schema_answer(id: u32, status: u16, body: &str) -> Result<String, Fault> {
    match status {
        200 => {
            let json: serde_json::Value = serde_json::from_str(body)
                .map_err(|e| Fault::Transient(format!("registry answer is not JSON: {e}")))?;
            if let Some(kind) = json.get("schemaType").and_then(serde_json::Value::as_str) {
                if kind != "AVRO" {
                    return Err(Fault::Permanent(format!(
                        "schema id {id} is a {kind} schema, not Avro"
                    )));
                }
            }
            json.get("schema")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| Fault::Transient("registry answer has no \"schema\" string".into()))
        }
        404 if error_code(body) == Some(40403) => Err(Fault::Permanent(format!(
            "schema id {id} is not in the registry"
        ))),
        other => Err(Fault::Transient(format!(
            "registry answered {other} for schema id {id}"
        ))),
    }
}

impl Registry {
    /// Hands one request to the registry thread; `reply` receives its answer.
    fn submit(
        &self,
        path: String,
        post: Option<String>,
        reply: impl FnOnce(Result<(u16, String), String>) + Send + 'static,
    ) -> Result<(), String> {
        self.jobs
            .send(Job {
                post,
                path,
                reply: Box::new(reply),
            })
            .map_err(|_| "registry thread stopped".to_owned())
    }

    /// Sends one request and waits (blocking) for its answer.
    fn call_blocking(&self, path: String, post: Option<String>) -> Result<(u16, String), String> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.submit(path, post, move |result| {
            let _ = tx.send(result);
        })?;
        blocking(|| {
            rx.recv_timeout(self.timeout + Duration::from_secs(1))
                .map_err(|_| "registry request timed out".to_owned())?
        })
    }

    async fn call(&self, path: String, post: Option<String>) -> Result<(u16, String), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(path, post, move |result| {
            let _ = tx.send(result);
        })?;
        rx.await
            .map_err(|_| "registry thread dropped a request".to_owned())?
    }

    fn cached(&self, id: u32) -> Option<Arc<WriterSchema>> {
        self.by_id
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    fn remember(&self, id: u32, writer: WriterSchema) -> Arc<WriterSchema> {
        let writer = Arc::new(writer);
        self.by_id
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, writer.clone());
        writer
    }

    /// The writer schema of `id`: from the cache, or one request to the registry.
    /// `RegistryUnavailable` means "ask again later"; every other class is final for this id.
    pub fn writer_by_id(&self, id: u32) -> Result<Arc<WriterSchema>, DecodeError> {
        if let Some(known) = self.cached(id) {
            return Ok(known);
        }
        let answer = self.call_blocking(format!("schemas/ids/{id}"), None);
        self.accept_schema_answer(id, answer)
    }

    /// [`Self::writer_by_id`] without blocking the calling task: the partition owner's
    /// decoder awaits it, so bank answers and timers go on meanwhile.
    pub async fn writer_by_id_async(&self, id: u32) -> Result<Arc<WriterSchema>, DecodeError> {
        if let Some(known) = self.cached(id) {
            return Ok(known);
        }
        let answer = self.call(format!("schemas/ids/{id}"), None).await;
        self.accept_schema_answer(id, answer)
    }

    /// Reads the registry's answer for schema `id` and remembers an accepted writer schema.
    fn accept_schema_answer(
        &self,
        id: u32,
        answer: Result<(u16, String), String>,
    ) -> Result<Arc<WriterSchema>, DecodeError> {
        let unavailable =
            |m: String| DecodeError::new(DecodeErrorClass::RegistryUnavailable, m.clone());
        let (status, body) = answer.map_err(unavailable)?;
        let json = match classify_schema_answer(id, status, &body) {
            Ok(json) => json,
            Err(Fault::Transient(m)) => return Err(unavailable(m)),
            Err(Fault::Permanent(m)) => {
                return Err(DecodeError::new(DecodeErrorClass::UnknownSchema, m));
            }
        };
        let origin = format!("registry schema id {id}");
        let root = compat::Parsed::parse(&json)
            .map_err(|e| {
                DecodeError::new(DecodeErrorClass::UnknownSchema, format!("{origin}: {e}"))
            })?
            .root_name()
            .map(str::to_owned);
        if !matches!(
            root.as_deref(),
            Some(COMMAND_RECORD | STATUS_RECORD | CONSENT_STATUS_RECORD)
        ) {
            return Err(DecodeError::new(
                DecodeErrorClass::WrongRecordType,
                format!(
                    "{origin} is a {}, not a payment command",
                    root.as_deref().unwrap_or("schema without a name")
                ),
            ));
        }
        let writer = readable_writer(&json, &origin)
            .map_err(|e| DecodeError::new(DecodeErrorClass::UnknownSchema, e))?;
        info!(id, role = ?writer.role, "schema fetched from the registry");
        Ok(self.remember(id, writer))
    }

    /// [`Self::writer_by_id`], waiting out an unreachable registry (back-off with jitter) for as
    /// long as it takes: such a record must be neither dead-lettered nor skipped.
    pub fn writer_by_id_waiting(&self, id: u32) -> Result<Arc<WriterSchema>, DecodeError> {
        /// Counts this decode in `WAITING` from its first failure until it returns.
        struct Waiting;
        impl Drop for Waiting {
            fn drop(&mut self) {
                WAITING.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let mut backoff = Backoff::default();
        let mut attempts = 0u64;
        let mut waiting: Option<Waiting> = None;
        loop {
            match self.writer_by_id(id) {
                Err(e) if e.class.is_transient() => {
                    attempts += 1;
                    if waiting.is_none() {
                        WAITING.fetch_add(1, Ordering::AcqRel);
                        waiting = Some(Waiting);
                    }
                    let wait = backoff.next_delay();
                    warn!(
                        schema_id = id,
                        attempts,
                        retry_in_ms = wait.as_millis() as u64,
                        error = %e.message,
                        "schema registry unavailable: waiting (the record is kept)"
                    );
                    blocking(|| std::thread::sleep(wait));
                }
                other => {
                    drop(waiting);
                    if attempts > 0 {
                        info!(schema_id = id, attempts, "schema registry answered again");
                    }
                    return other;
                }
            }
        }
    }

    /// Registers (or looks up) the status schema under `subject` and remembers its id.
    pub async fn status_schema_id(&self, subject: &str) -> Result<u32, Fault> {
        self.published_schema_id(Published::Status, subject).await
    }

    fn id_slot(&self, published: Published) -> &RwLock<Option<u32>> {
        match published {
            Published::Status => &self.status_id,
            Published::ConsentStatus => &self.consent_status_id,
        }
    }

    /// Registers (or looks up) the schema `published` writes with under `subject` and
    /// remembers its id.
    pub async fn published_schema_id(
        &self,
        published: Published,
        subject: &str,
    ) -> Result<u32, Fault> {
        let slot = self.id_slot(published);
        if let Some(id) = *slot.read().unwrap_or_else(|p| p.into_inner()) {
            return Ok(id);
        }
        let json = published.json();
        let body = serde_json::json!({ "schema": json }).to_string();
        let path = if self.auto_register {
            format!("subjects/{}/versions", encode_segment(subject))
        } else {
            format!("subjects/{}", encode_segment(subject))
        };
        let (status, answer) = self
            .call(path, Some(body))
            .await
            .map_err(Fault::Transient)?;
        let id = match status {
            200 => serde_json::from_str::<serde_json::Value>(&answer)
                .ok()
                .and_then(|v| v.get("id").and_then(serde_json::Value::as_u64))
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    Fault::Transient(format!("registry answer without an id: {answer}"))
                })?,
            // 404 (subject or schema not registered), 409 (incompatible), 422 (invalid): the
            // registry's own decision, not an outage.
            404 | 409 | 422 => {
                return Err(Fault::Permanent(format!(
                    "registry answered {status}: {answer}"
                )));
            }
            other => {
                return Err(Fault::Transient(format!(
                    "registry answered {other}: {answer}"
                )));
            }
        };
        let writer = readable_writer(json, &format!("built-in {} schema", published.name()))
            .map_err(Fault::Permanent)?;
        self.remember(id, writer);
        *slot.write().unwrap_or_else(|p| p.into_inner()) = Some(id);
        Ok(id)
    }

    /// The base URL (with a trailing slash).
    pub fn base_url(&self) -> &Url {
        &self.base
    }
}

/// Percent-encodes a subject for a path segment.
fn encode_segment(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// Ends the process at once when a partition owner is still waiting for the registry after the
/// worker stopped: the graceful path already drained, committed (not that record) and flushed,
/// and the waiting thread would otherwise keep the runtime from shutting down.
pub fn exit_if_waiting(result: &anyhow::Result<()>) {
    let waiting = waiting();
    if waiting > 0 {
        warn!(
            waiting,
            "records still wait for the schema registry; they are not committed and will be read again"
        );
        std::process::exit(if result.is_ok() { 0 } else { 1 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry that accepts connections and never answers.
    fn silent_registry() -> (Arc<Registry>, std::net::TcpListener) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url =
            Url::parse(&format!("http://{}/", listener.local_addr().expect("addr"))).expect("url");
        let registry = Registry::start(RegistryConfig {
            url,
            auto_register: false,
            timeout: Duration::from_millis(600),
        })
        .expect("registry");
        (registry, listener)
    }

    /// Ticks of a 10 ms ticker on `runtime` (one thread) while `lookup` runs there.
    fn ticks_during(
        runtime: &tokio::runtime::Runtime,
        lookup: impl std::future::Future<Output = ()>,
    ) -> u32 {
        use std::sync::atomic::AtomicU32;
        let counter = Arc::new(AtomicU32::new(0));
        let c = counter.clone();
        runtime.block_on(async move {
            let ticker = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    c.fetch_add(1, Ordering::Relaxed);
                }
            });
            tokio::task::yield_now().await;
            lookup.await;
            ticker.abort();
        });
        counter.load(Ordering::Relaxed)
    }

    /// Defect m: the owner asked the registry with a blocking call (up to the registry timeout,
    /// ~6 s per retry with back-off), holding its task: bank answers and timers waited. The
    /// asynchronous look-up lets the rest of the runtime run meanwhile, even on one thread.
    #[test]
    fn an_unanswered_registry_look_up_does_not_block_its_runtime() {
        let (registry, _listener) = silent_registry();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let during_async = ticks_during(&runtime, async {
            let result = registry.writer_by_id_async(4242).await;
            assert!(
                matches!(&result, Err(e) if e.class == DecodeErrorClass::RegistryUnavailable),
                "{:?}",
                result.map(|_| ())
            );
        });
        assert!(
            during_async >= 10,
            "the runtime was held: {during_async} ticks"
        );
        // The blocking look-up, as the owner used to make it, holds its thread: no tick.
        let during_blocking = ticks_during(&runtime, async {
            let result = registry.writer_by_id(4243);
            assert!(result.is_err());
        });
        assert!(
            during_blocking <= 1,
            "{during_blocking} ticks while blocked"
        );
    }

    #[test]
    fn backoff_doubles_to_its_ceiling_with_jitter() {
        let mut backoff = Backoff::default();
        let first = backoff.next_delay();
        assert!(first >= Duration::from_millis(125) && first <= Duration::from_millis(250));
        for _ in 0..20 {
            assert!(backoff.next_delay() <= Backoff::MAX);
        }
        let late = backoff.next_delay();
        assert!(late >= Backoff::MAX / 2 && late <= Backoff::MAX, "{late:?}");
    }

    #[test]
    fn only_a_registry_not_found_is_permanent() {
        let not_found = r#"{"error_code":40403,"message":"Schema not found"}"#;
        assert!(matches!(
            classify_schema_answer(7, 404, not_found),
            Err(Fault::Permanent(_))
        ));
        // A 404 page from a wrong base URL is a configuration fault: wait, do not dead-letter.
        assert!(matches!(
            classify_schema_answer(7, 404, "<html>not found</html>"),
            Err(Fault::Transient(_))
        ));
        for status in [500, 502, 503, 429, 401, 403] {
            assert!(
                matches!(
                    classify_schema_answer(7, status, "{}"),
                    Err(Fault::Transient(_))
                ),
                "{status}"
            );
        }
        assert_eq!(
            classify_schema_answer(7, 200, r#"{"schema":"\"string\""}"#),
            Ok("\"string\"".to_owned())
        );
        assert!(matches!(
            classify_schema_answer(
                7,
                200,
                r#"{"schema":"syntax = \"proto3\";","schemaType":"PROTOBUF"}"#
            ),
            Err(Fault::Permanent(_))
        ));
    }

    #[test]
    fn subjects_are_path_encoded() {
        assert_eq!(
            encode_segment("pis.payment-status-value"),
            "pis.payment-status-value"
        );
        assert_eq!(encode_segment("a b/c"), "a%20b%2Fc");
    }
}
