//! Typed Belfius error codes (docs/belfius-facts.md §5) and what each one means for the worker.
//!
//! Belfius answers errors as `{error, error_code, error_description}`. Two generations exist: the
//! current UPPERCASE tokens with structured codes (`GEN-…`, `B14…`) and the legacy lowercase
//! tokens with numeric codes. [`classify`] turns an answer into a [`BelfiusErrorCode`]; the
//! worker then asks [`BelfiusErrorCode::retryable`] and [`BelfiusErrorCode::reason`] instead of
//! matching strings. Unknown codes are kept verbatim in [`BelfiusErrorCode::Unknown`].

use super::{BankError, ErrorBody};
use crate::domain::reason::ReasonCode;

/// Every error code Belfius documents, plus the HTTP classes without a documented body.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BelfiusErrorCode {
    // ---- current generation, 400 -------------------------------------------------------
    /// `MISSING_INPUT GEN-1201-100001`: a mandatory header is missing.
    MissingHeader,
    /// `MISSING_INPUT GEN-1201-100002`: a mandatory body/path/query input is missing.
    MissingInput,
    /// `INVALID_INPUT GEN-1202-100001`: a header has a bad format.
    InvalidHeader,
    /// `INVALID_INPUT GEN-1202-100002`: a body/path/query input has a bad format.
    InvalidInput,
    /// `MISSING_INPUT B14821ZZ-1200-000000`: a mandatory payment field (endtoend_identification).
    MissingPaymentField,
    /// `INVALID_INPUT B14821ZZ-1227-000000`: beneficiary country not allowed.
    CountryNotAllowed,
    /// `INVALID_INPUT B14821ZZ-1231-000000`: amount must be greater than 0.
    AmountNotPositive,
    /// `INVALID_INPUT B14821ZZ-1232-000000`: currency invalid or not authorised.
    CurrencyNotAllowed,
    /// `INVALID_INPUT B14821ZZ-1236-000000`: a BBAN together with a BIC is not authorised.
    BbanWithBic,
    /// `INVALID_INPUT B14821ZZ-1259-000000`: standing order start date must be in the future.
    StartDateNotInFuture,
    /// `INVALID_INPUT B14821ZZ-1322-000000`: end-date month inconsistent with the periodicity.
    EndDateInconsistentWithFrequency,
    /// `INVALID_INPUT B14821ZZ-1345-000000`: end date invalid (text cut on the portal; the
    /// simulator uses it for "end before start" [I]).
    EndDateInvalid,
    /// `INVALID_INPUT B14821ZZ-2102-000000`: beneficiary BIC invalid or missing.
    BicInvalidOrMissing,
    // ---- current generation, 401 -------------------------------------------------------
    /// `FAILED_SECURITY_VALIDATION GEN-1203-100003`: invalid access token.
    InvalidAccessToken,
    /// `FAILED_SECURITY_VALIDATION GEN-1203-100004`: invalid refresh token.
    InvalidRefreshToken,
    /// `FAILED_SECURITY_VALIDATION GEN-1203-100008`: invalid security parameter (signature).
    InvalidSecurityParameter,
    /// `FAILED_SECURITY_VALIDATION GEN-1203-100009`: invalid Client-ID / credentials.
    InvalidClientId,
    /// `FAILED_SECURITY_VALIDATION GEN-1203-100010`: invalid JWT (logical id, SCA or PIS token).
    InvalidJwt,
    /// `SCA_REQUIRED B14800ZZ-0PLC-REDRCT`: the PSU must perform SCA (URL in the body).
    ScaRequired,
    // ---- current generation, 403 -------------------------------------------------------
    /// `INVALID_TPP B14663ZZ-2100-000000`: the Client-ID is not active.
    InvalidTpp,
    /// `INVALID_ACCOUNT B14800ZZ-3002-000000`: account not of this brand, or not found.
    InvalidAccount,
    /// `ACCESS_DENIED B14800ZZ-3004-000000`: access disabled for the account.
    AccessDenied,
    /// `CHANNEL_NOT_PERMITTED B14800ZZ-3007-000000`: not usable electronically / wrong brand.
    ChannelNotPermitted,
    /// `ACCOUNT_NOT_SUPPORTED B14800-3008-000000` (sic, seen without "ZZ" [C]).
    AccountNotSupported,
    /// `NO_ACTIVE_CONSENT B14800ZZ-3013-000000`: the PSU revoked consent in the bank's channels.
    NoActiveConsent,
    /// `INVALID_PAYMENT B14821ZZ-2121-000000`: non-SEPA payment not allowed on this account.
    InvalidPayment,
    /// `FORBIDDEN B14821ZZ-2101-000000`: the customer profile forbids it (limits, countries).
    Forbidden,
    // ---- simulator / undocumented ------------------------------------------------------
    /// `CANCELLATION_NOT_ALLOWED B14821ZZ-9000-000000` (409): [I] the simulator's answer to a
    /// cancellation in a state that no longer allows it; Belfius' own code is not documented.
    CancellationNotAllowed,
    /// HTTP 406: missing or unsupported `Accept-Language` (no documented body).
    NotAcceptable,
    /// HTTP 429 (no documented body).
    TooManyRequests,
    /// HTTP 5xx (`internal_server_error` or no body).
    ServerError,
    // ---- legacy generation -------------------------------------------------------------
    /// `missing_input 10001`.
    LegacyMissingInput,
    /// `invalid_input 10002`.
    LegacyInvalidInput,
    /// `invalid_access_token 10006`.
    LegacyInvalidAccessToken,
    /// `invalid_grant 10006` (e.g. "refresh token is not valid").
    LegacyInvalidGrant,
    /// `channel_not_permitted 20003`.
    LegacyChannelNotPermitted,
    /// `… 20004` "not supported".
    LegacyNotSupported,
    /// `SCA_required 20007`.
    LegacyScaRequired,
    /// `no_active_consent` (no numeric code seen).
    LegacyNoActiveConsent,
    /// Anything else: the `error_code` (or, when empty, the `error` token) as sent.
    Unknown(String),
}

