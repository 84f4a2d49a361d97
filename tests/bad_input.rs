//! Bad input end to end, on the real broker with the worker binary: every validation failure is
//! a `REJECTED` status with its reason code; every command that cannot apply and every record
//! that is not a command is dead-lettered with its original key, value and headers; the DLQ
//! can be listed and replayed with `pis-worker dlq`. (docs/contract.md lists the codes.)

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use pis_worker::contract::command::{self, CommandBody, ScaRedirect};
use pis_worker::contract::framing;
use pis_worker::domain::machine::StateKind;
use pis_worker::domain::model::{
    RawBulkPayment, RawBulkTransfer, RawInitiatePayment, RawPeriodicPayment,
};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn with_initiate(
    payment_id: &str,
    psu_id: &str,
    edit: impl FnOnce(&mut RawInitiatePayment),
) -> pis_worker::contract::command::CommandEnvelope {
    let mut envelope = initiate(payment_id, psu_id, "10.00", "Creditor");
    if let CommandBody::Initiate(raw) = &mut envelope.body {
        edit(raw);
    }
    envelope
}

fn day(offset: i64) -> String {
    (chrono::Utc::now().date_naive() + chrono::Duration::days(offset))
        .format("%Y-%m-%d")
        .to_string()
}

fn transfer(e2e: &str) -> RawBulkTransfer {
    RawBulkTransfer {
        amount: "1.00".into(),
        currency: "EUR".into(),
        creditor_name: "Bulk Creditor".into(),
        creditor_iban: "BE68539007547034".into(),
        creditor_bic: None,
        end_to_end_id: e2e.into(),
        remittance_information: None,
    }
}

fn bulk(product: &str, brand: &str, transfers: Vec<RawBulkTransfer>) -> CommandBody {
    CommandBody::InitiateBulk(Box::new(RawBulkPayment {
        payment_product: product.into(),
        brand: brand.into(),
        debtor_iban: None,
        batch_booking: false,
        requested_execution_date: None,
        language: "fr".into(),
        redirect_uri: "https://client.example/callback".into(),
        payments: transfers,
        always_pkce: false,
        funds_check: false,
    }))
}

