//! `pis-worker bank-check`: which dialect does this bank speak?
//!
//! A short, harmless sequence against a configured bank (docs/belfius.md, "bank-check"):
//! 1. `/token` with a code that does not exist, once per known Accept version: the bank refuses
//!    each either for the version or for the code, so the versions it takes are known and
//!    nothing is redeemed;
//! 2. one initiation of 0.01 EUR with PKCE, never signed: its answer shape, and which amount
//!    type (and, with a QSeal key, which Signature alphabet) the bank takes. A refusal naming
//!    the amount, or the signature, is retried once with the other choice (a 4xx creates
//!    nothing). The payment expires unsigned at the bank;
//! 3. the status of that payment: the code a bank uses for "waiting for SCA".
//!
//! Each answer is classified on each dimension of `dialect::Dialect`; the verdict names the
//! dialect all of them match. An answer that matches no known value of its dimension (an
//! unreadable initiation answer, an unknown status code, no token version taken) fails the
//! check.

use std::fmt::Write as _;

use super::answer::AnswerShape;
use super::dialect::{DIALECTS, Dialect, StatusCodes};
use super::status::TransactionStatus;
use super::{AmountFormat, SignatureEncoding};

/// What the bank's answers showed, dimension by dimension (`None`: not determined).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub token_versions: Vec<String>,
    pub answer: Option<AnswerShape>,
    pub amount: Option<AmountFormat>,
    /// `None` when no QSeal key was configured (the dimension is not checked).
    pub signature: Option<SignatureEncoding>,
    /// The status code the bank answered for the unsigned payment.
    pub pending_status: Option<String>,
}

/// The verdict of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every answer is known, and they match this dialect.
    Dialect(Dialect),
    /// Every answer is known, in a combination no named dialect has: the settings still work.
    Known,
    /// At least one answer matches nothing known; why.
    Unknown(Vec<String>),
}

impl Observed {
    fn statuses(&self) -> Option<StatusCodes> {
        let code = self.pending_status.as_deref()?;
        match TransactionStatus::parse(code) {
            Some(TransactionStatus::Rcvd) => Some(StatusCodes::Core),
            Some(TransactionStatus::Pdng) => Some(StatusCodes::Iso),
            Some(_) | None => None,
        }
    }

    /// The dialect these answers match, or why none does.
    pub fn verdict(&self) -> Verdict {
        let mut unknown = Vec::new();
        if self.token_versions.is_empty() {
            unknown.push("/token took none of the known Accept versions".to_owned());
        }
        if self.answer.is_none() {
            unknown.push("the initiation answer matches no known shape".to_owned());
        }
        if self.amount.is_none() {
            unknown.push("the bank took the amount neither as a string nor as a number".to_owned());
        }
        let statuses = self.statuses();
        if statuses.is_none() {
            unknown.push(match &self.pending_status {
                Some(code) => format!("{code:?} is not a known status of an unsigned payment"),
                None => "no status was read".to_owned(),
            });
        }
        if !unknown.is_empty() {
            return Verdict::Unknown(unknown);
        }
        let matching = DIALECTS.iter().find(|d| {
            self.token_versions.iter().any(|v| v == d.token_version)
                && Some(d.answer) == self.answer
                && Some(d.amount) == self.amount
                && Some(d.statuses) == statuses
                && self.signature.is_none_or(|s| s == d.signature)
        });
        match matching {
            Some(dialect) => Verdict::Dialect(*dialect),
            None => Verdict::Known,
        }
    }

    /// The worker settings these answers call for.
    pub fn settings(&self) -> String {
        let mut out = String::new();
        if let Some(amount) = self.amount {
            let _ = write!(out, "PIS_AMOUNT_FORMAT={}", amount.as_str());
        }
        if let Some(version) = self.token_versions.first() {
            let _ = write!(out, " PIS_API_VERSION_TOKEN={version}");
        }
        if let Some(signature) = self.signature {
            let _ = write!(
                out,
                " PIS_SIGNATURE_ENCODING={}",
                match signature {
                    SignatureEncoding::Base64Padded => "padded",
                    SignatureEncoding::Base64UrlNoPad => "url",
                }
            );
        }
        out.trim().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(d: &Dialect) -> Observed {
        Observed {
            token_versions: vec![d.token_version.to_owned()],
            answer: Some(d.answer),
            amount: Some(d.amount),
            signature: Some(d.signature),
            pending_status: Some(d.statuses.answer(TransactionStatus::Rcvd).to_owned()),
        }
    }

    #[test]
    fn each_dialect_is_named_from_its_own_answers() {
        for d in DIALECTS {
            assert_eq!(observed(d).verdict(), Verdict::Dialect(*d), "{}", d.name);
        }
    }

    #[test]
    fn an_unknown_answer_fails_and_says_which() {
        let mut o = observed(&DIALECTS[0]);
        o.pending_status = Some("ZZZZ".into());
        let Verdict::Unknown(why) = o.verdict() else {
            panic!("{:?}", o.verdict())
        };
        assert!(why[0].contains("ZZZZ"), "{why:?}");
        let mut o = observed(&DIALECTS[0]);
        o.answer = None;
        o.token_versions.clear();
        let Verdict::Unknown(why) = o.verdict() else {
            panic!("{:?}", o.verdict())
        };
        assert_eq!(why.len(), 2, "{why:?}");
    }

    #[test]
    fn known_answers_in_a_new_combination_are_known_not_named() {
        let mut o = observed(&DIALECTS[0]);
        o.amount = Some(AmountFormat::Number);
        assert_eq!(o.verdict(), Verdict::Known);
        assert!(o.settings().contains("PIS_AMOUNT_FORMAT=number"));
    }
}
