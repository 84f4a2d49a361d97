//! `pis-chaos --consents`: the portal features under chaos.
//!
//! Before the load, the even-numbered PSUs ask for a CAF consent on their debtor account and an
//! AIS consent, and the "PSU" acts on them at the sandbox's consent page (the operator route);
//! the client hands the redirect back with `CompleteConsent`. Most grant; every fifth of them
//! refuses the AIS consent; another fifth asks for the AIS consent twice (the first request is
//! superseded). Every PSU gets a debtor account at the sandbox, a third of them with a low
//! balance. The load's payments then name their PSU's debtor account (all but every seventh)
//! and every other triple asks for a funds check.
//!
//! What the checks below prove, from the consent status topic, the status topic, the state
//! topic and the bank's own records (its ledger, its consents, its counters), is listed in
//! docs/guarantees.md ("The chaos suite's checks").

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::bail;
use pis_worker::contract::command::{CommandBody, CommandEnvelope, ScaRedirect};
use pis_worker::contract::consent_status::ConsentStatusRecord;
use pis_worker::contract::status::StatusRecord;
use pis_worker::domain::consent::{ConsentScope, ConsentState};
use pis_worker::domain::machine::StateKind;
use pis_worker::domain::model::RawConsentRequest;
use pis_worker::domain::settlement::SettlementOutcome;
use pis_worker::kafka::state::consent::ConsentRecord;
use rdkafka::producer::FutureProducer;

use crate::Report;

/// A low balance, 80.00: most amounts of the load (1.00 to 500.99) exceed it.
pub const POOR_BALANCE_MINOR: i64 = 8_000;
/// 1,000,000.00: more than every PSU's payments together, even each initiated four times.
pub const RICH_BALANCE_MINOR: i64 = 100_000_000;
/// The bank's unattended AIS reads per account and 24 hours (docs/contract.md, "Settlement
/// evidence").
const READS_PER_DAY: usize = 4;
/// How long after its outage a bank call may still fail: the worker's circuit breaker stays
/// open up to 15 s after the last failure, then one probe must succeed.
const OUTAGE_TAIL_MS: i64 = 20_000;
/// A funds check (with the guard's retries) is over this long before the payment's first
/// event.
const CHECK_WINDOW_MS: i64 = 30_000;
const REDIRECT_URI: &str = "https://client.example/callback";

/// A Belfius account (bank code 096) of PSU `k`, with valid national and IBAN check digits.
pub fn debtor_iban(k: usize) -> String {
    let base = 960_000_000u64 + 1_000_000 + k as u64;
    let national = match base % 97 {
        0 => 97,
        c => c,
    };
    let bban = format!("0{base}{national:02}");
    // ISO 13616: the BBAN, then "BE00" with letters as numbers (B = 11, E = 14), mod 97.
    let remainder = format!("{bban}111400")
        .bytes()
        .fold(0u64, |acc, d| (acc * 10 + u64::from(d - b'0')) % 97);
    format!("BE{:02}{bban}", 98 - remainder)
}

/// What the PSU does on the bank's consent page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    Grant,
    Refuse,
    /// Asked for again at once: the worker supersedes it, the PSU never acts on it.
    Superseded,
}

#[derive(Debug, Clone)]
pub struct Request {
    pub consent_id: String,
    pub psu: usize,
    pub scope: ConsentScope,
    pub script: Script,
}

/// PSU `k` asks for consents.
pub fn holds_consents(k: usize) -> bool {
    k % 2 == 0
}

/// PSU `k`'s debtor account starts with a low balance (with or without consents).
pub fn poor(k: usize) -> bool {
    k % 6 == 0 || k % 6 == 3
}

pub fn initial_balance(k: usize) -> i64 {
    if poor(k) {
        POOR_BALANCE_MINOR
    } else {
        RICH_BALANCE_MINOR
    }
}

/// Payment `i` names its PSU's debtor account.
pub fn names_debtor(i: usize) -> bool {
    i % 7 != 0
}

/// Payment `i` asks for a funds check.
pub fn asks_funds_check(i: usize) -> bool {
    (i / 3) % 2 == 0
}

/// The amount of payment `i` in cents, as `initiate_command` writes it.
pub fn amount_minor(i: usize) -> i64 {
    (1 + i % 500) as i64 * 100 + (i % 100) as i64
}

