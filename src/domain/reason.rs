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
}

impl ReasonCode {
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
