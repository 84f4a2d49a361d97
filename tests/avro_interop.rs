//! The Avro bytes pis-worker writes and reads, checked against a peer it does not share code
//! with: Python's fastavro with an independent CRC-64-AVRO (`tests/interop/avro_peer.py`).

use std::path::PathBuf;
use std::process::Command;

use pis_worker::contract::command::{self, CommandBody, CommandEnvelope, ScaRedirect};
use pis_worker::contract::{consent_status, status};
use pis_worker::domain::consent::{ConsentEvent, ConsentScope, ConsentState};
use pis_worker::domain::machine::{StateKind, StatusEvent};
use pis_worker::domain::model::{
    BankPaymentId, Brand, ConsentId, PaymentId, PsuId, RawConsentRequest, RawInitiatePayment,
};
use pis_worker::domain::reason::{Reason, ReasonCode};
use pis_worker::domain::settlement::{SettlementEvidence, SettlementOutcome};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn peer(args: &[&str]) -> String {
    let output = Command::new("python3")
        .arg(root().join("tests/interop/avro_peer.py"))
        .args(args)
        .output()
        .expect("python3 runs (make test installs fastavro)");
    assert!(
        output.status.success(),
        "avro peer failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

#[test]
fn a_peer_decodes_our_initiate_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("command.bin");
    let envelope = CommandEnvelope {
        command_id: "c-42".into(),
        payment_id: "p-42".into(),
        psu_id: "psu-42".into(),
        issued_at: 1_700_000_000_123,
        body: CommandBody::Initiate(Box::new(RawInitiatePayment {
            payment_product: "INSTANT_SEPA_CREDIT_TRANSFERS".into(),
            brand: "BANX".into(),
            amount: "99.95".into(),
            currency: "EUR".into(),
            creditor_name: "Zoë".into(),
            creditor_iban: "BE68539007547034".into(),
            creditor_bic: None,
            debtor_iban: Some("BE71096123456769".into()),
            end_to_end_id: "E2E-42".into(),
            remittance_information: None,
            requested_execution_date: Some("2026-12-24".into()),
            language: "nl".into(),
            redirect_uri: "https://c.example/cb".into(),
            funds_check: true,
            ..Default::default()
        })),
    };
    std::fs::write(&file, command::encode(&envelope).expect("encode")).expect("write");
    let json: serde_json::Value = serde_json::from_str(&peer(&[
        "decode",
        root()
            .join("schemas/payment-command.avsc")
            .to_str()
            .expect("path"),
        file.to_str().expect("path"),
    ]))
    .expect("json");
    assert_eq!(json["command_id"], "c-42");
    assert_eq!(json["issued_at"], "2023-11-14 22:13:20.123000+00:00");
    let body = &json["body"];
    assert_eq!(body["payment_product"], "INSTANT_SEPA_CREDIT_TRANSFERS");
    assert_eq!(body["brand"], "BANX");
    assert_eq!(body["creditor_name"], "Zoë");
    assert_eq!(body["debtor_iban"], "BE71096123456769");
    assert_eq!(body["creditor_bic"], serde_json::Value::Null);
    assert_eq!(body["requested_execution_date"], "2026-12-24");
    assert_eq!(body["funds_check"], true);
    assert_eq!(body["always_pkce"], false);
}

/// Our bytes decoded by the peer with the schema file: its output as JSON.
fn peer_decodes(schema: &str, bytes: &[u8]) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("record.bin");
    std::fs::write(&file, bytes).expect("write");
    serde_json::from_str(&peer(&[
        "decode",
        root().join(schema).to_str().expect("path"),
        file.to_str().expect("path"),
    ]))
    .expect("json")
}

/// What the peer writes with `mode` and the schema file.
fn peer_writes(mode: &str, schema: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("record.bin");
    peer(&[
        mode,
        root().join(schema).to_str().expect("path"),
        file.to_str().expect("path"),
    ]);
    std::fs::read(&file).expect("read")
}

