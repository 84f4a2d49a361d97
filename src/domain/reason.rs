//! Machine-readable reasons carried by status events (`reason.code`) and DLQ records.

use serde::{Deserialize, Serialize};

/// Every reason a payment can end up rejected, failed, expired or cancelled.
/// `as_str` is the wire value; docs/contract.md lists each with its meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReasonCode {
    // Input validation (the command was refused at the edge).
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
    /// A field the payment product does not allow (e.g. a charge bearer on a SEPA transfer).
    FieldNotAllowed,
    InvalidChargeBearer,
    InvalidFrequency,
    // Lifecycle outcomes.
    BankRejected,
    /// The bank refused a field or header of the request (400 INVALID_INPUT / MISSING_INPUT).
    BankInputRejected,
    /// The account cannot be used for this payment (wrong brand, blocked, not allowed).
    BankAccountRefused,
    /// The bank refused our credentials, certificate, signature or token.
    BankSecurityFailure,
    /// The PSU revoked consent in the bank's channels.
    BankConsentRevoked,
    BankUnavailable,
    ScaFailed,
    ScaExpired,
    CancelledByClient,
    CancelledAtBank,
    /// The bank refused the cancellation; the payment carries on.
    CancelRefused,
    /// The bank still reports the payment alive after a cancellation request without an answer.
    CancelNotConfirmed,
    /// A bulk payment executed with some transfers rejected.
    BulkPartiallyRejected,
    OutcomeUnresolved,
    /// The worker asked the bank to end an unsigned payment (SCA deadline, PSU refusal) and the
    /// bank has not confirmed within the horizon: the PSU may still sign it.
    ExpiryUnconfirmed,
    /// The bank answered the initiation in a shape the worker cannot read (no SCA link or no
    /// payment id): the payment cannot be signed, so it ends here (docs/belfius.md).
    BankAnswerUnrecognized,
    /// A funds confirmation (CAF) said the debtor account cannot cover the amount.
    InsufficientFunds,
    /// A consent ended because a newer request for the same PSU, brand and scope replaced it.
    ConsentSuperseded,
    /// A granted consent reached the end the bank gave it.
    ConsentExpired,
    /// A consent scope this worker does not know (a newer writer's enum symbol).
    InvalidScope,
}

impl ReasonCode {
    /// Every code, in declaration order (docs/contract.md lists each; a test keeps them equal).
    pub const ALL: [ReasonCode; 37] = [
        ReasonCode::MissingField,
        ReasonCode::InvalidIban,
        ReasonCode::InvalidBic,
        ReasonCode::InvalidAmount,
        ReasonCode::AmountTooLarge,
        ReasonCode::InvalidCurrency,
        ReasonCode::InvalidCharacters,
        ReasonCode::FieldTooLong,
        ReasonCode::InvalidExecutionDate,
        ReasonCode::InvalidLanguage,
        ReasonCode::InvalidRedirectUri,
        ReasonCode::InvalidProduct,
        ReasonCode::InvalidBrand,
        ReasonCode::InvalidIdentifier,
        ReasonCode::FieldNotAllowed,
        ReasonCode::InvalidChargeBearer,
        ReasonCode::InvalidFrequency,
        ReasonCode::BankRejected,
        ReasonCode::BankInputRejected,
        ReasonCode::BankAccountRefused,
        ReasonCode::BankSecurityFailure,
        ReasonCode::BankConsentRevoked,
        ReasonCode::BankUnavailable,
        ReasonCode::ScaFailed,
        ReasonCode::ScaExpired,
        ReasonCode::CancelledByClient,
        ReasonCode::CancelledAtBank,
        ReasonCode::CancelRefused,
        ReasonCode::CancelNotConfirmed,
        ReasonCode::BulkPartiallyRejected,
        ReasonCode::OutcomeUnresolved,
        ReasonCode::ExpiryUnconfirmed,
        ReasonCode::BankAnswerUnrecognized,
        ReasonCode::InsufficientFunds,
        ReasonCode::ConsentSuperseded,
        ReasonCode::ConsentExpired,
        ReasonCode::InvalidScope,
    ];

