//! End-to-end benchmark: N payments through real worker processes, a real broker and the
//! sandbox over mTLS, measured from the client's side (commands published, status events
//! read back). Runs one scenario per replica count so scaling shows as a ratio, and reports
//! the CPU each process spent per payment, which stays comparable across machines better than
//! wall-clock rates do on a shared 2-core box.
//!
//! Every measured payment must end SETTLED exactly once, or the run fails: a benchmark that
//! loses payments measures nothing.
//!
//! `make bench` (scripts/bench.sh) runs it with the release build.

// The chaos suite uses the rest of the harness (SIGKILLs, restarts).
#[allow(dead_code)]
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use common::Workers;
use pis_worker::contract::status;
use pis_worker::domain::machine::StateKind;
use pis_worker::kafka::KafkaSettings;
use pis_worker::sandbox::SandboxConfig;
use pis_worker::secret::StateKey;
use rdkafka::Message;

#[derive(Debug, Parser)]
#[command(about = "End-to-end throughput and latency benchmark for pis-worker")]
struct Args {
    /// Measured payments per scenario.
    #[arg(long, default_value_t = 3_000)]
    payments: usize,
    /// Payments that run before the measurement, so start-up and restore are not measured.
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// Replica counts to run, one scenario each.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    workers: Vec<usize>,
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    #[arg(long, default_value_t = 300)]
    psus: usize,
    /// Publish at this many commands per second (0: as fast as the producer goes). A rate
    /// below saturation measures latency; 0 measures throughput.
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// How often a worker polls a payment waiting for SCA (its fast phase).
    #[arg(long, default_value_t = 200)]
    poll_fast_ms: u64,
    /// Extra librdkafka property for the workers, `key=value` (repeatable), to try tunings.
    #[arg(long = "kafka-property")]
    kafka_properties: Vec<String>,
    /// Use this broker instead of starting one.
    #[arg(long)]
    brokers: Option<String>,
    /// Give up on a scenario after this long.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
    #[arg(long, default_value = ".run/bench")]
    run_dir: PathBuf,
    /// The worker binary (default: pis-worker next to this one).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (run_dir, run_dir_str) = common::load::fresh_run_dir(&args.run_dir)?;
    let (brokers, own_broker) = common::load::broker_or_own(&args.brokers, &run_dir_str)?;
    let mut results = Vec::new();
    let mut outcome = Ok(());
    for &workers in &args.workers {
        let dir = run_dir.join(format!("workers-{workers}"));
        std::fs::create_dir_all(&dir)?;
        match scenario(&args, &brokers, &run_dir, &dir, workers).await {
            Ok(result) => {
                result.print_progress_line();
                results.push(result);
            }
            Err(e) => {
                outcome = Err(e.context(format!("scenario with {workers} worker(s)")));
                break;
            }
        }
    }
    if own_broker {
        let _ = common::broker(&["stop", &run_dir_str]);
    }
    outcome?;
    print_report(&args, &results);
    Ok(())
}

struct ScenarioResult {
    workers: usize,
    payments: usize,
    publish: Duration,
    /// From the first publish to the last SCA_PENDING event.
    to_all_sca_pending: Duration,
    /// From the first publish to the last SETTLED event.
    to_all_settled: Duration,
    /// Publish acknowledged → SCA_PENDING event read, per payment.
    sca_latency: Vec<Duration>,
    worker_cpu: Duration,
    broker_cpu: Option<Duration>,
    /// This process: the sandbox (in process), the producer and the status reader.
    harness_cpu: Duration,
    bank_calls: Option<u64>,
}

impl ScenarioResult {
    fn initiated_per_sec(&self) -> f64 {
        self.payments as f64 / self.to_all_sca_pending.as_secs_f64()
    }
    fn settled_per_sec(&self) -> f64 {
        self.payments as f64 / self.to_all_settled.as_secs_f64()
    }
    fn print_progress_line(&self) {
        println!(
            "bench: {} worker(s): {} payments, {:.0} initiated/s, {:.0} settled/s",
            self.workers,
            self.payments,
            self.initiated_per_sec(),
            self.settled_per_sec()
        );
    }
}

