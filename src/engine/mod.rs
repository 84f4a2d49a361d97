//! The engine: wires the Kafka edge, the bank edge and the pure machine, one owner per
//! assigned partition.

pub mod bank;
pub mod consent_calls;
pub mod core;
pub mod ingest;
pub mod offsets;
pub mod outbox;
pub mod partition;
pub mod restore;
pub mod route;
pub mod stats;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use secrecy::SecretString;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::belfius::{BelfiusClient, BelfiusConfig};
use crate::domain::machine::{Millis, Policy};
use crate::domain::validation::ValidationLimits;
use crate::kafka::consumer::Partitions;
use crate::kafka::producer::Producer;
use crate::kafka::{KafkaSettings, admin};
use crate::secret::StateKeyRing;
use partition::OwnerHandle;

pub fn now_millis() -> Millis {
    chrono::Utc::now().timestamp_millis()
}

/// Everything a worker process is configured with.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub kafka: KafkaSettings,
    pub bank: BelfiusConfig,
    /// The current state key, 64 hex chars or `id:hex`: seals every state record written.
    pub state_key: SecretString,
    /// Previous state keys (comma- or line-separated, each `hex` or `id:hex`): open records
    /// sealed before a rotation, never seal (docs/runbooks.md, "Rotating the state key").
    pub state_keys_previous: Option<SecretString>,
    /// Whether format 1 state records (written before sealed records) are still read.
    pub state_accept_v1: bool,
    /// The format state records are written in (both are read).
    pub state_format: crate::secret::StateFormat,
    pub policy: Policy,
    pub limits: ValidationLimits,
    pub max_command_bytes: usize,
    /// Records buffered per partition owner before the consumer waits.
    pub queue_capacity: usize,
    /// How long a revoked owner may finish in-flight work; keep it below the session timeout.
    pub drain_timeout: Duration,
    pub restore_timeout: Duration,
    pub checkpoint_interval: Duration,
    /// How long a final payment stays after its final event before it is retired.
    pub retention: Duration,
    /// How long a retired payment id is remembered after the final event (then forgotten).
    pub retired_ids_retention: Duration,
    /// A snapshot of each owned partition at least this often (if anything changed).
    pub snapshot_interval: Duration,
    /// A snapshot as soon as a restore would read this many records (or twice the live
    /// entities, if more).
    pub snapshot_min_records: u64,
    /// Create missing topics with this many partitions at start-up (None: topics must exist).
    pub create_topics: Option<i32>,
    /// Retries, per-host limits and circuit breakers of bank calls (docs/belfius.md §1.5).
    pub bank_guard: crate::belfius::GuardConfig,
    /// The fallback interface and when to switch to it (None: off, the default;
    /// docs/belfius.md §7.5).
    pub fallback: Option<crate::belfius::route::FallbackSetup>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (None: not served).
    pub http_addr: Option<std::net::SocketAddr>,
}

/// Shared, read-only dependencies of the partition owners.
pub struct EngineDeps {
    pub kafka: KafkaSettings,
    /// Partitions of the command topic (a command must be on the one its key hashes to).
    pub partitions: i32,
    pub producer: Producer,
    pub bank: BelfiusClient,
    /// The brands' routes between the dedicated API and the fallback (None: fallback off).
    pub bank_route: Option<Arc<crate::belfius::route::Router>>,
    pub state_key: StateKeyRing,
    pub policy: Policy,
    pub limits: ValidationLimits,
    pub max_command_bytes: usize,
    pub queue_capacity: usize,
    pub drain_timeout: Duration,
    pub restore_timeout: Duration,
    pub checkpoint_interval: Duration,
    pub retention: Duration,
    pub retired_ids_retention: Duration,
    pub snapshot_interval: Duration,
    pub snapshot_min_records: u64,
    fatal_tx: mpsc::UnboundedSender<String>,
}

impl EngineDeps {
    /// Stops the process: used when state cannot be made durable. Crash-only: the next owner
    /// restores from the broker.
    pub fn fatal(&self, message: String) {
        error!(%message, "fatal");
        let _ = self.fatal_tx.send(message);
    }
}

/// The partition owners of this process, as the consumer thread sees them.
struct PartitionSet {
    deps: Arc<EngineDeps>,
    runtime: tokio::runtime::Handle,
    owners: Mutex<HashMap<i32, OwnerHandle>>,
}