#[test]
fn a_peer_decodes_our_consent_commands() {
    let envelope = |command_id: &str, body| CommandEnvelope {
        command_id: command_id.into(),
        payment_id: "consent-42".into(),
        psu_id: "psu-42".into(),
        issued_at: 1_700_000_000_000,
        body,
    };
    let request = envelope(
        "c-req",
        CommandBody::RequestConsent(RawConsentRequest {
            brand: "BELFIUS".into(),
            scope: "CAF".into(),
            account_iban: Some("BE71096123456769".into()),
            language: "nl".into(),
            redirect_uri: "https://c.example/consent".into(),
        }),
    );
    let json = peer_decodes(
        "schemas/payment-command.avsc",
        &command::encode(&request).expect("encode"),
    );
    assert_eq!(json["payment_id"], "consent-42");
    let body = &json["body"];
    assert_eq!(body["brand"], "BELFIUS");
    assert_eq!(body["scope"], "CAF");
    assert_eq!(body["account_iban"], "BE71096123456769");
    assert_eq!(body["language"], "nl");
    assert_eq!(body["redirect_uri"], "https://c.example/consent");

    let complete = envelope(
        "c-complete",
        CommandBody::CompleteConsent(ScaRedirect::from_redirect_url(
            &url::Url::parse("https://c.example/consent?code=abc&state=st-9").expect("url"),
        )),
    );
    let json = peer_decodes(
        "schemas/payment-command.avsc",
        &command::encode(&complete).expect("encode"),
    );
    let body = &json["body"];
    assert_eq!(body["authorization_code"], "abc");
    assert_eq!(body["state"], "st-9");
    assert_eq!(body["error"], serde_json::Value::Null);
    // fastavro names no branch in its JSON: the fields tell it is not an initiation.
    assert!(body.get("brand").is_none(), "{body}");
}

#[test]
fn we_decode_consent_commands_written_by_the_peer() {
    let bytes = peer_writes("encode-request-consent", "schemas/payment-command.avsc");
    let decoded = command::decode(&bytes, 65_536).expect("our decoder reads the peer's bytes");
    assert_eq!(decoded.payment_id, "py-consent-1");
    let CommandBody::RequestConsent(raw) = decoded.body else {
        panic!("wrong body: {:?}", decoded.body)
    };
    assert_eq!(
        raw,
        RawConsentRequest {
            brand: "BANX".into(),
            scope: "CAF".into(),
            account_iban: Some("BE71096123456769".into()),
            language: "fr".into(),
            redirect_uri: "https://client.example/consent".into(),
        }
    );
    let bytes = peer_writes("encode-complete-consent", "schemas/payment-command.avsc");
    let decoded = command::decode(&bytes, 65_536).expect("read");
    let CommandBody::CompleteConsent(redirect) = decoded.body else {
        panic!("wrong body: {:?}", decoded.body)
    };
    assert!(redirect.authorization_code.is_none());
    assert_eq!(redirect.error.as_deref(), Some("access_denied"));
    assert_eq!(
        redirect.error_description.as_deref(),
        Some("the PSU said no")
    );
    assert_eq!(redirect.state.as_deref(), Some("py-state"));
}

