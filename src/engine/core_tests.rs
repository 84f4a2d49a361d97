//! Unit tests of the partition owner's core: each test replays an interleaving of events (command
//! records, acknowledged writes, bank answers, records of a superseded owner, revocation, a newer
//! claim, time) and asserts on the actions the core emits and on what it then holds.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use rdkafka::Timestamp;
use secrecy::ExposeSecret;

use super::*;
use crate::contract::command::{CommandBody, ScaRedirect};
use crate::domain::bank::BankProgress;
use crate::domain::machine::PaymentState;
use crate::domain::model::{
    Amount, BankPaymentId, CommandId, Language, Order, PaymentOrder, PaymentProduct, PsuId,
    RawInitiatePayment,
};
use crate::engine::restore::RestoreFold;
use crate::kafka::partitioner::partition_for;
use crate::kafka::state;
use crate::secret::StateKeyRing;

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// 2026-03-02T00:00:00Z: every test starts here.
const T0: Millis = 1_772_409_600_000;
const PARTITION: i32 = 0;
const PARTITIONS: i32 = 1;
/// The offset of the owner's restore marker (its epoch); its first state write lands after it.
const EPOCH: i64 = 99;
const PSU: &str = "psu-1";
const CHECKPOINT_INTERVAL: Millis = 600_000;
const DRAIN_TIMEOUT: Millis = 30_000;
const FINISH_TIMEOUT: Millis = 5_000;
/// Final payments retire a week after their final event (the default).
const RETENTION: Millis = 7 * 24 * 3_600_000;
/// Retired ids are forgotten 35 days after the final event (the default).
const RETIRED_IDS_RETENTION: Millis = 35 * 24 * 3_600_000;

fn config(policy: Policy) -> CoreConfig {
    CoreConfig {
        partition: PARTITION,
        partitions: PARTITIONS,
        epoch: EPOCH,
        policy,
        limits: ValidationLimits::default(),
        drain_timeout_ms: DRAIN_TIMEOUT,
        checkpoint_interval_ms: CHECKPOINT_INTERVAL,
        finish_timeout_ms: FINISH_TIMEOUT,
        retention_ms: RETENTION,
        retired_ids_retention_ms: RETIRED_IDS_RETENTION,
        // No snapshot unless a test asks for one.
        snapshot_interval_ms: Millis::MAX / 4,
        snapshot_min_records: u64::MAX,
    }
}

/// Predictable secrets: `verifier-N`, `state-N`.
#[derive(Default)]
struct Counters {
    verifiers: u64,
    states: u64,
}

impl Randomness for Counters {
    fn pkce_verifier(&mut self) -> SecretString {
        self.verifiers += 1;
        SecretString::from(format!("verifier-{}", self.verifiers))
    }

    fn sca_state(&mut self) -> String {
        self.states += 1;
        format!("state-{}", self.states)
    }
}

fn brand(name: &str) -> Brand {
    Brand::parse(name).expect("brand")
}

fn token_key(brand_name: &str) -> TokenKey {
    TokenKey::new(brand(brand_name), PsuId::new(PSU))
}

fn pid(id: &str) -> PaymentId {
    PaymentId::new(id)
}

/// A token pair of the test PSU at `brand_name`.
fn pair(
    brand_name: &str,
    access: &str,
    expires_at: Option<Millis>,
    refresh: Option<&str>,
) -> PsuTokens {
    PsuTokens {
        psu_id: PsuId::new(PSU),
        brand: brand(brand_name),
        access_token: SecretString::from(access.to_owned()),
        refresh_token: refresh.map(|r| SecretString::from(r.to_owned())),
        expires_at,
        updated_at: T0 - 600_000,
    }
}

/// A fresh pair (valid for an hour).
fn fresh(brand_name: &str, access: &str) -> PsuTokens {
    pair(brand_name, access, Some(T0 + 3_600_000), Some("refresh"))
}

/// A pair whose access token expired, with a refresh token.
fn expired(brand_name: &str, access: &str, refresh: &str) -> PsuTokens {
    pair(brand_name, access, Some(T0 - 1_000), Some(refresh))
}

// Bank answers.

fn initiated(id: &str) -> BankAnswer {
    BankAnswer::Input(Box::new(Input::BankInitiated {
        bank_payment_id: BankPaymentId::new(format!("bank-{id}")),
        sca_redirect_url: format!("https://bank.example/sca/{id}"),
        bank_status: Some("RCVD".into()),
    }))
}

fn observed(progress: BankProgress, bank_status: &str) -> BankAnswer {
    BankAnswer::Input(Box::new(Input::StatusObserved {
        progress,
        bank_status: bank_status.into(),
    }))
}

fn issued(access: &str) -> BankAnswer {
    BankAnswer::Tokens(TokenPair {
        access_token: SecretString::from(access.to_owned()),
        refresh_token: Some(SecretString::from(format!("refresh-of-{access}"))),
        expires_in: Some(Duration::from_secs(600)),
        scope: None,
    })
}

// Command bodies.

fn initiate_body(id: &str, brand_name: &str) -> CommandBody {
    CommandBody::Initiate(Box::new(RawInitiatePayment {
        payment_product: "SEPA_CREDIT_TRANSFERS".into(),
        brand: brand_name.into(),
        amount: "12.34".into(),
        currency: "EUR".into(),
        creditor_name: "Alice".into(),
        creditor_iban: "BE68539007547034".into(),
        end_to_end_id: format!("E2E-{id}"),
        language: "fr".into(),
        redirect_uri: "https://client.example/cb".into(),
        ..Default::default()
    }))
}

fn sca_code(code: &str, state: Option<&str>) -> CommandBody {
    CommandBody::CompleteSca(ScaRedirect {
        authorization_code: Some(SecretString::from(code.to_owned())),
        error: None,
        error_description: None,
        state: state.map(str::to_owned),
    })
}

/// The redirect of a payment initiated with the PSU's token: the state only.
fn sca_returned_body(state: Option<&str>) -> CommandBody {
    CommandBody::CompleteSca(ScaRedirect {
        authorization_code: None,
        error: None,
        error_description: None,
        state: state.map(str::to_owned),
    })
}

fn cancel_body() -> CommandBody {
    CommandBody::Cancel { reason: None }
}

// Payments built directly through the machine, for restored state.

fn order(id: &str, brand_name: &str) -> Order {
    Order::Single(PaymentOrder {
        product: PaymentProduct::SepaCreditTransfers,
        brand: brand(brand_name),
        amount: Amount::from_minor(1234),
        currency: "EUR".into(),
        creditor_name: "Alice".into(),
        creditor_iban: "BE68539007547034".into(),
        creditor_bic: None,
        debtor_iban: None,
        end_to_end_id: format!("E2E-{id}"),
        remittance_information: None,
        requested_execution_date: None,
        language: Language::Fr,
        redirect_uri: "https://client.example/cb".into(),
        cross_border: None,
    })
}

/// One machine step that must change the payment.
fn step(
    id: &str,
    current: Option<&Payment>,
    input: Input,
    now: Millis,
) -> (Payment, Vec<StatusEvent>) {
    match decide(&pid(id), current, input, now, &Policy::default()) {
        Outcome::Changed(t) => (t.payment, t.events),
        other => panic!("{id}: {other:?}"),
    }
}

/// `RECEIVED`, as the first write of an initiation leaves it (no timer).
fn received_payment(id: &str, brand_name: &str) -> (Payment, Vec<StatusEvent>) {
    let input = Input::Initiate {
        command_id: CommandId::new(format!("c-init-{id}")),
        psu_id: PsuId::new(PSU),
        order: order(id, brand_name),
        always_pkce: false,
    };
    step(id, None, input, T0 - 10_000)
}

/// `SCA_PENDING` at `T0`, OAuth state `state-{id}`, its poll timer at `T0 + 2 s`.
fn sca_pending_payment(id: &str, brand_name: &str) -> (Payment, Vec<StatusEvent>) {
    let (p, _) = received_payment(id, brand_name);
    let begin = Input::BeginInitiation {
        pkce_verifier: Some(SecretString::from(format!("verifier-{id}"))),
        sca_state: format!("state-{id}"),
    };
    let (p, _) = step(id, Some(&p), begin, T0 - 5_000);
    let BankAnswer::Input(answer) = initiated(id) else {
        unreachable!()
    };
    step(id, Some(&p), *answer, T0)
}

/// `SIGNED` (a poll saw the signature before any code), its poll timer at `T0 + 2 s`.
fn signed_payment(id: &str, brand_name: &str) -> Payment {
    let (p, _) = sca_pending_payment(id, brand_name);
    let BankAnswer::Input(answer) = observed(BankProgress::Signed, "ACTC") else {
        unreachable!()
    };
    let (p, _) = step(id, Some(&p), *answer, T0);
    assert_eq!(p.state, PaymentState::Signed);
    assert_eq!(p.next_check_at, Some(T0 + 2_000));
    p
}

/// `CANCELLING`, as a crash right after its write leaves it: no timer.
fn cancelling_payment(id: &str, brand_name: &str) -> Payment {
    let p = signed_payment(id, brand_name);
    let cancel = Input::Cancel {
        command_id: CommandId::new(format!("c-cancel-{id}")),
        psu_id: PsuId::new(PSU),
        bank_token: true,
    };
    let (p, _) = step(id, Some(&p), cancel, T0);
    assert_eq!(p.state, PaymentState::Cancelling);
    assert_eq!(p.next_check_at, None);
    p
}

/// What a restore of a partition with these payments and pairs gives (marker at `EPOCH`).
fn restored(payments: Vec<Payment>, tokens: Vec<PsuTokens>) -> Restored {
    Restored {
        payments: payments
            .into_iter()
            .map(|p| (p.payment_id.clone(), p))
            .collect(),
        tokens: tokens
            .into_iter()
            .map(|t| (TokenKey::new(t.brand, t.psu_id.clone()), t))
            .collect(),
        checkpoint: EPOCH - 1,
        end_offset: EPOCH + 1,
        ..Restored::default()
    }
}

/// A state partition written record by record (real encoded records), folded by restore.
struct StateLog {
    key: StateKeyRing,
    records: Vec<(String, Option<Vec<u8>>, Option<i64>)>,
}

impl StateLog {
    fn new() -> Self {
        Self {
            key: StateKeyRing::generate(),
            records: Vec::new(),
        }
    }

    fn push(&mut self, key: String, value: Option<Vec<u8>>, epoch: Option<i64>) -> i64 {
        self.records.push((key, value, epoch));
        self.records.len() as i64 - 1
    }

    fn marker(&mut self, owner: &str) -> i64 {
        let (k, v) = state::encode_restore_marker(PARTITION, owner).expect("marker");
        self.push(k, Some(v), None)
    }

    fn payment(&mut self, epoch: i64, p: &Payment, events: &[StatusEvent]) -> i64 {
        let (k, v) = state::encode_payment(&self.key, epoch, p, events).expect("payment");
        self.push(k, Some(v), Some(epoch))
    }

    fn checkpoint(&mut self, epoch: i64, through: i64) -> i64 {
        let (k, v) =
            state::encode_checkpoint(&self.key, PARTITION, epoch, through).expect("checkpoint");
        self.push(k, Some(v), Some(epoch))
    }

    fn raw(&mut self, key: &str, value: &[u8], epoch: i64) -> i64 {
        self.push(key.to_owned(), Some(value.to_vec()), Some(epoch))
    }

    /// A write of the owner, encoded as the shell encodes it.
    fn write(&mut self, epoch: i64, write: &StateWrite) -> i64 {
        let key = write.key(PARTITION);
        let value = match write {
            StateWrite::Payment { payment, events } => Some(
                state::encode_payment(&self.key, epoch, payment, events)
                    .expect("payment")
                    .1,
            ),
            StateWrite::Tokens(t) => Some(state::encode_psu(&self.key, epoch, t).expect("psu").1),
            StateWrite::Consent { record, events } => Some(
                state::encode_consent(&self.key, epoch, record, events)
                    .expect("consent")
                    .1,
            ),
            StateWrite::Retired(r) => Some(
                state::encode_retired(&self.key, epoch, r)
                    .expect("retired")
                    .1,
            ),
            StateWrite::Checkpoint { through } => Some(
                state::encode_checkpoint(&self.key, PARTITION, epoch, *through)
                    .expect("checkpoint")
                    .1,
            ),
            StateWrite::SnapshotBegin { key, at } => {
                Some(state::encode_snapshot(&self.key, key, epoch, None, *at).expect("snapshot"))
            }
            StateWrite::SnapshotEnd { begin, entities } => Some(
                state::encode_snapshot(&self.key, &key, epoch, Some((*begin, *entities)), 0)
                    .expect("snapshot"),
            ),
            StateWrite::QuarantinedCopy { key, record } => {
                Some(state::encode_quarantined_copy(&self.key, key, epoch, record).expect("copy"))
            }
            StateWrite::DeleteTokens(_) | StateWrite::DeleteKey(_) => None,
        };
        self.push(key, value, Some(epoch))
    }

    /// A restore from the committed snapshot `start` up to the claim at `marker`.
    fn restore_from(&self, start: &SnapshotStart, marker: i64) -> Restored {
        let mut fold = RestoreFold::new(&self.key, marker);
        let (k, v, e) = &self.records[start.begin as usize];
        fold.start_at(
            start.begin,
            start.begin,
            Some(k.as_bytes()),
            v.as_deref(),
            *e,
        )
        .expect("the snapshot's begin");
        assert_eq!(fold.snapshot(), Some(*start));
        for (offset, (k, v, e)) in self.records.iter().enumerate().skip(start.begin as usize) {
            fold.apply(offset as i64, Some(k.as_bytes()), v.as_deref(), *e);
        }
        fold.finish()
    }

    fn restore(&self, marker: i64) -> Restored {
        let mut fold = RestoreFold::new(&self.key, marker);
        for (offset, (k, v, e)) in self.records.iter().enumerate() {
            fold.apply(offset as i64, Some(k.as_bytes()), v.as_deref(), *e);
        }
        fold.finish()
    }
}

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// An action, as a comparable summary (the harness keeps the details).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Did {
    Write {
        id: WriteId,
        key: String,
        what: &'static str,
        confirm: bool,
    },
    Publish {
        state_offset: i64,
        states: Vec<StateKind>,
    },
    Call {
        id: CallId,
        payment: String,
        call: &'static str,
    },
    PublishConsent {
        state_offset: i64,
        states: Vec<crate::domain::consent::ConsentState>,
    },
    ConsentCall {
        id: CallId,
        call: &'static str,
    },
    DeadLetter {
        offset: i64,
        class: &'static str,
    },
    Committable(i64),
    Released,
    Fenced(i64),
    CommitSnapshot(SnapshotStart),
}

fn what(write: &StateWrite) -> &'static str {
    match write {
        StateWrite::Payment { .. } => "payment",
        StateWrite::Tokens(_) => "tokens",
        StateWrite::Consent { .. } => "consent",
        StateWrite::Retired(_) => "retired",
        StateWrite::DeleteTokens(_) => "delete-tokens",
        StateWrite::DeleteKey(_) => "delete-key",
        StateWrite::Checkpoint { .. } => "checkpoint",
        StateWrite::SnapshotBegin { .. } => "snapshot-begin",
        StateWrite::SnapshotEnd { .. } => "snapshot-end",
        StateWrite::QuarantinedCopy { .. } => "quarantined-copy",
    }
}

fn call_kind(call: &BankCall) -> &'static str {
    match call {
        BankCall::Initiate { access_token: None } => "initiate",
        BankCall::Initiate {
            access_token: Some(_),
        } => "initiate-with-token",
        BankCall::Status => "status",
        BankCall::Exchange => "exchange",
        BankCall::Cancel { .. } => "cancel",
        BankCall::Refresh { .. } => "refresh",
    }
}

/// `(key, what)` of every write among `did`.
fn writes(did: &[Did]) -> Vec<(String, &'static str)> {
    did.iter()
        .filter_map(|d| match d {
            Did::Write { key, what, .. } => Some((key.clone(), *what)),
            _ => None,
        })
        .collect()
}

/// `(payment, call)` of every bank call among `did`.
fn calls(did: &[Did]) -> Vec<(String, &'static str)> {
    did.iter()
        .filter_map(|d| match d {
            Did::Call { payment, call, .. } => Some((payment.clone(), *call)),
            _ => None,
        })
        .collect()
}

fn dead_letters(did: &[Did]) -> Vec<(i64, &'static str)> {
    did.iter()
        .filter_map(|d| match d {
            Did::DeadLetter { offset, class } => Some((*offset, *class)),
            _ => None,
        })
        .collect()
}

fn published(did: &[Did]) -> Vec<(i64, Vec<StateKind>)> {
    did.iter()
        .filter_map(|d| match d {
            Did::Publish {
                state_offset,
                states,
            } => Some((*state_offset, states.clone())),
            _ => None,
        })
        .collect()
}

fn released(did: &[Did]) -> bool {
    did.contains(&Did::Released)
}

fn pw(payment: &str) -> (String, &'static str) {
    (format!("payment/{payment}"), "payment")
}

fn pc(payment: &str, call: &'static str) -> (String, &'static str) {
    (payment.to_owned(), call)
}

struct OpenWrite {
    id: WriteId,
    write: StateWrite,
    fence: FenceWait,
}

struct OpenCall {
    id: CallId,
    payment: Box<Payment>,
    call: BankCall,
}

struct OpenDeadLetter {
    record: Box<OwnedMessage>,
    class: &'static str,
    payment_id: Option<String>,
}

fn consent_call_kind(call: &ConsentCall) -> &'static str {
    match call {
        ConsentCall::Uri { .. } => "consent-uri",
        ConsentCall::Exchange { .. } => "consent-exchange",
        ConsentCall::Refresh { .. } => "consent-refresh",
        ConsentCall::Funds { .. } => "funds",
        ConsentCall::Evidence { .. } => "evidence",
    }
}

struct Harness {
    core: OwnerCore,
    now: Millis,
    consent_calls: Vec<(CallId, ConsentCall)>,
    consent_publications: Vec<(i64, Vec<ConsentEvent>)>,
    /// Writes not yet acknowledged, in the order they were asked for.
    writes: VecDeque<OpenWrite>,
    calls: Vec<OpenCall>,
    publications: Vec<(i64, Vec<StatusEvent>)>,
    dead_letters: Vec<OpenDeadLetter>,
    committable: Option<i64>,
    released: bool,
    fenced: Option<i64>,
    next_state_offset: i64,
    next_command_offset: i64,
    /// The latest payment record of each payment this owner's acknowledged writes left.
    persisted: HashMap<PaymentId, Payment>,
    persisted_tokens: HashMap<TokenKey, PsuTokens>,
    /// Every action so far.
    history: Vec<Did>,
    /// When set, every acknowledged write is encoded into it at its offset (restore tests).
    log: Option<StateLog>,
}

impl Harness {
    fn new(restored: Restored) -> Self {
        Self::with_config(restored, config(Policy::default()))
    }