/// (error token, error_code, variant) of every documented structured code. The code alone
/// identifies the variant; the token is what the simulator sends with it.
const CURRENT: &[(&str, &str, BelfiusErrorCode)] = &[
    (
        "MISSING_INPUT",
        "GEN-1201-100001",
        BelfiusErrorCode::MissingHeader,
    ),
    (
        "MISSING_INPUT",
        "GEN-1201-100002",
        BelfiusErrorCode::MissingInput,
    ),
    (
        "INVALID_INPUT",
        "GEN-1202-100001",
        BelfiusErrorCode::InvalidHeader,
    ),
    (
        "INVALID_INPUT",
        "GEN-1202-100002",
        BelfiusErrorCode::InvalidInput,
    ),
    (
        "MISSING_INPUT",
        "B14821ZZ-1200-000000",
        BelfiusErrorCode::MissingPaymentField,
    ),
    (
        "INVALID_INPUT",
        "B14821ZZ-1227-000000",
        BelfiusErrorCode::CountryNotAllowed,
    ),
    (
        "INVALID_INPUT",
        "B14821ZZ-1231-000000",
        BelfiusErrorCode::AmountNotPositive,
    ),
    (
        "INVALID_INPUT",
        "B14821ZZ-1232-000000",
        BelfiusErrorCode::CurrencyNotAllowed,
    ),
    (
        "INVALID_INPUT",
        "B14821ZZ-1236-000000",
        BelfiusErrorCode::BbanWithBic,
    ),
    (
        "INVALID_INPUT",
        "B14821ZZ-1259-000000",
        BelfiusErrorCode::StartDateNotInFuture,
    ),
    (
        "INVALID_INPUT",
        "B14821ZZ-1322-000000",
        BelfiusErrorCode::EndDateInconsistentWithFrequency,
    ),
    (
        "INVALID_INPUT",
        "B14821ZZ-1345-000000",
        BelfiusErrorCode::EndDateInvalid,
    ),
    (
        "INVALID_INPUT",
        "B14821ZZ-2102-000000",
        BelfiusErrorCode::BicInvalidOrMissing,
    ),
    (
        "FAILED_SECURITY_VALIDATION",
        "GEN-1203-100003",
        BelfiusErrorCode::InvalidAccessToken,
    ),
    (
        "FAILED_SECURITY_VALIDATION",
        "GEN-1203-100004",
        BelfiusErrorCode::InvalidRefreshToken,
    ),
    (
        "FAILED_SECURITY_VALIDATION",
        "GEN-1203-100008",
        BelfiusErrorCode::InvalidSecurityParameter,
    ),
    (
        "FAILED_SECURITY_VALIDATION",
        "GEN-1203-100009",
        BelfiusErrorCode::InvalidClientId,
    ),
    (
        "FAILED_SECURITY_VALIDATION",
        "GEN-1203-100010",
        BelfiusErrorCode::InvalidJwt,
    ),
    (
        "SCA_REQUIRED",
        "B14800ZZ-0PLC-REDRCT",
        BelfiusErrorCode::ScaRequired,
    ),
    (
        "INVALID_TPP",
        "B14663ZZ-2100-000000",
        BelfiusErrorCode::InvalidTpp,
    ),
    (
        "INVALID_ACCOUNT",
        "B14800ZZ-3002-000000",
        BelfiusErrorCode::InvalidAccount,
    ),
    (
        "ACCESS_DENIED",
        "B14800ZZ-3004-000000",
        BelfiusErrorCode::AccessDenied,
    ),
    (
        "CHANNEL_NOT_PERMITTED",
        "B14800ZZ-3007-000000",
        BelfiusErrorCode::ChannelNotPermitted,
    ),
    (
        "ACCOUNT_NOT_SUPPORTED",
        "B14800-3008-000000",
        BelfiusErrorCode::AccountNotSupported,
    ),
    (
        "NO_ACTIVE_CONSENT",
        "B14800ZZ-3013-000000",
        BelfiusErrorCode::NoActiveConsent,
    ),
    (
        "INVALID_PAYMENT",
        "B14821ZZ-2121-000000",
        BelfiusErrorCode::InvalidPayment,
    ),
    (
        "FORBIDDEN",
        "B14821ZZ-2101-000000",
        BelfiusErrorCode::Forbidden,
    ),
    (
        "CANCELLATION_NOT_ALLOWED",
        "B14821ZZ-9000-000000",
        BelfiusErrorCode::CancellationNotAllowed,
    ),
];

