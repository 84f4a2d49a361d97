//! Payment commands (`schemas/payment-command.avsc`) to and from Avro bytes.

use apache_avro::types::Value;
use chrono::NaiveDate;
use secrecy::{ExposeSecret, SecretString};

use super::framing::{WriterRef, frame, unframe_any};
use super::{DecodeError, DecodeErrorClass, EncodeError, SchemaRole, WriterSchema, schemas};
use crate::domain::model::{
    PostalAddress, RawBulkPayment, RawBulkTransfer, RawConsentRequest, RawInitiatePayment,
    RawPeriodicPayment,
};

/// One command as a client sent it. Fields are not validated here: that happens at the edge of
/// the engine, where a failure becomes a status event or a DLQ record.
#[derive(Debug, Clone)]
pub struct CommandEnvelope {
    pub command_id: String,
    pub payment_id: String,
    pub psu_id: String,
    pub issued_at: i64,
    pub body: CommandBody,
}

#[derive(Debug, Clone)]
pub enum CommandBody {
    Initiate(Box<RawInitiatePayment>),
    InitiatePeriodic(Box<RawPeriodicPayment>),
    InitiateBulk(Box<RawBulkPayment>),
    CompleteSca(ScaRedirect),
    Cancel {
        reason: Option<String>,
    },
    RefreshStatus,
    /// A person's decision on a payment the worker cannot resolve itself.
    Resolve(ResolveOutcome),
    /// `RequestConsent` (v5): the envelope's `payment_id` carries the consent id.
    RequestConsent(RawConsentRequest),
    /// `CompleteConsent` (v5): a consent's redirect, in the shape of `CompleteSca`.
    CompleteConsent(ScaRedirect),
}

/// `ResolveOutcome` (command schema v3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveOutcome {
    pub action: ResolveAction,
    pub bank_payment_id: Option<String>,
    pub note: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolveAction {
    Reinitiate,
    Adopt,
    Abandon,
}

impl ResolveAction {
    pub const ALL: [ResolveAction; 3] = [
        ResolveAction::Reinitiate,
        ResolveAction::Adopt,
        ResolveAction::Abandon,
    ];

    /// The Avro enum symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            ResolveAction::Reinitiate => "REINITIATE",
            ResolveAction::Adopt => "ADOPT",
            ResolveAction::Abandon => "ABANDON",
        }
    }

    pub fn from_symbol(symbol: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.symbol() == symbol)
    }

    fn index(self) -> u32 {
        match self {
            ResolveAction::Reinitiate => 0,
            ResolveAction::Adopt => 1,
            ResolveAction::Abandon => 2,
        }
    }
}

impl CommandBody {
    /// Stable label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            CommandBody::Initiate(_) => "InitiatePayment",
            CommandBody::InitiatePeriodic(_) => "InitiatePeriodicPayment",
            CommandBody::InitiateBulk(_) => "InitiateBulkPayment",
            CommandBody::CompleteSca(_) => "CompleteSca",
            CommandBody::Cancel { .. } => "CancelPayment",
            CommandBody::RefreshStatus => "RefreshStatus",
            CommandBody::Resolve(_) => "ResolveOutcome",
            CommandBody::RequestConsent(_) => "RequestConsent",
            CommandBody::CompleteConsent(_) => "CompleteConsent",
        }
    }
}

/// The query parameters the bank put on the redirect URI.
#[derive(Debug, Clone)]
pub struct ScaRedirect {
    pub authorization_code: Option<SecretString>,
    pub error: Option<String>,
    pub error_description: Option<String>,
    pub state: Option<String>,
}

impl ScaRedirect {
    /// Reads `code`, `state`, `error` and `error_description` from a redirect URL.
    pub fn from_redirect_url(url: &url::Url) -> Self {
        let mut out = ScaRedirect {
            authorization_code: None,
            error: None,
            error_description: None,
            state: None,
        };
        for (name, value) in url.query_pairs() {
            match name.as_ref() {
                "code" => out.authorization_code = Some(SecretString::from(value.into_owned())),
                "error" => out.error = Some(value.into_owned()),
                "error_description" => out.error_description = Some(value.into_owned()),
                "state" => out.state = Some(value.into_owned()),
                _other => {}
            }
        }
        out
    }
}