/// Every consent request of the run, in the order they are sent.
pub fn requests(psus: usize) -> Vec<Request> {
    let mut out = Vec::new();
    for k in (0..psus).filter(|k| holds_consents(*k)) {
        out.push(Request {
            consent_id: format!("caf-{k}"),
            psu: k,
            scope: ConsentScope::Caf,
            script: Script::Grant,
        });
        if k % 10 == 8 {
            out.push(Request {
                consent_id: format!("ais0-{k}"),
                psu: k,
                scope: ConsentScope::Ais,
                script: Script::Superseded,
            });
        }
        out.push(Request {
            consent_id: format!("ais-{k}"),
            psu: k,
            scope: ConsentScope::Ais,
            script: if k % 10 == 4 {
                Script::Refuse
            } else {
                Script::Grant
            },
        });
    }
    out
}

pub fn request_command(request: &Request) -> CommandEnvelope {
    CommandEnvelope {
        command_id: format!("request-{}", request.consent_id),
        payment_id: request.consent_id.clone(),
        psu_id: crate::psu_name(request.psu),
        issued_at: chrono::Utc::now().timestamp_millis(),
        body: CommandBody::RequestConsent(RawConsentRequest {
            brand: "BELFIUS".into(),
            scope: request.scope.symbol().into(),
            account_iban: (request.scope == ConsentScope::Caf).then(|| debtor_iban(request.psu)),
            language: "fr".into(),
            redirect_uri: REDIRECT_URI.into(),
        }),
    }
}

/// Opens every PSU's debtor account at the sandbox with its balance and holder (an AIS grant
/// lists the accounts its PSU holds).
pub async fn open_accounts(admin: &url::Url, psus: usize) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    for k in 0..psus {
        let iban = debtor_iban(k);
        let minor = initial_balance(k);
        let response = http
            .post(admin.join(&format!("admin/accounts/{iban}/balance"))?)
            .json(&serde_json::json!({
                "balance": format!("{}.{:02}", minor / 100, minor % 100),
                "psu": crate::psu_name(k),
            }))
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("opening {iban}: HTTP {}", response.status());
        }
    }
    Ok(())
}

/// The bank's consent id (the consent page's last path segment) and the worker's OAuth state.
fn parse_consent_uri(uri: &str) -> anyhow::Result<(String, String)> {
    let url = url::Url::parse(uri)?;
    let id = url
        .path_segments()
        .and_then(|mut s| s.next_back())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| anyhow::anyhow!("no consent id in {uri}"))?
        .to_owned();
    let state = url
        .query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
        .ok_or_else(|| anyhow::anyhow!("no state on {uri}"))?;
    Ok((id, state))
}