impl BelfiusErrorCode {
    /// The documented `(error, error_code)` pair, for the codes that have one. Legacy codes
    /// give their lowercase token and number; the HTTP classes and `Unknown` give `None`.
    pub fn wire(&self) -> Option<(&'static str, &'static str)> {
        if let Some((token, code, _)) = CURRENT.iter().find(|(_, _, c)| c == self) {
            return Some((token, code));
        }
        match self {
            BelfiusErrorCode::LegacyMissingInput => Some(("missing_input", "10001")),
            BelfiusErrorCode::LegacyInvalidInput => Some(("invalid_input", "10002")),
            BelfiusErrorCode::LegacyInvalidAccessToken => Some(("invalid_access_token", "10006")),
            BelfiusErrorCode::LegacyInvalidGrant => Some(("invalid_grant", "10006")),
            BelfiusErrorCode::LegacyChannelNotPermitted => Some(("channel_not_permitted", "20003")),
            BelfiusErrorCode::LegacyNotSupported => Some(("not_supported", "20004")),
            BelfiusErrorCode::LegacyScaRequired => Some(("SCA_required", "20007")),
            BelfiusErrorCode::LegacyNoActiveConsent => Some(("no_active_consent", "")),
            // Listed in CURRENT (found above) or without a documented body.
            BelfiusErrorCode::MissingHeader
            | BelfiusErrorCode::MissingInput
            | BelfiusErrorCode::InvalidHeader
            | BelfiusErrorCode::InvalidInput
            | BelfiusErrorCode::MissingPaymentField
            | BelfiusErrorCode::CountryNotAllowed
            | BelfiusErrorCode::AmountNotPositive
            | BelfiusErrorCode::CurrencyNotAllowed
            | BelfiusErrorCode::BbanWithBic
            | BelfiusErrorCode::StartDateNotInFuture
            | BelfiusErrorCode::EndDateInconsistentWithFrequency
            | BelfiusErrorCode::EndDateInvalid
            | BelfiusErrorCode::BicInvalidOrMissing
            | BelfiusErrorCode::InvalidAccessToken
            | BelfiusErrorCode::InvalidRefreshToken
            | BelfiusErrorCode::InvalidSecurityParameter
            | BelfiusErrorCode::InvalidClientId
            | BelfiusErrorCode::InvalidJwt
            | BelfiusErrorCode::ScaRequired
            | BelfiusErrorCode::InvalidTpp
            | BelfiusErrorCode::InvalidAccount
            | BelfiusErrorCode::AccessDenied
            | BelfiusErrorCode::ChannelNotPermitted
            | BelfiusErrorCode::AccountNotSupported
            | BelfiusErrorCode::NoActiveConsent
            | BelfiusErrorCode::InvalidPayment
            | BelfiusErrorCode::Forbidden
            | BelfiusErrorCode::CancellationNotAllowed
            | BelfiusErrorCode::NotAcceptable
            | BelfiusErrorCode::TooManyRequests
            | BelfiusErrorCode::ServerError
            | BelfiusErrorCode::Unknown(_) => None,
        }
    }

