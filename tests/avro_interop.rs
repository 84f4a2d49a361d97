//! The Avro bytes pis-worker writes and reads, checked against a peer it does not share code
//! with: Python's fastavro with an independent CRC-64-AVRO (`tests/interop/avro_peer.py`).

use std::path::PathBuf;
use std::process::Command;

use pis_worker::contract::command::{self, CommandBody, CommandEnvelope};
use pis_worker::contract::status;
use pis_worker::domain::machine::{StateKind, StatusEvent};
use pis_worker::domain::model::{BankPaymentId, PaymentId, PsuId, RawInitiatePayment};

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
