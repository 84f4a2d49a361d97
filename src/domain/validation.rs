//! Pure validation of client commands at the edge. No I/O and no clock: `today` is a parameter.
//!
//! Every refusal is a [`Reason`] whose message names the field and the rule it broke. Messages
//! never echo the offending value: free text may carry personal data.
//!
//! Normalisation is limited to IBANs and BICs (spaces removed, upper-cased); every other field
//! is taken exactly as sent. Empty strings in optional fields count as absent; an empty (or, for
//! names, end-to-end ids and IBANs, blank) required field is reported as [`ReasonCode::MissingField`].

use chrono::{Datelike, NaiveDate, TimeDelta};
use url::{Host, Url};

use super::consent::{ConsentRequest, ConsentScope};
use super::model::{
    Amount, AmountError, Brand, BulkEntry, BulkOrder, ChargeBearer, CrossBorder, Frequency,
    Language, MAX_BULK_ENTRIES, PaymentOrder, PaymentProduct, PostalAddress, RawBulkPayment,
    RawConsentRequest, RawInitiatePayment, RawPeriodicPayment, StandingOrder,
};
use super::reason::{Reason, ReasonCode};

/// Longest creditor name the SEPA rulebook allows.
pub const MAX_CREDITOR_NAME_CHARS: usize = 70;
/// Longest end-to-end identification the SEPA rulebook allows.
pub const MAX_END_TO_END_ID_CHARS: usize = 35;
/// Longest unstructured remittance information the SEPA rulebook allows.
pub const MAX_REMITTANCE_CHARS: usize = 140;
/// Longest redirect URI accepted.
pub const MAX_REDIRECT_URI_CHARS: usize = 2048;
/// Longest payment id Belfius accepts.
pub const MAX_PAYMENT_ID_CHARS: usize = 35;
/// Longest PSU id accepted.
pub const MAX_PSU_ID_CHARS: usize = 64;
/// Longest command id accepted.
pub const MAX_COMMAND_ID_CHARS: usize = 64;

/// Configurable business limits applied by [`validate_initiation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidationLimits {
    /// Largest amount accepted (inclusive).
    pub max_amount: Amount,
    /// How many days after `today` a requested execution date may lie (inclusive).
    pub max_execution_horizon_days: i64,
}

impl Default for ValidationLimits {
    /// 1 000 000.00 and one year ahead.
    fn default() -> Self {
        Self {
            max_amount: Amount::from_minor(100_000_000),
            max_execution_horizon_days: 365,
        }
    }
}

fn reason(code: ReasonCode, message: impl Into<String>) -> Reason {
    Reason::new(code, message)
}

fn missing(field: &str) -> Reason {
    reason(ReasonCode::MissingField, format!("{field} is required"))
}

fn too_long(field: &str, max: usize) -> Reason {
    reason(
        ReasonCode::FieldTooLong,
        format!("{field} must not be longer than {max} characters"),
    )
}

fn not_sepa_text(field: &str) -> Reason {
    reason(
        ReasonCode::InvalidCharacters,
        format!(
            "{field} may only contain the SEPA character set: \
             a-z A-Z 0-9 / - ? : ( ) . , ' + and space"
        ),
    )
}

/// `Some(value)` unless the optional field is absent or empty.
fn present(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.is_empty())
}

/// Validates an initiation command and turns it into a [`PaymentOrder`].
///
/// Fields are checked in declaration order; the first failure is returned.
pub fn validate_initiation(
    raw: &RawInitiatePayment,
    limits: &ValidationLimits,
    today: NaiveDate,
) -> Result<PaymentOrder, Reason> {
    let product = validate_product(&raw.payment_product)?;
    let brand = validate_brand(&raw.brand)?;
    let amount = validate_amount(&raw.amount, limits)?;
    let currency = validate_currency(&raw.currency, product)?;
    validate_amount_for_currency(amount, &currency)?;
    let creditor_name = validate_creditor_name(&raw.creditor_name)?;
    let cross_border = validate_cross_border(raw, product)?;
    // A cross-border creditor may be addressed by BBAN instead of IBAN.
    let by_bban = cross_border
        .as_ref()
        .is_some_and(|c| c.creditor_bban.is_some());
    let creditor_iban = if by_bban && raw.creditor_iban.trim().is_empty() {
        String::new()
    } else {
        validate_iban_field("creditor_iban", &raw.creditor_iban, true)?
    };
    let creditor_bic = match present(&raw.creditor_bic) {
        Some(bic) => Some(validate_bic_field("creditor_bic", bic)?),
        None => None,
    };
    let debtor_iban = match present(&raw.debtor_iban) {
        Some(iban) => Some(validate_iban_field("debtor_iban", iban, false)?),
        None => None,
    };
    let end_to_end_id = validate_end_to_end_id(&raw.end_to_end_id)?;
    let remittance_information = match present(&raw.remittance_information) {
        Some(text) => Some(validate_remittance(text)?),
        None => None,
    };
    let requested_execution_date = match present(&raw.requested_execution_date) {
        Some(date) => Some(validate_execution_date(date, limits, today)?),
        None => None,
    };
    let language = validate_language(&raw.language)?;
    let redirect_uri = validate_redirect_uri(&raw.redirect_uri)?;

    Ok(PaymentOrder {
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
        cross_border: cross_border.map(Box::new),
    })
}

/// The per-product rules of docs/belfius-facts.md §2.5: SEPA products carry no cross-border field;
/// a cross-border transfer needs a charge bearer, and a BBAN needs a bank id and no BIC (Belfius
/// refuses BBAN + BIC: B14821ZZ-1236-000000).
fn validate_cross_border(
    raw: &RawInitiatePayment,
    product: PaymentProduct,
) -> Result<Option<CrossBorder>, Reason> {
    let bban = present(&raw.creditor_bban);
    let bank_id = present(&raw.creditor_bank_national_id);
    let currency = present(&raw.creditor_currency);
    let charge_bearer = present(&raw.charge_bearer);
    if product.is_sepa() {
        let given = [
            ("charge_bearer", charge_bearer.is_some()),
            ("creditor_address", raw.creditor_address.is_some()),
            ("creditor_bban", bban.is_some()),
            ("creditor_bank_national_id", bank_id.is_some()),
            ("creditor_currency", currency.is_some()),
        ];
        if let Some((field, _)) = given.iter().find(|(_, set)| *set) {
            return Err(reason(
                ReasonCode::FieldNotAllowed,
                format!("{field} is only allowed for CROSS_BORDER_CREDIT_TRANSFERS"),
            ));
        }
        return Ok(None);
    }
    let charge_bearer = match charge_bearer {
        None => return Err(missing("charge_bearer")),
        Some(text) => ChargeBearer::parse(text).ok_or_else(|| {
            reason(
                ReasonCode::InvalidChargeBearer,
                "charge_bearer must be DEBT, CRED, SHAR or SLEV",
            )
        })?,
    };
    if let Some(bban) = bban {
        if present(&raw.creditor_bic).is_some() {
            return Err(reason(
                ReasonCode::FieldNotAllowed,
                "creditor_bban cannot be combined with creditor_bic (use creditor_bank_national_id)",
            ));
        }
        if bank_id.is_none() {
            return Err(missing("creditor_bank_national_id"));
        }
        if bban.len() > 34 || !bban.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(reason(
                ReasonCode::InvalidIban,
                "creditor_bban must be 1 to 34 letters or digits",
            ));
        }
    }
    if let Some(id) = bank_id {
        if id.len() > 35 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(reason(
                ReasonCode::InvalidIdentifier,
                "creditor_bank_national_id must be 1 to 35 letters or digits",
            ));
        }
    }
    if let Some(code) = currency {
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(reason(
                ReasonCode::InvalidCurrency,
                "creditor_currency must be an ISO 4217 code (3 upper-case letters)",
            ));
        }
        if !is_payable_currency(code) {
            return Err(reason(
                ReasonCode::InvalidCurrency,
                "creditor_currency must be an active ISO 4217 currency",
            ));
        }
    }
    let creditor_address = match &raw.creditor_address {
        Some(address) => Some(validate_address(address)?),
        None => None,
    };
    Ok(Some(CrossBorder {
        charge_bearer,
        creditor_address,
        creditor_bban: bban.map(str::to_owned),
        creditor_bank_national_id: bank_id.map(str::to_owned),
        creditor_currency: currency.map(str::to_owned),
    }))
}

/// ISO 3166-1 alpha-2: the 249 officially assigned codes, plus `XK` (Kosovo, user-assigned
/// but used by SWIFT and the IBAN registry). Sorted, for a binary search.
const ISO_3166_ALPHA_2: [&str; 250] = [
    "AD", "AE", "AF", "AG", "AI", "AL", "AM", "AO", "AQ", "AR", "AS", "AT", "AU", "AW", "AX", "AZ",
    "BA", "BB", "BD", "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN", "BO", "BQ", "BR", "BS",
    "BT", "BV", "BW", "BY", "BZ", "CA", "CC", "CD", "CF", "CG", "CH", "CI", "CK", "CL", "CM", "CN",
    "CO", "CR", "CU", "CV", "CW", "CX", "CY", "CZ", "DE", "DJ", "DK", "DM", "DO", "DZ", "EC", "EE",
    "EG", "EH", "ER", "ES", "ET", "FI", "FJ", "FK", "FM", "FO", "FR", "GA", "GB", "GD", "GE", "GF",
    "GG", "GH", "GI", "GL", "GM", "GN", "GP", "GQ", "GR", "GS", "GT", "GU", "GW", "GY", "HK", "HM",
    "HN", "HR", "HT", "HU", "ID", "IE", "IL", "IM", "IN", "IO", "IQ", "IR", "IS", "IT", "JE", "JM",
    "JO", "JP", "KE", "KG", "KH", "KI", "KM", "KN", "KP", "KR", "KW", "KY", "KZ", "LA", "LB", "LC",
    "LI", "LK", "LR", "LS", "LT", "LU", "LV", "LY", "MA", "MC", "MD", "ME", "MF", "MG", "MH", "MK",
    "ML", "MM", "MN", "MO", "MP", "MQ", "MR", "MS", "MT", "MU", "MV", "MW", "MX", "MY", "MZ", "NA",
    "NC", "NE", "NF", "NG", "NI", "NL", "NO", "NP", "NR", "NU", "NZ", "OM", "PA", "PE", "PF", "PG",
    "PH", "PK", "PL", "PM", "PN", "PR", "PS", "PT", "PW", "PY", "QA", "RE", "RO", "RS", "RU", "RW",
    "SA", "SB", "SC", "SD", "SE", "SG", "SH", "SI", "SJ", "SK", "SL", "SM", "SN", "SO", "SR", "SS",
    "ST", "SV", "SX", "SY", "SZ", "TC", "TD", "TF", "TG", "TH", "TJ", "TK", "TL", "TM", "TN", "TO",
    "TR", "TT", "TV", "TW", "TZ", "UA", "UG", "UM", "US", "UY", "UZ", "VA", "VC", "VE", "VG", "VI",
    "VN", "VU", "WF", "WS", "XK", "YE", "YT", "ZA", "ZM", "ZW",
];

/// Whether `code` is an assigned ISO 3166-1 alpha-2 country code (upper case).
pub fn is_country_code(code: &str) -> bool {
    ISO_3166_ALPHA_2.binary_search(&code).is_ok()
}

