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
    /// The identifier Belfius gives a payment at initiation.
    BankPaymentId
);

/// Belfius runs two brands on separate hosts; an account must be addressed on its own brand's host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

/// An initiation exactly as the client sent it: strings, not yet validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Normalised: upper case, no spaces.
    pub creditor_iban: String,
    pub creditor_bic: Option<String>,
    pub debtor_iban: Option<String>,
    pub end_to_end_id: String,
    pub remittance_information: Option<String>,
    pub requested_execution_date: Option<NaiveDate>,
    pub language: Language,
    pub redirect_uri: String,
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
