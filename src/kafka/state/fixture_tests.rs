//! Records of every format restore must read, checked in under `tests/fixtures/state/`
//! (`v1.json`: format 1 as the worker wrote it before format 2; `v2.json`: format 2;
//! `v3.json`: format 3, the same records with a binary body), sealed
//! with [`FIXTURE_KEY`], a test key that seals nothing else. Each is decoded and folded through
//! `engine::restore::RestoreFold`, and the domain values are compared field by field with the
//! values written here: a change of the storage types, or of a conversion, that would stop live
//! topics from restoring fails these tests.
//!
//! Regenerating: `cargo test --lib regenerate_v3_state_fixtures -- --ignored` adds records new
//! to `expected_v2` to `v3.json` (`v2` likewise), keeping the bytes of those already there; a
//! new format gets its own file instead.
//! `v1.json` is never regenerated: it is what the old code wrote, and format 1 is frozen.

use std::collections::BTreeMap;
use std::path::PathBuf;

use chrono::NaiveDate;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::*;
use crate::domain::machine::{PaymentState, StateKind, Withdrawal, WithdrawalCause};
use crate::domain::model::{
    Amount, BankPaymentId, BulkEntry, BulkOrder, ChargeBearer, CommandId, CrossBorder, Frequency,
    Language, Order, PaymentOrder, PaymentProduct, PostalAddress, StandingOrder,
};
use crate::domain::reason::{Reason, ReasonCode};
use crate::engine::restore::RestoreFold;
use crate::secret::{StateFormat, StateKey, StateKeyRing};

/// A TEST key (the bytes spell "7e57", test): it seals the fixtures and nothing else.
pub const FIXTURE_KEY: &str =
    "fixture-test-key:7e577e577e577e577e577e577e577e577e577e577e577e577e577e577e577e57";

const EPOCH: i64 = 0;

fn ring() -> StateKeyRing {
    match StateKey::parse(&SecretString::from(FIXTURE_KEY)) {
        Ok(key) => StateKeyRing::single(key),
        Err(e) => panic!("fixture key: {e}"),
    }
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/state")
}

#[derive(Serialize, Deserialize)]
struct FixtureFile {
    comment: String,
    format: u32,
    records: Vec<FixtureRecord>,
}

#[derive(Serialize, Deserialize)]
struct FixtureRecord {
    key: String,
    /// The `pis.epoch` header (None: none, as markers have).
    epoch_header: Option<i64>,
    value_base64: String,
}

enum Expected {
    Marker,
    Payment(Box<Payment>, Vec<StatusEvent>),
    Psu(PsuTokens),
    Checkpoint(i64),
    /// Format 2 only: a retired payment.
    Retired(Retired),
    /// Format 2 only: a snapshot's begin (`None`) or end (`Some(begin)`).
    Snapshot(Option<i64>),
    /// Format 2 only: a record that could not be read, copied into a snapshot.
    QuarantinedCopy(QuarantinedRecord),
    /// Format 2 only: a consent with its pair and events.
    Consent(Box<consent::ConsentRecord>, Vec<ConsentEvent>),
}

/// A granted CAF consent with its pair, a read counted, and its GRANTED event.
fn consent_fixture() -> (consent::ConsentRecord, Vec<ConsentEvent>) {
    use crate::domain::consent::{Consent, ConsentRequest, ConsentScope, ConsentState};
    let c = Consent {
        consent_id: crate::domain::model::ConsentId::new("consent-fixture"),
        psu_id: PsuId::new("psu-fixture"),
        request: ConsentRequest {
            brand: Brand::Banx,
            scope: ConsentScope::Caf,
            account_iban: Some("BE71096123456769".into()),
            language: Language::Nl,
            redirect_uri: "https://client.example/consent".into(),
        },
        state: ConsentState::Granted,
        sequence: 2,
        consent_uri: Some("https://bank.example/consent/1?state=s".into()),
        sca_state: "fixture-consent-state".into(),
        pkce_verifier: None,
        sca_deadline: None,
        valid_until: Some(1_775_000_000_000),
        attempts: 0,
        retry_at: None,
        exchanging: false,
        reason: None,
        seen_commands: vec![
            CommandId::new("cmd-consent-1"),
            CommandId::new("cmd-consent-2"),
        ],
        requested_at: 1_767_225_000_000,
        updated_at: 1_767_225_600_000,
    };
    let event = ConsentEvent {
        consent_id: c.consent_id.clone(),
        psu_id: c.psu_id.clone(),
        brand: Brand::Banx,
        scope: ConsentScope::Caf,
        account_iban: c.request.account_iban.clone(),
        sequence: 2,
        state: ConsentState::Granted,
        consent_uri: None,
        valid_until: c.valid_until,
        reason: None,
        causation_id: "bank".into(),
        occurred_at: c.updated_at,
    };
    let tokens = PsuTokens {
        psu_id: PsuId::new("psu-fixture"),
        brand: Brand::Banx,
        access_token: SecretString::from("fixture-caf-access"),
        refresh_token: Some(SecretString::from("fixture-caf-refresh")),
        expires_at: Some(1_767_229_200_000),
        updated_at: 1_767_225_600_000,
    };
    let record = consent::ConsentRecord {
        consent: c,
        tokens: Some(tokens),
        unattended_reads: vec![("BE71096123456769".into(), 1_767_225_500_000)],
    };
    (record, vec![event])
}

