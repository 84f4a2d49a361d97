//! The chaos suite: N payments with scripted PSU outcomes through several worker replicas that
//! are SIGKILLed and replaced, against a sandbox injecting 5xx / 429 / lost responses, and a
//! broker that is restarted (with persistent storage). At the end it checks, from the status
//! topic, the state topic and the bank's own records, that nothing was lost, doubled or
//! contradicted. Prints a summary; exits 1 on any violation.
//!
//! With `--fallback-after-secs` the workers switch to the bank's fallback interface while the
//! dedicated API is down (`--dedicated-outage-every-secs` takes it down now and then).
//!
//! With `--consents` half of the PSUs give CAF and AIS consents before the load, payments name
//! their debtor account and some ask for a funds check, and the checker also checks consents,
//! refusals for funds and settlement evidence (`chaos/consents.rs`).
//!
//! `make chaos` (full) and `make chaos-ci` (reduced, part of `make test`).

mod common;
#[path = "chaos/consents.rs"]
mod consents;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use common::{Workers, broker, follow, free_port, read_again, send};
use pis_worker::contract::command::{
    CommandBody, CommandEnvelope, ResolveAction, ResolveOutcome, ScaRedirect,
};
use pis_worker::contract::consent_status::{self, ConsentStatusRecord};
use pis_worker::contract::status::{self, StatusRecord};
use pis_worker::domain::machine::StateKind;
use pis_worker::domain::model::RawInitiatePayment;
use pis_worker::kafka::KafkaSettings;
use pis_worker::kafka::state::consent::ConsentRecord;
use pis_worker::kafka::state::{self as state_topic, DecodedRecord};
use pis_worker::sandbox::faults::{EndpointClass, Fault, FaultRule, FaultSettings, Latency};
use pis_worker::sandbox::{RunningSandbox, SandboxConfig};
use pis_worker::secret::{StateKey, StateKeyRing};
use rdkafka::Message;
use rdkafka::producer::FutureProducer;
use secrecy::SecretString;

#[derive(Debug, Parser)]
#[command(about = "Chaos suite for pis-worker")]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    payments: usize,
    #[arg(long, default_value_t = 500)]
    psus: usize,
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// SIGKILL a random worker (and start a replacement) this often; 0 = never.
    #[arg(long, default_value_t = 20)]
    kill_every_secs: u64,
    /// Restart the broker this often (needs --persistent); 0 = never.
    #[arg(long, default_value_t = 0)]
    broker_restart_every_secs: u64,
    /// Start the broker with persistent storage (scripts/broker.sh ... persistent).
    #[arg(long)]
    persistent: bool,
    /// Inject bank faults (5xx, 429, lost responses, latency).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    faults: bool,
    /// Use this broker instead of starting one.
    #[arg(long)]
    brokers: Option<String>,
    /// Give up after this long.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    #[arg(long, default_value = ".run/chaos")]
    run_dir: PathBuf,
    /// The worker binary (default: pis-worker next to this one).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// The bank lets PSUs see and sign orphans (bank payments whose initiation answer was
    /// lost), and PSUs of bank-signed scripts sign in the bank's app everything pending for
    /// their payment (the simulator's AUTO-SIGN), orphans included.
    #[arg(long)]
    orphans_signable: bool,
    /// The workers' policy for lost initiation answers (PIS_UNKNOWN_OUTCOME): hold (a person
    /// resolves; played here by the checker, see `person`) or reinitiate.
    #[arg(long, default_value = "hold", value_parser = ["hold", "reinitiate"])]
    unknown_outcome: String,
    /// When the simulated bank rejects a payment nobody signed (the workers' SCA deadline is
    /// 30 s: the worker must wait for the bank's word past it).
    #[arg(long, default_value_t = 120)]
    bank_sca_expiry_secs: u64,
    /// Turn the workers' fallback interface on (PIS_FALLBACK_ENABLED, the sandbox's fallback
    /// endpoints): a brand switches to it once its dedicated circuit has not closed for this
    /// long, and back once it has been closed as long.
    #[arg(long)]
    fallback_after_secs: Option<u64>,
    /// Take the sandbox's dedicated API down (503 on every request; the fallback keeps
    /// answering) this often, the first time 5 s in; 0 = never.
    #[arg(long, default_value_t = 0)]
    dedicated_outage_every_secs: u64,
    /// How long each outage of the dedicated API lasts.
    #[arg(long, default_value_t = 10)]
    dedicated_outage_secs: u64,
    /// Before the load, half of the PSUs ask for CAF and AIS consents and grant them at the
    /// sandbox (some refuse, some ask twice), and some debtor accounts get a low balance;
    /// payments name their debtor account, some with a funds check (`chaos/consents.rs`).
    #[arg(long)]
    consents: bool,
    /// With `--consents`: SIGKILL a worker as the first consent event is seen, while consent
    /// calls (consent URIs, code exchanges) are in flight. The other kills wait for the load.
    #[arg(long)]
    kill_during_consents: bool,
    /// With `--consents`: start the load after this long even if some consents are not
    /// settled yet.
    #[arg(long, default_value_t = 60)]
    consent_phase_max_secs: u64,
}

/// What the scripted PSU does with a payment, and so which final state it must reach. The PSU
/// opens the SCA URL the worker published (with its OAuth state). With `--orphans-signable`,
/// the PSU of a bank-signed script signs in the bank's app every payment pending for it,
/// orphans of unanswered attempts included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Script {
    /// The PSU signs at the bank; the worker finds out by polling.
    SignAtBank,
    /// The PSU refuses at the bank.
    RejectAtBank,
    /// The PSU signs through the redirect; the client sends CompleteSca with the code.
    SignThroughRedirect,
    /// Nobody signs: the payment must expire.
    Abandon,
    /// Invalid input: rejected at the edge, never reaches the bank.
    Invalid,
}

impl Script {
    fn of(i: usize) -> Script {
        if i % 100 == 99 {
            return Script::Invalid;
        }
        match i % 10 {
            0..=5 => Script::SignAtBank,
            6 | 7 => Script::RejectAtBank,
            8 => Script::SignThroughRedirect,
            _ => Script::Abandon,
        }
    }