impl PartitionSet {
    fn owners(&self) -> std::sync::MutexGuard<'_, HashMap<i32, OwnerHandle>> {
        // A poisoned lock means a panic elsewhere while holding it; the map itself is still
        // consistent (every operation is a single insert/remove/read).
        self.owners.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Partitions for PartitionSet {
    fn assign(&self, partition: i32) {
        let handle = partition::spawn(partition, self.deps.clone(), &self.runtime);
        let mut owners = self.owners();
        if let Some(old) = owners.insert(partition, handle) {
            warn!(partition, "partition assigned twice; replacing its owner");
            drop(old);
        }
        crate::metrics::metrics()
            .assigned_partitions
            .set(owners.len() as i64);
    }

    fn revoke(&self, partitions: &[i32]) -> Vec<(i32, i64)> {
        let handles: Vec<(i32, OwnerHandle)> = {
            let mut owners = self.owners();
            let handles = partitions
                .iter()
                .filter_map(|p| owners.remove(p).map(|h| (*p, h)))
                .collect();
            crate::metrics::metrics()
                .assigned_partitions
                .set(owners.len() as i64);
            handles
        };
        // Never blocks: the request does not queue behind records (an owner still restoring
        // gives up at once).
        for (_, handle) in &handles {
            handle.request_revoke();
        }
        // The owners drain in parallel within their own bound; allow a margin on top.
        let deadline = std::time::Instant::now() + self.deps.drain_timeout + Duration::from_secs(3);
        let mut out = Vec::new();
        for (partition, handle) in &handles {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if !handle.wait_released(left) {
                warn!(partition, "owner did not release the partition in time");
            }
            let offset = handle.committable();
            if offset >= 0 {
                out.push((*partition, offset));
            }
        }
        out
    }

    fn dispatch(&self, message: OwnedMessage) -> Result<(), String> {
        let partition = message.partition();
        let owners = self.owners();
        let handle = owners
            .get(&partition)
            .ok_or_else(|| format!("no owner for partition {partition}"))?;
        handle
            .dispatch(message)
            .map_err(|e| format!("partition {partition}: {e}"))
    }

    fn committable(&self) -> Vec<(i32, i64)> {
        self.owners()
            .iter()
            .filter_map(|(p, h)| {
                let offset = h.committable();
                (offset >= 0).then_some((*p, offset))
            })
            .collect()
    }
}

/// Every 10 s: asks the broker for metadata (readiness) and samples the producer queue.
fn spawn_broker_probe(producer: Producer, health: Arc<crate::http::Health>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tick.tick().await;
            let probe = producer.clone();
            let answered =
                tokio::task::spawn_blocking(move || probe.broker_answers(Duration::from_secs(5)))
                    .await
                    .unwrap_or(false);
            if answered {
                health.broker_answered(now_millis());
            }
            crate::metrics::metrics()
                .producer_queue_depth
                .set(i64::from(producer.queue_depth()));
        }
    });
}

/// The brands' routes and the task that keeps them current (`engine::route`).
type FallbackRouting = (
    Arc<crate::belfius::route::Router>,
    tokio::task::JoinHandle<()>,
);

/// The routes between the dedicated API and the fallback, and their keeper task, when the
/// fallback is on.
fn fallback_router(
    config: &WorkerConfig,
    bank: &BelfiusClient,
) -> anyhow::Result<Option<FallbackRouting>> {
    let Some(setup) = &config.fallback else {
        return Ok(None);
    };
    let client =
        crate::belfius::fallback::FallbackClient::new(&config.bank, setup.endpoints.clone())
            .map_err(|e| anyhow::anyhow!("fallback interface client: {e}"))?;
    let router = Arc::new(crate::belfius::route::Router::new(client, setup.route));
    let keeper = route::spawn_keeper(bank.clone(), router.clone());
    info!(
        after_secs = setup.route.after.as_secs(),
        back_after_secs = setup.route.back_after.as_secs(),
        "fallback interface enabled"
    );
    Ok(Some((router, keeper)))
}

/// Creates the topics if asked, and checks the command/state partition invariant. A `Setup`
/// error (missing topic, partition mismatch) is a configuration fault; a `Kafka` error may be a
/// broker that is not up yet.
async fn prepare_topics(config: &WorkerConfig) -> Result<i32, crate::kafka::KafkaEdgeError> {
    if let Some(partitions) = config.create_topics {
        admin::ensure_topics(&config.kafka, partitions, 1).await?;
    }
    let kafka = config.kafka.clone();
    tokio::task::spawn_blocking(move || admin::check_partition_invariant(&kafka))
        .await
        .map_err(|e| crate::kafka::KafkaEdgeError::Setup(format!("topic check task: {e}")))?
}

