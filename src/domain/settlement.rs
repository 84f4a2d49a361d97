//! Settlement evidence from a debtor's booked history, and the double payment it can reveal.
//! Pure: the caller reads the history (AIS, `belfius::client::portal`) and hands the bookings
//! in.
//!
//! A settled payment should appear once on its debtor account: a debit of its amount to its
//! creditor, carrying its end-to-end id (when the bank shows it [I]) or its remittance text. Two
//! such bookings are money that moved twice: typically an initiation whose answer was lost
//! and that the PSU signed anyway beside its retry (docs/guarantees.md, "Lost initiation
//! answers"). Ids and texts compare without case [I]: for a duplicate detector a false alarm
//! costs a look, a missed double payment costs money.

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use super::machine::Millis;
use super::model::Amount;

/// One booked transaction, as the bank's history gives it (text fields as received).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Booked<'a> {
    pub reference: Option<&'a str>,
    /// Signed decimal text: `-12.34` for a debit.
    pub amount: &'a str,
    pub currency: Option<&'a str>,
    pub counterparty_account: Option<&'a str>,
    pub communication: Option<&'a str>,
    pub remittance: Option<&'a str>,
    pub end_to_end_id: Option<&'a str>,
}

/// What the payment should have booked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected<'a> {
    pub amount: Amount,
    pub currency: &'a str,
    pub creditor_account: &'a str,
    pub end_to_end_id: &'a str,
    pub remittance: Option<&'a str>,
}

/// How a booking was recognised as the payment's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchedBy {
    /// The booking carries the payment's end-to-end id.
    EndToEndId,
    /// No end-to-end id on the booking; amount, creditor and remittance text agree.
    Remittance,
}

/// What the history says about the payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evidence {
    /// No booking matches (yet: bookings may lag settlement).
    NotBooked,
    /// Booked once.
    Booked {
        reference: Option<String>,
        matched_by: MatchedBy,
    },
    /// Booked more than once: the payment's money moved twice.
    Duplicated {
        references: Vec<Option<String>>,
        matched_by: MatchedBy,
    },
    /// Bookings of the amount to the creditor, but nothing ties one to this payment (no
    /// end-to-end id, no remittance to compare): settlement cannot be confirmed from them.
    Ambiguous { candidates: usize },
}

impl Evidence {
    /// The outcome a status event publishes for this evidence.
    pub fn outcome(&self) -> SettlementOutcome {
        match self {
            Evidence::NotBooked => SettlementOutcome::NotBooked,
            Evidence::Booked { .. } => SettlementOutcome::Booked,
            Evidence::Duplicated { .. } => SettlementOutcome::Duplicated,
            Evidence::Ambiguous { .. } => SettlementOutcome::Ambiguous,
        }
    }
}

/// The settlement evidence of a status event (`PaymentStatusEvent.settlement`, status schema
/// v3): what the debtor's history showed when the worker read it after `SETTLED`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementEvidence {
    pub outcome: SettlementOutcome,
    /// The bank's references of the bookings found (none for `NotBooked`).
    pub transaction_refs: Vec<String>,
    /// The date of the first booking, when the bank gave one.
    pub booking_date: Option<NaiveDate>,
    pub checked_at: Millis,
}

/// What the debtor's history says, on the wire (`SettlementOutcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SettlementOutcome {
    Booked,
    NotBooked,
    Ambiguous,
    /// A second booking with the same end-to-end id: the money moved twice.
    Duplicated,
}

impl SettlementOutcome {
    /// In the schema's symbol order.
    pub const ALL: [SettlementOutcome; 4] = [
        SettlementOutcome::Booked,
        SettlementOutcome::NotBooked,
        SettlementOutcome::Ambiguous,
        SettlementOutcome::Duplicated,
    ];

    /// The Avro enum symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            SettlementOutcome::Booked => "BOOKED",
            SettlementOutcome::NotBooked => "NOT_BOOKED",
            SettlementOutcome::Ambiguous => "AMBIGUOUS",
            SettlementOutcome::Duplicated => "DUPLICATED",
        }
    }

    pub fn from_symbol(symbol: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.symbol() == symbol)
    }
}

/// Signed decimal text (`-12.34`, `12`, `-0.5`) in minor units.
pub fn signed_minor(text: &str) -> Option<i64> {
    let text = text.trim();
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let minor = Amount::parse(digits).ok()?.minor();
    Some(if negative { -minor } else { minor })
}

/// IBANs compare without spaces and case.
fn same_account(a: &str, b: &str) -> bool {
    let normal = |s: &str| -> String {
        s.chars()
            .filter(|c| !c.is_whitespace())
            .map(|c| c.to_ascii_uppercase())
            .collect()
    };
    normal(a) == normal(b)
}

fn same_text(a: &str, b: &str) -> bool {
    a.trim().eq_ignore_ascii_case(b.trim())
}

