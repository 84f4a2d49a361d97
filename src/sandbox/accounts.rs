//! Which bank holds a debtor account, read from a Belgian IBAN's bank code (characters 5-7,
//! the National Bank of Belgium's "protocol code"): Belfius, its Banx brand, or another bank.

use crate::domain::model::Brand;

/// The National Bank of Belgium's codes of Belfius Bank (BIC GKCCBEBB), as third parties
/// reproduce its list [T]; configurable (`--belfius-bank-codes`).
pub const DEFAULT_BELFIUS_BANK_CODES: &[&str] = &[
    "050-099", "550-560", "562-569", "624-625", "638", "657", "672", "680", "682-683", "775-799",
    "830-839",
];

/// [I] Banx's codes are not published. 977 is a placeholder that no real Belfius account
/// carries (the NBB list gives it to another institution), so no Belfius account is misread
/// as Banx; configurable (`--banx-bank-codes`).
pub const DEFAULT_BANX_BANK_CODES: &[&str] = &["977"];

/// A set of three-digit bank codes, written as `050-099` ranges or single `977` codes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BankCodes(Vec<(u16, u16)>);

impl BankCodes {
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let code = |text: &str| -> Result<u16, String> {
            let text = text.trim();
            if text.len() == 3 && text.bytes().all(|b| b.is_ascii_digit()) {
                text.parse().map_err(|e| format!("bank code {text:?}: {e}"))
            } else {
                Err(format!("bank code {text:?} is not three digits"))
            }
        };
        entries
            .iter()
            .map(|entry| {
                let entry = entry.as_ref();
                let (low, high) = match entry.split_once('-') {
                    Some((low, high)) => (code(low)?, code(high)?),
                    None => (code(entry)?, code(entry)?),
                };
                if low > high {
                    return Err(format!("bank code range {entry:?} is empty"));
                }
                Ok((low, high))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    pub fn contains(&self, code: u16) -> bool {
        self.0
            .iter()
            .any(|(low, high)| (*low..=*high).contains(&code))
    }
}

/// Who holds an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    Brand(Brand),
    /// A Belgian account of another bank, with its bank code.
    OtherBelgianBank(u16),
    /// Not a Belgian IBAN: no account of either brand.
    Foreign,
}

/// Banx codes are looked at first: a code in both lists is a Banx one.
pub fn holder(belfius: &BankCodes, banx: &BankCodes, iban: &str) -> Holder {
    let Some(code) = iban
        .strip_prefix("BE")
        .and_then(|rest| rest.get(2..5))
        .and_then(|digits| digits.parse::<u16>().ok())
    else {
        return Holder::Foreign;
    };
    if banx.contains(code) {
        Holder::Brand(Brand::Banx)
    } else if belfius.contains(code) {
        Holder::Brand(Brand::Belfius)
    } else {
        Holder::OtherBelgianBank(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bank_codes_decide_the_holder() {
        let belfius = BankCodes::parse(DEFAULT_BELFIUS_BANK_CODES).expect("defaults parse");
        let banx = BankCodes::parse(DEFAULT_BANX_BANK_CODES).expect("defaults parse");
        for (iban, expected) in [
            ("BE71096123456769", Holder::Brand(Brand::Belfius)),
            ("BE41063012345610", Holder::Brand(Brand::Belfius)),
            ("BE76977123456795", Holder::Brand(Brand::Banx)),
            // 539: not allocated; 734: KBC.
            ("BE68539007547034", Holder::OtherBelgianBank(539)),
            ("BE36734012345681", Holder::OtherBelgianBank(734)),
            ("NL91ABNA0417164300", Holder::Foreign),
        ] {
            assert_eq!(holder(&belfius, &banx, iban), expected, "{iban}");
        }
        // Range edges.
        for (code, is_belfius) in [
            (49, false),
            (50, true),
            (99, true),
            (100, false),
            (561, false),
        ] {
            assert_eq!(belfius.contains(code), is_belfius, "{code}");
        }
    }

    #[test]
    fn bank_code_lists_are_validated() {
        assert!(BankCodes::parse(&["050-099", "977"]).is_ok());
        for bad in ["50", "0500", "099-050", "abc", "050-", ""] {
            assert!(BankCodes::parse(&[bad]).is_err(), "{bad}");
        }
    }
}