#[test]
fn a_peer_decodes_our_status_event_with_settlement_evidence() {
    let event = StatusEvent {
        payment_id: PaymentId::new("p-8"),
        psu_id: PsuId::new("psu-8"),
        sequence: 5,
        state: StateKind::Settled,
        bank_status: Some("ACSC".into()),
        bank_payment_id: Some(BankPaymentId::new("bank-8")),
        sca_redirect_url: None,
        reason: None,
        causation_id: "bank:status".into(),
        occurred_at: 1_700_000_000_000,
        settlement: Some(SettlementEvidence {
            outcome: SettlementOutcome::Duplicated,
            transaction_refs: vec!["TX-1".into(), "TX-2".into()],
            booking_date: chrono::NaiveDate::from_ymd_opt(2026, 3, 2),
            checked_at: 1_700_000_100_000,
        }),
    };
    let json = peer_decodes(
        "schemas/payment-status.avsc",
        &status::encode(&event).expect("encode"),
    );
    assert_eq!(json["state"], "SETTLED");
    let settlement = &json["settlement"];
    assert_eq!(settlement["outcome"], "DUPLICATED");
    assert_eq!(
        settlement["transaction_refs"],
        serde_json::json!(["TX-1", "TX-2"])
    );
    assert_eq!(settlement["booking_date"], "2026-03-02");
    assert_eq!(settlement["checked_at"], "2023-11-14 22:15:00+00:00");
    let without = StatusEvent {
        settlement: None,
        ..event
    };
    let json = peer_decodes(
        "schemas/payment-status.avsc",
        &status::encode(&without).expect("encode"),
    );
    assert_eq!(json["settlement"], serde_json::Value::Null);
}

#[test]
fn a_peer_decodes_our_consent_status_event() {
    let event = ConsentEvent {
        consent_id: ConsentId::new("consent-7"),
        psu_id: PsuId::new("psu-7"),
        brand: Brand::Banx,
        scope: ConsentScope::Caf,
        account_iban: Some("BE68539007547034".into()),
        sequence: 3,
        state: ConsentState::Expired,
        consent_uri: None,
        valid_until: None,
        reason: Some(Reason::new(
            ReasonCode::ConsentSuperseded,
            "superseded by consent-8",
        )),
        causation_id: "c-8".into(),
        occurred_at: 1_700_000_000_000,
    };
    let json = peer_decodes(
        "schemas/consent-status.avsc",
        &consent_status::encode(&event).expect("encode"),
    );
    assert_eq!(json["event_id"], event.event_id().to_string());
    assert_eq!(json["consent_id"], "consent-7");
    assert_eq!(json["psu_id"], "psu-7");
    assert_eq!(json["brand"], "BANX");
    assert_eq!(json["scope"], "CAF");
    assert_eq!(json["account_iban"], "BE68539007547034");
    assert_eq!(json["sequence"], 3);
    assert_eq!(json["state"], "EXPIRED");
    assert_eq!(json["is_final"], true);
    assert_eq!(json["valid_until"], serde_json::Value::Null);
    assert_eq!(json["reason"]["code"], "CONSENT_SUPERSEDED");
    assert_eq!(json["causation_id"], "c-8");
}

#[test]
fn we_decode_a_consent_status_event_written_by_the_peer() {
    let bytes = peer_writes("encode-consent-status", "schemas/consent-status.avsc");
    let record = consent_status::decode(&bytes).expect("our decoder reads the peer's bytes");
    assert_eq!(record.consent_id, "py-consent-1");
    assert_eq!(record.brand, Brand::Belfius);
    assert_eq!(record.scope, ConsentScope::Ais);
    assert_eq!(record.state, ConsentState::Granted);
    assert!(!record.is_final);
    assert_eq!(record.sequence, 2);
    assert_eq!(record.valid_until, Some(1_790_000_000_000));
    assert_eq!(record.causation_id.as_deref(), Some("bank"));
    assert_eq!(record.occurred_at, 1_700_000_000_002);
}

#[test]
fn we_decode_a_command_written_by_the_peer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("cancel.bin");
    peer(&[
        "encode-cancel",
        root()
            .join("schemas/payment-command.avsc")
            .to_str()
            .expect("path"),
        file.to_str().expect("path"),
    ]);
    let bytes = std::fs::read(&file).expect("read");
    let decoded = command::decode(&bytes, 65_536).expect("our decoder reads the peer's bytes");
    assert_eq!(decoded.payment_id, "py-pay-1");
    assert_eq!(decoded.issued_at, 1_700_000_000_000);
    assert!(
        matches!(decoded.body, CommandBody::Cancel { reason: Some(ref r) } if r == "from python"),
        "{:?}",
        decoded.body
    );
}