fn validate_address(address: &PostalAddress) -> Result<PostalAddress, Reason> {
    let country = &address.country;
    if !is_country_code(country) {
        return Err(reason(
            ReasonCode::InvalidCharacters,
            "creditor_address.country must be an ISO 3166 alpha-2 code",
        ));
    }
    let parts = [
        ("creditor_address.street", &address.street, 70),
        (
            "creditor_address.building_number",
            &address.building_number,
            16,
        ),
        ("creditor_address.postal_code", &address.postal_code, 16),
        ("creditor_address.town", &address.town, 35),
    ];
    for (field, value, max) in parts {
        if let Some(text) = present(value) {
            if text.chars().count() > max {
                return Err(too_long(field, max));
            }
            if !is_sepa_text(text) {
                return Err(not_sepa_text(field));
            }
        }
    }
    Ok(PostalAddress {
        street: present(&address.street).map(str::to_owned),
        building_number: present(&address.building_number).map(str::to_owned),
        postal_code: present(&address.postal_code).map(str::to_owned),
        town: present(&address.town).map(str::to_owned),
        country: country.clone(),
    })
}

/// Validates a standing order. Its payment follows the single-payment rules, without a
/// requested execution date: the schedule replaces it.
pub fn validate_periodic(
    raw: &RawPeriodicPayment,
    limits: &ValidationLimits,
    today: NaiveDate,
) -> Result<StandingOrder, Reason> {
    if present(&raw.payment.requested_execution_date).is_some() {
        return Err(reason(
            ReasonCode::FieldNotAllowed,
            "requested_execution_date is not used by a standing order: set start_date",
        ));
    }
    let order = validate_initiation(&raw.payment, limits, today)?;
    let start_date = parse_iso_date(&raw.start_date).ok_or_else(|| {
        reason(
            ReasonCode::InvalidExecutionDate,
            "start_date must be a date yyyy-mm-dd",
        )
    })?;
    // Belfius: "begin date must be in the future" (B14821ZZ-1259-000000).
    if start_date <= today {
        return Err(reason(
            ReasonCode::InvalidExecutionDate,
            "start_date must be in the future",
        ));
    }
    if (start_date - today).num_days() > limits.max_execution_horizon_days {
        return Err(reason(
            ReasonCode::InvalidExecutionDate,
            format!(
                "start_date must be within {} days",
                limits.max_execution_horizon_days
            ),
        ));
    }
    let frequency = Frequency::parse(&raw.frequency).ok_or_else(|| {
        reason(
            ReasonCode::InvalidFrequency,
            "frequency must be one of DAILY, WEEKLY, EVERY_TWO_WEEKS, MONTHLY, EVERY_TWO_MONTHS, QUARTERLY, SEMI_ANNUAL, ANNUAL",
        )
    })?;
    let end_date = match present(&raw.end_date) {
        None => None,
        Some(text) => {
            let end = parse_iso_date(text).ok_or_else(|| {
                reason(
                    ReasonCode::InvalidExecutionDate,
                    "end_date must be a date yyyy-mm-dd",
                )
            })?;
            if end < start_date {
                return Err(reason(
                    ReasonCode::InvalidExecutionDate,
                    "end_date must not be before start_date",
                ));
            }
            // Belfius: the end date's month must fit the periodicity (B14821ZZ-1322-000000).
            if let Some(months) = frequency.months() {
                let span = (end.year_ce().1 as i64 * 12 + i64::from(end.month0()))
                    - (start_date.year_ce().1 as i64 * 12 + i64::from(start_date.month0()));
                if span % i64::from(months) != 0 {
                    return Err(reason(
                        ReasonCode::InvalidExecutionDate,
                        format!(
                            "end_date must fall a whole number of {} periods after start_date",
                            frequency.as_str()
                        ),
                    ));
                }
            }
            Some(end)
        }
    };
    let day_of_execution = match raw.day_of_execution {
        None => None,
        Some(day) => {
            let max = match frequency {
                Frequency::Weekly | Frequency::EveryTwoWeeks => 7,
                Frequency::Daily => 0,
                Frequency::Monthly
                | Frequency::EveryTwoMonths
                | Frequency::Quarterly
                | Frequency::SemiAnnual
                | Frequency::Annual => 31,
            };
            if day < 1 || day > max {
                return Err(reason(
                    ReasonCode::InvalidExecutionDate,
                    format!(
                        "day_of_execution must be 1..={max} for a {} standing order",
                        frequency.as_str()
                    ),
                ));
            }
            u8::try_from(day).ok()
        }
    };
    Ok(StandingOrder {
        order,
        start_date,
        end_date,
        frequency,
        day_of_execution,
    })
}

/// Validates a bulk payment: Belfius brand only, SEPA products, 1 to 1000 transfers with
/// distinct end-to-end ids, each valid as a single SEPA transfer.
pub fn validate_bulk(
    raw: &RawBulkPayment,
    limits: &ValidationLimits,
    today: NaiveDate,
) -> Result<BulkOrder, Reason> {
    let product = validate_product(&raw.payment_product)?;
    if !product.is_sepa() {
        return Err(reason(
            ReasonCode::InvalidProduct,
            "bulk payments are SEPA_CREDIT_TRANSFERS or INSTANT_SEPA_CREDIT_TRANSFERS",
        ));
    }
    let brand = validate_brand(&raw.brand)?;
    match brand {
        Brand::Belfius => {}
        Brand::Banx => {
            return Err(reason(
                ReasonCode::InvalidBrand,
                "bulk payments are offered to Belfius clients only, not Banx",
            ));
        }
    }
    if raw.payments.is_empty() {
        return Err(missing("payments"));
    }
    if raw.payments.len() > MAX_BULK_ENTRIES {
        return Err(reason(
            ReasonCode::FieldTooLong,
            format!("payments must hold at most {MAX_BULK_ENTRIES} transfers"),
        ));
    }
    let debtor_iban = match present(&raw.debtor_iban) {
        Some(iban) => Some(validate_iban_field("debtor_iban", iban, false)?),
        None => None,
    };
    let requested_execution_date = match present(&raw.requested_execution_date) {
        Some(date) => Some(validate_execution_date(date, limits, today)?),
        None => None,
    };
    let language = validate_language(&raw.language)?;
    let redirect_uri = validate_redirect_uri(&raw.redirect_uri)?;
    let mut payments = Vec::with_capacity(raw.payments.len());
    let mut seen = std::collections::HashSet::new();
    for (i, t) in raw.payments.iter().enumerate() {
        let at = |r: Reason| Reason::new(r.code, format!("payments[{i}]: {}", r.message));
        let amount = validate_amount(&t.amount, limits).map_err(at)?;
        let currency = validate_currency(&t.currency, product).map_err(at)?;
        let creditor_name = validate_creditor_name(&t.creditor_name).map_err(at)?;
        let creditor_iban =
            validate_iban_field("creditor_iban", &t.creditor_iban, true).map_err(at)?;
        let creditor_bic = match present(&t.creditor_bic) {
            Some(bic) => Some(validate_bic_field("creditor_bic", bic).map_err(at)?),
            None => None,
        };
        let end_to_end_id = validate_end_to_end_id(&t.end_to_end_id).map_err(at)?;
        if !seen.insert(end_to_end_id.clone()) {
            return Err(reason(
                ReasonCode::InvalidIdentifier,
                format!("payments[{i}]: end_to_end_id repeats an earlier transfer's"),
            ));
        }
        let remittance_information = match present(&t.remittance_information) {
            Some(text) => Some(validate_remittance(text).map_err(at)?),
            None => None,
        };
        payments.push(BulkEntry {
            amount,
            currency,
            creditor_name,
            creditor_iban,
            creditor_bic,
            end_to_end_id,
            remittance_information,
        });
    }
    Ok(BulkOrder {
        product,
        brand,
        debtor_iban,
        batch_booking: raw.batch_booking,
        requested_execution_date,
        payments,
        language,
        redirect_uri,
    })
}

/// Validates a consent request (`RequestConsent`) and turns it into a [`ConsentRequest`]: the
/// same rules as an initiation for the brand, the IBAN, the language and the redirect URI.
///
/// Fields are checked in declaration order; the first failure is returned.
pub fn validate_consent_request(raw: &RawConsentRequest) -> Result<ConsentRequest, Reason> {
    let brand = validate_brand(&raw.brand)?;
    let scope = validate_scope(&raw.scope)?;
    let account_iban = match (scope, present(&raw.account_iban)) {
        (ConsentScope::Caf, Some(iban)) => Some(validate_iban_field("account_iban", iban, true)?),
        (ConsentScope::Caf, None) => {
            return Err(reason(
                ReasonCode::MissingField,
                "account_iban is required for a CAF consent (the account the funds checks are for)",
            ));
        }
        // The bank lets the PSU pick the accounts in its own screens.
        (ConsentScope::Ais, Some(_)) => {
            return Err(reason(
                ReasonCode::FieldNotAllowed,
                "account_iban is not allowed for an AIS consent (the PSU picks the accounts at the bank)",
            ));
        }
        (ConsentScope::Ais, None) => None,
    };
    let language = validate_language(&raw.language)?;
    let redirect_uri = validate_redirect_uri(&raw.redirect_uri)?;
    Ok(ConsentRequest {
        brand,
        scope,
        account_iban,
        language,
        redirect_uri,
    })
}

fn validate_scope(value: &str) -> Result<ConsentScope, Reason> {
    if value.is_empty() {
        return Err(missing("scope"));
    }
    ConsentScope::parse(value).ok_or_else(|| {
        let symbols: Vec<&str> = ConsentScope::ALL.iter().map(|s| s.symbol()).collect();
        reason(
            ReasonCode::InvalidScope,
            format!("scope must be one of {}", symbols.join(", ")),
        )
    })
}

fn validate_product(value: &str) -> Result<PaymentProduct, Reason> {
    if value.is_empty() {
        return Err(missing("payment_product"));
    }
    PaymentProduct::from_symbol(value).ok_or_else(|| {
        let symbols: Vec<&str> = PaymentProduct::ALL.iter().map(|p| p.symbol()).collect();
        reason(
            ReasonCode::InvalidProduct,
            format!("payment_product must be one of {}", symbols.join(", ")),
        )
    })
}

fn validate_brand(value: &str) -> Result<Brand, Reason> {
    if value.is_empty() {
        return Err(missing("brand"));
    }
    Brand::ALL
        .into_iter()
        .find(|b| b.as_str() == value)
        .ok_or_else(|| {
            let names: Vec<&str> = Brand::ALL.iter().map(|b| b.as_str()).collect();
            reason(
                ReasonCode::InvalidBrand,
                format!("brand must be one of {}", names.join(", ")),
            )
        })
}

fn validate_amount(value: &str, limits: &ValidationLimits) -> Result<Amount, Reason> {
    if value.is_empty() {
        return Err(missing("amount"));
    }
    let too_large = || {
        reason(
            ReasonCode::AmountTooLarge,
            format!("amount must not exceed {}", limits.max_amount),
        )
    };
    let amount = Amount::parse(value).map_err(|e| match e {
        AmountError::TooLarge => too_large(),
        AmountError::Syntax => reason(
            ReasonCode::InvalidAmount,
            "amount must be a plain decimal number such as 12.34 \
             (no sign, exponent or thousands separator)",
        ),
        AmountError::TooManyDecimals => reason(
            ReasonCode::InvalidAmount,
            "amount must have at most 2 decimals",
        ),
    })?;
    if amount.minor() <= 0 {
        return Err(reason(
            ReasonCode::InvalidAmount,
            "amount must be greater than zero",
        ));
    }
    if amount > limits.max_amount {
        return Err(too_large());
    }
    Ok(amount)
}

