//! Dialects: each plausible Belfius, as the simulator speaks it (`pis-worker sandbox --dialect`)
//! and as `pis-worker bank-check` recognises it.
//!
//! About 40 % of the Belfius PIS API is undocumented (docs/belfius.md marks each guess [I]).
//! Where the documentation is silent, a simulator that makes the client's own guess can never
//! show the guess wrong. So each open question the client depends on is a dimension here, and a
//! dialect fixes every dimension to one plausible answer, strictly: what that bank would refuse,
//! the simulator refuses. The client must work with every dialect (or fail loudly, naming the
//! mismatch), and `pis-worker bank-check` must name the dialect a bank speaks.
//!
//! Dimensions (docs/belfius.md, "Dialects"):
//! - the initiation answer ([`AnswerShape`]: 201 with `_links`, 201 with `Location` only, a
//!   302, a 401 `SCA_REQUIRED` with the URL in `error_description`);
//! - the JSON type of `instructed_amount.amount` (string or number; the other is refused);
//! - the one `/token` Accept version taken (the others refused, 400 naming `Accept`);
//! - the status codes answered (the PSD2 core set, or other codes of the ISO 20022 list for the
//!   same states: `PDNG` for `RCVD`, `ACCP` for `ACTC`, `ACCC` for `ACSC`);
//! - the Base64 alphabet of the QSeal `Signature` (checked when signatures are verified).

use crate::belfius::AmountFormat;
use crate::belfius::SignatureEncoding;
use crate::belfius::answer::AnswerShape;
use crate::belfius::status::TransactionStatus;

/// Which codes the status answers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusCodes {
    /// `RCVD`, `ACTC`, `ACSC`, `RJCT`, `CANC`, `PATC`, `PART`.
    Core,
    /// Other ISO 20022 codes for the same states: `PDNG`, `ACCP`, `ACCC`.
    Iso,
}

impl StatusCodes {
    /// The code answered for a payment in the simulator's own status.
    pub fn answer(self, status: TransactionStatus) -> &'static str {
        match self {
            StatusCodes::Core => status.as_str(),
            StatusCodes::Iso => match status {
                TransactionStatus::Rcvd => TransactionStatus::Pdng.as_str(),
                TransactionStatus::Actc => TransactionStatus::Accp.as_str(),
                TransactionStatus::Acsc => TransactionStatus::Accc.as_str(),
                TransactionStatus::Pdng
                | TransactionStatus::Patc
                | TransactionStatus::Accp
                | TransactionStatus::Acsp
                | TransactionStatus::Acwc
                | TransactionStatus::Acfc
                | TransactionStatus::Part
                | TransactionStatus::Rjct
                | TransactionStatus::Canc
                | TransactionStatus::Accc
                | TransactionStatus::Acwp
                | TransactionStatus::Acis
                | TransactionStatus::Acpd
                | TransactionStatus::Blck
                | TransactionStatus::Cpuc
                | TransactionStatus::Pres => status.as_str(),
            },
        }
    }
}

/// One plausible Belfius.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dialect {
    pub name: &'static str,
    pub summary: &'static str,
    pub answer: AnswerShape,
    pub amount: AmountFormat,
    pub token_version: &'static str,
    pub statuses: StatusCodes,
    pub signature: SignatureEncoding,
}

/// Every dialect; the first is the default.
pub const DIALECTS: &[Dialect] = &[
    Dialect {
        name: "v3-links",
        summary: "201 with payment_id and _links.scaRedirect (Berlin Group style); amounts as strings; /token v3; core status codes",
        answer: AnswerShape::LinksBody,
        amount: AmountFormat::String,
        token_version: "3",
        statuses: StatusCodes::Core,
        signature: SignatureEncoding::Base64Padded,
    },
    Dialect {
        name: "v3-location",
        summary: "201 with payment_id, the SCA link only in Location (as v1 sent it); amounts as strings; /token v2",
        answer: AnswerShape::LocationHeader,
        amount: AmountFormat::String,
        token_version: "2",
        statuses: StatusCodes::Core,
        signature: SignatureEncoding::Base64Padded,
    },
    Dialect {
        name: "v1-redirect",
        summary: "302 to the SCA page, no body, the id only in the link's query; amounts as numbers (as v1); /token v1.1",
        answer: AnswerShape::Redirect,
        amount: AmountFormat::Number,
        token_version: "1.1",
        statuses: StatusCodes::Core,
        signature: SignatureEncoding::Base64Padded,
    },
    Dialect {
        name: "sca-required-401",
        summary: "401 SCA_REQUIRED (B14800ZZ-0PLC-REDRCT), the URL in error_description; amounts as numbers; /token v2; base64url signatures",
        answer: AnswerShape::ScaRequired,
        amount: AmountFormat::Number,
        token_version: "2",
        statuses: StatusCodes::Core,
        signature: SignatureEncoding::Base64UrlNoPad,
    },
    Dialect {
        name: "iso-status",
        summary: "201 with _links; other ISO 20022 codes for the same states (PDNG, ACCP, ACCC); /token v1; base64url signatures",
        answer: AnswerShape::LinksBody,
        amount: AmountFormat::String,
        token_version: "1",
        statuses: StatusCodes::Iso,
        signature: SignatureEncoding::Base64UrlNoPad,
    },
];

impl Dialect {
    pub fn named(name: &str) -> Option<Dialect> {
        DIALECTS.iter().copied().find(|d| d.name == name)
    }

    pub fn default_dialect() -> Dialect {
        DIALECTS[0]
    }

    /// The worker settings that match this dialect where the worker does not find out by
    /// itself (the `/token` version it negotiates; the answer shape and status codes it reads
    /// in every dialect).
    pub fn worker_env(&self) -> Vec<(&'static str, &'static str)> {
        vec![
            ("PIS_AMOUNT_FORMAT", self.amount.as_str()),
            (
                "PIS_SIGNATURE_ENCODING",
                match self.signature {
                    SignatureEncoding::Base64Padded => "padded",
                    SignatureEncoding::Base64UrlNoPad => "url",
                },
            ),
        ]
    }

    /// One line per dialect, for `pis-worker sandbox --list-dialects`.
    pub fn listing() -> String {
        let width = DIALECTS.iter().map(|d| d.name.len()).max().unwrap_or(0);
        DIALECTS
            .iter()
            .map(|d| format!("{:width$}  {}\n", d.name, d.summary))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialects_differ_and_cover_every_answer_shape() {
        assert!(DIALECTS.len() >= 5);
        for (i, a) in DIALECTS.iter().enumerate() {
            for b in &DIALECTS[i + 1..] {
                assert_ne!(a.name, b.name);
                let same = a.answer == b.answer
                    && a.amount == b.amount
                    && a.token_version == b.token_version
                    && a.statuses == b.statuses
                    && a.signature == b.signature;
                assert!(!same, "{} and {} cannot be told apart", a.name, b.name);
            }
        }
        for shape in AnswerShape::ALL {
            assert!(DIALECTS.iter().any(|d| d.answer == shape), "{shape:?}");
        }
        assert_eq!(Dialect::named("v3-links"), Some(Dialect::default_dialect()));
        assert_eq!(Dialect::named("nope"), None);
        assert_eq!(Dialect::listing().lines().count(), DIALECTS.len());
    }

    #[test]
    fn iso_codes_mean_the_same_state_to_the_client() {
        for status in TransactionStatus::ALL {
            let answered = StatusCodes::Iso.answer(status);
            let read = TransactionStatus::parse(answered).map(TransactionStatus::progress);
            assert_eq!(read, Some(status.progress()), "{status:?} as {answered}");
        }
    }
}
