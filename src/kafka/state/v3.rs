//! Format 3 of the `payment-state` records: format 2's envelope and storage types, with a binary
//! body instead of JSON.
//!
//! Why: decoding the JSON body was two thirds of a restore's cost per record (docs/benchmarks.md,
//! "Restore throughput"), and a binary body is also about half the bytes to seal, send, store
//! and read back. The envelope is format 2's with version byte 3 (`v2`, "envelope"); the
//! plaintext is [`Body`] in postcard (<https://postcard.jamesmunns.com/wire-format>): integers
//! as varints, strings and sequences length-prefixed, an `Option` as a 0/1 tag, and **every
//! struct field and enum variant by its position, not its name**. So, beyond format 2's frozen
//! names:
//! - the field order of every `v2::Stored*` struct is frozen (a new field is a new format);
//! - the variant order of every `v2::Stored*` enum and of [`Body`] is frozen: new variants go
//!   last. `tests::variant_positions_are_frozen` fails on a reordering, and the fixtures in
//!   `tests/fixtures/state/v3.json` on a field that moved.
//!
//! Format 2 is still read, and still written when `PIS_STATE_FORMAT=2` (for a rollout: see
//! docs/architecture.md, "State record format").

use serde::{Deserialize, Serialize};

use super::StateRecordError;
use super::v2::{self, StoredPayment, StoredPsuTokens, StoredRetired, StoredStatusEvent};
use crate::secret::StateKeyRing;

pub const VERSION: u8 = 3;

/// The plaintext of a format 3 record: format 2's [`v2::Body`], variant for variant.
#[derive(Debug, Serialize, Deserialize)]
pub enum Body {
    Payment {
        payment: Box<StoredPayment>,
        events: Vec<StoredStatusEvent>,
    },
    Psu(StoredPsuTokens),
    OutboxCheckpoint {
        published_through: i64,
    },
    Retired(StoredRetired),
    SnapshotBegin {
        at: i64,
    },
    SnapshotEnd {
        begin: i64,
        entities: u64,
    },
    QuarantinedCopy {
        offset: i64,
        epoch_header: Option<i64>,
        value_hex: String,
    },
    PaymentExt {
        payment: Box<StoredPayment>,
        events: Vec<StoredStatusEvent>,
        ext: v2::StoredPaymentExt,
    },
    Consent(Box<super::consent::StoredConsent>),
    PaymentSettled {
        payment: Box<StoredPayment>,
        events: Vec<StoredStatusEvent>,
        ext: v2::StoredPaymentExt,
        settlement: v2::StoredSettlement,
    },
}

impl From<v2::Body> for Body {
    fn from(body: v2::Body) -> Self {
        match body {
            v2::Body::Payment { payment, events } => Body::Payment { payment, events },
            v2::Body::Psu(tokens) => Body::Psu(tokens),
            v2::Body::OutboxCheckpoint { published_through } => {
                Body::OutboxCheckpoint { published_through }
            }
            v2::Body::Retired(retired) => Body::Retired(retired),
            v2::Body::SnapshotBegin { at } => Body::SnapshotBegin { at },
            v2::Body::SnapshotEnd { begin, entities } => Body::SnapshotEnd { begin, entities },
            v2::Body::QuarantinedCopy {
                offset,
                epoch_header,
                value_hex,
            } => Body::QuarantinedCopy {
                offset,
                epoch_header,
                value_hex,
            },
            v2::Body::PaymentExt {
                payment,
                events,
                ext,
            } => Body::PaymentExt {
                payment,
                events,
                ext,
            },
            v2::Body::Consent(consent) => Body::Consent(consent),
            v2::Body::PaymentSettled {
                payment,
                events,
                ext,
                settlement,
            } => Body::PaymentSettled {
                payment,
                events,
                ext,
                settlement,
            },
        }
    }
}

impl From<Body> for v2::Body {
    fn from(body: Body) -> Self {
        match body {
            Body::Payment { payment, events } => v2::Body::Payment { payment, events },
            Body::Psu(tokens) => v2::Body::Psu(tokens),
            Body::OutboxCheckpoint { published_through } => {
                v2::Body::OutboxCheckpoint { published_through }
            }
            Body::Retired(retired) => v2::Body::Retired(retired),
            Body::SnapshotBegin { at } => v2::Body::SnapshotBegin { at },
            Body::SnapshotEnd { begin, entities } => v2::Body::SnapshotEnd { begin, entities },
            Body::QuarantinedCopy {
                offset,
                epoch_header,
                value_hex,
            } => v2::Body::QuarantinedCopy {
                offset,
                epoch_header,
                value_hex,
            },
            Body::PaymentExt {
                payment,
                events,
                ext,
            } => v2::Body::PaymentExt {
                payment,
                events,
                ext,
            },
            Body::Consent(consent) => v2::Body::Consent(consent),
            Body::PaymentSettled {
                payment,
                events,
                ext,
                settlement,
            } => v2::Body::PaymentSettled {
                payment,
                events,
                ext,
                settlement,
            },
        }
    }
}