#[test]
fn a_peer_decodes_our_status_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("status.bin");
    let event = StatusEvent {
        payment_id: PaymentId::new("p-7"),
        psu_id: PsuId::new("psu-7"),
        sequence: 3,
        state: StateKind::ScaPending,
        bank_status: Some("RCVD".into()),
        bank_payment_id: Some(BankPaymentId::new("bank-7")),
        sca_redirect_url: Some("https://bank.example/sca/7".into()),
        reason: None,
        causation_id: "bank:initiation".into(),
        occurred_at: 1_700_000_000_000,
        settlement: None,
    };
    std::fs::write(&file, status::encode(&event).expect("encode")).expect("write");
    let json: serde_json::Value = serde_json::from_str(&peer(&[
        "decode",
        root()
            .join("schemas/payment-status.avsc")
            .to_str()
            .expect("path"),
        file.to_str().expect("path"),
    ]))
    .expect("json");
    assert_eq!(json["state"], "SCA_PENDING");
    assert_eq!(json["sequence"], 3);
    assert_eq!(json["is_final"], false);
    assert_eq!(json["event_id"], event.event_id().to_string());
    assert_eq!(json["sca_redirect_url"], "https://bank.example/sca/7");
    assert_eq!(json["reason"], serde_json::Value::Null);
}

/// A record written by a peer with a newer writer schema (the v6 candidate in
/// tests/interop/schemas: v5 plus optional fields) is unknown until that schema is accepted;
/// then it resolves by name, the new fields ignored.
#[test]
fn a_newer_writer_schema_from_a_peer_resolves_once_accepted() {
    use pis_worker::contract::command::{Patience, decode_with};
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("v3.bin");
    let v3 = root().join("tests/interop/schemas/payment-command.v6-candidate.avsc");
    peer(&[
        "encode-initiate",
        v3.to_str().expect("path"),
        file.to_str().expect("path"),
        "py-v3-1",
        "psu-v3",
    ]);
    let bytes = std::fs::read(&file).expect("read");
    let before = decode_with(&bytes, 65_536, Patience::Once).expect_err("not known yet");
    assert_eq!(before.class.as_str(), "UNKNOWN_SCHEMA");
    let json = std::fs::read_to_string(&v3).expect("v3");
    let (role, fingerprint) =
        pis_worker::contract::accept_writer_schema(&json, "v6 candidate").expect("accepted");
    assert_eq!(role, pis_worker::contract::SchemaRole::Command);
    assert_eq!(
        &bytes[2..10],
        &fingerprint,
        "the peer's fingerprint is ours"
    );
    let decoded = decode_with(&bytes, 65_536, Patience::Once).expect("resolved");
    assert_eq!(decoded.payment_id, "py-v3-1");
    let CommandBody::Initiate(raw) = decoded.body else {
        panic!("wrong body: {:?}", decoded.body)
    };
    assert_eq!(raw.amount, "21.50");
    assert_eq!(raw.language, "nl");
    assert_eq!(
        raw.remittance_information.as_deref(),
        Some("written by fastavro")
    );
}

/// A writer schema this build cannot read (a field the reader needs was removed) is refused at
/// start-up, not accepted and then dead-lettered record by record.
#[test]
fn an_unreadable_writer_schema_is_refused() {
    let mut json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("schemas/payment-command.avsc")).expect("schema"),
    )
    .expect("json");
    let fields = json["fields"].as_array_mut().expect("fields");
    fields.retain(|f| f["name"] != "psu_id");
    let error = pis_worker::contract::accept_writer_schema(&json.to_string(), "broken")
        .expect_err("refused");
    assert!(error.contains("psu_id"), "{error}");
}

mod common;

mod registry_framing {
    use std::time::Duration;

    use super::common::registry::StubRegistry;
    use super::common::*;
    use super::{peer, root};
    use pis_worker::contract::command;
    use pis_worker::contract::framing::{HEADER_LEN, frame_confluent};
    use pis_worker::contract::registry::{self, RegistryConfig};
    use pis_worker::domain::machine::StateKind;
    use rdkafka::Message;