/// Every class of validation failure the issue lists (and the product rules around them), one
/// payment each: a single `REJECTED` event with the reason code, the command as causation, and
/// nothing sent to the bank.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_validation_failure_is_a_rejected_status_with_its_reason_code() {
    let env = TestEnv::new(|_| {}).await;
    let mut args = CLIENT_DRIVEN.to_vec();
    args.extend(["--max-amount", "1000.00"]);
    let worker = env.start_worker("a", &args);
    worker.wait_restored(PARTITIONS as usize).await;
    let psu = "psu-invalid";
    let single = |id: &str, edit: fn(&mut RawInitiatePayment)| with_initiate(id, psu, edit);
    let mut cases = vec![
        (
            single("v-iban-mod97", |r| {
                r.creditor_iban = "BE68539007547035".into()
            }),
            "INVALID_IBAN",
        ),
        (
            single("v-iban-length", |r| {
                r.creditor_iban = "BE6853900754703".into()
            }),
            "INVALID_IBAN",
        ),
        (
            single("v-iban-country", |r| {
                r.creditor_iban = "XX68539007547034".into()
            }),
            "INVALID_IBAN",
        ),
        (
            single("v-debtor-iban", |r| {
                r.debtor_iban = Some("NL00INGB0001234567".into())
            }),
            "INVALID_IBAN",
        ),
        (
            single("v-bic", |r| r.creditor_bic = Some("GKCC BE".into())),
            "INVALID_BIC",
        ),
        (
            single("v-amount-zero", |r| r.amount = "0.00".into()),
            "INVALID_AMOUNT",
        ),
        (
            single("v-amount-negative", |r| r.amount = "-5".into()),
            "INVALID_AMOUNT",
        ),
        (
            single("v-amount-decimals", |r| r.amount = "1.234".into()),
            "INVALID_AMOUNT",
        ),
        (
            single("v-amount-max", |r| r.amount = "1000.01".into()),
            "AMOUNT_TOO_LARGE",
        ),
        (
            single("v-currency-sepa", |r| r.currency = "USD".into()),
            "INVALID_CURRENCY",
        ),
        (
            single("v-currency-iso", |r| {
                r.payment_product = "CROSS_BORDER_CREDIT_TRANSFERS".into();
                r.charge_bearer = Some("SHAR".into());
                r.currency = "XAU".into();
            }),
            "INVALID_CURRENCY",
        ),
        (
            single("v-charset", |r| r.creditor_name = "Zoë & Co".into()),
            "INVALID_CHARACTERS",
        ),
        (
            single("v-e2e-long", |r| r.end_to_end_id = "E".repeat(36)),
            "FIELD_TOO_LONG",
        ),
        (
            single("v-remittance-long", |r| {
                r.remittance_information = Some("R".repeat(141))
            }),
            "FIELD_TOO_LONG",
        ),
        (
            single("v-name-long", |r| r.creditor_name = "N".repeat(71)),
            "FIELD_TOO_LONG",
        ),
        (
            single("v-language", |r| r.language = "de".into()),
            "INVALID_LANGUAGE",
        ),
        (
            single("v-redirect-http", |r| {
                r.redirect_uri = "http://client.example/cb".into()
            }),
            "INVALID_REDIRECT_URI",
        ),
        (
            single("v-redirect-relative", |r| {
                r.redirect_uri = "/callback".into()
            }),
            "INVALID_REDIRECT_URI",
        ),
        (
            single("v-missing", |r| r.creditor_name = String::new()),
            "MISSING_FIELD",
        ),
        (
            single("v-not-allowed", |r| r.charge_bearer = Some("SHAR".into())),
            "FIELD_NOT_ALLOWED",
        ),
        (
            single("v-charge-bearer", |r| {
                r.payment_product = "CROSS_BORDER_CREDIT_TRANSFERS".into();
                r.currency = "USD".into();
                r.charge_bearer = Some("OUR".into());
            }),
            "INVALID_CHARGE_BEARER",
        ),
    ];
    // Dates depend on today.
    let mut past = with_initiate("v-date-past", psu, |_| {});
    let mut far = with_initiate("v-date-far", psu, |_| {});
    for (envelope, offset) in [(&mut past, -1), (&mut far, 400)] {
        if let CommandBody::Initiate(raw) = &mut envelope.body {
            raw.requested_execution_date = Some(day(offset));
        }
    }
    cases.push((past, "INVALID_EXECUTION_DATE"));
    cases.push((far, "INVALID_EXECUTION_DATE"));
    let standing = |start: i64| {
        let CommandBody::Initiate(raw) = with_initiate("x", psu, |_| {}).body else {
            unreachable!()
        };
        CommandBody::InitiatePeriodic(Box::new(RawPeriodicPayment {
            payment: *raw,
            start_date: day(start),
            end_date: None,
            frequency: "MONTHLY".into(),
            day_of_execution: None,
        }))
    };
    cases.push((
        command("v-standing-start", psu, standing(0)),
        "INVALID_EXECUTION_DATE",
    ));
    cases.push((
        command(
            "v-bulk-product",
            psu,
            bulk(
                "CROSS_BORDER_CREDIT_TRANSFERS",
                "BELFIUS",
                vec![transfer("B-1")],
            ),
        ),
        "INVALID_PRODUCT",
    ));
    cases.push((
        command(
            "v-bulk-brand",
            psu,
            bulk("SEPA_CREDIT_TRANSFERS", "BANX", vec![transfer("B-1")]),
        ),
        "INVALID_BRAND",
    ));
    cases.push((
        command(
            "v-bulk-e2e",
            psu,
            bulk(
                "SEPA_CREDIT_TRANSFERS",
                "BELFIUS",
                vec![transfer("B-1"), transfer("B-1")],
            ),
        ),
        "INVALID_IDENTIFIER",
    ));
    for (envelope, _) in &cases {
        env.send(envelope).await;
    }
    let ids: Vec<String> = cases.iter().map(|(e, _)| e.payment_id.clone()).collect();
    let events = env
        .wait_for(
            "every invalid payment to be rejected",
            Duration::from_secs(60),
            |events| {
                ids.iter()
                    .all(|id| events.iter().any(|e| &e.payment_id == id && e.is_final))
            },
        )
        .await;
    for (envelope, code) in &cases {
        let id = &envelope.payment_id;
        let line = timeline(&events, id);
        assert_eq!(
            states(&line),
            vec![StateKind::Rejected],
            "{id}: {}",
            describe(&line)
        );
        let event = &line[0];
        assert_eq!(event.reason_code.as_deref(), Some(*code), "{id}: {event:?}");
        assert!(
            event.reason_message.as_ref().is_some_and(|m| !m.is_empty()),
            "{id}: a human message"
        );
        assert_eq!(
            event.causation_id.as_deref(),
            Some(envelope.command_id.as_str())
        );
        assert!(event.is_final);
    }
    assert!(
        env.dlq_records().is_empty(),
        "validation failures are not dead letters"
    );
    let counters = env.counters().await;
    assert!(
        counters["initiations_by_e2e"]
            .as_object()
            .is_none_or(|m| m.is_empty()),
        "an invalid payment never reaches the bank: {counters}"
    );
}

