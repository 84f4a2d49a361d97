//! Format 2 of the `payment-state` records: the storage types and the sealed envelope.
//!
//! The storage types (`Stored*`) belong to the topic, not to the domain: they mirror
//! `domain::machine::Payment` and everything it contains, with explicit conversions both ways
//! (exhaustive destructuring and matches, so a domain field or variant that is added or renamed
//! does not compile until its conversion says how it is stored). Their serde names are frozen:
//! records written with them live in the topic for as long as compaction keeps them, and the
//! fixtures under `tests/fixtures/state/` must keep decoding. They reproduce the JSON the
//! domain's own serde derive wrote in format 1, so format 1 reads its payment body with them too
//! (`v1`).
//!
//! The envelope (docs/architecture.md, "State record format"), all integers big-endian:
//!
//! ```text
//! "PISR" | 0x02 | n: u8 | key id (n bytes, 1..=32, ASCII) | epoch: i64 | nonce (24) | ciphertext+tag
//! ```
//!
//! sealed with XChaCha20-Poly1305 under the key named by the key id; the associated data is the
//! header up to and including the epoch, then the record key. The plaintext is the JSON of
//! [`Body`].

use chrono::NaiveDate;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::StateRecordError;
use crate::domain::machine::{
    Millis, Payment, PaymentState, StateKind, StatusEvent, Withdrawal, WithdrawalCause,
};
use crate::domain::model::{
    Amount, BankPaymentId, Brand, BulkEntry, BulkOrder, ChargeBearer, CommandId, CrossBorder,
    Frequency, Language, Order, PaymentId, PaymentOrder, PaymentProduct, PostalAddress, PsuId,
    StandingOrder,
};
use crate::domain::reason::{Reason, ReasonCode};
use crate::domain::settlement::{SettlementEvidence, SettlementOutcome};
use crate::secret::{MAX_KEY_ID_LEN, StateKey, StateKeyRing};

pub const MAGIC: &[u8; 4] = b"PISR";
pub const VERSION: u8 = 2;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// A C-like domain enum and its stored twin, with both conversions as exhaustive matches.
/// The stored variant names are frozen; if a domain variant is renamed, this stops compiling:
/// then write the two conversions by hand, keeping the stored name.
macro_rules! stored_enum {
    ($(#[$m:meta])* $stored:ident <=> $domain:ident { $($variant:ident),+ $(,)? }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        $(#[$m])*
        pub enum $stored {
            $($variant),+
        }

        impl $stored {
            /// The variants in declaration order: format 3 stores a variant by its position
            /// (`v3`), so this order is frozen too (new variants go last).
            #[allow(dead_code)]
            pub const VARIANTS: &'static [&'static str] = &[$(stringify!($variant)),+];
        }

        impl From<$domain> for $stored {
            fn from(value: $domain) -> Self {
                match value {
                    $($domain::$variant => $stored::$variant),+
                }
            }
        }

        impl From<$stored> for $domain {
            fn from(value: $stored) -> Self {
                match value {
                    $($stored::$variant => $domain::$variant),+
                }
            }
        }
    };
}

stored_enum!(
    #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
    StoredBrand <=> Brand { Belfius, Banx }
);

stored_enum!(
    #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
    StoredPaymentProduct <=> PaymentProduct {
        SepaCreditTransfers,
        InstantSepaCreditTransfers,
        CrossBorderCreditTransfers,
    }
);

stored_enum!(
    #[serde(rename_all = "lowercase")]
    StoredLanguage <=> Language { Fr, Nl }
);

stored_enum!(StoredChargeBearer <=> ChargeBearer { Debt, Cred, Shar, Slev });

stored_enum!(
    StoredFrequency <=> Frequency {
        Daily,
        Weekly,
        EveryTwoWeeks,
        Monthly,
        EveryTwoMonths,
        Quarterly,
        SemiAnnual,
        Annual,
    }
);

stored_enum!(
    StoredStateKind <=> StateKind {
        Received,
        Initiating,
        ScaPending,
        Authorizing,
        PartiallySigned,
        Signed,
        Settled,
        Cancelled,
        Rejected,
        Expired,
        Failed,
        OutcomeUnknown,
        Active,
        Cancelling,
        PartiallySettled,
        Completed,
    }
);

stored_enum!(
    StoredReasonCode <=> ReasonCode {
        MissingField,
        InvalidIban,
        InvalidBic,
        InvalidAmount,
        AmountTooLarge,
        InvalidCurrency,
        InvalidCharacters,
        FieldTooLong,
        InvalidExecutionDate,
        InvalidLanguage,
        InvalidRedirectUri,
        InvalidProduct,
        InvalidBrand,
        InvalidIdentifier,
        FieldNotAllowed,
        InvalidChargeBearer,
        InvalidFrequency,
        BankRejected,
        BankInputRejected,
        BankAccountRefused,
        BankSecurityFailure,
        BankConsentRevoked,
        BankUnavailable,
        ScaFailed,
        ScaExpired,
        CancelledByClient,
        CancelledAtBank,
        CancelRefused,
        CancelNotConfirmed,
        BulkPartiallyRejected,
        OutcomeUnresolved,
        ExpiryUnconfirmed,
        BankAnswerUnrecognized,
        InsufficientFunds,
        ConsentSuperseded,
        ConsentExpired,
        InvalidScope,
    }
);

/// A secret inside a sealed body (the whole body is sealed). `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StoredSecret(String);

impl std::fmt::Debug for StoredSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoredSecret(..)")
    }
}

impl From<&SecretString> for StoredSecret {
    fn from(secret: &SecretString) -> Self {
        Self(secret.expose_secret().to_owned())
    }
}