    /// Confluent Schema Registry framing end to end, against a minimal Confluent-compatible
    /// registry: commands framed with a registry id are read with the registry's schema; status
    /// events are written with the id the worker registered; an unknown id is dead-lettered as
    /// UNKNOWN_SCHEMA; and while the registry is down, a command whose schema the worker has
    /// not fetched yet waits (the commands behind it too) and is processed once the registry is
    /// back: neither dead-lettered nor lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn registry_framed_commands_and_events_survive_a_registry_outage() {
        let mut stub = StubRegistry::start_new().await;
        let env = TestEnv::new(|_| {}).await;
        // This process reads the worker's status events through the registry too.
        registry::configure(RegistryConfig {
            url: stub.url().parse().expect("url"),
            auto_register: false,
            timeout: Duration::from_secs(2),
        })
        .expect("registry");
        let mut args = CLIENT_DRIVEN.to_vec();
        let url = stub.url();
        args.extend(["--schema-registry-url", &url]);
        let worker = env.start_worker("a", &args);
        worker.wait_restored(PARTITIONS as usize).await;

        // At start-up the worker registered the status schema under {status topic}-value.
        let status_ids = stub.subject_ids(&format!("{}-value", env.settings.topics.status));
        assert_eq!(status_ids.len(), 1, "{:?}", stub.requests());
        let status_id = status_ids[0];

