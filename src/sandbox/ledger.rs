//! The simulator's accounts: a balance and a booked history per IBAN. Funds confirmation (CAF)
//! answers from the balance; settlement of a payment books a debit on its debtor account, so
//! account information (AIS) shows what really settled, and a payment initiated twice shows up
//! as two bookings with one end-to-end id.
//!
//! An account the operator never set starts at [`DEFAULT_BALANCE_MINOR`]. The history is
//! bounded per account ([`MAX_BOOKINGS`], oldest dropped first), so a soak that settles a
//! million payments from one debtor keeps a bounded simulator.

use std::collections::{HashMap, VecDeque};

use chrono::NaiveDate;
use serde::Serialize;

use crate::domain::model::Amount;

/// [I] Balance of an account nobody set: 10,000.00, enough for the demo's payments.
pub const DEFAULT_BALANCE_MINOR: i64 = 1_000_000;
/// Bookings kept per account.
pub const MAX_BOOKINGS: usize = 10_000;

/// One booked transaction of an account, as the AIS history shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Booking {
    /// Unique per account, increasing: the bank's `transaction_ref`.
    pub reference: u64,
    /// Minor units; negative for a debit.
    pub amount_minor: i64,
    pub currency: String,
    pub counterparty_name: String,
    pub counterparty_account: String,
    pub end_to_end_id: String,
    pub remittance: Option<String>,
    pub execution_date: NaiveDate,
    /// The simulator's payment that booked it.
    pub payment_id: String,
}

/// What settlement books: the payment's side of a transfer.
#[derive(Debug, Clone)]
pub struct Debit {
    pub amount: Amount,
    pub currency: String,
    pub creditor_name: String,
    pub creditor_account: String,
    pub end_to_end_id: String,
    pub remittance: Option<String>,
    pub execution_date: NaiveDate,
    pub payment_id: String,
}

#[derive(Debug, Default)]
struct Account {
    /// The PSU who holds it: the first to sign a payment from it, or the operator's choice.
    owner: Option<String>,
    balance_minor: Option<i64>,
    bookings: VecDeque<Booking>,
    next_reference: u64,
}

/// Minor units as the bank writes amounts: a signed decimal string (`-12.34`). `Amount`'s
/// display is for positive amounts only.
pub fn decimal(minor: i64) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

#[derive(Debug, Default)]
pub struct Ledger {
    accounts: HashMap<String, Account>,
}

impl Ledger {
    /// The account's balance in minor units.
    pub fn balance(&self, iban: &str) -> i64 {
        self.accounts
            .get(iban)
            .and_then(|a| a.balance_minor)
            .unwrap_or(DEFAULT_BALANCE_MINOR)
    }

    pub fn set_balance(&mut self, iban: &str, minor: i64) {
        self.accounts
            .entry(iban.to_owned())
            .or_default()
            .balance_minor = Some(minor);
    }

    /// Records `psu` as the account's holder, unless it has one.
    pub fn claim(&mut self, iban: &str, psu: &str) {
        let account = self.accounts.entry(iban.to_owned()).or_default();
        if account.owner.is_none() {
            account.owner = Some(psu.to_owned());
        }
    }

    /// Makes `psu` the account's holder.
    pub fn set_owner(&mut self, iban: &str, psu: &str) {
        self.accounts.entry(iban.to_owned()).or_default().owner = Some(psu.to_owned());
    }

    pub fn owner(&self, iban: &str) -> Option<&str> {
        self.accounts.get(iban).and_then(|a| a.owner.as_deref())
    }

    /// The accounts `psu` holds, sorted.
    pub fn accounts_of(&self, psu: &str) -> Vec<String> {
        let mut ibans: Vec<String> = self
            .accounts
            .iter()
            .filter(|(_, a)| a.owner.as_deref() == Some(psu))
            .map(|(iban, _)| iban.clone())
            .collect();
        ibans.sort();
        ibans
    }

    /// Whether `amount` can be paid from the account now (balance at least the amount).
    pub fn funds_available(&self, iban: &str, amount: Amount) -> bool {
        self.balance(iban) >= amount.minor()
    }

    /// Books a settled payment on its debtor account and lowers the balance. The bank has
    /// accepted the payment already: a debit that overdraws is booked all the same.
    pub fn book_debit(&mut self, iban: &str, debit: Debit) -> &Booking {
        let balance = self.balance(iban);
        let account = self.accounts.entry(iban.to_owned()).or_default();
        account.balance_minor = Some(balance - debit.amount.minor());
        account.next_reference += 1;
        if account.bookings.len() >= MAX_BOOKINGS {
            account.bookings.pop_front();
        }
        account.bookings.push_back(Booking {
            reference: account.next_reference,
            amount_minor: -debit.amount.minor(),
            currency: debit.currency,
            counterparty_name: debit.creditor_name,
            counterparty_account: debit.creditor_account,
            end_to_end_id: debit.end_to_end_id,
            remittance: debit.remittance,
            execution_date: debit.execution_date,
            payment_id: debit.payment_id,
        });
        // Just pushed.
        &account.bookings[account.bookings.len() - 1]
    }

    /// The account's bookings, oldest first.
    pub fn bookings(&self, iban: &str) -> impl DoubleEndedIterator<Item = &Booking> {
        self.accounts
            .get(iban)
            .into_iter()
            .flat_map(|a| a.bookings.iter())
    }