/// Encodes a command with single-object framing.
pub fn encode(command: &CommandEnvelope) -> Result<Vec<u8>, EncodeError> {
    let schemas = schemas().map_err(|e| EncodeError::Schema(e.message))?;
    let body = match &command.body {
        CommandBody::Initiate(raw) => Value::Union(0, Box::new(initiate_value(raw))),
        CommandBody::CompleteSca(sca) => Value::Union(1, Box::new(redirect_value(sca))),
        CommandBody::Cancel { reason } => Value::Union(
            2,
            Box::new(Value::Record(vec![(
                "reason".into(),
                opt_string(reason.as_deref()),
            )])),
        ),
        CommandBody::RefreshStatus => Value::Union(3, Box::new(Value::Record(vec![]))),
        CommandBody::Resolve(resolve) => Value::Union(
            6,
            Box::new(Value::Record(vec![
                (
                    "action".into(),
                    Value::Enum(resolve.action.index(), resolve.action.symbol().into()),
                ),
                (
                    "bank_payment_id".into(),
                    opt_string(resolve.bank_payment_id.as_deref()),
                ),
                ("note".into(), opt_string(resolve.note.as_deref())),
            ])),
        ),
        CommandBody::InitiatePeriodic(raw) => Value::Union(
            4,
            Box::new(Value::Record(vec![
                ("payment".into(), initiate_value(&raw.payment)),
                (
                    "start_date".into(),
                    date_value(&raw.start_date).unwrap_or(Value::Date(0)),
                ),
                ("end_date".into(), opt_date_value(raw.end_date.as_deref())),
                ("frequency".into(), frequency_value(&raw.frequency)),
                (
                    "day_of_execution".into(),
                    match raw.day_of_execution {
                        Some(d) => Value::Union(1, Box::new(Value::Int(d))),
                        None => Value::Union(0, Box::new(Value::Null)),
                    },
                ),
            ])),
        ),
        CommandBody::InitiateBulk(raw) => Value::Union(
            5,
            Box::new(Value::Record(vec![
                (
                    "payment_product".into(),
                    product_value(&raw.payment_product),
                ),
                ("brand".into(), brand_value(&raw.brand)),
                ("debtor_iban".into(), opt_string(raw.debtor_iban.as_deref())),
                ("batch_booking".into(), Value::Boolean(raw.batch_booking)),
                (
                    "requested_execution_date".into(),
                    opt_date_value(raw.requested_execution_date.as_deref()),
                ),
                ("language".into(), Value::String(raw.language.clone())),
                (
                    "redirect_uri".into(),
                    Value::String(raw.redirect_uri.clone()),
                ),
                (
                    "payments".into(),
                    Value::Array(raw.payments.iter().map(transfer_value).collect()),
                ),
                ("always_pkce".into(), Value::Boolean(raw.always_pkce)),
                ("funds_check".into(), Value::Boolean(raw.funds_check)),
            ])),
        ),
        CommandBody::RequestConsent(raw) => Value::Union(
            7,
            Box::new(Value::Record(vec![
                ("brand".into(), brand_value(&raw.brand)),
                ("scope".into(), scope_value(&raw.scope)),
                (
                    "account_iban".into(),
                    opt_string(raw.account_iban.as_deref()),
                ),
                ("language".into(), Value::String(raw.language.clone())),
                (
                    "redirect_uri".into(),
                    Value::String(raw.redirect_uri.clone()),
                ),
            ])),
        ),
        CommandBody::CompleteConsent(redirect) => {
            Value::Union(8, Box::new(redirect_value(redirect)))
        }
    };
    let value = Value::Record(vec![
        (
            "command_id".into(),
            Value::String(command.command_id.clone()),
        ),
        (
            "payment_id".into(),
            Value::String(command.payment_id.clone()),
        ),
        ("psu_id".into(), Value::String(command.psu_id.clone())),
        (
            "issued_at".into(),
            Value::TimestampMillis(command.issued_at),
        ),
        ("body".into(), body),
    ]);
    let datum = apache_avro::to_avro_datum(&schemas.command.schema, value)?;
    Ok(frame(&schemas.command.fingerprint, &datum))
}

/// An enum symbol the schema does not know cannot be written: encoding it as the first symbol
/// would silently change the command, so the sender must pass a valid symbol (the CLI does).
fn product_value(symbol: &str) -> Value {
    let index = crate::domain::model::PaymentProduct::ALL
        .iter()
        .position(|p| p.symbol() == symbol)
        .unwrap_or(usize::MAX);
    Value::Enum(index as u32, symbol.to_owned())
}

fn brand_value(symbol: &str) -> Value {
    let index = match symbol {
        "BELFIUS" => 0,
        "BANX" => 1,
        _other => u32::MAX,
    };
    Value::Enum(index, symbol.to_owned())
}

fn scope_value(symbol: &str) -> Value {
    let index = crate::domain::consent::ConsentScope::ALL
        .iter()
        .position(|s| s.symbol() == symbol)
        .unwrap_or(usize::MAX);
    Value::Enum(index as u32, symbol.to_owned())
}

/// `CompleteSca` and `CompleteConsent` share this shape.
fn redirect_value(redirect: &ScaRedirect) -> Value {
    Value::Record(vec![
        (
            "authorization_code".into(),
            opt_string(
                redirect
                    .authorization_code
                    .as_ref()
                    .map(|c| c.expose_secret()),
            ),
        ),
        ("error".into(), opt_string(redirect.error.as_deref())),
        (
            "error_description".into(),
            opt_string(redirect.error_description.as_deref()),
        ),
        ("state".into(), opt_string(redirect.state.as_deref())),
    ])
}

fn frequency_value(symbol: &str) -> Value {
    let index = crate::domain::model::Frequency::ALL
        .iter()
        .position(|f| f.symbol() == symbol)
        .unwrap_or(usize::MAX);
    Value::Enum(index as u32, symbol.to_owned())
}

fn date_value(text: &str) -> Option<Value> {
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .map(|d| Value::Date((d - epoch()).num_days() as i32))
}

fn opt_date_value(text: Option<&str>) -> Value {
    match text.and_then(date_value) {
        Some(date) => Value::Union(1, Box::new(date)),
        None => Value::Union(0, Box::new(Value::Null)),
    }
}

fn transfer_value(t: &RawBulkTransfer) -> Value {
    Value::Record(vec![
        ("amount".into(), Value::String(t.amount.clone())),
        ("currency".into(), Value::String(t.currency.clone())),
        (
            "creditor_name".into(),
            Value::String(t.creditor_name.clone()),
        ),
        (
            "creditor_iban".into(),
            Value::String(t.creditor_iban.clone()),
        ),
        ("creditor_bic".into(), opt_string(t.creditor_bic.as_deref())),
        (
            "end_to_end_id".into(),
            Value::String(t.end_to_end_id.clone()),
        ),
        (
            "remittance_information".into(),
            opt_string(t.remittance_information.as_deref()),
        ),
    ])
}

fn address_value(address: Option<&PostalAddress>) -> Value {
    match address {
        Some(a) => Value::Union(
            1,
            Box::new(Value::Record(vec![
                ("street".into(), opt_string(a.street.as_deref())),
                (
                    "building_number".into(),
                    opt_string(a.building_number.as_deref()),
                ),
                ("postal_code".into(), opt_string(a.postal_code.as_deref())),
                ("town".into(), opt_string(a.town.as_deref())),
                ("country".into(), Value::String(a.country.clone())),
            ])),
        ),
        None => Value::Union(0, Box::new(Value::Null)),
    }
}