    fn with_config(restored: Restored, config: CoreConfig) -> Self {
        let next_state_offset = restored.end_offset;
        let persisted_tokens = restored
            .tokens
            .iter()
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        Harness {
            core: OwnerCore::new(config, restored, Box::new(Counters::default()), T0),
            now: T0,
            consent_calls: Vec::new(),
            consent_publications: Vec::new(),
            writes: VecDeque::new(),
            calls: Vec::new(),
            publications: Vec::new(),
            dead_letters: Vec::new(),
            committable: None,
            released: false,
            fenced: None,
            next_state_offset,
            next_command_offset: 0,
            persisted: HashMap::new(),
            persisted_tokens,
            history: Vec::new(),
            log: None,
        }
    }

    /// A started owner with nothing restored.
    fn empty() -> Self {
        let mut h = Harness::new(restored(vec![], vec![]));
        let did = h.start();
        assert!(did.is_empty(), "{did:?}");
        h
    }

    fn start(&mut self) -> Vec<Did> {
        self.on(Event::Start)
    }

    fn on(&mut self, event: Event) -> Vec<Did> {
        let actions = self.core.on(event, self.now);
        self.absorb(actions)
    }

    fn absorb(&mut self, actions: Vec<Action>) -> Vec<Did> {
        let mut did = Vec::new();
        for action in actions {
            assert!(
                self.fenced.is_none() && !self.released,
                "an action after the owner was fenced or released: {action:?}"
            );
            let d = match action {
                Action::Write { id, write, fence } => {
                    let d = Did::Write {
                        id,
                        key: write.key(PARTITION),
                        what: what(&write),
                        confirm: fence.confirms(),
                    };
                    self.writes.push_back(OpenWrite { id, write, fence });
                    d
                }
                Action::Publish {
                    state_offset,
                    events,
                } => {
                    let states = events.iter().map(|e| e.state).collect();
                    self.publications.push((state_offset, events));
                    Did::Publish {
                        state_offset,
                        states,
                    }
                }
                Action::PublishConsent {
                    state_offset,
                    events,
                } => {
                    let states = events.iter().map(|e| e.state).collect();
                    self.consent_publications.push((state_offset, events));
                    Did::PublishConsent {
                        state_offset,
                        states,
                    }
                }
                Action::ConsentCall { id, call } => {
                    let d = Did::ConsentCall {
                        id,
                        call: consent_call_kind(&call),
                    };
                    self.consent_calls.push((id, call));
                    d
                }
                Action::Call { id, payment, call } => {
                    let d = Did::Call {
                        id,
                        payment: payment.payment_id.to_string(),
                        call: call_kind(&call),
                    };
                    self.calls.push(OpenCall { id, payment, call });
                    d
                }
                Action::DeadLetter {
                    record,
                    class,
                    payment_id,
                    ..
                } => {
                    let d = Did::DeadLetter {
                        offset: record.offset(),
                        class,
                    };
                    self.dead_letters.push(OpenDeadLetter {
                        record,
                        class,
                        payment_id,
                    });
                    d
                }
                Action::Committable(offset) => {
                    assert!(
                        self.committable.is_none_or(|c| offset >= c),
                        "the committable offset went back from {:?} to {offset}",
                        self.committable
                    );
                    self.committable = Some(offset);
                    Did::Committable(offset)
                }
                Action::Released => {
                    self.released = true;
                    Did::Released
                }
                Action::Fenced { claimed_at } => {
                    self.fenced = Some(claimed_at);
                    Did::Fenced(claimed_at)
                }
                Action::CommitSnapshot(start) => Did::CommitSnapshot(start),
            };
            self.history.push(d.clone());
            did.push(d);
        }
        did
    }

    fn tick(&mut self) -> Vec<Did> {
        self.on(Event::Tick)
    }

    /// Moves the clock to `at` and ticks.
    fn tick_at(&mut self, at: Millis) -> Vec<Did> {
        assert!(at >= self.now, "time goes forward");
        self.now = at;
        self.tick()
    }

    /// A command record at `offset`, keyed by `psu` on its partition.
    fn command_at(
        &mut self,
        offset: i64,
        command_id: &str,
        psu: &str,
        payment: &str,
        body: CommandBody,
    ) -> Vec<Did> {
        self.next_command_offset = self.next_command_offset.max(offset + 1);
        let envelope = CommandEnvelope {
            command_id: command_id.into(),
            payment_id: payment.into(),
            psu_id: psu.into(),
            issued_at: self.now,
            body,
        };
        let partition = partition_for(psu.as_bytes(), PARTITIONS);
        self.record_at(
            offset,
            psu,
            partition,
            Decoded::Envelope(Box::new(envelope)),
        )
    }

