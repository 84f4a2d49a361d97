//! The rest of the portal a payment worker uses, client side: `GET /consent-uris` (the SCA
//! redirect of an AIS or CAF consent, exchanged at `/token` like a payment's code) and
//! `POST /funds-confirmations` (CAF). Facts and guesses: docs/belfius-facts.md §3.1 and §13;
//! the settings that change the guesses: docs/belfius.md, "Consents and funds confirmation".

use reqwest::Method;
use reqwest::header;
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};

use super::{BelfiusClient, headers};
use crate::belfius::BankError;
use crate::belfius::guard::Call;
use crate::belfius::pkce::METHOD_S256;
use crate::domain::model::{Amount, Brand, Language};

/// What a consent is for. PIS does not use consents [P].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConsentScope {
    /// Account information: the PSU chooses the accounts on the bank's page.
    Ais,
    /// Confirmation of funds on one account.
    Caf,
}

impl ConsentScope {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsentScope::Ais => "AIS",
            ConsentScope::Caf => "CAF",
        }
    }
}

/// A consent to ask for.
#[derive(Debug, Clone, Copy)]
pub struct ConsentRequest<'a> {
    pub brand: Brand,
    pub scope: ConsentScope,
    /// The account of a CAF consent; must be `None` for AIS (version 4 takes none [P]).
    pub iban: Option<&'a str>,
    /// The page's language; `None` asks for every language's URI.
    pub language: Option<Language>,
    /// A registered redirect URI: the bank sends the PSU back there with the code.
    pub redirect_uri: &'a str,
    /// The S256 PKCE challenge; its verifier goes to `/token` with the code.
    pub code_challenge: &'a str,
}

/// One entry of the `GET /consent-uris` answer [P]. The TPP appends its own `state` to the
/// URI before giving it to the PSU (no `state` parameter exists [C Tink, Yolt]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ConsentUri {
    pub language: String,
    pub consent_uri: String,
}

#[derive(Serialize)]
struct FundsRequest<'a> {
    account: FundsAccount<'a>,
    instructed_amount: FundsAmount<'a>,
}

#[derive(Serialize)]
struct FundsAccount<'a> {
    iban: &'a str,
}

#[derive(Serialize)]
struct FundsAmount<'a> {
    currency: &'a str,
    /// [P caf/reference] a string, "decimal separator is a dot".
    amount: String,
}

#[derive(Deserialize)]
struct FundsAnswer {
    funds_available: FundsFlag,
}

/// `true`, or the old v1's `"True"` string [P].
#[derive(Deserialize)]
#[serde(untagged)]
enum FundsFlag {
    Bool(bool),
    Text(String),
}

/// An account an AIS consent covers [P accounts reference; C Tink, Yolt].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AccountInfo {
    /// The bank's opaque id of the account, used in the transactions path.
    pub logical_id: String,
    pub iban: String,
    #[serde(default)]
    pub currency: Option<String>,
    /// A string in the newest reference, a number in older traffic [C]: kept as text.
    #[serde(default, deserialize_with = "decimal_text")]
    pub balance: Option<String>,
}

#[derive(Deserialize)]
struct AccountList {
    accounts: Vec<AccountInfo>,
}

/// One booked transaction [P, C Tink, Yolt]. Fields the bank may leave out are optional.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BookedTransaction {
    #[serde(default)]
    pub transaction_ref: Option<String>,
    /// Signed decimal: negative for a debit.
    #[serde(deserialize_with = "decimal_text_required")]
    pub amount: String,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub counterparty_info: Option<String>,
    #[serde(default)]
    pub counterparty_account: Option<String>,
    #[serde(default)]
    pub communication: Option<String>,
    #[serde(default)]
    pub remittance_info: Option<String>,
    /// [I] not seen in public traffic: read when the bank sends it.
    #[serde(default)]
    pub end_to_end_id: Option<String>,
    #[serde(default)]
    pub execution_date: Option<String>,
}

/// One page of an account's booked history, newest first, and the key of the next page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionPage {
    pub booked: Vec<BookedTransaction>,
    pub next_page_key: Option<String>,
}

