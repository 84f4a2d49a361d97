//! Value types of the payment domain. Pure data: no I/O, no clocks.

use std::fmt;

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps an identifier that has already been validated at the edge.
            pub fn new(value: impl Into<String>) -> Self {
                Self(value.into())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// The client's identifier of a payment; unique across the whole system.
    PaymentId
);
id_type!(
    /// The payment service user (the bank customer); the Kafka key of commands.
    PsuId
);
id_type!(
    /// Identifier of one command; re-delivered commands are recognised by it.
    CommandId
);
id_type!(
    /// The client's identifier of a consent (AIS or CAF); rules as for a payment id.
    ConsentId
);
id_type!(
    /// The identifier Belfius gives a payment at initiation.
    BankPaymentId
);

/// Belfius runs two brands on separate hosts; an account must be addressed on its own brand's host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Brand {
    Belfius,
    Banx,
}

impl Brand {
    pub const ALL: [Brand; 2] = [Brand::Belfius, Brand::Banx];

    pub fn as_str(self) -> &'static str {
        match self {
            Brand::Belfius => "BELFIUS",
            Brand::Banx => "BANX",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.as_str() == text)
    }
}

/// The `{payment-product}` path segment of the Belfius PIS API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PaymentProduct {
    SepaCreditTransfers,
    InstantSepaCreditTransfers,
    CrossBorderCreditTransfers,
}

impl PaymentProduct {
    pub const ALL: [PaymentProduct; 3] = [
        PaymentProduct::SepaCreditTransfers,
        PaymentProduct::InstantSepaCreditTransfers,
        PaymentProduct::CrossBorderCreditTransfers,
    ];

    pub fn path_segment(self) -> &'static str {
        match self {
            PaymentProduct::SepaCreditTransfers => "sepa-credit-transfers",
            PaymentProduct::InstantSepaCreditTransfers => "instant-sepa-credit-transfers",
            PaymentProduct::CrossBorderCreditTransfers => "cross-border-credit-transfers",
        }
    }

    pub fn from_path_segment(segment: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.path_segment() == segment)
    }

    /// The Avro enum symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            PaymentProduct::SepaCreditTransfers => "SEPA_CREDIT_TRANSFERS",
            PaymentProduct::InstantSepaCreditTransfers => "INSTANT_SEPA_CREDIT_TRANSFERS",
            PaymentProduct::CrossBorderCreditTransfers => "CROSS_BORDER_CREDIT_TRANSFERS",
        }
    }

    pub fn from_symbol(symbol: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.symbol() == symbol)
    }

    /// SEPA products move euros only.
    pub fn is_sepa(self) -> bool {
        match self {
            PaymentProduct::SepaCreditTransfers | PaymentProduct::InstantSepaCreditTransfers => {
                true
            }
            PaymentProduct::CrossBorderCreditTransfers => false,
        }
    }
}

/// The three families of PIS resources, each under its own path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PaymentKind {
    Single,
    Periodic,
    Bulk,
}

impl PaymentKind {
    /// First path segment: `/payments`, `/periodic-payments`, `/bulk-payments` (the last two
    /// are Berlin Group style: open question, docs/belfius-facts.md §10.1).
    pub fn path_prefix(self) -> &'static str {
        match self {
            PaymentKind::Single => "payments",
            PaymentKind::Periodic => "periodic-payments",
            PaymentKind::Bulk => "bulk-payments",
        }
    }
}

/// Belfius redirection screens exist in French and Dutch only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Fr,
    Nl,
}

impl Language {
    pub fn as_str(self) -> &'static str {
        match self {
            Language::Fr => "fr",
            Language::Nl => "nl",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value.to_ascii_lowercase().as_str() {
            "fr" => Some(Language::Fr),
            "nl" => Some(Language::Nl),
            _ => None,
        }
    }
}

/// An amount in minor units (cents). Payments carry at most two decimals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Amount(i64);

impl Amount {
    pub fn from_minor(minor: i64) -> Self {
        Self(minor)
    }

    pub fn minor(self) -> i64 {
        self.0
    }

