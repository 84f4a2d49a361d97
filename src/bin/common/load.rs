//! What the load runs (the benchmark, the soak) share and the chaos suite does not need: the
//! commands they publish and what they read off the workers (metrics, RSS).
#![allow(dead_code)]

use pis_worker::contract::command::{CommandBody, CommandEnvelope};
use pis_worker::domain::model::RawInitiatePayment;

/// The initiation command of the `i`-th payment of a load run: a valid SEPA credit transfer
/// of `psu`, with the payment id as end-to-end id.
pub fn initiate(i: usize, id: &str, psu: &str) -> CommandEnvelope {
    CommandEnvelope {
        command_id: format!("cmd-{id}"),
        payment_id: id.to_owned(),
        psu_id: psu.to_owned(),
        issued_at: chrono::Utc::now().timestamp_millis(),
        body: CommandBody::Initiate(Box::new(RawInitiatePayment {
            payment_product: "SEPA_CREDIT_TRANSFERS".into(),
            brand: "BELFIUS".into(),
            amount: format!("{}.{:02}", 1 + i % 500, i % 100),
            currency: "EUR".into(),
            creditor_name: "Shop".into(),
            creditor_iban: "BE68539007547034".into(),
            end_to_end_id: id.to_owned(),
            language: "fr".into(),
            redirect_uri: "https://client.example/callback".into(),
            ..RawInitiatePayment::default()
        })),
    }
}

/// A worker's `/metrics` page, empty when it does not answer.
pub async fn scrape(http: &reqwest::Client, port: u16) -> String {
    match http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
    {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The sum of every series of metric `name` in a Prometheus text page (labelled or not);
/// `None` when the page has none.
pub fn metric_sum(page: &str, name: &str) -> Option<f64> {
    metric_sum_where(page, name, |_| true)
}

/// Like [`metric_sum`], over the series whose label text (between the braces, empty when
/// unlabelled) passes `keep`.
pub fn metric_sum_where(page: &str, name: &str, keep: impl Fn(&str) -> bool) -> Option<f64> {
    let mut total = None;
    for line in page.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = match rest.strip_prefix('{') {
            Some(labelled) => match labelled.split_once('}') {
                Some((labels, value)) => (labels, value),
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest),
            None => continue,
        };
        if !keep(labels) {
            continue;
        }
        if let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *total.get_or_insert(0.0) += v;
        }
    }
    total
}

/// Resident set size of process `pid` (`VmRSS` of /proc/PID/status), in bytes.
pub fn rss_bytes(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// A fresh run directory (emptied first), as an absolute path and as text.
pub fn fresh_run_dir(dir: &std::path::Path) -> anyhow::Result<(std::path::PathBuf, String)> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let dir = std::fs::canonicalize(dir)?;
    let text = dir.to_string_lossy().into_owned();
    Ok((dir, text))
}

/// The broker to use: `given`, or a Tansu started in `run_dir` (then `true`: stop it with
/// `common::broker(&["stop", run_dir])`).
pub fn broker_or_own(given: &Option<String>, run_dir: &str) -> anyhow::Result<(String, bool)> {
    Ok(match given {
        Some(b) => (b.clone(), false),
        None => {
            let port = super::free_port()?.to_string();
            super::broker(&["start", &port, run_dir])?;
            (format!("127.0.0.1:{port}"), true)
        }
    })
}