fn initiate_value(raw: &RawInitiatePayment) -> Value {
    let date = opt_date_value(raw.requested_execution_date.as_deref());
    Value::Record(vec![
        (
            "payment_product".into(),
            product_value(&raw.payment_product),
        ),
        ("brand".into(), brand_value(&raw.brand)),
        ("amount".into(), Value::String(raw.amount.clone())),
        ("currency".into(), Value::String(raw.currency.clone())),
        (
            "creditor_name".into(),
            Value::String(raw.creditor_name.clone()),
        ),
        (
            "creditor_iban".into(),
            Value::String(raw.creditor_iban.clone()),
        ),
        (
            "creditor_bic".into(),
            opt_string(raw.creditor_bic.as_deref()),
        ),
        ("debtor_iban".into(), opt_string(raw.debtor_iban.as_deref())),
        (
            "end_to_end_id".into(),
            Value::String(raw.end_to_end_id.clone()),
        ),
        (
            "remittance_information".into(),
            opt_string(raw.remittance_information.as_deref()),
        ),
        ("requested_execution_date".into(), date),
        ("language".into(), Value::String(raw.language.clone())),
        (
            "redirect_uri".into(),
            Value::String(raw.redirect_uri.clone()),
        ),
        (
            "charge_bearer".into(),
            opt_string(raw.charge_bearer.as_deref()),
        ),
        (
            "creditor_address".into(),
            address_value(raw.creditor_address.as_ref()),
        ),
        (
            "creditor_bban".into(),
            opt_string(raw.creditor_bban.as_deref()),
        ),
        (
            "creditor_bank_national_id".into(),
            opt_string(raw.creditor_bank_national_id.as_deref()),
        ),
        (
            "creditor_currency".into(),
            opt_string(raw.creditor_currency.as_deref()),
        ),
        ("always_pkce".into(), Value::Boolean(raw.always_pkce)),
        ("funds_check".into(), Value::Boolean(raw.funds_check)),
    ])
}

fn epoch() -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default()
}

pub(super) fn opt_string(value: Option<&str>) -> Value {
    match value {
        Some(v) => Value::Union(1, Box::new(Value::String(v.to_owned()))),
        None => Value::Union(0, Box::new(Value::Null)),
    }
}

/// How long a decode may wait for the schema registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Patience {
    /// One request: an unreachable registry is a `RegistryUnavailable` error.
    Once,
    /// Until the registry answers (back-off with jitter): what the worker does, so that a
    /// registry outage neither dead-letters nor skips a record.
    UntilAnswered,
}

/// Decodes a command in single-object encoding or (with a registry) Confluent framing, with the
/// writer schema its header names, waiting for an unreachable registry (see [`Patience`]).
pub fn decode(bytes: &[u8], max_bytes: usize) -> Result<CommandEnvelope, DecodeError> {
    decode_with(bytes, max_bytes, Patience::UntilAnswered)
}

/// Decodes like [`decode_with`] (`Patience::Once`), but asks the registry for an unknown schema
/// id without blocking the calling task. A `RegistryUnavailable` error means "ask again later".
pub async fn decode_async(bytes: &[u8], max_bytes: usize) -> Result<CommandEnvelope, DecodeError> {
    if bytes.len() <= max_bytes {
        if let Ok((WriterRef::RegistryId(id), _)) = unframe_any(bytes) {
            if let Some(registry) = super::registry::current() {
                // Cached afterwards, so the decode below does not block.
                registry.writer_by_id_async(id).await?;
            }
        }
    }
    decode_with(bytes, max_bytes, Patience::Once)
}

/// [`decode`] with a choice of how long to wait for the registry.
pub fn decode_with(
    bytes: &[u8],
    max_bytes: usize,
    patience: Patience,
) -> Result<CommandEnvelope, DecodeError> {
    if bytes.len() > max_bytes {
        return Err(DecodeError::new(
            DecodeErrorClass::Oversized,
            format!("{} bytes exceeds the maximum of {max_bytes}", bytes.len()),
        ));
    }
    let (writer_ref, mut datum) = unframe_any(bytes)?;
    let writer = writer_schema(writer_ref, patience)?;
    match writer.role {
        SchemaRole::Command => {}
        SchemaRole::Status => {
            return Err(DecodeError::new(
                DecodeErrorClass::WrongRecordType,
                "a PaymentStatusEvent was published to the command topic",
            ));
        }
        SchemaRole::ConsentStatus => {
            return Err(DecodeError::new(
                DecodeErrorClass::WrongRecordType,
                "a ConsentStatus event was published to the command topic",
            ));
        }
    }
    let writer = &writer.schema;
    // apache-avro reads a value cut off by the end of the bytes as null: check the datum's
    // structure first, so that a truncated command is malformed, not a different command.
    super::binary::check_datum(writer, datum).map_err(malformed)?;
    // Read with the writer schema alone and resolve by name below: apache-avro 0.21 resolves a
    // union of records structurally when given a reader schema, which turned a CancelPayment
    // into a CompleteSca with all-default fields (see docs/contract.md).
    let value = apache_avro::from_avro_datum(writer, &mut datum, None)
        .map_err(|e| DecodeError::new(DecodeErrorClass::MalformedAvro, e.to_string()))?;
    if !datum.is_empty() {
        return Err(DecodeError::new(
            DecodeErrorClass::MalformedAvro,
            format!("{} trailing bytes after the command", datum.len()),
        ));
    }
    envelope_from_value(value, writer)
}

/// The writer schema a message header names: a known fingerprint, or a registry id.
pub(super) fn writer_schema(
    writer_ref: WriterRef,
    patience: Patience,
) -> Result<std::sync::Arc<WriterSchema>, DecodeError> {
    match writer_ref {
        WriterRef::Fingerprint(fingerprint) => schemas()?.writer(&fingerprint).ok_or_else(|| {
            DecodeError::new(
                DecodeErrorClass::UnknownSchema,
                format!(
                    "writer schema fingerprint {} is not a schema this worker knows \
                     (built in, schemas/history, or PIS_WRITER_SCHEMAS_DIR)",
                    hex::encode(fingerprint)
                ),
            )
        }),
        WriterRef::RegistryId(id) => {
            let Some(registry) = super::registry::current() else {
                return Err(DecodeError::new(
                    DecodeErrorClass::UnknownSchema,
                    format!(
                        "Confluent framing (schema id {id}) but no schema registry is configured \
                         (PIS_SCHEMA_REGISTRY_URL)"
                    ),
                ));
            };
            match patience {
                Patience::Once => registry.writer_by_id(id),
                Patience::UntilAnswered => registry.writer_by_id_waiting(id),
            }
        }
    }
}

/// The record name of branch `index` of the writer's `body` union.
fn body_branch_name(writer: &apache_avro::Schema, index: u32) -> Option<String> {
    let apache_avro::Schema::Record(record) = writer else {
        return None;
    };
    let body = record.fields.iter().find(|f| f.name == "body")?;
    let apache_avro::Schema::Union(union) = &body.schema else {
        return None;
    };
    match union.variants().get(index as usize)? {
        apache_avro::Schema::Record(branch) => Some(branch.name.name.clone()),
        _other => None,
    }
}

