//! Per-command CPU cost of each pure step on the worker's hot path, without I/O: decoding an
//! Avro command, validating it, the state machine's decision, sealing and encoding the state
//! record, decoding it again (restore), and encoding the status event. The end-to-end figures
//! come from `pis-bench`; this tells which step they are made of.
//!
//! `cargo bench --bench hot_path` (part of `make bench`). No harness crate: each case runs in
//! batches until a time budget is spent and reports the median batch's time per operation.
//! Under `cargo test` (no `--bench` argument) each case runs once, as a smoke test, and no
//! figures are printed: a debug build's timings are not benchmarks.

// The same machine line as pis-bench prints.
#[path = "../src/bin/common/machine.rs"]
mod host;

use std::hint::black_box;
use std::time::{Duration, Instant};

use pis_worker::contract::command::{self, CommandBody, CommandEnvelope};
use pis_worker::contract::status;
use pis_worker::domain::machine::{self, Input, Outcome, Policy};
use pis_worker::domain::model::{CommandId, PaymentId, PsuId, RawInitiatePayment};
use pis_worker::domain::validation::{ValidationLimits, validate_initiation};
use pis_worker::kafka::state;
use pis_worker::secret::StateKeyRing;

const BUDGET: Duration = Duration::from_millis(800);
const BATCHES: usize = 21;

/// Median time per call of `op` over `BATCHES` batches sized to fill `BUDGET`.
fn measure(name: &str, mut op: impl FnMut()) {
    if !benchmarking() {
        op();
        return;
    }
    let mut per_batch = 1usize;
    loop {
        let t = Instant::now();
        for _ in 0..per_batch {
            op();
        }
        if t.elapsed() * BATCHES as u32 >= BUDGET || per_batch >= 1 << 24 {
            break;
        }
        per_batch *= 2;
    }
    let mut samples: Vec<f64> = (0..BATCHES)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per_batch {
                op();
            }
            t.elapsed().as_nanos() as f64 / per_batch as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    let median = samples[BATCHES / 2];
    let spread = (samples[BATCHES * 3 / 4] - samples[BATCHES / 4]) / median * 100.0;
    println!(
        "| {name:<44} | {:>10.2} | {:>10.0} | ±{spread:>4.1}% |",
        median / 1000.0,
        1e9 / median
    );
}

/// `cargo bench` passes `--bench`; `cargo test` runs the target without it.
fn benchmarking() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn raw() -> RawInitiatePayment {
    RawInitiatePayment {
        payment_product: "SEPA_CREDIT_TRANSFERS".into(),
        brand: "BELFIUS".into(),
        amount: "123.45".into(),
        currency: "EUR".into(),
        creditor_name: "Shop".into(),
        creditor_iban: "BE68539007547034".into(),
        end_to_end_id: "e2e-000001".into(),
        remittance_information: Some("Invoice 2026-0001".into()),
        language: "fr".into(),
        redirect_uri: "https://client.example/callback".into(),
        ..RawInitiatePayment::default()
    }
}

fn main() -> anyhow::Result<()> {
    let envelope = CommandEnvelope {
        command_id: "cmd-000001".into(),
        payment_id: "p-000001".into(),
        psu_id: "psu-000001".into(),
        issued_at: 1_764_000_000_000,
        body: CommandBody::Initiate(Box::new(raw())),
    };
    let bytes = command::encode(&envelope).map_err(|e| anyhow::anyhow!("{e}"))?;
    let limits = ValidationLimits::default();
    let today =
        chrono::NaiveDate::from_ymd_opt(2026, 11, 25).ok_or_else(|| anyhow::anyhow!("date"))?;
    let order =
        validate_initiation(&raw(), &limits, today).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let policy = Policy::default();
    let payment_id = PaymentId::new("p-000001");
    let initiate = || Input::Initiate {
        command_id: CommandId::new("cmd-000001"),
        psu_id: PsuId::new("psu-000001"),
        order: order.clone().into(),
        always_pkce: false,
    };
    let transition =
        match machine::decide(&payment_id, None, initiate(), 1_764_000_000_000, &policy) {
            Outcome::Changed(t) => t,
            other => anyhow::bail!("the machine did not accept the initiation: {other:?}"),
        };
    let key = StateKeyRing::generate();
    let (record_key, record) =
        state::encode_payment(&key, 7, &transition.payment, &transition.events)?;
    let event = transition
        .events
        .first()
        .ok_or_else(|| anyhow::anyhow!("no status event"))?
        .clone();

    // Every measured call must succeed: timing an error path would flatter the figures.
    command::decode(&bytes, 1 << 20).map_err(|e| anyhow::anyhow!("command decode: {e}"))?;
    state::decode(&key, &record_key, &record)?;
    status::encode(&event).map_err(|e| anyhow::anyhow!("status encode: {e}"))?;
    if !benchmarking() {
        println!("hot_path: smoke run, each step once (figures: cargo bench --bench hot_path)");
    } else {
        println!("machine: {}", host::describe());
        println!(
            "| {:<44} | {:>10} | {:>10} | {:>6} |",
            "step", "µs/op", "ops/s", "IQR"
        );
        println!(
            "|{}|{}|{}|{}|",
            "-".repeat(46),
            "-".repeat(12),
            "-".repeat(12),
            "-".repeat(8)
        );
    }
    measure("command: Avro decode + structure check", || {
        black_box(command::decode(black_box(&bytes), 1 << 20).ok());
    });
    measure("validation: initiation (IBAN, amount, text…)", || {
        black_box(validate_initiation(black_box(&raw()), &limits, today).ok());
    });
    measure("machine: decide(Initiate) on a new payment", || {
        black_box(machine::decide(
            &payment_id,
            None,
            initiate(),
            1_764_000_000_000,
            &policy,
        ));
    });
    measure("state: seal + encode payment record", || {
        black_box(state::encode_payment(&key, 7, &transition.payment, &transition.events).ok());
    });
    measure("state: decode + open payment record", || {
        black_box(state::decode(&key, &record_key, black_box(&record)).ok());
    });
    measure("status: Avro encode event", || {
        black_box(status::encode(black_box(&event)).ok());
    });
    measure("command: Avro encode (client side)", || {
        black_box(command::encode(black_box(&envelope)).ok());
    });
    Ok(())
}