fn assert_consent(
    actual: &consent::ConsentRecord,
    events: &[ConsentEvent],
    want: &consent::ConsentRecord,
    want_events: &[ConsentEvent],
    key: &str,
) {
    let (a, w) = (&actual.consent, &want.consent);
    assert_eq!(a.consent_id, w.consent_id, "{key}");
    assert_eq!(a.psu_id, w.psu_id, "{key}");
    assert_eq!(a.request, w.request, "{key}");
    assert_eq!(a.state, w.state, "{key}");
    assert_eq!(a.sequence, w.sequence, "{key}");
    assert_eq!(a.consent_uri, w.consent_uri, "{key}");
    assert_eq!(a.sca_state, w.sca_state, "{key}");
    assert_eq!(secret(&a.pkce_verifier), secret(&w.pkce_verifier), "{key}");
    assert_eq!(
        (a.sca_deadline, a.valid_until, a.attempts, a.retry_at),
        (w.sca_deadline, w.valid_until, w.attempts, w.retry_at),
        "{key}"
    );
    assert_eq!(a.reason, w.reason, "{key}");
    assert_eq!(a.exchanging, w.exchanging, "{key}");
    assert_eq!(a.seen_commands, w.seen_commands, "{key}");
    assert_eq!(
        (a.requested_at, a.updated_at),
        (w.requested_at, w.updated_at),
        "{key}"
    );
    match (&actual.tokens, &want.tokens) {
        (Some(t), Some(wt)) => assert_tokens(t, wt),
        (None, None) => {}
        (got, wanted) => panic!(
            "{key}: tokens {:?} vs {:?}",
            got.is_some(),
            wanted.is_some()
        ),
    }
    assert_eq!(actual.unattended_reads, want.unattended_reads, "{key}");
    assert_eq!(events, want_events, "{key}: events");
}

/// A settled payment whose SETTLED event carries settlement evidence (`Body::PaymentSettled`).
fn settled_with_evidence() -> (Payment, Vec<StatusEvent>) {
    use crate::domain::settlement::{SettlementEvidence, SettlementOutcome};
    let mut p = base_payment(
        "p-settled-evidence",
        Some(Order::Single(single_order())),
        PaymentState::Settled,
    );
    p.sequence = 4;
    let mut e = event(&p, None);
    e.settlement = Some(SettlementEvidence {
        outcome: SettlementOutcome::Duplicated,
        transaction_refs: vec!["1001".into(), "1002".into()],
        booking_date: Some(date(2026, 1, 2)),
        checked_at: 1_767_312_000_000,
    });
    (p, vec![e])
}

/// The quarantined record the format 2 fixtures carry a copy of: it still does not decode.
const QUARANTINED_KEY: &str = "payment/p-quarantined";
const QUARANTINED_OFFSET: i64 = 3;
const SNAPSHOT_AT: i64 = 1_767_830_400_000;

fn date(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).unwrap_or_default()
}

fn single_order() -> PaymentOrder {
    PaymentOrder {
        product: PaymentProduct::CrossBorderCreditTransfers,
        brand: Brand::Belfius,
        amount: Amount::from_minor(123_456),
        currency: "USD".into(),
        creditor_name: "Fixture Creditor".into(),
        creditor_iban: String::new(),
        creditor_bic: Some("CITIUS33XXX".into()),
        debtor_iban: Some("BE68539007547034".into()),
        end_to_end_id: "E2E-SINGLE".into(),
        remittance_information: Some("invoice 42".into()),
        requested_execution_date: Some(date(2026, 12, 24)),
        language: Language::Nl,
        redirect_uri: "https://tpp.example/cb".into(),
        cross_border: Some(Box::new(CrossBorder {
            charge_bearer: ChargeBearer::Shar,
            creditor_address: Some(PostalAddress {
                street: Some("Main Street".into()),
                building_number: Some("1".into()),
                postal_code: Some("10001".into()),
                town: Some("New York".into()),
                country: "US".into(),
            }),
            creditor_bban: Some("123456789".into()),
            creditor_bank_national_id: Some("021000021".into()),
            creditor_currency: Some("USD".into()),
        })),
    }
}