/// Seals `body` as format 3 for `record_key` and `epoch` with the ring's current key.
pub fn seal(
    ring: &StateKeyRing,
    record_key: &str,
    epoch: i64,
    body: v2::Body,
) -> Result<Vec<u8>, StateRecordError> {
    let plain = postcard::to_allocvec(&Body::from(body))
        .map_err(|e| StateRecordError::Encode(e.to_string()))?;
    v2::seal_plain(ring, record_key, epoch, VERSION, &plain)
}

/// Reads a format 3 plaintext, all of it: bytes left over are an error, as trailing JSON is in
/// format 2 (they cannot come from this writer).
pub fn read_body(plain: &[u8]) -> Result<v2::Body, StateRecordError> {
    let (body, rest) = postcard::take_from_bytes::<Body>(plain)
        .map_err(|e| StateRecordError::Body(format!("sealed body (format 3): {e}")))?;
    if !rest.is_empty() {
        return Err(StateRecordError::Body(format!(
            "sealed body (format 3): {} bytes after the body",
            rest.len()
        )));
    }
    Ok(body.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::state::v2::{
        StoredBrand, StoredChargeBearer, StoredFrequency, StoredLanguage, StoredPaymentProduct,
        StoredPaymentState, StoredReasonCode, StoredStateKind, StoredWithdrawalCause,
    };

    /// The position postcard writes for a variant (its first byte: every position here is
    /// below 128, a one-byte varint).
    fn position<T: Serialize>(value: &T) -> u8 {
        match postcard::to_allocvec(value) {
            Ok(bytes) => bytes.first().copied().unwrap_or(u8::MAX),
            Err(e) => panic!("postcard: {e}"),
        }
    }

    /// Format 3 stores variants by position. These lists are what records in topics were
    /// written with: append to them, never reorder or insert.
    #[test]
    fn variant_positions_are_frozen() {
        fn frozen(found: &[&str], frozen: &[&str]) {
            assert!(
                found.starts_with(frozen),
                "format 3 variant order changed: {found:?} must start with {frozen:?}"
            );
        }
        frozen(StoredBrand::VARIANTS, &["Belfius", "Banx"]);
        frozen(
            StoredPaymentProduct::VARIANTS,
            &[
                "SepaCreditTransfers",
                "InstantSepaCreditTransfers",
                "CrossBorderCreditTransfers",
            ],
        );
        frozen(StoredLanguage::VARIANTS, &["Fr", "Nl"]);
        frozen(
            StoredChargeBearer::VARIANTS,
            &["Debt", "Cred", "Shar", "Slev"],
        );
        frozen(
            StoredFrequency::VARIANTS,
            &[
                "Daily",
                "Weekly",
                "EveryTwoWeeks",
                "Monthly",
                "EveryTwoMonths",
                "Quarterly",
                "SemiAnnual",
                "Annual",
            ],
        );
        frozen(
            StoredStateKind::VARIANTS,
            &[
                "Received",
                "Initiating",
                "ScaPending",
                "Authorizing",
                "PartiallySigned",
                "Signed",
                "Settled",
                "Cancelled",
                "Rejected",
                "Expired",
                "Failed",
                "OutcomeUnknown",
                "Active",
                "Cancelling",
                "PartiallySettled",
                "Completed",
            ],
        );
        frozen(
            StoredReasonCode::VARIANTS,
            &[
                "MissingField",
                "InvalidIban",
                "InvalidBic",
                "InvalidAmount",
                "AmountTooLarge",
                "InvalidCurrency",
                "InvalidCharacters",
                "FieldTooLong",
                "InvalidExecutionDate",
                "InvalidLanguage",
                "InvalidRedirectUri",
                "InvalidProduct",
                "InvalidBrand",
                "InvalidIdentifier",
                "FieldNotAllowed",
                "InvalidChargeBearer",
                "InvalidFrequency",
                "BankRejected",
                "BankInputRejected",
                "BankAccountRefused",
                "BankSecurityFailure",
                "BankConsentRevoked",
                "BankUnavailable",
                "ScaFailed",
                "ScaExpired",
                "CancelledByClient",
                "CancelledAtBank",
                "CancelRefused",
                "CancelNotConfirmed",
                "BulkPartiallyRejected",
                "OutcomeUnresolved",
                "ExpiryUnconfirmed",
            ],
        );
        // The macro's list is the declaration order, which is what postcard writes.
        assert_eq!(position(&StoredReasonCode::ExpiryUnconfirmed), 31);
        assert_eq!(position(&StoredStateKind::Completed), 15);
    }

    /// The enums with data, one exhaustive match each: a new variant must be given its
    /// position here (the next free one).
    #[test]
    fn data_variant_positions_are_frozen() {
        let states = [
            StoredPaymentState::Received,
            StoredPaymentState::Initiating { attempt: 1 },
            StoredPaymentState::ScaPending,
            StoredPaymentState::Authorizing,
            StoredPaymentState::PartiallySigned,
            StoredPaymentState::Signed,
            StoredPaymentState::Active,
            StoredPaymentState::Cancelling,
            StoredPaymentState::Settled,
            StoredPaymentState::PartiallySettled,
            StoredPaymentState::Completed,
            StoredPaymentState::Cancelled,
            StoredPaymentState::Rejected,
            StoredPaymentState::Expired,
            StoredPaymentState::Failed,
            StoredPaymentState::OutcomeUnknown { attempt: 1 },
            StoredPaymentState::Unconfirmed,
        ];
        for state in &states {
            let want = match state {
                StoredPaymentState::Received => 0,
                StoredPaymentState::Initiating { .. } => 1,
                StoredPaymentState::ScaPending => 2,
                StoredPaymentState::Authorizing => 3,
                StoredPaymentState::PartiallySigned => 4,
                StoredPaymentState::Signed => 5,
                StoredPaymentState::Active => 6,
                StoredPaymentState::Cancelling => 7,
                StoredPaymentState::Settled => 8,
                StoredPaymentState::PartiallySettled => 9,
                StoredPaymentState::Completed => 10,
                StoredPaymentState::Cancelled => 11,
                StoredPaymentState::Rejected => 12,
                StoredPaymentState::Expired => 13,
                StoredPaymentState::Failed => 14,
                StoredPaymentState::OutcomeUnknown { .. } => 15,
                StoredPaymentState::Unconfirmed => 16,
            };
            assert_eq!(position(state), want, "{state:?}");
        }
        for cause in [
            StoredWithdrawalCause::Deadline,
            StoredWithdrawalCause::PsuRefused {
                message: String::new(),
            },
        ] {
            let want = match cause {
                StoredWithdrawalCause::Deadline => 0,
                StoredWithdrawalCause::PsuRefused { .. } => 1,
            };
            assert_eq!(position(&cause), want, "{cause:?}");
        }
        // `StoredOrder` (Single, Standing, Bulk) and the payment, PSU and retired bodies are
        // checked by the fixtures, which hold one of each and compare every field.
        let bodies = [
            Body::OutboxCheckpoint {
                published_through: 1,
            },
            Body::SnapshotBegin { at: 1 },
            Body::SnapshotEnd {
                begin: 1,
                entities: 1,
            },
            Body::QuarantinedCopy {
                offset: 1,
                epoch_header: None,
                value_hex: String::new(),
            },
        ];
        for body in &bodies {
            let want = match body {
                Body::Payment { .. } => 0,
                Body::Psu(_) => 1,
                Body::OutboxCheckpoint { .. } => 2,
                Body::Retired(_) => 3,
                Body::SnapshotBegin { .. } => 4,
                Body::SnapshotEnd { .. } => 5,
                Body::QuarantinedCopy { .. } => 6,
                Body::PaymentExt { .. } => 7,
                Body::Consent(_) => 8,
                Body::PaymentSettled { .. } => 9,
            };
            assert_eq!(position(body), want, "{body:?}");
        }
    }

    #[test]
    fn trailing_bytes_and_garbage_are_errors() {
        let mut plain = postcard::to_allocvec(&Body::SnapshotBegin { at: 7 }).unwrap_or_default();
        assert!(matches!(
            read_body(&plain),
            Ok(v2::Body::SnapshotBegin { at: 7 })
        ));
        plain.push(0);
        let err = read_body(&plain).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("1 bytes after the body"), "{err}");
        assert!(read_body(&[]).is_err());
        assert!(read_body(&[200]).is_err());
    }
}