/// One payment's timeline as the client sees it.
#[derive(Debug, Default, Clone)]
struct Seen {
    published: Option<Instant>,
    sca_pending: Option<Instant>,
    finals: Vec<(i64, StateKind, Instant)>,
}

async fn scenario(
    args: &Args,
    brokers: &str,
    run_dir: &Path,
    dir: &Path,
    replicas: usize,
) -> anyhow::Result<ScenarioResult> {
    let settings = common::harness_settings(brokers, "bench");
    pis_worker::kafka::admin::ensure_topics(&settings, args.partitions, 1).await?;

    // The PSU signs as soon as the bank created the payment; the worker learns it by polling.
    let mut config = SandboxConfig::local(dir.join("tls"));
    config.auto_sign_after = Some(Duration::ZERO);
    config.settle_after = Duration::ZERO;
    config.sca_expiry = Duration::from_secs(3600);
    let sandbox = pis_worker::sandbox::start(config).await?;

    let state_key_hex = StateKey::generate_hex();
    let poll_fast = args.poll_fast_ms.to_string();
    let mut tuning = vec![
        ("--drain-timeout-ms", "3000"),
        ("--poll-fast-ms", poll_fast.as_str()),
        ("--poll-fast-count", "100"),
        ("--sca-timeout-secs", "900"),
    ];
    for property in &args.kafka_properties {
        tuning.push(("--kafka-property", property.as_str()));
    }
    let base_args = common::worker_args(&settings, &sandbox, &tuning);
    let mut workers = Workers::new(
        Workers::binary(args.worker_bin.as_ref())?,
        base_args,
        common::worker_env(&sandbox, &state_key_hex, "warn"),
        dir,
    );
    // Each replica serves /readyz and /metrics on a port of its own.
    let mut http_ports = Vec::with_capacity(replicas);
    for _ in 0..replicas {
        let port = common::free_port()?;
        http_ports.push(port);
        workers.env.retain(|(k, _)| k != "PIS_HTTP_ADDR");
        workers
            .env
            .push(("PIS_HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
        workers.start_one()?;
    }

    let seen: Arc<Mutex<HashMap<String, Seen>>> = Arc::new(Mutex::new(HashMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let follower = {
        let seen = seen.clone();
        common::follow(
            &settings,
            &settings.topics.status,
            args.partitions,
            stop.clone(),
            move |m| {
                let now = Instant::now();
                let Ok(record) = status::decode(m.payload().unwrap_or_default()) else {
                    return;
                };
                let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                let entry = seen.entry(record.payment_id.clone()).or_default();
                if record.state == StateKind::ScaPending && entry.sca_pending.is_none() {
                    entry.sca_pending = Some(now);
                }
                if record.is_final && !entry.finals.iter().any(|f| f.0 == record.sequence) {
                    entry.finals.push((record.sequence, record.state, now));
                }
            },
        )?
    };
    let producer = common::command_producer(&settings)?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);

    // Warm-up: every replica is in the group and owns partitions, partitions are restored,
    // connections and tokens exist. A rebalance inside the measurement would measure the
    // rebalance.
    wait_group_stable(&http_ports, args.partitions, deadline).await?;
    let warmup: Vec<String> = (0..args.warmup).map(|i| format!("w{i:06}")).collect();
    publish(&producer, &settings, &warmup, args.psus, 0, &seen).await?;
    wait_final(&seen, &warmup, deadline, "warm-up").await?;

    let ids: Vec<String> = (0..args.payments).map(|i| format!("b{i:06}")).collect();
    let cpu_before = Cpu::read(&workers, run_dir)?;
    let bank_before = bank_calls(&sandbox.admin_base_url()).await;
    let started = Instant::now();
    publish(&producer, &settings, &ids, args.psus, args.rate, &seen).await?;
    let publish_took = started.elapsed();
    wait_final(&seen, &ids, deadline, "measurement").await?;
    let cpu_after = Cpu::read(&workers, run_dir)?;
    let bank_after = bank_calls(&sandbox.admin_base_url()).await;

    workers.stop_all();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = follower.join();
    sandbox.shutdown().await;

    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut sca_latency = Vec::with_capacity(ids.len());
    let (mut last_sca, mut last_final) = (started, started);
    let mut wrong = Vec::new();
    for id in &ids {
        let Some(s) = seen.get(id) else {
            wrong.push(format!("{id}: no status event"));
            continue;
        };
        match s.finals.as_slice() {
            [(_, StateKind::Settled, at)] => last_final = last_final.max(*at),
            other => wrong.push(format!(
                "{id}: final events {other:?}, expected one SETTLED"
            )),
        }
        match (s.published, s.sca_pending) {
            (Some(p), Some(sca)) => {
                sca_latency.push(sca.saturating_duration_since(p));
                last_sca = last_sca.max(sca);
            }
            _ => wrong.push(format!("{id}: no SCA_PENDING event")),
        }
    }
    if !wrong.is_empty() {
        for w in wrong.iter().take(20) {
            println!("bench: WRONG {w}");
        }
        bail!("{} payments did not end as one SETTLED", wrong.len());
    }
    sca_latency.sort();
    Ok(ScenarioResult {
        workers: replicas,
        payments: ids.len(),
        publish: publish_took,
        to_all_sca_pending: last_sca - started,
        to_all_settled: last_final - started,
        sca_latency,
        worker_cpu: cpu_after.workers.saturating_sub(cpu_before.workers),
        broker_cpu: cpu_after
            .broker
            .zip(cpu_before.broker)
            .map(|(a, b)| a.saturating_sub(b)),
        harness_cpu: cpu_after.harness.saturating_sub(cpu_before.harness),
        bank_calls: bank_after
            .zip(bank_before)
            .map(|(a, b)| a.saturating_sub(b)),
    })
}

/// Waits until every replica is ready (its partitions restored) and the replicas together own
/// each partition once, as their own /metrics say, twice in a row a second apart.
async fn wait_group_stable(
    ports: &[u16],
    partitions: i32,
    deadline: Instant,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let mut stable_checks = 0;
    let mut last_print = Instant::now();
    loop {
        let mut owned = Vec::with_capacity(ports.len());
        let mut ready = true;
        for port in ports {
            let base = format!("http://127.0.0.1:{port}");
            ready &= http
                .get(format!("{base}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            let metrics = match http.get(format!("{base}/metrics")).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            owned.push(
                metrics
                    .lines()
                    .find_map(|l| l.strip_prefix("pis_assigned_partitions "))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .unwrap_or(0.0) as i32,
            );
        }
        let balanced = owned.iter().all(|&n| n > 0) && owned.iter().sum::<i32>() == partitions;
        stable_checks = if ready && balanced {
            stable_checks + 1
        } else {
            0
        };
        if stable_checks >= 2 {
            return Ok(());
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            println!("bench: waiting for the replicas: ready {ready}, partitions owned {owned:?}");
        }
        if Instant::now() > deadline {
            bail!("the replicas never owned the {partitions} partitions between them: {owned:?}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn publish(
    producer: &rdkafka::producer::FutureProducer,
    settings: &KafkaSettings,
    ids: &[String],
    psus: usize,
    rate: u32,
    seen: &Arc<Mutex<HashMap<String, Seen>>>,
) -> anyhow::Result<()> {
    let mut sends = tokio::task::JoinSet::new();
    let started = tokio::time::Instant::now();
    for (i, id) in ids.iter().enumerate() {
        if rate > 0 {
            tokio::time::sleep_until(started + Duration::from_secs_f64(i as f64 / f64::from(rate)))
                .await;
        }
        let envelope = common::load::initiate(i, id, &format!("bench-psu-{}", i % psus.max(1)));
        let (producer, topic, seen) = (
            producer.clone(),
            settings.topics.commands.clone(),
            seen.clone(),
        );
        sends.spawn(async move {
            common::send(&producer, &topic, &envelope).await?;
            seen.lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(envelope.payment_id)
                .or_default()
                .published = Some(Instant::now());
            anyhow::Ok(())
        });
        // Bounded in flight, as a real client's producer would be.
        while sends.len() >= 500 {
            if let Some(done) = sends.join_next().await {
                done??;
            }
        }
    }
    while let Some(done) = sends.join_next().await {
        done??;
    }
    Ok(())
}

async fn wait_final(
    seen: &Arc<Mutex<HashMap<String, Seen>>>,
    ids: &[String],
    deadline: Instant,
    phase: &str,
) -> anyhow::Result<()> {
    let mut last_print = Instant::now();
    loop {
        let done = {
            let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            ids.iter()
                .filter(|id| seen.get(*id).is_some_and(|s| !s.finals.is_empty()))
                .count()
        };
        if done == ids.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{phase}: time is up with {done}/{} payments final",
                ids.len()
            );
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            println!("bench: {phase}: {done}/{} final", ids.len());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Bank API calls that reached the sandbox (payment endpoints and token grants), from its
/// admin counters.
async fn bank_calls(admin: &url::Url) -> Option<u64> {
    let url = admin.join("admin/counters").ok()?;
    let body: serde_json::Value = reqwest::get(url).await.ok()?.json().await.ok()?;
    let field = |name: &str| body.get(name).and_then(serde_json::Value::as_u64);
    let mut total = 0;
    for name in [
        "initiation_requests",
        "status_requests",
        "details_requests",
        "cancel_requests",
        "tokens_issued",
        "token_failures",
    ] {
        total += field(name)?;
    }
    Some(total)
}

/// CPU time (user + system) from /proc, per process group.
struct Cpu {
    workers: Duration,
    broker: Option<Duration>,
    harness: Duration,
}

impl Cpu {
    fn read(workers: &Workers, run_dir: &Path) -> anyhow::Result<Cpu> {
        let ticks = clock_ticks();
        let mut total = Duration::ZERO;
        for (_, child) in &workers.running {
            total += process_cpu(&child.id().to_string(), ticks)?;
        }
        let broker = std::fs::read_to_string(run_dir.join("broker.pid"))
            .ok()
            .and_then(|pid| process_cpu(pid.trim(), ticks).ok());
        Ok(Cpu {
            workers: total,
            broker,
            harness: process_cpu("self", ticks)?,
        })
    }
}

fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

fn process_cpu(pid: &str, ticks_per_sec: u64) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; fields after its closing parenthesis are
    // fixed: utime and stime are the 12th and 13th of them.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow::anyhow!("unexpected /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no field {i} in /proc/{pid}/stat"))
    };
    let ticks = field(11)? + field(12)?;
    Ok(Duration::from_secs_f64(ticks as f64 / ticks_per_sec as f64))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let at = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

fn print_report(args: &Args, results: &[ScenarioResult]) {
    let rate = match args.rate {
        0 => "published as fast as the producer goes".to_owned(),
        r => format!("published at {r}/s"),
    };
    println!(
        "\nbench: {} payments per scenario ({rate}) after {} warm-up, {} partitions, fast poll {} ms",
        args.payments, args.warmup, args.partitions, args.poll_fast_ms
    );
    if !args.kafka_properties.is_empty() {
        println!(
            "worker kafka properties: {}",
            args.kafka_properties.join(" ")
        );
    }
    println!("machine: {}", common::machine::describe());
    println!();
    println!(
        "| workers | publish/s | initiated/s | settled/s | SCA_PENDING p50 / p95 / p99 (ms) | worker CPU ms/payment | broker CPU ms/payment | sandbox+client CPU ms/payment | bank calls/payment |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let per = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1000.0 / r.payments as f64);
        let ms = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1000.0);
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {} / {} / {} | {} | {} | {} | {} |",
            r.workers,
            r.payments as f64 / r.publish.as_secs_f64(),
            r.initiated_per_sec(),
            r.settled_per_sec(),
            ms(percentile(&r.sca_latency, 0.5)),
            ms(percentile(&r.sca_latency, 0.95)),
            ms(percentile(&r.sca_latency, 0.99)),
            per(r.worker_cpu),
            r.broker_cpu.map_or("?".into(), per),
            per(r.harness_cpu),
            r.bank_calls.map_or("?".into(), |c| format!(
                "{:.1}",
                c as f64 / r.payments as f64
            )),
        );
    }
    if let Some(base) = results.first() {
        for r in &results[1..] {
            println!(
                "\n{} workers / {} worker(s): settled/s ratio {:.2}, worker CPU per payment ratio {:.2}",
                r.workers,
                base.workers,
                r.settled_per_sec() / base.settled_per_sec(),
                r.worker_cpu.as_secs_f64() / base.worker_cpu.as_secs_f64().max(f64::EPSILON)
            );
        }
    }
}