fn base_payment(id: &str, order: Option<Order>, state: PaymentState) -> Payment {
    Payment {
        payment_id: PaymentId::new(id),
        psu_id: PsuId::new("psu-fixture"),
        order,
        state,
        sequence: 3,
        last_published: Some(state.kind()),
        initiation_attempts: 1,
        bank_payment_id: None,
        bank_status: None,
        sca_redirect_url: None,
        pkce_verifier: None,
        authorization_code: None,
        received_at: 1_764_000_000_000,
        updated_at: 1_764_000_100_000,
        sca_deadline: None,
        next_check_at: None,
        polls_in_state: 0,
        seen_commands: vec![CommandId::new(format!("cmd-{id}"))],
        reason: None,
        resume_after_cancel: None,
        sca_state: None,
        received_codes: Vec::new(),
        withdrawal: None,
        last_command_offset: None,
        always_pkce: false,
    }
}

fn event(p: &Payment, reason: Option<Reason>) -> StatusEvent {
    StatusEvent {
        payment_id: p.payment_id.clone(),
        psu_id: p.psu_id.clone(),
        sequence: p.sequence,
        state: p.state.kind(),
        bank_status: p.bank_status.clone(),
        bank_payment_id: p.bank_payment_id.clone(),
        sca_redirect_url: p.sca_redirect_url.clone(),
        reason,
        causation_id: "cmd-fixture".into(),
        occurred_at: p.updated_at,
        settlement: None,
    }
}

/// The records of both fixture files, in offset order, with the values they must decode to.
fn expected() -> Vec<(String, Option<i64>, Expected)> {
    let mut single = base_payment(
        "p-single",
        Some(Order::Single(single_order())),
        PaymentState::ScaPending,
    );
    single.bank_payment_id = Some(BankPaymentId::new("bank-1"));
    single.bank_status = Some("RCVD".into());
    single.sca_redirect_url = Some("https://bank.example/sca?id=1".into());
    single.pkce_verifier = Some(SecretString::from("fixture-pkce-verifier"));
    single.sca_deadline = Some(1_764_000_900_000);
    single.next_check_at = Some(1_764_000_102_000);
    single.polls_in_state = 2;
    single.sca_state = Some("fixture-oauth-state".into());
    single.last_command_offset = Some(17);
    let single_events = vec![event(&single, None)];

    let mut standing = base_payment(
        "p-standing",
        Some(Order::Standing(StandingOrder {
            order: PaymentOrder {
                product: PaymentProduct::SepaCreditTransfers,
                brand: Brand::Banx,
                currency: "EUR".into(),
                creditor_iban: "BE71096123456769".into(),
                cross_border: None,
                creditor_bic: None,
                debtor_iban: None,
                requested_execution_date: None,
                remittance_information: None,
                language: Language::Fr,
                end_to_end_id: "E2E-STANDING".into(),
                ..single_order()
            },
            start_date: date(2027, 1, 1),
            end_date: Some(date(2027, 12, 1)),
            frequency: Frequency::EveryTwoMonths,
            day_of_execution: Some(1),
        })),
        PaymentState::Cancelling,
    );
    standing.resume_after_cancel = Some(PaymentState::Active);
    standing.authorization_code = Some(SecretString::from("fixture-auth-code"));
    standing.received_codes = vec!["0123456789abcdef0123456789abcdef".into()];
    standing.reason = Some(Reason::new(ReasonCode::CancelRefused, "the bank said no"));
    standing.last_published = Some(StateKind::Active);
    let standing_events = vec![
        event(&standing, None),
        StatusEvent {
            sequence: 4,
            state: StateKind::Active,
            ..event(
                &standing,
                Some(Reason::new(ReasonCode::CancelRefused, "the bank said no")),
            )
        },
    ];

    let mut bulk = base_payment(
        "p-bulk",
        Some(Order::Bulk(BulkOrder {
            product: PaymentProduct::InstantSepaCreditTransfers,
            brand: Brand::Belfius,
            debtor_iban: Some("BE68539007547034".into()),
            batch_booking: true,
            requested_execution_date: Some(date(2026, 2, 28)),
            payments: vec![
                BulkEntry {
                    amount: Amount::from_minor(100),
                    currency: "EUR".into(),
                    creditor_name: "First".into(),
                    creditor_iban: "BE71096123456769".into(),
                    creditor_bic: Some("GKCCBEBB".into()),
                    end_to_end_id: "E2E-B1".into(),
                    remittance_information: Some("one".into()),
                },
                BulkEntry {
                    amount: Amount::from_minor(250),
                    currency: "EUR".into(),
                    creditor_name: "Second".into(),
                    creditor_iban: "BE68539007547034".into(),
                    creditor_bic: None,
                    end_to_end_id: "E2E-B2".into(),
                    remittance_information: None,
                },
            ],
            language: Language::Fr,
            redirect_uri: "https://tpp.example/bulk".into(),
        })),
        PaymentState::OutcomeUnknown { attempt: 2 },
    );
    bulk.initiation_attempts = 2;
    bulk.withdrawal = Some(Withdrawal {
        cause: WithdrawalCause::PsuRefused {
            message: "access_denied".into(),
        },
        since: 1_764_000_050_000,
        cancel_asked: true,
    });

    let mut expired = base_payment(
        "p-expired",
        Some(Order::Single(PaymentOrder {
            cross_border: None,
            product: PaymentProduct::SepaCreditTransfers,
            currency: "EUR".into(),
            creditor_iban: "BE71096123456769".into(),
            ..single_order()
        })),
        PaymentState::Unconfirmed,
    );
    expired.withdrawal = Some(Withdrawal {
        cause: WithdrawalCause::Deadline,
        since: 1_764_000_060_000,
        cancel_asked: false,
    });
    expired.reason = Some(Reason::new(ReasonCode::ExpiryUnconfirmed, "not confirmed"));

    let mut refused = base_payment("p-refused", None, PaymentState::Rejected);
    refused.initiation_attempts = 0;
    refused.reason = Some(Reason::new(ReasonCode::InvalidIban, "creditor_iban: bad"));
    let refused_events = vec![event(&refused, refused.reason.clone())];

    let tokens = PsuTokens {
        psu_id: PsuId::new("psu-fixture"),
        brand: Brand::Belfius,
        access_token: SecretString::from("fixture-access-token"),
        refresh_token: Some(SecretString::from("fixture-refresh-token")),
        expires_at: Some(1_764_003_600_000),
        updated_at: 1_764_000_000_500,
    };
    let banx_tokens = PsuTokens {
        brand: Brand::Banx,
        refresh_token: None,
        expires_at: None,
        ..tokens.clone()
    };

    let payment = |p: Payment, events: Vec<StatusEvent>| {
        (
            payment_key(&p.payment_id),
            Some(EPOCH),
            Expected::Payment(Box::new(p), events),
        )
    };
    vec![
        (
            restore_marker_key(0, "fixture-owner"),
            None,
            Expected::Marker,
        ),
        payment(single, single_events),
        payment(standing, standing_events),
        payment(bulk, Vec::new()),
        payment(expired, Vec::new()),
        payment(refused, refused_events),
        (
            psu_key(&TokenKey::new(tokens.brand, tokens.psu_id.clone())),
            Some(EPOCH),
            Expected::Psu(tokens),
        ),
        (
            psu_key(&TokenKey::new(
                banx_tokens.brand,
                banx_tokens.psu_id.clone(),
            )),
            Some(EPOCH),
            Expected::Psu(banx_tokens),
        ),
        (checkpoint_key(0), Some(EPOCH), Expected::Checkpoint(2)),
    ]
}

