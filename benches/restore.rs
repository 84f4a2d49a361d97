//! Restore cost, without a broker: how fast the pure fold (`engine::restore`) reads sealed state
//! records, and how much memory the restored payments take. It separates the worker's own cost
//! from the broker's (reading the partition over the network is not in these figures).
//!
//! Three partitions are compared (issue #11's goal is the last within 1.5× of the first):
//! - `in flight`: N payments waiting for SCA (one record each);
//! - `history + in flight, read from the first record`: the same N plus H final (settled)
//!   payments written before them (what restore read before snapshots);
//! - `history + in flight, from the snapshot`: the same partition as the worker leaves it: each
//!   historical payment settled, was retired and then forgotten (a tombstone), then a snapshot
//!   re-wrote the N live payments; the restore starts at the snapshot's begin record, as
//!   `kafka::state::read_partition` does with the offset the owner recorded.
//!
//! `cargo bench --bench restore` (part of `make bench`); sizes from `BENCH_RESTORE_IN_FLIGHT`
//! (default 100,000) and `BENCH_RESTORE_HISTORY` (default 1,000,000); `BENCH_RESTORE_BATCH`
//! (default 1,000, as `kafka::state::read_partition` batches) records per
//! `RestoreFold::apply_batch` call, 1 for `RestoreFold::apply` record by record on one thread.
//! Under `cargo test` (no
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
            always_pkce: false,
        },
        T0,
    )?;
    let (p, _) = step(
        Some(&p),
        Input::BeginInitiation {
            pkce_verifier: Some(SecretString::from("v".repeat(64))),
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

/// Feeds `records[first..]` to `fold` in batches of `batch` through `apply_batch` (decoded on
/// every core, folded in order), or one by one through `apply` when `batch` is 1. An empty
/// value stands for a tombstone.
fn feed(fold: &mut RestoreFold<'_>, records: &Records, first: usize, batch: usize) {
    fn value(v: &[u8]) -> Option<&[u8]> {
        (!v.is_empty()).then_some(v)
    }
    if batch <= 1 {
        for (offset, (key, v)) in records.iter().enumerate().skip(first) {
            fold.apply(offset as i64, Some(key), value(v), Some(0));
        }
        return;
    }
    let mut raw = Vec::with_capacity(batch);
    for (n, chunk) in records[first..].chunks(batch).enumerate() {
        raw.clear();
        raw.extend(chunk.iter().enumerate().map(|(i, (key, v))| RawRecord {
            offset: (first + n * batch + i) as i64,
            key: Some(key),
            value: value(v),
            epoch_header: Some(0),
        }));
        fold.apply_batch(&raw);
    }
}

/// Folds `records` (offsets in order, the owner's marker after them); returns records/s, the
/// restored payments and the RSS the restored state added.
fn fold(ring: &StateKeyRing, records: &Records, batch: usize) -> anyhow::Result<(f64, usize, u64)> {
    let marker = i64::try_from(records.len()).unwrap_or(i64::MAX);
    let before = rss();
    let started = Instant::now();
    let mut fold = RestoreFold::new(ring, marker).without_sealing();
    feed(&mut fold, records, 0, batch);
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

/// The partition after `history` payments settled, retired and were forgotten, then a snapshot
/// of `live` (their latest records written before it, as a real partition has them). Returns
/// the records and the snapshot begin's offset.
fn snapshotted(
    ring: &StateKeyRing,
    settled: &Payment,
    live: &Records,
    history: usize,
) -> anyhow::Result<(Records, Vec<Option<i64>>, i64)> {
    let mut out = Records::with_capacity(history * 2 + live.len() * 2 + 2);
    records(ring, settled, "done", history, &mut out)?;
    let mut epochs = vec![Some(0); out.len()];
    for i in 0..history {
        let mut p = settled.clone();
        p.payment_id = PaymentId::new(format!("done-{i:07}"));
        let (key, value) = state::encode_retired(ring, 0, &state::Retired::of(&p, T0 + 10))?;
        out.push((key.into_bytes(), value));
        epochs.push(Some(0));
    }
    // Forgotten: tombstones (an empty value stands for none below).
    for i in 0..history {
        out.push((format!("payment/done-{i:07}").into_bytes(), Vec::new()));
        epochs.push(Some(0));
    }
    out.extend(live.iter().cloned());
    epochs.extend(std::iter::repeat_n(Some(0), live.len()));
    let begin = i64::try_from(out.len()).unwrap_or(i64::MAX);
    let key = state::snapshot_begin_key(0, 0, 1);
    let value = state::encode_snapshot(ring, &key, 0, None, T0 + 20)?;
    out.push((key.into_bytes(), value));
    epochs.push(Some(0));
    out.extend(live.iter().cloned());
    epochs.extend(std::iter::repeat_n(Some(0), live.len()));
    let key = state::snapshot_key(0);
    let value = state::encode_snapshot(ring, &key, 0, Some((begin, live.len() as u64)), 0)?;
    out.push((key.into_bytes(), value));
    epochs.push(Some(0));
    Ok((out, epochs, begin))
}

/// Restores `records` from the snapshot at `begin`, as the worker does; returns records/s,
/// records read, the restored payments and the RSS the restored state added.
fn fold_from_snapshot(
    ring: &StateKeyRing,
    records: &Records,
    epochs: &[Option<i64>],
    begin: i64,
    batch: usize,
) -> anyhow::Result<(f64, u64, usize, u64)> {
    let marker = i64::try_from(records.len()).unwrap_or(i64::MAX);
    let before = rss();
    let started = Instant::now();
    let mut fold = RestoreFold::new(ring, marker).without_sealing();
    let first = usize::try_from(begin).unwrap_or(usize::MAX);
    let (key, value) = &records[first];
    fold.start_at(begin, begin, Some(key), Some(value), epochs[first])
        .map_err(|e| anyhow::anyhow!(e))?;
    feed(&mut fold, records, first, batch);
    let restored = fold.finish();
    let took = started.elapsed().as_secs_f64();
    let grown = rss().saturating_sub(before);
    if !restored.quarantined.is_empty() {
        anyhow::bail!("{} records quarantined", restored.quarantined.len());
    }
    let read = restored.records_read;
    let payments = restored.payments.len();
    drop(restored);
    Ok((read as f64 / took, read, payments, grown))
}

/// One scenario's result: records read, records/s, restored payments, RSS the restore added.
struct Measured {
    read: u64,
    rate: f64,
    payments: usize,
    grown: u64,
}

/// Runs one scenario in this process.
fn scenario(
    name: &str,
    in_flight: usize,
    history: usize,
    batch: usize,
) -> anyhow::Result<Measured> {
    let ring = StateKeyRing::generate();
    let (pending, settled) = templates()?;
    let mut alone = Records::with_capacity(in_flight);
    records(&ring, &pending, "live", in_flight, &mut alone)?;
    let measured = match name {
        "alone" => {
            let (rate, payments, grown) = fold(&ring, &alone, batch)?;
            Measured {
                read: alone.len() as u64,
                rate,
                payments,
                grown,
            }
        }
        "history" => {
            let mut all = Records::with_capacity(history + in_flight);
            records(&ring, &settled, "done", history, &mut all)?;
            all.extend(alone);
            let (rate, payments, grown) = fold(&ring, &all, batch)?;
            anyhow::ensure!(payments == in_flight + history, "restored {payments}");
            Measured {
                read: all.len() as u64,
                rate,
                payments: payments - history,
                grown,
            }
        }
        "snapshot" => {
            // `alone` stays allocated, as in the other scenarios: freeing it first would let
            // the fold reuse that memory and understate the RSS it adds.
            let (all, epochs, begin) = snapshotted(&ring, &settled, &alone, history)?;
            let (rate, read, payments, grown) =
                fold_from_snapshot(&ring, &all, &epochs, begin, batch)?;
            Measured {
                read,
                rate,
                payments,
                grown,
            }
        }
        other => anyhow::bail!("unknown scenario {other}"),
    };
    anyhow::ensure!(
        measured.payments == in_flight,
        "{name}: restored {} of {in_flight} live payments",
        measured.payments
    );
    Ok(measured)
}

/// Runs one scenario in a process of its own, so that one's freed memory is not the next
/// one's RSS.
fn in_child(name: &str) -> anyhow::Result<Measured> {
    let output = std::process::Command::new(std::env::current_exe()?)
        .arg("--bench")
        .env("BENCH_RESTORE_ONLY", name)
        .output()?;
    anyhow::ensure!(output.status.success(), "{name}: {output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("measured "))
        .ok_or_else(|| anyhow::anyhow!("{name}: no result in {text}"))?;
    let f: Vec<&str> = line.split(' ').collect();
    anyhow::ensure!(f.len() == 4, "{name}: {line}");
    Ok(Measured {
        read: f[0].parse()?,
        rate: f[1].parse()?,
        payments: f[2].parse()?,
        grown: f[3].parse()?,
    })
}

fn main() -> anyhow::Result<()> {
    let in_flight = size("BENCH_RESTORE_IN_FLIGHT", 100_000, 200);
    let history = size("BENCH_RESTORE_HISTORY", 1_000_000, 300);
    let batch = size("BENCH_RESTORE_BATCH", 1_000, 100);
    if let Ok(name) = std::env::var("BENCH_RESTORE_ONLY") {
        let m = scenario(&name, in_flight, history, batch)?;
        println!("measured {} {} {} {}", m.read, m.rate, m.payments, m.grown);
        return Ok(());
    }
    let names = ["alone", "history", "snapshot"];
    if !benchmarking() {
        for name in names {
            let m = scenario(name, in_flight, history, batch)?;
            println!("restore: smoke run, {name}: {} records folded", m.read);
        }
        println!("restore: figures with cargo bench --bench restore");
        return Ok(());
    }
    let results: Vec<Measured> = names
        .iter()
        .map(|name| in_child(name))
        .collect::<anyhow::Result<_>>()?;
    let secs = |m: &Measured| m.read as f64 / m.rate;
    println!("machine: {}", host::describe());
    match batch {
        0 | 1 => println!("fold: RestoreFold::apply, one record at a time, one thread"),
        _ => println!(
            "fold: RestoreFold::apply_batch, batches of {batch}, decoded on {} threads",
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        ),
    }
    println!(
        "| partition | records read | restore (fold) | records/s | restored RSS | RSS per live payment |"
    );
    println!("|---|---|---|---|---|---|");
    let labels = [
        "in flight (waiting for SCA)",
        "history (settled) + in flight, read from the first record",
        "history (settled, retired, forgotten) + in flight, from the snapshot",
    ];
    for (label, m) in labels.iter().zip(&results) {
        println!(
            "| {label} | {} | {:.2} s | {:.0} | {:.0} MB | {:.0} B |",
            m.read,
            secs(m),
            m.rate,
            m.grown as f64 / 1e6,
            m.grown as f64 / m.payments.max(1) as f64
        );
    }
    let (alone, full, snap) = (&results[0], &results[1], &results[2]);
    println!(
        "vs in flight alone: from the first record {:.1}× the restore time and {:.1}× the RSS; from the snapshot {:.2}× the restore time and {:.2}× the RSS",
        secs(full) / secs(alone),
        full.grown as f64 / alone.grown.max(1) as f64,
        secs(snap) / secs(alone),
        snap.grown as f64 / alone.grown.max(1) as f64,
    );
    Ok(())
}
