//! Soak run: a steady stream of payments through real worker processes, a real broker and the
//! sandbox over mTLS, long enough for retention to act many times over (`make soak`: a million
//! payments at 1,000/s). The workers' RSS and payment gauges are sampled along the way, and
//! the workers are restarted every few minutes to measure restore time and records read, so
//! that both can be seen to stay flat once the retention horizons are reached.
//!
//! Every payment must end SETTLED exactly once, or the run fails. The checker keeps a few bytes
//! per payment (not the events), so this process's own memory stays flat too; the sandbox
//! forgets final payments after a while for the same reason (`--sandbox-forget-after-secs`).
//!
//! Writes `soak.csv` (one row per sample and per restart) under the run directory;
//! `scripts/plot_soak.py` draws it. `scripts/soak.sh` runs both.

// The chaos suite and the benchmark use the rest of the harness.
#[allow(dead_code)]
mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
#[command(about = "Soak run of pis-worker: RSS and restore time over a long steady load")]
struct Args {
    /// Payments to settle.
    #[arg(long, default_value_t = 1_000_000)]
    payments: usize,
    /// Commands published per second.
    #[arg(long, default_value_t = 1_000)]
    rate: u32,
    #[arg(long, default_value_t = 1)]
    workers: usize,
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    #[arg(long, default_value_t = 300)]
    psus: usize,
    /// The workers' PIS_RETENTION_SECS: a final payment becomes a compact retired record after
    /// this long.
    #[arg(long, default_value_t = 60)]
    retention_secs: u64,
    /// The workers' PIS_RETIRED_IDS_RETENTION_SECS: a retired id is forgotten after this long.
    #[arg(long, default_value_t = 180)]
    retired_ids_retention_secs: u64,
    /// Restart the workers (SIGTERM, then start again) this often, and measure the restore.
    /// 0: never.
    #[arg(long, default_value_t = 180)]
    restart_every_secs: u64,
    /// Restart no more than this many times (default: no limit).
    #[arg(long)]
    max_restarts: Option<usize>,
    /// Sample RSS and gauges this often.
    #[arg(long, default_value_t = 5)]
    sample_every_secs: u64,
    /// The sandbox forgets final payments this long after they ended, so that it does not hold
    /// a million payments (0: it keeps them all).
    #[arg(long, default_value_t = 120)]
    sandbox_forget_after_secs: u64,
    /// Keep sampling this long after the last payment settled (retention acting on an idle
    /// worker).
    #[arg(long, default_value_t = 0)]
    linger_secs: u64,
    /// Fail unless the workers retired payments during the run (retention seen acting).
    #[arg(long)]
    expect_retired: bool,
    /// How often a worker polls a payment waiting for SCA (its fast phase).
    #[arg(long, default_value_t = 200)]
    poll_fast_ms: u64,
    /// Use this broker instead of starting one.
    #[arg(long)]
    brokers: Option<String>,
    /// Give up after this long (default: twice the publishing time plus 10 minutes).
    #[arg(long)]
    timeout_secs: Option<u64>,
    #[arg(long, default_value = ".run/soak")]
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
            eprintln!("soak: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.payments == 0 || args.rate == 0 || args.workers == 0 {
        bail!("--payments, --rate and --workers must be positive");
    }
    if u32::try_from(args.payments).is_err() {
        bail!("--payments must fit in 32 bits");
    }
    let (run_dir, run_dir_str) = common::load::fresh_run_dir(&args.run_dir)?;
    let (brokers, own_broker) = common::load::broker_or_own(&args.brokers, &run_dir_str)?;
    let outcome = soak(&args, &brokers, &run_dir).await;
    if own_broker {
        let _ = common::broker(&["stop", &run_dir_str]);
    }
    outcome
}

/// What the client has seen of each payment, a few bytes each: the sequence of its first final
/// event (0: none yet) and whether it was SETTLED.
struct Checker {
    final_seq: Vec<u32>,
    settled: Vec<bool>,
    finals: usize,
    violations: usize,
    examples: Vec<String>,
}

