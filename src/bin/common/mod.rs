//! What the chaos suite and the benchmark share: the test broker script, worker processes
//! started from the built binary, a topic follower and a command sender. Both drive real
//! processes over a real broker; nothing here is a mock.

pub mod load;
pub mod machine;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use pis_worker::contract::command::{self, CommandEnvelope};
use pis_worker::kafka::{KafkaSettings, Topics};
use pis_worker::sandbox::RunningSandbox;
use rand::Rng;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use secrecy::{ExposeSecret, SecretString};

pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Settings for a run of its own on the test broker: fresh topics and group under a random
/// prefix, a short session timeout so SIGKILLed replicas are noticed quickly.
pub fn harness_settings(brokers: &str, kind: &str) -> KafkaSettings {
    let prefix = format!("{kind}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    KafkaSettings {
        brokers: brokers.to_owned(),
        group_id: format!("{prefix}-workers"),
        topics: Topics::prefixed(&prefix),
        session_timeout_ms: 6_000,
        assignment_strategy: "cooperative-sticky".into(),
        extra: vec![],
        // Tansu compacts without honouring min.compaction.lag.ms (docs/guarantees.md).
        state_compaction: false,
        state_retention_ms: None,
    }
}

fn broker_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/broker.sh")
}

/// Runs `scripts/broker.sh ARGS` (start, stop, kill, ...).
pub fn broker(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("bash")
        .arg(broker_script())
        .args(args)
        .status()
        .context("running scripts/broker.sh")?;
    if !status.success() {
        bail!("scripts/broker.sh {} failed", args.join(" "));
    }
    Ok(())
}

/// The `pis-worker run` arguments that point a worker at `settings`' topics and at `sandbox`,
/// followed by `tuning` (flag, value) pairs.
pub fn worker_args(
    settings: &KafkaSettings,
    sandbox: &RunningSandbox,
    tuning: &[(&str, &str)],
) -> Vec<String> {
    let tls = &sandbox.tls_dir;
    let path = |name: &str| tls.join(name).to_string_lossy().into_owned();
    let mut args: Vec<String> = vec![
        "--brokers".into(),
        settings.brokers.clone(),
        "--group-id".into(),
        settings.group_id.clone(),
        "--topic-commands".into(),
        settings.topics.commands.clone(),
        "--topic-status".into(),
        settings.topics.status.clone(),
        "--topic-consent-status".into(),
        settings.topics.consent_status.clone(),
        "--topic-state".into(),
        settings.topics.state.clone(),
        "--topic-dlq".into(),
        settings.topics.dlq.clone(),
        "--session-timeout-ms".into(),
        settings.session_timeout_ms.to_string(),
        "--client-id".into(),
        sandbox.client_id().to_owned(),
        "--belfius-url".into(),
        sandbox.api_base_url().to_string(),
        "--banx-url".into(),
        sandbox.banx_base_url().to_string(),
        "--bank-ca-file".into(),
        path("ca.pem"),
        "--qwac-cert-file".into(),
        path("client.pem"),
        "--qwac-key-file".into(),
        path("client-key.pem"),
    ];
    // The sandbox verifies QSeal signatures by default: seal with its test key.
    if let (Some(key), Some(cert)) = (sandbox.qseal_key_path(), sandbox.qseal_cert_path()) {
        args.push("--qseal-key-file".into());
        args.push(key.to_string_lossy().into_owned());
        args.push("--qseal-cert-file".into());
        args.push(cert.to_string_lossy().into_owned());
    }
    for (flag, value) in tuning {
        args.push((*flag).to_owned());
        args.push((*value).to_owned());
    }
    args
}

/// The environment every harness worker gets: the state key, the bank client secret, `log` as
/// the tracing filter, plain (uncoloured) log lines.
pub fn worker_env(
    sandbox: &RunningSandbox,
    state_key_hex: &SecretString,
    log: &str,
) -> Vec<(String, String)> {
    vec![
        (
            "PIS_STATE_KEY".into(),
            state_key_hex.expose_secret().to_owned(),
        ),
        (
            "PIS_CLIENT_SECRET".into(),
            sandbox.client_secret().expose_secret().to_owned(),
        ),
        ("PIS_LOG".into(), log.to_owned()),
        ("NO_COLOR".into(), "1".into()),
    ]
}

/// Worker processes, as a Deployment runs them: started from the binary, SIGKILLed on demand,
/// restarted when they stop by themselves.
pub struct Workers {
    pub bin: PathBuf,
    pub base_args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub dir: PathBuf,
    pub running: Vec<(usize, Child)>,
    pub started: usize,
    pub killed: usize,
    /// Workers that stopped by themselves (a fatal error: crash-only) and were restarted, as
    /// a Deployment's restart policy would.
    pub exited: usize,
}

