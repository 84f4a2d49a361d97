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
    Rcvd,
    Pdng,
    Patc,
    Actc,
    Accp,
    Acsp,
    Acwc,
    Acfc,
    Acsc,
    Part,
    Rjct,
    Canc,
    /// AcceptedSettlementCompletedCreditorAccount: credited at the creditor, after ACSC.
    Accc,
    /// AcceptedWithoutPosting: accepted, not yet posted to the creditor's account.
    Acwp,
    /// AcceptedAndChequeIssued (a cheque payment; listed for completeness).
    Acis,
    /// AcceptedClearingProcessed.
    Acpd,
    /// Blocked: "funds will neither be posted to the creditor's account, nor be returned to
    /// the debtor" (ISO 20022). The payment will not reach its creditor.
    Blck,
    /// CashPickedUpByCreditor (cash payments; completeness).
    Cpuc,
    /// Presented (a cheque or payment presented for clearing).
    Pres,
}

impl TransactionStatus {
    /// The whole ISO 20022 `ExternalPaymentTransactionStatus1Code` list (the simulator's
    /// `iso-status` dialect answers with codes beyond the PSD2 core set).
    pub const ALL: [TransactionStatus; 19] = [
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
        TransactionStatus::Accc,
        TransactionStatus::Acwp,
        TransactionStatus::Acis,
        TransactionStatus::Acpd,
        TransactionStatus::Blck,
        TransactionStatus::Cpuc,
        TransactionStatus::Pres,
    ];

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
            TransactionStatus::Accc => "ACCC",
            TransactionStatus::Acwp => "ACWP",
            TransactionStatus::Acis => "ACIS",
            TransactionStatus::Acpd => "ACPD",
            TransactionStatus::Blck => "BLCK",
            TransactionStatus::Cpuc => "CPUC",
            TransactionStatus::Pres => "PRES",
        }
    }

    pub fn progress(self) -> BankProgress {
        match self {
            TransactionStatus::Rcvd | TransactionStatus::Pdng => BankProgress::AwaitingSca,
            TransactionStatus::Patc | TransactionStatus::Part => BankProgress::PartiallySigned,
            TransactionStatus::Actc
            | TransactionStatus::Accp
            | TransactionStatus::Acsp
            | TransactionStatus::Acwc
            | TransactionStatus::Acfc
            | TransactionStatus::Acwp
            | TransactionStatus::Acis
            | TransactionStatus::Acpd
            | TransactionStatus::Pres => BankProgress::Signed,
            TransactionStatus::Acsc | TransactionStatus::Accc | TransactionStatus::Cpuc => {
                BankProgress::Settled
            }
            // [I] blocked for good: the creditor will not be paid, which is what a client
            // must act on; the status event carries BLCK itself.
            TransactionStatus::Rjct | TransactionStatus::Blck => BankProgress::Rejected,
            TransactionStatus::Canc => BankProgress::Cancelled,
        }
    }

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

/// Status codes an operator maps (`PIS_BANK_STATUS_MAP`, e.g. `XYZW=signed,ABCD=rejected`) on
/// top of the ISO list: what to do when the bank answers with a code this version does not know,
/// without waiting for a release (docs/runbooks.md, "PisBankStatusUnrecognized").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusMap {
    extra: Vec<(String, BankProgress)>,
}

impl StatusMap {
    /// `CODE=progress` pairs separated by commas; progress one of `awaiting-sca`,
    /// `partially-signed`, `signed`, `settled`, `rejected`, `cancelled`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut extra = Vec::new();
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (code, progress) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?}: expected CODE=progress"))?;
            let code = code.trim().to_ascii_uppercase();
            if code.len() != 4 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(format!("{code:?}: a status code is 4 letters"));
            }
            let progress = match progress.trim() {
                "awaiting-sca" => BankProgress::AwaitingSca,
                "partially-signed" => BankProgress::PartiallySigned,
                "signed" => BankProgress::Signed,
                "settled" => BankProgress::Settled,
                "rejected" => BankProgress::Rejected,
                "cancelled" => BankProgress::Cancelled,
                other => {
                    return Err(format!(
                        "{other:?}: one of awaiting-sca, partially-signed, signed, settled, rejected, cancelled"
                    ));
                }
            };
            extra.push((code, progress));
        }
        Ok(Self { extra })
    }

    /// The progress of `code`: the ISO list first, then the operator's map.
    pub fn interpret(&self, code: &str) -> Option<(String, BankProgress)> {
        if let Some(status) = TransactionStatus::parse(code) {
            return Some((status.as_str().to_owned(), status.progress()));
        }
        let code = code.trim().to_ascii_uppercase();
        self.extra
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(c, p)| (c.clone(), *p))
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

    #[test]
    fn the_whole_iso_list_is_mapped() {
        for code in [
            "ACCC", "ACCP", "ACFC", "ACIS", "ACPD", "ACSC", "ACSP", "ACTC", "ACWC", "ACWP", "BLCK",
            "CANC", "CPUC", "PART", "PATC", "PDNG", "PRES", "RCVD", "RJCT",
        ] {
            assert!(TransactionStatus::parse(code).is_some(), "{code}");
        }
        assert_eq!(progress_of("ACCC"), BankProgress::Settled);
        assert_eq!(progress_of("ACWP"), BankProgress::Signed);
        assert_eq!(progress_of("BLCK"), BankProgress::Rejected);
    }

    #[test]
    fn an_operator_map_interprets_unknown_codes_and_rejects_bad_ones() {
        let map = StatusMap::parse("XYZW=signed, abcd=rejected").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            map.interpret("xyzw"),
            Some(("XYZW".into(), BankProgress::Signed))
        );
        assert_eq!(
            map.interpret("ACSC"),
            Some(("ACSC".into(), BankProgress::Settled))
        );
        assert_eq!(map.interpret("QQQQ"), None);
        assert!(StatusMap::parse("XYZ=signed").is_err());
        assert!(StatusMap::parse("XYZW=paid").is_err());
        assert!(StatusMap::parse("XYZW").is_err());
        assert_eq!(StatusMap::parse(""), Ok(StatusMap::default()));
    }

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
        for bad in ["", "RCV", "ACCX", "ACSCX", "OK", "XYZW"] {
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
        assert_eq!(finals, ["ACSC", "RJCT", "CANC", "ACCC", "BLCK", "CPUC"]);
    }
}