/// The records of format 2: those of every format, then a retired payment (written after the
/// checkpoint, under its own id).
fn expected_v2() -> Vec<(String, Option<i64>, Expected)> {
    let mut records = expected();
    let retired = Retired {
        payment_id: PaymentId::new("p-retired"),
        psu_id: PsuId::new("psu-fixture"),
        final_state: StateKind::Settled,
        last_sequence: 7,
        last_command_offset: Some(41),
        final_at: 1_767_225_600_000,
        retired_at: 1_767_830_400_000,
    };
    records.push((
        payment_key(&retired.payment_id),
        Some(EPOCH),
        Expected::Retired(retired),
    ));
    // A snapshot: its begin, a copy of a record that did not decode, its end.
    let begin = records.len() as i64;
    records.push((
        snapshot_begin_key(0, EPOCH, 1),
        Some(EPOCH),
        Expected::Snapshot(None),
    ));
    records.push((
        QUARANTINED_KEY.into(),
        Some(EPOCH),
        Expected::QuarantinedCopy(QuarantinedRecord {
            offset: QUARANTINED_OFFSET,
            epoch_header: Some(2),
            value: b"not a state record".to_vec(),
        }),
    ));
    records.push((
        "snapshot/0".into(),
        Some(EPOCH),
        Expected::Snapshot(Some(begin)),
    ));
    // A payment whose client asked for PKCE on every attempt: the body with the additions
    // `StoredPayment` cannot take (`Body::PaymentExt`).
    let mut always_pkce = base_payment(
        "p-always-pkce",
        Some(Order::Single(single_order())),
        PaymentState::Initiating { attempt: 1 },
    );
    always_pkce.always_pkce = true;
    always_pkce.pkce_verifier = Some(SecretString::from("fixture-pkce-verifier-2"));
    always_pkce.sca_state = Some("fixture-oauth-state-2".into());
    records.push((
        payment_key(&always_pkce.payment_id),
        Some(EPOCH),
        Expected::Payment(Box::new(always_pkce), Vec::new()),
    ));
    let (consent_record, consent_events) = consent_fixture();
    records.push((
        consent::ConsentKey::of(&consent_record.consent).record_key(),
        Some(EPOCH),
        Expected::Consent(Box::new(consent_record), consent_events),
    ));
    let (settled, events) = settled_with_evidence();
    records.push((
        payment_key(&settled.payment_id),
        Some(EPOCH),
        Expected::Payment(Box::new(settled), events),
    ));
    records
}

fn expected_for(format: u32) -> Vec<(String, Option<i64>, Expected)> {
    if format >= 2 {
        expected_v2()
    } else {
        expected()
    }
}