/// The PSU opens the consent URI the worker published and grants or refuses; the client hands
/// the redirect back with `CompleteConsent`.
pub async fn psu_acts(
    admin: &url::Url,
    producer: &FutureProducer,
    topic: &str,
    request: &Request,
    consent_uri: &str,
) -> anyhow::Result<()> {
    let action = match request.script {
        Script::Grant => "grant",
        Script::Refuse => "refuse",
        Script::Superseded => return Ok(()),
    };
    let (bank_id, state) = parse_consent_uri(consent_uri)?;
    let mut url = admin.join(&format!("admin/consents/{bank_id}/{action}"))?;
    url.query_pairs_mut()
        .append_pair("psu", &crate::psu_name(request.psu))
        .append_pair("state", &state)
        .append_pair("accounts", &debtor_iban(request.psu));
    let response = reqwest::Client::new().post(url).send().await?;
    if !response.status().is_success() {
        bail!(
            "PSU {action} of consent {}: HTTP {}",
            request.consent_id,
            response.status()
        );
    }
    let body: serde_json::Value = response.json().await?;
    let redirect = body["redirect_url"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no redirect_url in {body}"))?;
    let envelope = CommandEnvelope {
        command_id: format!("complete-{}", request.consent_id),
        payment_id: request.consent_id.clone(),
        psu_id: crate::psu_name(request.psu),
        issued_at: chrono::Utc::now().timestamp_millis(),
        body: CommandBody::CompleteConsent(ScaRedirect::from_redirect_url(&url::Url::parse(
            redirect,
        )?)),
    };
    crate::common::send(producer, topic, &envelope).await
}

/// How many requests reached what their script leads to (granted, refused, superseded) or
/// another final state, from the events seen so far.
pub fn settled(requests: &[Request], events: &[ConsentStatusRecord]) -> usize {
    let mut last: HashMap<&str, &ConsentStatusRecord> = HashMap::new();
    for e in events {
        if last
            .get(e.consent_id.as_str())
            .is_none_or(|l| l.sequence < e.sequence)
        {
            last.insert(e.consent_id.as_str(), e);
        }
    }
    requests
        .iter()
        .filter(|r| {
            last.get(r.consent_id.as_str()).is_some_and(|e| {
                e.is_final || (r.script == Script::Grant && e.state == ConsentState::Granted)
            })
        })
        .count()
}

/// When things happened during the run, in the workers' clock (epoch milliseconds).
#[derive(Debug, Default, Clone)]
pub struct Times {
    /// The first initiation was published after this.
    pub load_started: i64,
    /// The dedicated API's outages, start and end.
    pub outages: Vec<(i64, i64)>,
}

impl Times {
    /// Whether a bank call between `from` and `to` may have met an outage (or the worker's
    /// circuit breaker still open after it).
    fn outage_between(&self, from: i64, to: i64) -> bool {
        self.outages
            .iter()
            .any(|(start, end)| from <= end + OUTAGE_TAIL_MS && to >= start - 1_000)
    }
}

/// What a check needs of the bank at the end.
pub struct Bank {
    /// `/admin/consents`.
    pub consents: serde_json::Value,
    /// `/admin/counters`.
    pub counters: serde_json::Value,
    /// Signed payments per end-to-end id.
    pub signed_per_e2e: HashMap<String, usize>,
    /// Every bank payment's end-to-end id (signed or not).
    pub held_e2e: HashSet<String>,
    /// `/admin/accounts/{iban}` of every PSU's debtor account.
    pub accounts: HashMap<String, serde_json::Value>,
}

pub async fn bank_accounts(
    admin: &url::Url,
    psus: usize,
) -> anyhow::Result<HashMap<String, serde_json::Value>> {
    let mut out = HashMap::new();
    for k in 0..psus {
        let iban = debtor_iban(k);
        let account: serde_json::Value =
            reqwest::get(admin.join(&format!("admin/accounts/{iban}"))?)
                .await?
                .json()
                .await?;
        out.insert(iban, account);
    }
    Ok(out)
}

/// A consent the worker granted, as its events tell.
#[derive(Debug, Clone)]
struct Grant {
    granted_at: i64,
    /// When it ended (EXPIRED), if it did.
    ended_at: Option<i64>,
}

impl Grant {
    fn usable_at(&self, t: i64) -> bool {
        self.granted_at <= t && self.ended_at.is_none_or(|end| end > t)
    }
}

pub struct Inputs<'a> {
    pub psus: usize,
    pub payments: usize,
    pub requests: &'a [Request],
    pub consent_events: &'a [ConsentStatusRecord],
    pub status_events: &'a [StatusRecord],
    /// The latest consent record per state key (superseded owners' writes skipped).
    pub consent_records: &'a HashMap<String, ConsentRecord>,
    pub bank: &'a Bank,
    pub times: &'a Times,
    /// `--unknown-outcome hold`: no end-to-end id may be signed twice, so no DUPLICATED.
    pub hold: bool,
}

pub fn check(inputs: &Inputs<'_>, report: &mut Report) {
    let grants = check_consents(inputs, report);
    let timelines = timelines(inputs.status_events);
    check_funds(inputs, &grants, &timelines, report);
    check_evidence(inputs, &grants, &timelines, report);
}

type Timelines<'a> = HashMap<&'a str, BTreeMap<i64, &'a StatusRecord>>;

fn timelines(events: &[StatusRecord]) -> Timelines<'_> {
    let mut out: Timelines<'_> = HashMap::new();
    for e in events {
        out.entry(e.payment_id.as_str())
            .or_default()
            .entry(e.sequence)
            .or_insert(e);
    }
    out
}

fn index_of(payment_id: &str) -> Option<usize> {
    payment_id.strip_prefix('c').and_then(|n| n.parse().ok())
}