/// Runs a worker until `shutdown` resolves (graceful: drain, commit, leave the group) or a fatal
/// error occurs (returned as the error).
pub async fn run(
    config: WorkerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    crate::contract::schemas().map_err(|e| anyhow::anyhow!("schemas: {e}"))?;
    let health = Arc::new(crate::http::Health::default());
    if let Some(addr) = config.http_addr {
        let bound = crate::http::serve(addr, health.clone())
            .await
            .map_err(|e| anyhow::anyhow!("serving /metrics on {addr}: {e}"))?;
        info!(%bound, "serving /metrics, /healthz, /readyz");
    }
    let state_key =
        StateKeyRing::from_config(&config.state_key, config.state_keys_previous.as_ref())
            .map_err(|e| anyhow::anyhow!("state keys: {e}"))?
            .with_accept_v1(config.state_accept_v1)
            .with_write_format(config.state_format);
    info!(state_keys = ?state_key, "state key ring");
    // A broker that is down or restarting is waited for (with back-off), not a reason to exit:
    // a replica started during a broker restart must join once the broker is back.
    let partitions = loop {
        match prepare_topics(&config).await {
            Ok(partitions) => break partitions,
            Err(e @ crate::kafka::KafkaEdgeError::Setup(_)) => return Err(e.into()),
            Err(e) => {
                warn!(error = %e, "broker not reachable yet; retrying in 2 s");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    info!(partitions, "topics checked");
    health.broker_answered(now_millis());
    let producer = Producer::new(&config.kafka)?;
    spawn_broker_probe(producer.clone(), health.clone());
    let trim = crate::memory::spawn_periodic_trim();
    let bank = BelfiusClient::with_guard(config.bank.clone(), config.bank_guard.clone())
        .map_err(|e| anyhow::anyhow!("belfius client: {e}"))?;
    let (bank_route, route_keeper) = fallback_router(&config, &bank)?.unzip();
    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel();
    let deps = Arc::new(EngineDeps {
        kafka: config.kafka.clone(),
        partitions,
        producer: producer.clone(),
        bank,
        bank_route,
        state_key,
        policy: config.policy.clone(),
        limits: config.limits,
        max_command_bytes: config.max_command_bytes,
        queue_capacity: config.queue_capacity,
        drain_timeout: config.drain_timeout,
        restore_timeout: config.restore_timeout,
        checkpoint_interval: config.checkpoint_interval,
        retention: config.retention,
        retired_ids_retention: config.retired_ids_retention,
        snapshot_interval: config.snapshot_interval,
        snapshot_min_records: config.snapshot_min_records,
        fatal_tx,
    });
    let set = Arc::new(PartitionSet {
        deps,
        runtime: tokio::runtime::Handle::current(),
        owners: Mutex::new(HashMap::new()),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let consumer_thread = {
        let kafka = config.kafka.clone();
        let set = set.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("pis-consumer".into())
            .spawn(move || crate::kafka::consumer::run(&kafka, set, stop))?
    };
    let consumer_done = {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let result = consumer_thread
                .join()
                .map_err(|_| anyhow::anyhow!("consumer thread panicked"))
                .and_then(|r| r.map_err(anyhow::Error::from));
            let _ = tx.send(result);
        });
        rx
    };
    tokio::pin!(consumer_done);
    let outcome: anyhow::Result<()> = tokio::select! {
        _ = shutdown => {
            info!("shutdown requested");
            stop.store(true, Ordering::Release);
            match (&mut consumer_done).await {
                Ok(result) => result,
                Err(_) => Err(anyhow::anyhow!("consumer thread vanished")),
            }
        }
        message = fatal_rx.recv() => {
            stop.store(true, Ordering::Release);
            Err(anyhow::anyhow!("fatal: {}", message.unwrap_or_default()))
        }
        result = &mut consumer_done => match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(anyhow::anyhow!("consumer thread vanished")),
        },
    };
    trim.abort();
    if let Some(keeper) = route_keeper {
        keeper.abort();
    }
    let flush = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10))).await;
    if let Ok(Err(e)) = flush {
        warn!(error = %e, "producer flush at shutdown failed");
    }
    info!("worker stopped");
    outcome
}