impl From<StoredSecret> for SecretString {
    fn from(secret: StoredSecret) -> Self {
        SecretString::from(secret.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredPaymentState {
    Received,
    Initiating { attempt: u32 },
    ScaPending,
    Authorizing,
    PartiallySigned,
    Signed,
    Active,
    Cancelling,
    Settled,
    PartiallySettled,
    Completed,
    Cancelled,
    Rejected,
    Expired,
    Failed,
    OutcomeUnknown { attempt: u32 },
    Unconfirmed,
}

impl From<PaymentState> for StoredPaymentState {
    fn from(state: PaymentState) -> Self {
        match state {
            PaymentState::Received => Self::Received,
            PaymentState::Initiating { attempt } => Self::Initiating { attempt },
            PaymentState::ScaPending => Self::ScaPending,
            PaymentState::Authorizing => Self::Authorizing,
            PaymentState::PartiallySigned => Self::PartiallySigned,
            PaymentState::Signed => Self::Signed,
            PaymentState::Active => Self::Active,
            PaymentState::Cancelling => Self::Cancelling,
            PaymentState::Settled => Self::Settled,
            PaymentState::PartiallySettled => Self::PartiallySettled,
            PaymentState::Completed => Self::Completed,
            PaymentState::Cancelled => Self::Cancelled,
            PaymentState::Rejected => Self::Rejected,
            PaymentState::Expired => Self::Expired,
            PaymentState::Failed => Self::Failed,
            PaymentState::OutcomeUnknown { attempt } => Self::OutcomeUnknown { attempt },
            PaymentState::Unconfirmed => Self::Unconfirmed,
        }
    }
}

impl From<StoredPaymentState> for PaymentState {
    fn from(state: StoredPaymentState) -> Self {
        match state {
            StoredPaymentState::Received => Self::Received,
            StoredPaymentState::Initiating { attempt } => Self::Initiating { attempt },
            StoredPaymentState::ScaPending => Self::ScaPending,
            StoredPaymentState::Authorizing => Self::Authorizing,
            StoredPaymentState::PartiallySigned => Self::PartiallySigned,
            StoredPaymentState::Signed => Self::Signed,
            StoredPaymentState::Active => Self::Active,
            StoredPaymentState::Cancelling => Self::Cancelling,
            StoredPaymentState::Settled => Self::Settled,
            StoredPaymentState::PartiallySettled => Self::PartiallySettled,
            StoredPaymentState::Completed => Self::Completed,
            StoredPaymentState::Cancelled => Self::Cancelled,
            StoredPaymentState::Rejected => Self::Rejected,
            StoredPaymentState::Expired => Self::Expired,
            StoredPaymentState::Failed => Self::Failed,
            StoredPaymentState::OutcomeUnknown { attempt } => Self::OutcomeUnknown { attempt },
            StoredPaymentState::Unconfirmed => Self::Unconfirmed,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredReason {
    pub code: StoredReasonCode,
    pub message: String,
}

impl From<&Reason> for StoredReason {
    fn from(reason: &Reason) -> Self {
        let Reason { code, message } = reason;
        Self {
            code: (*code).into(),
            message: message.clone(),
        }
    }
}

impl From<StoredReason> for Reason {
    fn from(reason: StoredReason) -> Self {
        Reason {
            code: reason.code.into(),
            message: reason.message,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredWithdrawalCause {
    Deadline,
    PsuRefused { message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredWithdrawal {
    pub cause: StoredWithdrawalCause,
    pub since: Millis,
    pub cancel_asked: bool,
}

impl From<&Withdrawal> for StoredWithdrawal {
    fn from(w: &Withdrawal) -> Self {
        let Withdrawal {
            cause,
            since,
            cancel_asked,
        } = w;
        Self {
            cause: match cause {
                WithdrawalCause::Deadline => StoredWithdrawalCause::Deadline,
                WithdrawalCause::PsuRefused { message } => StoredWithdrawalCause::PsuRefused {
                    message: message.clone(),
                },
            },
            since: *since,
            cancel_asked: *cancel_asked,
        }
    }
}

impl From<StoredWithdrawal> for Withdrawal {
    fn from(w: StoredWithdrawal) -> Self {
        Withdrawal {
            cause: match w.cause {
                StoredWithdrawalCause::Deadline => WithdrawalCause::Deadline,
                StoredWithdrawalCause::PsuRefused { message } => {
                    WithdrawalCause::PsuRefused { message }
                }
            },
            since: w.since,
            cancel_asked: w.cancel_asked,
        }
    }
}

/// `v` without spare capacity.
fn exact<T>(mut v: Vec<T>) -> Vec<T> {
    v.shrink_to_fit();
    v
}

/// A stored value that does not make a domain value.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ConversionError {
    pub field: &'static str,
    pub problem: String,
}

/// Dates are stored as ISO `yyyy-mm-dd` text, independent of chrono's serde format.
fn store_date(date: &NaiveDate) -> String {
    date.format("%Y-%m-%d").to_string()
}

fn load_date(field: &'static str, text: &str) -> Result<NaiveDate, ConversionError> {
    NaiveDate::parse_from_str(text, "%Y-%m-%d").map_err(|e| ConversionError {
        field,
        problem: format!("{text:?} is not a yyyy-mm-dd date: {e}"),
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPostalAddress {
    pub street: Option<String>,
    pub building_number: Option<String>,
    pub postal_code: Option<String>,
    pub town: Option<String>,
    pub country: String,
}

impl From<&PostalAddress> for StoredPostalAddress {
    fn from(a: &PostalAddress) -> Self {
        let PostalAddress {
            street,
            building_number,
            postal_code,
            town,
            country,
        } = a;
        Self {
            street: street.clone(),
            building_number: building_number.clone(),
            postal_code: postal_code.clone(),
            town: town.clone(),
            country: country.clone(),
        }
    }
}

impl From<StoredPostalAddress> for PostalAddress {
    fn from(a: StoredPostalAddress) -> Self {
        PostalAddress {
            street: a.street,
            building_number: a.building_number,
            postal_code: a.postal_code,
            town: a.town,
            country: a.country,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCrossBorder {
    pub charge_bearer: StoredChargeBearer,
    pub creditor_address: Option<StoredPostalAddress>,
    pub creditor_bban: Option<String>,
    pub creditor_bank_national_id: Option<String>,
    pub creditor_currency: Option<String>,
}

impl From<&CrossBorder> for StoredCrossBorder {
    fn from(c: &CrossBorder) -> Self {
        let CrossBorder {
            charge_bearer,
            creditor_address,
            creditor_bban,
            creditor_bank_national_id,
            creditor_currency,
        } = c;
        Self {
            charge_bearer: (*charge_bearer).into(),
            creditor_address: creditor_address.as_ref().map(Into::into),
            creditor_bban: creditor_bban.clone(),
            creditor_bank_national_id: creditor_bank_national_id.clone(),
            creditor_currency: creditor_currency.clone(),
        }
    }
}

impl From<StoredCrossBorder> for CrossBorder {
    fn from(c: StoredCrossBorder) -> Self {
        CrossBorder {
            charge_bearer: c.charge_bearer.into(),
            creditor_address: c.creditor_address.map(Into::into),
            creditor_bban: c.creditor_bban,
            creditor_bank_national_id: c.creditor_bank_national_id,
            creditor_currency: c.creditor_currency,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPaymentOrder {
    pub product: StoredPaymentProduct,
    pub brand: StoredBrand,
    /// Minor units.
    pub amount: i64,
    pub currency: String,
    pub creditor_name: String,
    pub creditor_iban: String,
    pub creditor_bic: Option<String>,
    pub debtor_iban: Option<String>,
    pub end_to_end_id: String,
    pub remittance_information: Option<String>,
    pub requested_execution_date: Option<String>,
    pub language: StoredLanguage,
    pub redirect_uri: String,
    #[serde(default)]
    pub cross_border: Option<StoredCrossBorder>,
}

impl From<&PaymentOrder> for StoredPaymentOrder {
    fn from(o: &PaymentOrder) -> Self {
        let PaymentOrder {
            product,
            brand,
            amount,
            currency,
            creditor_name,
            creditor_iban,
            creditor_bic,
            debtor_iban,
            end_to_end_id,
            remittance_information,
            requested_execution_date,
            language,
            redirect_uri,
            cross_border,
        } = o;
        Self {
            product: (*product).into(),
            brand: (*brand).into(),
            amount: amount.minor(),
            currency: currency.clone(),
            creditor_name: creditor_name.clone(),
            creditor_iban: creditor_iban.clone(),
            creditor_bic: creditor_bic.clone(),
            debtor_iban: debtor_iban.clone(),
            end_to_end_id: end_to_end_id.clone(),
            remittance_information: remittance_information.clone(),
            requested_execution_date: requested_execution_date.as_ref().map(store_date),
            language: (*language).into(),
            redirect_uri: redirect_uri.clone(),
            cross_border: cross_border.as_deref().map(Into::into),
        }
    }
}

impl TryFrom<StoredPaymentOrder> for PaymentOrder {
    type Error = ConversionError;
    fn try_from(o: StoredPaymentOrder) -> Result<Self, ConversionError> {
        Ok(PaymentOrder {
            product: o.product.into(),
            brand: o.brand.into(),
            amount: Amount::from_minor(o.amount),
            currency: o.currency,
            creditor_name: o.creditor_name,
            creditor_iban: o.creditor_iban,
            creditor_bic: o.creditor_bic,
            debtor_iban: o.debtor_iban,
            end_to_end_id: o.end_to_end_id,
            remittance_information: o.remittance_information,
            requested_execution_date: o
                .requested_execution_date
                .as_deref()
                .map(|d| load_date("order.requested_execution_date", d))
                .transpose()?,
            language: o.language.into(),
            redirect_uri: o.redirect_uri,
            cross_border: o.cross_border.map(|c| Box::new(c.into())),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredStandingOrder {
    pub order: StoredPaymentOrder,
    pub start_date: String,
    pub end_date: Option<String>,
    pub frequency: StoredFrequency,
    pub day_of_execution: Option<u8>,
}

impl From<&StandingOrder> for StoredStandingOrder {
    fn from(s: &StandingOrder) -> Self {
        let StandingOrder {
            order,
            start_date,
            end_date,
            frequency,
            day_of_execution,
        } = s;
        Self {
            order: order.into(),
            start_date: store_date(start_date),
            end_date: end_date.as_ref().map(store_date),
            frequency: (*frequency).into(),
            day_of_execution: *day_of_execution,
        }
    }
}

impl TryFrom<StoredStandingOrder> for StandingOrder {
    type Error = ConversionError;
    fn try_from(s: StoredStandingOrder) -> Result<Self, ConversionError> {
        Ok(StandingOrder {
            order: s.order.try_into()?,
            start_date: load_date("standing.start_date", &s.start_date)?,
            end_date: s
                .end_date
                .as_deref()
                .map(|d| load_date("standing.end_date", d))
                .transpose()?,
            frequency: s.frequency.into(),
            day_of_execution: s.day_of_execution,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBulkEntry {
    pub amount: i64,
    pub currency: String,
    pub creditor_name: String,
    pub creditor_iban: String,
    pub creditor_bic: Option<String>,
    pub end_to_end_id: String,
    pub remittance_information: Option<String>,
}

impl From<&BulkEntry> for StoredBulkEntry {
    fn from(e: &BulkEntry) -> Self {
        let BulkEntry {
            amount,
            currency,
            creditor_name,
            creditor_iban,
            creditor_bic,
            end_to_end_id,
            remittance_information,
        } = e;
        Self {
            amount: amount.minor(),
            currency: currency.clone(),
            creditor_name: creditor_name.clone(),
            creditor_iban: creditor_iban.clone(),
            creditor_bic: creditor_bic.clone(),
            end_to_end_id: end_to_end_id.clone(),
            remittance_information: remittance_information.clone(),
        }
    }
}

impl From<StoredBulkEntry> for BulkEntry {
    fn from(e: StoredBulkEntry) -> Self {
        BulkEntry {
            amount: Amount::from_minor(e.amount),
            currency: e.currency,
            creditor_name: e.creditor_name,
            creditor_iban: e.creditor_iban,
            creditor_bic: e.creditor_bic,
            end_to_end_id: e.end_to_end_id,
            remittance_information: e.remittance_information,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBulkOrder {
    pub product: StoredPaymentProduct,
    pub brand: StoredBrand,
    pub debtor_iban: Option<String>,
    pub batch_booking: bool,
    pub requested_execution_date: Option<String>,
    pub payments: Vec<StoredBulkEntry>,
    pub language: StoredLanguage,
    pub redirect_uri: String,
}

impl From<&BulkOrder> for StoredBulkOrder {
    fn from(b: &BulkOrder) -> Self {
        let BulkOrder {
            product,
            brand,
            debtor_iban,
            batch_booking,
            requested_execution_date,
            payments,
            language,
            redirect_uri,
        } = b;
        Self {
            product: (*product).into(),
            brand: (*brand).into(),
            debtor_iban: debtor_iban.clone(),
            batch_booking: *batch_booking,
            requested_execution_date: requested_execution_date.as_ref().map(store_date),
            payments: payments.iter().map(Into::into).collect(),
            language: (*language).into(),
            redirect_uri: redirect_uri.clone(),
        }
    }
}

impl TryFrom<StoredBulkOrder> for BulkOrder {
    type Error = ConversionError;
    fn try_from(b: StoredBulkOrder) -> Result<Self, ConversionError> {
        Ok(BulkOrder {
            product: b.product.into(),
            brand: b.brand.into(),
            debtor_iban: b.debtor_iban,
            batch_booking: b.batch_booking,
            requested_execution_date: b
                .requested_execution_date
                .as_deref()
                .map(|d| load_date("bulk.requested_execution_date", d))
                .transpose()?,
            payments: b.payments.into_iter().map(Into::into).collect(),
            language: b.language.into(),
            redirect_uri: b.redirect_uri,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredOrder {
    Single(StoredPaymentOrder),
    Standing(StoredStandingOrder),
    Bulk(StoredBulkOrder),
}

impl From<&Order> for StoredOrder {
    fn from(o: &Order) -> Self {
        match o {
            Order::Single(o) => StoredOrder::Single(o.into()),
            Order::Standing(s) => StoredOrder::Standing(s.into()),
            Order::Bulk(b) => StoredOrder::Bulk(b.into()),
        }
    }
}

impl TryFrom<StoredOrder> for Order {
    type Error = ConversionError;
    fn try_from(o: StoredOrder) -> Result<Self, ConversionError> {
        Ok(match o {
            StoredOrder::Single(o) => Order::Single(o.try_into()?),
            StoredOrder::Standing(s) => Order::Standing(s.try_into()?),
            StoredOrder::Bulk(b) => Order::Bulk(b.try_into()?),
        })
    }
}

/// A payment as stored. Format 1 wrote the same JSON without the two secrets (sealed apart).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredPayment {
    pub payment_id: String,
    pub psu_id: String,
    pub order: Option<StoredOrder>,
    pub state: StoredPaymentState,
    pub sequence: u64,
    pub last_published: Option<StoredStateKind>,
    pub initiation_attempts: u32,
    pub bank_payment_id: Option<String>,
    pub bank_status: Option<String>,
    pub sca_redirect_url: Option<String>,
    // Always written (format 3 is positional); format 1 had no such key, hence `default`.
    #[serde(default)]
    pub pkce_verifier: Option<StoredSecret>,
    #[serde(default)]
    pub authorization_code: Option<StoredSecret>,
    pub received_at: Millis,
    pub updated_at: Millis,
    pub sca_deadline: Option<Millis>,
    pub next_check_at: Option<Millis>,
    pub polls_in_state: u32,
    pub seen_commands: Vec<String>,
    pub reason: Option<StoredReason>,
    #[serde(default)]
    pub resume_after_cancel: Option<StoredPaymentState>,
    #[serde(default)]
    pub sca_state: Option<String>,
    #[serde(default)]
    pub received_codes: Vec<String>,
    #[serde(default)]
    pub withdrawal: Option<StoredWithdrawal>,
    #[serde(default)]
    pub last_command_offset: Option<i64>,
}

impl From<&Payment> for StoredPayment {
    fn from(p: &Payment) -> Self {
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
            // Not a field of `StoredPayment` (format 3 froze its layout): `StoredPaymentExt`.
            always_pkce: _,
        } = p;
        Self {
            payment_id: payment_id.as_str().to_owned(),
            psu_id: psu_id.as_str().to_owned(),
            order: order.as_ref().map(Into::into),
            state: (*state).into(),
            sequence: *sequence,
            last_published: last_published.map(Into::into),
            initiation_attempts: *initiation_attempts,
            bank_payment_id: bank_payment_id.as_ref().map(|b| b.as_str().to_owned()),
            bank_status: bank_status.clone(),
            sca_redirect_url: sca_redirect_url.clone(),
            pkce_verifier: pkce_verifier.as_ref().map(Into::into),
            authorization_code: authorization_code.as_ref().map(Into::into),
            received_at: *received_at,
            updated_at: *updated_at,
            sca_deadline: *sca_deadline,
            next_check_at: *next_check_at,
            polls_in_state: *polls_in_state,
            seen_commands: seen_commands
                .iter()
                .map(|c| c.as_str().to_owned())
                .collect(),
            reason: reason.as_ref().map(Into::into),
            resume_after_cancel: resume_after_cancel.map(Into::into),
            sca_state: sca_state.clone(),
            received_codes: received_codes.clone(),
            withdrawal: withdrawal.as_ref().map(Into::into),
            last_command_offset: *last_command_offset,
        }
    }
}

impl TryFrom<StoredPayment> for Payment {
    type Error = ConversionError;
    fn try_from(p: StoredPayment) -> Result<Self, ConversionError> {
        Ok(Payment {
            payment_id: PaymentId::new(p.payment_id),
            psu_id: PsuId::new(p.psu_id),
            order: p.order.map(TryInto::try_into).transpose()?,
            state: p.state.into(),
            sequence: p.sequence,
            last_published: p.last_published.map(Into::into),
            initiation_attempts: p.initiation_attempts,
            bank_payment_id: p.bank_payment_id.map(BankPaymentId::new),
            bank_status: p.bank_status,
            sca_redirect_url: p.sca_redirect_url,
            pkce_verifier: p.pkce_verifier.map(Into::into),
            authorization_code: p.authorization_code.map(Into::into),
            received_at: p.received_at,
            updated_at: p.updated_at,
            sca_deadline: p.sca_deadline,
            next_check_at: p.next_check_at,
            polls_in_state: p.polls_in_state,
            // Read straight from JSON, a vector grows by doubling (no length hint): trimmed,
            // since a restored payment keeps it.
            seen_commands: exact(p.seen_commands.into_iter().map(CommandId::new).collect()),
            reason: p.reason.map(Into::into),
            resume_after_cancel: p.resume_after_cancel.map(Into::into),
            sca_state: p.sca_state,
            received_codes: exact(p.received_codes),
            withdrawal: p.withdrawal.map(Into::into),
            last_command_offset: p.last_command_offset,
            // A `Body::Payment` record carries the additions' defaults (`StoredPaymentExt`).
            always_pkce: false,
        })
    }
}

/// Additions to a payment record that `StoredPayment` cannot take: format 3 stores its fields
/// by position and old readers know only those. A record carries them (`Body::PaymentExt`)
/// only when one differs from its default, so every other payment record keeps the layout a
/// reader of the previous release reads. Fields are positional too: append, never reorder.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPaymentExt {
    pub always_pkce: bool,
}

impl StoredPaymentExt {
    fn of(p: &Payment) -> Self {
        Self {
            always_pkce: p.always_pkce,
        }
    }

    /// Sets the additions on a payment read from its `StoredPayment`.
    pub fn apply(self, p: &mut Payment) {
        let StoredPaymentExt { always_pkce } = self;
        p.always_pkce = always_pkce;
    }
}

/// The body of a payment record: `Payment`, or `PaymentExt` when an addition differs from its
/// default.
pub fn payment_body(p: &Payment, events: &[StatusEvent]) -> Body {
    let payment = Box::new(StoredPayment::from(p));
    let stored_events = events.iter().map(Into::into).collect();
    let ext = StoredPaymentExt::of(p);
    // Evidence rides with its record, so that a re-publication after a restart carries it.
    if let Some(settlement) = events.iter().find_map(|e| e.settlement.as_ref()) {
        return Body::PaymentSettled {
            payment,
            events: stored_events,
            ext,
            settlement: settlement.into(),
        };
    }
    let events = stored_events;
    if ext == StoredPaymentExt::default() {
        Body::Payment { payment, events }
    } else {
        Body::PaymentExt {
            payment,
            events,
            ext,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredStatusEvent {
    pub payment_id: String,
    pub psu_id: String,
    pub sequence: u64,
    pub state: StoredStateKind,
    pub bank_status: Option<String>,
    pub bank_payment_id: Option<String>,
    pub sca_redirect_url: Option<String>,
    pub reason: Option<StoredReason>,
    pub causation_id: String,
    pub occurred_at: Millis,
}

impl From<&StatusEvent> for StoredStatusEvent {
    fn from(e: &StatusEvent) -> Self {
        let StatusEvent {
            payment_id,
            psu_id,
            sequence,
            state,
            bank_status,
            bank_payment_id,
            sca_redirect_url,
            reason,
            causation_id,
            occurred_at,
            // Not stored: the stored format is unchanged, and nothing fills it yet.
            settlement: _,
        } = e;
        Self {
            payment_id: payment_id.as_str().to_owned(),
            psu_id: psu_id.as_str().to_owned(),
            sequence: *sequence,
            state: (*state).into(),
            bank_status: bank_status.clone(),
            bank_payment_id: bank_payment_id.as_ref().map(|b| b.as_str().to_owned()),
            sca_redirect_url: sca_redirect_url.clone(),
            reason: reason.as_ref().map(Into::into),
            causation_id: causation_id.clone(),
            occurred_at: *occurred_at,
        }
    }
}

impl From<StoredStatusEvent> for StatusEvent {
    fn from(e: StoredStatusEvent) -> Self {
        StatusEvent {
            payment_id: PaymentId::new(e.payment_id),
            psu_id: PsuId::new(e.psu_id),
            sequence: e.sequence,
            state: e.state.into(),
            bank_status: e.bank_status,
            bank_payment_id: e.bank_payment_id.map(BankPaymentId::new),
            sca_redirect_url: e.sca_redirect_url,
            reason: e.reason.map(Into::into),
            causation_id: e.causation_id,
            occurred_at: e.occurred_at,
            settlement: None,
        }
    }
}

/// A PSU's token pair as stored (inside the sealed body).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredPsuTokens {
    pub psu_id: String,
    pub brand: StoredBrand,
    pub access_token: StoredSecret,
    pub refresh_token: Option<StoredSecret>,
    pub expires_at: Option<Millis>,
    pub updated_at: Millis,
}

impl From<&super::PsuTokens> for StoredPsuTokens {
    fn from(t: &super::PsuTokens) -> Self {
        let super::PsuTokens {
            psu_id,
            brand,
            access_token,
            refresh_token,
            expires_at,
            updated_at,
        } = t;
        Self {
            psu_id: psu_id.as_str().to_owned(),
            brand: (*brand).into(),
            access_token: access_token.into(),
            refresh_token: refresh_token.as_ref().map(Into::into),
            expires_at: *expires_at,
            updated_at: *updated_at,
        }
    }
}

impl From<StoredPsuTokens> for super::PsuTokens {
    fn from(t: StoredPsuTokens) -> Self {
        super::PsuTokens {
            psu_id: PsuId::new(t.psu_id),
            brand: t.brand.into(),
            access_token: t.access_token.into(),
            refresh_token: t.refresh_token.map(Into::into),
            expires_at: t.expires_at,
            updated_at: t.updated_at,
        }
    }
}

/// A retired payment as stored (`kafka::state::Retired`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRetired {
    pub payment_id: String,
    pub psu_id: String,
    pub final_state: StoredStateKind,
    pub last_sequence: u64,
    pub last_command_offset: Option<i64>,
    pub final_at: Millis,
    pub retired_at: Millis,
}

impl From<&super::Retired> for StoredRetired {
    fn from(r: &super::Retired) -> Self {
        let super::Retired {
            payment_id,
            psu_id,
            final_state,
            last_sequence,
            last_command_offset,
            final_at,
            retired_at,
        } = r;
        Self {
            payment_id: payment_id.as_str().to_owned(),
            psu_id: psu_id.as_str().to_owned(),
            final_state: (*final_state).into(),
            last_sequence: *last_sequence,
            last_command_offset: *last_command_offset,
            final_at: *final_at,
            retired_at: *retired_at,
        }
    }
}

impl From<StoredRetired> for super::Retired {
    fn from(r: StoredRetired) -> Self {
        let StoredRetired {
            payment_id,
            psu_id,
            final_state,
            last_sequence,
            last_command_offset,
            final_at,
            retired_at,
        } = r;
        super::Retired {
            payment_id: PaymentId::new(payment_id),
            psu_id: PsuId::new(psu_id),
            final_state: final_state.into(),
            last_sequence,
            last_command_offset,
            final_at,
            retired_at,
        }
    }
}

/// The plaintext of a sealed record.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Body {
    Payment {
        payment: Box<StoredPayment>,
        events: Vec<StoredStatusEvent>,
    },
    Psu(StoredPsuTokens),
    OutboxCheckpoint {
        published_through: i64,
    },
    /// A final payment past the retention horizon, under its `payment/{id}` key.
    Retired(StoredRetired),
    /// The start of a snapshot of the owner's live entities (`snapshot/{partition}`): its
    /// offset is where the next restore may start once the snapshot is complete.
    SnapshotBegin {
        at: i64,
    },
    /// The end of that snapshot: every live entity was re-written between `begin` and here.
    SnapshotEnd {
        begin: i64,
        entities: u64,
    },
    /// A record that could not be read, carried into a snapshot as it was (hex of its value,
    /// its `pis.epoch` header, its offset) under its own key: a restore tries it again and
    /// quarantines it again if it still does not decode.
    QuarantinedCopy {
        offset: i64,
        epoch_header: Option<i64>,
        value_hex: String,
    },
    /// A payment with additions (`StoredPaymentExt`) that differ from their defaults.
    PaymentExt {
        payment: Box<StoredPayment>,
        events: Vec<StoredStatusEvent>,
        ext: StoredPaymentExt,
    },
    /// A consent and its scope's token pair (`consent/{brand}/{scope}/{psu}`).
    Consent(Box<super::consent::StoredConsent>),
    /// A payment whose `SETTLED` event carries settlement evidence (the debtor's history).
    PaymentSettled {
        payment: Box<StoredPayment>,
        events: Vec<StoredStatusEvent>,
        ext: StoredPaymentExt,
        settlement: StoredSettlement,
    },
}

/// Settlement evidence as stored (`domain::settlement::SettlementEvidence`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSettlement {
    pub outcome: StoredSettlementOutcome,
    pub transaction_refs: Vec<String>,
    /// ISO date.
    pub booking_date: Option<String>,
    pub checked_at: Millis,
}

stored_enum!(
    StoredSettlementOutcome <=> SettlementOutcome {
        Booked,
        NotBooked,
        Ambiguous,
        Duplicated,
    }
);

impl From<&SettlementEvidence> for StoredSettlement {
    fn from(e: &SettlementEvidence) -> Self {
        Self {
            outcome: e.outcome.into(),
            transaction_refs: e.transaction_refs.clone(),
            booking_date: e.booking_date.map(|d| d.format("%Y-%m-%d").to_string()),
            checked_at: e.checked_at,
        }
    }
}

impl From<StoredSettlement> for SettlementEvidence {
    fn from(e: StoredSettlement) -> Self {
        Self {
            outcome: e.outcome.into(),
            transaction_refs: e.transaction_refs,
            booking_date: e
                .booking_date
                .and_then(|d| chrono::NaiveDate::parse_from_str(&d, "%Y-%m-%d").ok()),
            checked_at: e.checked_at,
        }
    }
}

/// Reads the plaintext of a sealed record: the same [`Body`] (or the same error) as
/// `serde_json::from_slice::<Body>`, faster for the common case.
///
/// `Body` is internally tagged, and serde reads an internally tagged enum by first buffering
/// the whole object into an intermediate tree (every string copied) to find the tag, then
/// reading the variant from that tree: half the cost of decoding a payment record. Written
/// bodies always carry the tag first (serde writes it first), so a payment body is read
/// straight from the bytes when its first key is `"type": "payment"`. Anything else (another
/// variant, the tag later, a duplicate tag or field, malformed JSON) falls back to the derived
/// reader, which then gives the answer, so what is accepted, and every error message, is
/// unchanged: the fast reader only ever succeeds on bodies the derived one reads alike
/// (`tests::the_fast_body_reader_agrees_with_the_derived_one`).
pub fn read_body(plain: &[u8]) -> Result<Body, serde_json::Error> {
    match serde_json::from_slice::<FastPaymentBody>(plain) {
        Ok(FastPaymentBody(body)) => Ok(body),
        Err(_) => serde_json::from_slice(plain),
    }
}

/// A payment body with its tag first, read without buffering (see [`read_body`]).
struct FastPaymentBody(Body);

/// The keys of a payment body.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum PaymentBodyField {
    Type,
    Payment,
    Events,
    #[serde(other)]
    Other,
}

/// The only tag the fast reader takes.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum PaymentTag {
    Payment,
}

impl<'de> Deserialize<'de> for FastPaymentBody {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(FastPaymentVisitor)
    }
}

struct FastPaymentVisitor;

impl<'de> serde::de::Visitor<'de> for FastPaymentVisitor {
    type Value = FastPaymentBody;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a payment body with its tag first")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        use serde::de::Error as _;
        match map.next_key::<PaymentBodyField>()? {
            Some(PaymentBodyField::Type) => {}
            Some(
                PaymentBodyField::Payment | PaymentBodyField::Events | PaymentBodyField::Other,
            )
            | None => return Err(A::Error::custom("the tag is not the first key")),
        }
        let PaymentTag::Payment = map.next_value::<PaymentTag>()?;
        let mut payment: Option<Box<StoredPayment>> = None;
        let mut events: Option<Vec<StoredStatusEvent>> = None;
        while let Some(field) = map.next_key::<PaymentBodyField>()? {
            match field {
                PaymentBodyField::Type => return Err(A::Error::duplicate_field("type")),
                PaymentBodyField::Payment => {
                    if payment.is_some() {
                        return Err(A::Error::duplicate_field("payment"));
                    }
                    payment = Some(map.next_value()?);
                }
                PaymentBodyField::Events => {
                    if events.is_some() {
                        return Err(A::Error::duplicate_field("events"));
                    }
                    events = Some(map.next_value()?);
                }
                PaymentBodyField::Other => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        let payment = payment.ok_or_else(|| A::Error::missing_field("payment"))?;
        let events = events.ok_or_else(|| A::Error::missing_field("events"))?;
        Ok(FastPaymentBody(Body::Payment { payment, events }))
    }
}

/// The clear header of a sealed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header<'a> {
    /// The format: 2 (a JSON body) or 3 (a binary body, `v3`); the rest of the envelope is
    /// the same in both.
    pub version: u8,
    pub key_id: &'a str,
    pub epoch: i64,
    pub nonce: [u8; NONCE_LEN],
}

/// The associated data: the header up to the epoch, then the record key.
fn associated_data(version: u8, key_id: &str, epoch: i64, record_key: &str) -> Vec<u8> {
    let mut aad = header_prefix(version, key_id, epoch);
    aad.extend_from_slice(record_key.as_bytes());
    aad
}

fn header_prefix(version: u8, key_id: &str, epoch: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + key_id.len() + 8 + NONCE_LEN);
    out.extend_from_slice(MAGIC);
    out.push(version);
    // Key ids are at most 32 bytes (`KeyId::parse`).
    out.push(u8::try_from(key_id.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(key_id.as_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out
}

/// Seals `body` as format 2 (JSON) for `record_key` and `epoch` with the ring's current key.
pub fn seal(
    ring: &StateKeyRing,
    record_key: &str,
    epoch: i64,
    body: &Body,
) -> Result<Vec<u8>, StateRecordError> {
    let plain = serde_json::to_vec(body).map_err(|e| StateRecordError::Encode(e.to_string()))?;
    seal_plain(ring, record_key, epoch, VERSION, &plain)
}

/// Seals a body already encoded in format `version` (the envelope is the same in 2 and 3).
pub(crate) fn seal_plain(
    ring: &StateKeyRing,
    record_key: &str,
    epoch: i64,
    version: u8,
    plain: &[u8],
) -> Result<Vec<u8>, StateRecordError> {
    let key: &StateKey = ring.current();
    let key_id = key.id().as_str();
    let (nonce, ciphertext) = key
        .seal_x(plain, &associated_data(version, key_id, epoch, record_key))
        .map_err(|e| StateRecordError::Encode(e.to_string()))?;
    let mut out = header_prefix(version, key_id, epoch);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ciphertext);
    Ok(out)
}

/// Whether a value is a sealed envelope, format 2 or 3 (by its magic).
pub fn is_envelope(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// Splits an envelope into its clear header and its ciphertext, without opening it.
pub fn parse_header(bytes: &[u8]) -> Result<(Header<'_>, &[u8]), StateRecordError> {
    let malformed = |what: &str| StateRecordError::Malformed(format!("sealed record: {what}"));
    let rest = bytes
        .strip_prefix(MAGIC)
        .ok_or_else(|| malformed("no magic"))?;
    let (&version, rest) = rest.split_first().ok_or_else(|| malformed("truncated"))?;
    if version != VERSION && version != super::v3::VERSION {
        return Err(StateRecordError::UnknownVersion(version));
    }
    let (&id_len, rest) = rest.split_first().ok_or_else(|| malformed("truncated"))?;
    let id_len = usize::from(id_len);
    if id_len == 0 || id_len > MAX_KEY_ID_LEN || rest.len() < id_len + 8 + NONCE_LEN + TAG_LEN {
        return Err(malformed("truncated or bad key id length"));
    }
    let (id, rest) = rest.split_at(id_len);
    let key_id = std::str::from_utf8(id).map_err(|_| malformed("key id is not text"))?;
    let (epoch, rest) = rest.split_at(8);
    let mut epoch_bytes = [0u8; 8];
    epoch_bytes.copy_from_slice(epoch);
    let (nonce_bytes, ciphertext) = rest.split_at(NONCE_LEN);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(nonce_bytes);
    Ok((
        Header {
            version,
            key_id,
            epoch: i64::from_be_bytes(epoch_bytes),
            nonce,
        },
        ciphertext,
    ))
}

/// Opens an envelope of format 2 or 3: the key named in it must be in the ring, the record key
/// and the epoch must be those it was sealed for, and the sealed epoch must equal the
/// `pis.epoch` header if any. Returns the body (a format 3 body converted to this module's
/// [`Body`]), the epoch and the key id.
pub fn open(
    ring: &StateKeyRing,
    record_key: &str,
    bytes: &[u8],
    epoch_header: Option<i64>,
) -> Result<(Body, i64, String), StateRecordError> {
    let opened = open_plain(ring, record_key, bytes, epoch_header)?;
    let body = if opened.version == super::v3::VERSION {
        super::v3::read_body(&opened.plain)?
    } else {
        read_body(&opened.plain).map_err(|e| {
            StateRecordError::Body(format!("sealed body: {}", super::json_error(&e)))
        })?
    };
    Ok((body, opened.epoch, opened.key_id.to_owned()))
}

/// An envelope opened up to its plaintext.
pub(crate) struct Opened<'b> {
    /// The body as sealed: JSON in format 2, binary in format 3.
    pub plain: Vec<u8>,
    pub version: u8,
    pub epoch: i64,
    pub key_id: &'b str,
}

/// [`open`] up to the plaintext.
pub(crate) fn open_plain<'b>(
    ring: &StateKeyRing,
    record_key: &str,
    bytes: &'b [u8],
    epoch_header: Option<i64>,
) -> Result<Opened<'b>, StateRecordError> {
    let (header, ciphertext) = parse_header(bytes)?;
    let key = ring
        .get(header.key_id)
        .ok_or_else(|| StateRecordError::UnknownKey(header.key_id.to_owned()))?;
    let plain = key
        .open_x(
            &header.nonce,
            ciphertext,
            &associated_data(header.version, header.key_id, header.epoch, record_key),
        )
        .map_err(|_| StateRecordError::Unauthentic {
            key_id: header.key_id.to_owned(),
        })?;
    if let Some(header_epoch) = epoch_header {
        if header_epoch != header.epoch {
            return Err(StateRecordError::EpochMismatch {
                sealed: header.epoch,
                header: header_epoch,
            });
        }
    }
    Ok(Opened {
        plain,
        version: header.version,
        epoch: header.epoch,
        key_id: header.key_id,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The fast reader and the derived one give the same body, or both an error (the same).
    pub(crate) fn assert_readers_agree(plain: &[u8]) {
        let fast = read_body(plain);
        let derived = serde_json::from_slice::<Body>(plain);
        let text = String::from_utf8_lossy(plain);
        match (fast, derived) {
            (Ok(fast), Ok(derived)) => assert_eq!(
                serde_json::to_value(&fast).expect("json"),
                serde_json::to_value(&derived).expect("json"),
                "{text}"
            ),
            (Err(fast), Err(derived)) => assert_eq!(fast.to_string(), derived.to_string()),
            (fast, derived) => panic!("{text}: fast {fast:?}, derived {derived:?}"),
        }
    }

    const PAYMENT: &str = r#"{"payment_id":"p-1","psu_id":"psu-1","order":{"Single":{"product":"SEPA_CREDIT_TRANSFERS","brand":"BELFIUS","amount":12345,"currency":"EUR","creditor_name":"Bakkerij \u00e9\"P\"","creditor_iban":"BE68539007547034","creditor_bic":null,"debtor_iban":null,"end_to_end_id":"e2e","remittance_information":"Invoice","requested_execution_date":"2026-11-25","language":"fr","redirect_uri":"https://c.example/cb"}},"state":{"Initiating":{"attempt":2}},"sequence":3,"last_published":"ScaPending","initiation_attempts":1,"bank_payment_id":"b-1","bank_status":"RCVD","sca_redirect_url":"https://sca.example/x","pkce_verifier":"vvvv","received_at":1,"updated_at":2,"sca_deadline":3,"next_check_at":null,"polls_in_state":0,"seen_commands":["cmd-1","cmd-2"],"reason":null,"sca_state":"s","received_codes":[],"withdrawal":{"cause":{"PsuRefused":{"message":"no"}},"since":4,"cancel_asked":true},"last_command_offset":7}"#;
    const EVENTS: &str = r#"[{"payment_id":"p-1","psu_id":"psu-1","sequence":3,"state":"ScaPending","bank_status":"RCVD","bank_payment_id":"b-1","sca_redirect_url":"https://sca.example/x","reason":{"code":"ScaFailed","message":"m"},"causation_id":"cmd-1","occurred_at":5}]"#;

    #[test]
    fn the_fast_body_reader_agrees_with_the_derived_one() {
        let p = PAYMENT;
        let e = EVENTS;
        let cases = [
            // As written: the tag first.
            format!(r#"{{"type":"payment","payment":{p},"events":{e}}}"#),
            format!(r#"{{"type":"payment","events":[],"payment":{p}}}"#),
            format!("{{ \"type\" :\n \"payment\" , \"payment\": {p}, \"events\": {e} }}\n"),
            // Unknown keys are ignored by both.
            format!(r#"{{"type":"payment","payment":{p},"x":{{"y":[1,"z",null]}},"events":{e}}}"#),
            // The tag elsewhere, or not a payment: the derived reader answers.
            format!(r#"{{"payment":{p},"events":{e},"type":"payment"}}"#),
            format!(r#"{{"events":{e},"type":"payment","payment":{p}}}"#),
            r#"{"type":"outbox_checkpoint","published_through":42}"#.to_owned(),
            r#"{"published_through":42,"type":"outbox_checkpoint"}"#.to_owned(),
            r#"{"type":"retired","payment_id":"p","psu_id":"u","final_state":"Settled","last_sequence":4,"last_command_offset":null,"final_at":1,"retired_at":2}"#.to_owned(),
            r#"{"type":"psu","psu_id":"u","brand":"BANX","access_token":"a","refresh_token":null,"expires_at":null,"updated_at":1}"#.to_owned(),
            // Errors: both refuse, with the same message.
            format!(r#"{{"type":"payment","type":"payment","payment":{p},"events":{e}}}"#),
            format!(r#"{{"type":"payment","payment":{p},"events":{e},"type":"psu"}}"#),
            format!(r#"{{"type":"payment","payment":{p},"payment":{p},"events":{e}}}"#),
            format!(r#"{{"type":"payment","payment":{p},"events":{e},"events":[]}}"#),
            format!(r#"{{"type":"payment","payment":{p}}}"#),
            format!(r#"{{"type":"payment","events":{e}}}"#),
            format!(r#"{{"type":"payment","payment":{p},"events":{e}}} trailing"#),
            format!(r#"{{"type":"payment","payment":{p},"events":{e}"#),
            format!(r#"{{"type":"paymentx","payment":{p},"events":{e}}}"#),
            format!(r#"{{"type":0,"payment":{p},"events":{e}}}"#),
            format!(r#"{{"type":null,"payment":{p},"events":{e}}}"#),
            format!(r#"{{"type":"payment","payment":null,"events":{e}}}"#),
            format!(r#"{{"type":"payment","payment":{p},"events":{{}}}}"#),
            r#"{"type":"payment","payment":{"payment_id":"p"},"events":[]}"#.to_owned(),
            r#"["payment",{}]"#.to_owned(),
            r#"{}"#.to_owned(),
            r#""payment""#.to_owned(),
            String::new(),
        ];
        for case in &cases {
            assert_readers_agree(case.as_bytes());
        }
        // And every body this module writes reads back through the fast reader.
        let body: Body = serde_json::from_str(&cases[0]).expect("body");
        let written = serde_json::to_vec(&body).expect("json");
        assert!(serde_json::from_slice::<FastPaymentBody>(&written).is_ok());
        assert_readers_agree(&written);
    }
}
