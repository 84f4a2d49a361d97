//! Restore cost, without a broker: how fast the pure fold (`engine::restore`) reads sealed state
//! records, and how much memory the restored payments take. It separates the worker's own cost
//! from the broker's (reading the partition over the network is not in these figures).
//!
//! Two partitions are compared (issue #11's goal is the second within 1.5× of the first):
//! - `in flight`: N payments waiting for SCA (one record each);
//! - `history + in flight`: the same N plus H final (settled) payments written before them.
//!
//! `cargo bench --bench restore` (part of `make bench`); sizes from `BENCH_RESTORE_IN_FLIGHT`
//! (default 100,000) and `BENCH_RESTORE_HISTORY` (default 1,000,000); `BENCH_RESTORE_BATCH`
//! (default 1,000) records per `RestoreFold::apply_batch` call, 1 for `RestoreFold::apply`
//! record by record on one thread. Under `cargo test` (no
//! `--bench` argument) it folds a few hundred records as a smoke test and prints no figures.

#[path = "../src/bin/common/machine.rs"]
mod host;

use std::time::Instant;

use pis_worker::domain::bank::BankProgress;
use pis_worker::domain::machine::{self, Input, Outcome, Payment, Policy, StatusEvent};
use pis_worker::domain::model::{BankPaymentId, CommandId, PaymentId, PsuId, RawInitiatePayment};
use pis_worker::domain::validation::{ValidationLimits, validate_initiation};
use pis_worker::engine::restore::{RawRecord, RestoreFold};
use pis_worker::kafka::state;
use pis_worker::secret::StateKeyRing;
use secrecy::SecretString;

const T0: i64 = 1_764_000_000_000;