fn validate_currency(value: &str, product: PaymentProduct) -> Result<String, Reason> {
    if value.is_empty() {
        return Err(missing("currency"));
    }
    if value.len() != 3 || !value.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(reason(
            ReasonCode::InvalidCurrency,
            "currency must be an ISO 4217 code of 3 upper-case letters",
        ));
    }
    if product.is_sepa() && value != "EUR" {
        return Err(reason(
            ReasonCode::InvalidCurrency,
            format!("currency must be EUR for {}", product.symbol()),
        ));
    }
    if !is_payable_currency(value) {
        return Err(reason(
            ReasonCode::InvalidCurrency,
            "currency must be an active ISO 4217 currency (not a fund, metal or test code)",
        ));
    }
    Ok(value.to_owned())
}

/// Active ISO 4217 currencies a transfer can be made in (ISO 4217 list one, 2025), without the
/// fund codes (BOV, CHE, CHW, CLF, COU, MXV, USN, UYI, UYW), precious metals (XAU, XAG, XPD,
/// XPT), bond-market units (XBA..XBD), SDR-like units (XDR, XSU, XUA) and test codes (XTS, XXX).
/// Sorted, for a binary search.
const PAYABLE_CURRENCIES: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BHD", "BIF", "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD",
    "CDF", "CHF", "CLP", "CNY", "COP", "CRC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD",
    "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ",
    "GYD", "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD", "JOD",
    "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR",
    "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR",
    "MWK", "MXN", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN",
    "PGK", "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR",
    "SDG", "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB",
    "TJS", "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "UYU", "UZS",
    "VED", "VES", "VND", "VUV", "WST", "XAF", "XCD", "XCG", "XOF", "XPF", "YER", "ZAR", "ZMW",
    "ZWG",
];

/// Currencies without minor units (ISO 4217 exponent 0): an amount in them is a whole number.
const ZERO_DECIMAL_CURRENCIES: &[&str] = &[
    "BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "VND", "VUV",
    "XAF", "XOF", "XPF",
];

/// Whether `code` is an active ISO 4217 currency that a transfer can be made in.
pub fn is_payable_currency(code: &str) -> bool {
    PAYABLE_CURRENCIES.binary_search(&code).is_ok()
}

/// Checks the amount against the currency's minor units (whole numbers for JPY, KRW...).
fn validate_amount_for_currency(amount: Amount, currency: &str) -> Result<(), Reason> {
    if ZERO_DECIMAL_CURRENCIES.contains(&currency) && amount.minor() % 100 != 0 {
        return Err(reason(
            ReasonCode::InvalidAmount,
            format!("amount must be a whole number in {currency}, which has no minor unit"),
        ));
    }
    Ok(())
}

fn validate_creditor_name(value: &str) -> Result<String, Reason> {
    const FIELD: &str = "creditor_name";
    if value.trim().is_empty() {
        return Err(missing(FIELD));
    }
    if value.chars().count() > MAX_CREDITOR_NAME_CHARS {
        return Err(too_long(FIELD, MAX_CREDITOR_NAME_CHARS));
    }
    if !is_sepa_text(value) {
        return Err(not_sepa_text(FIELD));
    }
    Ok(value.to_owned())
}

/// `required`: whether a blank value means the field is missing (rather than malformed).
fn validate_iban_field(field: &str, value: &str, required: bool) -> Result<String, Reason> {
    let iban = normalise_iban(value);
    if iban.is_empty() {
        return Err(if required {
            missing(field)
        } else {
            reason(
                ReasonCode::InvalidIban,
                format!("{field} must be a valid IBAN or be left empty, not blank"),
            )
        });
    }
    match check_iban(&iban) {
        Ok(()) => Ok(iban),
        Err(problem) => Err(reason(
            ReasonCode::InvalidIban,
            format!("{field} is not a valid IBAN: {}", problem.describe()),
        )),
    }
}

fn validate_bic_field(field: &str, value: &str) -> Result<String, Reason> {
    let bic = normalise_bic(value);
    if check_bic(&bic) {
        Ok(bic)
    } else {
        Err(reason(
            ReasonCode::InvalidBic,
            format!(
                "{field} must be an ISO 9362 BIC: 4 letters, 2-letter country, \
                 2 letters or digits, optionally 3 more letters or digits"
            ),
        ))
    }
}

fn validate_end_to_end_id(value: &str) -> Result<String, Reason> {
    const FIELD: &str = "end_to_end_id";
    if value.trim().is_empty() {
        return Err(missing(FIELD));
    }
    if value.chars().count() > MAX_END_TO_END_ID_CHARS {
        return Err(too_long(FIELD, MAX_END_TO_END_ID_CHARS));
    }
    if !is_sepa_text(value) {
        return Err(not_sepa_text(FIELD));
    }
    if value.starts_with('/') || value.ends_with('/') || value.contains("//") {
        return Err(reason(
            ReasonCode::InvalidCharacters,
            "end_to_end_id must not start or end with '/' nor contain '//'",
        ));
    }
    Ok(value.to_owned())
}

fn validate_remittance(value: &str) -> Result<String, Reason> {
    const FIELD: &str = "remittance_information";
    if value.chars().count() > MAX_REMITTANCE_CHARS {
        return Err(too_long(FIELD, MAX_REMITTANCE_CHARS));
    }
    if !is_sepa_text(value) {
        return Err(not_sepa_text(FIELD));
    }
    Ok(value.to_owned())
}

/// Strict `yyyy-mm-dd`: exactly 10 ASCII characters, no sign, no padding, a real calendar day.
fn parse_iso_date(value: &str) -> Option<NaiveDate> {
    let b = value.as_bytes();
    let shape_ok = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !shape_ok {
        return None;
    }
    let year: i32 = value.get(0..4)?.parse().ok()?;
    let month: u32 = value.get(5..7)?.parse().ok()?;
    let day: u32 = value.get(8..10)?.parse().ok()?;
    NaiveDate::from_ymd_opt(year, month, day)
}

fn validate_execution_date(
    value: &str,
    limits: &ValidationLimits,
    today: NaiveDate,
) -> Result<NaiveDate, Reason> {
    const FIELD: &str = "requested_execution_date";
    let date = parse_iso_date(value).ok_or_else(|| {
        reason(
            ReasonCode::InvalidExecutionDate,
            format!("{FIELD} must be an ISO date yyyy-mm-dd"),
        )
    })?;
    if date < today {
        return Err(reason(
            ReasonCode::InvalidExecutionDate,
            format!("{FIELD} must not be in the past"),
        ));
    }
    // A horizon too large to represent means no upper bound in practice.
    let latest = TimeDelta::try_days(limits.max_execution_horizon_days)
        .and_then(|d| today.checked_add_signed(d))
        .unwrap_or(NaiveDate::MAX);
    if date > latest {
        return Err(reason(
            ReasonCode::InvalidExecutionDate,
            format!(
                "{FIELD} must not be more than {} days ahead",
                limits.max_execution_horizon_days
            ),
        ));
    }
    Ok(date)
}

fn validate_language(value: &str) -> Result<Language, Reason> {
    if value.is_empty() {
        return Err(missing("language"));
    }
    Language::parse(value)
        .ok_or_else(|| reason(ReasonCode::InvalidLanguage, "language must be fr or nl"))
}

fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(Host::Domain(domain)) => domain == "localhost",
        Some(Host::Ipv4(ip)) => ip == std::net::Ipv4Addr::LOCALHOST,
        _ => false,
    }
}

fn validate_redirect_uri(value: &str) -> Result<String, Reason> {
    const FIELD: &str = "redirect_uri";
    let invalid = |rule: &str| reason(ReasonCode::InvalidRedirectUri, format!("{FIELD} {rule}"));
    if value.is_empty() {
        return Err(missing(FIELD));
    }
    if value.chars().count() > MAX_REDIRECT_URI_CHARS {
        return Err(invalid(&format!(
            "must not be longer than {MAX_REDIRECT_URI_CHARS} characters"
        )));
    }
    // The URL parser silently drops surrounding spaces and embedded tabs/newlines; the value is
    // forwarded as sent, so refuse them rather than forward something the parser did not see.
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid("must not contain spaces or control characters"));
    }
    let url = Url::parse(value).map_err(|_| invalid("must be an absolute URL"))?;
    match url.scheme() {
        "https" => {}
        "http" if is_loopback_host(&url) => {}
        _ => {
            return Err(invalid(
                "must use https (http is allowed only for localhost and 127.0.0.1)",
            ));
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("must have a host"));
    }
    if url.fragment().is_some() {
        return Err(invalid("must not have a fragment"));
    }
    Ok(value.to_owned())
}

fn identifier(
    field: &str,
    value: &str,
    max: usize,
    allowed: fn(u8) -> bool,
    charset: &str,
) -> Result<(), Reason> {
    // All allowed characters are ASCII, so once every byte is allowed, bytes == characters.
    if value.is_empty() || value.len() > max || !value.bytes().all(allowed) {
        return Err(reason(
            ReasonCode::InvalidIdentifier,
            format!("{field} must be 1 to {max} characters of {charset}"),
        ));
    }
    Ok(())
}

/// A payment id: `^[A-Za-z0-9-]{1,35}$` (the Belfius constraint).
pub fn validate_payment_id(value: &str) -> Result<(), Reason> {
    identifier(
        "payment_id",
        value,
        MAX_PAYMENT_ID_CHARS,
        |b| b.is_ascii_alphanumeric() || b == b'-',
        "A-Z a-z 0-9 -",
    )
}

/// A PSU id: 1 to 64 characters of `[A-Za-z0-9._:@-]`.
pub fn validate_psu_id(value: &str) -> Result<(), Reason> {
    identifier(
        "psu_id",
        value,
        MAX_PSU_ID_CHARS,
        |b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'),
        "A-Z a-z 0-9 . _ : @ -",
    )
}

/// A command id: 1 to 64 characters of `[A-Za-z0-9._:-]`.
pub fn validate_command_id(value: &str) -> Result<(), Reason> {
    identifier(
        "command_id",
        value,
        MAX_COMMAND_ID_CHARS,
        |b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'),
        "A-Z a-z 0-9 . _ : -",
    )
}

/// A bank payment id named by a person (`ResolveOutcome` ADOPT): 1 to 64 characters of
/// `[A-Za-z0-9._-]` (the ids Belfius is reported to use fit in 35 of `[a-zA-Z0-9-]`).
pub fn validate_bank_payment_id(value: &str) -> Result<(), Reason> {
    identifier(
        "bank_payment_id",
        value,
        64,
        |b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'),
        "A-Z a-z 0-9 . _ -",
    )
}