/// Field by field; destructured without `..`.
fn assert_retired(actual: &Retired, expected: &Retired) {
    let Retired {
        payment_id,
        psu_id,
        final_state,
        last_sequence,
        last_command_offset,
        final_at,
        retired_at,
    } = expected;
    let id = payment_id.as_str();
    assert_eq!(&actual.payment_id, payment_id, "{id}: payment_id");
    assert_eq!(&actual.psu_id, psu_id, "{id}: psu_id");
    assert_eq!(&actual.final_state, final_state, "{id}: final_state");
    assert_eq!(&actual.last_sequence, last_sequence, "{id}: last_sequence");
    assert_eq!(
        &actual.last_command_offset, last_command_offset,
        "{id}: last_command_offset"
    );
    assert_eq!(&actual.final_at, final_at, "{id}: final_at");
    assert_eq!(&actual.retired_at, retired_at, "{id}: retired_at");
}

fn secret(s: &Option<SecretString>) -> Option<&str> {
    s.as_ref().map(|s| s.expose_secret())
}

/// Field by field; destructured without `..`, so a new domain field fails to compile here
/// until the fixtures cover it.
fn assert_payment(actual: &Payment, expected: &Payment) {
    let Payment {
        payment_id,
        psu_id,
        order,
        state,
        sequence,
        last_published,
        initiation_attempts,
        bank_payment_id,
        bank_status,
        sca_redirect_url,
        pkce_verifier,
        authorization_code,
        received_at,
        updated_at,
        sca_deadline,
        next_check_at,
        polls_in_state,
        seen_commands,
        reason,
        resume_after_cancel,
        sca_state,
        received_codes,
        withdrawal,
        last_command_offset,
        always_pkce,
    } = expected;
    let id = payment_id.as_str();
    assert_eq!(&actual.payment_id, payment_id, "{id}: payment_id");
    assert_eq!(&actual.psu_id, psu_id, "{id}: psu_id");
    assert_eq!(&actual.order, order, "{id}: order");
    assert_eq!(&actual.state, state, "{id}: state");
    assert_eq!(&actual.sequence, sequence, "{id}: sequence");
    assert_eq!(
        &actual.last_published, last_published,
        "{id}: last_published"
    );
    assert_eq!(
        &actual.initiation_attempts, initiation_attempts,
        "{id}: initiation_attempts"
    );
    assert_eq!(
        &actual.bank_payment_id, bank_payment_id,
        "{id}: bank_payment_id"
    );
    assert_eq!(&actual.bank_status, bank_status, "{id}: bank_status");
    assert_eq!(
        &actual.sca_redirect_url, sca_redirect_url,
        "{id}: sca_redirect_url"
    );
    assert_eq!(
        secret(&actual.pkce_verifier),
        secret(pkce_verifier),
        "{id}: pkce_verifier"
    );
    assert_eq!(
        secret(&actual.authorization_code),
        secret(authorization_code),
        "{id}: authorization_code"
    );
    assert_eq!(&actual.received_at, received_at, "{id}: received_at");
    assert_eq!(&actual.updated_at, updated_at, "{id}: updated_at");
    assert_eq!(&actual.sca_deadline, sca_deadline, "{id}: sca_deadline");
    assert_eq!(&actual.next_check_at, next_check_at, "{id}: next_check_at");
    assert_eq!(
        &actual.polls_in_state, polls_in_state,
        "{id}: polls_in_state"
    );
    assert_eq!(&actual.seen_commands, seen_commands, "{id}: seen_commands");
    assert_eq!(&actual.reason, reason, "{id}: reason");
    assert_eq!(
        &actual.resume_after_cancel, resume_after_cancel,
        "{id}: resume_after_cancel"
    );
    assert_eq!(&actual.sca_state, sca_state, "{id}: sca_state");
    assert_eq!(
        &actual.received_codes, received_codes,
        "{id}: received_codes"
    );
    assert_eq!(&actual.withdrawal, withdrawal, "{id}: withdrawal");
    assert_eq!(
        &actual.last_command_offset, last_command_offset,
        "{id}: last_command_offset"
    );
    assert_eq!(&actual.always_pkce, always_pkce, "{id}: always_pkce");
}

fn assert_tokens(actual: &PsuTokens, expected: &PsuTokens) {
    let PsuTokens {
        psu_id,
        brand,
        access_token,
        refresh_token,
        expires_at,
        updated_at,
    } = expected;
    assert_eq!(&actual.psu_id, psu_id);
    assert_eq!(&actual.brand, brand);
    assert_eq!(
        actual.access_token.expose_secret(),
        access_token.expose_secret()
    );
    assert_eq!(secret(&actual.refresh_token), secret(refresh_token));
    assert_eq!(&actual.expires_at, expires_at);
    assert_eq!(&actual.updated_at, updated_at);
}