#[derive(Deserialize)]
struct TransactionsAnswer {
    transactions: TransactionsBody,
}

#[derive(Deserialize)]
struct TransactionsBody {
    #[serde(default)]
    booked: Vec<BookedTransaction>,
    #[serde(default)]
    next_page_key: Option<serde_json::Value>,
}

fn decimal_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(d)?;
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(text)) => Ok(Some(text)),
        Some(serde_json::Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(serde::de::Error::custom(format!(
            "expected a decimal, got {other}"
        ))),
    }
}

fn decimal_text_required<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    decimal_text(d)?.ok_or_else(|| serde::de::Error::custom("amount missing"))
}

/// Which transactions to read.
#[derive(Debug, Clone, Copy, Default)]
pub struct TransactionQuery<'a> {
    /// The previous page's `next_page_key`.
    pub next: Option<&'a str>,
    pub page_size: Option<u32>,
    pub date_from: Option<chrono::NaiveDate>,
    /// `false` for a call the PSU is not present for: the bank allows four such calls per
    /// account and day [C Yolt].
    pub psu_involved: bool,
}

impl BelfiusClient {
    /// `GET {base}/accounts` [P] under the PSU's AIS token: the accounts the consent covers.
    pub async fn accounts(
        &self,
        brand: Brand,
        access_token: &SecretString,
    ) -> Result<Vec<AccountInfo>, BankError> {
        let url = self.endpoint(brand, &["accounts"])?;
        let response = self
            .send(Call::Accounts, brand, self.ais_get(url, access_token))
            .await?;
        let list: AccountList = response.json()?;
        Ok(list.accounts)
    }