fn class(record: &OwnedMessage) -> String {
    header(record, "pis.error.class").unwrap_or_default()
}

/// The DLQ record that came from command offset `offset` of partition `partition`.
fn from_source(records: &[OwnedMessage], partition: i32, offset: i64) -> &OwnedMessage {
    records
        .iter()
        .find(|r| {
            header(r, "pis.source.partition") == Some(partition.to_string())
                && header(r, "pis.source.offset") == Some(offset.to_string())
        })
        .unwrap_or_else(|| panic!("no DLQ record from {partition}:{offset}"))
}

/// Commands that cannot apply are refused: dead-lettered with their refusal class, and the
/// payment they name carries on as if they had never been sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_that_cannot_apply_are_dead_lettered_and_the_payment_is_unaffected() {
    let env = TestEnv::new(|c| c.settle_after = Duration::from_secs(3600)).await;
    let worker = env.start_worker("a", CLIENT_DRIVEN);
    worker.wait_restored(PARTITIONS as usize).await;
    // Two PSUs whose keys hash to partition 0 (murmur2), so that a command naming another PSU
    // reaches the owner that holds the payment; everything below goes to partition 0.
    let on_zero = |prefix: &str| {
        (0..)
            .map(|i| format!("{prefix}-{i}"))
            .find(|k| pis_worker::kafka::partitioner::partition_for(k.as_bytes(), PARTITIONS) == 0)
            .expect("some key hashes to partition 0")
    };
    let psu: &'static str = Box::leak(on_zero("psu-apply").into_boxed_str());
    let other: &'static str = Box::leak(on_zero("psu-other").into_boxed_str());
    let send = |envelope: pis_worker::contract::command::CommandEnvelope, key: Option<String>| {
        let bytes = command::encode(&envelope).expect("encode");
        let key = key.unwrap_or_else(|| envelope.psu_id.clone());
        let env = &env;
        async move {
            let (p, o) = env
                .send_record(
                    Some(0),
                    Some(key.as_bytes()),
                    Some(&bytes),
                    &[("trace-id", "t-apply")],
                )
                .await;
            (p, o, bytes)
        }
    };
    send(initiate("first-1", psu, "10.00", "Alice"), None).await;
    env.wait_for_state("first-1", StateKind::ScaPending).await;

    type Expected = (&'static str, Option<&'static str>, Vec<u8>, String);
    let mut expected: BTreeMap<i64, Expected> = BTreeMap::new();
    let mut expect = |(_, offset, bytes): (i32, i64, Vec<u8>),
                      class: &'static str,
                      payment: Option<&'static str>,
                      key: &str| {
        expected.insert(offset, (class, payment, bytes, key.to_owned()));
    };
    // The same payment_id for a different payment.
    expect(
        send(initiate("first-1", psu, "99.99", "Mallory"), None).await,
        "DUPLICATE_PAYMENT_ID",
        Some("first-1"),
        psu,
    );
    // The record key is not the command's psu_id.
    expect(
        send(
            command("first-1", psu, CommandBody::RefreshStatus),
            Some("psu-x".into()),
        )
        .await,
        "INVALID_ENVELOPE",
        Some("first-1"),
        "psu-x",
    );
    // Another PSU's command for this payment.
    expect(
        send(command("first-1", other, CommandBody::RefreshStatus), None).await,
        "PSU_MISMATCH",
        Some("first-1"),
        other,
    );
    // A cancellation of a payment nobody initiated.
    expect(
        send(
            command("never-1", psu, CommandBody::Cancel { reason: None }),
            None,
        )
        .await,
        "UNKNOWN_PAYMENT",
        Some("never-1"),
        psu,
    );
    // A cancellation of a payment that is already final (rejected by validation).
    send(
        with_initiate("final-1", psu, |r| r.amount = "0".into()),
        None,
    )
    .await;
    env.wait_for_state("final-1", StateKind::Rejected).await;
    expect(
        send(
            command("final-1", psu, CommandBody::Cancel { reason: None }),
            None,
        )
        .await,
        "ALREADY_FINAL",
        Some("final-1"),
        psu,
    );
    // A redirect with the payment's state but neither code nor error: what comes back for a
    // payment initiated with the PSU's token. This one was initiated with PKCE (the PSU had no
    // token yet): its redirect carries a code, so the code-less one is refused.
    let sca_url = env
        .status_events()
        .iter()
        .rev()
        .find(|e| e.payment_id == "first-1" && e.state == StateKind::ScaPending)
        .and_then(|e| e.sca_redirect_url.clone())
        .expect("the SCA URL");
    let state = url::Url::parse(&sca_url)
        .expect("url")
        .query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
        .expect("the worker's state");
    let nothing = CommandBody::CompleteSca(ScaRedirect::from_redirect_url(
        &url::Url::parse(&format!("https://client.example/callback?state={state}")).expect("url"),
    ));
    expect(
        send(command("first-1", psu, nothing), None).await,
        "CODE_REQUIRED",
        Some("first-1"),
        psu,
    );
    // An id outside its charset: the payment id is not readable, so none is named.
    expect(
        send(command("bad id!", psu, CommandBody::RefreshStatus), None).await,
        "INVALID_ENVELOPE",
        None,
        psu,
    );

    // The PSU signs; a forged redirect with the right code but another `state` is refused and
    // moves nothing (part 4 of the client team's findings: it used to reach AUTHORIZING and the
    // bank issued a token).
    let redirect = env.psu("sign", "first-1", psu).await;
    let mut forged = url::Url::parse(&redirect).expect("redirect");
    let pairs: Vec<(String, String)> = forged
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let state = pairs
        .iter()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.clone())
        .expect("the bank echoes the worker's state");
    forged
        .query_pairs_mut()
        .clear()
        .extend_pairs(pairs.iter().map(|(k, v)| {
            (
                k.as_str(),
                if k == "state" {
                    "forged-state"
                } else {
                    v.as_str()
                },
            )
        }));
    expect(
        send(complete_sca("first-1", psu, forged.as_str()), None).await,
        "STATE_MISMATCH",
        Some("first-1"),
        psu,
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !env.status_events()
            .iter()
            .any(|e| e.payment_id == "first-1" && e.state == StateKind::Authorizing),
        "a forged state moves nothing"
    );
    // The genuine redirect completes it.
    send(complete_sca("first-1", psu, &redirect), None).await;
    env.wait_for_state("first-1", StateKind::Signed).await;
    // A stale SCA error (with the right state) for a signed payment.
    let stale = CommandBody::CompleteSca(ScaRedirect::from_redirect_url(
        &url::Url::parse(&format!(
            "https://client.example/callback?error=access_denied&state={state}"
        ))
        .expect("url"),
    ));
    expect(
        send(command("first-1", psu, stale), None).await,
        "NOT_AWAITING_SCA",
        Some("first-1"),
        psu,
    );

    let records = env.wait_for_dlq(expected.len()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let records_after = env.dlq_records();
    assert_eq!(
        records_after.len(),
        expected.len(),
        "nothing else is dead-lettered"
    );
    for (offset, (class_name, payment, bytes, key)) in &expected {
        let record = from_source(&records, 0, *offset);
        assert_eq!(class(record), *class_name, "offset {offset}");
        assert_eq!(
            record.payload(),
            Some(&bytes[..]),
            "{class_name}: original value kept"
        );
        assert_eq!(
            record.key(),
            Some(key.as_bytes()),
            "{class_name}: original key kept"
        );
        assert_eq!(header(record, "trace-id").as_deref(), Some("t-apply"));
        assert_eq!(
            header(record, "pis.payment.id").as_deref(),
            *payment,
            "{class_name}"
        );
        assert!(header(record, "pis.error.message").is_some_and(|m| !m.is_empty()));
        assert_eq!(
            header(record, "pis.source.topic").as_deref(),
            Some(env.settings.topics.commands.as_str())
        );
    }

    let events = env.wait_for_state("first-1", StateKind::Signed).await;
    assert_eq!(
        states(&timeline(&events, "first-1")),
        vec![
            StateKind::Received,
            StateKind::Initiating,
            StateKind::ScaPending,
            StateKind::Authorizing,
            StateKind::Signed
        ],
        "the refused commands left no trace on the first payment"
    );
    assert_well_formed(&events, "first-1");
    assert!(timeline(&events, "never-1").is_empty());
    assert_eq!(
        states(&timeline(&events, "final-1")),
        vec![StateKind::Rejected]
    );
    let counters = env.counters().await;
    assert_eq!(
        counters["initiations_by_e2e"]["first-1"], 1,
        "the duplicate never reached the bank: {counters}"
    );
}