/// Finds the payment in the bookings (any order).
pub fn find(expected: &Expected<'_>, bookings: &[Booked<'_>]) -> Evidence {
    let debit = -expected.amount.minor();
    let candidates: Vec<&Booked<'_>> = bookings
        .iter()
        .filter(|b| signed_minor(b.amount) == Some(debit))
        .filter(|b| b.currency.is_none_or(|c| same_text(c, expected.currency)))
        .filter(|b| {
            b.counterparty_account
                .is_some_and(|a| same_account(a, expected.creditor_account))
        })
        .collect();
    let by_e2e: Vec<&&Booked<'_>> = candidates
        .iter()
        .filter(|b| {
            b.end_to_end_id
                .is_some_and(|e| same_text(e, expected.end_to_end_id))
        })
        .collect();
    // A booking that shows another end-to-end id is another payment, whatever its text says.
    let without_e2e = candidates.iter().filter(|b| b.end_to_end_id.is_none());
    let by_remittance: Vec<&&Booked<'_>> = match expected.remittance {
        Some(remittance) => without_e2e
            .filter(|b| {
                [b.remittance, b.communication]
                    .into_iter()
                    .flatten()
                    .any(|text| same_text(text, remittance))
            })
            .collect(),
        None => Vec::new(),
    };
    let (matches, matched_by) = if !by_e2e.is_empty() {
        (by_e2e, MatchedBy::EndToEndId)
    } else if !by_remittance.is_empty() {
        (by_remittance, MatchedBy::Remittance)
    } else {
        let unknown = candidates
            .iter()
            .filter(|b| b.end_to_end_id.is_none())
            .count();
        return if unknown == 0 {
            Evidence::NotBooked
        } else {
            Evidence::Ambiguous {
                candidates: unknown,
            }
        };
    };
    let references: Vec<Option<String>> = matches
        .iter()
        .map(|b| b.reference.map(str::to_owned))
        .collect();
    match references.as_slice() {
        [one] => Evidence::Booked {
            reference: one.clone(),
            matched_by,
        },
        _ => Evidence::Duplicated {
            references,
            matched_by,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREDITOR: &str = "BE68539007547034";

    fn expected(remittance: Option<&'static str>) -> Expected<'static> {
        Expected {
            amount: Amount::from_minor(3_000),
            currency: "EUR",
            creditor_account: CREDITOR,
            end_to_end_id: "E2E-1",
            remittance,
        }
    }

    fn booked(reference: &'static str, amount: &'static str) -> Booked<'static> {
        Booked {
            reference: Some(reference),
            amount,
            currency: Some("EUR"),
            counterparty_account: Some(CREDITOR),
            ..Booked::default()
        }
    }

    #[test]
    fn signed_amounts() {
        assert_eq!(signed_minor("-30.00"), Some(-3_000));
        assert_eq!(signed_minor("-30"), Some(-3_000));
        assert_eq!(signed_minor("+0.5"), Some(50));
        assert_eq!(signed_minor(" 12.34 "), Some(1_234));
        for bad in ["", "-", "12.345", "1e3", "--1", "12,34"] {
            assert_eq!(signed_minor(bad), None, "{bad}");
        }
    }

    #[test]
    fn one_booking_with_the_e2e_id_is_the_evidence() {
        let history = [
            Booked {
                end_to_end_id: Some("E2E-1"),
                ..booked("R1", "-30.00")
            },
            // Same amount and creditor, another payment's id.
            Booked {
                end_to_end_id: Some("E2E-2"),
                ..booked("R2", "-30.00")
            },
            // A credit of the amount is not the payment.
            Booked {
                end_to_end_id: Some("E2E-1"),
                ..booked("R3", "30.00")
            },
        ];
        assert_eq!(
            find(&expected(None), &history),
            Evidence::Booked {
                reference: Some("R1".into()),
                matched_by: MatchedBy::EndToEndId
            }
        );
    }

    #[test]
    fn two_bookings_with_the_e2e_id_are_a_double_payment() {
        let history = [
            Booked {
                end_to_end_id: Some("e2e-1"),
                counterparty_account: Some("be68 5390 0754 7034"),
                ..booked("R1", "-30.00")
            },
            Booked {
                end_to_end_id: Some("E2E-1"),
                ..booked("R9", "-30")
            },
        ];
        assert_eq!(
            find(&expected(None), &history),
            Evidence::Duplicated {
                references: vec![Some("R1".into()), Some("R9".into())],
                matched_by: MatchedBy::EndToEndId
            }
        );
    }

    #[test]
    fn without_e2e_ids_the_remittance_decides_and_without_it_nothing_is_confirmed() {
        let plain = [
            Booked {
                communication: Some("Invoice 42"),
                ..booked("R1", "-30.00")
            },
            Booked {
                remittance: Some("invoice 42 "),
                ..booked("R2", "-30.00")
            },
            Booked {
                communication: Some("Invoice 43"),
                ..booked("R3", "-30.00")
            },
        ];
        assert_eq!(
            find(&expected(Some("Invoice 42")), &plain),
            Evidence::Duplicated {
                references: vec![Some("R1".into()), Some("R2".into())],
                matched_by: MatchedBy::Remittance
            }
        );
        assert_eq!(
            find(&expected(Some("Invoice 43")), &plain),
            Evidence::Booked {
                reference: Some("R3".into()),
                matched_by: MatchedBy::Remittance
            }
        );
        // No remittance to compare: three candidates, none provably this payment.
        assert_eq!(
            find(&expected(None), &plain),
            Evidence::Ambiguous { candidates: 3 }
        );
    }

    #[test]
    fn other_amounts_currencies_and_creditors_are_not_bookings_of_the_payment() {
        let history = [
            Booked {
                end_to_end_id: Some("E2E-1"),
                ..booked("R1", "-30.01")
            },
            Booked {
                end_to_end_id: Some("E2E-1"),
                currency: Some("USD"),
                ..booked("R2", "-30.00")
            },
            Booked {
                end_to_end_id: Some("E2E-1"),
                counterparty_account: Some("BE71096123456769"),
                ..booked("R3", "-30.00")
            },
            Booked {
                end_to_end_id: Some("E2E-1"),
                counterparty_account: None,
                ..booked("R4", "-30.00")
            },
            Booked {
                end_to_end_id: Some("E2E-1"),
                ..booked("R5", "not an amount")
            },
        ];
        assert_eq!(find(&expected(None), &history), Evidence::NotBooked);
        assert_eq!(find(&expected(None), &[]), Evidence::NotBooked);
    }
}