/// Every request ends with one gap-free event sequence that follows the consent machine and
/// ends as its script says; the bank agrees with every grant; every granted consent is still
/// in the state topic with its token pair (it survived the SIGKILLs).
fn check_consents(
    inputs: &Inputs<'_>,
    report: &mut Report,
) -> HashMap<(usize, ConsentScope), Grant> {
    let mut by_key: HashMap<(&str, &str, i64), &ConsentStatusRecord> = HashMap::new();
    let mut republished = 0usize;
    for e in inputs.consent_events {
        match by_key.get(&(e.psu_id.as_str(), e.consent_id.as_str(), e.sequence)) {
            Some(first) => {
                republished += 1;
                // A re-publication is the stored event again, field for field.
                if *first != e {
                    report.violation(format!(
                        "consent {} #{}: two different events ({} vs {})",
                        e.consent_id,
                        e.sequence,
                        first.state.symbol(),
                        e.state.symbol()
                    ));
                }
            }
            None => {
                by_key.insert((e.psu_id.as_str(), e.consent_id.as_str(), e.sequence), e);
            }
        }
    }
    let mut lines: HashMap<&str, BTreeMap<i64, &ConsentStatusRecord>> = HashMap::new();
    for ((_, id, seq), e) in &by_key {
        lines.entry(id).or_default().insert(*seq, e);
    }
    let requested: HashSet<&str> = inputs
        .requests
        .iter()
        .map(|r| r.consent_id.as_str())
        .collect();
    for id in lines.keys().filter(|id| !requested.contains(**id)) {
        report.violation(format!(
            "consent {id}: events for a consent nobody requested"
        ));
    }
    let bank_consents: HashMap<&str, &serde_json::Value> = inputs
        .bank
        .consents
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["id"].as_str().map(|id| (id, c)))
        .collect();
    let mut grants = HashMap::new();
    let mut ends: BTreeMap<String, usize> = BTreeMap::new();
    let mut cut_by_kills = 0usize;
    for request in inputs.requests {
        let id = request.consent_id.as_str();
        let psu = crate::psu_name(request.psu);
        let Some(line) = lines.get(id) else {
            report.violation(format!("consent {id}: no consent event at all"));
            continue;
        };
        for (n, seq) in line.keys().enumerate() {
            if *seq != n as i64 + 1 {
                report.violation(format!("consent {id}: sequence gap at #{seq}"));
                break;
            }
        }
        let mut previous: Option<ConsentState> = None;
        let mut granted_at = None;
        let mut ended_at = None;
        for e in line.values() {
            if e.psu_id != psu
                || e.scope != request.scope
                || e.account_iban
                    != (request.scope == ConsentScope::Caf).then(|| debtor_iban(request.psu))
            {
                report.violation(format!(
                    "consent {id} #{}: names {} {} {:?}, not what was requested",
                    e.sequence,
                    e.psu_id,
                    e.scope.symbol(),
                    e.account_iban
                ));
            }
            // The machine's edges (domain::consent): Requested is never published.
            let allowed = matches!(
                (previous, e.state),
                (
                    None,
                    ConsentState::Pending | ConsentState::Refused | ConsentState::Expired
                ) | (
                    Some(ConsentState::Pending),
                    ConsentState::Granted | ConsentState::Refused | ConsentState::Expired
                ) | (Some(ConsentState::Granted), ConsentState::Expired)
            );
            if !allowed {
                report.violation(format!(
                    "consent {id} #{}: {} after {}",
                    e.sequence,
                    e.state.symbol(),
                    previous.map_or("nothing", ConsentState::symbol)
                ));
            }
            if e.is_final != e.state.is_final() {
                report.violation(format!(
                    "consent {id} #{}: {} with is_final {}",
                    e.sequence,
                    e.state.symbol(),
                    e.is_final
                ));
            }
            if e.state.is_final() && e.reason_code.as_deref().is_none_or(str::is_empty) {
                report.violation(format!(
                    "consent {id} #{}: {} without a reason",
                    e.sequence,
                    e.state.symbol()
                ));
            }
            if e.state == ConsentState::Pending && e.consent_uri.is_none() {
                report.violation(format!(
                    "consent {id} #{}: PENDING without a URI",
                    e.sequence
                ));
            }
            match e.state {
                ConsentState::Granted => granted_at = Some(e.occurred_at),
                ConsentState::Refused | ConsentState::Expired => ended_at = Some(e.occurred_at),
                ConsentState::Requested | ConsentState::Pending => {}
            }
            previous = Some(e.state);
        }
        let Some(last) = line.values().last() else {
            continue;
        };
        let end = match last.reason_code.as_deref() {
            Some(code) => format!("{} {code}", last.state.symbol()),
            None => last.state.symbol().to_owned(),
        };
        *ends.entry(end.clone()).or_default() += 1;
        let expected = match request.script {
            Script::Grant => "GRANTED",
            Script::Refuse => "REFUSED SCA_FAILED",
            Script::Superseded => "EXPIRED CONSENT_SUPERSEDED",
        };
        // A SIGKILL during the code exchange: the successor cannot exchange the code (single
        // use, never stored) and refuses the consent at once (domain::consent, `Restored`).
        let cut = request.script == Script::Grant
            && end == "REFUSED BANK_UNAVAILABLE"
            && last.causation_id.as_deref() == Some("worker:restore");
        if cut {
            cut_by_kills += 1;
        } else if end != expected {
            report.violation(format!(
                "consent {id}: the PSU's script leads to {expected}, it ended {end} ({})",
                last.reason_message.as_deref().unwrap_or("-")
            ));
        }
        let Some(granted_at) = granted_at else {
            continue;
        };
        grants.insert(
            (request.psu, request.scope),
            Grant {
                granted_at,
                ended_at,
            },
        );
        // The bank holds the grant the worker reports, by the PSU, for the account.
        let bank = line
            .values()
            .find_map(|e| e.consent_uri.as_deref())
            .and_then(|uri| parse_consent_uri(uri).ok())
            .and_then(|(bank_id, _)| bank_consents.get(bank_id.as_str()).copied());
        let iban = debtor_iban(request.psu);
        let agrees = bank.is_some_and(|c| {
            c["status"] == "GRANTED"
                && c["psu"].as_str() == Some(psu.as_str())
                && c["accounts"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(iban.as_str())))
        });
        if !agrees {
            report.violation(format!(
                "consent {id}: GRANTED by the worker, but the bank's consent is {}",
                bank.map_or("missing".to_owned(), |c| c.to_string())
            ));
        }
        // Survived the kills: the state topic's latest record of the entity is this consent,
        // granted, with its pair.
        if ended_at.is_none() {
            let key = format!("consent/BELFIUS/{}/{psu}", request.scope.symbol());
            match inputs.consent_records.get(&key) {
                Some(record)
                    if record.consent.consent_id.to_string() == id
                        && record.consent.state == ConsentState::Granted
                        && record.tokens.is_some() => {}
                Some(record) => report.violation(format!(
                    "consent {id}: granted, but the state topic ends with consent {} {} ({})",
                    record.consent.consent_id,
                    record.consent.state.symbol(),
                    if record.tokens.is_some() {
                        "with its pair"
                    } else {
                        "no token pair"
                    }
                )),
                None => report.violation(format!(
                    "consent {id}: granted, but the state topic has no record {key}"
                )),
            }
        }
    }
    report.row("consents requested", inputs.requests.len());
    report.row(
        "consent events (raw / after de-dup)",
        format!("{} / {}", inputs.consent_events.len(), by_key.len()),
    );
    report.row(
        "re-published consent events (dropped by de-dup)",
        republished,
    );
    for (end, n) in ends {
        report.row(&format!("consents ending {end}"), n);
    }
    report.row(
        "grants whose code exchange a SIGKILL cut (REFUSED at restore)",
        cut_by_kills,
    );
    report.row(
        "consents at the bank (consent URIs asked for)",
        bank_consents.len(),
    );
    grants
}