fn status_bytes() -> Vec<u8> {
    status_event_bytes("p-status", "psu-poison")
}

/// Every class of undecodable record: dead-lettered with its original key, value and headers
/// plus the error and source headers, counted per class, and the command behind them is
/// processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_records_are_dead_lettered_per_class_and_counted() {
    let env = TestEnv::new(|_| {}).await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut args = CLIENT_DRIVEN.to_vec();
    args.extend(["--max-command-bytes", "2048", "--http-addr", &addr]);
    let worker = env.start_worker("a", &args);
    worker.wait_restored(PARTITIONS as usize).await;

    let key = "psu-poison";
    let good = command::encode(&initiate("after-poison", key, "1.00", "Carol")).expect("encode");
    let mut oversized = good.clone();
    oversized.resize(4096, 0);
    let mut unknown = good.clone();
    unknown[2..10].copy_from_slice(&[0xAB; 8]);
    let cases: Vec<(Option<Vec<u8>>, &str)> = vec![
        (None, "EMPTY"),
        (Some(vec![]), "EMPTY"),
        (Some(oversized), "OVERSIZED"),
        (Some(b"{\"json\": true}".to_vec()), "BAD_FRAMING"),
        (Some(unknown), "UNKNOWN_SCHEMA"),
        // Confluent framing, but this worker has no registry.
        (
            Some(framing::frame_confluent(7, &good[framing::HEADER_LEN..])),
            "UNKNOWN_SCHEMA",
        ),
        (Some(good[..good.len() - 5].to_vec()), "MALFORMED_AVRO"),
        (Some([&good[..], &[1, 2, 3]].concat()), "MALFORMED_AVRO"),
        (Some(status_bytes()), "WRONG_RECORD_TYPE"),
    ];
    let mut sent = Vec::new();
    for (value, class_name) in &cases {
        let (partition, offset) = env
            .send_record(
                None,
                Some(key.as_bytes()),
                value.as_deref(),
                &[("trace-id", class_name)],
            )
            .await;
        sent.push((partition, offset, value.clone(), *class_name));
    }
    // A command without a key: dead-lettered with its key still null (part 4 of the client
    // team's findings: the DLQ used to carry an empty key instead).
    let (null_partition, null_offset) = env
        .send_record(None, None, Some(&good), &[("trace-id", "no-key")])
        .await;
    env.send(&initiate("after-poison", key, "1.00", "Carol"))
        .await;
    env.wait_for_state("after-poison", StateKind::ScaPending)
        .await;

    let records = env.wait_for_dlq(cases.len() + 1).await;
    let keyless = from_source(&records, null_partition, null_offset);
    assert_eq!(class(keyless), "INVALID_ENVELOPE");
    assert_eq!(keyless.key(), None, "a null key stays null");
    assert_eq!(keyless.payload(), Some(&good[..]));
    let records: Vec<OwnedMessage> = records
        .into_iter()
        .filter(|r| header(r, "trace-id").as_deref() != Some("no-key"))
        .collect();
    for (partition, offset, value, class_name) in &sent {
        let record = from_source(&records, *partition, *offset);
        assert_eq!(class(record), *class_name, "{partition}:{offset}");
        // The original value exactly: a null stays null.
        assert_eq!(
            record.payload(),
            value.as_deref(),
            "{class_name}: original value"
        );
        assert_eq!(record.key(), Some(key.as_bytes()));
        assert_eq!(
            header(record, "trace-id").as_deref(),
            Some(*class_name),
            "original headers"
        );
        assert!(header(record, "pis.error.message").is_some_and(|m| !m.is_empty()));
        assert_eq!(
            header(record, "pis.source.topic").as_deref(),
            Some(env.settings.topics.commands.as_str())
        );
    }
    assert_eq!(env.dlq_records().len(), cases.len() + 1);

    for (class_name, count) in [
        ("EMPTY", 2.0),
        ("OVERSIZED", 1.0),
        ("BAD_FRAMING", 1.0),
        ("UNKNOWN_SCHEMA", 2.0),
        ("MALFORMED_AVRO", 2.0),
        ("WRONG_RECORD_TYPE", 1.0),
    ] {
        assert_eq!(
            metric(
                port,
                &format!("pis_dlq_records_total{{class=\"{class_name}\"}}")
            )
            .await,
            count,
            "{class_name}"
        );
    }
    assert_eq!(
        metric(
            port,
            "pis_commands_consumed_total{outcome=\"dead_lettered\",type=\"unknown\"}"
        )
        .await,
        cases.len() as f64
    );
}