    /// Parses a plain decimal string such as `12`, `12.3` or `12.34`.
    /// No sign, no exponent, no thousands separator, at most 2 decimals.
    pub fn parse(text: &str) -> Result<Self, AmountError> {
        let (int_part, frac_part) = match text.split_once('.') {
            Some((i, f)) => (i, f),
            None => (text, ""),
        };
        if int_part.is_empty() || !int_part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AmountError::Syntax);
        }
        if text.contains('.') && frac_part.is_empty() {
            return Err(AmountError::Syntax);
        }
        if !frac_part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AmountError::Syntax);
        }
        if frac_part.len() > 2 {
            return Err(AmountError::TooManyDecimals);
        }
        // 15 integer digits keeps any value far inside i64 once scaled to cents.
        if int_part.trim_start_matches('0').len() > 15 {
            return Err(AmountError::TooLarge);
        }
        let units: i64 = int_part.parse().map_err(|_| AmountError::Syntax)?;
        let cents: i64 = match frac_part.len() {
            0 => 0,
            1 => frac_part.parse::<i64>().map_err(|_| AmountError::Syntax)? * 10,
            _ => frac_part.parse::<i64>().map_err(|_| AmountError::Syntax)?,
        };
        Ok(Self(units * 100 + cents))
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("amount must be a plain decimal number such as 12.34")]
    Syntax,
    #[error("amount has more than 2 decimals")]
    TooManyDecimals,
    #[error("amount is too large")]
    TooLarge,
}

/// Who pays the charges of a cross-border transfer (ISO 20022 ChargeBearerType1Code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChargeBearer {
    /// All charges borne by the debtor (OUR).
    Debt,
    /// All charges borne by the creditor (BEN).
    Cred,
    /// Shared (SHA).
    Shar,
    /// Following the service level (SEPA).
    Slev,
}

impl ChargeBearer {
    pub const ALL: [ChargeBearer; 4] = [
        ChargeBearer::Debt,
        ChargeBearer::Cred,
        ChargeBearer::Shar,
        ChargeBearer::Slev,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ChargeBearer::Debt => "DEBT",
            ChargeBearer::Cred => "CRED",
            ChargeBearer::Shar => "SHAR",
            ChargeBearer::Slev => "SLEV",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == text)
    }
}

/// A creditor's postal address (cross-border transfers).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PostalAddress {
    pub street: Option<String>,
    pub building_number: Option<String>,
    pub postal_code: Option<String>,
    pub town: Option<String>,
    /// ISO 3166-1 alpha-2.
    pub country: String,
}

/// How often a standing order executes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Frequency {
    Daily,
    Weekly,
    EveryTwoWeeks,
    Monthly,
    EveryTwoMonths,
    Quarterly,
    SemiAnnual,
    Annual,
}

impl Frequency {
    pub const ALL: [Frequency; 8] = [
        Frequency::Daily,
        Frequency::Weekly,
        Frequency::EveryTwoWeeks,
        Frequency::Monthly,
        Frequency::EveryTwoMonths,
        Frequency::Quarterly,
        Frequency::SemiAnnual,
        Frequency::Annual,
    ];

    /// Berlin Group spelling, used on the wire and in the Avro enum (upper-cased there).
    pub fn as_str(self) -> &'static str {
        match self {
            Frequency::Daily => "Daily",
            Frequency::Weekly => "Weekly",
            Frequency::EveryTwoWeeks => "EveryTwoWeeks",
            Frequency::Monthly => "Monthly",
            Frequency::EveryTwoMonths => "EveryTwoMonths",
            Frequency::Quarterly => "Quarterly",
            Frequency::SemiAnnual => "SemiAnnual",
            Frequency::Annual => "Annual",
        }
    }

    /// Months between executions, for the frequencies counted in months.
    pub fn months(self) -> Option<u32> {
        match self {
            Frequency::Daily | Frequency::Weekly | Frequency::EveryTwoWeeks => None,
            Frequency::Monthly => Some(1),
            Frequency::EveryTwoMonths => Some(2),
            Frequency::Quarterly => Some(3),
            Frequency::SemiAnnual => Some(6),
            Frequency::Annual => Some(12),
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.as_str().eq_ignore_ascii_case(text) || f.symbol() == text)
    }

    /// The Avro enum symbol, e.g. `EVERY_TWO_WEEKS`.
    pub fn symbol(self) -> String {
        symbol(self.as_str())
    }
}