    /// `GET {base}/accounts/{logical-id}/transactions` [P, C]: one page of booked
    /// transactions, newest first.
    pub async fn transactions(
        &self,
        brand: Brand,
        access_token: &SecretString,
        logical_id: &str,
        query: TransactionQuery<'_>,
    ) -> Result<TransactionPage, BankError> {
        let mut url = self.endpoint(brand, &["accounts", logical_id, "transactions"])?;
        {
            let mut pairs = url.query_pairs_mut();
            if let Some(next) = query.next {
                pairs.append_pair("next", next);
            }
            if let Some(size) = query.page_size {
                pairs.append_pair("pagesize", &size.to_string());
            }
            if let Some(from) = query.date_from {
                pairs.append_pair("date_from", &from.format("%Y-%m-%d").to_string());
            }
            if !query.psu_involved {
                pairs.append_pair("psu_involved", "false");
            }
        }
        let response = self
            .send(Call::Transactions, brand, self.ais_get(url, access_token))
            .await?;
        let answer: TransactionsAnswer = response.json()?;
        let next_page_key = match answer.transactions.next_page_key {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(key)) if key.is_empty() => None,
            Some(serde_json::Value::String(key)) => Some(key),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            Some(other) => {
                return Err(BankError::Protocol(format!(
                    "next_page_key is neither text nor a number: {other}"
                )));
            }
        };
        Ok(TransactionPage {
            booked: answer.transactions.booked,
            next_page_key,
        })
    }

    /// An AIS read under the PSU's AIS token.
    fn ais_get(&self, url: url::Url, access_token: &SecretString) -> reqwest::RequestBuilder {
        self.request(
            Method::GET,
            url,
            &self.config.versions.accounts,
            Language::Fr,
        )
        .header(headers::CLIENT_ID, &self.config.client_id)
        .bearer_auth(access_token.expose_secret())
    }

    /// `GET {base}/consent-uris?scope=…` [P]: the URIs where the PSU grants the consent.
    pub async fn consent_uris(
        &self,
        consent: &ConsentRequest<'_>,
    ) -> Result<Vec<ConsentUri>, BankError> {
        let version = match consent.scope {
            ConsentScope::Ais => &self.config.versions.consent_uris_ais,
            ConsentScope::Caf => &self.config.versions.consent_uris_caf,
        };
        let mut url = self.endpoint(consent.brand, &["consent-uris"])?;
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("scope", consent.scope.as_str());
            if let Some(iban) = consent.iban {
                query.append_pair("iban", iban);
            }
        }
        let mut req = self
            .http
            .request(Method::GET, url)
            .header(header::ACCEPT, super::accept_header(version))
            .header(headers::CLIENT_ID, &self.config.client_id)
            .header(headers::REDIRECT_URI, consent.redirect_uri)
            .header(headers::CODE_CHALLENGE_METHOD, METHOD_S256)
            .header(headers::CODE_CHALLENGE, consent.code_challenge);
        if let Some(language) = consent.language {
            req = req.header(header::ACCEPT_LANGUAGE, language.as_str());
        }
        let response = self.send(Call::ConsentUris, consent.brand, req).await?;
        let uris: Vec<ConsentUri> = response.json()?;
        if uris.is_empty() {
            return Err(BankError::Protocol(
                "GET /consent-uris answered no consent URI".into(),
            ));
        }
        Ok(uris)
    }

    /// `POST {base}/funds-confirmations` [P caf/reference] under the PSU's CAF token, which
    /// covers `iban` only: whether `amount` can be paid from the account now.
    pub async fn funds_available(
        &self,
        brand: Brand,
        access_token: &SecretString,
        iban: &str,
        amount: Amount,
        currency: &str,
    ) -> Result<bool, BankError> {
        let url = self.endpoint(brand, &["funds-confirmations"])?;
        let body = serde_json::to_vec(&FundsRequest {
            account: FundsAccount { iban },
            instructed_amount: FundsAmount {
                currency,
                amount: amount.to_string(),
            },
        })
        .map_err(|e| BankError::NotSent(format!("cannot encode the funds request: {e}")))?;
        let req = self
            .request(
                Method::POST,
                url,
                &self.config.versions.funds_confirmation,
                Language::Fr,
            )
            .header(headers::CLIENT_ID, &self.config.client_id)
            .header(header::CONTENT_TYPE, "application/json")
            .bearer_auth(access_token.expose_secret())
            .body(body);
        let response = self.send(Call::FundsConfirmation, brand, req).await?;
        let answer: FundsAnswer = response.json()?;
        match answer.funds_available {
            FundsFlag::Bool(available) => Ok(available),
            FundsFlag::Text(text) if text.eq_ignore_ascii_case("true") => Ok(true),
            FundsFlag::Text(text) if text.eq_ignore_ascii_case("false") => Ok(false),
            FundsFlag::Text(text) => Err(BankError::Protocol(format!(
                "funds_available is neither true nor false: {text:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn funds_flag_reads_booleans_and_v1_strings_only() {
        let read = |body: &str| -> Option<bool> {
            let answer: FundsAnswer = serde_json::from_str(body).ok()?;
            match answer.funds_available {
                FundsFlag::Bool(b) => Some(b),
                FundsFlag::Text(t) if t.eq_ignore_ascii_case("true") => Some(true),
                FundsFlag::Text(t) if t.eq_ignore_ascii_case("false") => Some(false),
                FundsFlag::Text(_) => None,
            }
        };
        assert_eq!(read(r#"{"funds_available": true}"#), Some(true));
        assert_eq!(read(r#"{"funds_available": false}"#), Some(false));
        assert_eq!(read(r#"{"funds_available": "True"}"#), Some(true));
        assert_eq!(read(r#"{"funds_available": "maybe"}"#), None);
        assert_eq!(read(r#"{"funds_available": 1}"#), None);
        assert_eq!(read(r#"{}"#), None);
    }

    #[test]
    fn the_funds_request_carries_the_amount_as_a_decimal_string() {
        let body = serde_json::to_value(FundsRequest {
            account: FundsAccount {
                iban: "BE71096123456769",
            },
            instructed_amount: FundsAmount {
                currency: "EUR",
                amount: Amount::from_minor(1_205).to_string(),
            },
        })
        .unwrap_or_default();
        assert_eq!(
            body,
            serde_json::json!({"account": {"iban": "BE71096123456769"},
                               "instructed_amount": {"currency": "EUR", "amount": "12.05"}})
        );
    }
}