fn malformed(message: impl Into<String>) -> DecodeError {
    DecodeError::new(DecodeErrorClass::MalformedAvro, message)
}

pub(super) struct Fields(Vec<(String, Value)>);

impl Fields {
    pub(super) fn of(value: Value, what: &str) -> Result<Self, DecodeError> {
        match value {
            Value::Record(fields) => Ok(Fields(fields)),
            other => Err(malformed(format!(
                "{what}: expected a record, got {other:?}"
            ))),
        }
    }

    /// A field an older writer may not have had: absent reads as null (its schema default).
    fn take_optional(&mut self, name: &str) -> Value {
        match self.0.iter().position(|(n, _)| n == name) {
            Some(index) => self.0.swap_remove(index).1,
            None => Value::Null,
        }
    }

    fn take(&mut self, name: &str) -> Result<Value, DecodeError> {
        let index = self
            .0
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| malformed(format!("missing field {name}")))?;
        Ok(self.0.swap_remove(index).1)
    }

    pub(super) fn string(&mut self, name: &str) -> Result<String, DecodeError> {
        match self.take(name)? {
            Value::String(s) => Ok(s),
            Value::Uuid(u) => Ok(u.to_string()),
            Value::Enum(_, symbol) => Ok(symbol),
            other => Err(malformed(format!(
                "{name}: expected a string, got {other:?}"
            ))),
        }
    }

    pub(super) fn opt_string(&mut self, name: &str) -> Result<Option<String>, DecodeError> {
        match self.take_optional(name) {
            Value::Union(_, inner) => match *inner {
                Value::Null => Ok(None),
                Value::String(s) => Ok(Some(s)),
                other => Err(malformed(format!(
                    "{name}: expected string or null, got {other:?}"
                ))),
            },
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(s)),
            other => Err(malformed(format!(
                "{name}: expected string or null, got {other:?}"
            ))),
        }
    }

    pub(super) fn millis(&mut self, name: &str) -> Result<i64, DecodeError> {
        match self.take(name)? {
            Value::TimestampMillis(v) | Value::Long(v) => Ok(v),
            other => Err(malformed(format!(
                "{name}: expected timestamp-millis, got {other:?}"
            ))),
        }
    }

    /// An optional timestamp-millis (`["null", timestamp-millis]`), absent as null.
    pub(super) fn opt_millis(&mut self, name: &str) -> Result<Option<i64>, DecodeError> {
        let inner = match self.take_optional(name) {
            Value::Union(_, inner) => *inner,
            other => other,
        };
        match inner {
            Value::Null => Ok(None),
            Value::TimestampMillis(v) | Value::Long(v) => Ok(Some(v)),
            other => Err(malformed(format!(
                "{name}: expected timestamp-millis or null, got {other:?}"
            ))),
        }
    }

    pub(super) fn long(&mut self, name: &str) -> Result<i64, DecodeError> {
        match self.take(name)? {
            Value::Long(v) => Ok(v),
            Value::Int(v) => Ok(i64::from(v)),
            other => Err(malformed(format!("{name}: expected long, got {other:?}"))),
        }
    }

    pub(super) fn boolean(&mut self, name: &str) -> Result<bool, DecodeError> {
        match self.take(name)? {
            Value::Boolean(v) => Ok(v),
            other => Err(malformed(format!(
                "{name}: expected boolean, got {other:?}"
            ))),
        }
    }

    pub(super) fn value(&mut self, name: &str) -> Result<Value, DecodeError> {
        self.take(name)
    }

    pub(super) fn value_or_null(&mut self, name: &str) -> Value {
        self.take_optional(name)
    }

    fn opt_int(&mut self, name: &str) -> Result<Option<i32>, DecodeError> {
        match self.take_optional(name) {
            Value::Union(_, inner) => match *inner {
                Value::Null => Ok(None),
                Value::Int(v) => Ok(Some(v)),
                other => Err(malformed(format!(
                    "{name}: expected int or null, got {other:?}"
                ))),
            },
            Value::Null => Ok(None),
            Value::Int(v) => Ok(Some(v)),
            other => Err(malformed(format!(
                "{name}: expected int or null, got {other:?}"
            ))),
        }
    }

    fn opt_boolean(&mut self, name: &str) -> Result<Option<bool>, DecodeError> {
        match self.take_optional(name) {
            Value::Null => Ok(None),
            Value::Boolean(v) => Ok(Some(v)),
            other => Err(malformed(format!(
                "{name}: expected boolean, got {other:?}"
            ))),
        }
    }

    fn opt_date(&mut self, name: &str) -> Result<Option<String>, DecodeError> {
        let inner = match self.take_optional(name) {
            Value::Union(_, inner) => *inner,
            other => other,
        };
        match inner {
            Value::Null => Ok(None),
            Value::Date(days) | Value::Int(days) => epoch()
                .checked_add_signed(chrono::Duration::days(i64::from(days)))
                .map(|d| Some(d.format("%Y-%m-%d").to_string()))
                .ok_or_else(|| malformed(format!("{name}: date out of range"))),
            other => Err(malformed(format!(
                "{name}: expected date or null, got {other:?}"
            ))),
        }
    }
}