/// `EveryTwoWeeks` -> `EVERY_TWO_WEEKS`.
fn symbol(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// A standing order (periodic payment): one payment order executed on a schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandingOrder {
    /// The amount, creditor and references of each execution.
    pub order: PaymentOrder,
    /// First execution; must be in the future.
    pub start_date: NaiveDate,
    /// Last execution, if any.
    pub end_date: Option<NaiveDate>,
    pub frequency: Frequency,
    /// Day of month (1-31) or of week (1-7), if the bank should not derive it from start_date.
    pub day_of_execution: Option<u8>,
}

/// One transfer of a bulk payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkEntry {
    pub amount: Amount,
    pub currency: String,
    pub creditor_name: String,
    pub creditor_iban: String,
    pub creditor_bic: Option<String>,
    pub end_to_end_id: String,
    pub remittance_information: Option<String>,
}

/// A bulk payment: up to 1000 transfers from one account, signed once (Belfius brand only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkOrder {
    pub product: PaymentProduct,
    pub brand: Brand,
    pub debtor_iban: Option<String>,
    pub batch_booking: bool,
    pub requested_execution_date: Option<NaiveDate>,
    pub payments: Vec<BulkEntry>,
    pub language: Language,
    pub redirect_uri: String,
}

/// What a payment asks the bank to do: a single transfer, a standing order, or a bulk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Order {
    Single(PaymentOrder),
    Standing(StandingOrder),
    Bulk(BulkOrder),
}

impl From<PaymentOrder> for Order {
    fn from(order: PaymentOrder) -> Self {
        Order::Single(order)
    }
}

impl Order {
    pub fn kind(&self) -> PaymentKind {
        match self {
            Order::Single(_) => PaymentKind::Single,
            Order::Standing(_) => PaymentKind::Periodic,
            Order::Bulk(_) => PaymentKind::Bulk,
        }
    }

    pub fn brand(&self) -> Brand {
        match self {
            Order::Single(o) => o.brand,
            Order::Standing(s) => s.order.brand,
            Order::Bulk(b) => b.brand,
        }
    }

    pub fn product(&self) -> PaymentProduct {
        match self {
            Order::Single(o) => o.product,
            Order::Standing(s) => s.order.product,
            Order::Bulk(b) => b.product,
        }
    }

    pub fn redirect_uri(&self) -> &str {
        match self {
            Order::Single(o) => &o.redirect_uri,
            Order::Standing(s) => &s.order.redirect_uri,
            Order::Bulk(b) => &b.redirect_uri,
        }
    }
}

/// Bulk payments may hold at most this many transfers [T Exthand].
pub const MAX_BULK_ENTRIES: usize = 1000;

/// An initiation exactly as the client sent it: strings, not yet validated.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RawInitiatePayment {
    pub payment_product: String,
    pub brand: String,
    pub amount: String,
    pub currency: String,
    pub creditor_name: String,
    pub creditor_iban: String,
    pub creditor_bic: Option<String>,
    pub debtor_iban: Option<String>,
    pub end_to_end_id: String,
    pub remittance_information: Option<String>,
    /// ISO date `yyyy-mm-dd`.
    pub requested_execution_date: Option<String>,
    pub language: String,
    pub redirect_uri: String,
    /// Cross-border only: DEBT, CRED, SHAR or SLEV.
    #[serde(default)]
    pub charge_bearer: Option<String>,
    /// Cross-border only: the creditor's address.
    #[serde(default)]
    pub creditor_address: Option<PostalAddress>,
    /// Cross-border only: a national account number instead of an IBAN (with a bank id or BIC).
    #[serde(default)]
    pub creditor_bban: Option<String>,
    /// Cross-border only: the creditor bank's national identifier (e.g. ABA, sort code).
    #[serde(default)]
    pub creditor_bank_national_id: Option<String>,
    /// Cross-border only: the currency of the creditor's account.
    #[serde(default)]
    pub creditor_currency: Option<String>,
    /// Initiate with PKCE even when the worker holds a PIS token of the PSU (command schema
    /// v4). In a standing order, the embedded payment's value applies.
    #[serde(default)]
    pub always_pkce: bool,
    /// Confirm the funds with the bank (CAF) before initiating, when the PSU holds a granted
    /// CAF consent for the debtor account (command schema v5). Single payments only.
    #[serde(default)]
    pub funds_check: bool,
}