    /// Whether the same request may succeed later unchanged. Only the server-side classes
    /// (5xx, 429) are; every documented 4xx code describes the request, the account, the
    /// credentials or the PSU's consent, none of which a retry changes.
    pub fn retryable(&self) -> bool {
        match self {
            BelfiusErrorCode::TooManyRequests | BelfiusErrorCode::ServerError => true,
            BelfiusErrorCode::MissingHeader
            | BelfiusErrorCode::MissingInput
            | BelfiusErrorCode::InvalidHeader
            | BelfiusErrorCode::InvalidInput
            | BelfiusErrorCode::MissingPaymentField
            | BelfiusErrorCode::CountryNotAllowed
            | BelfiusErrorCode::AmountNotPositive
            | BelfiusErrorCode::CurrencyNotAllowed
            | BelfiusErrorCode::BbanWithBic
            | BelfiusErrorCode::StartDateNotInFuture
            | BelfiusErrorCode::EndDateInconsistentWithFrequency
            | BelfiusErrorCode::EndDateInvalid
            | BelfiusErrorCode::BicInvalidOrMissing
            | BelfiusErrorCode::InvalidAccessToken
            | BelfiusErrorCode::InvalidRefreshToken
            | BelfiusErrorCode::InvalidSecurityParameter
            | BelfiusErrorCode::InvalidClientId
            | BelfiusErrorCode::InvalidJwt
            | BelfiusErrorCode::ScaRequired
            | BelfiusErrorCode::InvalidTpp
            | BelfiusErrorCode::InvalidAccount
            | BelfiusErrorCode::AccessDenied
            | BelfiusErrorCode::ChannelNotPermitted
            | BelfiusErrorCode::AccountNotSupported
            | BelfiusErrorCode::NoActiveConsent
            | BelfiusErrorCode::InvalidPayment
            | BelfiusErrorCode::Forbidden
            | BelfiusErrorCode::CancellationNotAllowed
            | BelfiusErrorCode::NotAcceptable
            | BelfiusErrorCode::LegacyMissingInput
            | BelfiusErrorCode::LegacyInvalidInput
            | BelfiusErrorCode::LegacyInvalidAccessToken
            | BelfiusErrorCode::LegacyInvalidGrant
            | BelfiusErrorCode::LegacyChannelNotPermitted
            | BelfiusErrorCode::LegacyNotSupported
            | BelfiusErrorCode::LegacyScaRequired
            | BelfiusErrorCode::LegacyNoActiveConsent
            | BelfiusErrorCode::Unknown(_) => false,
        }
    }