        // And the consent status schema under {consent status topic}-value: its own subject.
        let consent_subject = format!("{}-value", env.settings.topics.consent_status);
        let consent_ids = stub.subject_ids(&consent_subject);
        assert_eq!(consent_ids.len(), 1, "{:?}", stub.requests());
        assert_ne!(consent_ids[0], status_id);
        // A consent event written as the worker writes it: framed with that id, keyed by PSU,
        // on the consent status topic.
        let this_process = registry::current().expect("configured");
        assert_eq!(
            this_process
                .published_schema_id(registry::Published::ConsentStatus, &consent_subject)
                .await,
            Ok(consent_ids[0])
        );
        let consents = Collector::follow(&env.settings, &env.settings.topics.consent_status);
        let producer = pis_worker::kafka::producer::Producer::new(&env.settings).expect("producer");
        let consent = super::ConsentEvent {
            consent_id: super::ConsentId::new("consent-reg"),
            psu_id: super::PsuId::new("psu-consent"),
            brand: super::Brand::Belfius,
            scope: super::ConsentScope::Ais,
            account_iban: None,
            sequence: 1,
            state: super::ConsentState::Pending,
            consent_uri: Some("https://bank.example/consent".into()),
            valid_until: None,
            reason: None,
            causation_id: "c-consent".into(),
            occurred_at: 1,
        };
        producer
            .send_consent_status(&consent)
            .await
            .expect("enqueued")
            .await
            .expect("delivered");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let written = loop {
            if let Some(m) = consents.snapshot().into_iter().next() {
                break m;
            }
            assert!(tokio::time::Instant::now() < deadline, "no consent event");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(written.key(), Some(&b"psu-consent"[..]));
        let payload = written.payload().expect("value");
        assert_eq!(payload[0], 0, "magic byte");
        assert_eq!(&payload[1..5], &consent_ids[0].to_be_bytes());
        let read = super::consent_status::decode(payload).expect("decoded through the registry");
        assert_eq!(read.consent_id, "consent-reg");
        assert_eq!(read.state, super::ConsentState::Pending);

        // A client's serializer registers the command schema and frames with its id.
        let commands_subject = format!("{}-value", env.settings.topics.commands);
        let command_id =
            stub.register(&commands_subject, pis_worker::contract::COMMAND_SCHEMA_JSON);
        let framed = |envelope: &pis_worker::contract::command::CommandEnvelope| {
            let single = command::encode(envelope).expect("encode");
            frame_confluent(command_id, &single[HEADER_LEN..])
        };
        let psu = "psu-registry";
        env.send_raw(psu, &framed(&initiate("reg-1", psu, "5.00", "Reggie")))
            .await;
        env.wait_for_state("reg-1", StateKind::ScaPending).await;
        let wire = env.status_messages();
        assert!(!wire.is_empty());
        for message in &wire {
            let payload = message.payload().expect("value");
            assert_eq!(payload[0], 0, "magic byte");
            assert_eq!(
                &payload[1..5],
                &status_id.to_be_bytes(),
                "the status schema's id"
            );
        }

        // An id the registry does not know, and a status event on the command topic.
        env.send_raw(
            psu,
            &frame_confluent(9_999, &framed(&initiate("reg-x", psu, "1.00", "X"))[5..]),
        )
        .await;
        let event = status_event_bytes("reg-status", psu);
        env.send_raw(psu, &frame_confluent(status_id, &event[HEADER_LEN..]))
            .await;
        let dlq = env.wait_for_dlq(2).await;
        let classes: Vec<_> = dlq.iter().map(|r| header(r, "pis.error.class")).collect();
        assert_eq!(
            classes,
            vec![
                Some("UNKNOWN_SCHEMA".to_owned()),
                Some("WRONG_RECORD_TYPE".to_owned())
            ]
        );

        // A newer schema (the v6 candidate), registered by a client; the worker has not
        // fetched it yet. Then the registry goes down.
        let v3_json = std::fs::read_to_string(
            root().join("tests/interop/schemas/payment-command.v6-candidate.avsc"),
        )
        .expect("v3");
        let v3_id = stub.register(&commands_subject, &v3_json);
        assert_ne!(v3_id, command_id);
        let file = env.dir.path().join("v3.bin");
        peer(&[
            "encode-initiate",
            root()
                .join("tests/interop/schemas/payment-command.v6-candidate.avsc")
                .to_str()
                .expect("path"),
            file.to_str().expect("path"),
            "reg-outage",
            psu,
        ]);
        let v3_single = std::fs::read(&file).expect("peer output");
        stub.stop().await;
        env.send_raw(psu, &frame_confluent(v3_id, &v3_single[HEADER_LEN..]))
            .await;
        // Behind it, on the same partition: must wait its turn, not overtake.
        env.send_raw(psu, &framed(&initiate("reg-behind", psu, "2.00", "Behind")))
            .await;
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(
            env.dlq_records().len(),
            2,
            "nothing dead-lettered during the outage"
        );
        let events = env.status_events();
        assert!(
            !events
                .iter()
                .any(|e| e.payment_id == "reg-outage" || e.payment_id == "reg-behind"),
            "nothing processed while the schema is unknown: {}",
            describe(&events)
        );
        assert!(
            worker.log().contains("schema registry unavailable"),
            "the worker says it waits:\n{}",
            worker.log()
        );

        // A graceful stop while a partition owner waits: the process ends (the waiting record
        // uncommitted), and the next worker reads it again.
        let mut worker = worker;
        let status = worker.stop();
        assert!(
            status.success(),
            "graceful stop while waiting:\n{}",
            worker.log()
        );
        assert!(
            worker
                .log()
                .contains("not committed and will be read again")
        );
        stub.start().await;
        let worker = env.start_worker("b", &args);
        worker.wait_restored(PARTITIONS as usize).await;
        env.wait_for_state("reg-outage", StateKind::ScaPending)
            .await;
        let events = env
            .wait_for_state("reg-behind", StateKind::ScaPending)
            .await;
        assert_well_formed(&events, "reg-outage");
        assert_eq!(
            env.dlq_records().len(),
            2,
            "the waiting record was not dead-lettered"
        );
        assert!(
            stub.requests()
                .iter()
                .any(|r| r == &format!("GET /schemas/ids/{v3_id}")),
            "{:?}",
            stub.requests()
        );
        registry::unconfigure();
    }
}