/// A standing-order initiation as sent: not yet validated.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RawPeriodicPayment {
    pub payment: RawInitiatePayment,
    /// ISO date `yyyy-mm-dd`.
    pub start_date: String,
    pub end_date: Option<String>,
    /// Avro symbol, e.g. `MONTHLY`.
    pub frequency: String,
    pub day_of_execution: Option<i32>,
}

/// One transfer of a bulk initiation as sent.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RawBulkTransfer {
    pub amount: String,
    pub currency: String,
    pub creditor_name: String,
    pub creditor_iban: String,
    pub creditor_bic: Option<String>,
    pub end_to_end_id: String,
    pub remittance_information: Option<String>,
}

/// A bulk initiation as sent.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RawBulkPayment {
    pub payment_product: String,
    pub brand: String,
    pub debtor_iban: Option<String>,
    pub batch_booking: bool,
    pub requested_execution_date: Option<String>,
    pub language: String,
    pub redirect_uri: String,
    pub payments: Vec<RawBulkTransfer>,
    /// As `RawInitiatePayment::always_pkce`.
    #[serde(default)]
    pub always_pkce: bool,
    /// As `RawInitiatePayment::funds_check` (read, not acted on for a bulk).
    #[serde(default)]
    pub funds_check: bool,
}

/// A consent request exactly as the client sent it (`RequestConsent`, command schema v5): not
/// yet validated (`validation::validate_consent_request`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RawConsentRequest {
    /// Avro symbol, e.g. `BELFIUS`.
    pub brand: String,
    /// Avro symbol: `AIS` or `CAF`.
    pub scope: String,
    pub account_iban: Option<String>,
    pub language: String,
    pub redirect_uri: String,
}

/// A validated payment order: what the worker sends to the bank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentOrder {
    pub product: PaymentProduct,
    pub brand: Brand,
    pub amount: Amount,
    /// ISO 4217, upper case.
    pub currency: String,
    pub creditor_name: String,
    /// Normalised: upper case, no spaces. Empty only for a cross-border transfer to a BBAN.
    pub creditor_iban: String,
    pub creditor_bic: Option<String>,
    pub debtor_iban: Option<String>,
    pub end_to_end_id: String,
    pub remittance_information: Option<String>,
    pub requested_execution_date: Option<NaiveDate>,
    pub language: Language,
    pub redirect_uri: String,
    /// Cross-border fields; `None` for SEPA products (the API does not allow them there).
    /// Boxed: about 200 bytes that most payments (SEPA) never use, in every payment held in
    /// memory (docs/benchmarks.md, "Restore and memory").
    #[serde(default)]
    pub cross_border: Option<Box<CrossBorder>>,
}

/// What only a cross-border transfer carries (docs/belfius-facts.md §2.5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrossBorder {
    pub charge_bearer: ChargeBearer,
    pub creditor_address: Option<PostalAddress>,
    pub creditor_bban: Option<String>,
    pub creditor_bank_national_id: Option<String>,
    pub creditor_currency: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amount_parses_plain_decimals() {
        assert_eq!(Amount::parse("12").map(Amount::minor), Ok(1200));
        assert_eq!(Amount::parse("12.3").map(Amount::minor), Ok(1230));
        assert_eq!(Amount::parse("0.05").map(Amount::minor), Ok(5));
        assert_eq!(
            Amount::parse("12.34").map(|a| a.to_string()),
            Ok("12.34".into())
        );
    }

    #[test]
    fn amount_rejects_malformed_text() {
        for bad in [
            "", ".5", "5.", "-1", "+1", "1e3", "1,00", " 1", "1.2.3", "abc",
        ] {
            assert_eq!(Amount::parse(bad), Err(AmountError::Syntax), "{bad:?}");
        }
        assert_eq!(Amount::parse("1.234"), Err(AmountError::TooManyDecimals));
        assert_eq!(
            Amount::parse("1234567890123456"),
            Err(AmountError::TooLarge)
        );
    }

    #[test]
    fn product_path_segments_round_trip() {
        for p in PaymentProduct::ALL {
            assert_eq!(PaymentProduct::from_path_segment(p.path_segment()), Some(p));
            assert_eq!(PaymentProduct::from_symbol(p.symbol()), Some(p));
        }
    }
}
