//! ISO 20022 transaction status codes a Belfius status request may return, and the ONE mapping
//! from them to the domain's [`BankProgress`].
//!
//! Belfius does not publish its list of status values in the readable documentation
//! (docs/belfius-facts.md §4, open question §10.4): the set below is the ISO 20022
//! `ExternalPaymentTransactionStatus1Code` subset used by PSD2 APIs, and every mapping is an
//! assumption [I] listed in docs/belfius.md. Bare section numbers below are those of
//! docs/belfius-facts.md.

use crate::domain::bank::BankProgress;

/// An ISO 20022 transaction status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransactionStatus {
    /// Received.
    Rcvd,
    /// Pending.
    Pdng,
    /// Partially accepted technical correct (multi-signature: some signatures missing).
    Patc,
    /// Accepted technical validation.
    Actc,
    /// Accepted customer profile.
    Accp,
    /// Accepted settlement in process.
    Acsp,
    /// Accepted with change.
    Acwc,
    /// Accepted funds checked.
    Acfc,
    /// Accepted settlement completed.
    Acsc,
    /// Partially accepted (bulk: some transactions accepted).
    Part,
    /// Rejected.
    Rjct,
    /// Cancelled.
    Canc,
}

impl TransactionStatus {
    pub const ALL: [TransactionStatus; 12] = [
        TransactionStatus::Rcvd,
        TransactionStatus::Pdng,
        TransactionStatus::Patc,
        TransactionStatus::Actc,
        TransactionStatus::Accp,
        TransactionStatus::Acsp,
        TransactionStatus::Acwc,
        TransactionStatus::Acfc,
        TransactionStatus::Acsc,
        TransactionStatus::Part,
        TransactionStatus::Rjct,
        TransactionStatus::Canc,
    ];

    /// Parses a code case-insensitively and ignoring surrounding blanks (the bank's casing is
    /// not documented); unknown codes give `None` so the caller can treat them as a protocol
    /// problem instead of guessing.
    pub fn parse(code: &str) -> Option<Self> {
        let code = code.trim();
        Self::ALL
            .into_iter()
            .find(|s| s.as_str().eq_ignore_ascii_case(code))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TransactionStatus::Rcvd => "RCVD",
            TransactionStatus::Pdng => "PDNG",
            TransactionStatus::Patc => "PATC",
            TransactionStatus::Actc => "ACTC",
            TransactionStatus::Accp => "ACCP",
            TransactionStatus::Acsp => "ACSP",
            TransactionStatus::Acwc => "ACWC",
            TransactionStatus::Acfc => "ACFC",
            TransactionStatus::Acsc => "ACSC",
            TransactionStatus::Part => "PART",
            TransactionStatus::Rjct => "RJCT",
            TransactionStatus::Canc => "CANC",
        }
    }

    /// What the code means for the payment's progress. All mappings are [I] (docs silent).
    pub fn progress(self) -> BankProgress {
        match self {
            // [I] Every Belfius payment needs SCA (no exemptions, §2.6), so a freshly received or
            // pending payment is waiting for the PSU. Yolt's note that RCVD means "money moved"
            // (§4) is unverified and contradicts the mandatory SCA; we do not follow it.
            TransactionStatus::Rcvd | TransactionStatus::Pdng => BankProgress::AwaitingSca,
            // [I] Multi-signature (§4): the first signer signed through the redirect, others
            // still have to sign in Belfius channels. PART (bulk partially accepted) is the
            // nearest equivalent for a single payment: not fully authorised yet. For a bulk,
            // PART means "executed, some transfers rejected": the engine maps that per kind
            // (`engine::bank::progress_for`), this table stays kind-independent.
            TransactionStatus::Patc | TransactionStatus::Part => BankProgress::PartiallySigned,
            // [I] The accepted-but-not-settled family: authorised by the PSU, queued or in
            // execution; none of them is final.
            TransactionStatus::Actc
            | TransactionStatus::Accp
            | TransactionStatus::Acsp
            | TransactionStatus::Acwc
            | TransactionStatus::Acfc => BankProgress::Signed,
            // [I] Settlement completed on the debtor side: final.
            TransactionStatus::Acsc => BankProgress::Settled,
            // [I] Final refusal (by the bank, the PSU, or an expired SCA session).
            TransactionStatus::Rjct => BankProgress::Rejected,
            // [I] Final cancellation.
            TransactionStatus::Canc => BankProgress::Cancelled,
        }
    }

    /// Whether the bank will not change this status any more (the assumption of
    /// docs/belfius-facts.md §4).
    pub fn is_final(self) -> bool {
        match self.progress() {
            BankProgress::Settled
            | BankProgress::PartiallyAccepted
            | BankProgress::Rejected
            | BankProgress::Cancelled => true,
            BankProgress::AwaitingSca | BankProgress::PartiallySigned | BankProgress::Signed => {
                false
            }
        }
    }
}

impl std::fmt::Display for TransactionStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress_of(code: &str) -> BankProgress {
        match TransactionStatus::parse(code) {
            Some(status) => status.progress(),
            None => panic!("{code} did not parse"),
        }
    }

    #[test]
    fn rcvd_awaits_sca() {
        assert_eq!(progress_of("RCVD"), BankProgress::AwaitingSca);
    }

    #[test]
    fn pdng_awaits_sca() {
        assert_eq!(progress_of("PDNG"), BankProgress::AwaitingSca);
    }

    #[test]
    fn patc_is_partially_signed() {
        assert_eq!(progress_of("PATC"), BankProgress::PartiallySigned);
    }

    #[test]
    fn part_is_partially_signed() {
        assert_eq!(progress_of("PART"), BankProgress::PartiallySigned);
    }

    #[test]
    fn actc_is_signed() {
        assert_eq!(progress_of("ACTC"), BankProgress::Signed);
    }

    #[test]
    fn accp_is_signed() {
        assert_eq!(progress_of("ACCP"), BankProgress::Signed);
    }

    #[test]
    fn acsp_is_signed() {
        assert_eq!(progress_of("ACSP"), BankProgress::Signed);
    }

    #[test]
    fn acwc_is_signed() {
        assert_eq!(progress_of("ACWC"), BankProgress::Signed);
    }

    #[test]
    fn acfc_is_signed() {
        assert_eq!(progress_of("ACFC"), BankProgress::Signed);
    }

    #[test]
    fn acsc_is_settled() {
        assert_eq!(progress_of("ACSC"), BankProgress::Settled);
    }

    #[test]
    fn rjct_is_rejected() {
        assert_eq!(progress_of("RJCT"), BankProgress::Rejected);
    }

    #[test]
    fn canc_is_cancelled() {
        assert_eq!(progress_of("CANC"), BankProgress::Cancelled);
    }

    #[test]
    fn codes_round_trip_and_parse_leniently() {
        for status in TransactionStatus::ALL {
            assert_eq!(TransactionStatus::parse(status.as_str()), Some(status));
            let lower = status.as_str().to_ascii_lowercase();
            assert_eq!(
                TransactionStatus::parse(&format!(" {lower} ")),
                Some(status)
            );
        }
    }

    #[test]
    fn unknown_codes_are_not_guessed() {
        for bad in ["", "RCV", "ACCC", "ACSCX", "OK"] {
            assert_eq!(TransactionStatus::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_settled_rejected_cancelled_are_final() {
        let finals: Vec<_> = TransactionStatus::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .map(TransactionStatus::as_str)
            .collect();
        assert_eq!(finals, ["ACSC", "RJCT", "CANC"]);
    }
}
