//! What the bank's status tells the state machine, independent of the bank's vocabulary.

use serde::{Deserialize, Serialize};

/// Progress of a payment at the bank, as mapped from an ISO 20022 transaction status by
/// `belfius::status`. The state machine only ever sees this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BankProgress {
    /// Received by the bank, waiting for the PSU's strong customer authentication.
    AwaitingSca,
    /// Multi-signature: some but not all signatures are in.
    PartiallySigned,
    /// Signed and accepted for execution, not yet settled.
    Signed,
    /// Executed: the debtor account is debited.
    Settled,
    /// A bulk executed with some of its transfers rejected (ISO PART for a bulk).
    PartiallyAccepted,
    /// Refused by the bank.
    Rejected,
    /// Cancelled at the bank.
    Cancelled,
}