    /// The machine-readable reason a payment refused with this code carries.
    pub fn reason(&self) -> ReasonCode {
        match self {
            // The request itself (a header, a field, a rule on the fields) was refused.
            BelfiusErrorCode::MissingHeader
            | BelfiusErrorCode::MissingInput
            | BelfiusErrorCode::InvalidHeader
            | BelfiusErrorCode::InvalidInput
            | BelfiusErrorCode::MissingPaymentField
            | BelfiusErrorCode::CountryNotAllowed
            | BelfiusErrorCode::AmountNotPositive
            | BelfiusErrorCode::CurrencyNotAllowed
            | BelfiusErrorCode::BbanWithBic
            | BelfiusErrorCode::StartDateNotInFuture
            | BelfiusErrorCode::EndDateInconsistentWithFrequency
            | BelfiusErrorCode::EndDateInvalid
            | BelfiusErrorCode::BicInvalidOrMissing
            | BelfiusErrorCode::NotAcceptable
            | BelfiusErrorCode::LegacyMissingInput
            | BelfiusErrorCode::LegacyInvalidInput => ReasonCode::BankInputRejected,
            // The account (or the customer's profile) cannot be used for this payment.
            BelfiusErrorCode::InvalidAccount
            | BelfiusErrorCode::AccessDenied
            | BelfiusErrorCode::ChannelNotPermitted
            | BelfiusErrorCode::AccountNotSupported
            | BelfiusErrorCode::InvalidPayment
            | BelfiusErrorCode::Forbidden
            | BelfiusErrorCode::LegacyChannelNotPermitted => ReasonCode::BankAccountRefused,
            // Our credentials, certificate, signature or tokens.
            BelfiusErrorCode::InvalidAccessToken
            | BelfiusErrorCode::InvalidRefreshToken
            | BelfiusErrorCode::InvalidSecurityParameter
            | BelfiusErrorCode::InvalidClientId
            | BelfiusErrorCode::InvalidJwt
            | BelfiusErrorCode::InvalidTpp
            | BelfiusErrorCode::LegacyInvalidAccessToken
            | BelfiusErrorCode::LegacyInvalidGrant => ReasonCode::BankSecurityFailure,
            BelfiusErrorCode::NoActiveConsent | BelfiusErrorCode::LegacyNoActiveConsent => {
                ReasonCode::BankConsentRevoked
            }
            // Retryable classes: if they end a payment, it is because the bank stayed down.
            BelfiusErrorCode::TooManyRequests | BelfiusErrorCode::ServerError => {
                ReasonCode::BankUnavailable
            }
            BelfiusErrorCode::ScaRequired
            | BelfiusErrorCode::CancellationNotAllowed
            | BelfiusErrorCode::LegacyNotSupported
            | BelfiusErrorCode::LegacyScaRequired
            | BelfiusErrorCode::Unknown(_) => ReasonCode::BankRejected,
        }
    }
}

impl std::fmt::Display for BelfiusErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self, self.wire()) {
            (BelfiusErrorCode::Unknown(code), _) => write!(f, "unknown ({code})"),
            (_, Some((token, ""))) => f.write_str(token),
            (_, Some((token, code))) => write!(f, "{token} {code}"),
            (other, None) => write!(f, "{other:?}"),
        }
    }
}

/// Reads an error answer. The HTTP class decides first for 429 and 5xx (their bodies are not
/// documented and only their retryability matters); otherwise the structured `error_code`
/// identifies the code, and the `error` token disambiguates the legacy numbers (10006 is both
/// `invalid_access_token` and `invalid_grant`).
pub fn classify(status: u16, body: &ErrorBody) -> BelfiusErrorCode {
    if status == 429 {
        return BelfiusErrorCode::TooManyRequests;
    }
    if (500..=599).contains(&status) {
        return BelfiusErrorCode::ServerError;
    }
    let code = body.error_code.trim();
    let token = body.error.trim();
    if let Some((_, _, variant)) = CURRENT
        .iter()
        .find(|(_, c, _)| c.eq_ignore_ascii_case(code))
    {
        return variant.clone();
    }
    // Tink's fixture shows ACCOUNT_NOT_SUPPORTED without "ZZ"; accept the regular spelling too.
    if code.eq_ignore_ascii_case("B14800ZZ-3008-000000") {
        return BelfiusErrorCode::AccountNotSupported;
    }
    let legacy = match (token.to_ascii_lowercase().as_str(), code) {
        ("missing_input", _) | (_, "10001") => Some(BelfiusErrorCode::LegacyMissingInput),
        ("invalid_input", _) | (_, "10002") => Some(BelfiusErrorCode::LegacyInvalidInput),
        ("invalid_access_token", _) => Some(BelfiusErrorCode::LegacyInvalidAccessToken),
        ("invalid_grant", _) => Some(BelfiusErrorCode::LegacyInvalidGrant),
        ("channel_not_permitted", _) | (_, "20003") => {
            Some(BelfiusErrorCode::LegacyChannelNotPermitted)
        }
        (_, "20004") => Some(BelfiusErrorCode::LegacyNotSupported),
        ("sca_required", _) | (_, "20007") => Some(BelfiusErrorCode::LegacyScaRequired),
        ("no_active_consent", _) => Some(BelfiusErrorCode::LegacyNoActiveConsent),
        // 10006 without a known token: the access token is the likelier culprit on PIS calls.
        (_, "10006") => Some(BelfiusErrorCode::LegacyInvalidAccessToken),
        _ => None,
    };
    if let Some(variant) = legacy {
        return variant;
    }
    if status == 406 && code.is_empty() {
        return BelfiusErrorCode::NotAcceptable;
    }
    BelfiusErrorCode::Unknown(if code.is_empty() {
        token.to_owned()
    } else {
        code.to_owned()
    })
}