    /// The code of a wire value.
    pub fn from_wire(value: &str) -> Option<ReasonCode> {
        Self::ALL.into_iter().find(|code| code.as_str() == value)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::MissingField => "MISSING_FIELD",
            ReasonCode::InvalidIban => "INVALID_IBAN",
            ReasonCode::InvalidBic => "INVALID_BIC",
            ReasonCode::InvalidAmount => "INVALID_AMOUNT",
            ReasonCode::AmountTooLarge => "AMOUNT_TOO_LARGE",
            ReasonCode::InvalidCurrency => "INVALID_CURRENCY",
            ReasonCode::InvalidCharacters => "INVALID_CHARACTERS",
            ReasonCode::FieldTooLong => "FIELD_TOO_LONG",
            ReasonCode::InvalidExecutionDate => "INVALID_EXECUTION_DATE",
            ReasonCode::InvalidLanguage => "INVALID_LANGUAGE",
            ReasonCode::InvalidRedirectUri => "INVALID_REDIRECT_URI",
            ReasonCode::InvalidProduct => "INVALID_PRODUCT",
            ReasonCode::InvalidBrand => "INVALID_BRAND",
            ReasonCode::InvalidIdentifier => "INVALID_IDENTIFIER",
            ReasonCode::FieldNotAllowed => "FIELD_NOT_ALLOWED",
            ReasonCode::InvalidChargeBearer => "INVALID_CHARGE_BEARER",
            ReasonCode::InvalidFrequency => "INVALID_FREQUENCY",
            ReasonCode::BankRejected => "BANK_REJECTED",
            ReasonCode::BankInputRejected => "BANK_INPUT_REJECTED",
            ReasonCode::BankAccountRefused => "BANK_ACCOUNT_REFUSED",
            ReasonCode::BankSecurityFailure => "BANK_SECURITY_FAILURE",
            ReasonCode::BankConsentRevoked => "BANK_CONSENT_REVOKED",
            ReasonCode::BankUnavailable => "BANK_UNAVAILABLE",
            ReasonCode::ScaFailed => "SCA_FAILED",
            ReasonCode::ScaExpired => "SCA_EXPIRED",
            ReasonCode::CancelledByClient => "CANCELLED_BY_CLIENT",
            ReasonCode::CancelledAtBank => "CANCELLED_AT_BANK",
            ReasonCode::CancelRefused => "CANCEL_REFUSED",
            ReasonCode::CancelNotConfirmed => "CANCEL_NOT_CONFIRMED",
            ReasonCode::BulkPartiallyRejected => "BULK_PARTIALLY_REJECTED",
            ReasonCode::OutcomeUnresolved => "OUTCOME_UNRESOLVED",
            ReasonCode::ExpiryUnconfirmed => "EXPIRY_UNCONFIRMED",
            ReasonCode::BankAnswerUnrecognized => "BANK_ANSWER_UNRECOGNIZED",
            ReasonCode::InsufficientFunds => "INSUFFICIENT_FUNDS",
            ReasonCode::ConsentSuperseded => "CONSENT_SUPERSEDED",
            ReasonCode::ConsentExpired => "CONSENT_EXPIRED",
            ReasonCode::InvalidScope => "INVALID_SCOPE",
        }
    }
}

/// A reason code with a human-readable message. Messages never contain secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    pub code: ReasonCode,
    pub message: String,
}