/// Refusals for funds: only what the bank's funds confirmation said, only with a funds check
/// and a CAF consent, never a payment the bank holds; a payment above its account's first
/// balance is refused unless its check met an outage; an account whose balance covered every
/// amount refuses nothing.
fn check_funds(
    inputs: &Inputs<'_>,
    grants: &HashMap<(usize, ConsentScope), Grant>,
    timelines: &Timelines<'_>,
    report: &mut Report,
) {
    let answers = &inputs.bank.counters["funds_answers"];
    let mut refused = 0usize;
    let mut checked = 0usize;
    let mut must = 0usize;
    let mut must_refused = 0usize;
    let mut must_excused = 0usize;
    for i in 0..inputs.payments {
        let id = crate::payment_id(i);
        let Some(line) = timelines.get(id.as_str()) else {
            continue;
        };
        let k = crate::psu_index_for(i, inputs.psus);
        let iban = debtor_iban(k);
        let first_at = line.values().next().map_or(0, |e| e.occurred_at);
        let for_funds: Vec<&&StatusRecord> = line
            .values()
            .filter(|e| e.reason_code.as_deref() == Some("INSUFFICIENT_FUNDS"))
            .collect();
        let caf = grants.get(&(k, ConsentScope::Caf));
        let asked = asks_funds_check(i) && names_debtor(i);
        let with_consent = asked && caf.is_some_and(|g| g.usable_at(first_at));
        if with_consent && crate::Script::of(i) != crate::Script::Invalid {
            checked += 1;
        }
        if let Some(e) = for_funds.first() {
            refused += 1;
            if !(e.state == StateKind::Rejected && e.is_final) {
                report.violation(format!(
                    "{id}: INSUFFICIENT_FUNDS on {} (final {})",
                    e.state.symbol(),
                    e.is_final
                ));
            }
            if !asked {
                report.violation(format!(
                    "{id}: refused for funds without asking for a funds check on its account"
                ));
            } else if caf.is_none_or(|g| g.granted_at > e.occurred_at) {
                report.violation(format!(
                    "{id}: refused for funds, but its PSU held no granted CAF consent"
                ));
            }
            if inputs.bank.held_e2e.contains(&id) {
                report.violation(format!(
                    "{id}: refused for funds, yet the bank holds a payment for it"
                ));
            }
            if !poor(k) {
                report.violation(format!(
                    "{id}: refused for funds, but {iban} started with {RICH_BALANCE_MINOR} cents, more than its PSU's payments together"
                ));
            }
            let amount = amount_minor(i);
            let said_no = answers[format!("{iban}/{amount}")]["unavailable"]
                .as_u64()
                .unwrap_or(0);
            if said_no == 0 {
                report.violation(format!(
                    "{id}: refused for funds, but the bank never said {iban} cannot cover {amount} cents"
                ));
            }
            // The balance only goes down (settlements debit it, nothing credits it): at the
            // check it was at least the final balance.
            let final_balance = inputs
                .bank
                .accounts
                .get(&iban)
                .and_then(|a| a["balance_minor"].as_i64());
            if final_balance.is_none_or(|b| amount <= b) {
                report.violation(format!(
                    "{id}: refused for funds, but {iban} held at least {final_balance:?} cents, enough for {amount}"
                ));
            }
        }
        // Above the first balance, with a usable CAF consent from before the load: refused,
        // unless the check itself could not be made.
        let usable_throughout =
            caf.is_some_and(|g| g.granted_at <= inputs.times.load_started && g.ended_at.is_none());
        if asked
            && usable_throughout
            && crate::Script::of(i) != crate::Script::Invalid
            && amount_minor(i) > initial_balance(k)
        {
            must += 1;
            if !for_funds.is_empty() {
                must_refused += 1;
            } else if inputs
                .times
                .outage_between(first_at - CHECK_WINDOW_MS, first_at)
            {
                must_excused += 1;
            } else {
                report.violation(format!(
                    "{id}: {} cents from {iban} (balance at most {} cents) with a funds check and a CAF consent, not refused ({})",
                    amount_minor(i),
                    initial_balance(k),
                    line.values()
                        .map(|e| e.state.symbol())
                        .collect::<Vec<_>>()
                        .join(" ")
                ));
            }
        }
    }
    let (mut yes, mut no) = (0u64, 0u64);
    for a in answers.as_object().into_iter().flat_map(|m| m.values()) {
        yes += a["available"].as_u64().unwrap_or(0);
        no += a["unavailable"].as_u64().unwrap_or(0);
    }
    report.row("payments with a funds check under a CAF consent", checked);
    report.row("refused INSUFFICIENT_FUNDS", refused);
    report.row(
        "above the first balance: refused / check met an outage / of",
        format!("{must_refused} / {must_excused} / {must}"),
    );
    report.row(
        "bank funds confirmations: available / not",
        format!("{yes} / {no}"),
    );
}