    fn expected(self) -> StateKind {
        match self {
            Script::SignAtBank | Script::SignThroughRedirect => StateKind::Settled,
            Script::RejectAtBank | Script::Invalid => StateKind::Rejected,
            Script::Abandon => StateKind::Expired,
        }
    }
}

fn payment_id(i: usize) -> String {
    format!("c{i:06}")
}

fn psu_name(k: usize) -> String {
    format!("chaos-psu-{k}")
}

/// The number of payment `i`'s PSU. Half of the abandoned payments belong to a PSU who also
/// signs through the redirect (and so has a PIS token): the worker can cancel those at the SCA
/// deadline; the others wait for the bank's own expiry.
fn psu_index_for(i: usize, psus: usize) -> usize {
    let psus = psus.max(1);
    if Script::of(i) == Script::Abandon && (i / 10) % 2 == 0 {
        (i - 1) % psus
    } else {
        i % psus
    }
}

fn psu_for(i: usize, psus: usize) -> String {
    psu_name(psu_index_for(i, psus))
}

fn initiate_command(
    i: usize,
    psus: usize,
    orphans_signable: bool,
    with_consents: bool,
) -> CommandEnvelope {
    let script = Script::of(i);
    // The simulator's in-bank signing: the bank signs every payment of this scenario a moment
    // after it is created, as a PSU signing everything pending in the bank's app.
    let creditor = if orphans_signable && script == Script::SignAtBank {
        "AUTO-SIGN Shop"
    } else {
        "Shop"
    };
    CommandEnvelope {
        command_id: format!("cmd-{i}"),
        payment_id: payment_id(i),
        psu_id: psu_for(i, psus),
        issued_at: chrono::Utc::now().timestamp_millis(),
        body: CommandBody::Initiate(Box::new(RawInitiatePayment {
            payment_product: "SEPA_CREDIT_TRANSFERS".into(),
            brand: "BELFIUS".into(),
            amount: if script == Script::Invalid {
                "0".into()
            } else {
                format!("{}.{:02}", 1 + i % 500, i % 100)
            },
            currency: "EUR".into(),
            creditor_name: creditor.into(),
            creditor_iban: "BE68539007547034".into(),
            end_to_end_id: payment_id(i),
            language: if i % 2 == 0 { "fr".into() } else { "nl".into() },
            redirect_uri: "https://client.example/callback".into(),
            debtor_iban: (with_consents && consents::names_debtor(i))
                .then(|| consents::debtor_iban(psu_index_for(i, psus))),
            funds_check: with_consents && consents::asks_funds_check(i),
            ..RawInitiatePayment::default()
        })),
    }
}