/// A person's note (`ResolveOutcome`): at most 140 characters of the SEPA set, as it goes into
/// a status event's reason.
pub fn validate_note(value: &str) -> Result<(), Reason> {
    if value.chars().count() > 140 {
        return Err(Reason::new(
            ReasonCode::FieldTooLong,
            "note: more than 140 characters",
        ));
    }
    if !is_sepa_text(value) {
        return Err(Reason::new(
            ReasonCode::InvalidCharacters,
            "note: outside the SEPA character set",
        ));
    }
    Ok(())
}

/// Removes spaces and upper-cases ASCII letters (the paper format `be68 5390 ...` becomes
/// `BE68539007547034`). Other characters are kept so that validation still sees them.
pub fn normalise_iban(value: &str) -> String {
    value
        .chars()
        .filter(|c| *c != ' ')
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

/// Same normalisation as [`normalise_iban`]: spaces removed, ASCII letters upper-cased.
pub fn normalise_bic(value: &str) -> String {
    normalise_iban(value)
}

/// IBAN length per country code: the full SWIFT IBAN registry (89 countries, as of 2025).
/// Territories that use another country's prefix (AX, GF, GP, IM, JE, ...) are covered by it.
const IBAN_LENGTHS: &[(&str, usize)] = &[
    ("AD", 24),
    ("AE", 23),
    ("AL", 28),
    ("AT", 20),
    ("AZ", 28),
    ("BA", 20),
    ("BE", 16),
    ("BG", 22),
    ("BH", 22),
    ("BI", 27),
    ("BR", 29),
    ("BY", 28),
    ("CH", 21),
    ("CR", 22),
    ("CY", 28),
    ("CZ", 24),
    ("DE", 22),
    ("DJ", 27),
    ("DK", 18),
    ("DO", 28),
    ("EE", 20),
    ("EG", 29),
    ("ES", 24),
    ("FI", 18),
    ("FK", 18),
    ("FO", 18),
    ("FR", 27),
    ("GB", 22),
    ("GE", 22),
    ("GI", 23),
    ("GL", 18),
    ("GR", 27),
    ("GT", 28),
    ("HN", 28),
    ("HR", 21),
    ("HU", 28),
    ("IE", 22),
    ("IL", 23),
    ("IQ", 23),
    ("IS", 26),
    ("IT", 27),
    ("JO", 30),
    ("KW", 30),
    ("KZ", 20),
    ("LB", 28),
    ("LC", 32),
    ("LI", 21),
    ("LT", 20),
    ("LU", 20),
    ("LV", 21),
    ("LY", 25),
    ("MC", 27),
    ("MD", 24),
    ("ME", 22),
    ("MK", 19),
    ("MN", 20),
    ("MR", 27),
    ("MT", 31),
    ("MU", 30),
    ("NI", 28),
    ("NL", 18),
    ("NO", 15),
    ("OM", 23),
    ("PK", 24),
    ("PL", 28),
    ("PS", 29),
    ("PT", 25),
    ("QA", 29),
    ("RO", 24),
    ("RS", 22),
    ("RU", 33),
    ("SA", 24),
    ("SC", 31),
    ("SD", 18),
    ("SE", 24),
    ("SI", 19),
    ("SK", 24),
    ("SM", 27),
    ("SO", 23),
    ("ST", 25),
    ("SV", 28),
    ("TL", 23),
    ("TN", 24),
    ("TR", 26),
    ("UA", 29),
    ("VA", 22),
    ("VG", 24),
    ("XK", 20),
    ("YE", 30),
];

fn iban_length(country: &str) -> Option<usize> {
    IBAN_LENGTHS
        .binary_search_by(|(code, _)| (*code).cmp(country))
        .ok()
        .and_then(|i| IBAN_LENGTHS.get(i))
        .map(|(_, len)| *len)
}

/// Why a normalised IBAN was refused; the text names the rule, never the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IbanProblem {
    UnknownCountry,
    WrongLength,
    CheckDigitsNotNumeric,
    BbanNotAlphanumeric,
    ChecksumMismatch,
}

impl IbanProblem {
    fn describe(self) -> &'static str {
        match self {
            IbanProblem::UnknownCountry => "the country code is not in the IBAN registry",
            IbanProblem::WrongLength => "the length does not match its country",
            IbanProblem::CheckDigitsNotNumeric => "the check digits must be 2 digits from 02 to 98",
            IbanProblem::BbanNotAlphanumeric => "the account part may only contain A-Z and 0-9",
            IbanProblem::ChecksumMismatch => "the check digits do not match (mod 97)",
        }
    }
}

/// Value of an IBAN character in the ISO 7064 mod 97-10 scheme: 0-9 for digits, 10-35 for letters.
fn iban_char_value(b: u8) -> Option<u32> {
    match b {
        b'0'..=b'9' => Some(u32::from(b - b'0')),
        b'A'..=b'Z' => Some(u32::from(b - b'A') + 10),
        _ => None,
    }
}

/// Checks an already normalised IBAN.
fn check_iban(iban: &str) -> Result<(), IbanProblem> {
    let bytes = iban.as_bytes();
    let country = iban.get(0..2).ok_or(IbanProblem::UnknownCountry)?;
    if !country.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(IbanProblem::UnknownCountry);
    }
    let expected_len = iban_length(country).ok_or(IbanProblem::UnknownCountry)?;
    // Byte length: any non-ASCII character is caught below as a non-alphanumeric BBAN.
    if bytes.len() != expected_len {
        return Err(IbanProblem::WrongLength);
    }
    let check = iban.get(2..4).ok_or(IbanProblem::WrongLength)?;
    if !check.bytes().all(|b| b.is_ascii_digit()) {
        return Err(IbanProblem::CheckDigitsNotNumeric);
    }
    // ISO 13616: check digits range from 02 to 98; 00, 01 and 99 are never issued
    // (01 and 98 are congruent mod 97, so the checksum alone would accept both).
    if matches!(check, "00" | "01" | "99") {
        return Err(IbanProblem::CheckDigitsNotNumeric);
    }
    let bban = iban.get(4..).ok_or(IbanProblem::WrongLength)?;
    if !bban
        .bytes()
        .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
    {
        return Err(IbanProblem::BbanNotAlphanumeric);
    }
    // Move the first four characters to the end, read letters as 10..35, take the number mod 97.
    // Piecewise: the remainder stays below 97, so `remainder * 100 + 35` always fits in a u32.
    let mut remainder: u32 = 0;
    for &b in bban.as_bytes().iter().chain(&bytes[..4]) {
        let value = iban_char_value(b).ok_or(IbanProblem::BbanNotAlphanumeric)?;
        let scale = if value < 10 { 10 } else { 100 };
        remainder = (remainder * scale + value) % 97;
    }
    if remainder == 1 {
        Ok(())
    } else {
        Err(IbanProblem::ChecksumMismatch)
    }
}

/// Whether `value` is a valid IBAN once normalised (spaces removed, upper-cased): a country
/// code from the SWIFT IBAN registry with that country's exact length, 2 check digits, an
/// alphanumeric BBAN and an ISO 7064 mod 97-10 checksum equal to 1.
/// National BBAN check digits are not verified.
pub fn is_valid_iban(value: &str) -> bool {
    check_iban(&normalise_iban(value)).is_ok()
}

/// Checks an already normalised BIC.
fn check_bic(bic: &str) -> bool {
    let b = bic.as_bytes();
    if b.len() != 8 && b.len() != 11 {
        return false;
    }
    let upper_alnum = |c: &u8| c.is_ascii_uppercase() || c.is_ascii_digit();
    b[..4].iter().all(u8::is_ascii_uppercase)
        && b[4..6].iter().all(u8::is_ascii_uppercase)
        && b[6..].iter().all(upper_alnum)
}

/// Whether `value` is an ISO 9362 BIC once normalised (spaces removed, upper-cased): 4-letter
/// bank code, 2-letter country code, 2 letters or digits for the location, and optionally
/// 3 letters or digits for the branch; 8 or 11 characters in all.
pub fn is_valid_bic(value: &str) -> bool {
    check_bic(&normalise_bic(value))
}