impl BankError {
    /// The typed Belfius code of an HTTP error answer: `Refused` (4xx), `Unavailable` (5xx)
    /// and `RateLimited` (429). Transport and protocol failures carry none.
    pub fn code(&self) -> Option<BelfiusErrorCode> {
        match self {
            BankError::Refused { status, body } => Some(classify(*status, body)),
            BankError::Unavailable { status, body } => Some(classify(
                *status,
                body.as_ref().unwrap_or(&ErrorBody::default()),
            )),
            BankError::RateLimited { .. } => Some(BelfiusErrorCode::TooManyRequests),
            BankError::NotSent(_)
            | BankError::NoResponse(_)
            | BankError::Protocol(_)
            | BankError::Unrecognized(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(error: &str, code: &str) -> ErrorBody {
        ErrorBody {
            error: error.into(),
            error_code: code.into(),
            error_description: "x".into(),
        }
    }

    /// One check per documented code: its HTTP status, token and code classify to the variant,
    /// which is not retryable and carries the expected reason.
    fn check(status: u16, error: &str, code: &str, expected: BelfiusErrorCode, reason: ReasonCode) {
        let got = classify(status, &body(error, code));
        assert_eq!(got, expected, "{status} {error} {code}");
        assert!(!got.retryable(), "{got:?} must not be retryable");
        assert_eq!(got.reason(), reason, "{got:?}");
    }

    use BelfiusErrorCode as E;
    use ReasonCode as R;

    #[test]
    fn missing_header() {
        check(
            400,
            "MISSING_INPUT",
            "GEN-1201-100001",
            E::MissingHeader,
            R::BankInputRejected,
        );
    }

    #[test]
    fn missing_input() {
        check(
            400,
            "MISSING_INPUT",
            "GEN-1201-100002",
            E::MissingInput,
            R::BankInputRejected,
        );
    }

    #[test]
    fn invalid_header() {
        check(
            400,
            "INVALID_INPUT",
            "GEN-1202-100001",
            E::InvalidHeader,
            R::BankInputRejected,
        );
    }

    #[test]
    fn invalid_input() {
        check(
            400,
            "INVALID_INPUT",
            "GEN-1202-100002",
            E::InvalidInput,
            R::BankInputRejected,
        );
    }

    #[test]
    fn missing_payment_field() {
        check(
            400,
            "MISSING_INPUT",
            "B14821ZZ-1200-000000",
            E::MissingPaymentField,
            R::BankInputRejected,
        );
    }

    #[test]
    fn country_not_allowed() {
        check(
            400,
            "INVALID_INPUT",
            "B14821ZZ-1227-000000",
            E::CountryNotAllowed,
            R::BankInputRejected,
        );
    }

    #[test]
    fn amount_not_positive() {
        check(
            400,
            "INVALID_INPUT",
            "B14821ZZ-1231-000000",
            E::AmountNotPositive,
            R::BankInputRejected,
        );
    }

    #[test]
    fn currency_not_allowed() {
        check(
            400,
            "INVALID_INPUT",
            "B14821ZZ-1232-000000",
            E::CurrencyNotAllowed,
            R::BankInputRejected,
        );
    }

    #[test]
    fn bban_with_bic() {
        check(
            400,
            "INVALID_INPUT",
            "B14821ZZ-1236-000000",
            E::BbanWithBic,
            R::BankInputRejected,
        );
    }

    #[test]
    fn start_date_not_in_future() {
        check(
            400,
            "INVALID_INPUT",
            "B14821ZZ-1259-000000",
            E::StartDateNotInFuture,
            R::BankInputRejected,
        );
    }

    #[test]
    fn end_date_inconsistent_with_frequency() {
        check(
            400,
            "INVALID_INPUT",
            "B14821ZZ-1322-000000",
            E::EndDateInconsistentWithFrequency,
            R::BankInputRejected,
        );
    }

    #[test]
    fn end_date_invalid() {
        check(
            400,
            "INVALID_INPUT",
            "B14821ZZ-1345-000000",
            E::EndDateInvalid,
            R::BankInputRejected,
        );
    }

    #[test]
    fn bic_invalid_or_missing() {
        check(
            400,
            "INVALID_INPUT",
            "B14821ZZ-2102-000000",
            E::BicInvalidOrMissing,
            R::BankInputRejected,
        );
    }

    #[test]
    fn invalid_access_token() {
        check(
            401,
            "FAILED_SECURITY_VALIDATION",
            "GEN-1203-100003",
            E::InvalidAccessToken,
            R::BankSecurityFailure,
        );
    }

    #[test]
    fn invalid_refresh_token() {
        check(
            401,
            "FAILED_SECURITY_VALIDATION",
            "GEN-1203-100004",
            E::InvalidRefreshToken,
            R::BankSecurityFailure,
        );
    }

    #[test]
    fn invalid_security_parameter() {
        check(
            401,
            "FAILED_SECURITY_VALIDATION",
            "GEN-1203-100008",
            E::InvalidSecurityParameter,
            R::BankSecurityFailure,
        );
    }

    #[test]
    fn invalid_client_id() {
        check(
            401,
            "FAILED_SECURITY_VALIDATION",
            "GEN-1203-100009",
            E::InvalidClientId,
            R::BankSecurityFailure,
        );
    }

    #[test]
    fn invalid_jwt() {
        check(
            401,
            "FAILED_SECURITY_VALIDATION",
            "GEN-1203-100010",
            E::InvalidJwt,
            R::BankSecurityFailure,
        );
    }

    #[test]
    fn sca_required() {
        check(
            401,
            "SCA_REQUIRED",
            "B14800ZZ-0PLC-REDRCT",
            E::ScaRequired,
            R::BankRejected,
        );
    }

    #[test]
    fn invalid_tpp() {
        check(
            403,
            "INVALID_TPP",
            "B14663ZZ-2100-000000",
            E::InvalidTpp,
            R::BankSecurityFailure,
        );
    }

    #[test]
    fn invalid_account() {
        check(
            403,
            "INVALID_ACCOUNT",
            "B14800ZZ-3002-000000",
            E::InvalidAccount,
            R::BankAccountRefused,
        );
    }

    #[test]
    fn access_denied() {
        check(
            403,
            "ACCESS_DENIED",
            "B14800ZZ-3004-000000",
            E::AccessDenied,
            R::BankAccountRefused,
        );
    }

    #[test]
    fn channel_not_permitted() {
        check(
            403,
            "CHANNEL_NOT_PERMITTED",
            "B14800ZZ-3007-000000",
            E::ChannelNotPermitted,
            R::BankAccountRefused,
        );
    }

    #[test]
    fn account_not_supported_with_and_without_zz() {
        for code in ["B14800-3008-000000", "B14800ZZ-3008-000000"] {
            check(
                403,
                "ACCOUNT_NOT_SUPPORTED",
                code,
                E::AccountNotSupported,
                R::BankAccountRefused,
            );
        }
    }

    #[test]
    fn no_active_consent() {
        check(
            403,
            "NO_ACTIVE_CONSENT",
            "B14800ZZ-3013-000000",
            E::NoActiveConsent,
            R::BankConsentRevoked,
        );
    }

    #[test]
    fn invalid_payment() {
        check(
            403,
            "INVALID_PAYMENT",
            "B14821ZZ-2121-000000",
            E::InvalidPayment,
            R::BankAccountRefused,
        );
    }

    #[test]
    fn forbidden() {
        check(
            403,
            "FORBIDDEN",
            "B14821ZZ-2101-000000",
            E::Forbidden,
            R::BankAccountRefused,
        );
    }

    #[test]
    fn cancellation_not_allowed() {
        check(
            409,
            "CANCELLATION_NOT_ALLOWED",
            "B14821ZZ-9000-000000",
            E::CancellationNotAllowed,
            R::BankRejected,
        );
    }

    #[test]
    fn not_acceptable_without_body() {
        check(
            406,
            "Not Acceptable",
            "",
            E::NotAcceptable,
            R::BankInputRejected,
        );
    }

    #[test]
    fn legacy_missing_input() {
        check(
            400,
            "missing_input",
            "10001",
            E::LegacyMissingInput,
            R::BankInputRejected,
        );
    }

    #[test]
    fn legacy_invalid_input() {
        check(
            400,
            "invalid_input",
            "10002",
            E::LegacyInvalidInput,
            R::BankInputRejected,
        );
    }

    #[test]
    fn legacy_invalid_access_token() {
        check(
            401,
            "invalid_access_token",
            "10006",
            E::LegacyInvalidAccessToken,
            R::BankSecurityFailure,
        );
    }

    #[test]
    fn legacy_invalid_grant() {
        check(
            400,
            "invalid_grant",
            "10006",
            E::LegacyInvalidGrant,
            R::BankSecurityFailure,
        );
    }

    #[test]
    fn legacy_channel_not_permitted() {
        check(
            403,
            "channel_not_permitted",
            "20003",
            E::LegacyChannelNotPermitted,
            R::BankAccountRefused,
        );
    }

    #[test]
    fn legacy_not_supported() {
        check(
            400,
            "not_supported",
            "20004",
            E::LegacyNotSupported,
            R::BankRejected,
        );
    }

    #[test]
    fn legacy_sca_required() {
        check(
            401,
            "SCA_required",
            "20007",
            E::LegacyScaRequired,
            R::BankRejected,
        );
    }

    #[test]
    fn legacy_no_active_consent() {
        check(
            403,
            "no_active_consent",
            "",
            E::LegacyNoActiveConsent,
            R::BankConsentRevoked,
        );
    }

    #[test]
    fn server_errors_and_rate_limits_are_the_only_retryable_codes() {
        for status in [500, 502, 503, 504] {
            let code = classify(status, &body("internal_server_error", ""));
            assert_eq!(code, E::ServerError);
            assert!(code.retryable());
            assert_eq!(code.reason(), R::BankUnavailable);
        }
        // The HTTP class wins over a body that looks like a 4xx code.
        assert_eq!(
            classify(503, &body("INVALID_INPUT", "GEN-1202-100002")),
            E::ServerError
        );
        let limited = classify(429, &ErrorBody::default());
        assert_eq!(limited, E::TooManyRequests);
        assert!(limited.retryable());
    }

    #[test]
    fn unknown_codes_are_kept_verbatim() {
        let code = classify(400, &body("SOMETHING", "B99999ZZ-0000-000000"));
        assert_eq!(code, E::Unknown("B99999ZZ-0000-000000".into()));
        assert!(!code.retryable());
        assert_eq!(code.reason(), R::BankRejected);
        assert_eq!(
            classify(418, &body("teapot", "")),
            E::Unknown("teapot".into())
        );
    }

    #[test]
    fn wire_round_trips_through_classify() {
        for (token, code, variant) in CURRENT {
            assert_eq!(variant.wire(), Some((*token, *code)));
            assert_eq!(&classify(400, &body(token, code)), variant);
        }
        assert_eq!(
            E::LegacyInvalidGrant.wire(),
            Some(("invalid_grant", "10006"))
        );
        assert_eq!(E::ServerError.wire(), None);
        assert_eq!(
            E::ChannelNotPermitted.to_string(),
            "CHANNEL_NOT_PERMITTED B14800ZZ-3007-000000"
        );
    }

    #[test]
    fn bank_error_exposes_its_code() {
        let refused = BankError::Refused {
            status: 403,
            body: body("CHANNEL_NOT_PERMITTED", "B14800ZZ-3007-000000"),
        };
        assert_eq!(refused.code(), Some(E::ChannelNotPermitted));
        let down = BankError::Unavailable {
            status: 503,
            body: None,
        };
        assert_eq!(down.code(), Some(E::ServerError));
        let limited = BankError::RateLimited { retry_after: None };
        assert_eq!(limited.code(), Some(E::TooManyRequests));
        assert_eq!(BankError::NoResponse("x".into()).code(), None);
    }
}