/// Settlement evidence on SETTLED: only for a payment naming its account under a granted AIS
/// consent; BOOKED with the bank's own bookings of its end-to-end id; DUPLICATED only when the
/// bank signed two payments of it; none only once the account's reads are used up, or when the
/// read was made (counted in the state topic) and met an outage. The worker never reads an
/// account more than four times in 24 hours, and the bank never refused a read for that.
fn check_evidence(
    inputs: &Inputs<'_>,
    grants: &HashMap<(usize, ConsentScope), Grant>,
    timelines: &Timelines<'_>,
    report: &mut Report,
) {
    // Per account: the SETTLED events of payments that must carry evidence, by time.
    let mut due: BTreeMap<String, Vec<&StatusRecord>> = BTreeMap::new();
    let mut outcomes: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut uncertain = 0usize;
    for e in timelines
        .values()
        .flat_map(|line| line.values())
        .filter(|e| e.state == StateKind::Settled)
    {
        let Some(i) = index_of(&e.payment_id) else {
            continue;
        };
        let k = crate::psu_index_for(i, inputs.psus);
        let iban = debtor_iban(k);
        let ais = grants.get(&(k, ConsentScope::Ais));
        if ais.is_some_and(|g| g.granted_at > inputs.times.load_started) {
            // Granted while payments were settling: which ones it covered is not provable.
            uncertain += 1;
            continue;
        }
        let eligible = names_debtor(i) && ais.is_some_and(|g| g.usable_at(e.occurred_at));
        let Some(evidence) = &e.settlement else {
            if eligible {
                due.entry(iban).or_default().push(e);
            } else {
                *outcomes
                    .entry("none (no AIS consent or no debtor)")
                    .or_default() += 1;
            }
            continue;
        };
        if !eligible {
            report.violation(format!(
                "{}: settlement evidence without a granted AIS consent naming its account",
                e.payment_id
            ));
            continue;
        }
        due.entry(iban.clone()).or_default().push(e);
        let bookings: Vec<(String, String)> = inputs
            .bank
            .accounts
            .get(&iban)
            .and_then(|a| a["bookings"].as_array())
            .into_iter()
            .flatten()
            .map(|b| {
                (
                    b["reference"]
                        .as_u64()
                        .map(|r| r.to_string())
                        .unwrap_or_default(),
                    b["end_to_end_id"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let of_payment: HashSet<&str> = bookings
            .iter()
            .filter(|(_, e2e)| *e2e == e.payment_id)
            .map(|(r, _)| r.as_str())
            .collect();
        match evidence.outcome {
            SettlementOutcome::Booked => {
                *outcomes.entry("BOOKED").or_default() += 1;
                if evidence.transaction_refs.is_empty()
                    || evidence
                        .transaction_refs
                        .iter()
                        .any(|r| !of_payment.contains(r.as_str()))
                {
                    report.violation(format!(
                        "{}: BOOKED with {:?}, the bank booked {:?} for it on {iban}",
                        e.payment_id, evidence.transaction_refs, of_payment
                    ));
                }
                // References grow with each booking of the account: one below the booking the
                // read found was there too, and two bookings of one end-to-end id are
                // DUPLICATED.
                let found = evidence
                    .transaction_refs
                    .iter()
                    .filter_map(|r| r.parse::<u64>().ok())
                    .max();
                let earlier = of_payment
                    .iter()
                    .filter_map(|r| r.parse::<u64>().ok())
                    .filter(|r| found.is_some_and(|f| *r < f))
                    .count();
                if earlier > 0 {
                    report.violation(format!(
                        "{}: BOOKED with {:?}, but the bank had already booked it before ({:?} on {iban}): DUPLICATED",
                        e.payment_id, evidence.transaction_refs, of_payment
                    ));
                }
            }
            SettlementOutcome::Duplicated => {
                *outcomes.entry("DUPLICATED").or_default() += 1;
                let signed = inputs
                    .bank
                    .signed_per_e2e
                    .get(&e.payment_id)
                    .copied()
                    .unwrap_or(0);
                if inputs.hold || signed < 2 || of_payment.len() < 2 {
                    report.violation(format!(
                        "{}: DUPLICATED ({:?}), but the bank signed {signed} payment(s) and booked {} for it",
                        e.payment_id,
                        evidence.transaction_refs,
                        of_payment.len()
                    ));
                }
            }
            SettlementOutcome::NotBooked | SettlementOutcome::Ambiguous => {
                *outcomes
                    .entry(match evidence.outcome {
                        SettlementOutcome::NotBooked => "NOT_BOOKED",
                        SettlementOutcome::Ambiguous
                        | SettlementOutcome::Booked
                        | SettlementOutcome::Duplicated => "AMBIGUOUS",
                    })
                    .or_default() += 1;
                // The sandbox books a payment before it reports it executed.
                report.violation(format!(
                    "{}: settlement evidence {:?}, but the bank booked {:?} for it on {iban}",
                    e.payment_id, evidence.outcome, of_payment
                ));
            }
        }
    }
    // The worker's reads per account, as durable in the state topic (each is counted before it
    // is made): matched against what the events carry.
    let reads_of = |k: usize| -> Vec<i64> {
        let iban = debtor_iban(k);
        let key = format!("consent/BELFIUS/AIS/{}", crate::psu_name(k));
        let mut reads: Vec<i64> = inputs
            .consent_records
            .get(&key)
            .map(|r| {
                r.unattended_reads
                    .iter()
                    .filter(|(account, _)| *account == iban)
                    .map(|(_, at)| *at)
                    .collect()
            })
            .unwrap_or_default();
        reads.sort_unstable();
        reads
    };
    let mut reserved_total = 0usize;
    for k in 0..inputs.psus {
        let iban = debtor_iban(k);
        let n = reads_of(k).len();
        reserved_total += n;
        if n > READS_PER_DAY {
            report.violation(format!(
                "{iban}: the worker counted {n} unattended reads within 24 h (the bank allows {READS_PER_DAY})"
            ));
        }
        // Every read the bank served was counted first.
        let served = inputs.bank.counters["unattended_reads"][iban.as_str()]
            .as_u64()
            .unwrap_or(0);
        if served > n as u64 {
            report.violation(format!(
                "{iban}: the bank served {served} unattended reads, the worker counted {n}"
            ));
        }
    }
    let mut wasted = 0usize;
    let mut accounts_used_up = 0usize;
    for (iban, events) in &mut due {
        events.sort_by_key(|e| e.occurred_at);
        let Some(k) = (0..inputs.psus).find(|k| debtor_iban(*k) == *iban) else {
            continue;
        };
        let reads = reads_of(k);
        let with_evidence = events.iter().filter(|e| e.settlement.is_some()).count();
        if with_evidence > READS_PER_DAY {
            report.violation(format!(
                "{iban}: {with_evidence} SETTLED events carry evidence, more than {READS_PER_DAY} reads a day"
            ));
        }
        if with_evidence >= READS_PER_DAY || reads.len() >= READS_PER_DAY {
            accounts_used_up += 1;
        }
        let mut used = vec![false; reads.len()];
        // A read with evidence: the latest read counted before it was checked (the consent's
        // calls go one at a time, so in the order they were checked).
        let mut read: Vec<(&StatusRecord, i64)> = events
            .iter()
            .filter_map(|e| e.settlement.as_ref().map(|s| (*e, s.checked_at)))
            .collect();
        read.sort_by_key(|(_, checked_at)| *checked_at);
        for (e, checked_at) in read {
            match (0..reads.len())
                .rev()
                .find(|n| !used[*n] && reads[*n] <= checked_at)
            {
                Some(n) => used[n] = true,
                None => report.violation(format!(
                    "{}: evidence read at {checked_at} on {iban}, but the state topic counts no read for it",
                    e.payment_id
                )),
            }
        }
        for e in events.iter().filter(|e| e.settlement.is_none()) {
            let t = e.occurred_at;
            let before = reads.iter().filter(|at| **at <= t).count();
            if before >= READS_PER_DAY {
                *outcomes
                    .entry("none: the account's reads used up")
                    .or_default() += 1;
                continue;
            }
            // Used up while it waited behind earlier settlements of the account (their reads
            // go one at a time): then nothing settled after it was read either.
            let read_later = events
                .iter()
                .any(|o| o.occurred_at > t && o.settlement.is_some());
            if reads.len() >= READS_PER_DAY && !read_later {
                *outcomes
                    .entry("none: the account's reads used up while it waited")
                    .or_default() += 1;
                continue;
            }
            // The read was made (counted first) and gave nothing: it failed.
            match (0..reads.len()).find(|n| !used[*n] && reads[*n] >= t) {
                Some(n) => {
                    used[n] = true;
                    if inputs.times.outage_between(reads[n], reads[n]) {
                        *outcomes.entry("none: the read met an outage").or_default() += 1;
                    } else {
                        report.violation(format!(
                            "{}: SETTLED without evidence, its read of {iban} ({} ms after it settled) failed outside any outage",
                            e.payment_id,
                            reads[n] - t
                        ));
                    }
                }
                None => report.violation(format!(
                    "{}: SETTLED without evidence, though {iban} had {before} of {READS_PER_DAY} reads counted and none was made for it (reads at {:?} ms from it)",
                    e.payment_id,
                    reads.iter().map(|r| r - t).collect::<Vec<_>>()
                )),
            }
        }
        wasted += used.iter().filter(|u| !**u).count();
    }
    for (outcome, n) in &outcomes {
        report.row(&format!("SETTLED evidence {outcome}"), n);
    }
    if uncertain > 0 {
        report.row(
            "SETTLED under an AIS consent granted after the load began (not judged)",
            uncertain,
        );
    }
    report.row(
        "accounts whose 4 daily reads were used up",
        accounts_used_up,
    );
    let sum = |name: &str| -> u64 {
        inputs.bank.counters[name]
            .as_object()
            .into_iter()
            .flat_map(|m| m.values())
            .filter_map(serde_json::Value::as_u64)
            .sum()
    };
    let (served, refused) = (sum("unattended_reads"), sum("unattended_refused"));
    report.row(
        "unattended reads: counted by the worker / served by the bank / not on any event",
        format!("{reserved_total} / {served} / {wasted}"),
    );
    if refused > 0 {
        report.violation(format!(
            "the bank refused {refused} unattended read(s) for the day's budget: the worker read beyond it ({})",
            inputs.bank.counters["unattended_refused"]
        ));
    }
}