/// Whether every character belongs to the SEPA basic Latin set:
/// `a-z A-Z 0-9 / - ? : ( ) . , ' +` and space. The empty string is trivially SEPA text.
pub fn is_sepa_text(value: &str) -> bool {
    value.chars().all(|c| {
        c.is_ascii_alphanumeric()
            || matches!(
                c,
                '/' | '-' | '?' | ':' | '(' | ')' | '.' | ',' | '\'' | '+' | ' '
            )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2025, 3, 1).unwrap()
    }

    fn valid_raw() -> RawInitiatePayment {
        RawInitiatePayment {
            payment_product: "SEPA_CREDIT_TRANSFERS".into(),
            brand: "BELFIUS".into(),
            amount: "123.45".into(),
            currency: "EUR".into(),
            creditor_name: "Jan Peeters".into(),
            creditor_iban: "be71 0961 2345 6769".into(),
            creditor_bic: Some("gkcc bebb".into()),
            debtor_iban: Some("BE68539007547034".into()),
            end_to_end_id: "E2E-2025-0001".into(),
            remittance_information: Some("Invoice 2025/001".into()),
            requested_execution_date: Some("2025-03-10".into()),
            language: "nl".into(),
            redirect_uri: "https://tpp.example.com/return?state=abc".into(),
            ..Default::default()
        }
    }

    fn validate(raw: &RawInitiatePayment) -> Result<PaymentOrder, Reason> {
        validate_initiation(raw, &ValidationLimits::default(), today())
    }

    fn code_of(raw: &RawInitiatePayment) -> ReasonCode {
        match validate(raw) {
            Ok(order) => panic!("expected a refusal, got {order:?}"),
            Err(r) => r.code,
        }
    }

    fn with(edit: impl FnOnce(&mut RawInitiatePayment)) -> RawInitiatePayment {
        let mut raw = valid_raw();
        edit(&mut raw);
        raw
    }

    /// Independent reference: check digits for a Belgian BBAN using plain u128 arithmetic.
    fn belgian_check_digits(bban: &str) -> u32 {
        // "BE00" moved to the end: B=11, E=14.
        let n: u128 = format!("{bban}111400").parse().unwrap();
        98 - (n % 97) as u32
    }

    // ---------------------------------------------------------------- IBAN

    const VALID_IBANS: [&str; 6] = [
        "BE68539007547034",
        "BE71096123456769",
        "DE89370400440532013000",
        "FR1420041010050500013M02606",
        "NL91ABNA0417164300",
        "GB82WEST12345698765432",
    ];

    #[test]
    fn valid_ibans_from_several_countries() {
        for iban in VALID_IBANS {
            assert!(is_valid_iban(iban), "{iban}");
        }
        // More registry examples, to exercise letters in the BBAN and long/short lengths.
        for iban in [
            "AT611904300234573201",
            "CH9300762011623852957",
            "ES9121000418450200051332",
            "IT60X0542811101000000123456",
            "LU280019400644750000",
            "NO9386011117947",
            "PL61109010140000071219812874",
            "MT84MALT011000012345MTLCAST001S",
            "LC55HEMM000100010012001200023015",
        ] {
            assert!(is_valid_iban(iban), "{iban}");
        }
    }

    #[test]
    fn every_single_digit_change_is_detected() {
        for iban in VALID_IBANS {
            let bytes = iban.as_bytes();
            for i in 2..bytes.len() {
                if !bytes[i].is_ascii_digit() {
                    continue;
                }
                let mut changed = bytes.to_vec();
                changed[i] = if bytes[i] == b'9' { b'0' } else { bytes[i] + 1 };
                let changed = String::from_utf8(changed).unwrap();
                assert!(!is_valid_iban(&changed), "{changed} should be invalid");
            }
        }
    }

    #[test]
    fn wrong_length_is_rejected() {
        assert!(!is_valid_iban("BE6853900754703"));
        assert!(!is_valid_iban("BE685390075470340"));
        assert_eq!(check_iban("BE6853900754703"), Err(IbanProblem::WrongLength));
        // A Belgian-length IBAN under the Dutch prefix.
        assert_eq!(
            check_iban("NL68539007547034"),
            Err(IbanProblem::WrongLength)
        );
        assert!(!is_valid_iban(""));
        assert!(!is_valid_iban("B"));
        assert!(!is_valid_iban("BE"));
        assert!(!is_valid_iban("BE68"));
    }

    #[test]
    fn country_codes_are_the_assigned_iso_3166_ones() {
        assert!(
            ISO_3166_ALPHA_2.windows(2).all(|w| w[0] < w[1]),
            "sorted, no repeats"
        );
        for code in ["BE", "NL", "US", "GB", "XK", "AX"] {
            assert!(is_country_code(code), "{code}");
        }
        // Part 4: ZX looked like a code (two upper-case letters) and was accepted.
        for code in ["ZX", "ZZ", "XX", "EU", "UK", "GBR", "be", "B", ""] {
            assert!(!is_country_code(code), "{code}");
        }
    }

    #[test]
    fn unknown_country_is_rejected() {
        assert_eq!(
            check_iban("XX68539007547034"),
            Err(IbanProblem::UnknownCountry)
        );
        assert_eq!(
            check_iban("US68539007547034"),
            Err(IbanProblem::UnknownCountry)
        );
        assert_eq!(
            check_iban("1E68539007547034"),
            Err(IbanProblem::UnknownCountry)
        );
        assert!(!is_valid_iban("ZZ00"));
    }

    #[test]
    fn lowercase_and_spaces_are_normalised() {
        assert_eq!(normalise_iban(" be68 5390 0754 7034 "), "BE68539007547034");
        assert!(is_valid_iban("be68 5390 0754 7034"));
        assert!(is_valid_iban("fr14 2004 1010 0505 0001 3m02 606"));
        assert!(is_valid_iban("  GB82 WEST 1234 5698 7654 32"));
        // Only spaces are removed: other separators are refused.
        assert!(!is_valid_iban("BE68-5390-0754-7034"));
        assert!(!is_valid_iban("BE68\t539007547034"));
    }

    #[test]
    fn bad_check_digits_and_characters_are_rejected() {
        assert_eq!(
            check_iban("BEX8539007547034"),
            Err(IbanProblem::CheckDigitsNotNumeric)
        );
        assert_eq!(
            check_iban("BE6853900754703!"),
            Err(IbanProblem::BbanNotAlphanumeric)
        );
        // Non-ASCII characters never panic on slicing and are refused.
        assert!(!is_valid_iban("BÉ68539007547034"));
        assert!(!is_valid_iban("BE68539007547Ö4"));
        assert!(!is_valid_iban("é"));
        for check in ["00", "99"] {
            assert!(!is_valid_iban(&format!("BE{check}539007547034")));
        }
    }

    #[test]
    fn check_digits_01_are_refused_even_when_mod97_holds() {
        // Find a Belgian BBAN whose proper check digits are 98: then 01 also satisfies mod 97.
        let bban = (0u64..)
            .map(|n| format!("{n:012}"))
            .find(|b| belgian_check_digits(b) == 98)
            .unwrap();
        assert!(is_valid_iban(&format!("BE98{bban}")));
        assert_eq!(
            check_iban(&format!("BE01{bban}")),
            Err(IbanProblem::CheckDigitsNotNumeric)
        );
    }

    #[test]
    fn registry_table_is_sorted_unique_and_plausible() {
        for pair in IBAN_LENGTHS.windows(2) {
            assert!(pair[0].0 < pair[1].0, "{:?} before {:?}", pair[0], pair[1]);
        }
        for (code, len) in IBAN_LENGTHS {
            assert!(code.len() == 2 && code.bytes().all(|b| b.is_ascii_uppercase()));
            assert!((15..=34).contains(len), "{code} {len}");
            assert_eq!(iban_length(code), Some(*len));
        }
        assert_eq!(iban_length("BE"), Some(16));
        assert_eq!(iban_length("NO"), Some(15));
        assert_eq!(iban_length("RU"), Some(33));
        assert_eq!(iban_length("US"), None);
        assert_eq!(IBAN_LENGTHS.len(), 89);
    }

    // ---------------------------------------------------------------- BIC

    #[test]
    fn bic_cases() {
        for ok in [
            "GEBABEBB",
            "GKCCBEBB",
            "GKCCBEBB001",
            "BBRUBEBB",
            "DEUTDEFF500",
            "NEDSZAJJ",
        ] {
            assert!(is_valid_bic(ok), "{ok}");
        }
        // Upper-cased (and spaces removed) before the check.
        assert!(is_valid_bic("gebabebb"));
        assert!(is_valid_bic("GKCC BE BB 001"));
        assert_eq!(normalise_bic("gkcc bebb"), "GKCCBEBB");
        for bad in [
            "",
            "GEBA",
            "GEBABEB_",
            "GEBABEB",
            "GEBABEBB0",
            "GEBABEBB0012",
            "GEB1BEBB",
            "GEBAB1BB",
            "GEBABEB!",
            "GEBABEBB00!",
            "GEBABÉBB",
        ] {
            assert!(!is_valid_bic(bad), "{bad:?}");
        }
        // Location codes are 2 letters or digits, so "GEBABEB1" (location "B1") is well-formed.
        assert!(is_valid_bic("GEBABEB1"));
        assert!(is_valid_bic("GEBABE22"));
    }

    // ---------------------------------------------------------------- text and identifiers

    #[test]
    fn sepa_text_cases() {
        assert!(is_sepa_text(
            "Jan Peeters (BV) - invoice 12/3, ref: A+B? 'ok'."
        ));
        assert!(is_sepa_text(""));
        for bad in [
            "Zoë",
            "A&B",
            "a_b",
            "x@y",
            "tab\t",
            "new\nline",
            "€5",
            "#1",
            "\"q\"",
        ] {
            assert!(!is_sepa_text(bad), "{bad:?}");
        }
    }

    #[test]
    fn payment_id_cases() {
        assert!(validate_payment_id("abc-DEF-123").is_ok());
        assert!(validate_payment_id(&"a".repeat(35)).is_ok());
        for bad in ["", "a b", "a_b", "a.b", "é", &"a".repeat(36)] {
            let err = validate_payment_id(bad).unwrap_err();
            assert_eq!(err.code, ReasonCode::InvalidIdentifier, "{bad:?}");
            assert!(err.message.starts_with("payment_id "));
        }
    }

    #[test]
    fn psu_id_cases() {
        assert!(validate_psu_id("user.name_1:x@bank-be").is_ok());
        assert!(validate_psu_id(&"a".repeat(64)).is_ok());
        for bad in ["", "a b", "a/b", "a+b", "ü", &"a".repeat(65)] {
            assert_eq!(
                validate_psu_id(bad).unwrap_err().code,
                ReasonCode::InvalidIdentifier,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn command_id_cases() {
        assert!(validate_command_id("cmd.1_2:3-4").is_ok());
        assert!(validate_command_id(&"a".repeat(64)).is_ok());
        for bad in ["", "a@b", "a b", "a/b", &"a".repeat(65)] {
            assert_eq!(
                validate_command_id(bad).unwrap_err().code,
                ReasonCode::InvalidIdentifier,
                "{bad:?}"
            );
        }
    }

    // ---------------------------------------------------------------- validate_initiation

    #[test]
    fn valid_command_yields_normalised_order() {
        let order = validate(&valid_raw()).unwrap();
        assert_eq!(order.product, PaymentProduct::SepaCreditTransfers);
        assert_eq!(order.brand, Brand::Belfius);
        assert_eq!(order.amount, Amount::from_minor(12_345));
        assert_eq!(order.currency, "EUR");
        assert_eq!(order.creditor_name, "Jan Peeters");
        assert_eq!(order.creditor_iban, "BE71096123456769");
        assert_eq!(order.creditor_bic.as_deref(), Some("GKCCBEBB"));
        assert_eq!(order.debtor_iban.as_deref(), Some("BE68539007547034"));
        assert_eq!(order.end_to_end_id, "E2E-2025-0001");
        assert_eq!(
            order.remittance_information.as_deref(),
            Some("Invoice 2025/001")
        );
        assert_eq!(
            order.requested_execution_date,
            NaiveDate::from_ymd_opt(2025, 3, 10)
        );
        assert_eq!(order.language, Language::Nl);
        assert_eq!(
            order.redirect_uri,
            "https://tpp.example.com/return?state=abc"
        );
    }

    #[test]
    fn empty_optional_fields_count_as_absent() {
        let raw = with(|r| {
            r.creditor_bic = Some(String::new());
            r.debtor_iban = Some(String::new());
            r.remittance_information = Some(String::new());
            r.requested_execution_date = Some(String::new());
        });
        let order = validate(&raw).unwrap();
        assert_eq!(order.creditor_bic, None);
        assert_eq!(order.debtor_iban, None);
        assert_eq!(order.remittance_information, None);
        assert_eq!(order.requested_execution_date, None);

        let raw = with(|r| {
            r.creditor_bic = None;
            r.debtor_iban = None;
            r.remittance_information = None;
            r.requested_execution_date = None;
        });
        assert!(validate(&raw).is_ok());
    }

    #[test]
    fn free_text_is_not_trimmed() {
        let raw = with(|r| {
            r.creditor_name = " Jan ".into();
            r.remittance_information = Some(" ref ".into());
        });
        let order = validate(&raw).unwrap();
        assert_eq!(order.creditor_name, " Jan ");
        assert_eq!(order.remittance_information.as_deref(), Some(" ref "));
    }

    #[test]
    fn empty_required_fields_are_missing() {
        let edits: [fn(&mut RawInitiatePayment); 9] = [
            |r| r.payment_product.clear(),
            |r| r.brand.clear(),
            |r| r.amount.clear(),
            |r| r.currency.clear(),
            |r| r.creditor_name.clear(),
            |r| r.creditor_iban.clear(),
            |r| r.end_to_end_id.clear(),
            |r| r.language.clear(),
            |r| r.redirect_uri.clear(),
        ];
        for edit in edits {
            let raw = with(edit);
            let err = validate(&raw).unwrap_err();
            assert_eq!(err.code, ReasonCode::MissingField, "{err:?}");
            assert!(err.message.ends_with(" is required"), "{err:?}");
        }
        assert_eq!(
            code_of(&with(|r| r.creditor_name = "   ".into())),
            ReasonCode::MissingField
        );
        assert_eq!(
            code_of(&with(|r| r.end_to_end_id = " ".into())),
            ReasonCode::MissingField
        );
        assert_eq!(
            code_of(&with(|r| r.creditor_iban = "   ".into())),
            ReasonCode::MissingField
        );
    }

    #[test]
    fn invalid_product() {
        for bad in [
            "SEPA",
            "sepa_credit_transfers",
            "sepa-credit-transfers",
            " SEPA_CREDIT_TRANSFERS",
        ] {
            let err = validate(&with(|r| r.payment_product = bad.into())).unwrap_err();
            assert_eq!(err.code, ReasonCode::InvalidProduct, "{bad}");
            assert!(err.message.starts_with("payment_product "));
        }
        for p in PaymentProduct::ALL {
            let raw = with(|r| {
                r.payment_product = p.symbol().into();
                if !p.is_sepa() {
                    r.charge_bearer = Some("SHAR".into());
                }
            });
            assert_eq!(validate(&raw).unwrap().product, p);
        }
    }

    #[test]
    fn invalid_brand() {
        for bad in ["belfius", "Banx", "ING", "BELFIUS "] {
            assert_eq!(
                code_of(&with(|r| r.brand = bad.into())),
                ReasonCode::InvalidBrand,
                "{bad}"
            );
        }
        let order = validate(&with(|r| r.brand = "BANX".into())).unwrap();
        assert_eq!(order.brand, Brand::Banx);
    }

    #[test]
    fn invalid_amount() {
        for bad in [
            "abc", "0", "0.00", "0.0", "-1", "1.234", "1,00", "1e3", " 1",
        ] {
            assert_eq!(
                code_of(&with(|r| r.amount = bad.into())),
                ReasonCode::InvalidAmount,
                "{bad}"
            );
        }
        assert!(validate(&with(|r| r.amount = "0.01".into())).is_ok());
    }

    #[test]
    fn amount_too_large() {
        assert_eq!(
            code_of(&with(|r| r.amount = "1000000.01".into())),
            ReasonCode::AmountTooLarge
        );
        assert_eq!(
            code_of(&with(|r| r.amount = "1234567890123456".into())),
            ReasonCode::AmountTooLarge
        );
        let order = validate(&with(|r| r.amount = "1000000.00".into())).unwrap();
        assert_eq!(order.amount, Amount::from_minor(100_000_000));

        let limits = ValidationLimits {
            max_amount: Amount::from_minor(5_000),
            ..ValidationLimits::default()
        };
        let err = validate_initiation(&with(|r| r.amount = "50.01".into()), &limits, today())
            .unwrap_err();
        assert_eq!(err.code, ReasonCode::AmountTooLarge);
        assert_eq!(err.message, "amount must not exceed 50.00");
        assert!(validate_initiation(&with(|r| r.amount = "50".into()), &limits, today()).is_ok());
    }

    #[test]
    fn invalid_currency() {
        for bad in ["eur", "EU", "EURO", "E1R", "ÉUR"] {
            assert_eq!(
                code_of(&with(|r| r.currency = bad.into())),
                ReasonCode::InvalidCurrency,
                "{bad}"
            );
        }
        // SEPA products move euros only.
        assert_eq!(
            code_of(&with(|r| r.currency = "USD".into())),
            ReasonCode::InvalidCurrency
        );
        assert_eq!(
            code_of(&with(|r| {
                r.payment_product = "INSTANT_SEPA_CREDIT_TRANSFERS".into();
                r.currency = "GBP".into();
            })),
            ReasonCode::InvalidCurrency
        );
        let order = validate(&with(|r| {
            r.payment_product = "CROSS_BORDER_CREDIT_TRANSFERS".into();
            r.currency = "USD".into();
            r.charge_bearer = Some("DEBT".into());
        }))
        .unwrap();
        assert_eq!(order.currency, "USD");
        assert_eq!(
            code_of(&with(|r| {
                r.payment_product = "CROSS_BORDER_CREDIT_TRANSFERS".into();
                r.currency = "usd".into();
            })),
            ReasonCode::InvalidCurrency
        );
    }

    #[test]
    fn currency_must_be_an_active_payable_iso_4217_code() {
        let cross_border = |currency: &str, amount: &str| {
            let (currency, amount) = (currency.to_owned(), amount.to_owned());
            with(move |r| {
                r.payment_product = "CROSS_BORDER_CREDIT_TRANSFERS".into();
                r.currency = currency;
                r.amount = amount;
                r.charge_bearer = Some("DEBT".into());
            })
        };
        for good in ["USD", "GBP", "CHF", "JPY", "XOF", "EUR"] {
            let amount = if good == "JPY" || good == "XOF" {
                "100"
            } else {
                "10.50"
            };
            assert!(validate(&cross_border(good, amount)).is_ok(), "{good}");
        }
        // Shaped like a code, but not a currency one can pay in.
        for bad in ["XYZ", "XAU", "XTS", "XXX", "XDR", "HRK", "CHE"] {
            assert_eq!(
                code_of(&cross_border(bad, "10.00")),
                ReasonCode::InvalidCurrency,
                "{bad}"
            );
        }
        // No minor unit: whole amounts only.
        assert_eq!(
            code_of(&cross_border("JPY", "100.50")),
            ReasonCode::InvalidAmount
        );
        assert!(validate(&cross_border("JPY", "100.00")).is_ok());
        assert!(
            PAYABLE_CURRENCIES.windows(2).all(|w| w[0] < w[1]),
            "sorted and unique"
        );
        assert!(
            ZERO_DECIMAL_CURRENCIES
                .iter()
                .all(|c| is_payable_currency(c)),
            "every zero-decimal currency is payable"
        );
    }

    #[test]
    fn creditor_name_boundaries() {
        assert!(validate(&with(|r| r.creditor_name = "a".repeat(70))).is_ok());
        let err = validate(&with(|r| r.creditor_name = "a".repeat(71))).unwrap_err();
        assert_eq!(err.code, ReasonCode::FieldTooLong);
        assert_eq!(
            err.message,
            "creditor_name must not be longer than 70 characters"
        );
        // Length counts characters, not bytes: 70 non-ASCII letters are refused for their charset.
        assert_eq!(
            code_of(&with(|r| r.creditor_name = "é".repeat(70))),
            ReasonCode::InvalidCharacters
        );
    }

    #[test]
    fn creditor_name_charset() {
        for bad in ["Zoë Janssens", "A & B", "Jan_Peeters", "Müller GmbH"] {
            let err = validate(&with(|r| r.creditor_name = bad.into())).unwrap_err();
            assert_eq!(err.code, ReasonCode::InvalidCharacters, "{bad}");
            assert!(err.message.starts_with("creditor_name "));
        }
    }

    #[test]
    fn messages_never_echo_free_text() {
        let secret = "Secretive Person";
        let err = validate(&with(|r| r.creditor_name = format!("{secret} & Co"))).unwrap_err();
        assert!(!err.message.contains("Secretive"), "{}", err.message);
        let err = validate(&with(|r| {
            r.remittance_information = Some(format!("{secret} €"))
        }))
        .unwrap_err();
        assert!(!err.message.contains("Secretive"), "{}", err.message);
        let err = validate(&with(|r| r.creditor_iban = "BE00SECRET".into())).unwrap_err();
        assert!(!err.message.contains("SECRET"), "{}", err.message);
    }

    #[test]
    fn invalid_creditor_iban() {
        for bad in [
            "BE68539007547035",
            "XX68539007547034",
            "BE6853900754703",
            "not an iban",
        ] {
            let err = validate(&with(|r| r.creditor_iban = bad.into())).unwrap_err();
            assert_eq!(err.code, ReasonCode::InvalidIban, "{bad}");
            assert!(err.message.starts_with("creditor_iban "), "{}", err.message);
        }
        let order = validate(&with(|r| r.creditor_iban = "nl91 abna 0417 1643 00".into())).unwrap();
        assert_eq!(order.creditor_iban, "NL91ABNA0417164300");
    }

    #[test]
    fn invalid_creditor_bic() {
        for bad in ["GEBA", "GEBABEBB0", "GEB1BEBB", "GEBA-BEBB", "   "] {
            let err = validate(&with(|r| r.creditor_bic = Some(bad.into()))).unwrap_err();
            assert_eq!(err.code, ReasonCode::InvalidBic, "{bad}");
            assert!(err.message.starts_with("creditor_bic "));
        }
        let order = validate(&with(|r| r.creditor_bic = Some("gkccbebb001".into()))).unwrap();
        assert_eq!(order.creditor_bic.as_deref(), Some("GKCCBEBB001"));
    }

    #[test]
    fn invalid_debtor_iban() {
        let err = validate(&with(|r| r.debtor_iban = Some("BE68539007547033".into()))).unwrap_err();
        assert_eq!(err.code, ReasonCode::InvalidIban);
        assert!(err.message.starts_with("debtor_iban "));
        let err = validate(&with(|r| r.debtor_iban = Some("  ".into()))).unwrap_err();
        assert_eq!(err.code, ReasonCode::InvalidIban);
        assert!(err.message.starts_with("debtor_iban "));
        let order = validate(&with(|r| {
            r.debtor_iban = Some("de89 3704 0044 0532 0130 00".into())
        }))
        .unwrap();
        assert_eq!(order.debtor_iban.as_deref(), Some("DE89370400440532013000"));
    }

    #[test]
    fn end_to_end_id_rules() {
        assert!(validate(&with(|r| r.end_to_end_id = "a".repeat(35))).is_ok());
        assert_eq!(
            code_of(&with(|r| r.end_to_end_id = "a".repeat(36))),
            ReasonCode::FieldTooLong
        );
        assert!(validate(&with(|r| r.end_to_end_id = "INV/2025/1".into())).is_ok());
        for bad in ["/abc", "abc/", "a//b", "/", "é", "a_b"] {
            let err = validate(&with(|r| r.end_to_end_id = bad.into())).unwrap_err();
            assert_eq!(err.code, ReasonCode::InvalidCharacters, "{bad}");
            assert!(err.message.starts_with("end_to_end_id "));
        }
    }

    #[test]
    fn remittance_boundaries_and_charset() {
        assert!(validate(&with(|r| r.remittance_information = Some("r".repeat(140)))).is_ok());
        assert_eq!(
            code_of(&with(|r| r.remittance_information = Some("r".repeat(141)))),
            ReasonCode::FieldTooLong
        );
        assert_eq!(
            code_of(&with(|r| r.remittance_information = Some("5 €".into()))),
            ReasonCode::InvalidCharacters
        );
        assert_eq!(
            code_of(&with(
                |r| r.remittance_information = Some("line\nbreak".into())
            )),
            ReasonCode::InvalidCharacters
        );
    }

    fn with_date(date: NaiveDate) -> RawInitiatePayment {
        with(|r| r.requested_execution_date = Some(date.format("%Y-%m-%d").to_string()))
    }

    #[test]
    fn execution_date_window() {
        let t = today();
        let yesterday = t.pred_opt().unwrap();
        let horizon = t + TimeDelta::days(365);
        let beyond = horizon.succ_opt().unwrap();

        let err = validate(&with_date(yesterday)).unwrap_err();
        assert_eq!(err.code, ReasonCode::InvalidExecutionDate);
        assert_eq!(
            err.message,
            "requested_execution_date must not be in the past"
        );

        assert_eq!(
            validate(&with_date(t)).unwrap().requested_execution_date,
            Some(t)
        );
        assert_eq!(
            validate(&with_date(horizon))
                .unwrap()
                .requested_execution_date,
            Some(horizon)
        );

        let err = validate(&with_date(beyond)).unwrap_err();
        assert_eq!(err.code, ReasonCode::InvalidExecutionDate);
        assert_eq!(
            err.message,
            "requested_execution_date must not be more than 365 days ahead"
        );
    }

    #[test]
    fn execution_date_horizon_is_configurable() {
        let t = today();
        let limits = ValidationLimits {
            max_execution_horizon_days: 0,
            ..ValidationLimits::default()
        };
        assert!(validate_initiation(&with_date(t), &limits, t).is_ok());
        assert!(validate_initiation(&with_date(t.succ_opt().unwrap()), &limits, t).is_err());

        // An absurd horizon never overflows.
        let limits = ValidationLimits {
            max_execution_horizon_days: i64::MAX,
            ..ValidationLimits::default()
        };
        assert!(validate_initiation(&with_date(t + TimeDelta::days(10_000)), &limits, t).is_ok());
    }

    #[test]
    fn execution_date_syntax() {
        for bad in [
            "2025-3-10",
            "2025-03-1",
            "10/03/2025",
            "2025/03/10",
            "2025-02-30",
            "2025-13-01",
            "+2025-03-10",
            " 2025-03-10",
            "2025-03-10T00:00:00",
            "20250310",
            "2025-0３-10",
            "tomorrow",
        ] {
            let err =
                validate(&with(|r| r.requested_execution_date = Some(bad.into()))).unwrap_err();
            assert_eq!(err.code, ReasonCode::InvalidExecutionDate, "{bad}");
            assert_eq!(
                err.message,
                "requested_execution_date must be an ISO date yyyy-mm-dd"
            );
        }
    }

    #[test]
    fn invalid_language() {
        for bad in ["de", "en", "french", "f"] {
            assert_eq!(
                code_of(&with(|r| r.language = bad.into())),
                ReasonCode::InvalidLanguage,
                "{bad}"
            );
        }
        assert_eq!(
            validate(&with(|r| r.language = "FR".into()))
                .unwrap()
                .language,
            Language::Fr
        );
    }

    #[test]
    fn redirect_uri_cases() {
        for ok in [
            "https://tpp.example.com/cb",
            "https://tpp.example.com:8443/cb?state=x&y=1",
            "http://localhost:8080/callback",
            "http://127.0.0.1/callback",
            "https://localhost/cb",
        ] {
            let order = validate(&with(|r| r.redirect_uri = ok.into())).unwrap();
            assert_eq!(order.redirect_uri, ok);
        }
        for bad in [
            "http://tpp.example.com/cb",
            "http://127.0.0.2/cb",
            "http://localhost.example.com/cb",
            "ftp://tpp.example.com/cb",
            "file:///etc/passwd",
            "mailto:someone@example.com",
            "javascript:alert(1)",
            "not a url",
            "/relative/path",
            "https://",
            "https://tpp.example.com/cb#fragment",
            "https://tpp.example.com/cb#",
            " https://tpp.example.com/cb",
            "https://tpp.example.com/cb\n",
            "https://tpp.exa\tmple.com/cb",
        ] {
            let err = validate(&with(|r| r.redirect_uri = bad.into())).unwrap_err();
            assert_eq!(err.code, ReasonCode::InvalidRedirectUri, "{bad:?}");
            assert!(err.message.starts_with("redirect_uri "), "{}", err.message);
        }
    }

    #[test]
    fn redirect_uri_length_boundary() {
        let prefix = "https://tpp.example.com/";
        let at_limit = format!(
            "{prefix}{}",
            "a".repeat(MAX_REDIRECT_URI_CHARS - prefix.len())
        );
        assert_eq!(at_limit.len(), 2048);
        assert!(validate(&with(|r| r.redirect_uri = at_limit.clone())).is_ok());
        let over = format!("{at_limit}a");
        assert_eq!(
            code_of(&with(|r| r.redirect_uri = over)),
            ReasonCode::InvalidRedirectUri
        );
    }

    #[test]
    fn first_failing_field_wins() {
        let raw = with(|r| {
            r.amount = "0".into();
            r.creditor_iban = "BE00".into();
            r.language = "de".into();
        });
        assert_eq!(code_of(&raw), ReasonCode::InvalidAmount);
    }

    #[test]
    fn default_limits() {
        let limits = ValidationLimits::default();
        assert_eq!(limits.max_amount.to_string(), "1000000.00");
        assert_eq!(limits.max_execution_horizon_days, 365);
    }

    // ---------------------------------------------------------------- properties

    fn arb_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[ -~]{0,80}",
            "[A-Z0-9 ]{0,40}",
            Just(String::new()),
        ]
    }

    fn arb_raw() -> impl Strategy<Value = RawInitiatePayment> {
        (
            (
                prop_oneof![
                    Just("SEPA_CREDIT_TRANSFERS".to_owned()),
                    Just("CROSS_BORDER_CREDIT_TRANSFERS".to_owned()),
                    arb_text()
                ],
                prop_oneof![Just("BELFIUS".to_owned()), arb_text()],
                prop_oneof!["[0-9]{1,20}(\\.[0-9]{0,3})?", arb_text()],
                prop_oneof![Just("EUR".to_owned()), arb_text()],
                arb_text(),
                prop_oneof![Just("BE68539007547034".to_owned()), arb_text()],
                proptest::option::of(arb_text()),
            ),
            (
                proptest::option::of(arb_text()),
                arb_text(),
                proptest::option::of(arb_text()),
                proptest::option::of(prop_oneof!["[0-9]{4}-[0-9]{2}-[0-9]{2}", arb_text()]),
                prop_oneof![Just("fr".to_owned()), arb_text()],
                prop_oneof!["https?://[a-z0-9.:@\\[\\]#?/%-]{0,40}", arb_text()],
            ),
        )
            .prop_map(
                |(
                    (
                        payment_product,
                        brand,
                        amount,
                        currency,
                        creditor_name,
                        creditor_iban,
                        creditor_bic,
                    ),
                    (
                        debtor_iban,
                        end_to_end_id,
                        remittance_information,
                        requested_execution_date,
                        language,
                        redirect_uri,
                    ),
                )| RawInitiatePayment {
                    payment_product,
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
                    ..Default::default()
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn validate_initiation_never_panics(
            raw in arb_raw(),
            horizon in prop_oneof![Just(365i64), any::<i64>()],
            max_minor in prop_oneof![Just(100_000_000i64), any::<i64>()],
            days in -1_000_000i32..1_000_000,
        ) {
            let limits = ValidationLimits {
                max_amount: Amount::from_minor(max_minor),
                max_execution_horizon_days: horizon,
            };
            let today = NaiveDate::from_ymd_opt(2025, 1, 1).unwrap() + TimeDelta::days(i64::from(days));
            let _ = validate_initiation(&raw, &limits, today);
        }

        #[test]
        fn single_field_mutations_never_panic(text in any::<String>(), field in 0usize..13) {
            let mut raw = valid_raw();
            match field {
                0 => raw.payment_product = text,
                1 => raw.brand = text,
                2 => raw.amount = text,
                3 => raw.currency = text,
                4 => raw.creditor_name = text,
                5 => raw.creditor_iban = text,
                6 => raw.creditor_bic = Some(text),
                7 => raw.debtor_iban = Some(text),
                8 => raw.end_to_end_id = text,
                9 => raw.remittance_information = Some(text),
                10 => raw.requested_execution_date = Some(text),
                11 => raw.language = text,
                _ => raw.redirect_uri = text,
            }
            let _ = validate(&raw);
        }

        #[test]
        fn validators_never_panic_on_arbitrary_strings(s in any::<String>()) {
            let _ = is_valid_iban(&s);
            let _ = is_valid_bic(&s);
            let _ = is_sepa_text(&s);
            let _ = validate_payment_id(&s);
            let _ = validate_psu_id(&s);
            let _ = validate_command_id(&s);
        }

        #[test]
        fn generated_belgian_ibans_are_valid(bban in "[0-9]{12}") {
            let iban = format!("BE{:02}{bban}", belgian_check_digits(&bban));
            prop_assert!(is_valid_iban(&iban), "{}", iban);
            // The paper format with lower case (no letters in BE, so just spaces) is accepted too.
            let spaced: String = iban
                .chars()
                .enumerate()
                .flat_map(|(i, c)| (i > 0 && i % 4 == 0).then_some(' ').into_iter().chain([c]))
                .collect();
            prop_assert!(is_valid_iban(&spaced.to_lowercase()), "{}", spaced);
            // Any wrong pair of check digits is refused.
            let wrong = (belgian_check_digits(&bban) + 1) % 100;
            let wrong_iban = format!("BE{wrong:02}{bban}");
            prop_assert!(!is_valid_iban(&wrong_iban), "{}", wrong_iban);
        }
    }
}

#[cfg(test)]
mod order_kind_tests {
    use super::*;
    use crate::domain::model::RawBulkTransfer;

    fn today() -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 11, 24).expect("date")
    }

    fn sepa() -> RawInitiatePayment {
        RawInitiatePayment {
            payment_product: "SEPA_CREDIT_TRANSFERS".into(),
            brand: "BELFIUS".into(),
            amount: "10.00".into(),
            currency: "EUR".into(),
            creditor_name: "Alice".into(),
            creditor_iban: "BE68539007547034".into(),
            end_to_end_id: "E2E-1".into(),
            language: "fr".into(),
            redirect_uri: "https://c.example/cb".into(),
            ..RawInitiatePayment::default()
        }
    }

    fn cross_border() -> RawInitiatePayment {
        RawInitiatePayment {
            payment_product: "CROSS_BORDER_CREDIT_TRANSFERS".into(),
            currency: "USD".into(),
            charge_bearer: Some("SHAR".into()),
            creditor_iban: String::new(),
            creditor_bban: Some("123456789".into()),
            creditor_bank_national_id: Some("021000021".into()),
            creditor_address: Some(PostalAddress {
                town: Some("New York".into()),
                country: "US".into(),
                ..PostalAddress::default()
            }),
            ..sepa()
        }
    }

    fn code(result: Result<impl std::fmt::Debug, Reason>) -> ReasonCode {
        result.expect_err("should be refused").code
    }

    #[test]
    fn sepa_products_refuse_cross_border_fields() {
        let limits = ValidationLimits::default();
        for edit in [
            |r: &mut RawInitiatePayment| r.charge_bearer = Some("SHAR".into()),
            |r: &mut RawInitiatePayment| r.creditor_bban = Some("123".into()),
            |r: &mut RawInitiatePayment| r.creditor_currency = Some("EUR".into()),
            |r: &mut RawInitiatePayment| {
                r.creditor_address = Some(PostalAddress {
                    country: "BE".into(),
                    ..PostalAddress::default()
                })
            },
        ] {
            let mut raw = sepa();
            edit(&mut raw);
            assert_eq!(
                code(validate_initiation(&raw, &limits, today())),
                ReasonCode::FieldNotAllowed
            );
        }
        assert!(
            validate_initiation(&sepa(), &limits, today()).is_ok_and(|o| o.cross_border.is_none())
        );
    }

    #[test]
    fn cross_border_needs_a_charge_bearer_and_a_reachable_creditor() {
        let limits = ValidationLimits::default();
        let order = validate_initiation(&cross_border(), &limits, today()).expect("valid");
        let cb = order.cross_border.expect("cross-border part");
        assert_eq!(cb.charge_bearer, ChargeBearer::Shar);
        assert_eq!(cb.creditor_bban.as_deref(), Some("123456789"));
        assert_eq!(order.creditor_iban, "");

        let mut raw = cross_border();
        raw.charge_bearer = None;
        assert_eq!(
            code(validate_initiation(&raw, &limits, today())),
            ReasonCode::MissingField
        );
        raw.charge_bearer = Some("OUR".into());
        assert_eq!(
            code(validate_initiation(&raw, &limits, today())),
            ReasonCode::InvalidChargeBearer
        );

        // Belfius refuses BBAN + BIC (B14821ZZ-1236-000000).
        let mut raw = cross_border();
        raw.creditor_bic = Some("CHASUS33".into());
        assert_eq!(
            code(validate_initiation(&raw, &limits, today())),
            ReasonCode::FieldNotAllowed
        );
        let mut raw = cross_border();
        raw.creditor_bank_national_id = None;
        assert_eq!(
            code(validate_initiation(&raw, &limits, today())),
            ReasonCode::MissingField
        );
        // Neither IBAN nor BBAN.
        let mut raw = cross_border();
        raw.creditor_bban = None;
        assert_eq!(
            code(validate_initiation(&raw, &limits, today())),
            ReasonCode::MissingField
        );
        let mut raw = cross_border();
        raw.creditor_address = Some(PostalAddress {
            country: "usa".into(),
            ..PostalAddress::default()
        });
        assert_eq!(
            code(validate_initiation(&raw, &limits, today())),
            ReasonCode::InvalidCharacters
        );
    }

    fn periodic() -> RawPeriodicPayment {
        RawPeriodicPayment {
            payment: sepa(),
            start_date: "2026-12-01".into(),
            end_date: Some("2027-06-01".into()),
            frequency: "MONTHLY".into(),
            day_of_execution: Some(1),
        }
    }

    #[test]
    fn standing_orders_follow_the_schedule_rules() {
        let limits = ValidationLimits::default();
        let order = validate_periodic(&periodic(), &limits, today()).expect("valid");
        assert_eq!(order.frequency, Frequency::Monthly);
        assert_eq!(order.day_of_execution, Some(1));

        let with = |edit: fn(&mut RawPeriodicPayment)| {
            let mut raw = periodic();
            edit(&mut raw);
            validate_periodic(&raw, &limits, today())
        };
        // Belfius B14821ZZ-1259: the start must be in the future (today is not).
        assert_eq!(
            code(with(|r| r.start_date = "2026-11-24".into())),
            ReasonCode::InvalidExecutionDate
        );
        assert_eq!(
            code(with(|r| r.end_date = Some("2026-11-30".into()))),
            ReasonCode::InvalidExecutionDate
        );
        // Quarterly from December: March, June... fit; May does not (B14821ZZ-1322).
        assert!(
            with(|r| {
                r.frequency = "QUARTERLY".into();
                r.end_date = Some("2027-06-01".into());
            })
            .is_ok()
        );
        assert_eq!(
            code(with(|r| {
                r.frequency = "QUARTERLY".into();
                r.end_date = Some("2027-05-01".into());
            })),
            ReasonCode::InvalidExecutionDate
        );
        assert_eq!(
            code(with(|r| r.frequency = "HOURLY".into())),
            ReasonCode::InvalidFrequency
        );
        assert_eq!(
            code(with(|r| {
                r.frequency = "WEEKLY".into();
                r.end_date = None;
                r.day_of_execution = Some(8);
            })),
            ReasonCode::InvalidExecutionDate
        );
        assert_eq!(
            code(with(
                |r| r.payment.requested_execution_date = Some("2026-12-01".into())
            )),
            ReasonCode::FieldNotAllowed
        );
        assert_eq!(
            code(with(|r| r.payment.amount = "0".into())),
            ReasonCode::InvalidAmount
        );
    }

    fn bulk(n: usize) -> RawBulkPayment {
        RawBulkPayment {
            payment_product: "SEPA_CREDIT_TRANSFERS".into(),
            brand: "BELFIUS".into(),
            debtor_iban: None,
            batch_booking: false,
            requested_execution_date: None,
            language: "nl".into(),
            redirect_uri: "https://c.example/cb".into(),
            always_pkce: false,
            funds_check: false,
            payments: (0..n)
                .map(|i| RawBulkTransfer {
                    amount: "1.00".into(),
                    currency: "EUR".into(),
                    creditor_name: format!("Creditor {i}"),
                    creditor_iban: "BE68539007547034".into(),
                    creditor_bic: None,
                    end_to_end_id: format!("E2E-{i}"),
                    remittance_information: None,
                })
                .collect(),
        }
    }

    #[test]
    fn bulks_are_belfius_sepa_and_at_most_a_thousand_distinct_transfers() {
        let limits = ValidationLimits::default();
        assert_eq!(
            validate_bulk(&bulk(1000), &limits, today()).map(|b| b.payments.len()),
            Ok(1000)
        );
        assert_eq!(
            code(validate_bulk(&bulk(1001), &limits, today())),
            ReasonCode::FieldTooLong
        );
        assert_eq!(
            code(validate_bulk(&bulk(0), &limits, today())),
            ReasonCode::MissingField
        );
        let mut banx = bulk(2);
        banx.brand = "BANX".into();
        assert_eq!(
            code(validate_bulk(&banx, &limits, today())),
            ReasonCode::InvalidBrand
        );
        let mut cross = bulk(2);
        cross.payment_product = "CROSS_BORDER_CREDIT_TRANSFERS".into();
        assert_eq!(
            code(validate_bulk(&cross, &limits, today())),
            ReasonCode::InvalidProduct
        );
        let mut dup = bulk(3);
        dup.payments[2].end_to_end_id = "E2E-0".into();
        assert_eq!(
            code(validate_bulk(&dup, &limits, today())),
            ReasonCode::InvalidIdentifier
        );
        let mut bad = bulk(3);
        bad.payments[1].creditor_iban = "BE68539007547035".into();
        let reason = validate_bulk(&bad, &limits, today()).expect_err("bad iban");
        assert_eq!(reason.code, ReasonCode::InvalidIban);
        assert!(
            reason.message.starts_with("payments[1]:"),
            "{}",
            reason.message
        );
    }
}

#[cfg(test)]
mod consent_request_tests {
    use super::*;

    fn caf() -> RawConsentRequest {
        RawConsentRequest {
            brand: "BELFIUS".into(),
            scope: "CAF".into(),
            account_iban: Some("be68 5390 0754 7034".into()),
            language: "nl".into(),
            redirect_uri: "https://client.example/consent".into(),
        }
    }

    fn ais() -> RawConsentRequest {
        RawConsentRequest {
            brand: "BANX".into(),
            scope: "AIS".into(),
            account_iban: None,
            language: "fr".into(),
            redirect_uri: "http://localhost:8080/consent".into(),
        }
    }

    fn code_of(raw: RawConsentRequest) -> ReasonCode {
        match validate_consent_request(&raw) {
            Ok(request) => panic!("expected a refusal, got {request:?}"),
            Err(r) => r.code,
        }
    }

    #[test]
    fn valid_requests_become_consent_requests_with_a_normalised_iban() {
        assert_eq!(
            validate_consent_request(&caf()),
            Ok(ConsentRequest {
                brand: Brand::Belfius,
                scope: ConsentScope::Caf,
                account_iban: Some("BE68539007547034".into()),
                language: Language::Nl,
                redirect_uri: "https://client.example/consent".into(),
            })
        );
        let request = validate_consent_request(&ais()).expect("valid AIS");
        assert_eq!(
            (request.brand, request.scope, request.account_iban),
            (Brand::Banx, ConsentScope::Ais, None)
        );
        // An empty optional field counts as absent, as everywhere else.
        let empty = RawConsentRequest {
            account_iban: Some(String::new()),
            ..ais()
        };
        assert_eq!(
            validate_consent_request(&empty).map(|r| r.account_iban),
            Ok(None)
        );
    }

    #[test]
    fn brand_and_scope_must_be_known_symbols() {
        let with = |edit: fn(&mut RawConsentRequest)| {
            let mut raw = caf();
            edit(&mut raw);
            raw
        };
        assert_eq!(
            code_of(with(|r| r.brand = String::new())),
            ReasonCode::MissingField
        );
        assert_eq!(
            code_of(with(|r| r.brand = "KBC".into())),
            ReasonCode::InvalidBrand
        );
        assert_eq!(
            code_of(with(|r| r.scope = String::new())),
            ReasonCode::MissingField
        );
        // A newer writer's symbol, as it decodes.
        assert_eq!(
            code_of(with(|r| r.scope = "PIIS".into())),
            ReasonCode::InvalidScope
        );
        assert_eq!(
            code_of(with(|r| r.scope = "caf".into())),
            ReasonCode::InvalidScope
        );
    }

    #[test]
    fn caf_needs_a_valid_account_iban() {
        for missing in [None, Some(String::new()), Some("   ".into())] {
            let reason = validate_consent_request(&RawConsentRequest {
                account_iban: missing.clone(),
                ..caf()
            })
            .expect_err("refused");
            assert_eq!(reason.code, ReasonCode::MissingField, "{missing:?}");
            assert!(
                reason.message.contains("account_iban"),
                "{}",
                reason.message
            );
        }
        for bad in ["BE68539007547035", "XX68539007547034", "BE6853900754703"] {
            let reason = validate_consent_request(&RawConsentRequest {
                account_iban: Some(bad.into()),
                ..caf()
            })
            .expect_err("refused");
            assert_eq!(reason.code, ReasonCode::InvalidIban, "{bad}");
            assert!(!reason.message.contains(bad), "never echoes the value");
        }
    }

    #[test]
    fn ais_takes_no_account_iban() {
        let reason = validate_consent_request(&RawConsentRequest {
            account_iban: Some("BE68539007547034".into()),
            ..ais()
        })
        .expect_err("refused");
        assert_eq!(reason.code, ReasonCode::FieldNotAllowed);
        assert!(
            reason.message.contains("account_iban"),
            "{}",
            reason.message
        );
    }

    #[test]
    fn language_and_redirect_uri_follow_the_payment_rules() {
        for language in ["de", "en", "f"] {
            assert_eq!(
                code_of(RawConsentRequest {
                    language: language.into(),
                    ..caf()
                }),
                ReasonCode::InvalidLanguage,
                "{language}"
            );
        }
        assert_eq!(
            code_of(RawConsentRequest {
                language: String::new(),
                ..caf()
            }),
            ReasonCode::MissingField
        );
        for uri in [
            "http://client.example/consent",
            "https://client.example/consent#frag",
            "client.example/consent",
            "https://client.example/a b",
        ] {
            assert_eq!(
                code_of(RawConsentRequest {
                    redirect_uri: uri.into(),
                    ..ais()
                }),
                ReasonCode::InvalidRedirectUri,
                "{uri}"
            );
            // The payment rules give the same verdict for the same URI.
            assert_eq!(
                validate_redirect_uri(uri).map_err(|r| r.code),
                Err(ReasonCode::InvalidRedirectUri),
                "{uri}"
            );
        }
        assert_eq!(
            code_of(RawConsentRequest {
                redirect_uri: String::new(),
                ..ais()
            }),
            ReasonCode::MissingField
        );
    }
}