fn assert_decoded(actual: &DecodedRecord, expected: &Expected, key: &str) {
    match (actual, expected) {
        (DecodedRecord::RestoreMarker, Expected::Marker) => {}
        (DecodedRecord::Payment { payment, events }, Expected::Payment(want, want_events)) => {
            assert_payment(payment, want);
            assert_eq!(events, want_events, "{key}: events");
        }
        (DecodedRecord::Psu(tokens), Expected::Psu(want)) => assert_tokens(tokens, want),
        (DecodedRecord::Consent { record, events }, Expected::Consent(want, want_events)) => {
            assert_consent(record, events, want, want_events, key);
        }
        (DecodedRecord::Checkpoint(through), Expected::Checkpoint(want)) => {
            assert_eq!(through, want, "{key}: checkpoint");
        }
        (DecodedRecord::Retired(retired), Expected::Retired(want)) => {
            assert_retired(retired, want);
        }
        (DecodedRecord::Snapshot { end_of, at }, Expected::Snapshot(want)) => {
            assert_eq!(end_of, want, "{key}: snapshot");
            assert_eq!(at, &end_of.is_none().then_some(SNAPSHOT_AT), "{key}: at");
        }
        (DecodedRecord::QuarantinedCopy(copy), Expected::QuarantinedCopy(want)) => {
            let QuarantinedRecord {
                offset,
                epoch_header,
                value,
            } = copy;
            assert_eq!(offset, &want.offset, "{key}: offset");
            assert_eq!(epoch_header, &want.epoch_header, "{key}: epoch header");
            assert_eq!(value, &want.value, "{key}: value");
        }
        (
            DecodedRecord::RestoreMarker
            | DecodedRecord::Payment { .. }
            | DecodedRecord::Psu(_)
            | DecodedRecord::Checkpoint(_)
            | DecodedRecord::Retired(_)
            | DecodedRecord::Snapshot { .. }
            | DecodedRecord::QuarantinedCopy(_)
            | DecodedRecord::Consent { .. },
            _,
        ) => panic!("{key}: decoded to another kind of record"),
    }
}