/// `pis-worker dlq list` shows a poison record with its class, source and key; `dlq replay`
/// puts it back on the command topic with its original bytes and headers, where (nothing
/// having been fixed) it is dead-lettered again, naming the DLQ record it was replayed from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_shows_a_poison_record_and_replay_dead_letters_it_again() {
    let env = TestEnv::new(|_| {}).await;
    let worker = env.start_worker("a", CLIENT_DRIVEN);
    worker.wait_restored(PARTITIONS as usize).await;
    let key = "psu-dlq";
    let (partition, offset) = env
        .send_record(
            None,
            Some(key.as_bytes()),
            Some(b"not a command"),
            &[("trace-id", "t-9")],
        )
        .await;
    env.send(&initiate("dlq-ok", key, "2.00", "Dan")).await;
    env.wait_for_state("dlq-ok", StateKind::ScaPending).await;
    let first = env.wait_for_dlq(1).await;
    let dlq_position = format!("{}:{}", first[0].partition(), first[0].offset());

    let listed = env.cli(&["dlq", "list", "--json"]).await;
    let rows: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(rows.len(), 1, "{listed}");
    let row = &rows[0];
    assert_eq!(row["class"], "BAD_FRAMING");
    assert_eq!(row["key"], key);
    assert_eq!(row["source_topic"], env.settings.topics.commands.as_str());
    assert_eq!(row["source_partition"], partition);
    assert_eq!(row["source_offset"], offset);
    assert!(
        row["message"]
            .as_str()
            .is_some_and(|m| m.contains("single-object"))
    );
    let text = env.cli(&["dlq", "list"]).await;
    assert!(
        text.starts_with(&dlq_position)
            && text.contains("BAD_FRAMING")
            && text.contains("key=psu-dlq"),
        "{text}"
    );
    assert_eq!(
        env.cli(&["dlq", "list", "--class", "UNKNOWN_SCHEMA"]).await,
        ""
    );

    let replayed = env.cli(&["dlq", "replay", "--offset", &dlq_position]).await;
    assert!(replayed.contains("replayed"), "{replayed}");
    let records = env.wait_for_dlq(2).await;
    let again = &records[1];
    assert_eq!(class(again), "BAD_FRAMING");
    assert_eq!(again.payload(), Some(&b"not a command"[..]));
    assert_eq!(again.key(), Some(key.as_bytes()));
    assert_eq!(header(again, "trace-id").as_deref(), Some("t-9"));
    assert_eq!(
        header(again, "pis.replayed-from"),
        Some(format!(
            "{}/{}/{}",
            env.settings.topics.dlq,
            first[0].partition(),
            first[0].offset()
        ))
    );
    assert_ne!(
        header(again, "pis.source.offset"),
        Some(offset.to_string()),
        "it was read again from a new command offset"
    );
    let error_headers = again
        .headers()
        .map(|h| {
            use rdkafka::message::Headers as _;
            h.iter().filter(|h| h.key == "pis.error.class").count()
        })
        .unwrap_or(0);
    assert_eq!(error_headers, 1, "the old DLQ headers were not replayed");
    let listed = env.cli(&["dlq", "list", "--limit", "1"]).await;
    assert_eq!(listed.lines().count(), 1, "{listed}");
    let dry = env.cli(&["dlq", "replay", "--all", "--dry-run"]).await;
    assert_eq!(dry.lines().count(), 2, "{dry}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(env.dlq_records().len(), 2, "a dry run publishes nothing");
}