fn benchmarking() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn size(var: &str, default: usize, smoke: usize) -> usize {
    if !benchmarking() {
        return smoke;
    }
    std::env::var(var)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// Resident set size of this process, in bytes (Linux).
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn step(
    payment: Option<&Payment>,
    input: Input,
    now: i64,
) -> anyhow::Result<(Payment, Vec<StatusEvent>)> {
    let id = payment.map_or_else(|| PaymentId::new("template"), |p| p.payment_id.clone());
    match machine::decide(&id, payment, input, now, &Policy::default()) {
        Outcome::Changed(t) => Ok((t.payment, t.events)),
        other => anyhow::bail!("the machine refused a template step: {other:?}"),
    }
}

/// A payment waiting for SCA, and one settled, as the machine builds them.
fn templates() -> anyhow::Result<(Payment, Payment)> {
    let raw = RawInitiatePayment {
        payment_product: "SEPA_CREDIT_TRANSFERS".into(),
        brand: "BELFIUS".into(),
        amount: "123.45".into(),
        currency: "EUR".into(),
        creditor_name: "Bakkerij Peeters".into(),
        creditor_iban: "BE68539007547034".into(),
        end_to_end_id: "e2e-000001".into(),
        remittance_information: Some("Invoice 2026-0001".into()),
        language: "fr".into(),
        redirect_uri: "https://client.example/callback".into(),
        ..RawInitiatePayment::default()
    };
    let today =
        chrono::NaiveDate::from_ymd_opt(2026, 11, 25).ok_or_else(|| anyhow::anyhow!("date"))?;
    let order = validate_initiation(&raw, &ValidationLimits::default(), today)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let (p, _) = step(
        None,
        Input::Initiate {
            command_id: CommandId::new("cmd-1"),
            psu_id: PsuId::new("psu-1"),
            order: order.into(),
        },
        T0,
    )?;
    let (p, _) = step(
        Some(&p),
        Input::BeginInitiation {
            pkce_verifier: SecretString::from("v".repeat(64)),
            sca_state: "0123456789abcdef0123456789abcdef".into(),
        },
        T0 + 1,
    )?;
    let (pending, _) = step(
        Some(&p),
        Input::BankInitiated {
            bank_payment_id: BankPaymentId::new("0bffcb17a7bc4117981a3ecf82f8c0e8"),
            sca_redirect_url: "https://sca.belfius.be/sca/0bffcb17a7bc4117981a3ecf82f8c0e8?state=0123456789abcdef0123456789abcdef".into(),
            bank_status: Some("RCVD".into()),
        },
        T0 + 2,
    )?;
    let (signed, _) = step(
        Some(&pending),
        Input::StatusObserved {
            progress: BankProgress::Signed,
            bank_status: "ACTC".into(),
        },
        T0 + 3,
    )?;
    let (settled, _) = step(
        Some(&signed),
        Input::StatusObserved {
            progress: BankProgress::Settled,
            bank_status: "ACSC".into(),
        },
        T0 + 4,
    )?;
    Ok((pending, settled))
}

type Records = Vec<(Vec<u8>, Vec<u8>)>;

fn records(
    ring: &StateKeyRing,
    template: &Payment,
    prefix: &str,
    n: usize,
    out: &mut Records,
) -> anyhow::Result<()> {
    for i in 0..n {
        let mut p = template.clone();
        p.payment_id = PaymentId::new(format!("{prefix}-{i:07}"));
        p.psu_id = PsuId::new(format!("psu-{:05}", i % 50_000));
        let (key, value) = state::encode_payment(ring, 0, &p, &[])?;
        out.push((key.into_bytes(), value));
    }
    Ok(())
}

/// Folds `records` (offsets in order, the owner's marker after them) in batches of `batch`
/// through `RestoreFold::apply_batch` (decoded on every core, folded in order), or one by one
/// through `RestoreFold::apply` when `batch` is 1; returns records/s, the restored payments and
/// the RSS the restored state added.
fn fold(ring: &StateKeyRing, records: &Records, batch: usize) -> anyhow::Result<(f64, usize, u64)> {
    let marker = i64::try_from(records.len()).unwrap_or(i64::MAX);
    let before = rss();
    let started = Instant::now();
    let mut fold = RestoreFold::new(ring, marker);
    if batch <= 1 {
        for (offset, (key, value)) in records.iter().enumerate() {
            fold.apply(offset as i64, Some(key), Some(value), Some(0));
        }
    } else {
        let mut raw = Vec::with_capacity(batch);
        for (n, chunk) in records.chunks(batch).enumerate() {
            raw.clear();
            raw.extend(chunk.iter().enumerate().map(|(i, (key, value))| RawRecord {
                offset: (n * batch + i) as i64,
                key: Some(key),
                value: Some(value),
                epoch_header: Some(0),
            }));
            fold.apply_batch(&raw);
        }
    }
    let restored = fold.finish();
    let took = started.elapsed().as_secs_f64();
    let grown = rss().saturating_sub(before);
    if !restored.quarantined.is_empty() {
        anyhow::bail!("{} records quarantined", restored.quarantined.len());
    }
    let payments = restored.payments.len();
    drop(restored);
    Ok((records.len() as f64 / took, payments, grown))
}

fn main() -> anyhow::Result<()> {
    let in_flight = size("BENCH_RESTORE_IN_FLIGHT", 100_000, 200);
    let history = size("BENCH_RESTORE_HISTORY", 1_000_000, 300);
    let batch = size("BENCH_RESTORE_BATCH", 1_000, 100);
    let ring = StateKeyRing::generate();
    let (pending, settled) = templates()?;

    let mut alone = Records::with_capacity(in_flight);
    records(&ring, &pending, "live", in_flight, &mut alone)?;
    let mut with_history = Records::with_capacity(history + in_flight);
    records(&ring, &settled, "done", history, &mut with_history)?;
    with_history.extend(alone.iter().cloned());

    let (rate_alone, n_alone, rss_alone) = fold(&ring, &alone, batch)?;
    let (rate_history, n_history, rss_history) = fold(&ring, &with_history, batch)?;
    anyhow::ensure!(n_alone == in_flight, "restored {n_alone} of {in_flight}");
    anyhow::ensure!(n_history == in_flight + history, "restored {n_history}");
    if !benchmarking() {
        println!(
            "restore: smoke run ({} + {} records folded; figures: cargo bench --bench restore)",
            alone.len(),
            with_history.len()
        );
        return Ok(());
    }
    let secs = |n: usize, rate: f64| n as f64 / rate;
    println!("machine: {}", host::describe());
    match batch {
        0 | 1 => println!("fold: RestoreFold::apply, one record at a time, one thread"),
        _ => println!(
            "fold: RestoreFold::apply_batch, batches of {batch}, decoded on {} threads",
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        ),
    }
    println!(
        "| partition | records | restore (fold) | records/s | restored RSS | RSS per payment |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, n, rate, grown, payments) in [
        (
            "in flight (waiting for SCA)",
            alone.len(),
            rate_alone,
            rss_alone,
            n_alone,
        ),
        (
            "history (settled) + in flight",
            with_history.len(),
            rate_history,
            rss_history,
            n_history,
        ),
    ] {
        println!(
            "| {name} | {n} | {:.2} s | {:.0} | {:.0} MB | {:.0} B |",
            secs(n, rate),
            rate,
            grown as f64 / 1e6,
            grown as f64 / payments.max(1) as f64
        );
    }
    println!(
        "history + in flight vs in flight alone: restore {:.1}×, RSS {:.1}×",
        secs(with_history.len(), rate_history) / secs(alone.len(), rate_alone),
        rss_history as f64 / rss_alone.max(1) as f64
    );
    Ok(())
}