fn read(format: u32) -> FixtureFile {
    let path = dir().join(format!("v{format}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let file: FixtureFile = serde_json::from_str(&text).expect("fixture file");
    assert_eq!(file.format, format);
    file
}

fn value(record: &FixtureRecord) -> Vec<u8> {
    base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        &record.value_base64,
    )
    .expect("base64")
}

/// Decodes every record of the file, then folds the file as a restore does.
fn check(format: u32, sealing: fn(&str) -> Sealing) {
    let file = read(format);
    let ring = ring();
    let expected = expected_for(format);
    assert_eq!(
        file.records.len(),
        expected.len(),
        "v{format}: record count"
    );
    for (record, (key, header, want)) in file.records.iter().zip(&expected) {
        assert_eq!(&record.key, key);
        assert_eq!(&record.epoch_header, header, "{key}: epoch header");
        let decoded = decode_record(&ring, key, &value(record), record.epoch_header)
            .unwrap_or_else(|e| panic!("v{format} {key}: {e}"));
        assert_decoded(&decoded.record, want, key);
        match want {
            Expected::Marker => assert_eq!(decoded.sealing, Sealing::Marker),
            Expected::Payment(..)
            | Expected::Psu(_)
            | Expected::Checkpoint(_)
            | Expected::Retired(_)
            | Expected::Snapshot(_)
            | Expected::Consent(..)
            | Expected::QuarantinedCopy(_) => {
                assert_eq!(decoded.epoch, EPOCH, "{key}: epoch");
                if format >= 2 {
                    assert_eq!(decoded.sealing, sealing(key), "{key}: sealing");
                    let bytes = value(record);
                    let (header, _) = super::v2::parse_header(&bytes).expect("header");
                    assert_eq!(u32::from(header.version), format, "{key}: version byte");
                }
            }
        }
    }
    // The whole file through restore, up to a marker after it.
    let end = file.records.len() as i64;
    let mut fold = RestoreFold::new(&ring, end);
    for (offset, record) in file.records.iter().enumerate() {
        let v = value(record);
        fold.apply(
            offset as i64,
            Some(record.key.as_bytes()),
            Some(&v),
            record.epoch_header,
        );
    }
    let restored = fold.finish();
    // Only the copied record that still does not decode, under its first offset.
    let quarantined: Vec<(&str, i64)> = restored
        .quarantined
        .iter()
        .map(|(k, q)| (k.as_str(), q.offset))
        .collect();
    if format >= 2 {
        assert_eq!(quarantined, vec![(QUARANTINED_KEY, QUARANTINED_OFFSET)]);
        assert_eq!(
            restored.quarantined[QUARANTINED_KEY].value,
            b"not a state record"
        );
    } else {
        assert!(quarantined.is_empty(), "{quarantined:?}");
    }
    assert_eq!(restored.zombie_records, 0);
    assert_eq!(restored.checkpoint, 2);
    let mut unpublished_events = BTreeMap::new();
    for (key, _, want) in &expected {
        match want {
            Expected::Payment(p, events) => {
                let got = restored
                    .payments
                    .get(&p.payment_id)
                    .unwrap_or_else(|| panic!("{key} restored"));
                assert_payment(got, p);
                if !events.is_empty() {
                    unpublished_events.insert(p.payment_id.to_string(), events.clone());
                }
            }
            Expected::Psu(t) => {
                let got = restored
                    .tokens
                    .get(&TokenKey::new(t.brand, t.psu_id.clone()))
                    .unwrap_or_else(|| panic!("{key} restored"));
                assert_tokens(got, t);
            }
            Expected::Retired(r) => {
                let got = restored
                    .retired
                    .get(&r.payment_id)
                    .unwrap_or_else(|| panic!("{key} restored"));
                assert_retired(got, r);
                assert!(!restored.payments.contains_key(&r.payment_id));
            }
            Expected::Consent(want, _) => {
                let got = restored
                    .consents
                    .get(&consent::ConsentKey::of(&want.consent))
                    .unwrap_or_else(|| panic!("{key} restored"));
                assert_consent(got, &[], want, &[], key);
            }
            Expected::Marker
            | Expected::Checkpoint(_)
            | Expected::Snapshot(_)
            | Expected::QuarantinedCopy(_) => {}
        }
    }
    assert_eq!(restored.payments.len(), 5 + 2 * usize::from(format >= 2));
    assert_eq!(restored.consents.len(), usize::from(format >= 2));
    assert_eq!(restored.retired.len(), usize::from(format >= 2));
    assert_eq!(restored.tokens.len(), 2);
    // Records at offsets 1 and 2 are at or below the checkpoint (2): published. Offset 5
    // (p-refused, with events) is not.
    let unpublished: Vec<_> = restored.unpublished.iter().map(|(o, _)| *o).collect();
    let last = expected.len() as i64 - 1;
    if format >= 2 {
        // The settled payment with evidence is the last record, the consent the one before.
        assert_eq!(unpublished, vec![5, last]);
        assert_eq!(
            restored.unpublished[1].1, unpublished_events["p-settled-evidence"],
            "the evidence is re-published with its event"
        );
        let consents: Vec<_> = restored
            .unpublished_consents
            .iter()
            .map(|(o, _)| *o)
            .collect();
        assert_eq!(consents, vec![last - 1]);
    } else {
        assert_eq!(unpublished, vec![5]);
    }
    assert_eq!(
        restored.unpublished[0].1, unpublished_events["p-refused"],
        "unpublished events"
    );
}

#[test]
fn format_1_fixtures_decode_and_restore_field_by_field() {
    check(1, |_| Sealing::Marker);
}

#[test]
fn format_2_fixtures_decode_and_restore_field_by_field() {
    check(2, |_| Sealing::Sealed {
        key_id: "fixture-test-key".into(),
    });
}

#[test]
fn format_3_fixtures_decode_and_restore_field_by_field() {
    check(3, |_| Sealing::Sealed {
        key_id: "fixture-test-key".into(),
    });
}

/// The fast body reader (`v2::read_body`) reads every format 2 fixture body as the derived
/// reader does, also with the keys reordered (the tag last: the derived reader answers).
#[test]
fn format_2_fixture_bodies_read_alike_through_both_body_readers() {
    let ring = ring();
    let mut sealed = 0;
    for record in read(2).records {
        let bytes = value(&record);
        if !super::v2::is_envelope(&bytes) {
            continue;
        }
        let plain = super::v2::open_plain(&ring, &record.key, &bytes, record.epoch_header)
            .unwrap_or_else(|e| panic!("{}: {e}", record.key))
            .plain;
        super::v2::tests::assert_readers_agree(&plain);
        // serde_json's map sorts keys: "type" comes after "events" and "payment".
        let reordered: serde_json::Value = serde_json::from_slice(&plain).expect("json");
        super::v2::tests::assert_readers_agree(&serde_json::to_vec(&reordered).expect("json"));
        sealed += 1;
    }
    assert!(sealed >= 8, "{sealed} sealed fixture records");
}

/// Encoding the expected values now decodes to them too (the writer agrees with the fixtures),
/// in both formats the writer can write.
#[test]
fn current_writer_round_trips_the_fixture_values() {
    for format in [StateFormat::V2, StateFormat::V3] {
        let ring = ring().with_write_format(format);
        for (key, header, want) in expected_v2() {
            let Some((k, v)) = encode(&ring, &want) else {
                continue;
            };
            assert_eq!(k, key);
            let decoded = decode_record(&ring, &k, &v, header).expect("decode");
            assert_decoded(&decoded.record, &want, &k);
        }
    }
}

/// The fixture of `want`, in the ring's write format.
fn encode(ring: &StateKeyRing, want: &Expected) -> Option<(String, Vec<u8>)> {
    let encoded = match want {
        Expected::Marker => encode_restore_marker(0, "fixture-owner"),
        Expected::Payment(p, events) => encode_payment(ring, EPOCH, p, events),
        Expected::Psu(t) => encode_psu(ring, EPOCH, t),
        Expected::Checkpoint(through) => encode_checkpoint(ring, 0, EPOCH, *through),
        Expected::Retired(r) => encode_retired(ring, EPOCH, r),
        Expected::Snapshot(None) => {
            let key = snapshot_begin_key(0, EPOCH, 1);
            encode_snapshot(ring, &key, EPOCH, None, SNAPSHOT_AT).map(|v| (key, v))
        }
        Expected::Snapshot(Some(begin)) => {
            let key = snapshot_key(0);
            encode_snapshot(ring, &key, EPOCH, Some((*begin, 3)), 0).map(|v| (key, v))
        }
        Expected::QuarantinedCopy(q) => encode_quarantined_copy(ring, QUARANTINED_KEY, EPOCH, q)
            .map(|v| (QUARANTINED_KEY.to_owned(), v)),
        Expected::Consent(record, events) => encode_consent(ring, EPOCH, record, events),
    };
    encoded.ok()
}

fn write(format: u32, records: Vec<FixtureRecord>, comment: &str) {
    let file = FixtureFile {
        comment: comment.into(),
        format,
        records,
    };
    let mut text = serde_json::to_string_pretty(&file).expect("json");
    text.push('\n');
    std::fs::create_dir_all(dir()).expect("mkdir");
    std::fs::write(dir().join(format!("v{format}.json")), text).expect("write");
}

fn record(key: String, epoch_header: Option<i64>, value: &[u8]) -> FixtureRecord {
    FixtureRecord {
        key,
        epoch_header,
        value_base64: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, value),
    }
}