    /// Any command record: its key, the partition it is on, what decoding it gave.
    fn record_at(&mut self, offset: i64, key: &str, partition: i32, decoded: Decoded) -> Vec<Did> {
        self.next_command_offset = self.next_command_offset.max(offset + 1);
        let message = OwnedMessage::new(
            None,
            Some(key.as_bytes().to_vec()),
            "payment-commands".into(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        );
        self.on(Event::Command(Box::new(CommandRecord { message, decoded })))
    }

    /// The next command record of the test PSU; returns its offset.
    fn command(&mut self, command_id: &str, payment: &str, body: CommandBody) -> (i64, Vec<Did>) {
        let offset = self.next_command_offset;
        let did = self.command_at(offset, command_id, PSU, payment, body);
        (offset, did)
    }

    fn initiate(&mut self, payment: &str, brand_name: &str) -> (i64, Vec<Did>) {
        self.command(
            &format!("c-init-{payment}"),
            payment,
            initiate_body(payment, brand_name),
        )
    }

    /// A `CompleteSca` with the OAuth state of the payment's current attempt.
    fn complete_sca(&mut self, command_id: &str, payment: &str, code: &str) -> (i64, Vec<Did>) {
        let state = self.payment(payment).sca_state.clone();
        self.command(command_id, payment, sca_code(code, state.as_deref()))
    }

    /// Acknowledges the oldest pending write at `offset`.
    fn ack_write_at(&mut self, offset: i64) -> Vec<Did> {
        let w = self.writes.pop_front().expect("a pending write");
        self.next_state_offset = self.next_state_offset.max(offset + 1);
        if let Some(log) = &mut self.log {
            assert_eq!(
                log.records.len() as i64,
                offset,
                "the log is written in order"
            );
            log.write(self.core.epoch(), &w.write);
        }
        match &w.write {
            StateWrite::Payment { payment, .. } => {
                self.persisted
                    .insert(payment.payment_id.clone(), (**payment).clone());
            }
            StateWrite::Tokens(tokens) => {
                self.persisted_tokens.insert(
                    TokenKey::new(tokens.brand, tokens.psu_id.clone()),
                    (**tokens).clone(),
                );
            }
            StateWrite::DeleteTokens(key) => {
                self.persisted_tokens.remove(key);
            }
            StateWrite::Retired(retired) => {
                self.persisted.remove(&retired.payment_id);
            }
            StateWrite::DeleteKey(_)
            | StateWrite::Consent { .. }
            | StateWrite::Checkpoint { .. }
            | StateWrite::SnapshotBegin { .. }
            | StateWrite::SnapshotEnd { .. }
            | StateWrite::QuarantinedCopy { .. } => {}
        }
        self.on(Event::Written {
            write: w.id,
            offset,
        })
    }

    /// Acknowledges the oldest pending write at the next offset.
    fn ack_write(&mut self) -> Vec<Did> {
        let offset = self.next_state_offset;
        self.ack_write_at(offset)
    }

    /// Acknowledges the writes pending now (not those their acknowledgements cause), in order.
    fn ack_writes(&mut self) -> Vec<Did> {
        let mut did = Vec::new();
        for _ in 0..self.writes.len() {
            did.extend(self.ack_write());
        }
        did
    }

    fn ack_publications(&mut self) -> Vec<Did> {
        let mut did = Vec::new();
        for (state_offset, _) in std::mem::take(&mut self.publications) {
            did.extend(self.on(Event::Published { state_offset }));
        }
        for (state_offset, _) in std::mem::take(&mut self.consent_publications) {
            did.extend(self.on(Event::Published { state_offset }));
        }
        did
    }

    /// Answers the outstanding consent call of `kind` (the only one).
    fn answer_consent(&mut self, kind: &str, answer: ConsentAnswer) -> Vec<Did> {
        let at = self
            .consent_calls
            .iter()
            .position(|(_, c)| consent_call_kind(c) == kind)
            .unwrap_or_else(|| panic!("no {kind} consent call"));
        let (id, _) = self.consent_calls.remove(at);
        self.on(Event::Answered {
            call: id,
            answer: BankAnswer::Consent(answer),
        })
    }

    fn ack_dead_letters(&mut self) -> Vec<Did> {
        let mut did = Vec::new();
        for dead in std::mem::take(&mut self.dead_letters) {
            let command_offset = dead.record.offset();
            did.extend(self.on(Event::DeadLettered { command_offset }));
        }
        did
    }

    /// Acknowledges writes, publications and dead letters until none is pending (bank calls
    /// stay outstanding).
    fn flush(&mut self) -> Vec<Did> {
        let mut did = Vec::new();
        loop {
            if !self.writes.is_empty() {
                did.extend(self.ack_write());
            } else if !self.publications.is_empty() || !self.consent_publications.is_empty() {
                did.extend(self.ack_publications());
            } else if !self.dead_letters.is_empty() {
                did.extend(self.ack_dead_letters());
            } else {
                return did;
            }
        }
    }

    /// The outstanding `kind` call of `payment`; `initiate*`: either kind of initiation.
    fn open_call(&self, payment: &str, kind: &str) -> &OpenCall {
        let fits = |call: &BankCall| match kind.strip_suffix('*') {
            Some(prefix) => call_kind(call).starts_with(prefix),
            None => call_kind(call) == kind,
        };
        self.calls
            .iter()
            .find(|c| c.payment.payment_id.as_str() == payment && fits(&c.call))
            .unwrap_or_else(|| panic!("no {kind} call for {payment}: {:?}", self.open_calls()))
    }

    fn open_calls(&self) -> Vec<(String, &'static str)> {
        self.calls
            .iter()
            .map(|c| (c.payment.payment_id.to_string(), call_kind(&c.call)))
            .collect()
    }

    /// Answers the outstanding `kind` call of `payment`.
    fn answer(&mut self, payment: &str, kind: &str, answer: BankAnswer) -> Vec<Did> {
        let id = self.open_call(payment, kind).id;
        self.calls.retain(|c| c.id != id);
        self.on(Event::Answered { call: id, answer })
    }

    fn payment(&self, id: &str) -> &Payment {
        self.core
            .payment(&pid(id))
            .unwrap_or_else(|| panic!("no payment {id}"))
    }

    fn state(&self, id: &str) -> PaymentState {
        self.payment(id).state
    }

    /// The pending write of `key` (the only one).
    fn open_write(&self, key: &str) -> &OpenWrite {
        let found: Vec<&OpenWrite> = self
            .writes
            .iter()
            .filter(|w| w.write.key(PARTITION) == key)
            .collect();
        assert_eq!(found.len(), 1, "pending writes of {key}");
        found[0]
    }

    // Driving payments through the core.

    /// Initiates `id` and answers its initiation (with PKCE, or with the PSU's token when the
    /// owner holds one): `SCA_PENDING`, idle, its timer set.
    fn sca_pending(&mut self, id: &str, brand_name: &str) {
        self.initiate(id, brand_name);
        self.flush();
        let kind = call_kind(&self.open_call(id, "initiate*").call);
        self.answer(id, kind, initiated(id));
        self.flush();
        assert_eq!(self.state(id), PaymentState::ScaPending);
        assert!(self.calls.is_empty(), "{:?}", self.open_calls());
    }

    /// On to `SIGNED` through the PSU's code, its exchange and a status poll.
    fn signed(&mut self, id: &str, brand_name: &str, access: &str) {
        self.sca_pending(id, brand_name);
        self.complete_sca(&format!("c-sca-{id}"), id, &format!("code-{id}"));
        self.flush();
        self.answer(id, "exchange", issued(access));
        self.flush();
        self.answer(id, "status", observed(BankProgress::Signed, "ACTC"));
        self.flush();
        assert_eq!(self.state(id), PaymentState::Signed);
        assert!(self.calls.is_empty(), "{:?}", self.open_calls());
    }
}

/// Runs `test` on a thread of its own: a core that loops forever (a spin) fails the test
/// instead of hanging the suite.
fn within_seconds(limit: u64, test: impl FnOnce() + Send + 'static) {
    let (done, finished) = std::sync::mpsc::channel();
    let runner = std::thread::spawn(move || {
        test();
        let _ = done.send(());
    });
    match finished.recv_timeout(Duration::from_secs(limit)) {
        Ok(()) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = runner.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("the core did not return within {limit} s: it spins")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// a. Healing keys a superseded owner wrote
// ---------------------------------------------------------------------------------------------

/// Review defect a: a zombie's record of a payment busy with a volatile status poll was never
/// re-written (the poll's answer wrote nothing), so compaction could keep the zombie's version.
#[test]
fn a_zombie_record_of_a_payment_busy_with_a_volatile_poll_is_healed_when_the_poll_answers() {
    let mut h = Harness::empty();
    h.sca_pending("p-1", "BELFIUS");
    let at = h.payment("p-1").next_check_at.expect("a poll timer");
    let did = h.tick_at(at);
    assert_eq!(calls(&did), vec![pc("p-1", "status")]);
    assert!(
        writes(&did).is_empty(),
        "a timer's poll is not written: {did:?}"
    );

    let did = h.on(Event::StaleRecord {
        key: "payment/p-1".into(),
        offset: 160,
    });
    assert!(
        writes(&did).is_empty(),
        "busy: healed once the poll is done, {did:?}"
    );

    let did = h.answer("p-1", "status", observed(BankProgress::AwaitingSca, "RCVD"));
    assert_eq!(writes(&did), vec![pw("p-1")], "the heal: {did:?}");
    let heal = h.open_write("payment/p-1");
    assert!(
        matches!(heal.fence, FenceWait::Confirm { .. }),
        "{:?}",
        heal.fence
    );
    let StateWrite::Payment { payment, events } = &heal.write else {
        panic!("not a payment write")
    };
    assert!(events.is_empty(), "a heal re-writes, it emits nothing");
    assert_eq!(payment.state, PaymentState::ScaPending);
    assert_eq!(payment.next_check_at, h.payment("p-1").next_check_at);

    let did = h.ack_write_at(170);
    assert!(writes(&did).is_empty(), "healed once: {did:?}");
    // Idle again: its next poll runs.
    let at = h.payment("p-1").next_check_at.expect("a poll timer");
    assert_eq!(h.core.next_wake(), Some(at));
    let did = h.tick_at(at);
    assert_eq!(calls(&did), vec![pc("p-1", "status")]);
}

/// The payment's own write landed (offset 150) before the zombie's record (160): it heals
/// nothing, so the payment is re-written when it is released.
#[test]
fn a_busy_payment_whose_own_write_landed_before_the_zombie_record_is_healed_on_release() {
    let mut h = Harness::empty();
    h.initiate("p-1", "BELFIUS");
    h.flush();
    h.open_call("p-1", "initiate");
    let did = h.on(Event::StaleRecord {
        key: "payment/p-1".into(),
        offset: 160,
    });
    assert!(writes(&did).is_empty(), "{did:?}");
    let did = h.answer("p-1", "initiate", initiated("p-1"));
    assert_eq!(writes(&did), vec![pw("p-1")]);

    let did = h.ack_write_at(150);
    assert_eq!(published(&did), vec![(150, vec![StateKind::ScaPending])]);
    assert_eq!(writes(&did), vec![pw("p-1")], "healed on release: {did:?}");
    let heal = h.open_write("payment/p-1");
    assert!(matches!(heal.fence, FenceWait::Confirm { .. }));
    assert!(matches!(&heal.write, StateWrite::Payment { events, .. } if events.is_empty()));

    let did = h.ack_write_at(171);
    assert!(writes(&did).is_empty(), "{did:?}");
    assert_eq!(h.core.next_wake(), h.payment("p-1").next_check_at);
}

/// The payment's own write lands after the zombie's record: that write is the heal.
#[test]
fn a_busy_payment_whose_own_write_lands_after_the_zombie_record_is_not_healed_again() {
    let mut h = Harness::empty();
    h.initiate("p-1", "BELFIUS");
    h.flush();
    h.on(Event::StaleRecord {
        key: "payment/p-1".into(),
        offset: 160,
    });
    h.answer("p-1", "initiate", initiated("p-1"));
    let did = h.ack_write_at(170);
    assert_eq!(published(&did), vec![(170, vec![StateKind::ScaPending])]);
    assert!(writes(&did).is_empty(), "not healed again: {did:?}");
    assert!(h.writes.is_empty());
    // Released as it is: idle, its poll timer armed.
    let at = h.payment("p-1").next_check_at.expect("timer");
    assert_eq!(h.core.next_wake(), Some(at));
}

#[test]
fn an_idle_payment_is_healed_at_once_and_an_unknown_payment_key_is_deleted() {
    let mut h = Harness::empty();
    h.sca_pending("p-1", "BELFIUS");
    let timer = h.payment("p-1").next_check_at.expect("timer");

    let did = h.on(Event::StaleRecord {
        key: "payment/p-1".into(),
        offset: 160,
    });
    assert_eq!(writes(&did), vec![pw("p-1")]);
    assert!(matches!(
        h.open_write("payment/p-1").fence,
        FenceWait::Confirm { .. }
    ));
    // While its heal is in flight the payment is busy: its commands wait, its timer too.
    let (_, did) = h.command("c-r", "p-1", CommandBody::RefreshStatus);
    assert!(writes(&did).is_empty(), "{did:?}");
    let did = h.tick_at(timer);
    assert!(calls(&did).is_empty(), "{did:?}");

    let did = h.on(Event::StaleRecord {
        key: "payment/x".into(),
        offset: 161,
    });
    assert_eq!(writes(&did), vec![("payment/x".to_owned(), "delete-key")]);
    let delete = h.open_write("payment/x");
    assert!(matches!(&delete.write, StateWrite::DeleteKey(k) if k == "payment/x"));
    assert!(matches!(delete.fence, FenceWait::Confirm { .. }));

    // The heal is durable: the queued command runs.
    let did = h.ack_write_at(170);
    assert_eq!(
        writes(&did),
        vec![pw("p-1")],
        "the queued RefreshStatus: {did:?}"
    );
    let did = h.ack_writes();
    assert!(writes(&did).is_empty(), "{did:?}");
    assert!(h.core.payment(&pid("x")).is_none());
}

// ---------------------------------------------------------------------------------------------
// d. Token records are fenced; only a dead grant deletes a pair
// ---------------------------------------------------------------------------------------------

/// A Signed Belfius payment whose pair expired: its cancellation refreshes the pair first.
fn cancel_with_an_expired_pair() -> Harness {
    let mut h = Harness::new(restored(
        vec![signed_payment("p-1", "BELFIUS")],
        vec![expired("BELFIUS", "old-access", "old-refresh")],
    ));
    h.start();
    let (_, did) = h.command("c-cancel", "p-1", cancel_body());
    assert_eq!(writes(&did), vec![pw("p-1")]);
    let did = h.flush();
    assert_eq!(calls(&did), vec![pc("p-1", "refresh")]);
    let BankCall::Refresh {
        brand,
        refresh_token,
    } = &h.open_call("p-1", "refresh").call
    else {
        unreachable!()
    };
    assert_eq!(*brand, Brand::Belfius);
    assert_eq!(refresh_token.expose_secret(), "old-refresh");
    assert_eq!(h.state("p-1"), PaymentState::Cancelling);
    h
}

#[test]
fn a_refresh_answered_revoked_deletes_the_pair_with_a_fenced_tombstone() {
    let mut h = cancel_with_an_expired_pair();
    let did = h.answer(
        "p-1",
        "refresh",
        BankAnswer::RefreshFailed(RefreshFailure::Revoked {
            message: "invalid_grant".into(),
        }),
    );
    assert_eq!(
        writes(&did),
        vec![("psu/BELFIUS/psu-1".to_owned(), "delete-tokens")],
        "only the tombstone, the payment waits for it: {did:?}"
    );
    let tombstone = h.open_write("psu/BELFIUS/psu-1");
    assert!(matches!(tombstone.fence, FenceWait::Confirm { .. }));
    assert!(matches!(&tombstone.write, StateWrite::DeleteTokens(k) if *k == token_key("BELFIUS")));
    assert!(h.core.tokens(&token_key("BELFIUS")).is_none(), "forgotten");
    assert_eq!(h.state("p-1"), PaymentState::Cancelling);

    let did = h.ack_write();
    assert_eq!(writes(&did), vec![pw("p-1")]);
    assert_eq!(h.state("p-1"), PaymentState::Signed);
    let reason = h.payment("p-1").reason.clone().expect("a reason");
    assert_eq!(reason.code, ReasonCode::BankSecurityFailure);
    h.flush();

    // No pair any more: a new cancellation cannot be sent.
    let (offset, _) = h.command("c-cancel-2", "p-1", cancel_body());
    let did = h.flush();
    assert_eq!(dead_letters(&did), vec![(offset, "CANCEL_NOT_POSSIBLE")]);
}

#[test]
fn a_refresh_refused_for_another_reason_keeps_the_pair_and_ends_the_cancellation() {
    let mut h = cancel_with_an_expired_pair();
    let did = h.answer(
        "p-1",
        "refresh",
        BankAnswer::RefreshFailed(RefreshFailure::Refused {
            message: "invalid_client".into(),
        }),
    );
    assert_eq!(writes(&did), vec![pw("p-1")], "no token write: {did:?}");
    let kept = h.core.tokens(&token_key("BELFIUS")).expect("kept");
    assert_eq!(kept.access_token.expose_secret(), "old-access");
    assert_eq!(h.state("p-1"), PaymentState::Signed);
    let reason = h.payment("p-1").reason.clone().expect("a reason");
    assert_eq!(reason.code.as_str(), "BANK_SECURITY_FAILURE");
    h.flush();

    // The lane is free and the pair still there: the next cancellation refreshes it again.
    h.command("c-cancel-2", "p-1", cancel_body());
    let did = h.flush();
    assert_eq!(calls(&did), vec![pc("p-1", "refresh")]);
}

#[test]
fn a_transient_refresh_failure_keeps_the_pair() {
    let mut h = cancel_with_an_expired_pair();
    let did = h.answer(
        "p-1",
        "refresh",
        BankAnswer::RefreshFailed(RefreshFailure::Transient {
            message: "timeout".into(),
        }),
    );
    assert_eq!(writes(&did), vec![pw("p-1")], "no token write: {did:?}");
    assert!(h.core.tokens(&token_key("BELFIUS")).is_some());
    assert_eq!(h.state("p-1"), PaymentState::Signed);
    let reason = h.payment("p-1").reason.clone().expect("a reason");
    assert_eq!(reason.code, ReasonCode::CancelNotConfirmed);
}

/// Found by `make chaos` once SCA deadlines cancel at the bank: a code exchange whose answer
/// never reached the worker (lost, or the worker died first) replaced the PSU's pair at the
/// bank, and every later cancellation presented the dead access token again (113 refused
/// cancellations in one run). A refused access token is refreshed once; a dead grant then
/// deletes the pair, and the pair is never presented again.
/// A Signed Belfius payment whose cancellation left with a pair the bank has replaced.
fn cancel_with_a_valid_looking_pair(access: &str) -> Harness {
    let mut h = Harness::new(restored(
        vec![signed_payment("p-1", "BELFIUS")],
        vec![fresh("BELFIUS", access)],
    ));
    h.start();
    h.command("c-cancel", "p-1", cancel_body());
    let did = h.flush();
    assert_eq!(calls(&did), vec![pc("p-1", "cancel")]);
    h
}

fn access_token_rejected() -> BankAnswer {
    BankAnswer::AccessTokenRejected {
        message: "HTTP 401 FAILED_SECURITY_VALIDATION GEN-1203-100003".into(),
    }
}

#[test]
fn an_access_token_refused_at_cancellation_is_refreshed_once_and_never_presented_again() {
    let mut h = cancel_with_a_valid_looking_pair("replaced-access");
    let did = h.answer("p-1", "cancel", access_token_rejected());
    assert_eq!(
        calls(&did),
        vec![pc("p-1", "refresh")],
        "a refresh, not the same token again: {did:?}"
    );
    assert_eq!(h.state("p-1"), PaymentState::Cancelling);

    // The refresh token died with the access token: the pair is forgotten, durably.
    let did = h.answer(
        "p-1",
        "refresh",
        BankAnswer::RefreshFailed(RefreshFailure::Revoked {
            message: "invalid_grant".into(),
        }),
    );
    assert_eq!(
        writes(&did),
        vec![("psu/BELFIUS/psu-1".to_owned(), "delete-tokens")]
    );
    h.ack_write();
    assert_eq!(h.state("p-1"), PaymentState::Signed);
    assert!(h.core.tokens(&token_key("BELFIUS")).is_none());
    h.flush();

    // The next cancellation has nothing to present: no bank call at all.
    let (offset, _) = h.command("c-cancel-2", "p-1", cancel_body());
    let did = h.flush();
    assert!(calls(&did).is_empty(), "{did:?}");
    assert_eq!(dead_letters(&did), vec![(offset, "CANCEL_NOT_POSSIBLE")]);
}

/// The refresh works but the bank refuses the new token too: one retry, then the cancellation
/// ends with a reason (no loop of refreshes).
#[test]
fn an_access_token_refused_again_after_a_refresh_ends_the_cancellation() {
    let mut h = cancel_with_a_valid_looking_pair("access-1");
    let did = h.answer("p-1", "cancel", access_token_rejected());
    assert_eq!(calls(&did), vec![pc("p-1", "refresh")]);
    let did = h.answer("p-1", "refresh", issued("access-2"));
    assert_eq!(
        writes(&did),
        vec![("psu/BELFIUS/psu-1".to_owned(), "tokens")]
    );
    let did = h.ack_write();
    assert_eq!(calls(&did), vec![pc("p-1", "cancel")]);
    let BankCall::Cancel { access_token } = &h.open_call("p-1", "cancel").call else {
        unreachable!()
    };
    assert_eq!(access_token.expose_secret(), "access-2");
    let did = h.answer("p-1", "cancel", access_token_rejected());
    assert!(calls(&did).is_empty(), "no second refresh: {did:?}");
    assert_eq!(h.state("p-1"), PaymentState::Signed);
    let reason = h.payment("p-1").reason.clone().expect("a reason");
    assert_eq!(reason.code, ReasonCode::BankSecurityFailure);
}

// ---------------------------------------------------------------------------------------------
// e. No spin on a due timer of a busy payment
// ---------------------------------------------------------------------------------------------

/// Review defect e: a SIGNED payment with a due timer whose code exchange waited in its PSU
/// lane was found due on every loop turn, and the owner spun.
#[test]
fn a_due_timer_of_a_payment_waiting_in_its_psu_lane_does_not_spin_and_fires_once_released() {
    within_seconds(10, || {
        let (sca_pending, _) = sca_pending_payment("p-1", "BELFIUS");
        let mut h = Harness::new(restored(
            vec![sca_pending, signed_payment("p-2", "BELFIUS")],
            vec![],
        ));
        assert!(h.start().is_empty());
        h.complete_sca("c-sca-1", "p-1", "code-1");
        let did = h.flush();
        assert_eq!(calls(&did), vec![pc("p-1", "exchange")]);
        // A late code for the signed payment: its exchange queues behind p-1's.
        h.complete_sca("c-sca-2", "p-2", "code-2");
        let did = h.flush();
        assert!(calls(&did).is_empty(), "queued in the lane: {did:?}");
        let timer = h.payment("p-2").next_check_at.expect("p-2 keeps its timer");

        h.now = timer + 5_000;
        for _ in 0..3 {
            let wake = h.core.next_wake().expect("a checkpoint at least");
            assert!(wake > h.now, "would spin: wake {wake} <= now {}", h.now);
            let did = h.tick();
            assert!(did.is_empty(), "{did:?}");
        }

        // p-1's exchange ends: p-2's starts.
        let did = h.answer("p-1", "exchange", issued("at-1"));
        assert_eq!(
            writes(&did),
            vec![("psu/BELFIUS/psu-1".to_owned(), "tokens")]
        );
        let did = h.ack_write();
        assert!(calls(&did).contains(&pc("p-2", "exchange")), "{did:?}");
        assert!(!calls(&did).contains(&pc("p-2", "status")), "{did:?}");
        // p-2's exchange ends: released, its due timer fires.
        h.answer("p-2", "exchange", issued("at-2"));
        let did = h.ack_write();
        assert!(calls(&did).contains(&pc("p-2", "status")), "{did:?}");
        assert_eq!(
            h.core
                .tokens(&token_key("BELFIUS"))
                .map(|t| t.access_token.expose_secret().to_owned()),
            Some("at-2".to_owned())
        );
    });
}

#[test]
fn a_due_timer_of_a_payment_whose_exchange_call_is_outstanding_does_not_spin() {
    within_seconds(10, || {
        let mut h = Harness::new(restored(vec![signed_payment("p-2", "BELFIUS")], vec![]));
        h.start();
        h.complete_sca("c-sca-2", "p-2", "code-2");
        let did = h.flush();
        assert_eq!(calls(&did), vec![pc("p-2", "exchange")]);
        let timer = h.payment("p-2").next_check_at.expect("timer");
        h.now = timer + 1;
        for _ in 0..3 {
            assert!(h.core.next_wake().is_some_and(|w| w > h.now));
            assert!(h.tick().is_empty());
        }
        h.answer("p-2", "exchange", issued("at-2"));
        let did = h.ack_write();
        assert_eq!(calls(&did), vec![pc("p-2", "status")], "the timer fires");
    });
}

// ---------------------------------------------------------------------------------------------
// g. Token pairs are keyed by brand and PSU
// ---------------------------------------------------------------------------------------------

#[test]
fn a_belfius_pair_does_not_cancel_a_banx_payment_but_cancels_the_belfius_one() {
    let mut h = Harness::new(restored(
        vec![
            signed_payment("p-banx", "BANX"),
            signed_payment("p-bel", "BELFIUS"),
        ],
        vec![fresh("BELFIUS", "belfius-access")],
    ));
    h.start();
    let (banx_offset, did) = h.command("c-1", "p-banx", cancel_body());
    assert!(
        dead_letters(&did).is_empty(),
        "not before the barrier: {did:?}"
    );
    assert_eq!(
        writes(&did),
        vec![("outbox-checkpoint/0".to_owned(), "checkpoint")]
    );
    let did = h.ack_write();
    assert_eq!(
        dead_letters(&did),
        vec![(banx_offset, "CANCEL_NOT_POSSIBLE")]
    );
    assert_eq!(h.dead_letters[0].payment_id.as_deref(), Some("p-banx"));
    assert_eq!(h.state("p-banx"), PaymentState::Signed);

    let (_, did) = h.command("c-2", "p-bel", cancel_body());
    assert_eq!(writes(&did), vec![pw("p-bel")]);
    let did = h.ack_write();
    assert_eq!(calls(&did), vec![pc("p-bel", "cancel")]);
    let BankCall::Cancel { access_token } = &h.open_call("p-bel", "cancel").call else {
        unreachable!()
    };
    assert_eq!(access_token.expose_secret(), "belfius-access");
}

#[test]
fn a_banx_code_exchange_stores_under_banx_and_keeps_the_belfius_pair() {
    let (banx, _) = sca_pending_payment("p-banx", "BANX");
    let mut h = Harness::new(restored(
        vec![banx],
        vec![fresh("BELFIUS", "belfius-access")],
    ));
    h.start();
    h.complete_sca("c-1", "p-banx", "code-banx");
    let did = h.flush();
    assert_eq!(calls(&did), vec![pc("p-banx", "exchange")]);
    let did = h.answer("p-banx", "exchange", issued("banx-access"));
    assert_eq!(writes(&did), vec![("psu/BANX/psu-1".to_owned(), "tokens")]);
    let access = |h: &Harness, b: &str| {
        h.core
            .tokens(&token_key(b))
            .map(|t| t.access_token.expose_secret().to_owned())
    };
    assert_eq!(access(&h, "BANX").as_deref(), Some("banx-access"));
    assert_eq!(access(&h, "BELFIUS").as_deref(), Some("belfius-access"));
    h.flush();
    assert_eq!(
        h.persisted_tokens
            .get(&token_key("BELFIUS"))
            .map(|t| t.access_token.expose_secret().to_owned())
            .as_deref(),
        Some("belfius-access")
    );
}

// ---------------------------------------------------------------------------------------------
// h. A restored cancellation is sent again
// ---------------------------------------------------------------------------------------------

#[test]
fn a_restored_cancelling_payment_without_a_timer_sends_the_cancellation_again() {
    let mut h = Harness::new(restored(
        vec![cancelling_payment("p-1", "BELFIUS")],
        vec![fresh("BELFIUS", "belfius-access")],
    ));
    let did = h.start();
    assert!(
        calls(&did).is_empty(),
        "only once its intent is written: {did:?}"
    );
    let did = h.flush();
    assert_eq!(calls(&did), vec![pc("p-1", "cancel")]);
    let BankCall::Cancel { access_token } = &h.open_call("p-1", "cancel").call else {
        unreachable!()
    };
    assert_eq!(access_token.expose_secret(), "belfius-access");
    // Its answer ends it.
    h.answer(
        "p-1",
        "cancel",
        BankAnswer::Input(Box::new(Input::CancelConfirmed {
            bank_status: Some("CANC".into()),
        })),
    );
    let did = h.flush();
    assert_eq!(h.state("p-1"), PaymentState::Cancelled);
    assert_eq!(published(&did).len(), 1);
}

// ---------------------------------------------------------------------------------------------
// j. Dead letters and ignored commands wait for the fence
// ---------------------------------------------------------------------------------------------

#[test]
fn a_refused_command_is_dead_lettered_only_after_a_confirmed_barrier() {
    let mut h = Harness::empty();
    let (offset, did) = h.command("c-1", "p-x", cancel_body());
    assert!(dead_letters(&did).is_empty(), "{did:?}");
    assert_eq!(
        writes(&did),
        vec![("outbox-checkpoint/0".to_owned(), "checkpoint")]
    );
    let barrier = h.open_write("outbox-checkpoint/0");
    assert!(matches!(barrier.fence, FenceWait::Confirm { .. }));
    assert_eq!(h.committable, Some(offset));
    assert_eq!(h.core.outstanding(), 2, "the barrier and the verdict");

    let did = h.ack_write();
    assert_eq!(dead_letters(&did), vec![(offset, "UNKNOWN_PAYMENT")]);
    assert_eq!(
        h.committable,
        Some(offset),
        "not before the dead letter is written"
    );
    let did = h.ack_dead_letters();
    assert_eq!(did, vec![Did::Committable(offset + 1)]);
}

/// A payment write this owner makes after the verdict serves as its barrier: no extra write.
#[test]
fn a_refused_command_is_released_by_a_later_confirmed_write_of_the_same_event() {
    // A RECEIVED payment whose retry timer is due when the refused command arrives: the
    // timer's transition (StartInitiation, written) is made in the same turn, after it.
    let (received, _) = received_payment("p-1", "BELFIUS");
    let begin = Input::BeginInitiation {
        pkce_verifier: Some(SecretString::from("v".to_owned())),
        sca_state: "s".into(),
    };
    let (initiating, _) = step("p-1", Some(&received), begin, T0 - 2_000);
    let (retrying, _) = step(
        "p-1",
        Some(&initiating),
        Input::InitiationFailed(crate::domain::machine::InitiationFailure::NotProcessed {
            message: "429".into(),
            retry_after_ms: Some(1_000),
        }),
        T0 - 500,
    );
    assert_eq!(retrying.state, PaymentState::Received);
    let timer = retrying.next_check_at.expect("retry timer");
    let mut h = Harness::new(restored(vec![retrying], vec![]));
    assert!(
        h.start().is_empty(),
        "the timer is due at {timer}, later than now"
    );
    h.now = timer;
    let (offset, did) = h.command("c-1", "p-x", cancel_body());
    assert_eq!(
        writes(&did),
        vec![pw("p-1")],
        "the timer's write, no separate barrier: {did:?}"
    );
    assert!(dead_letters(&did).is_empty());
    let did = h.ack_write();
    assert_eq!(dead_letters(&did), vec![(offset, "UNKNOWN_PAYMENT")]);
}

/// A checkpoint is acknowledged without waiting for the fence: it releases no verdict.
#[test]
fn a_checkpoint_acknowledged_without_the_fence_does_not_release_a_dead_letter() {
    let mut h = Harness::empty();
    h.now = T0 + CHECKPOINT_INTERVAL;
    let (offset, did) = h.command("c-1", "p-x", cancel_body());
    let kinds: Vec<bool> = h.writes.iter().map(|w| w.fence.confirms()).collect();
    assert_eq!(
        kinds,
        vec![false, true],
        "the interval's checkpoint, then a barrier: {did:?}"
    );
    let did = h.ack_write();
    assert!(dead_letters(&did).is_empty(), "{did:?}");
    let did = h.ack_write();
    assert_eq!(dead_letters(&did), vec![(offset, "UNKNOWN_PAYMENT")]);
}

#[test]
fn a_refused_command_of_a_superseded_owner_is_never_dead_lettered() {
    let mut h = Harness::empty();
    let (offset, did) = h.command("c-1", "p-x", cancel_body());
    assert_eq!(writes(&did).len(), 1, "the barrier");
    let did = h.on(Event::Superseded { claimed_at: 150 });
    assert_eq!(did, vec![Did::Fenced(150)]);
    assert!(h.core.is_done());
    // Whatever the shell still reports, nothing leaves.
    assert!(h.ack_write().is_empty());
    assert!(
        h.on(Event::DeadLettered {
            command_offset: offset
        })
        .is_empty()
    );
    assert!(h.tick_at(T0 + 10 * CHECKPOINT_INTERVAL).is_empty());
    assert!(dead_letters(&h.history).is_empty());
    assert_eq!(h.committable, Some(offset));
}

#[test]
fn an_ignored_duplicate_is_not_committed_before_the_barrier_is_confirmed() {
    let mut h = Harness::empty();
    h.sca_pending("p-1", "BELFIUS");
    assert_eq!(h.committable, Some(1));
    // The same command again (a client retry under the same command id).
    let (offset, did) = h.command("c-init-p-1", "p-1", initiate_body("p-1", "BELFIUS"));
    assert_eq!(offset, 1);
    assert_eq!(
        writes(&did),
        vec![("outbox-checkpoint/0".to_owned(), "checkpoint")]
    );
    assert_eq!(h.committable, Some(1), "not past the duplicate: {did:?}");
    // The same order under a new command id: ignored too.
    let (second, _) = h.command("c-other", "p-1", initiate_body("p-1", "BELFIUS"));
    assert_eq!(h.committable, Some(1));
    // Each verdict waits for a barrier written after it.
    let did = h.ack_write();
    assert_eq!(did, vec![Did::Committable(second)]);
    let did = h.ack_write();
    assert_eq!(did, vec![Did::Committable(second + 1)]);
    assert!(dead_letters(&h.history).is_empty());
}

// ---------------------------------------------------------------------------------------------
// k. Exact de-duplication by offset
// ---------------------------------------------------------------------------------------------

/// Review defect k: de-duplication by the last 32 command ids let a record re-delivered after
/// a restart (its offset not yet committed) act again once the payment had taken more than 32
/// commands.
#[test]
fn an_early_record_redelivered_after_a_restart_beyond_the_remembered_window_is_ignored() {
    let mut h = Harness::empty();
    h.sca_pending("p-1", "BELFIUS");
    let state = h.payment("p-1").sca_state.clone();
    let (sca_offset, _) = h.complete_sca("c-sca", "p-1", "the-code");
    h.flush();
    h.answer("p-1", "exchange", issued("at-1"));
    h.flush();
    h.answer("p-1", "status", observed(BankProgress::Signed, "ACTC"));
    h.flush();
    let mut refresh_offsets = Vec::new();
    for n in 0..35 {
        let (offset, did) = h.command(&format!("c-refresh-{n}"), "p-1", CommandBody::RefreshStatus);
        assert_eq!(writes(&did), vec![pw("p-1")]);
        refresh_offsets.push(offset);
        h.flush();
        h.answer("p-1", "status", observed(BankProgress::Signed, "ACTC"));
        h.flush();
    }
    let persisted = h.persisted.get(&pid("p-1")).expect("written").clone();
    assert!(
        !persisted
            .seen_commands
            .iter()
            .any(|c| c.as_str() == "c-sca" || c.as_str() == "c-refresh-0"),
        "the early command ids are out of the window"
    );

    // A restart: the offsets after the last commit are read again.
    let tokens = h.persisted_tokens.values().cloned().collect();
    let mut h = Harness::new(restored(vec![persisted], tokens));
    h.start();
    h.flush();
    if !h.calls.is_empty() {
        h.answer("p-1", "status", observed(BankProgress::Signed, "ACTC"));
        h.flush();
    }
    let before = h.history.len();
    let did = h.command_at(
        sca_offset,
        "c-sca",
        PSU,
        "p-1",
        sca_code("the-code", state.as_deref()),
    );
    assert_eq!(
        writes(&did),
        vec![("outbox-checkpoint/0".to_owned(), "checkpoint")]
    );
    let did = h.command_at(
        refresh_offsets[0],
        "c-refresh-0",
        PSU,
        "p-1",
        CommandBody::RefreshStatus,
    );
    assert_eq!(
        writes(&did),
        vec![("outbox-checkpoint/0".to_owned(), "checkpoint")],
        "its own barrier, written after its verdict: {did:?}"
    );
    h.flush();
    let after = &h.history[before..];
    assert!(calls(after).is_empty(), "no exchange, no poll: {after:?}");
    assert!(
        writes(after).iter().all(|(_, what)| *what == "checkpoint"),
        "no payment write: {after:?}"
    );
    assert!(dead_letters(after).is_empty());
    assert_eq!(h.committable, Some(refresh_offsets[0] + 1));
    assert_eq!(h.state("p-1"), PaymentState::Signed);
}

#[test]
fn a_code_resent_under_a_new_command_id_is_not_exchanged_again() {
    let mut h = Harness::empty();
    h.signed("p-1", "BELFIUS", "at-1");
    let (offset, did) = h.complete_sca("c-sca-again", "p-1", "code-p-1");
    assert!(calls(&did).is_empty(), "{did:?}");
    assert_eq!(
        writes(&did),
        vec![("outbox-checkpoint/0".to_owned(), "checkpoint")]
    );
    assert_eq!(h.committable, Some(offset));
    let did = h.flush();
    assert!(calls(&did).is_empty());
    assert!(dead_letters(&did).is_empty());
    assert_eq!(h.committable, Some(offset + 1));
    assert!(h.payment("p-1").authorization_code.is_none());
}

// ---------------------------------------------------------------------------------------------
// l. Lanes and the fence
// ---------------------------------------------------------------------------------------------

#[test]
fn a_lane_operation_queued_behind_a_running_one_never_starts_after_superseded() {
    let (p1, _) = sca_pending_payment("p-1", "BELFIUS");
    let (p2, _) = sca_pending_payment("p-2", "BELFIUS");
    let mut h = Harness::new(restored(vec![p1, p2], vec![]));
    h.start();
    h.complete_sca("c-1", "p-1", "code-1");
    h.complete_sca("c-2", "p-2", "code-2");
    let did = h.flush();
    assert_eq!(
        calls(&did),
        vec![pc("p-1", "exchange")],
        "one at a time per lane"
    );

    assert_eq!(
        h.on(Event::Superseded { claimed_at: 140 }),
        vec![Did::Fenced(140)]
    );
    // The running exchange's answer, its token write, time, a revocation: nothing follows.
    assert!(h.answer("p-1", "exchange", issued("at-1")).is_empty());
    assert!(h.tick_at(T0 + 3 * CHECKPOINT_INTERVAL).is_empty());
    assert!(h.on(Event::Revoke).is_empty());
    assert!(
        h.command("c-3", "p-2", CommandBody::RefreshStatus)
            .1
            .is_empty()
    );
    assert!(h.writes.is_empty());
    assert!(!calls(&h.history).contains(&pc("p-2", "exchange")));
    assert!(h.core.is_done());
    assert!(h.core.next_wake().is_none());
}

/// While draining, a queued lane operation still runs (its intent is durable).
#[test]
fn a_lane_operation_queued_behind_a_running_one_still_runs_while_draining() {
    let (p1, _) = sca_pending_payment("p-1", "BELFIUS");
    let (p2, _) = sca_pending_payment("p-2", "BELFIUS");
    let mut h = Harness::new(restored(vec![p1, p2], vec![]));
    h.start();
    h.complete_sca("c-1", "p-1", "code-1");
    h.complete_sca("c-2", "p-2", "code-2");
    h.flush();
    h.on(Event::Revoke);
    h.answer("p-1", "exchange", issued("at-1"));
    let did = h.ack_write();
    assert!(calls(&did).contains(&pc("p-2", "exchange")), "{did:?}");
    assert!(!released(&did));
}

// ---------------------------------------------------------------------------------------------
// n. Quarantine
// ---------------------------------------------------------------------------------------------

/// Review defect n: one undecodable state record stopped every replica in turn. Now the
/// payment it names is held: not resumed, no timer, its commands dead-lettered.
#[test]
fn a_quarantined_payment_is_held_and_its_commands_dead_lettered_while_others_proceed() {
    let mut log = StateLog::new();
    let old = log.marker("old");
    // p-1 would resume with a new initiation attempt (RECEIVED, no timer); p-3 would poll
    // (SCA_PENDING, timer at T0 + 2 s); p-2 is fine.
    let (p1, e1) = received_payment("p-1", "BELFIUS");
    log.payment(old, &p1, &e1);
    let (p2, e2) = received_payment("p-2", "BELFIUS");
    log.payment(old, &p2, &e2);
    let (p3, e3) = sca_pending_payment("p-3", "BELFIUS");
    log.payment(old, &p3, &e3);
    log.raw("payment/p-1", b"{not json", old);
    log.raw("payment/p-3", b"\x00garbage", old);
    let mine = log.marker("mine");
    let restored = log.restore(mine);
    assert!(restored.quarantined.contains_key("payment/p-1"));
    assert!(restored.quarantined.contains_key("payment/p-3"));
    let config = CoreConfig {
        epoch: mine,
        ..config(Policy::default())
    };
    let mut h = Harness::with_config(restored, config);

    let did = h.start();
    assert_eq!(
        writes(&did),
        vec![pw("p-2")],
        "p-2 resumes, p-1 does not: {did:?}"
    );
    let did = h.flush();
    assert_eq!(calls(&did), vec![pc("p-2", "initiate")]);
    assert!(h.core.quarantined().contains_key("payment/p-1"));
    let held = h.payment("p-1").clone();
    assert_eq!(held.state, PaymentState::Received);
    let timer = h
        .payment("p-3")
        .next_check_at
        .expect("p-3's record has a timer");
    assert_ne!(
        h.core.next_wake(),
        Some(timer),
        "no timer for a held payment"
    );
    let did = h.tick_at(timer + 1);
    assert!(calls(&did).is_empty(), "{did:?}");

    let (offset, did) = h.command("c-r", "p-1", CommandBody::RefreshStatus);
    assert!(dead_letters(&did).is_empty(), "after the barrier: {did:?}");
    let did = h.ack_writes();
    assert_eq!(dead_letters(&did), vec![(offset, QUARANTINED)]);
    assert_eq!(h.dead_letters[0].class, QUARANTINED);
    assert_eq!(h.dead_letters[0].payment_id.as_deref(), Some("p-1"));
    h.flush();
    let (offset, _) = h.command("c-cancel", "p-3", cancel_body());
    let did = h.flush();
    assert_eq!(dead_letters(&did), vec![(offset, QUARANTINED)]);
    assert!(
        h.history
            .iter()
            .all(|d| !matches!(d, Did::Call { payment, .. } if payment != "p-2")),
        "{:?}",
        h.history
    );
    assert!(!h.persisted.contains_key(&pid("p-1")));
    assert!(!h.persisted.contains_key(&pid("p-3")));
    let still = h.payment("p-1");
    assert_eq!(still.sequence, held.sequence);
    assert_eq!(still.updated_at, held.updated_at);
    // p-2 goes on.
    let did = h.answer("p-2", "initiate", initiated("p-2"));
    assert_eq!(writes(&did), vec![pw("p-2")]);
}

// ---------------------------------------------------------------------------------------------
// Revoke and drain
// ---------------------------------------------------------------------------------------------

/// A new owner's first checkpoint covers its restore marker; after it, an idle owner has
/// nothing to write and is released at once.
#[test]
fn an_idle_owner_writes_its_last_checkpoint_once_then_is_released_at_once_on_revoke() {
    let mut h = Harness::empty();
    let did = h.on(Event::Revoke);
    assert_eq!(
        writes(&did),
        vec![("outbox-checkpoint/0".to_owned(), "checkpoint")]
    );
    assert!(!released(&did));
    assert!(matches!(
        h.open_write("outbox-checkpoint/0").write,
        StateWrite::Checkpoint { through: EPOCH }
    ));
    assert_eq!(h.ack_write(), vec![Did::Released]);
    assert!(h.core.is_done());

    let mut h = Harness::empty();
    let did = h.tick_at(T0 + CHECKPOINT_INTERVAL);
    assert_eq!(
        writes(&did),
        vec![("outbox-checkpoint/0".to_owned(), "checkpoint")]
    );
    h.ack_write();
    let did = h.on(Event::Revoke);
    assert_eq!(did, vec![Did::Released], "nothing left to checkpoint");
}

#[test]
fn revoke_stops_taking_commands_and_queued_commands_are_not_applied() {
    let mut h = Harness::empty();
    h.sca_pending("p-1", "BELFIUS");
    h.command("c-r", "p-1", CommandBody::RefreshStatus);
    let (queued, did) = h.complete_sca("c-sca", "p-1", "code-1");
    assert!(
        writes(&did).is_empty(),
        "queued behind the refresh: {did:?}"
    );

    let did = h.on(Event::Revoke);
    assert!(did.is_empty(), "{did:?}");
    assert!(!h.core.accepts_commands());
    let (late, did) = h.command("c-late", "p-2", initiate_body("p-2", "BELFIUS"));
    assert!(did.is_empty(), "not taken: {did:?}");
    assert!(h.core.payment(&pid("p-2")).is_none());

    let did = h.ack_write();
    assert_eq!(
        calls(&did),
        vec![pc("p-1", "status")],
        "the refresh's effect runs"
    );
    let did = h.answer("p-1", "status", observed(BankProgress::AwaitingSca, "RCVD"));
    assert!(
        !writes(&did).contains(&pw("p-1")),
        "the queued CompleteSca is not applied: {did:?}"
    );
    assert_eq!(h.state("p-1"), PaymentState::ScaPending);
    let did = h.flush();
    assert!(released(&did) || released(&h.history));
    assert_eq!(h.committable, Some(queued), "the next owner reads it again");
    assert!(late > queued);
}

#[test]
fn an_initiation_write_confirmed_during_the_drain_still_calls_the_bank() {
    let mut h = Harness::empty();
    h.initiate("p-1", "BELFIUS");
    let did = h.ack_write();
    assert_eq!(writes(&did), vec![pw("p-1")], "the attempt's intent");
    assert!(matches!(h.state("p-1"), PaymentState::Initiating { .. }));
    h.on(Event::Revoke);
    let did = h.ack_write();
    assert_eq!(calls(&did), vec![pc("p-1", "initiate")]);
    assert!(!released(&did));
    let did = h.flush();
    assert!(!released(&did), "its call is outstanding");
    h.answer("p-1", "initiate", initiated("p-1"));
    h.flush();
    assert_eq!(h.state("p-1"), PaymentState::ScaPending);
    assert!(h.released);
}

#[test]
fn start_initiation_is_not_started_while_draining_and_release_waits_for_the_last_checkpoint() {
    let mut h = Harness::empty();
    let (offset, _) = h.initiate("p-1", "BELFIUS");
    h.on(Event::Revoke);
    let did = h.ack_write();
    assert!(
        writes(&did).is_empty(),
        "no BeginInitiation while draining: {did:?}"
    );
    assert!(calls(&did).is_empty());
    assert_eq!(
        published(&did),
        vec![(EPOCH + 1, vec![StateKind::Received])]
    );
    assert!(!released(&did), "its events are not yet published");
    assert_eq!(h.state("p-1"), PaymentState::Received);

    let did = h.ack_publications();
    assert_eq!(
        writes(&did),
        vec![("outbox-checkpoint/0".to_owned(), "checkpoint")]
    );
    assert!(!released(&did), "after the checkpoint: {did:?}");
    let checkpoint = h.open_write("outbox-checkpoint/0");
    assert!(matches!(checkpoint.fence, FenceWait::AckOnly { .. }));
    assert!(matches!(checkpoint.write, StateWrite::Checkpoint { through } if through == EPOCH + 1));
    let did = h.ack_write();
    assert_eq!(did, vec![Did::Released]);
    assert_eq!(h.committable, Some(offset + 1));
    assert!(
        h.persisted[&pid("p-1")].next_check_at.is_none(),
        "the next owner resumes it"
    );
}

#[test]
fn the_drain_deadline_releases_with_work_outstanding() {
    let mut h = Harness::empty();
    h.sca_pending("p-1", "BELFIUS");
    let at = h.payment("p-1").next_check_at.expect("timer");
    h.tick_at(at);
    h.open_call("p-1", "status");
    let did = h.on(Event::Revoke);
    assert!(did.is_empty());
    let deadline = at + DRAIN_TIMEOUT;
    assert_eq!(h.core.next_wake(), Some(deadline));
    assert!(h.tick_at(deadline - 1).is_empty());
    let did = h.tick_at(deadline);
    assert_eq!(did, vec![Did::Released]);
    // The answer comes too late: nothing.
    assert!(
        h.answer("p-1", "status", observed(BankProgress::AwaitingSca, "RCVD"))
            .is_empty()
    );
}

// ---------------------------------------------------------------------------------------------
// Scheduling, outbox, offsets, checkpoints
// ---------------------------------------------------------------------------------------------

#[test]
fn commands_of_one_payment_apply_one_at_a_time_in_order_while_another_payment_proceeds() {
    let (p1, _) = sca_pending_payment("p-1", "BELFIUS");
    let mut h = Harness::new(restored(vec![p1], vec![]));
    h.start();
    let (_, did) = h.command("c-refresh", "p-1", CommandBody::RefreshStatus);
    assert_eq!(writes(&did), vec![pw("p-1")]);
    let (_, did) = h.complete_sca("c-sca", "p-1", "code-1");
    assert!(writes(&did).is_empty(), "waits for the refresh: {did:?}");
    let (_, did) = h.command("c-cancel", "p-1", cancel_body());
    assert!(writes(&did).is_empty(), "{did:?}");
    let (_, did) = h.initiate("p-2", "BELFIUS");
    assert_eq!(writes(&did), vec![pw("p-2")], "another payment proceeds");

    let did = h.ack_write();
    assert_eq!(calls(&did), vec![pc("p-1", "status")]);
    assert!(
        !writes(&did).contains(&pw("p-1")),
        "still busy with the refresh's poll"
    );
    let did = h.flush();
    assert_eq!(calls(&did), vec![pc("p-2", "initiate")]);

    let did = h.answer("p-1", "status", observed(BankProgress::AwaitingSca, "RCVD"));
    assert_eq!(writes(&did), vec![pw("p-1")], "the CompleteSca, alone");
    assert_eq!(h.state("p-1"), PaymentState::Authorizing);
    let seen = &h.payment("p-1").seen_commands;
    assert!(seen.iter().any(|c| c.as_str() == "c-sca"));
    assert!(!seen.iter().any(|c| c.as_str() == "c-cancel"), "not yet");
    // The cancellation waits until the authorization is done (the exchange and its poll).
    let did = h.flush();
    assert_eq!(calls(&did), vec![pc("p-1", "exchange")]);
    assert!(
        !h.payment("p-1")
            .seen_commands
            .iter()
            .any(|c| c.as_str() == "c-cancel")
    );
    h.answer("p-1", "exchange", issued("at-1"));
    h.flush();
    let did = h.answer("p-1", "status", observed(BankProgress::Signed, "ACTC"));
    assert_eq!(writes(&did), vec![pw("p-1")], "the SIGNED transition first");
    let did = h.ack_write();
    assert_eq!(
        writes(&did),
        vec![pw("p-1")],
        "then the cancellation: {did:?}"
    );
    assert_eq!(h.state("p-1"), PaymentState::Cancelling);
}

#[test]
fn events_are_published_and_the_command_offset_committable_only_after_the_write_is_acknowledged() {
    let mut h = Harness::empty();
    let (offset, did) = h.initiate("p-1", "BELFIUS");
    assert_eq!(writes(&did), vec![pw("p-1")]);
    assert!(published(&did).is_empty(), "{did:?}");
    assert_eq!(h.committable, Some(offset), "not past the command");
    assert!(
        matches!(&h.open_write("payment/p-1").write, StateWrite::Payment { events, .. } if events.len() == 1)
    );
    assert!(matches!(
        h.open_write("payment/p-1").fence,
        FenceWait::Confirm { .. }
    ));

    let did = h.ack_write_at(120);
    assert_eq!(published(&did), vec![(120, vec![StateKind::Received])]);
    assert!(did.contains(&Did::Committable(offset + 1)), "{did:?}");
    // The next transition (INITIATING) is published on its own acknowledgement only.
    assert_eq!(writes(&did), vec![pw("p-1")]);
    assert!(
        calls(&did).is_empty(),
        "the call after its intent is durable"
    );
    let did = h.ack_write_at(121);
    assert_eq!(published(&did), vec![(121, vec![StateKind::Initiating])]);
    assert_eq!(calls(&did), vec![pc("p-1", "initiate")]);
}

#[test]
fn a_checkpoint_is_written_every_interval_when_due_and_waits_for_publication() {
    let mut h = Harness::empty();
    h.initiate("p-1", "BELFIUS");
    h.ack_write(); // RECEIVED at 100
    h.ack_write(); // INITIATING at 101
    assert_eq!(h.publications.len(), 2);
    let did = h.tick_at(T0 + CHECKPOINT_INTERVAL - 1);
    assert!(writes(&did).is_empty(), "not yet due: {did:?}");
    let did = h.tick_at(T0 + CHECKPOINT_INTERVAL);
    assert_eq!(
        writes(&did),
        vec![("outbox-checkpoint/0".to_owned(), "checkpoint")]
    );
    let checkpoint = h.open_write("outbox-checkpoint/0");
    assert!(matches!(checkpoint.fence, FenceWait::AckOnly { .. }));
    assert!(
        matches!(checkpoint.write, StateWrite::Checkpoint { through: 99 }),
        "below the records whose events are not published: {:?}",
        checkpoint.write
    );
    h.ack_write(); // at 102
    h.ack_publications();
    let did = h.tick_at(T0 + 2 * CHECKPOINT_INTERVAL - 1);
    assert!(writes(&did).is_empty(), "not yet due: {did:?}");
    let did = h.tick_at(T0 + 2 * CHECKPOINT_INTERVAL);
    assert_eq!(
        writes(&did),
        vec![("outbox-checkpoint/0".to_owned(), "checkpoint")]
    );
    let checkpoint = h.open_write("outbox-checkpoint/0");
    assert!(matches!(checkpoint.fence, FenceWait::AckOnly { .. }));
    assert!(
        matches!(checkpoint.write, StateWrite::Checkpoint { through } if through >= 101),
        "{:?}",
        checkpoint.write
    );
    h.ack_write();
    // Nothing new since: no further checkpoint.
    for n in 3..6 {
        let did = h.tick_at(T0 + n * CHECKPOINT_INTERVAL);
        assert!(
            writes(&did).is_empty(),
            "an idle owner writes nothing: {did:?}"
        );
    }
}

#[test]
fn restored_unpublished_events_are_republished_at_start() {
    let mut log = StateLog::new();
    let old = log.marker("old");
    let (p1, e1) = sca_pending_payment("p-1", "BELFIUS");
    let p1_at = log.payment(old, &p1, &e1);
    log.checkpoint(old, p1_at);
    let (p2, e2) = sca_pending_payment("p-2", "BELFIUS");
    let p2_at = log.payment(old, &p2, &e2);
    let mine = log.marker("mine");
    let restored = log.restore(mine);
    let config = CoreConfig {
        epoch: mine,
        ..config(Policy::default())
    };
    let mut h = Harness::with_config(restored, config);
    let did = h.start();
    assert_eq!(
        published(&did),
        vec![(p2_at, vec![StateKind::ScaPending])],
        "only after the checkpoint"
    );
    assert!(writes(&did).is_empty() && calls(&did).is_empty(), "{did:?}");
    // The checkpoint stays below the record until its events are out.
    let did = h.tick_at(T0 + CHECKPOINT_INTERVAL);
    assert_eq!(
        writes(&did),
        vec![("outbox-checkpoint/0".to_owned(), "checkpoint")]
    );
    let checkpoint = h.open_write("outbox-checkpoint/0");
    assert!(
        matches!(checkpoint.write, StateWrite::Checkpoint { through } if through == p2_at - 1),
        "{:?}",
        checkpoint.write
    );
    h.ack_write();
    let did = h.ack_publications();
    assert!(did.is_empty(), "{did:?}");
    let did = h.tick_at(T0 + 2 * CHECKPOINT_INTERVAL);
    assert_eq!(
        writes(&did),
        vec![("outbox-checkpoint/0".to_owned(), "checkpoint")]
    );
    let checkpoint = h.open_write("outbox-checkpoint/0");
    assert!(
        matches!(checkpoint.write, StateWrite::Checkpoint { through } if through >= mine),
        "{:?}",
        checkpoint.write
    );
}

// ---------------------------------------------------------------------------------------------
// More interleavings
// ---------------------------------------------------------------------------------------------

/// Restore and core together: a superseded owner wrote a CANCELLING payment's key after a
/// newer claim. The new owner re-writes the payment first, then resumes it (the cancellation
/// is sent again once the heal and the resume are durable).
#[test]
fn a_zombie_key_found_by_restore_is_healed_before_the_payment_resumes() {
    let mut log = StateLog::new();
    let old = log.marker("old");
    let cancelling = cancelling_payment("p-1", "BELFIUS");
    log.payment(old, &cancelling, &[]);
    let tokens = fresh("BELFIUS", "belfius-access");
    let (k, v) = state::encode_psu(&log.key, old, &tokens).expect("psu");
    log.push(k, Some(v), Some(old));
    log.marker("newer");
    let mut zombie = cancelling.clone();
    zombie.sequence += 10;
    log.payment(old, &zombie, &[]);
    let mine = log.marker("mine");
    let restored = log.restore(mine);
    assert!(restored.zombie_keys.contains("payment/p-1"));
    assert_eq!(restored.payments[&pid("p-1")].sequence, cancelling.sequence);
    let config = CoreConfig {
        epoch: mine,
        ..config(Policy::default())
    };
    let mut h = Harness::with_config(restored, config);

    let did = h.start();
    assert_eq!(writes(&did), vec![pw("p-1")], "the heal only: {did:?}");
    let heal = h.open_write("payment/p-1");
    assert!(matches!(heal.fence, FenceWait::Confirm { .. }));
    assert!(
        matches!(&heal.write, StateWrite::Payment { payment, .. } if payment.sequence == cancelling.sequence),
        "the restored version, not the zombie's"
    );
    let did = h.ack_write();
    assert_eq!(
        writes(&did),
        vec![pw("p-1")],
        "then the resume's intent: {did:?}"
    );
    assert!(calls(&did).is_empty());
    let did = h.ack_write();
    assert_eq!(calls(&did), vec![pc("p-1", "cancel")]);
}

#[test]
fn a_dead_letter_decided_before_revoke_is_still_written_during_the_drain() {
    let mut h = Harness::empty();
    let (offset, _) = h.command("c-1", "p-x", cancel_body());
    assert_eq!(h.on(Event::Revoke), vec![]);
    let did = h.ack_write();
    assert_eq!(dead_letters(&did), vec![(offset, "UNKNOWN_PAYMENT")]);
    assert!(!released(&did), "the dead letter is outstanding");
    let did = h.ack_dead_letters();
    assert!(did.contains(&Did::Committable(offset + 1)), "{did:?}");
    // The barrier landed after the marker: one last checkpoint, then released.
    assert_eq!(
        writes(&did),
        vec![("outbox-checkpoint/0".to_owned(), "checkpoint")]
    );
    assert_eq!(h.ack_write(), vec![Did::Released]);
}

#[test]
fn the_last_checkpoint_not_acknowledged_in_time_releases_at_the_finish_deadline() {
    let mut h = Harness::empty();
    let did = h.on(Event::Revoke);
    assert_eq!(
        writes(&did),
        vec![("outbox-checkpoint/0".to_owned(), "checkpoint")]
    );
    assert_eq!(h.core.next_wake(), Some(T0 + FINISH_TIMEOUT));
    assert!(h.tick_at(T0 + FINISH_TIMEOUT - 1).is_empty());
    assert_eq!(h.tick_at(T0 + FINISH_TIMEOUT), vec![Did::Released]);
    // Its acknowledgement comes too late: nothing.
    assert!(h.ack_write().is_empty());
}

#[test]
fn undecodable_and_misrouted_records_are_dead_lettered_with_their_class_after_the_barrier() {
    let partitions = 4;
    let mut h = Harness::with_config(
        restored(vec![], vec![]),
        CoreConfig {
            partitions,
            ..config(Policy::default())
        },
    );
    h.start();
    let did = h.record_at(
        0,
        PSU,
        partition_for(PSU.as_bytes(), partitions),
        Decoded::Undecodable {
            class: "MALFORMED_AVRO",
            message: "truncated".into(),
        },
    );
    assert!(dead_letters(&did).is_empty(), "{did:?}");
    let right = partition_for(PSU.as_bytes(), partitions);
    let envelope = CommandEnvelope {
        command_id: "c-1".into(),
        payment_id: "p-1".into(),
        psu_id: PSU.into(),
        issued_at: T0,
        body: initiate_body("p-1", "BELFIUS"),
    };
    let did = h.record_at(
        1,
        PSU,
        (right + 1) % partitions,
        Decoded::Envelope(Box::new(envelope)),
    );
    assert!(dead_letters(&did).is_empty(), "{did:?}");
    assert!(
        writes(&h.history)
            .iter()
            .all(|(_, what)| *what == "checkpoint")
    );
    let did = h.flush();
    assert_eq!(
        dead_letters(&did),
        vec![(0, "MALFORMED_AVRO"), (1, "WRONG_PARTITION")]
    );
    assert!(h.core.payment(&pid("p-1")).is_none());
    assert_eq!(h.committable, Some(2));
}

// ---------------------------------------------------------------------------------------------
// Retention: final payments retire, retired ids are refused, then forgotten
// ---------------------------------------------------------------------------------------------

impl Harness {
    /// On to `SETTLED` through a poll after `SIGNED`; the settling write acknowledged, its
    /// events not yet published. Returns when it became final.
    fn settled_unpublished(&mut self, id: &str, access: &str) -> Millis {
        self.signed(id, "BELFIUS", access);
        let at = self.payment(id).next_check_at.expect("a poll timer");
        self.tick_at(at);
        self.answer(id, "status", observed(BankProgress::Settled, "ACSC"));
        self.ack_writes();
        assert_eq!(self.state(id), PaymentState::Settled);
        assert!(
            !self.publications.is_empty(),
            "the SETTLED event is being published"
        );
        self.now
    }
}

fn retired_writes(did: &[Did]) -> Vec<(String, bool)> {
    did.iter()
        .filter_map(|d| match d {
            Did::Write {
                key,
                what: "retired",
                confirm,
                ..
            } => Some((key.clone(), *confirm)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_settled_payment_retires_after_the_horizon_only_once_published_and_idle_with_a_fenced_write() {
    let mut h = Harness::empty();
    let final_at = h.settled_unpublished("p-1", "access-1");

    // Not before the horizon.
    let did = h.tick_at(final_at + RETENTION - 1);
    assert!(retired_writes(&did).is_empty(), "{did:?}");
    // At the horizon, its SETTLED event is still being published: it waits.
    let did = h.tick_at(final_at + RETENTION);
    assert!(retired_writes(&did).is_empty(), "{did:?}");
    h.ack_publications();
    // Published; now a superseded owner's record of it makes it busy (its heal) when its
    // turn comes again.
    let stale_at = h.next_state_offset;
    let did = h.on(Event::StaleRecord {
        key: "payment/p-1".into(),
        offset: stale_at,
    });
    assert_eq!(writes(&did), vec![pw("p-1")], "the heal: {did:?}");
    h.next_state_offset += 1;
    let did = h.tick_at(h.now + 1_000);
    assert!(retired_writes(&did).is_empty(), "busy: not yet ({did:?})");
    h.flush();
    // Idle, published: the retired record, fenced.
    let did = h.tick_at(h.now + 1_000);
    assert_eq!(retired_writes(&did), vec![("payment/p-1".to_owned(), true)]);
    let write = h.open_write("payment/p-1");
    assert!(matches!(write.fence, FenceWait::Confirm { .. }));
    let StateWrite::Retired(retired) = &write.write else {
        panic!("not a retired record: {:?}", write.write)
    };
    assert_eq!(retired.final_state, StateKind::Settled);
    assert_eq!(retired.final_at, final_at);
    assert_eq!(retired.retired_at, h.now);
    assert_eq!(retired.psu_id, PsuId::new(PSU));
    // Until it is acknowledged (and confirmed), the payment is still there.
    assert!(h.core.payment(&pid("p-1")).is_some());
    h.ack_write();
    assert!(h.core.payment(&pid("p-1")).is_none());
    assert!(h.core.retired(&pid("p-1")).is_some());
    assert_eq!(h.core.summary().retired, 1);
}

#[test]
fn a_command_for_a_retired_id_is_dead_lettered_payment_retired_after_a_confirmed_barrier() {
    let mut h = Harness::empty();
    let final_at = h.settled_unpublished("p-1", "access-1");
    h.ack_publications();
    h.tick_at(final_at + RETENTION);
    // A re-sent initiation arrives while the retired record is being written: it waits.
    let (offset, did) = h.initiate("p-1", "BELFIUS");
    assert!(dead_letters(&did).is_empty(), "{did:?}");
    let did = h.ack_write();
    // Retired; the command's verdict waits for a confirmed write after it (a barrier).
    assert!(dead_letters(&did).is_empty(), "{did:?}");
    assert_eq!(
        writes(&did),
        vec![(state::checkpoint_key(PARTITION), "checkpoint")]
    );
    let did = h.ack_writes();
    assert_eq!(dead_letters(&did), vec![(offset, PAYMENT_RETIRED)]);
    assert!(calls(&did).is_empty());
    h.ack_dead_letters();
    assert!(h.committable.is_some_and(|c| c > offset));
    // Later ones too, with no bank call and no new payment.
    let (offset, _) = h.initiate("p-1", "BELFIUS");
    let did = h.flush();
    assert_eq!(dead_letters(&did), vec![(offset, PAYMENT_RETIRED)]);
    assert!(h.calls.is_empty());
    assert!(h.core.payment(&pid("p-1")).is_none());
}

#[test]
fn a_retired_id_is_forgotten_after_the_second_horizon_and_a_new_initiation_is_a_new_payment() {
    let mut h = Harness::empty();
    let final_at = h.settled_unpublished("p-1", "access-1");
    h.ack_publications();
    h.tick_at(final_at + RETENTION);
    h.flush();
    assert!(h.core.retired(&pid("p-1")).is_some());
    // Not before the second horizon.
    let did = h.tick_at(final_at + RETIRED_IDS_RETENTION - 1);
    assert!(
        !writes(&did).contains(&("payment/p-1".to_owned(), "delete-key")),
        "{did:?}"
    );
    let did = h.tick_at(final_at + RETIRED_IDS_RETENTION);
    assert!(
        did.contains(&Did::Write {
            id: h.open_write("payment/p-1").id,
            key: "payment/p-1".into(),
            what: "delete-key",
            confirm: true,
        }),
        "{did:?}"
    );
    h.flush();
    assert!(h.core.retired(&pid("p-1")).is_none());
    // The id is free again: a new payment.
    h.initiate("p-1", "BELFIUS");
    h.flush();
    assert_eq!(calls(&h.history).last(), Some(&pc("p-1", "initiate")));
    assert!(matches!(h.state("p-1"), PaymentState::Initiating { .. }));
}

#[test]
fn restore_of_a_retired_record_refuses_its_commands_and_forgets_it_on_time() {
    let mut log = StateLog::new();
    let old = log.marker("old");
    let (p, events) = received_payment("p-1", "BELFIUS");
    log.payment(old, &p, &events);
    let retired = Retired {
        payment_id: pid("p-1"),
        psu_id: PsuId::new(PSU),
        final_state: StateKind::Rejected,
        last_sequence: 3,
        last_command_offset: Some(4),
        final_at: T0 - RETENTION,
        retired_at: T0 - 1_000,
    };
    let (k, v) = state::encode_retired(&log.key, old, &retired).expect("retired");
    log.raw(&k, &v, old);
    let mine = log.marker("mine");
    let restored = log.restore(mine);
    assert!(restored.payments.is_empty());
    assert_eq!(restored.retired.get(&pid("p-1")), Some(&retired));
    assert!(
        restored.unpublished.is_empty(),
        "{:?}",
        restored.unpublished
    );
    let mut h = Harness::new(restored);
    assert!(h.start().is_empty());
    // A re-delivered command it took is done, silently; a new one is dead-lettered.
    h.command_at(4, "c-old", PSU, "p-1", CommandBody::RefreshStatus);
    let (offset, _) = h.command("c-new", "p-1", CommandBody::RefreshStatus);
    let did = h.flush();
    assert_eq!(dead_letters(&did), vec![(offset, PAYMENT_RETIRED)]);
    assert_eq!(h.committable, Some(offset + 1));
    let did = h.tick_at(T0 - RETENTION + RETIRED_IDS_RETENTION);
    assert!(
        writes(&did).contains(&("payment/p-1".to_owned(), "delete-key")),
        "{did:?}"
    );
}

#[test]
fn expired_token_pairs_of_a_psu_without_live_payments_are_deleted_and_a_live_payments_pair_stays() {
    // psu-1 at BELFIUS: access expired, no refresh token, no live payment: deleted.
    // psu-1 at BANX: expired with a refresh token of unknown lifetime: kept for the retention
    // horizon since its last update, then deleted.
    let dead = pair("BELFIUS", "dead", Some(T0 - 1_000), None);
    let refreshable = expired("BANX", "old", "refresh");
    let updated_at = refreshable.updated_at;
    let mut h = Harness::new(restored(vec![], vec![dead, refreshable]));
    assert!(h.start().is_empty());
    let did = h.tick_at(T0 + 60_000);
    assert_eq!(
        writes(&did),
        vec![(state::psu_key(&token_key("BELFIUS")), "delete-tokens")]
    );
    h.flush();
    assert!(h.core.tokens(&token_key("BELFIUS")).is_none());
    assert!(h.core.tokens(&token_key("BANX")).is_some());
    let did = h.tick_at(updated_at + RETENTION);
    assert!(
        writes(&did).contains(&(state::psu_key(&token_key("BANX")), "delete-tokens")),
        "{did:?}"
    );
    h.flush();
    assert!(h.core.tokens(&token_key("BANX")).is_none());
}

#[test]
fn an_expired_pair_of_a_psu_with_a_live_payment_is_kept() {
    let dead = pair("BELFIUS", "dead", Some(T0 - 1_000), None);
    let mut h = Harness::new(restored(vec![signed_payment("p-1", "BELFIUS")], vec![dead]));
    h.start();
    h.flush();
    let did = h.tick_at(T0 + 60_000);
    assert!(
        !writes(&did).contains(&(state::psu_key(&token_key("BELFIUS")), "delete-tokens")),
        "{did:?}"
    );
    assert!(h.core.tokens(&token_key("BELFIUS")).is_some());
}

// ---------------------------------------------------------------------------------------------
// Snapshots
// ---------------------------------------------------------------------------------------------

/// What an owner acts on after a restore, comparable.
fn restored_view(r: &Restored) -> Vec<String> {
    let mut view: Vec<String> = r
        .payments
        .values()
        .map(|p| format!("payment {p:?}"))
        .chain(r.retired.values().map(|x| format!("retired {x:?}")))
        .chain(r.tokens.iter().map(|(k, t)| {
            format!(
                "tokens {k} {} {:?} {:?}",
                t.access_token.expose_secret(),
                t.expires_at,
                t.updated_at
            )
        }))
        .chain(
            r.quarantined
                .iter()
                .map(|(k, q)| format!("quarantined {k} at {} {}", q.offset, q.class)),
        )
        .collect();
    view.sort();
    view
}

/// The commit the owner asked for among `did`.
fn commit_asked(did: &[Did]) -> Option<SnapshotStart> {
    did.iter().find_map(|d| match d {
        Did::CommitSnapshot(start) => Some(*start),
        _ => None,
    })
}

/// An owner restored from a log with a quarantined payment (over its last good state), a
/// payment waiting for SCA and another owner's claim; snapshots every minute at most.
fn snapshotting_owner() -> Harness {
    let mut log = StateLog::new();
    let first = log.marker("first");
    let (held, _) = sca_pending_payment("p-held", "BELFIUS");
    log.payment(first, &held, &[]);
    log.raw("payment/p-held", b"not a state record", first);
    let (waiting, events) = sca_pending_payment("p-waiting", "BELFIUS");
    let at = log.payment(first, &waiting, &events);
    log.checkpoint(first, at);
    let mine = log.marker("mine");
    let restored = log.restore(mine);
    assert_eq!(
        restored.markers.len(),
        1,
        "the other owner's claim is known"
    );
    let config = CoreConfig {
        epoch: mine,
        snapshot_interval_ms: 60_000,
        ..config(Policy::default())
    };
    let mut h = Harness::with_config(restored, config);
    h.log = Some(log);
    h.start();
    h.flush();
    h
}

/// Moves past the snapshot interval and acknowledges everything until the owner asks for the
/// snapshot to be recorded.
fn take_snapshot(h: &mut Harness) -> SnapshotStart {
    let at = h.now + 60_000;
    let mut did = h.tick_at(at);
    for _ in 0..10_000 {
        if let Some(start) = commit_asked(&did) {
            return start;
        }
        did = if !h.writes.is_empty() {
            h.ack_write()
        } else if !h.publications.is_empty() {
            h.ack_publications()
        } else if let Some((id, _)) = h
            .open_calls()
            .into_iter()
            .find(|(_, kind)| *kind == "status")
        {
            // The interval also made payments due for a poll: the bank says nothing new.
            let answer = nothing_new(h, &id);
            h.answer(&id, "status", answer)
        } else {
            h.tick()
        };
    }
    panic!("no snapshot commit asked for: {:?}", h.history);
}

#[test]
fn a_restore_from_a_snapshot_sees_what_a_full_read_sees() {
    within_seconds(10, || {
        let mut h = snapshotting_owner();
        h.sca_pending("p-before", "BELFIUS");
        h.signed("p-signed", "BELFIUS", "access-1");
        let start = take_snapshot(&mut h);
        assert_eq!(start.epoch, h.core.epoch());
        let did = h.on(Event::SnapshotCommitted {
            start,
            outcome: SnapshotCommit::Committed,
        });
        // The first snapshot deletes no claim: a restore may still start at the one before.
        assert!(writes(&did).is_empty(), "{did:?}");
        // Life goes on after the snapshot: a new payment, and one moves on.
        h.sca_pending("p-after", "BELFIUS");
        h.complete_sca("c-sca-p-before", "p-before", "code-x");
        h.flush();
        let mut log = h.log.take().expect("log");
        let next = log.marker("next");
        let full = log.restore(next);
        let from = log.restore_from(&start, next);
        assert_eq!(restored_view(&from), restored_view(&full));
        assert!(
            from.records_read < full.records_read,
            "{} vs {}",
            from.records_read,
            full.records_read
        );
        // The held payment stays held, under its first offset, with its last good state.
        assert_eq!(from.quarantined["payment/p-held"].offset, 2);
        assert!(from.payments.contains_key(&pid("p-held")));
        // Every event before the snapshot was published before it was recorded.
        assert!(full.unpublished.iter().all(|(o, _)| *o >= start.begin));
        assert_eq!(from.unpublished.len(), full.unpublished.len());
        assert_eq!(from.snapshot, Some(start));
    });
}

#[test]
fn a_snapshot_waits_for_a_busy_payment_and_for_the_events_before_it() {
    within_seconds(10, || {
        let mut h = snapshotting_owner();
        // p-busy's initiation is outstanding at the bank when the snapshot begins, and the
        // events of its first records are not published yet.
        h.initiate("p-busy", "BELFIUS");
        let mut did = Vec::new();
        while !h.writes.is_empty() {
            did.extend(h.ack_write());
        }
        assert_eq!(h.open_calls(), vec![pc("p-busy", "initiate")]);
        assert!(!h.publications.is_empty());
        let at = h.now + 60_000;
        did.extend(h.tick_at(at));
        did.extend(answer_polls(&mut h));
        assert!(
            !writes(&did).contains(&(state::snapshot_key(PARTITION), "snapshot-end")),
            "a busy payment is not copied yet: {did:?}"
        );
        let mut did = h.answer("p-busy", "initiate", initiated("p-busy"));
        while !h.writes.is_empty() {
            did.extend(h.ack_write());
        }
        let copied = did.iter().any(|d| {
            matches!(d, Did::Write { key, what: "payment", confirm: false, .. } if key == "payment/p-busy")
        });
        assert!(copied, "copied once idle: {did:?}");
        assert!(writes(&did).contains(&(state::snapshot_key(PARTITION), "snapshot-end")));
        assert_eq!(
            commit_asked(&h.history),
            None,
            "events of records before the begin are not published yet"
        );
        let mut did = h.ack_publications();
        did.extend(h.flush());
        did.extend(h.tick());
        let start = commit_asked(&did).expect("recorded once they are published");
        let mut log = h.log.take().expect("log");
        let next = log.marker("next");
        assert_eq!(
            restored_view(&log.restore_from(&start, next)),
            restored_view(&log.restore(next))
        );
    });
}

/// A status answer that repeats what the bank already said of `id`.
fn nothing_new(h: &Harness, id: &str) -> BankAnswer {
    if h.state(id) == PaymentState::Signed {
        observed(BankProgress::Signed, "ACTC")
    } else {
        observed(BankProgress::AwaitingSca, "RCVD")
    }
}

/// Answers every open status poll with what the bank already said; acknowledges the writes
/// that follow (not the publications).
fn answer_polls(h: &mut Harness) -> Vec<Did> {
    let mut did = Vec::new();
    loop {
        while !h.writes.is_empty() {
            did.extend(h.ack_write());
        }
        let Some((id, _)) = h
            .open_calls()
            .into_iter()
            .find(|(_, kind)| *kind == "status")
        else {
            return did;
        };
        let answer = nothing_new(h, &id);
        did.extend(h.answer(&id, "status", answer));
    }
}

#[test]
fn claims_before_the_previous_snapshot_are_deleted_and_a_deleted_claim_is_no_claim() {
    within_seconds(10, || {
        let mut h = snapshotting_owner();
        h.sca_pending("p-1", "BELFIUS");
        let first = take_snapshot(&mut h);
        h.on(Event::SnapshotCommitted {
            start: first,
            outcome: SnapshotCommit::Committed,
        });
        h.flush();
        h.sca_pending("p-2", "BELFIUS");
        let second = take_snapshot(&mut h);
        assert!(second.begin > first.begin);
        let did = h.on(Event::SnapshotCommitted {
            start: second,
            outcome: SnapshotCommit::Committed,
        });
        assert_eq!(
            writes(&did),
            vec![(state::restore_marker_key(PARTITION, "first"), "delete-key")]
        );
        h.flush();
        let mut log = h.log.take().expect("log");
        let next = log.marker("next");
        let full = log.restore(next);
        // The tombstone of the old claim, read after this owner's records, fenced nothing.
        assert_eq!(full.zombie_records, 0);
        assert!(full.zombie_keys.is_empty());
        assert!(!full.markers.values().any(|k| k.ends_with("/first")));
        assert_eq!(
            restored_view(&log.restore_from(&second, next)),
            restored_view(&full)
        );
        // A paused owner's late commit sending restores back to the first snapshot still
        // restores the same.
        assert_eq!(
            restored_view(&log.restore_from(&first, next)),
            restored_view(&full)
        );
    });
}

#[test]
fn a_snapshot_is_written_when_restore_would_read_too_much_not_only_on_the_interval() {
    within_seconds(10, || {
        let config = CoreConfig {
            snapshot_min_records: 20,
            ..config(Policy::default())
        };
        let mut h = Harness::with_config(restored(vec![], vec![]), config);
        h.start();
        let mut n = 0;
        while !h.history.iter().any(|d| {
            matches!(
                d,
                Did::Write {
                    what: "snapshot-begin",
                    ..
                }
            )
        }) {
            n += 1;
            assert!(n < 20, "no snapshot after {n} payments");
            h.sca_pending(&format!("p-{n}"), "BELFIUS");
        }
        assert!(h.core.restore_backlog() >= 20);
    });
}

#[test]
fn a_failed_or_superseded_commit_is_not_retried_at_once() {
    within_seconds(10, || {
        let mut h = snapshotting_owner();
        let start = take_snapshot(&mut h);
        h.on(Event::SnapshotCommitted {
            start,
            outcome: SnapshotCommit::Failed("broker down".into()),
        });
        let did = h.flush();
        assert!(
            !did.iter().any(|d| matches!(
                d,
                Did::Write {
                    what: "snapshot-begin",
                    ..
                }
            )),
            "{did:?}"
        );
        assert_eq!(h.core.newest_snapshot(), None);
        // Within a minute it is tried again.
        let start = take_snapshot(&mut h);
        h.on(Event::SnapshotCommitted {
            start,
            outcome: SnapshotCommit::Committed,
        });
        assert_eq!(h.core.newest_snapshot(), Some(start));
        // A restore now reads the records from the begin on, no more.
        let begin_at = h
            .history
            .iter()
            .rposition(|d| {
                matches!(
                    d,
                    Did::Write {
                        what: "snapshot-begin",
                        ..
                    }
                )
            })
            .expect("a begin");
        let since = h.history[begin_at..]
            .iter()
            .filter(|d| matches!(d, Did::Write { .. }))
            .count();
        assert_eq!(h.core.restore_backlog(), since as u64);
    });
}

// ---------------------------------------------------------------------------------------------
// Returning PSUs: initiations with the PSU's access token
// ---------------------------------------------------------------------------------------------

/// The access token an outstanding token initiation of `payment` presents.
fn presented(h: &Harness, payment: &str) -> String {
    match &h.open_call(payment, "initiate-with-token").call {
        BankCall::Initiate {
            access_token: Some(token),
        } => token.expose_secret().to_owned(),
        other => panic!("{other:?}"),
    }
}

fn access_of(h: &Harness, brand_name: &str) -> Option<String> {
    h.core
        .tokens(&token_key(brand_name))
        .map(|t| t.access_token.expose_secret().to_owned())
}

#[test]
fn a_returning_psus_payment_is_initiated_with_the_held_token_and_signed_without_a_code() {
    let mut h = Harness::new(restored(vec![], vec![fresh("BELFIUS", "access-1")]));
    h.start();
    h.initiate("p-1", "BELFIUS");
    let did = h.flush();
    assert_eq!(calls(&did), vec![pc("p-1", "initiate-with-token")]);
    assert_eq!(presented(&h, "p-1"), "access-1");
    // Written before the call without a verifier: no code is to come, none to exchange.
    let written = &h.persisted[&pid("p-1")];
    assert_eq!(written.state, PaymentState::Initiating { attempt: 1 });
    assert!(written.pkce_verifier.is_none());
    h.answer("p-1", "initiate-with-token", initiated("p-1"));
    h.flush();
    assert_eq!(h.state("p-1"), PaymentState::ScaPending);

    // The PSU signed; the redirect carries the state only.
    let state = h.payment("p-1").sca_state.clone();
    let (_, did) = h.command("c-sca", "p-1", sca_returned_body(state.as_deref()));
    assert_eq!(writes(&did), vec![pw("p-1")]);
    let did = h.flush();
    assert_eq!(
        calls(&did),
        vec![pc("p-1", "status")],
        "no exchange: {did:?}"
    );
    h.answer("p-1", "status", observed(BankProgress::Signed, "ACTC"));
    let did = h.flush();
    assert_eq!(h.state("p-1"), PaymentState::Signed);
    assert_eq!(published(&did).len(), 1);
    // Used, not issued: the pair is as it was, and nothing was written for it.
    assert_eq!(access_of(&h, "BELFIUS").as_deref(), Some("access-1"));
    assert!(
        !h.history.iter().any(|d| matches!(
            d,
            Did::Write {
                what: "tokens" | "delete-tokens",
                ..
            }
        )),
        "{:?}",
        h.history
    );
}

/// An expired access token is refreshed in the PSU's lane first; the new pair is durable
/// before the initiation presents it. A second payment waiting in the lane meanwhile uses the
/// new pair: one refresh, never the replaced token.
#[test]
fn an_expired_token_is_refreshed_once_then_presented_by_every_waiting_initiation() {
    let mut h = Harness::new(restored(
        vec![],
        vec![expired("BELFIUS", "old-access", "old-refresh")],
    ));
    h.start();
    h.initiate("p-1", "BELFIUS");
    let did = h.flush();
    assert_eq!(calls(&did), vec![pc("p-1", "refresh")]);
    let BankCall::Refresh { refresh_token, .. } = &h.open_call("p-1", "refresh").call else {
        unreachable!()
    };
    assert_eq!(refresh_token.expose_secret(), "old-refresh");
    h.initiate("p-2", "BELFIUS");
    let did = h.flush();
    assert!(calls(&did).is_empty(), "p-2 waits in the lane: {did:?}");
    assert!(h.payment("p-2").pkce_verifier.is_none());

    let did = h.answer("p-1", "refresh", issued("access-2"));
    assert_eq!(
        writes(&did),
        vec![("psu/BELFIUS/psu-1".to_owned(), "tokens")]
    );
    assert!(calls(&did).is_empty(), "not before it is durable: {did:?}");
    let did = h.ack_write();
    assert_eq!(calls(&did), vec![pc("p-1", "initiate-with-token")]);
    assert_eq!(presented(&h, "p-1"), "access-2");
    let did = h.answer("p-1", "initiate-with-token", initiated("p-1"));
    assert_eq!(calls(&did), vec![pc("p-2", "initiate-with-token")]);
    assert_eq!(presented(&h, "p-2"), "access-2");
}

/// The first initiation call `id` makes, as the owner decides it.
fn first_initiation(h: &mut Harness, id: &str, body: CommandBody) -> &'static str {
    h.command(&format!("c-init-{id}"), id, body);
    let did = h.flush();
    let found: Vec<&'static str> = calls(&did)
        .into_iter()
        .filter(|(p, _)| p == id)
        .map(|(_, kind)| kind)
        .collect();
    assert_eq!(found.len(), 1, "{did:?}");
    found[0]
}

#[test]
fn without_a_usable_pair_or_when_switched_off_or_asked_for_the_payment_goes_with_pkce() {
    // No pair for the PSU.
    let mut h = Harness::empty();
    assert_eq!(
        first_initiation(&mut h, "p-1", initiate_body("p-1", "BELFIUS")),
        "initiate"
    );
    assert!(h.payment("p-1").pkce_verifier.is_some());

    // A pair of the other brand only.
    let mut h = Harness::new(restored(vec![], vec![fresh("BELFIUS", "belfius-access")]));
    h.start();
    assert_eq!(
        first_initiation(&mut h, "p-banx", initiate_body("p-banx", "BANX")),
        "initiate"
    );
    // An expired pair with nothing to refresh it with.
    let mut h = Harness::new(restored(
        vec![],
        vec![pair("BELFIUS", "dead", Some(T0 - 1_000), None)],
    ));
    h.start();
    assert_eq!(
        first_initiation(&mut h, "p-1", initiate_body("p-1", "BELFIUS")),
        "initiate"
    );

    // The deployment's switch is off.
    let off = Policy {
        initiate_with_token: false,
        ..Policy::default()
    };
    let mut h = Harness::with_config(
        restored(vec![], vec![fresh("BELFIUS", "access-1")]),
        config(off),
    );
    h.start();
    assert_eq!(
        first_initiation(&mut h, "p-1", initiate_body("p-1", "BELFIUS")),
        "initiate"
    );

    // The client asked for PKCE: on every attempt, a retry included.
    let mut h = Harness::new(restored(vec![], vec![fresh("BELFIUS", "access-1")]));
    h.start();
    let mut body = initiate_body("p-1", "BELFIUS");
    if let CommandBody::Initiate(raw) = &mut body {
        raw.always_pkce = true;
    }
    assert_eq!(first_initiation(&mut h, "p-1", body), "initiate");
    assert!(h.payment("p-1").always_pkce);
    h.answer(
        "p-1",
        "initiate",
        BankAnswer::Input(Box::new(Input::InitiationFailed(
            crate::domain::machine::InitiationFailure::NotProcessed {
                message: "429".into(),
                retry_after_ms: None,
            },
        ))),
    );
    h.flush();
    let retry_at = h.payment("p-1").next_check_at.expect("a retry");
    h.tick_at(retry_at);
    let did = h.flush();
    assert_eq!(calls(&did), vec![pc("p-1", "initiate")]);
    assert_eq!(h.payment("p-1").initiation_attempts, 2);
}

/// A 401 to the token creates nothing at the bank: the same attempt goes with PKCE (its
/// verifier durable first), and the refused token is never presented again.
#[test]
fn a_token_refused_at_initiation_falls_back_to_pkce_and_is_refreshed_before_its_next_use() {
    let mut h = Harness::new(restored(vec![], vec![fresh("BELFIUS", "replaced-access")]));
    h.start();
    h.initiate("p-1", "BELFIUS");
    h.flush();
    let did = h.answer("p-1", "initiate-with-token", access_token_rejected());
    // The pair marked expired, durably (a restart must not present the refused token again),
    // then the verifier, then the PKCE call.
    assert_eq!(
        writes(&did),
        vec![("psu/BELFIUS/psu-1".to_owned(), "tokens")]
    );
    let marked = &h.open_write("psu/BELFIUS/psu-1");
    assert!(matches!(marked.fence, FenceWait::Confirm { .. }));
    let StateWrite::Tokens(marked) = &marked.write else {
        unreachable!()
    };
    assert!(marked.expires_at.is_some_and(|at| at < T0), "{marked:?}");
    let did = h.ack_write();
    assert_eq!(writes(&did), vec![pw("p-1")]);
    assert!(calls(&did).is_empty(), "the verifier first: {did:?}");
    let did = h.ack_write();
    assert_eq!(calls(&did), vec![pc("p-1", "initiate")]);
    let written = &h.persisted[&pid("p-1")];
    assert_eq!(written.state, PaymentState::Initiating { attempt: 1 });
    assert_eq!(written.initiation_attempts, 1, "the same attempt");
    assert!(written.pkce_verifier.is_some());
    h.answer("p-1", "initiate", initiated("p-1"));
    h.flush();
    assert_eq!(h.state("p-1"), PaymentState::ScaPending);
    // Its redirect must bring a code now.
    let state = h.payment("p-1").sca_state.clone();
    let (offset, _) = h.command("c-sca-bare", "p-1", sca_returned_body(state.as_deref()));
    let did = h.flush();
    assert_eq!(dead_letters(&did), vec![(offset, "CODE_REQUIRED")]);

    // The pair is kept (it has a refresh token) but counts as expired: the next payment of
    // the PSU refreshes it before presenting anything, also after a restart.
    assert_eq!(access_of(&h, "BELFIUS").as_deref(), Some("replaced-access"));
    h.initiate("p-2", "BELFIUS");
    let did = h.flush();
    assert_eq!(calls(&did), vec![pc("p-2", "refresh")]);
    let stored = h.persisted_tokens[&token_key("BELFIUS")].clone();
    let mut again = Harness::new(restored(vec![], vec![stored]));
    again.start();
    again.initiate("p-3", "BELFIUS");
    let did = again.flush();
    assert_eq!(calls(&did), vec![pc("p-3", "refresh")]);
}

/// Without a refresh token the refused pair is deleted (a fenced tombstone), before the
/// fallback is written.
#[test]
fn a_refused_token_without_a_refresh_token_is_deleted_before_the_fallback() {
    let mut h = Harness::new(restored(
        vec![],
        vec![pair(
            "BELFIUS",
            "replaced-access",
            Some(T0 + 3_600_000),
            None,
        )],
    ));
    h.start();
    h.initiate("p-1", "BELFIUS");
    h.flush();
    let did = h.answer("p-1", "initiate-with-token", access_token_rejected());
    assert_eq!(
        writes(&did),
        vec![("psu/BELFIUS/psu-1".to_owned(), "delete-tokens")]
    );
    assert!(matches!(
        h.open_write("psu/BELFIUS/psu-1").fence,
        FenceWait::Confirm { .. }
    ));
    assert!(access_of(&h, "BELFIUS").is_none());
    let did = h.ack_write();
    assert_eq!(writes(&did), vec![pw("p-1")]);
    let did = h.ack_write();
    assert_eq!(calls(&did), vec![pc("p-1", "initiate")]);
}

#[test]
fn a_failed_refresh_before_an_initiation_falls_back_to_pkce() {
    // A dead grant: the pair goes (fenced), then the attempt goes with PKCE.
    let mut h = Harness::new(restored(
        vec![],
        vec![expired("BELFIUS", "old-access", "old-refresh")],
    ));
    h.start();
    h.initiate("p-1", "BELFIUS");
    h.flush();
    let did = h.answer(
        "p-1",
        "refresh",
        BankAnswer::RefreshFailed(RefreshFailure::Revoked {
            message: "invalid_grant".into(),
        }),
    );
    assert_eq!(
        writes(&did),
        vec![("psu/BELFIUS/psu-1".to_owned(), "delete-tokens")]
    );
    let did = h.flush();
    assert_eq!(calls(&did), vec![pc("p-1", "initiate")]);
    assert!(access_of(&h, "BELFIUS").is_none());
    assert!(h.payment("p-1").pkce_verifier.is_some());

    // No usable answer: the pair is kept (the bank may not have rotated it), PKCE anyway.
    let mut h = Harness::new(restored(
        vec![],
        vec![expired("BELFIUS", "old-access", "old-refresh")],
    ));
    h.start();
    h.initiate("p-1", "BELFIUS");
    h.flush();
    let did = h.answer(
        "p-1",
        "refresh",
        BankAnswer::RefreshFailed(RefreshFailure::Transient {
            message: "timeout".into(),
        }),
    );
    assert_eq!(writes(&did), vec![pw("p-1")]);
    let did = h.flush();
    assert_eq!(calls(&did), vec![pc("p-1", "initiate")]);
    assert_eq!(access_of(&h, "BELFIUS").as_deref(), Some("old-access"));
}

/// Belfius keeps one pair per PSU: a code exchange kills the pair it replaces. An initiation
/// with the token waits behind a running exchange and presents the pair it issued.
#[test]
fn a_token_initiation_waits_for_a_running_code_exchange_and_presents_the_new_pair() {
    let (first, _) = sca_pending_payment("p-0", "BELFIUS");
    let mut h = Harness::new(restored(vec![first], vec![fresh("BELFIUS", "access-1")]));
    h.start();
    h.complete_sca("c-sca-0", "p-0", "code-0");
    let did = h.flush();
    assert_eq!(calls(&did), vec![pc("p-0", "exchange")]);
    h.initiate("p-1", "BELFIUS");
    let did = h.flush();
    assert!(calls(&did).is_empty(), "behind the exchange: {did:?}");
    h.answer("p-0", "exchange", issued("access-2"));
    let did = h.ack_write();
    assert!(
        calls(&did).contains(&pc("p-1", "initiate-with-token")),
        "{did:?}"
    );
    assert_eq!(presented(&h, "p-1"), "access-2");
}

// ---------------------------------------------------------------------------------------------
// Consents
// ---------------------------------------------------------------------------------------------

fn consent_key(scope: crate::domain::consent::ConsentScope) -> ConsentKey {
    ConsentKey {
        brand: brand("BELFIUS"),
        scope,
        psu_id: PsuId::new(PSU),
    }
}

fn consent_request(id: &str, command: &str) -> crate::domain::consent::ConsentInput {
    use crate::domain::consent::{ConsentInput, ConsentRequest, ConsentScope};
    ConsentInput::Request {
        command_id: CommandId::new(command),
        consent_id: crate::domain::model::ConsentId::new(id),
        psu_id: PsuId::new(PSU),
        request: ConsentRequest {
            brand: brand("BELFIUS"),
            scope: ConsentScope::Caf,
            account_iban: Some("BE68539007547034".into()),
            language: Language::Fr,
            redirect_uri: "https://client.example/consent".into(),
        },
        pkce_verifier: SecretString::from("consent-verifier"),
        sca_state: format!("consent-state-{id}"),
    }
}

fn consent_writes(did: &[Did]) -> usize {
    writes(did).iter().filter(|(_, w)| *w == "consent").count()
}

fn consent_published(did: &[Did]) -> Vec<crate::domain::consent::ConsentState> {
    did.iter()
        .filter_map(|d| match d {
            Did::PublishConsent { states, .. } => Some(states.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn consent_calls_of(did: &[Did]) -> Vec<&'static str> {
    did.iter()
        .filter_map(|d| match d {
            Did::ConsentCall { call, .. } => Some(*call),
            _ => None,
        })
        .collect()
}

/// A consent from its request to its grant: every step is written (and confirmed) before its
/// event leaves or its bank call goes, the pair is written with the grant, and a restore from
/// what was written gives the granted consent with its pair.
#[test]
fn a_consent_is_requested_granted_and_restored_with_its_pair() {
    use crate::domain::consent::{ConsentInput, ConsentOutcome, ConsentScope, ConsentState};
    let mut log = StateLog::new();
    let mine = log.marker("mine");
    let restored = log.restore(mine);
    let config = CoreConfig {
        epoch: mine,
        ..config(Policy::default())
    };
    let mut h = Harness::with_config(restored, config);
    h.log = Some(log);
    h.start();
    let key = consent_key(ConsentScope::Caf);

    h.core
        .consent_input(key.clone(), consent_request("consent-1", "c1"), None, h.now);
    let did = h.tick();
    assert_eq!(consent_writes(&did), 1);
    assert!(
        consent_calls_of(&did).is_empty(),
        "no call before the write"
    );
    let did = h.ack_write();
    assert_eq!(consent_calls_of(&did), vec!["consent-uri"]);
    assert!(
        consent_published(&did).is_empty(),
        "REQUESTED is not published"
    );

    let did = h.answer_consent(
        "consent-uri",
        ConsentAnswer::Uri(Ok(
            "https://bank.example/consent?state=consent-state-consent-1".into(),
        )),
    );
    assert_eq!(consent_writes(&did), 1);
    assert!(consent_published(&did).is_empty(), "not before the write");
    let did = h.ack_write();
    assert_eq!(consent_published(&did), vec![ConsentState::Pending]);
    let (_, events) = h.consent_publications.last().expect("published");
    assert_eq!(
        events[0].consent_uri.as_deref(),
        Some("https://bank.example/consent?state=consent-state-consent-1")
    );
    h.ack_publications();

    h.core.consent_input(
        key.clone(),
        ConsentInput::Complete {
            command_id: CommandId::new("c2"),
            outcome: ConsentOutcome::Code(SecretString::from("the-code")),
            state: Some("consent-state-consent-1".into()),
        },
        None,
        h.now,
    );
    let did = h.tick();
    assert_eq!(consent_writes(&did), 1);
    let did = h.ack_write();
    assert_eq!(consent_calls_of(&did), vec!["consent-exchange"]);
    match &h.consent_calls[0].1 {
        ConsentCall::Exchange { code, verifier, .. } => {
            assert_eq!(code.expose_secret(), "the-code");
            assert_eq!(verifier.expose_secret(), "consent-verifier");
        }
        other => panic!("{other:?}"),
    }

    let did = h.answer_consent(
        "consent-exchange",
        ConsentAnswer::Tokens(Ok(TokenPair {
            access_token: SecretString::from("caf-access"),
            refresh_token: Some(SecretString::from("caf-refresh")),
            expires_in: Some(Duration::from_secs(600)),
            scope: Some("CAF".into()),
        })),
    );
    assert_eq!(consent_writes(&did), 1);
    assert!(
        h.core.consent(&key).is_some_and(|r| r.tokens.is_some()),
        "the pair is held with the grant"
    );
    let did = h.ack_write();
    assert_eq!(consent_published(&did), vec![ConsentState::Granted]);
    h.flush();

    let log = h.log.take().expect("log");
    let restored = log.restore(log.records.len() as i64);
    let record = restored.consents.get(&key).expect("restored");
    assert_eq!(record.consent.state, ConsentState::Granted);
    assert!(record.consent.pkce_verifier.is_none(), "spent");
    assert_eq!(
        record
            .tokens
            .as_ref()
            .map(|t| t.access_token.expose_secret().to_owned()),
        Some("caf-access".into())
    );
}

/// A consent URI call that gets no answer is asked again after the retry delay; a refusal
/// refuses the consent, published.
#[test]
fn an_unanswered_consent_uri_is_asked_again_and_a_refusal_is_published() {
    use crate::domain::consent::{ConsentPolicy, ConsentScope, ConsentState};
    let mut h = Harness::empty();
    let key = consent_key(ConsentScope::Caf);
    h.core
        .consent_input(key.clone(), consent_request("consent-1", "c1"), None, h.now);
    h.tick();
    h.ack_write();
    let did = h.answer_consent(
        "consent-uri",
        ConsentAnswer::Uri(Err(CallFailure {
            definite: false,
            message: "timeout".into(),
        })),
    );
    assert_eq!(consent_writes(&did), 1, "the retry time is durable");
    h.flush();
    assert!(h.consent_calls.is_empty());
    let did = h.tick_at(h.now + ConsentPolicy::default().retry_ms);
    let mut all = did;
    all.extend(h.flush());
    assert_eq!(consent_calls_of(&all), vec!["consent-uri"]);
    let did = h.answer_consent(
        "consent-uri",
        ConsentAnswer::Uri(Err(CallFailure {
            definite: true,
            message: "HTTP 406".into(),
        })),
    );
    assert_eq!(consent_writes(&did), 1);
    let did = h.ack_write();
    assert_eq!(consent_published(&did), vec![ConsentState::Refused]);
}

/// A second request while the first is pending: the first ends EXPIRED (superseded), both
/// written in order, before the new one's URI is asked for.
#[test]
fn a_second_request_supersedes_the_pending_consent() {
    use crate::domain::consent::{ConsentScope, ConsentState};
    let mut h = Harness::empty();
    let key = consent_key(ConsentScope::Caf);
    h.core
        .consent_input(key.clone(), consent_request("consent-1", "c1"), None, h.now);
    h.tick();
    h.ack_write();
    h.answer_consent(
        "consent-uri",
        ConsentAnswer::Uri(Ok("https://bank/c".into())),
    );
    h.flush();
    h.core
        .consent_input(key.clone(), consent_request("consent-2", "c2"), None, h.now);
    let did = h.tick();
    assert_eq!(
        consent_writes(&did),
        2,
        "the old one's end, then the new one"
    );
    let mut did = h.ack_write();
    did.extend(h.ack_write());
    assert_eq!(consent_published(&did), vec![ConsentState::Expired]);
    assert_eq!(consent_calls_of(&did), vec!["consent-uri"]);
    let (_, events) = &h.consent_publications[h.consent_publications.len() - 1];
    assert_eq!(events[0].consent_id.as_str(), "consent-1");
    assert_eq!(
        h.core
            .consent(&key)
            .map(|r| r.consent.consent_id.as_str().to_owned()),
        Some("consent-2".into())
    );
}

/// Found by `pis-chaos --consents`: a PSU asked for consent-1, then consent-2 (superseding
/// it); the owner died before the commands' offsets were committed. Its successor reads both
/// requests again: neither may start anything (consent-1's request used to supersede
/// consent-2 and publish consent-1's events again from sequence 1, with another URI).
#[test]
fn a_successor_reading_the_requests_again_keeps_the_newer_consent() {
    use crate::domain::consent::{ConsentScope, ConsentState};
    let mut log = StateLog::new();
    let first = log.marker("first");
    let cfg = CoreConfig {
        epoch: first,
        ..config(Policy::default())
    };
    let mut h = Harness::with_config(log.restore(first), cfg);
    h.log = Some(log);
    h.start();
    let key = consent_key(ConsentScope::Caf);
    for (id, command) in [("consent-1", "c1"), ("consent-2", "c2")] {
        h.core
            .consent_input(key.clone(), consent_request(id, command), None, h.now);
        h.tick();
        h.flush();
        h.answer_consent(
            "consent-uri",
            ConsentAnswer::Uri(Ok(format!("https://bank/{id}"))),
        );
        h.flush();
    }
    let mut log = h.log.take().expect("log");
    let second = log.marker("second");
    let cfg = CoreConfig {
        epoch: second,
        ..config(Policy::default())
    };
    let mut h = Harness::with_config(log.restore(second), cfg);
    h.start();
    h.flush();
    for (id, command) in [("consent-1", "c1"), ("consent-2", "c2")] {
        h.core
            .consent_input(key.clone(), consent_request(id, command), None, h.now);
        let mut did = h.tick();
        did.extend(h.flush());
        assert_eq!(consent_writes(&did), 0, "{command} again: {did:?}");
        assert!(
            consent_calls_of(&did).is_empty(),
            "{command} again: {did:?}"
        );
        assert!(
            consent_published(&did).is_empty(),
            "{command} again: {did:?}"
        );
    }
    let current = h.core.consent(&key).expect("consent").consent.clone();
    assert_eq!(current.consent_id.as_str(), "consent-2");
    assert_eq!(current.state, ConsentState::Pending);
}

/// The state log of an owner that died with a consent call in flight: the consent URI call
/// (`exchange` false) or, once the PSU came back with a code, the code exchange.
fn died_during_a_consent_call(exchange: bool) -> (StateLog, i64) {
    use crate::domain::consent::{ConsentInput, ConsentOutcome, ConsentScope};
    let mut log = StateLog::new();
    let first = log.marker("first");
    let cfg = CoreConfig {
        epoch: first,
        ..config(Policy::default())
    };
    let mut h = Harness::with_config(log.restore(first), cfg);
    h.log = Some(log);
    h.start();
    let key = consent_key(ConsentScope::Caf);
    h.core
        .consent_input(key.clone(), consent_request("consent-1", "c1"), None, h.now);
    h.tick();
    let did = h.flush();
    assert_eq!(consent_calls_of(&did), vec!["consent-uri"]);
    if exchange {
        h.answer_consent(
            "consent-uri",
            ConsentAnswer::Uri(Ok("https://bank/consent-1".into())),
        );
        h.flush();
        let complete = ConsentInput::Complete {
            command_id: CommandId::new("c2"),
            outcome: ConsentOutcome::Code(SecretString::from("the-code")),
            state: Some("consent-state-consent-1".into()),
        };
        h.core.consent_input(key, complete, None, h.now);
        h.tick();
        let did = h.flush();
        assert_eq!(consent_calls_of(&did), vec!["consent-exchange"]);
    }
    let mut log = h.log.take().expect("log");
    let second = log.marker("second");
    (log, second)
}

/// Found by `pis-chaos --consents`: an owner died while exchanging a consent's code. The code
/// is single-use and never stored, so the successor cannot exchange it: the consent is
/// REFUSED at once (`BANK_UNAVAILABLE`, as for an unanswered exchange), not left PENDING until its
/// SCA deadline to end EXPIRED "the PSU did not consent in time".
#[test]
fn a_code_exchange_cut_by_a_crash_refuses_the_consent_at_once() {
    use crate::domain::consent::{ConsentScope, ConsentState};
    let (log, second) = died_during_a_consent_call(true);
    let cfg = CoreConfig {
        epoch: second,
        ..config(Policy::default())
    };
    let mut h = Harness::with_config(log.restore(second), cfg);
    let mut did = h.start();
    did.extend(h.flush());
    assert!(consent_calls_of(&did).is_empty(), "{did:?}");
    // PENDING again from the outbox (it was never confirmed published), then REFUSED.
    assert_eq!(
        consent_published(&did).last(),
        Some(&ConsentState::Refused),
        "{did:?}"
    );
    let key = consent_key(ConsentScope::Caf);
    let record = h.core.consent(&key).expect("consent");
    assert_eq!(record.consent.state, ConsentState::Refused);
    assert_eq!(
        record.consent.reason.as_ref().map(|r| r.code),
        Some(ReasonCode::BankUnavailable)
    );
}

/// A granted consent of the test PSU at Belfius, with a fresh pair, as restored.
fn granted_consent(
    scope: crate::domain::consent::ConsentScope,
    account: Option<&str>,
    reads: Vec<(String, Millis)>,
) -> ConsentRecord {
    use crate::domain::consent::{Consent, ConsentRequest, ConsentState};
    ConsentRecord {
        consent: Consent {
            consent_id: crate::domain::model::ConsentId::new("consent-1"),
            psu_id: PsuId::new(PSU),
            request: ConsentRequest {
                brand: brand("BELFIUS"),
                scope,
                account_iban: account.map(str::to_owned),
                language: Language::Fr,
                redirect_uri: "https://client.example/consent".into(),
            },
            state: ConsentState::Granted,
            sequence: 2,
            consent_uri: None,
            sca_state: "s".into(),
            pkce_verifier: None,
            sca_deadline: None,
            valid_until: None,
            attempts: 0,
            retry_at: None,
            exchanging: false,
            reason: None,
            seen_commands: vec![],
            requested_at: T0 - 60_000,
            updated_at: T0 - 60_000,
        },
        tokens: Some(fresh("BELFIUS", "consent-access")),
        unattended_reads: reads,
    }
}

const DEBTOR: &str = "BE71096123456769";

fn with_consent(mut restored: Restored, record: ConsentRecord) -> Restored {
    restored
        .consents
        .insert(ConsentKey::of(&record.consent), record);
    restored
}

fn funds_initiate_body(id: &str, funds_check: bool) -> CommandBody {
    let CommandBody::Initiate(mut raw) = initiate_body(id, "BELFIUS") else {
        unreachable!()
    };
    raw.debtor_iban = Some(DEBTOR.into());
    raw.funds_check = funds_check;
    CommandBody::Initiate(raw)
}

/// Not enough funds: the payment is REJECTED INSUFFICIENT_FUNDS before anything is initiated,
/// and its first write is that. Enough funds: initiated as usual.
#[test]
fn a_funds_check_holds_the_initiation_and_refuses_it_for_funds() {
    use crate::domain::consent::ConsentScope;
    let restored = with_consent(
        restored(vec![], vec![]),
        granted_consent(ConsentScope::Caf, Some(DEBTOR), vec![]),
    );
    let mut h = Harness::new(restored);
    h.start();
    let (_, did) = h.command("c1", "p1", funds_initiate_body("p1", true));
    assert!(
        writes(&did).is_empty(),
        "held: nothing written yet: {did:?}"
    );
    assert_eq!(consent_calls_of(&did), vec!["funds"]);
    match &h.consent_calls[0].1 {
        ConsentCall::Funds {
            iban,
            amount,
            access_token,
            ..
        } => {
            assert_eq!(iban, DEBTOR);
            assert_eq!(*amount, Amount::from_minor(1234));
            assert_eq!(access_token.expose_secret(), "consent-access");
        }
        other => panic!("{other:?}"),
    }
    let did = h.answer_consent("funds", ConsentAnswer::Funds(Ok(false)));
    assert_eq!(writes(&did), vec![pw("p1")]);
    let mut did = h.flush();
    did.extend(h.tick_at(h.now + 60_000));
    assert!(calls(&h.history).is_empty(), "nothing initiated");
    assert_eq!(h.state("p1"), PaymentState::Rejected);
    let reason = h.payment("p1").reason.clone().expect("a reason");
    assert_eq!(reason.code, ReasonCode::InsufficientFunds);

    let (_, did) = h.command("c2", "p2", funds_initiate_body("p2", true));
    assert_eq!(consent_calls_of(&did), vec!["funds"]);
    h.answer_consent("funds", ConsentAnswer::Funds(Ok(true)));
    h.flush();
    assert_eq!(calls(&h.history), vec![pc("p2", "initiate")]);
}

/// A funds check that gets no answer never holds the payment: it is initiated unchecked.
/// Without `funds_check`, or without a consent for the debtor account, nothing is asked.
#[test]
fn a_failed_funds_check_lets_the_payment_go_on_and_no_check_is_made_unasked() {
    use crate::domain::consent::ConsentScope;
    let restored = with_consent(
        restored(vec![], vec![]),
        granted_consent(ConsentScope::Caf, Some(DEBTOR), vec![]),
    );
    let mut h = Harness::new(restored);
    h.start();
    h.command("c1", "p1", funds_initiate_body("p1", true));
    h.answer_consent(
        "funds",
        ConsentAnswer::Funds(Err(CallFailure {
            definite: false,
            message: "timeout".into(),
        })),
    );
    h.flush();
    let (_, did) = h.command("c2", "p2", funds_initiate_body("p2", false));
    assert!(consent_calls_of(&did).is_empty());
    h.flush();
    let mut other = funds_initiate_body("p3", true);
    if let CommandBody::Initiate(raw) = &mut other {
        raw.debtor_iban = Some("BE68539007547034".into());
    }
    let (_, did) = h.command("c3", "p3", other);
    assert!(
        consent_calls_of(&did).is_empty(),
        "no consent for that account"
    );
    h.flush();
    let mut initiated: Vec<_> = calls(&h.history);
    initiated.sort();
    assert_eq!(
        initiated,
        vec![
            pc("p1", "initiate"),
            pc("p2", "initiate"),
            pc("p3", "initiate")
        ]
    );
}

fn signed_with_debtor(id: &str) -> Payment {
    let mut p = signed_payment(id, "BELFIUS");
    if let Some(Order::Single(order)) = p.order.as_mut() {
        order.debtor_iban = Some(DEBTOR.into());
    }
    p
}

/// SETTLED waits for one read of the debtor's history: the read is counted in the consent's
/// record first, then the evidence rides on the SETTLED event, and a restore re-publishes it
/// with the evidence.
#[test]
fn a_settlement_carries_the_evidence_of_the_debtor_history() {
    use crate::domain::consent::ConsentScope;
    use crate::domain::settlement::{SettlementEvidence, SettlementOutcome};
    let mut log = StateLog::new();
    let first = log.marker("first");
    let p = signed_with_debtor("p1");
    log.payment(first, &p, &[]);
    let record = granted_consent(ConsentScope::Ais, None, vec![]);
    log.write(
        first,
        &StateWrite::Consent {
            record: Box::new(record),
            events: vec![],
        },
    );
    let mine = log.marker("mine");
    let restored = log.restore(mine);
    let config = CoreConfig {
        epoch: mine,
        ..config(Policy::default())
    };
    let mut h = Harness::with_config(restored, config);
    h.log = Some(log);
    h.start();
    h.flush();
    h.tick_at(T0 + 2_000);
    let did = h.answer("p1", "status", observed(BankProgress::Settled, "ACSC"));
    assert_eq!(
        writes(&did),
        vec![("consent/BELFIUS/AIS/psu-1".into(), "consent")],
        "the read is counted before it is made"
    );
    let did = h.ack_write();
    assert_eq!(consent_calls_of(&did), vec!["evidence"]);
    let evidence = SettlementEvidence {
        outcome: SettlementOutcome::Duplicated,
        transaction_refs: vec!["7".into(), "9".into()],
        booking_date: None,
        checked_at: h.now,
    };
    let did = h.answer_consent("evidence", ConsentAnswer::Evidence(Ok(evidence.clone())));
    assert_eq!(writes(&did), vec![pw("p1")]);
    let did = h.ack_write();
    let (_, events) = h.publications.last().expect("published");
    assert_eq!(
        published(&did),
        vec![(h.next_state_offset - 1, vec![StateKind::Settled])]
    );
    assert_eq!(events[0].settlement.as_ref(), Some(&evidence));
    let log = h.log.take().expect("log");
    let restored = log.restore(log.records.len() as i64);
    let (_, events) = restored
        .unpublished
        .last()
        .expect("unpublished after the checkpoint");
    assert_eq!(
        events[0].settlement.as_ref(),
        Some(&evidence),
        "stored with its record"
    );
    let reads = &restored
        .consents
        .values()
        .next()
        .expect("consent")
        .unattended_reads;
    assert_eq!(reads.len(), 1);
}

/// Four unattended reads of the account today: the fifth settlement goes out at once, without
/// evidence. A failed read also lets SETTLED go out without it.
#[test]
fn settlement_evidence_respects_the_daily_budget_and_never_blocks() {
    use crate::domain::consent::ConsentScope;
    let reads = (0..4)
        .map(|i| (DEBTOR.to_owned(), T0 - 1_000 * i))
        .collect();
    let first = with_consent(
        restored(vec![signed_with_debtor("p1")], vec![]),
        granted_consent(ConsentScope::Ais, None, reads),
    );
    let mut h = Harness::new(first);
    h.start();
    h.flush();
    h.tick_at(T0 + 2_000);
    let did = h.answer("p1", "status", observed(BankProgress::Settled, "ACSC"));
    assert_eq!(writes(&did), vec![pw("p1")], "no read: the budget is spent");
    h.flush();
    assert!(
        h.publications.is_empty()
            || h.publications
                .iter()
                .all(|(_, e)| e.iter().all(|e| e.settlement.is_none()))
    );

    let second = with_consent(
        restored(vec![signed_with_debtor("p2")], vec![]),
        granted_consent(ConsentScope::Ais, None, vec![]),
    );
    let mut h = Harness::new(second);
    h.start();
    h.flush();
    h.tick_at(T0 + 2_000);
    h.answer("p2", "status", observed(BankProgress::Settled, "ACSC"));
    h.ack_write();
    let did = h.answer_consent(
        "evidence",
        ConsentAnswer::Evidence(Err(CallFailure {
            definite: false,
            message: "503".into(),
        })),
    );
    assert_eq!(writes(&did), vec![pw("p2")]);
    h.ack_write();
    assert_eq!(h.state("p2"), PaymentState::Settled);
}

/// The owner stopped while a consent's consent-uris call was out: its record says REQUESTED,
/// with no retry time, and the call's answer went with the old owner. The next owner asks for
/// the URI again at once, with the record's verifier and state; without that, the consent
/// would wait for nothing, never published.
#[test]
fn a_consent_whose_uri_call_was_out_is_asked_again_by_the_next_owner() {
    use crate::domain::consent::{ConsentScope, ConsentState};
    let mut log = StateLog::new();
    let old = log.marker("old");
    let restored = log.restore(old);
    let mut h = Harness::with_config(
        restored,
        CoreConfig {
            epoch: old,
            ..config(Policy::default())
        },
    );
    h.log = Some(log);
    h.start();
    let key = consent_key(ConsentScope::Caf);
    h.core
        .consent_input(key.clone(), consent_request("consent-1", "c1"), None, h.now);
    h.tick();
    let did = h.ack_write();
    assert_eq!(consent_calls_of(&did), vec!["consent-uri"]);
    // The old owner stops here.

    let mut log = h.log.take().expect("log");
    let mine = log.marker("mine");
    let restored = log.restore(mine);
    assert_eq!(
        restored.consents.get(&key).map(|r| r.consent.state),
        Some(ConsentState::Requested)
    );
    let mut next = Harness::with_config(
        restored,
        CoreConfig {
            epoch: mine,
            ..config(Policy::default())
        },
    );
    let mut did = next.start();
    did.extend(next.tick());
    did.extend(next.flush());
    assert_eq!(consent_calls_of(&did), vec!["consent-uri"], "{did:?}");
    match &next.consent_calls[0].1 {
        ConsentCall::Uri {
            verifier,
            sca_state,
            ..
        } => {
            assert_eq!(verifier.expose_secret(), "consent-verifier");
            assert_eq!(sca_state, "consent-state-consent-1");
        }
        other => panic!("{other:?}"),
    }
    next.answer_consent(
        "consent-uri",
        ConsentAnswer::Uri(Ok(
            "https://bank.example/c?state=consent-state-consent-1".into()
        )),
    );
    let did = next.ack_write();
    assert_eq!(consent_published(&did), vec![ConsentState::Pending]);
    let (_, events) = next.consent_publications.last().expect("published");
    assert_eq!(events[0].sequence, 1);
}

fn consent_request_body(scope: &str) -> CommandBody {
    CommandBody::RequestConsent(crate::domain::model::RawConsentRequest {
        brand: "BELFIUS".into(),
        scope: scope.into(),
        account_iban: Some("BE68539007547034".into()),
        language: "fr".into(),
        redirect_uri: "https://client.example/consent".into(),
    })
}

/// A redirect for consent-1 waits behind a newer request of the same scope, which supersedes
/// consent-1 before the redirect's turn: the redirect is dead-lettered `UNKNOWN_CONSENT`,
/// naming consent-1, and consent-2 is untouched (the redirect is not checked against it).
#[test]
fn a_redirect_queued_behind_a_superseding_request_is_for_an_unknown_consent() {
    use crate::domain::consent::{ConsentScope, ConsentState};
    let mut h = Harness::empty();
    let key = consent_key(ConsentScope::Caf);
    h.command("c1", "consent-1", consent_request_body("CAF"));
    h.ack_write();
    h.answer_consent(
        "consent-uri",
        ConsentAnswer::Uri(Ok("https://bank.example/c1".into())),
    );
    // consent-1's PENDING is being written: the entity is busy, and the next two commands wait.
    let state = h
        .core
        .consent(&key)
        .map(|r| r.consent.sca_state.clone())
        .expect("consent-1");
    h.command("c2", "consent-2", consent_request_body("CAF"));
    let (redirect_at, did) = h.command(
        "c3",
        "consent-1",
        CommandBody::CompleteConsent(ScaRedirect {
            authorization_code: Some(SecretString::from("code-1")),
            error: None,
            error_description: None,
            state: Some(state),
        }),
    );
    assert!(dead_letters(&did).is_empty(), "routed to consent-1, queued");
    let mut did = h.flush();
    did.extend(h.answer_consent(
        "consent-uri",
        ConsentAnswer::Uri(Ok("https://bank.example/c2".into())),
    ));
    did.extend(h.flush());
    assert_eq!(dead_letters(&did), vec![(redirect_at, "UNKNOWN_CONSENT")]);
    assert!(
        h.consent_calls.is_empty(),
        "no exchange: {:?}",
        h.consent_calls
    );
    let record = h.core.consent(&key).expect("consent-2");
    assert_eq!(record.consent.consent_id.as_str(), "consent-2");
    assert_eq!(record.consent.state, ConsentState::Pending);
}

/// Found by `pis-chaos --consents`: two settlements of one account planned while its
/// fourth read was still free both waited for the consent (busy with a third account read),
/// and both then counted a read: five in the day, and the bank refused the fifth (429
/// `ACCESS_EXCEEDED`). The budget is checked again when the read is counted: the last one goes
/// out without evidence and without a call.
#[test]
fn settlements_queued_behind_a_read_do_not_spend_a_fifth_read() {
    use crate::domain::consent::ConsentScope;
    use crate::domain::settlement::{SettlementEvidence, SettlementOutcome};
    let reads = (0..2)
        .map(|i| (DEBTOR.to_owned(), T0 - 1_000 * (i + 1)))
        .collect();
    let restored = with_consent(
        restored(
            vec![
                signed_with_debtor("p1"),
                signed_with_debtor("p2"),
                signed_with_debtor("p3"),
            ],
            vec![],
        ),
        granted_consent(ConsentScope::Ais, None, reads),
    );
    let mut h = Harness::new(restored);
    h.start();
    h.flush();
    h.tick_at(T0 + 2_000);
    // p1 counts the third read; p2 and p3 settle while it is being counted (2 counted so far,
    // so both are planned with a read) and wait for the consent.
    let did = h.answer("p1", "status", observed(BankProgress::Settled, "ACSC"));
    assert_eq!(
        writes(&did),
        vec![("consent/BELFIUS/AIS/psu-1".into(), "consent")]
    );
    let did = h.answer("p2", "status", observed(BankProgress::Settled, "ACSC"));
    assert!(writes(&did).is_empty(), "p2 waits: {did:?}");
    let did = h.answer("p3", "status", observed(BankProgress::Settled, "ACSC"));
    assert!(writes(&did).is_empty(), "p3 waits: {did:?}");
    let booked = |h: &Harness| SettlementEvidence {
        outcome: SettlementOutcome::Booked,
        transaction_refs: vec!["1".into()],
        booking_date: None,
        checked_at: h.now,
    };
    // Acknowledges everything pending, noting each SETTLED event and whether it carries
    // evidence.
    let mut settled: Vec<(String, bool)> = Vec::new();
    let mut drain = |h: &mut Harness| -> Vec<Did> {
        let mut did = Vec::new();
        loop {
            if !h.writes.is_empty() {
                did.extend(h.ack_write());
            } else if !h.publications.is_empty() || !h.consent_publications.is_empty() {
                for e in h.publications.iter().flat_map(|(_, events)| events) {
                    if e.state == StateKind::Settled {
                        settled.push((e.payment_id.to_string(), e.settlement.is_some()));
                    }
                }
                did.extend(h.ack_publications());
            } else {
                return did;
            }
        }
    };
    let mut evidence_calls = 0;
    for _ in 0..4 {
        let did = drain(&mut h);
        let calls = consent_calls_of(&did);
        if calls.is_empty() {
            break;
        }
        assert_eq!(calls, vec!["evidence"]);
        evidence_calls += 1;
        let answer = ConsentAnswer::Evidence(Ok(booked(&h)));
        h.answer_consent("evidence", answer);
    }
    drain(&mut h);
    assert_eq!(evidence_calls, 2, "the third and fourth reads, no fifth");
    for p in ["p1", "p2", "p3"] {
        assert_eq!(h.state(p), PaymentState::Settled, "{p}");
    }
    settled.sort();
    assert_eq!(
        settled,
        vec![
            ("p1".to_owned(), true),
            ("p2".to_owned(), true),
            ("p3".to_owned(), false)
        ]
    );
    let reads = &h
        .core
        .consent(&ConsentKey {
            brand: brand("BELFIUS"),
            scope: ConsentScope::Ais,
            psu_id: PsuId::new(PSU),
        })
        .expect("consent")
        .unattended_reads;
    assert_eq!(reads.len(), 4, "{reads:?}");
}