impl Reason {
    pub fn new(code: ReasonCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Position of a code in `ALL`. The match is exhaustive: a new code does not compile until
    /// it has a position, and the test below fails until `ALL` (and the docs) list it.
    fn ordinal(code: ReasonCode) -> usize {
        match code {
            ReasonCode::MissingField => 0,
            ReasonCode::InvalidIban => 1,
            ReasonCode::InvalidBic => 2,
            ReasonCode::InvalidAmount => 3,
            ReasonCode::AmountTooLarge => 4,
            ReasonCode::InvalidCurrency => 5,
            ReasonCode::InvalidCharacters => 6,
            ReasonCode::FieldTooLong => 7,
            ReasonCode::InvalidExecutionDate => 8,
            ReasonCode::InvalidLanguage => 9,
            ReasonCode::InvalidRedirectUri => 10,
            ReasonCode::InvalidProduct => 11,
            ReasonCode::InvalidBrand => 12,
            ReasonCode::InvalidIdentifier => 13,
            ReasonCode::FieldNotAllowed => 14,
            ReasonCode::InvalidChargeBearer => 15,
            ReasonCode::InvalidFrequency => 16,
            ReasonCode::BankRejected => 17,
            ReasonCode::BankInputRejected => 18,
            ReasonCode::BankAccountRefused => 19,
            ReasonCode::BankSecurityFailure => 20,
            ReasonCode::BankConsentRevoked => 21,
            ReasonCode::BankUnavailable => 22,
            ReasonCode::ScaFailed => 23,
            ReasonCode::ScaExpired => 24,
            ReasonCode::CancelledByClient => 25,
            ReasonCode::CancelledAtBank => 26,
            ReasonCode::CancelRefused => 27,
            ReasonCode::CancelNotConfirmed => 28,
            ReasonCode::BulkPartiallyRejected => 29,
            ReasonCode::OutcomeUnresolved => 30,
            ReasonCode::ExpiryUnconfirmed => 31,
            ReasonCode::BankAnswerUnrecognized => 32,
            ReasonCode::InsufficientFunds => 33,
            ReasonCode::ConsentSuperseded => 34,
            ReasonCode::ConsentExpired => 35,
            ReasonCode::InvalidScope => 36,
        }
    }

    #[test]
    fn all_lists_every_code_once_with_a_distinct_wire_value() {
        for (i, code) in ReasonCode::ALL.iter().enumerate() {
            assert_eq!(ordinal(*code), i, "{code:?} is out of place in ALL");
            assert_eq!(ReasonCode::from_wire(code.as_str()), Some(*code));
        }
        let wire: BTreeSet<&str> = ReasonCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(wire.len(), ReasonCode::ALL.len());
    }

    /// The backticked codes in the first column of the table under `heading` in a markdown
    /// document, with the text of the row's last column.
    pub(crate) fn table_codes(doc: &str, heading: &str) -> Vec<(String, String)> {
        let section = doc
            .split("\n## ")
            .find(|s| s.starts_with(heading))
            .unwrap_or_else(|| panic!("no section {heading:?}"));
        let mut out = Vec::new();
        for row in section.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
            let last = cells.last().copied().unwrap_or_default().to_owned();
            for (i, part) in cells[0].split('`').enumerate() {
                if i % 2 == 1 {
                    out.push((part.to_owned(), last.clone()));
                }
            }
        }
        out
    }

    /// docs/contract.md lists every reason code, once, and nothing else; each row says whether
    /// the client may retry.
    #[test]
    fn the_contract_documents_exactly_the_reason_codes() {
        let doc = include_str!("../../docs/contract.md");
        let rows = table_codes(doc, "Reason codes");
        let documented: Vec<&str> = rows.iter().map(|(code, _)| code.as_str()).collect();
        let unique: BTreeSet<&str> = documented.iter().copied().collect();
        assert_eq!(unique.len(), documented.len(), "a code is listed twice");
        let ours: BTreeSet<&str> = ReasonCode::ALL.iter().map(|c| c.as_str()).collect();
        let missing: Vec<_> = ours.difference(&unique).collect();
        let unknown: Vec<_> = unique.difference(&ours).collect();
        assert!(
            missing.is_empty() && unknown.is_empty(),
            "docs/contract.md: missing {missing:?}, not a ReasonCode {unknown:?}"
        );
        for (code, retry) in &rows {
            assert!(
                ["yes", "no"].iter().any(|w| retry.starts_with(w)),
                "{code}: the retry column must start with yes or no, got {retry:?}"
            );
        }
    }
}