impl Checker {
    fn new(payments: usize) -> Self {
        Self {
            final_seq: vec![0; payments],
            settled: vec![false; payments],
            finals: 0,
            violations: 0,
            examples: Vec::new(),
        }
    }

    fn violation(&mut self, what: String) {
        self.violations += 1;
        if self.examples.len() < 20 {
            self.examples.push(what);
        }
    }

    fn on_event(&mut self, record: &status::StatusRecord) {
        if !record.is_final {
            return;
        }
        let Some(i) = payment_index(&record.payment_id).filter(|&i| i < self.final_seq.len())
        else {
            return;
        };
        let Some(seq) = u32::try_from(record.sequence)
            .ok()
            .and_then(|s| s.checked_add(1))
        else {
            self.violation(format!(
                "{}: final event with sequence {}",
                record.payment_id, record.sequence
            ));
            return;
        };
        match self.final_seq[i] {
            0 => {
                self.final_seq[i] = seq;
                self.finals += 1;
                if record.state == StateKind::Settled {
                    self.settled[i] = true;
                } else {
                    self.violation(format!(
                        "{}: ended {}, expected SETTLED",
                        record.payment_id,
                        record.state.symbol()
                    ));
                }
            }
            // The same event read again (a reader's re-fetch): not a second final.
            first if first == seq => {}
            first => self.violation(format!(
                "{}: a second final event ({} at sequence {}) after the one at sequence {}",
                record.payment_id,
                record.state.symbol(),
                record.sequence,
                first - 1
            )),
        }
    }
}

const ID_PREFIX: &str = "soak-";

fn payment_id(i: usize) -> String {
    format!("{ID_PREFIX}{i:07}")
}

fn payment_index(id: &str) -> Option<usize> {
    id.strip_prefix(ID_PREFIX)?.parse().ok()
}

/// The states a payment ends in; the others are in flight.
const FINAL_SYMBOLS: [&str; 7] = [
    "SETTLED",
    "CANCELLED",
    "REJECTED",
    "EXPIRED",
    "FAILED",
    "PARTIALLY_SETTLED",
    "COMPLETED",
];

/// One row of soak.csv.
#[derive(Default)]
struct Row {
    event: &'static str,
    settled: usize,
    published: usize,
    worker_rss: Option<u64>,
    payments_in_memory: Option<f64>,
    in_flight: Option<f64>,
    retired_ids: Option<f64>,
    retired_total: Option<f64>,
    harness_rss: Option<u64>,
    restore: Option<Restore>,
}

const CSV_HEADER: &str = "elapsed_secs,event,settled,published,worker_rss_bytes,payments_in_memory,in_flight,retired_ids,retired_total,harness_rss_bytes,restore_secs,restore_secs_sum,restore_records,ready_secs,stop_secs";

/// What a (re)start of the workers cost.
#[derive(Debug, Clone, Default)]
struct Restore {
    /// The longest partition restore (partitions restore concurrently).
    max_secs: Option<f64>,
    /// All partition restores together (`pis_restore_duration_seconds_sum`).
    sum_secs: Option<f64>,
    /// State records the restores read.
    records: Option<u64>,
    /// From starting the processes to every partition owned and restored.
    ready_secs: f64,
    /// From SIGTERM to the processes' exit (0 for the first start).
    stop_secs: f64,
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn secs(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.3}")).unwrap_or_default()
}

struct Csv {
    out: std::io::BufWriter<std::fs::File>,
    started: Instant,
}

impl Csv {
    fn create(path: &Path, meta: &[(&str, String)], started: Instant) -> anyhow::Result<Self> {
        let file = std::fs::File::create(path).with_context(|| format!("{}", path.display()))?;
        let mut out = std::io::BufWriter::new(file);
        for (key, value) in meta {
            writeln!(out, "# {key}={value}")?;
        }
        writeln!(out, "{CSV_HEADER}")?;
        out.flush()?;
        Ok(Self { out, started })
    }