fn read_initiate(f: &mut Fields) -> Result<RawInitiatePayment, DecodeError> {
    let creditor_address = match f.value_or_null("creditor_address") {
        Value::Union(_, inner) => match *inner {
            Value::Null => None,
            record => {
                let mut a = Fields::of(record, "creditor_address")?;
                Some(PostalAddress {
                    street: a.opt_string("street")?,
                    building_number: a.opt_string("building_number")?,
                    postal_code: a.opt_string("postal_code")?,
                    town: a.opt_string("town")?,
                    country: a.string("country")?,
                })
            }
        },
        Value::Null => None,
        other => return Err(malformed(format!("creditor_address: unexpected {other:?}"))),
    };
    Ok(RawInitiatePayment {
        payment_product: f.string("payment_product")?,
        brand: f.string("brand")?,
        amount: f.string("amount")?,
        currency: f.string("currency")?,
        creditor_name: f.string("creditor_name")?,
        creditor_iban: f.string("creditor_iban")?,
        creditor_bic: f.opt_string("creditor_bic")?,
        debtor_iban: f.opt_string("debtor_iban")?,
        end_to_end_id: f.string("end_to_end_id")?,
        remittance_information: f.opt_string("remittance_information")?,
        requested_execution_date: f.opt_date("requested_execution_date")?,
        language: f.string("language")?,
        redirect_uri: f.string("redirect_uri")?,
        charge_bearer: f.opt_string("charge_bearer")?,
        creditor_address,
        creditor_bban: f.opt_string("creditor_bban")?,
        creditor_bank_national_id: f.opt_string("creditor_bank_national_id")?,
        creditor_currency: f.opt_string("creditor_currency")?,
        // Absent before schema v4.
        always_pkce: f.opt_boolean("always_pkce")?.unwrap_or(false),
        // Absent before schema v5.
        funds_check: f.opt_boolean("funds_check")?.unwrap_or(false),
    })
}

/// `CompleteSca` and `CompleteConsent` share this shape.
fn read_redirect(f: &mut Fields) -> Result<ScaRedirect, DecodeError> {
    Ok(ScaRedirect {
        authorization_code: f.opt_string("authorization_code")?.map(SecretString::from),
        error: f.opt_string("error")?,
        error_description: f.opt_string("error_description")?,
        state: f.opt_string("state")?,
    })
}