/// Rewrites `tests/fixtures/state/v2.json` with the current writer.
#[test]
#[ignore = "writes the fixtures: run by hand after a deliberate change of format 2"]
fn regenerate_v2_state_fixtures() {
    regenerate(StateFormat::V2);
}

/// Rewrites `tests/fixtures/state/v3.json` with the current writer.
#[test]
#[ignore = "writes the fixtures: run by hand after a deliberate change of format 3"]
fn regenerate_v3_state_fixtures() {
    regenerate(StateFormat::V3);
}

fn regenerate(format: StateFormat) {
    let number = match format {
        StateFormat::V2 => 2,
        StateFormat::V3 => 3,
    };
    let ring = ring().with_write_format(format);
    let file = format!("v{number}.json");
    // Records already in the file keep their bytes (written by an older build, they are what
    // the fixtures are for); only new ones are written now. Delete the file to rewrite all.
    let mut existing: Vec<FixtureRecord> = if dir().join(&file).exists() {
        read(number).records
    } else {
        Vec::new()
    };
    let records = expected_v2()
        .into_iter()
        .map(|(key, header, want)| {
            if let Some(i) = existing
                .iter()
                .position(|r| r.key == key && r.epoch_header == header)
            {
                return existing.remove(i);
            }
            let (k, v) = encode(&ring, &want).expect("encode");
            assert_eq!(k, key);
            record(k, header, &v)
        })
        .collect();
    write(
        number,
        records,
        &format!(
            "Format {number} state records (sealed with the TEST key of src/kafka/state/fixture_tests.rs). Regenerate: cargo test --lib regenerate_v{number}_state_fixtures -- --ignored"
        ),
    );
}

/// Wrote `tests/fixtures/state/v1.json` once, with format 1's writer (the domain's serde
/// derive of the time). Refuses to overwrite it: format 1 is frozen.
#[test]
#[ignore = "wrote the format 1 fixtures once; never overwrites them"]
fn generate_v1_state_fixtures_once() {
    assert!(
        !dir().join("v1.json").exists(),
        "v1.json exists: format 1 is frozen, do not regenerate it"
    );
    let ring = ring();
    let key = ring.current();
    let records = expected()
        .into_iter()
        .map(|(key_name, header, want)| {
            let (k, v) = match &want {
                Expected::Marker => {
                    // Format 1's marker, as the old writer produced it.
                    let v = br#"{"type":"restore_marker","v":1,"owner":"fixture-owner"}"#;
                    (restore_marker_key(0, "fixture-owner"), v.to_vec())
                }
                Expected::Payment(p, events) => v1::write::payment(key, EPOCH, p, events),
                Expected::Psu(t) => v1::write::psu(key, EPOCH, t),
                Expected::Checkpoint(through) => v1::write::checkpoint(0, EPOCH, *through),
                Expected::Retired(_)
                | Expected::Snapshot(_)
                | Expected::QuarantinedCopy(_)
                | Expected::Consent(..) => {
                    panic!("format 1 has none of these records")
                }
            };
            assert_eq!(k, key_name);
            record(k, header, &v)
        })
        .collect();
    write(
        1,
        records,
        "Format 1 state records as the worker wrote them before format 2 (secrets sealed with the TEST key of src/kafka/state/fixture_tests.rs). Frozen: never regenerate.",
    );
}