/// A command written by a client that already uses a newer schema (a v6 candidate, written by
/// fastavro) is dead-lettered as `UNKNOWN_SCHEMA` by a worker that does not know that schema.
/// Once the worker accepts it (`--writer-schemas-dir`), replaying the DLQ record processes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_schema_record_is_processed_when_replayed_after_the_schema_is_accepted() {
    let env = TestEnv::new(|_| {}).await;
    let mut before = env.start_worker("before", CLIENT_DRIVEN);
    before.wait_restored(PARTITIONS as usize).await;
    let dir = root().join("tests/interop/schemas");
    let v3 = dir.join("payment-command.v6-candidate.avsc");
    let newer = |payment_id: &str| {
        let file = env.dir.path().join(format!("{payment_id}.bin"));
        let output = std::process::Command::new("python3")
            .arg(root().join("tests/interop/avro_peer.py"))
            .args(["encode-initiate", v3.to_str().expect("path")])
            .arg(&file)
            .args([payment_id, "psu-newer"])
            .output()
            .expect("python3 runs (make test installs fastavro)");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::read(&file).expect("peer output")
    };
    env.send_raw("psu-newer", &newer("newer-1")).await;
    let dlq = env.wait_for_dlq(1).await;
    assert_eq!(class(&dlq[0]), "UNKNOWN_SCHEMA");
    assert!(before.stop().success());

    let mut args = CLIENT_DRIVEN.to_vec();
    args.extend(["--writer-schemas-dir", dir.to_str().expect("path")]);
    let after = env.start_worker("after", &args);
    after.wait_restored(PARTITIONS as usize).await;
    assert!(
        after.log().contains("accepted writer schema"),
        "{}",
        after.log()
    );
    let replayed = env
        .cli(&["dlq", "replay", "--all", "--class", "UNKNOWN_SCHEMA"])
        .await;
    assert!(replayed.contains("replayed"), "{replayed}");
    env.wait_for_state("newer-1", StateKind::ScaPending).await;
    // New records in that schema are read directly.
    env.send_raw("psu-newer", &newer("newer-2")).await;
    let events = env.wait_for_state("newer-2", StateKind::ScaPending).await;
    assert_well_formed(&events, "newer-1");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.dlq_records().len(), 1, "the replayed record resolved");
}