impl Workers {
    pub fn new(
        bin: PathBuf,
        base_args: Vec<String>,
        env: Vec<(String, String)>,
        dir: &Path,
    ) -> Self {
        Self {
            bin,
            base_args,
            env,
            dir: dir.to_path_buf(),
            running: Vec::new(),
            started: 0,
            killed: 0,
            exited: 0,
        }
    }

    /// The worker binary given, or `pis-worker` next to the running executable.
    pub fn binary(given: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
        match given {
            Some(b) => Ok(b.clone()),
            None => std::env::current_exe()?
                .parent()
                .map(|d| d.join("pis-worker"))
                .ok_or_else(|| anyhow::anyhow!("no directory for the worker binary")),
        }
    }

    pub fn start_one(&mut self) -> anyhow::Result<()> {
        let n = self.started;
        self.started += 1;
        let log = std::fs::File::create(self.dir.join(format!("worker-{n}.log")))?;
        let child = Command::new(&self.bin)
            .arg("run")
            .args(&self.base_args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.running.push((n, child));
        Ok(())
    }

    pub fn kill_random(&mut self) -> anyhow::Result<()> {
        if self.running.is_empty() {
            return Ok(());
        }
        let at = rand::thread_rng().gen_range(0..self.running.len());
        let (n, mut child) = self.running.remove(at);
        let _ = child.kill();
        let _ = child.wait();
        self.killed += 1;
        println!("chaos: SIGKILL worker {n}; starting a replacement");
        self.start_one()
    }

    /// Restarts workers that exited by themselves; their log's last line says why.
    pub fn replace_exited(&mut self) -> anyhow::Result<()> {
        let mut exited = Vec::new();
        self.running
            .retain_mut(|(n, child)| match child.try_wait() {
                Ok(Some(status)) => {
                    exited.push((*n, status));
                    false
                }
                Ok(None) | Err(_) => true,
            });
        for (n, status) in exited {
            self.exited += 1;
            println!("chaos: worker {n} exited by itself ({status}); starting a replacement");
            self.start_one()?;
        }
        Ok(())
    }

    /// Graceful stop of everyone still running (SIGTERM, then wait).
    pub fn stop_all(&mut self) {
        for (_, child) in &self.running {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for (_, child) in &mut self.running {
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.running.clear();
    }
}

/// Follows a topic from the beginning on its own thread.
pub fn follow(
    settings: &KafkaSettings,
    topic: &str,
    partitions: i32,
    stop: Arc<AtomicBool>,
    mut on_record: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .set(
            "group.id",
            format!("harness-reader-{}", uuid::Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        // librdkafka's default ("largest") would jump to the end after an out-of-range fetch
        // and skip records silently; from the start again only re-reads (checkers de-duplicate).
        .set("auto.offset.reset", "earliest")
        // Timestamps taken on arrival are latencies: do not let a fetch idle on the broker.
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let topic_name = topic.to_owned();
    Ok(std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => on_record(&m),
                Some(Err(e)) => eprintln!("harness: reading {topic_name}: {e}"),
                None => {}
            }
        }
    }))
}

/// Reads a topic once more from its beginning with a fresh consumer, until nothing has arrived
/// for `idle`: the payloads, for a checker to tell a record its live reader missed from one
/// that is not on the topic at all.
pub fn read_again(
    settings: &KafkaSettings,
    topic: &str,
    partitions: i32,
    idle: Duration,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .set(
            "group.id",
            format!("harness-reread-{}", uuid::Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let mut last = std::time::Instant::now();
    let started = last;
    while last.elapsed() < idle && started.elapsed() < Duration::from_secs(120) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                out.push(rdkafka::Message::payload(&m).unwrap_or_default().to_vec());
                last = std::time::Instant::now();
            }
            Some(Err(e)) => eprintln!("harness: reading {topic} again: {e}"),
            None => {}
        }
    }
    Ok(out)
}

/// An idempotent producer for commands, keyed by PSU as clients must.
pub fn command_producer(settings: &KafkaSettings) -> anyhow::Result<FutureProducer> {
    Ok(settings
        .client_config()
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("message.timeout.ms", "120000")
        .create()?)
}

pub async fn send(
    producer: &FutureProducer,
    topic: &str,
    envelope: &CommandEnvelope,
) -> anyhow::Result<()> {
    let bytes = command::encode(envelope).map_err(|e| anyhow::anyhow!("encode: {e}"))?;
    producer
        .send(
            FutureRecord::to(topic)
                .key(envelope.psu_id.as_bytes())
                .payload(&bytes),
            Duration::from_secs(60),
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!("send: {e}"))?;
    Ok(())
}