    /// One page of the account's history, newest first: bookings with a reference below
    /// `before` (all when `None`) and an execution date within `from..=to`, at most `size`;
    /// and the reference to continue from when more remain. Keyed by reference, a page stays
    /// right while new bookings arrive.
    pub fn page(
        &self,
        iban: &str,
        before: Option<u64>,
        size: usize,
        from: Option<NaiveDate>,
        to: Option<NaiveDate>,
    ) -> (Vec<&Booking>, Option<u64>) {
        let mut matching = self
            .bookings(iban)
            .rev()
            .filter(|b| before.is_none_or(|key| b.reference < key))
            .filter(|b| from.is_none_or(|d| b.execution_date >= d))
            .filter(|b| to.is_none_or(|d| b.execution_date <= d));
        let page: Vec<&Booking> = matching.by_ref().take(size).collect();
        let next = match (matching.next(), page.last()) {
            (Some(_), Some(last)) => Some(last.reference),
            (Some(_) | None, None) | (None, Some(_)) => None,
        };
        (page, next)
    }

    pub fn reset(&mut self) {
        self.accounts.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn debit(e2e: &str, minor: i64) -> Debit {
        Debit {
            amount: Amount::from_minor(minor),
            currency: "EUR".into(),
            creditor_name: "Shop".into(),
            creditor_account: "BE68539007547034".into(),
            end_to_end_id: e2e.into(),
            remittance: None,
            execution_date: NaiveDate::from_ymd_opt(2026, 12, 3).unwrap_or_default(),
            payment_id: format!("p-{e2e}"),
        }
    }

    #[test]
    fn settlement_moves_the_balance_and_books_in_order() {
        let mut ledger = Ledger::default();
        let iban = "BE71096123456769";
        assert_eq!(ledger.balance(iban), DEFAULT_BALANCE_MINOR);
        ledger.set_balance(iban, 5_000);
        assert!(ledger.funds_available(iban, Amount::from_minor(5_000)));
        assert!(!ledger.funds_available(iban, Amount::from_minor(5_001)));
        ledger.book_debit(iban, debit("E1", 3_000));
        ledger.book_debit(iban, debit("E2", 3_000));
        // Overdrawn: the bank had accepted the second payment.
        assert_eq!(ledger.balance(iban), -1_000);
        let booked: Vec<_> = ledger
            .bookings(iban)
            .map(|b| (b.reference, b.end_to_end_id.as_str(), b.amount_minor))
            .collect();
        assert_eq!(booked, vec![(1, "E1", -3_000), (2, "E2", -3_000)]);
        assert_eq!(ledger.bookings("BE68539007547034").count(), 0);
    }

    #[test]
    fn the_first_claim_makes_the_holder_the_operator_may_change_it() {
        let mut ledger = Ledger::default();
        ledger.claim("BE71096123456769", "alice");
        ledger.claim("BE71096123456769", "bob");
        ledger.claim("BE41063012345610", "alice");
        assert_eq!(
            ledger.accounts_of("alice"),
            ["BE41063012345610", "BE71096123456769"]
        );
        assert!(ledger.accounts_of("bob").is_empty());
        ledger.set_owner("BE71096123456769", "bob");
        assert_eq!(ledger.owner("BE71096123456769"), Some("bob"));
        assert_eq!(ledger.accounts_of("alice"), ["BE41063012345610"]);
    }

    #[test]
    fn pages_run_newest_first_and_stay_right_while_bookings_arrive() {
        let mut ledger = Ledger::default();
        let iban = "BE71096123456769";
        for i in 1..=5 {
            ledger.book_debit(iban, debit(&format!("E{i}"), i));
        }
        let e2e = |page: &[&Booking]| -> Vec<String> {
            page.iter().map(|b| b.end_to_end_id.clone()).collect()
        };
        let (first, next) = ledger.page(iban, None, 2, None, None);
        assert_eq!(e2e(&first), ["E5", "E4"]);
        // A booking arrives between two pages: the next page is not shifted by it.
        ledger.book_debit(iban, debit("E6", 6));
        let (second, next) = ledger.page(iban, next, 2, None, None);
        assert_eq!(e2e(&second), ["E3", "E2"]);
        let (third, next) = ledger.page(iban, next, 2, None, None);
        assert_eq!(e2e(&third), ["E1"]);
        assert_eq!(next, None);
        // A date window outside every booking: nothing, no next page.
        let day = NaiveDate::from_ymd_opt(2026, 12, 4);
        assert_eq!(ledger.page(iban, None, 10, day, None), (Vec::new(), None));
    }

    #[test]
    fn history_is_bounded_oldest_first_out() {
        let mut ledger = Ledger::default();
        let iban = "BE71096123456769";
        for i in 0..(MAX_BOOKINGS + 5) {
            ledger.book_debit(iban, debit(&format!("E{i}"), 1));
        }
        assert_eq!(ledger.bookings(iban).count(), MAX_BOOKINGS);
        assert_eq!(
            ledger
                .bookings(iban)
                .next()
                .map(|b| b.end_to_end_id.clone()),
            Some("E5".to_owned())
        );
        assert_eq!(
            ledger.balance(iban),
            DEFAULT_BALANCE_MINOR - (MAX_BOOKINGS as i64 + 5)
        );
    }
}