/// The scripted PSU opens the SCA URL the worker published and acts; for a redirect-driven
/// payment the client then hands the redirect (code and state) back.
async fn psu_acts(
    admin: &url::Url,
    producer: &FutureProducer,
    topic: &str,
    i: usize,
    sca_url: &str,
    psus: usize,
    orphans_signable: bool,
) -> anyhow::Result<()> {
    let action = match Script::of(i) {
        // The bank signs these by itself (in-bank signing).
        Script::SignAtBank if orphans_signable => return Ok(()),
        Script::SignAtBank | Script::SignThroughRedirect => "sign",
        Script::RejectAtBank => "reject",
        Script::Abandon | Script::Invalid => return Ok(()),
    };
    let mut url = admin.join(&format!("admin/sca/{action}"))?;
    url.query_pairs_mut()
        .append_pair("url", sca_url)
        .append_pair("psu", &psu_for(i, psus));
    let response = reqwest::Client::new().post(url).send().await?;
    if !response.status().is_success() {
        bail!("PSU {action} at {sca_url}: HTTP {}", response.status());
    }
    if Script::of(i) != Script::SignThroughRedirect {
        return Ok(());
    }
    let body: serde_json::Value = response.json().await?;
    let redirect = body["redirect_url"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no redirect_url in {body}"))?;
    let envelope = CommandEnvelope {
        command_id: format!("sca-{i}"),
        payment_id: payment_id(i),
        psu_id: psu_for(i, psus),
        issued_at: chrono::Utc::now().timestamp_millis(),
        body: CommandBody::CompleteSca(ScaRedirect::from_redirect_url(&url::Url::parse(redirect)?)),
    };
    send(producer, topic, &envelope).await
}

/// The bank's payments per end-to-end id, oldest first: `(bank id, status)`.
async fn bank_payments_by_e2e(
    admin: &url::Url,
) -> anyhow::Result<HashMap<String, Vec<(String, String)>>> {
    let payments: serde_json::Value = reqwest::get(admin.join("admin/payments")?)
        .await?
        .json()
        .await?;
    let mut out: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for p in payments.as_array().into_iter().flatten() {
        out.entry(
            p["endtoend_identification"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
        .or_default()
        .push((
            p["payment_id"].as_str().unwrap_or_default().to_owned(),
            p["transaction_status"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ));
    }
    Ok(out)
}

/// The person on duty for payments held at OUTCOME_UNKNOWN (docs/runbooks.md): looks the
/// attempt up at the bank by its end-to-end id; if the bank holds a payment for it, ADOPT it
/// (the worker then follows it: signed, settled or expired), else REINITIATE.
async fn person(
    admin: &url::Url,
    producer: &FutureProducer,
    topic: &str,
    held: &[(usize, i64)],
    psus: usize,
) -> anyhow::Result<(usize, usize)> {
    let bank = bank_payments_by_e2e(admin).await?;
    let (mut adopted, mut reinitiated) = (0, 0);
    for &(i, sequence) in held {
        let found = bank.get(&payment_id(i)).and_then(|ps| ps.last());
        let resolve = match found {
            Some((bank_id, _)) => {
                adopted += 1;
                ResolveOutcome {
                    action: ResolveAction::Adopt,
                    bank_payment_id: Some(bank_id.clone()),
                    note: Some("found at the bank by end-to-end id".into()),
                }
            }
            None => {
                reinitiated += 1;
                ResolveOutcome {
                    action: ResolveAction::Reinitiate,
                    bank_payment_id: None,
                    note: Some("not at the bank".into()),
                }
            }
        };
        let envelope = CommandEnvelope {
            command_id: format!("resolve-{i}-{sequence}"),
            payment_id: payment_id(i),
            psu_id: psu_for(i, psus),
            issued_at: chrono::Utc::now().timestamp_millis(),
            body: CommandBody::Resolve(resolve),
        };
        send(producer, topic, &envelope).await?;
    }
    Ok((adopted, reinitiated))
}

/// Publishes the run's initiations, 200 in flight at a time.
fn start_load(
    producer: FutureProducer,
    topic: String,
    args: &Args,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let (n, psus, orphans_signable, with_consents) = (
        args.payments,
        args.psus,
        args.orphans_signable,
        args.consents,
    );
    tokio::spawn(async move {
        let mut sends = Vec::new();
        for i in 0..n {
            let (producer, topic) = (producer.clone(), topic.clone());
            sends.push(tokio::spawn(async move {
                send(
                    &producer,
                    &topic,
                    &initiate_command(i, psus, orphans_signable, with_consents),
                )
                .await
            }));
            if sends.len() >= 200 {
                for s in sends.drain(..) {
                    s.await??;
                }
            }
        }
        for s in sends {
            s.await??;
        }
        anyhow::Ok(())
    })
}

/// The dedicated API answers 503 to everything (the fallback is not behind the fault layer).
fn dedicated_down() -> FaultRule {
    FaultRule {
        endpoint: EndpointClass::Any,
        probability: 1.0,
        fault: Fault::Status {
            status: 503,
            retry_after_secs: None,
        },
        remaining: None,
    }
}

fn faults() -> FaultSettings {
    let rule = |endpoint, probability, fault| FaultRule {
        endpoint,
        probability,
        fault,
        remaining: None,
    };
    FaultSettings {
        latency: Latency {
            fixed_ms: 2,
            jitter_ms: 10,
            p99_spike_ms: 300,
        },
        rules: vec![
            rule(
                EndpointClass::Initiate,
                0.02,
                Fault::Status {
                    status: 503,
                    retry_after_secs: None,
                },
            ),
            rule(
                EndpointClass::Initiate,
                0.02,
                Fault::Status {
                    status: 429,
                    retry_after_secs: Some(1),
                },
            ),
            // Longer than the worker's request timeout: the worker sees no answer.
            rule(
                EndpointClass::Initiate,
                0.02,
                Fault::ResponseLost { hang_ms: 2_500 },
            ),
            rule(EndpointClass::Initiate, 0.01, Fault::Reset),
            rule(
                EndpointClass::Status,
                0.03,
                Fault::Status {
                    status: 502,
                    retry_after_secs: None,
                },
            ),
            rule(
                EndpointClass::Token,
                0.02,
                Fault::Status {
                    status: 503,
                    retry_after_secs: None,
                },
            ),
        ],
    }
}

struct Report {
    violations: Vec<String>,
    rows: Vec<(String, String)>,
}

impl Report {
    fn row(&mut self, name: &str, value: impl std::fmt::Display) {
        self.rows.push((name.to_owned(), value.to_string()));
    }
    fn violation(&mut self, what: String) {
        if self.violations.len() < 50 {
            println!("VIOLATION: {what}");
        }
        self.violations.push(what);
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("chaos: error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let started = Instant::now();
    if args.broker_restart_every_secs > 0 && !args.persistent {
        bail!("--broker-restart-every-secs needs --persistent (memory storage loses everything)");
    }
    let _ = std::fs::remove_dir_all(&args.run_dir);
    std::fs::create_dir_all(&args.run_dir)?;
    let run_dir = std::fs::canonicalize(&args.run_dir)?;
    let run_dir_str = run_dir.to_string_lossy().into_owned();

    // The broker.
    let (brokers, own_broker_port) = match &args.brokers {
        Some(b) => (b.clone(), None),
        None => {
            let port = free_port()?;
            let port_s = port.to_string();
            let mut a = vec!["start", port_s.as_str(), run_dir_str.as_str()];
            if args.persistent {
                a.push("persistent");
            }
            broker(&a)?;
            (format!("127.0.0.1:{port}"), Some(port))
        }
    };
    let outcome = chaos(&args, &run_dir, &brokers, own_broker_port, started).await;
    if own_broker_port.is_some() {
        let _ = broker(&["stop", run_dir_str.as_str()]);
    }
    outcome
}

async fn chaos(
    args: &Args,
    run_dir: &Path,
    brokers: &str,
    own_broker_port: Option<u16>,
    started: Instant,
) -> anyhow::Result<bool> {
    let settings = common::harness_settings(brokers, "chaos");
    pis_worker::kafka::admin::ensure_topics(&settings, args.partitions, 1).await?;

    let mut config = SandboxConfig::local(run_dir.join("tls"));
    config.settle_after = Duration::from_millis(500);
    // Longer than the workers' 30 s SCA deadline: the worker has to wait for the bank's word
    // (a cancellation when it holds the PSU's token, else this expiry) before EXPIRED.
    config.sca_expiry = Duration::from_secs(args.bank_sca_expiry_secs.max(31));
    config.orphans_signable = args.orphans_signable;
    let sandbox: RunningSandbox = pis_worker::sandbox::start(config).await?;
    if args.faults {
        sandbox.faults().set(faults());
    }
    let admin = sandbox.admin_base_url();
    let requests = if args.consents {
        consents::open_accounts(&admin, args.psus).await?;
        consents::requests(args.psus)
    } else {
        Vec::new()
    };
    let state_key_hex: SecretString = StateKey::generate_hex();
    let state_key = Arc::new(StateKeyRing::single(
        StateKey::from_hex(&state_key_hex).map_err(|e| anyhow::anyhow!("{e}"))?,
    ));

    let mut base_args = common::worker_args(
        &settings,
        &sandbox,
        &[
            ("--drain-timeout-ms", "3000"),
            ("--bank-request-timeout-ms", "1500"),
            ("--poll-fast-ms", "500"),
            ("--poll-fast-count", "30"),
            ("--poll-slow-ms", "2000"),
            ("--sca-timeout-secs", "30"),
            ("--max-initiation-attempts", "4"),
            ("--unknown-outcome", args.unknown_outcome.as_str()),
            ("--expiry-horizon-secs", "600"),
        ],
    );
    if let Some(after) = args.fallback_after_secs {
        let endpoints = sandbox.fallback_endpoints();
        let after = after.to_string();
        for (flag, value) in [
            ("--fallback-enabled", None),
            ("--fallback-after-secs", Some(after.as_str())),
            ("--fallback-back-after-secs", Some(after.as_str())),
            (
                "--fallback-belfius-url",
                Some(endpoints.belfius_base_url.as_str()),
            ),
            (
                "--fallback-banx-url",
                Some(endpoints.banx_base_url.as_str()),
            ),
            (
                "--fallback-session-path",
                Some(endpoints.session_path.as_str()),
            ),
            (
                "--fallback-payments-path",
                Some(endpoints.payments_path.as_str()),
            ),
            ("--fallback-key-id", Some(endpoints.key_id.as_str())),
        ] {
            base_args.push(flag.to_owned());
            base_args.extend(value.map(str::to_owned));
        }
    }
    let mut workers = Workers::new(
        Workers::binary(args.worker_bin.as_ref())?,
        base_args,
        {
            let mut env = common::worker_env(&sandbox, &state_key_hex, "info,rdkafka=warn");
            env.push(("PIS_HTTP_ADDR".into(), "127.0.0.1:0".into()));
            env
        },
        run_dir,
    );
    for _ in 0..args.workers {
        workers.start_one()?;
    }

    // Status events, as a client sees them; SCA_PENDING of redirect-driven payments triggers
    // the scripted PSU.
    let stop = Arc::new(AtomicBool::new(false));
    let events: Arc<Mutex<Vec<StatusRecord>>> = Arc::new(Mutex::new(Vec::new()));
    let undecodable = Arc::new(AtomicUsize::new(0));
    let (pending_tx, mut pending_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, String)>();
    let orphans_signable = args.orphans_signable;
    let follower = {
        let events = events.clone();
        let undecodable = undecodable.clone();
        let mut asked: HashSet<String> = HashSet::new();
        follow(
            &settings,
            &settings.topics.status,
            args.partitions,
            stop.clone(),
            move |m| match status::decode(m.payload().unwrap_or_default()) {
                Ok(record) => {
                    if record.state == StateKind::ScaPending
                        && asked.insert(record.payment_id.clone())
                    {
                        let index = record
                            .payment_id
                            .strip_prefix('c')
                            .and_then(|n| n.parse::<usize>().ok());
                        // An adopted payment has no SCA URL: its PSU cannot be sent anywhere.
                        if let (Some(i), Some(sca_url)) = (index, record.sca_redirect_url.clone()) {
                            let _ = pending_tx.send((i, sca_url));
                        }
                    }
                    events
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(record);
                }
                Err(_) => {
                    undecodable.fetch_add(1, Ordering::Relaxed);
                }
            },
        )?
    };
    // Consent status events; PENDING sends the scripted PSU to the consent page.
    let consent_events: Arc<Mutex<Vec<ConsentStatusRecord>>> = Arc::new(Mutex::new(Vec::new()));
    let (consent_tx, mut consent_rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let consent_follower = if args.consents {
        let consent_events = consent_events.clone();
        let undecodable = undecodable.clone();
        let mut asked: HashSet<String> = HashSet::new();
        Some(follow(
            &settings,
            &settings.topics.consent_status,
            args.partitions,
            stop.clone(),
            move |m| match consent_status::decode(m.payload().unwrap_or_default()) {
                Ok(record) => {
                    if let (pis_worker::domain::consent::ConsentState::Pending, Some(uri)) =
                        (record.state, record.consent_uri.clone())
                    {
                        if asked.insert(record.consent_id.clone()) {
                            let _ = consent_tx.send((record.consent_id.clone(), uri));
                        }
                    }
                    consent_events
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(record);
                }
                Err(_) => {
                    undecodable.fetch_add(1, Ordering::Relaxed);
                }
            },
        )?)
    } else {
        None
    };
    let producer = common::command_producer(&settings)?;
    let redirect_failures = Arc::new(AtomicUsize::new(0));
    let consent_driver = {
        let producer = producer.clone();
        let topic = settings.topics.commands.clone();
        let admin = admin.clone();
        let failures = redirect_failures.clone();
        let by_id: Arc<HashMap<String, consents::Request>> = Arc::new(
            requests
                .iter()
                .map(|r| (r.consent_id.clone(), r.clone()))
                .collect(),
        );
        tokio::spawn(async move {
            while let Some((consent_id, uri)) = consent_rx.recv().await {
                let Some(request) = by_id.get(&consent_id).cloned() else {
                    continue;
                };
                let (producer, topic, admin, failures) = (
                    producer.clone(),
                    topic.clone(),
                    admin.clone(),
                    failures.clone(),
                );
                tokio::spawn(async move {
                    for attempt in 0..5 {
                        match consents::psu_acts(&admin, &producer, &topic, &request, &uri).await {
                            Ok(()) => return,
                            Err(e) if attempt == 4 => {
                                println!(
                                    "chaos: the PSU could not act on consent {consent_id}: {e}"
                                );
                                failures.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                        }
                    }
                });
            }
        })
    };
    let psu_driver = {
        let producer = producer.clone();
        let topic = settings.topics.commands.clone();
        let admin = admin.clone();
        let psus = args.psus;
        let failures = redirect_failures.clone();
        tokio::spawn(async move {
            while let Some((i, sca_url)) = pending_rx.recv().await {
                let (producer, topic, admin, failures) = (
                    producer.clone(),
                    topic.clone(),
                    admin.clone(),
                    failures.clone(),
                );
                tokio::spawn(async move {
                    for attempt in 0..5 {
                        match psu_acts(
                            &admin,
                            &producer,
                            &topic,
                            i,
                            &sca_url,
                            psus,
                            orphans_signable,
                        )
                        .await
                        {
                            Ok(()) => return,
                            Err(e) if attempt == 4 => {
                                println!("chaos: the PSU could not act on {}: {e}", payment_id(i));
                                failures.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                        }
                    }
                });
            }
        })
    };

    // Load.
    println!(
        "chaos: {} payments, {} PSUs, {} partitions, {} workers, kill every {}s, broker restart every {}s, faults {}",
        args.payments,
        args.psus,
        args.partitions,
        args.workers,
        args.kill_every_secs,
        args.broker_restart_every_secs,
        if args.faults { "on" } else { "off" }
    );
    for request in &requests {
        send(
            &producer,
            &settings.topics.commands,
            &consents::request_command(request),
        )
        .await?;
    }
    if args.consents {
        println!(
            "chaos: {} consent requests published; the load waits for them",
            requests.len()
        );
    }
    // Chaos and progress until every payment is final (or the time is up).
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut next_kill = Instant::now() + Duration::from_secs(args.kill_every_secs.max(1));
    let mut next_broker_restart =
        Instant::now() + Duration::from_secs(args.broker_restart_every_secs.max(1));
    let mut broker_restarts = 0usize;
    let mut last_print = Instant::now();
    let consent_phase = Instant::now();
    let mut times = consents::Times::default();
    let mut load = None;
    let mut load_started = false;
    let mut consent_kill_due = args.consents && args.kill_during_consents;
    // The person on duty: payments held at OUTCOME_UNKNOWN, by (index, sequence of the event),
    // first seen when; resolved ones are not looked at again.
    let mut held_since: HashMap<(usize, i64), Instant> = HashMap::new();
    let mut resolved: HashSet<(usize, i64)> = HashSet::new();
    let (mut adopted, mut reinitiated) = (0usize, 0usize);
    let mut next_person = Instant::now();
    // The first outage comes while the initiations are still going out.
    let mut next_outage =
        Instant::now() + Duration::from_secs(args.dedicated_outage_every_secs.clamp(1, 5));
    let mut outage_until: Option<Instant> = None;
    let mut outage_from = 0i64;
    let mut outages = 0usize;
    loop {
        if !load_started {
            let settled = consents::settled(
                &requests,
                &consent_events.lock().unwrap_or_else(|p| p.into_inner()),
            );
            let waited = consent_phase.elapsed();
            if settled >= requests.len()
                || waited >= Duration::from_secs(args.consent_phase_max_secs)
            {
                if args.consents {
                    println!(
                        "chaos: {settled} of {} consents settled after {:.1} s; the load begins",
                        requests.len(),
                        waited.as_secs_f64()
                    );
                }
                load_started = true;
                times.load_started = chrono::Utc::now().timestamp_millis();
                load = Some(start_load(
                    producer.clone(),
                    settings.topics.commands.clone(),
                    args,
                ));
                // The first outage comes while the initiations are still going out.
                next_outage = Instant::now()
                    + Duration::from_secs(args.dedicated_outage_every_secs.clamp(1, 5));
                // The kills' clock starts with the load, as without consents.
                next_kill = Instant::now() + Duration::from_secs(args.kill_every_secs.max(1));
            }
        }
        if load_started {
            tokio::time::sleep(Duration::from_millis(500)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let seen = consent_events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len();
            if consent_kill_due && seen > 0 {
                consent_kill_due = false;
                println!("chaos: {seen} consent events seen: SIGKILL during the consent phase");
                workers.kill_random()?;
            }
        }
        if !load_started {
            // Kills go on while the consents are given; outages wait for the load.
        } else if let Some(until) = outage_until {
            if Instant::now() >= until {
                outage_until = None;
                times
                    .outages
                    .push((outage_from, chrono::Utc::now().timestamp_millis()));
                next_outage =
                    Instant::now() + Duration::from_secs(args.dedicated_outage_every_secs);
                sandbox.faults().set(if args.faults {
                    faults()
                } else {
                    FaultSettings::default()
                });
                println!("chaos: the dedicated API is back");
            }
        } else if args.dedicated_outage_every_secs > 0 && Instant::now() >= next_outage {
            outage_until = Some(Instant::now() + Duration::from_secs(args.dedicated_outage_secs));
            outage_from = chrono::Utc::now().timestamp_millis();
            outages += 1;
            let mut down = if args.faults {
                faults()
            } else {
                FaultSettings::default()
            };
            down.rules.insert(0, dedicated_down());
            sandbox.faults().set(down);
            println!(
                "chaos: the dedicated API is down for {} s",
                args.dedicated_outage_secs
            );
        }
        // Under the reinitiate policy nobody waits for a person: the workers act alone.
        if args.unknown_outcome == "hold" && Instant::now() >= next_person {
            next_person = Instant::now() + Duration::from_secs(2);
            let latest: HashMap<String, StatusRecord> = {
                let events = events.lock().unwrap_or_else(|p| p.into_inner());
                let mut latest: HashMap<String, StatusRecord> = HashMap::new();
                for e in events.iter() {
                    if latest
                        .get(&e.payment_id)
                        .is_none_or(|l| l.sequence < e.sequence)
                    {
                        latest.insert(e.payment_id.clone(), e.clone());
                    }
                }
                latest
            };
            let now = Instant::now();
            let mut due = Vec::new();
            for e in latest.values() {
                let held = e.state == StateKind::OutcomeUnknown
                    && e.reason_code.as_deref() == Some("OUTCOME_UNRESOLVED");
                let index = e
                    .payment_id
                    .strip_prefix('c')
                    .and_then(|n| n.parse::<usize>().ok());
                if let (true, Some(i)) = (held, index) {
                    let key = (i, e.sequence);
                    let since = *held_since.entry(key).or_insert(now);
                    // Give a moment, as a person would not act on a page in its first second.
                    if !resolved.contains(&key)
                        && now.duration_since(since) >= Duration::from_secs(2)
                    {
                        due.push(key);
                    }
                }
            }
            if !due.is_empty() {
                match person(
                    &admin,
                    &producer,
                    &settings.topics.commands,
                    &due,
                    args.psus,
                )
                .await
                {
                    Ok((a, r)) => {
                        adopted += a;
                        reinitiated += r;
                        resolved.extend(due);
                    }
                    Err(e) => println!("chaos: the person could not resolve held payments: {e}"),
                }
            }
        }
        if let Some(handle) = load.as_ref() {
            if handle.is_finished() {
                if let Some(handle) = load.take() {
                    handle.await??;
                    println!("chaos: all {} initiations published", args.payments);
                }
            }
        }
        let finals = {
            let events = events.lock().unwrap_or_else(|p| p.into_inner());
            events
                .iter()
                .filter(|e| e.is_final)
                .map(|e| e.payment_id.as_str())
                .collect::<HashSet<_>>()
                .len()
        };
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            println!(
                "chaos: {:>6.0}s  final {finals}/{}  workers started {} killed {}  broker restarts {broker_restarts}",
                started.elapsed().as_secs_f64(),
                args.payments,
                workers.started,
                workers.killed
            );
        }
        if finals >= args.payments && load_started && load.is_none() {
            break;
        }
        if Instant::now() > deadline {
            println!("chaos: time is up with {finals}/{} final", args.payments);
            break;
        }
        workers.replace_exited()?;
        if args.kill_every_secs > 0 && load_started && Instant::now() >= next_kill {
            next_kill = Instant::now() + Duration::from_secs(args.kill_every_secs);
            workers.kill_random()?;
        }
        if args.broker_restart_every_secs > 0 && Instant::now() >= next_broker_restart {
            if let Some(port) = own_broker_port {
                next_broker_restart =
                    Instant::now() + Duration::from_secs(args.broker_restart_every_secs);
                let dir = run_dir.to_string_lossy().into_owned();
                println!("chaos: restarting the broker");
                broker(&["kill", &dir])?;
                tokio::time::sleep(Duration::from_secs(1)).await;
                broker(&["start", &port.to_string(), &dir, "persistent"])?;
                broker_restarts += 1;
            }
        }
    }
    if outage_until.is_some() {
        times
            .outages
            .push((outage_from, chrono::Utc::now().timestamp_millis()));
    }
    workers.stop_all();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = follower.join();
    if let Some(f) = consent_follower {
        let _ = f.join();
    }
    psu_driver.abort();
    consent_driver.abort();

    // Checks.
    let mut report = Report {
        violations: Vec::new(),
        rows: Vec::new(),
    };
    let mut events = events.lock().unwrap_or_else(|p| p.into_inner()).clone();
    // A status event the live reader never got is looked for once more on the topic: a gap
    // is a violation only when the event is not there at all.
    let seen: HashSet<(String, i64)> = events
        .iter()
        .map(|e| (e.payment_id.clone(), e.sequence))
        .collect();
    let mut found_again = 0usize;
    // Both topics read again at once (each until it is quiet for 3 s).
    let (status_again, consents_again) = std::thread::scope(|scope| {
        let consents_again = args.consents.then(|| {
            scope.spawn(|| {
                read_again(
                    &settings,
                    &settings.topics.consent_status,
                    args.partitions,
                    Duration::from_secs(3),
                )
            })
        });
        let status_again = read_again(
            &settings,
            &settings.topics.status,
            args.partitions,
            Duration::from_secs(3),
        );
        let consents_again = match consents_again.map(|h| h.join()) {
            None => Ok(Vec::new()),
            Some(Ok(read)) => read,
            Some(Err(_)) => Err(anyhow::anyhow!(
                "reading the consent status topic again panicked"
            )),
        };
        (status_again, consents_again)
    });
    for payload in status_again? {
        if let Ok(record) = status::decode(&payload) {
            if !seen.contains(&(record.payment_id.clone(), record.sequence)) {
                found_again += 1;
                events.push(record);
            }
        }
    }
    report.row(
        "status events missed by the live reader, found on the topic again",
        found_again,
    );
    let resolved_payments: HashSet<usize> = resolved.iter().map(|(i, _)| *i).collect();
    check_events(args, &events, &resolved_payments, &mut report);
    let view = check_bank(args, &admin, &settings, &state_key, &events, &mut report).await?;
    if args.consents {
        let mut consent_events = consent_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let seen: HashSet<(String, String, i64)> = consent_events
            .iter()
            .map(|e| (e.psu_id.clone(), e.consent_id.clone(), e.sequence))
            .collect();
        let mut found_again = 0usize;
        for payload in consents_again? {
            if let Ok(record) = consent_status::decode(&payload) {
                let key = (
                    record.psu_id.clone(),
                    record.consent_id.clone(),
                    record.sequence,
                );
                if !seen.contains(&key) {
                    found_again += 1;
                    consent_events.push(record);
                }
            }
        }
        report.row(
            "consent events missed by the live reader, found again",
            found_again,
        );
        let bank = consents::Bank {
            consents: reqwest::get(admin.join("admin/consents")?)
                .await?
                .json()
                .await?,
            counters: reqwest::get(admin.join("admin/counters")?)
                .await?
                .json()
                .await?,
            signed_per_e2e: view.signed_per_e2e,
            held_e2e: view.held_e2e,
            accounts: consents::bank_accounts(&admin, args.psus).await?,
        };
        consents::check(
            &consents::Inputs {
                psus: args.psus,
                payments: args.payments,
                requests: &requests,
                consent_events: &consent_events,
                status_events: &events,
                consent_records: &view.consent_records,
                bank: &bank,
                times: &times,
                hold: args.unknown_outcome == "hold",
            },
            &mut report,
        );
    }
    report.row(
        "payments held at OUTCOME_UNKNOWN for a person",
        held_since.len(),
    );
    report.row(
        "resolutions by the person (adopt / reinitiate)",
        format!("{adopted} / {reinitiated}"),
    );
    report.row(
        "mode",
        format!(
            "orphans {}, lost answers: {}, consents {}",
            if args.orphans_signable {
                "signable (PSUs sign everything pending)"
            } else {
                "unsignable"
            },
            args.unknown_outcome,
            if args.consents { "on" } else { "off" }
        ),
    );
    report.row(
        "elapsed",
        format!("{:.0} s", started.elapsed().as_secs_f64()),
    );
    report.row(
        "workers started / SIGKILLed / exited by themselves",
        format!(
            "{} / {} / {}",
            workers.started, workers.killed, workers.exited
        ),
    );
    report.row("broker restarts", broker_restarts);
    report.row("machine", common::machine::describe());
    report.row(
        "undecodable status records",
        undecodable.load(Ordering::Relaxed),
    );
    report.row(
        "PSU actions that failed",
        redirect_failures.load(Ordering::Relaxed),
    );
    let fault_counters = sandbox.faults().counters();
    report.row("bank faults injected", fault_counters["total"].clone());
    report.row(
        "dedicated API outages (fallback after)",
        format!(
            "{outages} ({})",
            args.fallback_after_secs
                .map_or("fallback off".to_owned(), |s| format!("{s} s"))
        ),
    );
    let bank_counters: serde_json::Value = reqwest::get(admin.join("admin/counters")?)
        .await?
        .json()
        .await?;
    report.row(
        "initiations through the fallback interface",
        bank_counters["initiations_by_auth"]["fallback_session"].clone(),
    );
    println!("\nchaos summary");
    println!("{}", "-".repeat(70));
    for (name, value) in &report.rows {
        println!("{name:<44} {value}");
    }
    println!("{:<44} {}", "VIOLATIONS", report.violations.len());
    sandbox.shutdown().await;
    Ok(report.violations.is_empty())
}

fn check_events(
    args: &Args,
    events: &[StatusRecord],
    resolved: &HashSet<usize>,
    report: &mut Report,
) {
    // De-duplicate by (payment_id, sequence) as a client must; two different events with the
    // same key are a contradiction.
    let mut by_key: HashMap<(String, i64), &StatusRecord> = HashMap::new();
    let mut republished = 0usize;
    for e in events {
        match by_key.get(&(e.payment_id.clone(), e.sequence)) {
            Some(first) => {
                republished += 1;
                if first.event_id != e.event_id || first.state != e.state {
                    report.violation(format!(
                        "{} #{}: two different events ({} vs {})",
                        e.payment_id,
                        e.sequence,
                        first.state.symbol(),
                        e.state.symbol()
                    ));
                }
            }
            None => {
                by_key.insert((e.payment_id.clone(), e.sequence), e);
            }
        }
    }
    let mut timelines: HashMap<&str, BTreeMap<i64, &StatusRecord>> = HashMap::new();
    for ((id, seq), e) in &by_key {
        timelines.entry(id.as_str()).or_default().insert(*seq, e);
    }
    let mut finals: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut unexpected: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..args.payments {
        let id = payment_id(i);
        let Some(line) = timelines.get(id.as_str()) else {
            report.violation(format!("{id}: no status event at all (command lost)"));
            continue;
        };
        for (n, (seq, _)) in line.iter().enumerate() {
            if *seq != n as i64 + 1 {
                report.violation(format!("{id}: sequence gap at #{seq}"));
                break;
            }
        }
        let final_events: Vec<_> = line.values().filter(|e| e.is_final).collect();
        match final_events.as_slice() {
            [] => report.violation(format!(
                "{id}: no final state (last {})",
                line.values()
                    .last()
                    .map(|e| e.state.symbol())
                    .unwrap_or("-")
            )),
            [only] => {
                if line.values().last().map(|e| e.sequence) != Some(only.sequence) {
                    report.violation(format!("{id}: events after the final one"));
                }
                *finals.entry(only.state.symbol()).or_default() += 1;
                let script = Script::of(i);
                // Under injected faults an initiation may fail for good, and a payment a person
                // resolved ends as the bank's payment did (checked against the bank in
                // `check_bank`); anything else must match the script.
                // With --consents a funds check may refuse any script's payment (checked in
                // `consents::check_funds`).
                let refused_for_funds = args.consents
                    && only.state == StateKind::Rejected
                    && only.reason_code.as_deref() == Some("INSUFFICIENT_FUNDS");
                if only.state != script.expected()
                    && only.state != StateKind::Failed
                    && !resolved.contains(&i)
                    && !refused_for_funds
                {
                    *unexpected
                        .entry(format!("{script:?} -> {}", only.state.symbol()))
                        .or_default() += 1;
                    report.violation(format!(
                        "{id}: scripted {script:?} ended {} ({:?})",
                        only.state.symbol(),
                        only.reason_code
                    ));
                }
            }
            many => report.violation(format!("{id}: {} final events", many.len())),
        }
    }
    report.row("payments", args.payments);
    report.row(
        "status events (raw / after de-dup)",
        format!("{} / {}", events.len(), by_key.len()),
    );
    report.row(
        "re-published events (same id, dropped by de-dup)",
        republished,
    );
    for (state, n) in finals {
        report.row(&format!("final {state}"), n);
    }
    for (what, n) in unexpected {
        report.row(&format!("unexpected {what}"), n);
    }
}

/// What `check_bank` read, for the consent checks.
struct BankView {
    signed_per_e2e: HashMap<String, usize>,
    /// End-to-end ids of every bank payment, signed or not.
    held_e2e: HashSet<String>,
    /// The latest consent record per state key, superseded owners' writes skipped.
    consent_records: HashMap<String, ConsentRecord>,
}

/// The bank's side: no end-to-end id signed twice, and every bank-side initiation counted by
/// the state machine (`initiation_attempts` in the state topic).
async fn check_bank(
    args: &Args,
    admin: &url::Url,
    settings: &KafkaSettings,
    key: &Arc<StateKeyRing>,
    events: &[StatusRecord],
    report: &mut Report,
) -> anyhow::Result<BankView> {
    let payments: serde_json::Value = reqwest::get(admin.join("admin/payments")?)
        .await?
        .json()
        .await?;
    let counters: serde_json::Value = reqwest::get(admin.join("admin/counters")?)
        .await?
        .json()
        .await?;
    let mut signed_per_e2e: HashMap<String, usize> = HashMap::new();
    let mut held_e2e: HashSet<String> = HashSet::new();
    let mut bank_payments = 0usize;
    for p in payments.as_array().into_iter().flatten() {
        bank_payments += 1;
        held_e2e.insert(
            p["endtoend_identification"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        let status = p["transaction_status"].as_str().unwrap_or_default();
        if matches!(
            status,
            "ACTC" | "ACCP" | "ACSP" | "ACWC" | "ACFC" | "ACSC" | "PATC" | "PART"
        ) {
            *signed_per_e2e
                .entry(
                    p["endtoend_identification"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
                .or_default() += 1;
        }
    }
    let mut signed_twice = 0usize;
    for (e2e, n) in &signed_per_e2e {
        if *n > 1 {
            signed_twice += 1;
            report.violation(format!(
                "{e2e}: {n} bank payments signed (money would move {n} times)"
            ));
        }
    }
    report.row("end-to-end ids signed twice at the bank", signed_twice);
    // The worker's final word agrees with the bank's: SETTLED (or COMPLETED) exactly when the
    // bank executed a payment of that end-to-end id, never a final "not executed" state while
    // the bank holds a signed one.
    let mut finals: HashMap<&str, StateKind> = HashMap::new();
    for e in events.iter().filter(|e| e.is_final) {
        finals.insert(e.payment_id.as_str(), e.state);
    }
    let mut disagreements = 0usize;
    for i in 0..args.payments {
        let id = payment_id(i);
        let Some(state) = finals.get(id.as_str()) else {
            continue;
        };
        let signed_at_bank = signed_per_e2e.get(&id).copied().unwrap_or(0) > 0;
        let executed = matches!(state, StateKind::Settled | StateKind::Completed);
        if executed != signed_at_bank {
            disagreements += 1;
            report.violation(format!(
                "{id}: the worker says {} but the bank has {} signed payment(s) for it",
                state.symbol(),
                signed_per_e2e.get(&id).copied().unwrap_or(0)
            ));
        }
    }
    report.row("final states the bank disagrees with", disagreements);
    // The latest state of every payment, from the state topic (read until it is quiet: Tansu's
    // high watermark cannot be trusted).
    let attempts: Arc<Mutex<HashMap<String, u32>>> = Arc::new(Mutex::new(HashMap::new()));
    let consent_records: Arc<Mutex<HashMap<String, ConsentRecord>>> =
        Arc::new(Mutex::new(HashMap::new()));
    let decode_errors = Arc::new(AtomicUsize::new(0));
    let zombie_records = Arc::new(AtomicUsize::new(0));
    // None until the first record: a slow broker may take a while to serve the first fetch.
    let last_record: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let attempts = attempts.clone();
        let consent_records = consent_records.clone();
        let decode_errors = decode_errors.clone();
        let zombie_records = zombie_records.clone();
        let last_record = last_record.clone();
        let key = key.clone();
        let mut epoch_floor: HashMap<i32, i64> = HashMap::new();
        follow(
            settings,
            &settings.topics.state,
            args.partitions,
            stop.clone(),
            move |m| {
                *last_record.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                let record_key = m
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default();
                let Some(payload) = m.payload() else { return };
                // Read as a restore does: a record older than a claim read before it was
                // written by a superseded owner and does not count (docs/guarantees.md).
                let floor = epoch_floor.entry(m.partition()).or_insert(-1);
                match state_topic::decode_with_epoch(
                    &key,
                    &record_key,
                    payload,
                    pis_worker::kafka::fence::epoch_header(m),
                ) {
                    Ok((DecodedRecord::RestoreMarker, _)) => *floor = (*floor).max(m.offset()),
                    Ok((_, epoch)) if epoch >= 0 && epoch < *floor => {
                        zombie_records.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok((DecodedRecord::Payment { payment, .. }, epoch)) => {
                        *floor = (*floor).max(epoch);
                        attempts
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(payment.payment_id.to_string(), payment.initiation_attempts);
                    }
                    Ok((DecodedRecord::Consent { record, .. }, epoch)) => {
                        *floor = (*floor).max(epoch);
                        consent_records
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(record_key, *record);
                    }
                    Ok((_, epoch)) => *floor = (*floor).max(epoch),
                    Err(_) => {
                        decode_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            },
        )?
    };
    let reading_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let last = *last_record.lock().unwrap_or_else(|p| p.into_inner());
        let quiet = last.is_some_and(|at| at.elapsed() > Duration::from_secs(5));
        if quiet || reading_since.elapsed() > Duration::from_secs(180) {
            break;
        }
    }
    if last_record
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_none()
    {
        report.violation("the state topic could not be read back".into());
    }
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    let attempts = attempts.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let by_e2e = counters["initiations_by_e2e"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let mut unknown = 0usize;
    for (e2e, n) in &by_e2e {
        let bank = n.as_u64().unwrap_or(0);
        let known = attempts.get(e2e).copied().unwrap_or(0) as u64;
        if bank > known {
            unknown += 1;
            report.violation(format!(
                "{e2e}: {bank} initiations at the bank but the state machine recorded {known}"
            ));
        }
    }
    report.row(
        "bank payments (incl. orphans of lost answers)",
        bank_payments,
    );
    report.row(
        "orphaned initiations (answer lost) / orphans signed by PSUs",
        format!(
            "{} / {}",
            counters["orphaned_initiations"], counters["orphans_signed"]
        ),
    );
    report.row("bank initiations unknown to the state machine", unknown);
    report.row(
        "state records that did not decode",
        decode_errors.load(Ordering::Relaxed),
    );
    report.row(
        "state records of superseded owners (skipped, as restore does)",
        zombie_records.load(Ordering::Relaxed),
    );
    report.row(
        "bank initiations with PKCE / with the PSU's token",
        format!(
            "{} / {}",
            counters["initiations_by_auth"]["pkce"], counters["initiations_by_auth"]["bearer"]
        ),
    );
    report.row(
        "tokens issued / refreshes / replaced-token uses (of which re-uses)",
        format!(
            "{} / {} / {} ({})",
            counters["tokens_issued"],
            counters["refreshes"],
            counters["invalidated_token_uses"],
            counters["invalidated_token_reuses"]
        ),
    );
    // A pair replaced by an exchange whose answer the worker never stored (a lost answer, a
    // SIGKILL) is presented once and refused; presenting it again ignores the bank.
    if counters["invalidated_token_reuses"].as_u64().unwrap_or(0) > 0 {
        report.violation("a PSU token the bank had refused as replaced was presented again".into());
    }
    let consent_records = consent_records
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Ok(BankView {
        signed_per_e2e,
        held_e2e,
        consent_records,
    })
}
