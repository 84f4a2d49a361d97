//! Harness for integration tests on real parts: the Tansu broker started by `make test`
//! (PIS_TEST_BROKERS), the worker binary as a child process, the Belfius sandbox over mutual TLS,
//! and Avro bytes on the wire. Each test gets its own topics and consumer group.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pis_worker::contract::command::{self, CommandBody, CommandEnvelope, ScaRedirect};
use pis_worker::contract::status::{self, StatusRecord};
use pis_worker::domain::machine::StateKind;
use pis_worker::domain::model::RawInitiatePayment;
use pis_worker::kafka::{KafkaSettings, Topics};
use pis_worker::sandbox::{RunningSandbox, SandboxConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use secrecy::ExposeSecret;

pub const PARTITIONS: i32 = 2;

/// Worker flags that leave polling to the test: payments move on client commands.
pub const CLIENT_DRIVEN: &[&str] = &["--poll-fast-ms", "60000", "--poll-slow-ms", "60000"];

pub fn brokers() -> String {
    std::env::var("PIS_TEST_BROKERS").unwrap_or_else(|_| {
        panic!(
            "integration tests need a Kafka-protocol broker: run `make test`, or start one with \
             `scripts/broker.sh start 9092 .run/broker` and set PIS_TEST_BROKERS=127.0.0.1:9092"
        )
    })
}

pub struct TestEnv {
    pub settings: KafkaSettings,
    pub sandbox: RunningSandbox,
    pub dir: tempfile::TempDir,
    pub state_key: String,
    producer: FutureProducer,
    status: Collector,
    dlq: Collector,
}

impl TestEnv {
    /// Fresh topics, a fresh sandbox (with `configure` applied) and a state key.
    pub async fn new(configure: impl FnOnce(&mut SandboxConfig)) -> TestEnv {
        // PIS_TEST_KEEP=1 keeps the directory (worker logs, TLS files) for a post-mortem.
        let dir = tempfile::Builder::new()
            .prefix("pis-it-")
            .disable_cleanup(std::env::var_os("PIS_TEST_KEEP").is_some())
            .tempdir()
            .expect("tempdir");
        eprintln!("test dir: {}", dir.path().display());
        let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let settings = KafkaSettings {
            brokers: brokers(),
            group_id: format!("{prefix}-workers"),
            topics: Topics::prefixed(&prefix),
            session_timeout_ms: 6_000,
            assignment_strategy: "cooperative-sticky".into(),
            extra: vec![],
            // Tansu compacts without honouring min.compaction.lag.ms (docs/guarantees.md).
            state_compaction: false,
            state_retention_ms: None,
        };
        pis_worker::kafka::admin::ensure_topics(&settings, PARTITIONS, 1)
            .await
            .expect("create topics");
        let mut config = SandboxConfig::local(dir.path().join("tls"));
        configure(&mut config);
        let sandbox = pis_worker::sandbox::start(config).await.expect("sandbox");
        let producer: FutureProducer = settings
            .client_config()
            .set("enable.idempotence", "true")
            .set("partitioner", "murmur2_random")
            .create()
            .expect("producer");
        let state_key = pis_worker::secret::StateKey::generate_hex()
            .expose_secret()
            .to_owned();
        let status = Collector::follow(&settings, &settings.topics.status);
        let dlq = Collector::follow(&settings, &settings.topics.dlq);
        TestEnv {
            settings,
            sandbox,
            dir,
            state_key,
            producer,
            status,
            dlq,
        }
    }

    /// Starts a worker process (its log goes to `worker-<n>.log` in the test dir). It seals
    /// its initiations with the sandbox's test QSeal, which the sandbox verifies by default.
    pub fn start_worker(&self, name: &str, extra: &[&str]) -> Worker {
        self.start_worker_sealing(name, extra, true)
    }

    /// A worker without a QSeal key: its initiations carry no `Signature`.
    pub fn start_worker_unsealed(&self, name: &str, extra: &[&str]) -> Worker {
        self.start_worker_sealing(name, extra, false)
    }

    fn start_worker_sealing(&self, name: &str, extra: &[&str], seal: bool) -> Worker {
        let log_path = self.dir.path().join(format!("worker-{name}.log"));
        let log = std::fs::File::create(&log_path).expect("log file");
        let tls = &self.sandbox.tls_dir;
        let mut command = Command::new(env!("CARGO_BIN_EXE_pis-worker"));
        command
            .arg("run")
            .args(["--brokers", &self.settings.brokers])
            .args(["--group-id", &self.settings.group_id])
            .args(["--topic-commands", &self.settings.topics.commands])
            .args(["--topic-status", &self.settings.topics.status])
            .args([
                "--topic-consent-status",
                &self.settings.topics.consent_status,
            ])
            .args(["--topic-state", &self.settings.topics.state])
            .args(["--topic-dlq", &self.settings.topics.dlq])
            .args(["--session-timeout-ms", "6000"])
            .args(["--client-id", self.sandbox.client_id()])
            .args(["--belfius-url", self.sandbox.api_base_url().as_str()])
            .args(["--banx-url", self.sandbox.banx_base_url().as_str()])
            .arg("--bank-ca-file")
            .arg(tls.join("ca.pem"))
            .arg("--qwac-cert-file")
            .arg(tls.join("client.pem"))
            .arg("--qwac-key-file")
            .arg(tls.join("client-key.pem"));
        if seal {
            let cert = self
                .sandbox
                .qseal_cert_path()
                .expect("the sandbox's test QSeal");
            let key = self
                .sandbox
                .qseal_key_path()
                .expect("the sandbox's test QSeal");
            command
                .arg("--qseal-key-file")
                .arg(key)
                .arg("--qseal-cert-file")
                .arg(cert);
        }
        command
            .args(extra)
            .env("PIS_STATE_KEY", &self.state_key)
            .env(
                "PIS_CLIENT_SECRET",
                self.sandbox.client_secret().expose_secret(),
            )
            .env("PIS_LOG", "info,pis_worker=debug,rdkafka=warn")
            // Tests run several workers at once: any free port (tests that scrape set their own).
            .env("PIS_HTTP_ADDR", "127.0.0.1:0")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let child = command.spawn().expect("spawn worker");
        Worker {
            child: Some(child),
            log_path,
        }
    }

    pub async fn send(&self, envelope: &CommandEnvelope) {
        let bytes = command::encode(envelope).expect("encode");
        self.send_raw(&envelope.psu_id, &bytes).await;
    }

    pub async fn send_raw(&self, key: &str, value: &[u8]) {
        self.producer
            .send(
                FutureRecord::to(&self.settings.topics.commands)
                    .key(key.as_bytes())
                    .payload(value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("send command");
    }

    /// All status events seen so far, in topic order per partition.
    pub fn status_events(&self) -> Vec<StatusRecord> {
        self.status
            .snapshot()
            .iter()
            .map(|m| status::decode(m.payload().unwrap_or_default()).expect("decodable status"))
            .collect()
    }

    pub fn dlq_records(&self) -> Vec<OwnedMessage> {
        self.dlq.snapshot()
    }

    /// Waits until at least `count` dead-letter records arrived, and returns them all.
    pub async fn wait_for_dlq(&self, count: usize) -> Vec<OwnedMessage> {
        let started = Instant::now();
        loop {
            let records = self.dlq_records();
            if records.len() >= count {
                return records;
            }
            if started.elapsed() > Duration::from_secs(30) {
                panic!("expected {count} DLQ records, got {}", records.len());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until `done` holds on the de-duplicated events of `payment_id`.
    pub async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[StatusRecord]) -> bool,
    ) -> Vec<StatusRecord> {
        let started = Instant::now();
        loop {
            let events = self.status_events();
            if done(&events) {
                return events;
            }
            if started.elapsed() > timeout {
                panic!(
                    "timed out waiting for {what}; events so far:\n{}",
                    describe(&events)
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    pub async fn wait_for_state(&self, payment_id: &str, state: StateKind) -> Vec<StatusRecord> {
        self.wait_for(
            &format!("{payment_id} to reach {}", state.symbol()),
            Duration::from_secs(60),
            |events| {
                events
                    .iter()
                    .any(|e| e.payment_id == payment_id && e.state == state)
            },
        )
        .await
    }

    /// The PSU `psu_id` opens the SCA URL the worker published for `payment_id` (its latest
    /// `SCA_PENDING` event, with the worker's OAuth `state`), acts (`sign` / `reject`), and
    /// returns the redirect URL their browser brings back.
    pub async fn psu(&self, action: &str, payment_id: &str, psu_id: &str) -> String {
        let events = self.wait_for_state(payment_id, StateKind::ScaPending).await;
        let sca_url = events
            .iter()
            .rev()
            .find(|e| e.payment_id == payment_id && e.state == StateKind::ScaPending)
            .and_then(|e| e.sca_redirect_url.clone())
            .expect("the SCA_PENDING event carries the SCA URL");
        self.psu_at(action, &sca_url, psu_id).await
    }

    /// The PSU opens `sca_url` (as published, or tampered with by a test) and acts.
    pub async fn psu_at(&self, action: &str, sca_url: &str, psu_id: &str) -> String {
        let mut url = self
            .sandbox
            .admin_base_url()
            .join(&format!("admin/sca/{action}"))
            .expect("url");
        url.query_pairs_mut()
            .append_pair("url", sca_url)
            .append_pair("psu", psu_id);
        let response = reqwest::Client::new()
            .post(url)
            .send()
            .await
            .expect("admin call");
        assert!(
            response.status().is_success(),
            "PSU {action} failed: {}",
            response.status()
        );
        let body: serde_json::Value = response.json().await.expect("json");
        body["redirect_url"]
            .as_str()
            .expect("redirect_url")
            .to_owned()
    }

    pub async fn counters(&self) -> serde_json::Value {
        let url = self
            .sandbox
            .admin_base_url()
            .join("admin/counters")
            .expect("url");
        reqwest::get(url)
            .await
            .expect("counters")
            .json()
            .await
            .expect("json")
    }
}

pub struct Worker {
    child: Option<Child>,
    pub log_path: PathBuf,
}

impl Worker {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the worker has restored `count` partitions (possibly after a rebalance).
    pub async fn wait_restored(&self, count: usize) {
        let started = Instant::now();
        while self.log().matches("partition restored").count() < count {
            if started.elapsed() > Duration::from_secs(60) {
                panic!(
                    "worker did not restore {count} partitions; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGTERM and wait: the graceful path (drain, commit, leave the group).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if started.elapsed() > Duration::from_secs(40) {
                let _ = child.kill();
                panic!("worker did not stop on SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL: a crash at an arbitrary point.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Follows a topic from the beginning on a background thread and keeps every record. (Reading
/// "up to the high watermark" is not an option: Tansu 0.6 advances it per batch, not per record.)
pub struct Collector {
    records: std::sync::Arc<std::sync::Mutex<Vec<OwnedMessage>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Collector {
    pub fn follow(settings: &KafkaSettings, topic: &str) -> Collector {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &settings.brokers)
            .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .create()
            .expect("reader");
        let mut tpl = TopicPartitionList::new();
        for partition in 0..PARTITIONS {
            tpl.add_partition_offset(topic, partition, Offset::Beginning)
                .expect("tpl");
        }
        consumer.assign(&tpl).expect("assign");
        let records = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r, s) = (records.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                    r.lock().expect("lock").push(m.detach());
                }
            }
        });
        Collector { records, stop }
    }

    pub fn snapshot(&self) -> Vec<OwnedMessage> {
        self.records.lock().expect("lock").clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

pub fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

pub fn describe(events: &[StatusRecord]) -> String {
    events
        .iter()
        .map(|e| {
            format!(
                "  {} #{} {} {:?} {:?}",
                e.payment_id,
                e.sequence,
                e.state.symbol(),
                e.bank_status,
                e.reason_code
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The events of one payment, de-duplicated by sequence as a client must do, in sequence
/// order; panics if two different events share a sequence.
pub fn timeline(events: &[StatusRecord], payment_id: &str) -> Vec<StatusRecord> {
    let mut by_sequence: BTreeMap<i64, StatusRecord> = BTreeMap::new();
    for event in events.iter().filter(|e| e.payment_id == payment_id) {
        if let Some(existing) = by_sequence.get(&event.sequence) {
            assert_eq!(
                (existing.state, &existing.event_id),
                (event.state, &event.event_id),
                "two different events with sequence {} for {payment_id}",
                event.sequence
            );
        }
        by_sequence.insert(event.sequence, event.clone());
    }
    by_sequence.into_values().collect()
}

pub fn states(events: &[StatusRecord]) -> Vec<StateKind> {
    events.iter().map(|e| e.state).collect()
}

/// Checks the invariants every payment's stream must keep: gap-free sequences from 1, at most
/// one final event, and it is the last.
pub fn assert_well_formed(events: &[StatusRecord], payment_id: &str) {
    let line = timeline(events, payment_id);
    for (i, event) in line.iter().enumerate() {
        assert_eq!(
            event.sequence,
            i as i64 + 1,
            "gap in {payment_id}: {}",
            describe(&line)
        );
    }
    let finals = line.iter().filter(|e| e.is_final).count();
    assert!(finals <= 1, "{payment_id} has {finals} final events");
    if finals == 1 {
        assert!(
            line.last().is_some_and(|e| e.is_final),
            "final event of {payment_id} is not last"
        );
    }
}

pub fn initiate(payment_id: &str, psu_id: &str, amount: &str, creditor: &str) -> CommandEnvelope {
    CommandEnvelope {
        command_id: uuid::Uuid::new_v4().to_string(),
        payment_id: payment_id.into(),
        psu_id: psu_id.into(),
        issued_at: chrono::Utc::now().timestamp_millis(),
        body: CommandBody::Initiate(Box::new(RawInitiatePayment {
            payment_product: "SEPA_CREDIT_TRANSFERS".into(),
            brand: "BELFIUS".into(),
            amount: amount.into(),
            currency: "EUR".into(),
            creditor_name: creditor.into(),
            creditor_iban: "BE68539007547034".into(),
            creditor_bic: None,
            debtor_iban: None,
            end_to_end_id: payment_id.into(),
            remittance_information: Some("integration test".into()),
            requested_execution_date: None,
            language: "fr".into(),
            redirect_uri: "https://client.example/callback".into(),
            ..Default::default()
        })),
    }
}

pub fn command(payment_id: &str, psu_id: &str, body: CommandBody) -> CommandEnvelope {
    CommandEnvelope {
        command_id: uuid::Uuid::new_v4().to_string(),
        payment_id: payment_id.into(),
        psu_id: psu_id.into(),
        issued_at: chrono::Utc::now().timestamp_millis(),
        body,
    }
}

pub fn complete_sca(payment_id: &str, psu_id: &str, redirect_url: &str) -> CommandEnvelope {
    CommandEnvelope {
        command_id: uuid::Uuid::new_v4().to_string(),
        payment_id: payment_id.into(),
        psu_id: psu_id.into(),
        issued_at: chrono::Utc::now().timestamp_millis(),
        body: CommandBody::CompleteSca(ScaRedirect::from_redirect_url(
            &url::Url::parse(redirect_url).expect("redirect url"),
        )),
    }
}

// Helpers for the bad-input, DLQ and schema tests (tests/bad_input.rs, tests/avro_interop.rs).

pub mod registry;

impl TestEnv {
    /// Sends one record with full control: `partition` (None: by key), `value` (None: a null
    /// value) and headers. Returns where it landed.
    pub async fn send_record(
        &self,
        partition: Option<i32>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> (i32, i64) {
        let mut owned = rdkafka::message::OwnedHeaders::new();
        for (k, v) in headers {
            owned = owned.insert(rdkafka::message::Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.settings.topics.commands).headers(owned);
        if let Some(p) = partition {
            record = record.partition(p);
        }
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = value {
            record = record.payload(v);
        }
        let delivered = self
            .producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .expect("send record");
        (delivered.partition, delivered.offset)
    }

    /// The status topic's records as they are on the wire (framing checks).
    pub fn status_messages(&self) -> Vec<OwnedMessage> {
        self.status.snapshot()
    }

    /// Waits until `done` holds on the DLQ records, and returns them.
    pub async fn wait_for_dlq_where(
        &self,
        what: &str,
        done: impl Fn(&[OwnedMessage]) -> bool,
    ) -> Vec<OwnedMessage> {
        let started = Instant::now();
        loop {
            let records = self.dlq_records();
            if done(&records) {
                return records;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let classes: Vec<_> = records
                    .iter()
                    .map(|r| header(r, "pis.error.class"))
                    .collect();
                panic!("timed out waiting for DLQ {what}; classes so far: {classes:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs `pis-worker <args>` against this env's broker and topics; returns its stdout and
    /// panics (with stderr) if it fails.
    pub async fn cli(&self, args: &[&str]) -> String {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_pis-worker"))
            .args(args)
            .args(["--brokers", &self.settings.brokers])
            .args(["--topic-commands", &self.settings.topics.commands])
            .args(["--topic-status", &self.settings.topics.status])
            .args([
                "--topic-consent-status",
                &self.settings.topics.consent_status,
            ])
            .args(["--topic-state", &self.settings.topics.state])
            .args(["--topic-dlq", &self.settings.topics.dlq])
            .env("PIS_LOG", "warn")
            .output()
            .await
            .expect("run pis-worker");
        assert!(
            output.status.success(),
            "pis-worker {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("utf-8")
    }
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The value of a Prometheus sample `name{labels}` (labels as rendered, e.g.
/// `class="BAD_FRAMING"`) in a worker's `/metrics`, waiting up to 10 s for it to appear.
pub async fn metric(port: u16, sample: &str) -> f64 {
    let started = Instant::now();
    loop {
        let text = match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let value = text
            .lines()
            .find(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok());
        if let Some(value) = value {
            return value;
        }
        if started.elapsed() > Duration::from_secs(10) {
            panic!("no sample {sample} in /metrics:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A status event record (single-object encoding): what a client must never put on the commands
/// topic (`WRONG_RECORD_TYPE`), and what registry-framing tests re-frame.
pub fn status_event_bytes(payment_id: &str, psu_id: &str) -> Vec<u8> {
    status::encode(&pis_worker::domain::machine::StatusEvent {
        payment_id: pis_worker::domain::model::PaymentId::new(payment_id),
        psu_id: pis_worker::domain::model::PsuId::new(psu_id),
        sequence: 1,
        state: StateKind::Received,
        bank_status: None,
        bank_payment_id: None,
        sca_redirect_url: None,
        reason: None,
        causation_id: "c".into(),
        occurred_at: 0,
        settlement: None,
    })
    .expect("status")
}

// Consent status events (tests/worker_consents.rs).

impl TestEnv {
    /// Follows the consent status topic from the beginning.
    pub fn follow_consents(&self) -> Collector {
        Collector::follow(&self.settings, &self.settings.topics.consent_status)
    }
}

/// Every consent status event `feed` has seen so far, in topic order per partition.
pub fn consent_events(
    feed: &Collector,
) -> Vec<pis_worker::contract::consent_status::ConsentStatusRecord> {
    feed.snapshot()
        .iter()
        .map(|m| {
            pis_worker::contract::consent_status::decode(m.payload().unwrap_or_default())
                .expect("decodable consent status")
        })
        .collect()
}

/// Waits (up to 60 s) until `done` holds on the consent events seen so far, and returns them.
pub async fn wait_for_consent(
    feed: &Collector,
    what: &str,
    done: impl Fn(&[pis_worker::contract::consent_status::ConsentStatusRecord]) -> bool,
) -> Vec<pis_worker::contract::consent_status::ConsentStatusRecord> {
    let started = Instant::now();
    loop {
        let events = consent_events(feed);
        if done(&events) {
            return events;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let seen: Vec<String> = events
                .iter()
                .map(|e| {
                    format!(
                        "  {} #{} {} {:?}",
                        e.consent_id,
                        e.sequence,
                        e.state.symbol(),
                        e.reason_code
                    )
                })
                .collect();
            panic!(
                "timed out waiting for {what}; consent events so far:\n{}",
                seen.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