    fn write(&mut self, row: &Row) -> anyhow::Result<()> {
        let r = row.restore.clone().unwrap_or_default();
        let restored = row.restore.is_some();
        writeln!(
            self.out,
            "{:.1},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            self.started.elapsed().as_secs_f64(),
            row.event,
            row.settled,
            row.published,
            opt(row.worker_rss),
            opt(row.payments_in_memory),
            opt(row.in_flight),
            opt(row.retired_ids),
            opt(row.retired_total),
            opt(row.harness_rss),
            secs(r.max_secs),
            secs(r.sum_secs),
            opt(r.records),
            if restored {
                format!("{:.3}", r.ready_secs)
            } else {
                String::new()
            },
            if restored {
                format!("{:.3}", r.stop_secs)
            } else {
                String::new()
            },
        )?;
        self.out.flush()?;
        Ok(())
    }
}

/// The running workers and the HTTP port of each.
struct Fleet {
    workers: Workers,
    ports: Vec<u16>,
    partitions: i32,
    http: reqwest::Client,
    /// Payments retired by processes already stopped (their counters died with them).
    retired_before: f64,
    /// The current processes' retired counters at the last sample.
    retired_now: f64,
}

impl Fleet {
    /// Starts `n` workers, each with an HTTP port of its own, and waits until they own every
    /// partition, restored.
    async fn start(&mut self, n: usize, deadline: Instant) -> anyhow::Result<Restore> {
        let first_log = self.workers.started;
        let started = Instant::now();
        self.ports.clear();
        for _ in 0..n {
            let port = common::free_port()?;
            self.workers.env.retain(|(k, _)| k != "PIS_HTTP_ADDR");
            self.workers
                .env
                .push(("PIS_HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
            self.workers.start_one()?;
            self.ports.push(port);
        }
        self.wait_ready(deadline).await?;
        let ready_secs = started.elapsed().as_secs_f64();
        let mut restore = Restore {
            ready_secs,
            ..Restore::default()
        };
        // The worker logs one "partition read" line per restored partition, with the records
        // read and the time taken.
        for n in first_log..self.workers.started {
            let log = std::fs::read_to_string(self.workers.dir.join(format!("worker-{n}.log")))
                .unwrap_or_default();
            for line in log.lines().filter(|l| l.contains("partition read")) {
                let field = |name: &str| {
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix(name))
                        .and_then(|v| v.trim_matches('"').parse::<u64>().ok())
                };
                if let Some(records) = field("records=") {
                    *restore.records.get_or_insert(0) += records;
                }
                if let Some(millis) = field("millis=") {
                    let s = millis as f64 / 1000.0;
                    restore.max_secs = Some(restore.max_secs.map_or(s, |m: f64| m.max(s)));
                }
            }
        }
        for &port in &self.ports {
            let page = common::load::scrape(&self.http, port).await;
            if let Some(sum) = common::load::metric_sum(&page, "pis_restore_duration_seconds_sum") {
                *restore.sum_secs.get_or_insert(0.0) += sum;
            }
            if restore.max_secs.is_none() {
                restore.max_secs =
                    common::load::metric_sum(&page, "pis_restore_last_duration_seconds");
            }
            if restore.records.is_none() {
                restore.records =
                    common::load::metric_sum(&page, "pis_restore_last_records").map(|r| r as u64);
            }
        }
        self.retired_now = 0.0;
        Ok(restore)
    }

    /// SIGTERM to every worker, then wait for them to exit; returns how long that took.
    fn stop(&mut self) -> f64 {
        let started = Instant::now();
        self.retired_before += self.retired_now;
        self.retired_now = 0.0;
        self.workers.stop_all();
        self.ports.clear();
        started.elapsed().as_secs_f64()
    }

    /// Every worker answers /readyz, none is restoring, and together they own each partition
    /// once, twice in a row.
    async fn wait_ready(&self, deadline: Instant) -> anyhow::Result<()> {
        let mut stable = 0;
        let mut last_print = Instant::now();
        loop {
            let mut ready = true;
            let mut owned = 0.0;
            for &port in &self.ports {
                ready &= self
                    .http
                    .get(format!("http://127.0.0.1:{port}/readyz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                let page = common::load::scrape(&self.http, port).await;
                owned += common::load::metric_sum(&page, "pis_assigned_partitions").unwrap_or(0.0);
                ready &= common::load::metric_sum(&page, "pis_restores_in_progress") == Some(0.0);
            }
            stable = if ready && owned as i32 == self.partitions {
                stable + 1
            } else {
                0
            };
            if stable >= 2 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the workers never became ready: {owned} of {} partitions owned",
                    self.partitions
                );
            }
            if last_print.elapsed() >= Duration::from_secs(10) {
                last_print = Instant::now();
                println!("soak: waiting for the workers: ready {ready}, partitions owned {owned}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Whether a worker exited without being asked to.
    fn any_exited(&mut self) -> bool {
        self.workers
            .running
            .iter_mut()
            .any(|(_, child)| matches!(child.try_wait(), Ok(Some(_))))
    }

    async fn sample(&mut self, row: &mut Row) {
        let mut rss = None;
        for (_, child) in &self.workers.running {
            if let Some(r) = common::load::rss_bytes(&child.id().to_string()) {
                *rss.get_or_insert(0) += r;
            }
        }
        row.worker_rss = rss;
        let mut retired_now = None;
        for &port in &self.ports {
            let page = common::load::scrape(&self.http, port).await;
            let add = |total: &mut Option<f64>, v: Option<f64>| {
                if let Some(v) = v {
                    *total.get_or_insert(0.0) += v;
                }
            };
            add(
                &mut row.payments_in_memory,
                common::load::metric_sum(&page, "pis_payments"),
            );
            add(
                &mut row.in_flight,
                common::load::metric_sum_where(&page, "pis_payments", |labels| {
                    !FINAL_SYMBOLS
                        .iter()
                        .any(|s| labels.contains(&format!("\"{s}\"")))
                }),
            );
            add(
                &mut row.retired_ids,
                common::load::metric_sum(&page, "pis_retired_ids"),
            );
            add(
                &mut retired_now,
                common::load::metric_sum(&page, "pis_payments_retired_total"),
            );
        }
        if let Some(r) = retired_now {
            self.retired_now = r;
        }
        row.retired_total = Some(self.retired_before + self.retired_now);
    }
}

async fn soak(args: &Args, brokers: &str, run_dir: &Path) -> anyhow::Result<()> {
    let settings = common::harness_settings(brokers, "soak");
    pis_worker::kafka::admin::ensure_topics(&settings, args.partitions, 1).await?;

    // The PSU signs as soon as the bank created the payment; the worker learns it by polling.
    let mut config = SandboxConfig::local(run_dir.join("tls"));
    config.auto_sign_after = Some(Duration::ZERO);
    config.settle_after = Duration::ZERO;
    config.sca_expiry = Duration::from_secs(3600);
    config.forget_final_after = (args.sandbox_forget_after_secs > 0)
        .then(|| Duration::from_secs(args.sandbox_forget_after_secs));
    let sandbox = pis_worker::sandbox::start(config).await?;

    let state_key_hex = StateKey::generate_hex();
    let poll_fast = args.poll_fast_ms.to_string();
    let tuning = [
        ("--drain-timeout-ms", "3000"),
        ("--poll-fast-ms", poll_fast.as_str()),
        ("--poll-fast-count", "100"),
        ("--sca-timeout-secs", "900"),
    ];
    // Info from the partition owner only: its "partition read" line per restore carries the
    // records read. (Other info lines come once per payment: a million of them.)
    let mut env = common::worker_env(
        &sandbox,
        &state_key_hex,
        "warn,pis_worker::engine::partition=info",
    );
    env.push(("PIS_RETENTION_SECS".into(), args.retention_secs.to_string()));
    env.push((
        "PIS_RETIRED_IDS_RETENTION_SECS".into(),
        args.retired_ids_retention_secs.to_string(),
    ));
    let mut fleet = Fleet {
        workers: Workers::new(
            Workers::binary(args.worker_bin.as_ref())?,
            common::worker_args(&settings, &sandbox, &tuning),
            env,
            run_dir,
        ),
        ports: Vec::new(),
        partitions: args.partitions,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?,
        retired_before: 0.0,
        retired_now: 0.0,
    };

    let checker = Arc::new(Mutex::new(Checker::new(args.payments)));
    let stop = Arc::new(AtomicBool::new(false));
    let follower = {
        let checker = checker.clone();
        common::follow(
            &settings,
            &settings.topics.status,
            args.partitions,
            stop.clone(),
            move |m| {
                if let Ok(record) = status::decode(m.payload().unwrap_or_default()) {
                    checker
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .on_event(&record);
                }
            },
        )?
    };

    let outcome = drive(args, &settings, run_dir, &mut fleet, &checker).await;
    fleet.workers.stop_all();
    stop.store(true, Ordering::Relaxed);
    let _ = follower.join();
    sandbox.shutdown().await;
    outcome
}

async fn drive(
    args: &Args,
    settings: &KafkaSettings,
    run_dir: &Path,
    fleet: &mut Fleet,
    checker: &Arc<Mutex<Checker>>,
) -> anyhow::Result<()> {
    let publish_secs = args.payments as u64 / u64::from(args.rate);
    let timeout = Duration::from_secs(
        args.timeout_secs
            .unwrap_or(2 * publish_secs + 600 + args.linger_secs),
    );
    let started = Instant::now();
    let deadline = started + timeout;
    let horizon = args.retention_secs + args.retired_ids_retention_secs;
    let csv_path = run_dir.join("soak.csv");
    let mut csv = Csv::create(
        &csv_path,
        &[
            ("payments", args.payments.to_string()),
            ("rate", args.rate.to_string()),
            ("workers", args.workers.to_string()),
            ("partitions", args.partitions.to_string()),
            ("retention_secs", args.retention_secs.to_string()),
            (
                "retired_ids_retention_secs",
                args.retired_ids_retention_secs.to_string(),
            ),
            ("restart_every_secs", args.restart_every_secs.to_string()),
            (
                "sandbox_forget_after_secs",
                args.sandbox_forget_after_secs.to_string(),
            ),
            ("machine", common::machine::describe().replace(',', ";")),
            ("started", chrono::Utc::now().to_rfc3339()),
        ],
        started,
    )?;
    println!(
        "soak: {} payments at {}/s ({} s of publishing), {} worker(s), {} partitions, retention {} s / retired ids {} s, restart every {} s; samples in {}",
        args.payments,
        args.rate,
        publish_secs,
        args.workers,
        args.partitions,
        args.retention_secs,
        args.retired_ids_retention_secs,
        args.restart_every_secs,
        csv_path.display()
    );

    let restore = fleet.start(args.workers, deadline).await?;
    let counts = |c: &Arc<Mutex<Checker>>| {
        let c = c.lock().unwrap_or_else(|p| p.into_inner());
        (c.finals, c.settled.iter().filter(|s| **s).count())
    };
    csv.write(&Row {
        event: "start",
        restore: Some(restore),
        harness_rss: common::load::rss_bytes("self"),
        ..Row::default()
    })?;

    // Publishing runs on its own at the steady rate, restarts or not: commands wait in Kafka
    // while the workers restart, as they would in production.
    let published = Arc::new(AtomicUsize::new(0));
    let publisher = tokio::spawn(publish(
        common::command_producer(settings)?,
        settings.topics.commands.clone(),
        args.payments,
        args.psus,
        args.rate,
        published.clone(),
    ));

    let sample_every = Duration::from_secs(args.sample_every_secs.max(1));
    let restart_every = Duration::from_secs(args.restart_every_secs);
    let mut next_sample = Instant::now() + sample_every;
    let mut next_restart = Instant::now() + restart_every;
    let mut unasked_exits = 0;
    let mut restarts: Vec<(f64, usize, Restore)> = Vec::new();
    let mut samples: Vec<(f64, usize, u64)> = Vec::new();
    let mut all_final_at: Option<Instant> = None;
    loop {
        if publisher.is_finished() && published.load(Ordering::Relaxed) < args.payments {
            match publisher.await {
                Ok(Err(e)) => return Err(e.context("publishing")),
                Err(e) => bail!("the publisher died: {e}"),
                Ok(Ok(())) => bail!("the publisher stopped early"),
            }
        }
        let (finals, settled) = counts(checker);
        if finals >= args.payments && all_final_at.is_none() {
            all_final_at = Some(Instant::now());
            println!(
                "soak: all {} payments final after {:.0} s",
                args.payments,
                started.elapsed().as_secs_f64()
            );
        }
        if all_final_at.is_some_and(|at| at.elapsed() >= Duration::from_secs(args.linger_secs)) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "time is up ({} s) with {finals}/{} payments final",
                timeout.as_secs(),
                args.payments
            );
        }
        let exited = fleet.any_exited();
        let restart_due = args.restart_every_secs > 0
            && Instant::now() >= next_restart
            && all_final_at.is_none()
            && args.max_restarts.is_none_or(|max| restarts.len() < max);
        if exited || restart_due {
            if exited {
                unasked_exits += 1;
                println!("soak: a worker exited by itself; restarting the workers");
            }
            let stop_secs = fleet.stop();
            let mut restore = fleet.start(args.workers, deadline).await?;
            restore.stop_secs = stop_secs;
            let (_, settled) = counts(checker);
            let elapsed = started.elapsed().as_secs_f64();
            println!(
                "soak: {elapsed:.0} s: restart {}: stopped in {stop_secs:.1} s, ready in {:.1} s, {} records read, longest partition restore {} s",
                restarts.len() + 1,
                restore.ready_secs,
                opt(restore.records),
                secs(restore.max_secs),
            );
            let mut row = Row {
                event: "restart",
                settled,
                published: published.load(Ordering::Relaxed),
                harness_rss: common::load::rss_bytes("self"),
                restore: Some(restore.clone()),
                ..Row::default()
            };
            fleet.sample(&mut row).await;
            csv.write(&row)?;
            restarts.push((elapsed, settled, restore));
            next_restart = Instant::now() + restart_every;
            next_sample = Instant::now() + sample_every;
            continue;
        }
        if Instant::now() >= next_sample {
            next_sample += sample_every;
            let mut row = Row {
                event: "sample",
                settled,
                published: published.load(Ordering::Relaxed),
                harness_rss: common::load::rss_bytes("self"),
                ..Row::default()
            };
            fleet.sample(&mut row).await;
            csv.write(&row)?;
            let elapsed = started.elapsed().as_secs_f64();
            if let Some(rss) = row.worker_rss {
                samples.push((elapsed, settled, rss));
            }
            if samples.len() % 12 == 1 {
                println!(
                    "soak: {elapsed:.0} s: {settled} settled, {} published, worker RSS {} MB, {} payments in memory ({} in flight), {} retired ids",
                    row.published,
                    row.worker_rss
                        .map_or("?".into(), |r| format!("{:.0}", r as f64 / 1e6)),
                    opt(row.payments_in_memory),
                    opt(row.in_flight),
                    opt(row.retired_ids)
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut row = Row {
        event: "end",
        settled: counts(checker).1,
        published: published.load(Ordering::Relaxed),
        harness_rss: common::load::rss_bytes("self"),
        ..Row::default()
    };
    fleet.sample(&mut row).await;
    csv.write(&row)?;
    let retired_total = row.retired_total.unwrap_or(0.0);
    // A late second final event would come soon after the first: look once more.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let took = started.elapsed();
    let checker = checker.lock().unwrap_or_else(|p| p.into_inner());
    let settled = checker.settled.iter().filter(|s| **s).count();
    report(
        args,
        took,
        settled,
        &samples,
        &restarts,
        horizon,
        retired_total,
    );
    let mut failures = Vec::new();
    if checker.violations > 0 || settled != args.payments {
        for e in &checker.examples {
            println!("soak: WRONG {e}");
        }
        failures.push(format!(
            "{} of {} payments settled, {} violations",
            settled, args.payments, checker.violations
        ));
    }
    if unasked_exits > 0 {
        failures.push(format!(
            "{unasked_exits} worker exit(s) nobody asked for (see the worker logs in {})",
            run_dir.display()
        ));
    }
    if args.expect_retired && retired_total < 1.0 {
        failures.push("the workers retired no payment: retention was not seen acting".into());
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    println!(
        "soak: OK: every one of {} payments ended SETTLED exactly once; {} restarts; {:.0} payments retired; samples in {}",
        args.payments,
        restarts.len(),
        retired_total,
        run_dir.join("soak.csv").display()
    );
    Ok(())
}

async fn publish(
    producer: rdkafka::producer::FutureProducer,
    topic: String,
    payments: usize,
    psus: usize,
    rate: u32,
    published: Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    let mut sends = tokio::task::JoinSet::new();
    let started = tokio::time::Instant::now();
    for i in 0..payments {
        tokio::time::sleep_until(started + Duration::from_secs_f64(i as f64 / f64::from(rate)))
            .await;
        let envelope =
            common::load::initiate(i, &payment_id(i), &format!("soak-psu-{}", i % psus.max(1)));
        let (producer, topic, published) = (producer.clone(), topic.clone(), published.clone());
        sends.spawn(async move {
            common::send(&producer, &topic, &envelope).await?;
            published.fetch_add(1, Ordering::Relaxed);
            anyhow::Ok(())
        });
        // Bounded in flight, as a real client's producer would be.
        while sends.len() >= 500 {
            if let Some(done) = sends.join_next().await {
                done??;
            }
        }
        // Reap finished sends so the set does not hold them.
        while let Some(done) = sends.try_join_next() {
            done??;
        }
    }
    while let Some(done) = sends.join_next().await {
        done??;
    }
    Ok(())
}

fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[values.len() / 2])
}

fn report(
    args: &Args,
    took: Duration,
    settled: usize,
    samples: &[(f64, usize, u64)],
    restarts: &[(f64, usize, Restore)],
    horizon: u64,
    retired_total: f64,
) {
    println!();
    println!(
        "soak: {settled} of {} payments settled in {:.0} s ({:.0}/s), published at {}/s; machine: {}",
        args.payments,
        took.as_secs_f64(),
        settled as f64 / took.as_secs_f64(),
        args.rate,
        common::machine::describe()
    );
    println!(
        "soak: horizons: retention {} s + retired ids {} s = {horizon} s; {retired_total:.0} payments retired",
        args.retention_secs, args.retired_ids_retention_secs
    );
    // Once both horizons have passed, memory should follow live payments only: compare the
    // first and the last quarter of the samples after the horizon.
    let after: Vec<&(f64, usize, u64)> = samples
        .iter()
        .filter(|(t, _, _)| *t >= horizon as f64)
        .collect();
    if after.len() >= 8 {
        let quarter = after.len() / 4;
        let mb = |part: &[&(f64, usize, u64)]| {
            median(&mut part.iter().map(|s| s.2 as f64 / 1e6).collect::<Vec<_>>())
        };
        let (first, last) = (&after[..quarter], &after[after.len() - quarter..]);
        println!(
            "soak: worker RSS after the horizon: median {} MB in the first quarter ({:.0}-{:.0} s, {}-{} settled), {} MB in the last ({:.0}-{:.0} s, {}-{} settled); max {:.0} MB",
            secs(mb(first)),
            first[0].0,
            first[quarter - 1].0,
            first[0].1,
            first[quarter - 1].1,
            secs(mb(last)),
            last[0].0,
            last[quarter - 1].0,
            last[0].1,
            last[quarter - 1].1,
            after.iter().map(|s| s.2).max().unwrap_or(0) as f64 / 1e6
        );
    } else {
        println!(
            "soak: too few samples after the horizon ({}) to say whether RSS is flat",
            after.len()
        );
    }
    if !restarts.is_empty() {
        println!();
        println!(
            "| restart at (s) | settled by then | records read | longest partition restore (s) | all restores (s) | ready after start (s) | stop (s) |"
        );
        println!("|---|---|---|---|---|---|---|");
        for (t, settled, r) in restarts {
            println!(
                "| {t:.0} | {settled} | {} | {} | {} | {:.2} | {:.2} |",
                opt(r.records),
                secs(r.max_secs),
                secs(r.sum_secs),
                r.ready_secs,
                r.stop_secs
            );
        }
    }
}