fn envelope_from_value(
    value: Value,
    writer: &apache_avro::Schema,
) -> Result<CommandEnvelope, DecodeError> {
    let mut fields = Fields::of(value, "PaymentCommand")?;
    let command_id = fields.string("command_id")?;
    let payment_id = fields.string("payment_id")?;
    let psu_id = fields.string("psu_id")?;
    let issued_at = fields.millis("issued_at")?;
    let (index, body) = match fields.value("body")? {
        Value::Union(index, body) => (index, *body),
        other => return Err(malformed(format!("body: expected a union, got {other:?}"))),
    };
    let mut body_fields = Fields::of(body, "body")?;
    let branch = body_branch_name(writer, index).unwrap_or_default();
    let body = match branch.as_str() {
        "InitiatePayment" => CommandBody::Initiate(Box::new(read_initiate(&mut body_fields)?)),
        "InitiatePeriodicPayment" => {
            let mut payment = Fields::of(body_fields.value("payment")?, "payment")?;
            CommandBody::InitiatePeriodic(Box::new(RawPeriodicPayment {
                payment: read_initiate(&mut payment)?,
                start_date: body_fields
                    .opt_date("start_date")?
                    .ok_or_else(|| malformed("start_date: expected a date"))?,
                end_date: body_fields.opt_date("end_date")?,
                frequency: body_fields.string("frequency")?,
                day_of_execution: body_fields.opt_int("day_of_execution")?,
            }))
        }
        "InitiateBulkPayment" => {
            let payments = match body_fields.value("payments")? {
                Value::Array(items) => items
                    .into_iter()
                    .map(|item| {
                        let mut t = Fields::of(item, "payments[]")?;
                        Ok(RawBulkTransfer {
                            amount: t.string("amount")?,
                            currency: t.string("currency")?,
                            creditor_name: t.string("creditor_name")?,
                            creditor_iban: t.string("creditor_iban")?,
                            creditor_bic: t.opt_string("creditor_bic")?,
                            end_to_end_id: t.string("end_to_end_id")?,
                            remittance_information: t.opt_string("remittance_information")?,
                        })
                    })
                    .collect::<Result<Vec<_>, DecodeError>>()?,
                other => {
                    return Err(malformed(format!(
                        "payments: expected an array, got {other:?}"
                    )));
                }
            };
            CommandBody::InitiateBulk(Box::new(RawBulkPayment {
                payment_product: body_fields.string("payment_product")?,
                brand: body_fields.string("brand")?,
                debtor_iban: body_fields.opt_string("debtor_iban")?,
                batch_booking: body_fields.opt_boolean("batch_booking")?.unwrap_or(false),
                requested_execution_date: body_fields.opt_date("requested_execution_date")?,
                language: body_fields.string("language")?,
                redirect_uri: body_fields.string("redirect_uri")?,
                payments,
                always_pkce: body_fields.opt_boolean("always_pkce")?.unwrap_or(false),
                funds_check: body_fields.opt_boolean("funds_check")?.unwrap_or(false),
            }))
        }
        "CompleteSca" => CommandBody::CompleteSca(read_redirect(&mut body_fields)?),
        // An unknown brand or scope symbol (a newer writer's) is read as it is: validation
        // refuses it, as it does an unknown product.
        "RequestConsent" => CommandBody::RequestConsent(RawConsentRequest {
            brand: body_fields.string("brand")?,
            scope: body_fields.string("scope")?,
            account_iban: body_fields.opt_string("account_iban")?,
            language: body_fields.string("language")?,
            redirect_uri: body_fields.string("redirect_uri")?,
        }),
        "CompleteConsent" => CommandBody::CompleteConsent(read_redirect(&mut body_fields)?),
        "CancelPayment" => CommandBody::Cancel {
            reason: body_fields.opt_string("reason")?,
        },
        "RefreshStatus" => CommandBody::RefreshStatus,
        "ResolveOutcome" => {
            let action = match body_fields.value("action")? {
                Value::Enum(_, symbol) => ResolveAction::from_symbol(&symbol).ok_or_else(|| {
                    DecodeError::new(
                        DecodeErrorClass::WrongRecordType,
                        format!(
                            "unknown ResolveOutcome action {symbol:?} (a newer writer's symbol)"
                        ),
                    )
                })?,
                other => {
                    return Err(malformed(format!(
                        "action: expected an enum, got {other:?}"
                    )));
                }
            };
            CommandBody::Resolve(ResolveOutcome {
                action,
                bank_payment_id: body_fields.opt_string("bank_payment_id")?,
                note: body_fields.opt_string("note")?,
            })
        }
        other => {
            return Err(DecodeError::new(
                DecodeErrorClass::WrongRecordType,
                format!("unknown command body {other:?} (union branch {index})"),
            ));
        }
    };
    Ok(CommandEnvelope {
        command_id,
        payment_id,
        psu_id,
        issued_at,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample_initiate() -> RawInitiatePayment {
        RawInitiatePayment {
            payment_product: "SEPA_CREDIT_TRANSFERS".into(),
            brand: "BELFIUS".into(),
            amount: "12.34".into(),
            currency: "EUR".into(),
            creditor_name: "Alice".into(),
            creditor_iban: "BE68539007547034".into(),
            creditor_bic: Some("GKCCBEBB".into()),
            debtor_iban: None,
            end_to_end_id: "E2E-1".into(),
            remittance_information: Some("invoice 42".into()),
            requested_execution_date: Some("2026-12-01".into()),
            language: "fr".into(),
            redirect_uri: "https://client.example/cb".into(),
            ..Default::default()
        }
    }

    fn envelope(body: CommandBody) -> CommandEnvelope {
        CommandEnvelope {
            command_id: "c-1".into(),
            payment_id: "p-1".into(),
            psu_id: "psu-1".into(),
            issued_at: 1_700_000_000_000,
            body,
        }
    }

    #[test]
    fn initiate_round_trips_through_avro_bytes() {
        let bytes = encode(&envelope(CommandBody::Initiate(
            Box::new(sample_initiate()),
        )))
        .expect("encode");
        assert_eq!(&bytes[..2], &[0xC3, 0x01]);
        let decoded = decode(&bytes, 65_536).expect("decode");
        assert_eq!(decoded.command_id, "c-1");
        assert_eq!(decoded.issued_at, 1_700_000_000_000);
        match decoded.body {
            CommandBody::Initiate(raw) => assert_eq!(*raw, sample_initiate()),
            other => panic!("wrong body {other:?}"),
        }
    }

    #[test]
    fn complete_sca_round_trips_and_keeps_the_code_secret() {
        let sca = ScaRedirect::from_redirect_url(
            &url::Url::parse("https://c.example/cb?code=s3cr3t&state=p-1").expect("url"),
        );
        let bytes = encode(&envelope(CommandBody::CompleteSca(sca))).expect("encode");
        let decoded = decode(&bytes, 65_536).expect("decode");
        let CommandBody::CompleteSca(sca) = decoded.body else {
            panic!("wrong body")
        };
        let code = sca.authorization_code.expect("code");
        assert_eq!(code.expose_secret(), "s3cr3t");
        assert!(!format!("{code:?}").contains("s3cr3t"));
        assert_eq!(sca.state.as_deref(), Some("p-1"));
    }

    #[test]
    fn cancel_and_refresh_round_trip() {
        let bytes = encode(&envelope(CommandBody::Cancel {
            reason: Some("changed my mind".into()),
        }))
        .expect("encode");
        assert!(matches!(
            decode(&bytes, 65_536).expect("decode").body,
            CommandBody::Cancel { reason: Some(r) } if r == "changed my mind"
        ));
        let bytes = encode(&envelope(CommandBody::RefreshStatus)).expect("encode");
        assert!(matches!(
            decode(&bytes, 65_536).expect("decode").body,
            CommandBody::RefreshStatus
        ));
    }

    #[test]
    fn decode_classifies_bad_input() {
        let good = encode(&envelope(CommandBody::RefreshStatus)).expect("encode");
        let class = |b: &[u8], max| decode(b, max).map(|_| ()).map_err(|e| e.class);
        assert_eq!(class(&good, 4), Err(DecodeErrorClass::Oversized));
        assert_eq!(class(b"", 100), Err(DecodeErrorClass::Empty));
        assert_eq!(
            class(b"hello world!", 100),
            Err(DecodeErrorClass::BadFraming)
        );
        let mut unknown = good.clone();
        unknown[2] ^= 0xFF;
        assert_eq!(class(&unknown, 100), Err(DecodeErrorClass::UnknownSchema));
        assert_eq!(
            class(&good[..good.len() - 3], 100),
            Err(DecodeErrorClass::MalformedAvro)
        );
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(class(&trailing, 100), Err(DecodeErrorClass::MalformedAvro));
    }

    /// No prefix of a command decodes: apache-avro alone read a cut-off union or string as
    /// null, which turned a truncated initiation into a valid one.
    #[test]
    fn every_truncation_of_a_command_is_malformed() {
        let good = encode(&envelope(CommandBody::Initiate(
            Box::new(sample_initiate()),
        )))
        .expect("encode");
        for n in 10..good.len() {
            assert_eq!(
                decode(&good[..n], 65_536).map(|_| ()).map_err(|e| e.class),
                Err(DecodeErrorClass::MalformedAvro),
                "cut at {n} of {}",
                good.len()
            );
        }
    }
}

#[cfg(test)]
mod evolution_tests {
    use super::*;
    use crate::contract::{COMMAND_SCHEMA_HISTORY, canonical};

    fn envelope(body: CommandBody) -> CommandEnvelope {
        CommandEnvelope {
            command_id: "c-9".into(),
            payment_id: "p-9".into(),
            psu_id: "psu-9".into(),
            issued_at: 5,
            body,
        }
    }

    fn single() -> RawInitiatePayment {
        RawInitiatePayment {
            payment_product: "CROSS_BORDER_CREDIT_TRANSFERS".into(),
            brand: "BELFIUS".into(),
            amount: "100.00".into(),
            currency: "USD".into(),
            creditor_name: "ACME Inc".into(),
            creditor_iban: String::new(),
            creditor_bic: None,
            debtor_iban: None,
            end_to_end_id: "E2E-X".into(),
            remittance_information: None,
            requested_execution_date: None,
            language: "nl".into(),
            redirect_uri: "https://c.example/cb".into(),
            charge_bearer: Some("SHAR".into()),
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
            // Not the defaults, so the round trip shows the v4 and v5 fields travel.
            always_pkce: true,
            funds_check: true,
        }
    }

    #[test]
    fn cross_border_fields_round_trip() {
        let bytes = encode(&envelope(CommandBody::Initiate(Box::new(single())))).expect("encode");
        let CommandBody::Initiate(raw) = decode(&bytes, 65_536).expect("decode").body else {
            panic!("wrong body")
        };
        assert_eq!(*raw, single());
    }

    #[test]
    fn periodic_round_trips() {
        let raw = RawPeriodicPayment {
            payment: RawInitiatePayment {
                payment_product: "SEPA_CREDIT_TRANSFERS".into(),
                currency: "EUR".into(),
                charge_bearer: None,
                creditor_address: None,
                creditor_bban: None,
                creditor_bank_national_id: None,
                creditor_currency: None,
                ..single()
            },
            start_date: "2027-01-31".into(),
            end_date: Some("2027-12-31".into()),
            frequency: "EVERY_TWO_MONTHS".into(),
            day_of_execution: Some(31),
        };
        let bytes = encode(&envelope(CommandBody::InitiatePeriodic(Box::new(
            raw.clone(),
        ))))
        .expect("encode");
        let CommandBody::InitiatePeriodic(back) = decode(&bytes, 65_536).expect("decode").body
        else {
            panic!("wrong body")
        };
        assert_eq!(*back, raw);
    }

    #[test]
    fn bulk_round_trips() {
        let transfer = |i: u32| RawBulkTransfer {
            amount: format!("{i}.50"),
            currency: "EUR".into(),
            creditor_name: format!("Creditor {i}"),
            creditor_iban: "BE68539007547034".into(),
            creditor_bic: (i % 2 == 0).then(|| "GKCCBEBB".into()),
            end_to_end_id: format!("E2E-{i}"),
            remittance_information: None,
        };
        let raw = RawBulkPayment {
            payment_product: "SEPA_CREDIT_TRANSFERS".into(),
            brand: "BELFIUS".into(),
            debtor_iban: Some("BE71096123456769".into()),
            batch_booking: true,
            requested_execution_date: Some("2027-02-01".into()),
            language: "fr".into(),
            redirect_uri: "https://c.example/cb".into(),
            payments: (1..=3).map(transfer).collect(),
            always_pkce: true,
            funds_check: true,
        };
        let bytes =
            encode(&envelope(CommandBody::InitiateBulk(Box::new(raw.clone())))).expect("encode");
        let CommandBody::InitiateBulk(back) = decode(&bytes, 65_536).expect("decode").body else {
            panic!("wrong body")
        };
        assert_eq!(*back, raw);
    }

    #[test]
    fn an_unknown_enum_symbol_is_refused_rather_than_rewritten() {
        let mut raw = single();
        raw.payment_product = "CARRIER_PIGEON".into();
        assert!(encode(&envelope(CommandBody::Initiate(Box::new(raw)))).is_err());
    }

    /// Records written with the first published schema (no cross-border fields, four body
    /// branches) are still read, with the new optional fields absent.
    #[test]
    fn commands_written_with_schema_v1_are_still_read() {
        let (_, v1_json) = COMMAND_SCHEMA_HISTORY[0];
        let v1 = apache_avro::Schema::parse_str(v1_json).expect("v1 schema");
        let v1_fingerprint = canonical::fingerprint(v1_json).expect("fingerprint");
        let current = schemas().expect("schemas").command.fingerprint;
        assert_ne!(v1_fingerprint, current, "the schema did change");
        let mut initiate = match initiate_value(&RawInitiatePayment {
            payment_product: "SEPA_CREDIT_TRANSFERS".into(),
            brand: "BANX".into(),
            amount: "1.00".into(),
            currency: "EUR".into(),
            creditor_name: "Old".into(),
            creditor_iban: "BE68539007547034".into(),
            end_to_end_id: "E2E-OLD".into(),
            language: "fr".into(),
            redirect_uri: "https://c.example/cb".into(),
            ..RawInitiatePayment::default()
        }) {
            Value::Record(fields) => fields,
            other => panic!("not a record: {other:?}"),
        };
        // v1 had only the first 13 fields.
        initiate.truncate(13);
        let value = Value::Record(vec![
            ("command_id".into(), Value::String("c-old".into())),
            ("payment_id".into(), Value::String("p-old".into())),
            ("psu_id".into(), Value::String("u-old".into())),
            ("issued_at".into(), Value::TimestampMillis(7)),
            (
                "body".into(),
                Value::Union(0, Box::new(Value::Record(initiate))),
            ),
        ]);
        let datum = apache_avro::to_avro_datum(&v1, value).expect("v1 datum");
        let decoded = decode(&frame(&v1_fingerprint, &datum), 65_536).expect("v1 record is read");
        let CommandBody::Initiate(raw) = decoded.body else {
            panic!("wrong body")
        };
        assert_eq!(raw.brand, "BANX");
        assert_eq!(raw.charge_bearer, None);
        assert_eq!(raw.creditor_address, None);
        // v1's CancelPayment branch (index 2) is also read by name.
        let cancel = Value::Record(vec![
            ("command_id".into(), Value::String("c-old2".into())),
            ("payment_id".into(), Value::String("p-old".into())),
            ("psu_id".into(), Value::String("u-old".into())),
            ("issued_at".into(), Value::TimestampMillis(8)),
            (
                "body".into(),
                Value::Union(
                    2,
                    Box::new(Value::Record(vec![("reason".into(), opt_string(None))])),
                ),
            ),
        ]);
        let datum = apache_avro::to_avro_datum(&v1, cancel).expect("v1 datum");
        assert!(matches!(
            decode(&frame(&v1_fingerprint, &datum), 65_536)
                .expect("read")
                .body,
            CommandBody::Cancel { reason: None }
        ));
    }

    fn consent_request() -> RawConsentRequest {
        RawConsentRequest {
            brand: "BANX".into(),
            scope: "CAF".into(),
            account_iban: Some("BE71096123456769".into()),
            language: "nl".into(),
            redirect_uri: "https://c.example/consent".into(),
        }
    }

    #[test]
    fn request_consent_round_trips() {
        for raw in [
            consent_request(),
            RawConsentRequest {
                brand: "BELFIUS".into(),
                scope: "AIS".into(),
                account_iban: None,
                ..consent_request()
            },
        ] {
            let bytes =
                encode(&envelope(CommandBody::RequestConsent(raw.clone()))).expect("encode");
            let decoded = decode(&bytes, 65_536).expect("decode");
            assert_eq!(
                decoded.payment_id, "p-9",
                "the consent id travels in payment_id"
            );
            let CommandBody::RequestConsent(back) = decoded.body else {
                panic!("wrong body: {:?}", decoded.body)
            };
            assert_eq!(back, raw);
        }
    }

    #[test]
    fn complete_consent_round_trips_apart_from_complete_sca() {
        let redirect = ScaRedirect::from_redirect_url(
            &url::Url::parse("https://c.example/consent?code=c0ns3nt&state=st-1").expect("url"),
        );
        let bytes = encode(&envelope(CommandBody::CompleteConsent(redirect))).expect("encode");
        let CommandBody::CompleteConsent(back) = decode(&bytes, 65_536).expect("decode").body
        else {
            panic!("a CompleteConsent must not read as another body of the same shape")
        };
        assert_eq!(
            back.authorization_code.as_ref().map(|c| c.expose_secret()),
            Some("c0ns3nt")
        );
        assert_eq!(back.state.as_deref(), Some("st-1"));
        let refused = ScaRedirect::from_redirect_url(
            &url::Url::parse(
                "https://c.example/consent?error=access_denied&error_description=no&state=st-2",
            )
            .expect("url"),
        );
        let bytes = encode(&envelope(CommandBody::CompleteConsent(refused))).expect("encode");
        let CommandBody::CompleteConsent(back) = decode(&bytes, 65_536).expect("decode").body
        else {
            panic!("wrong body")
        };
        assert!(back.authorization_code.is_none());
        assert_eq!(back.error.as_deref(), Some("access_denied"));
        assert_eq!(back.error_description.as_deref(), Some("no"));
        assert_eq!(back.state.as_deref(), Some("st-2"));
        // CompleteSca, same shape, stays CompleteSca.
        let sca = ScaRedirect::from_redirect_url(
            &url::Url::parse("https://c.example/cb?code=x&state=s").expect("url"),
        );
        let bytes = encode(&envelope(CommandBody::CompleteSca(sca))).expect("encode");
        assert!(matches!(
            decode(&bytes, 65_536).expect("decode").body,
            CommandBody::CompleteSca(_)
        ));
    }

    #[test]
    fn an_unknown_scope_symbol_is_refused_rather_than_rewritten() {
        let raw = RawConsentRequest {
            scope: "PIIS".into(),
            ..consent_request()
        };
        assert!(encode(&envelope(CommandBody::RequestConsent(raw))).is_err());
    }

    /// A newer writer's scope symbol decodes as it is, like an unknown product or brand:
    /// validation refuses it (INVALID_SCOPE), not the decoder.
    #[test]
    fn a_newer_writers_scope_symbol_reaches_validation() {
        let mut json: serde_json::Value =
            serde_json::from_str(crate::contract::COMMAND_SCHEMA_JSON).expect("json");
        let body = json["fields"]
            .as_array_mut()
            .and_then(|f| f.iter_mut().find(|f| f["name"] == "body"))
            .expect("body");
        let request = body["type"]
            .as_array_mut()
            .and_then(|b| b.iter_mut().find(|b| b["name"] == "RequestConsent"))
            .expect("RequestConsent");
        let scope = request["fields"]
            .as_array_mut()
            .and_then(|f| f.iter_mut().find(|f| f["name"] == "scope"))
            .expect("scope");
        scope["type"]["symbols"]
            .as_array_mut()
            .expect("symbols")
            .push("PIIS".into());
        let newer_json = json.to_string();
        crate::contract::accept_writer_schema(&newer_json, "newer scope").expect("readable");
        let newer = apache_avro::Schema::parse_str(&newer_json).expect("schema");
        let value = Value::Record(vec![
            ("command_id".into(), Value::String("c-new".into())),
            ("payment_id".into(), Value::String("consent-1".into())),
            ("psu_id".into(), Value::String("u-1".into())),
            ("issued_at".into(), Value::TimestampMillis(9)),
            (
                "body".into(),
                Value::Union(
                    7,
                    Box::new(Value::Record(vec![
                        ("brand".into(), Value::Enum(0, "BELFIUS".into())),
                        ("scope".into(), Value::Enum(2, "PIIS".into())),
                        ("account_iban".into(), opt_string(None)),
                        ("language".into(), Value::String("fr".into())),
                        (
                            "redirect_uri".into(),
                            Value::String("https://c.example/consent".into()),
                        ),
                    ])),
                ),
            ),
        ]);
        let datum = apache_avro::to_avro_datum(&newer, value).expect("datum");
        let fingerprint = canonical::fingerprint(&newer_json).expect("fingerprint");
        let decoded = decode(&frame(&fingerprint, &datum), 65_536).expect("read");
        let CommandBody::RequestConsent(raw) = decoded.body else {
            panic!("wrong body")
        };
        assert_eq!(raw.scope, "PIIS");
        assert_eq!(
            crate::domain::validation::validate_consent_request(&raw).map_err(|r| r.code),
            Err(crate::domain::reason::ReasonCode::InvalidScope)
        );
    }

    /// A v4 record has no `funds_check`: it reads as `false`.
    #[test]
    fn commands_written_with_schema_v4_read_funds_check_as_false() {
        let (name, v4_json) = COMMAND_SCHEMA_HISTORY[3];
        assert_eq!(name, "PaymentCommand v4");
        let v4 = apache_avro::Schema::parse_str(v4_json).expect("v4 schema");
        let fingerprint = canonical::fingerprint(v4_json).expect("fingerprint");
        let mut raw = single();
        raw.funds_check = true;
        let mut fields = match initiate_value(&raw) {
            Value::Record(fields) => fields,
            other => panic!("not a record: {other:?}"),
        };
        // v4 ends with always_pkce.
        assert_eq!(fields.pop().map(|(n, _)| n).as_deref(), Some("funds_check"));
        let value = Value::Record(vec![
            ("command_id".into(), Value::String("c-v4".into())),
            ("payment_id".into(), Value::String("p-v4".into())),
            ("psu_id".into(), Value::String("u-v4".into())),
            ("issued_at".into(), Value::TimestampMillis(7)),
            (
                "body".into(),
                Value::Union(0, Box::new(Value::Record(fields))),
            ),
        ]);
        let datum = apache_avro::to_avro_datum(&v4, value).expect("v4 datum");
        let CommandBody::Initiate(back) = decode(&frame(&fingerprint, &datum), 65_536)
            .expect("v4 record is read")
            .body
        else {
            panic!("wrong body")
        };
        assert!(back.always_pkce, "the v4 field is read");
        assert!(!back.funds_check, "absent before v5");
    }
}
