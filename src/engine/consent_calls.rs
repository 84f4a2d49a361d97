//! Runs the consent calls of the owner's core (consent URI, code exchange, refresh, funds
//! confirmation) and classifies their results for it.

use super::bank::classify_refresh_error;
use super::core::{BankAnswer, CallFailure, ConsentAnswer, ConsentCall, ExpectedBooking};
use crate::belfius::client::portal::{self, ConsentRequest};
use crate::belfius::{BankError, BelfiusClient, pkce};
use crate::domain::consent::ConsentScope;
use crate::domain::settlement::{self, SettlementEvidence};
use secrecy::ExposeSecret as _;

/// A refusal is definite: asking again gets the same answer. Anything else may pass later.
fn failure(error: &BankError) -> CallFailure {
    let definite = match error {
        BankError::Refused { .. } | BankError::Unrecognized(_) => true,
        BankError::NotSent(_)
        | BankError::NoResponse(_)
        | BankError::RateLimited { .. }
        | BankError::Unavailable { .. }
        | BankError::Protocol(_) => false,
    };
    CallFailure {
        definite,
        message: error.to_string(),
    }
}

/// The URI the PSU opens: the bank's URI for the consent's language (else the first one),
/// with the OAuth `state` the redirect must bring back (the TPP adds it: the bank's answer has
/// none).
pub fn consent_uri_with_state(
    uris: &[portal::ConsentUri],
    language: &str,
    state: &str,
) -> Result<String, String> {
    let chosen = uris
        .iter()
        .find(|u| u.language.eq_ignore_ascii_case(language))
        .or_else(|| uris.first())
        .ok_or_else(|| "the bank answered no consent URI".to_owned())?;
    let mut url = url::Url::parse(&chosen.consent_uri)
        .map_err(|e| format!("the bank's consent URI is not a URL: {e}"))?;
    url.query_pairs_mut().append_pair("state", state);
    Ok(url.into())
}

/// Bookings read for one settlement check: the payment settled moments ago, and the bank
/// gives the newest first, so one page of this size holds it; each page is one of the
/// account's few unattended reads a day.
pub const EVIDENCE_PAGE_SIZE: u32 = 100;

/// Reads the debtor account's newest bookings (unattended) and matches the payment in them.
async fn evidence(
    bank: &BelfiusClient,
    brand: crate::domain::model::Brand,
    access_token: &secrecy::SecretString,
    iban: &str,
    expected: &ExpectedBooking,
) -> Result<SettlementEvidence, CallFailure> {
    let accounts = bank
        .accounts(brand, access_token)
        .await
        .map_err(|e| failure(&e))?;
    let normal = |s: &str| s.replace(' ', "").to_ascii_uppercase();
    let Some(account) = accounts.iter().find(|a| normal(&a.iban) == normal(iban)) else {
        return Err(CallFailure {
            definite: true,
            message: "the AIS consent does not cover the debtor account".into(),
        });
    };
    let page = bank
        .transactions(
            brand,
            access_token,
            &account.logical_id,
            portal::TransactionQuery {
                next: None,
                page_size: Some(EVIDENCE_PAGE_SIZE),
                date_from: expected.date_from,
                psu_involved: false,
            },
        )
        .await
        .map_err(|e| failure(&e))?;
    Ok(match_bookings(
        expected,
        &page.booked,
        crate::engine::now_millis(),
    ))
}

/// What the bookings say about the payment, as the status event carries it.
pub fn match_bookings(
    expected: &ExpectedBooking,
    booked: &[portal::BookedTransaction],
    checked_at: crate::domain::machine::Millis,
) -> SettlementEvidence {
    let bookings: Vec<settlement::Booked<'_>> = booked
        .iter()
        .map(|b| settlement::Booked {
            reference: b.transaction_ref.as_deref(),
            amount: &b.amount,
            currency: b.currency.as_deref(),
            counterparty_account: b.counterparty_account.as_deref(),
            communication: b.communication.as_deref(),
            remittance: b.remittance_info.as_deref(),
            end_to_end_id: b.end_to_end_id.as_deref(),
        })
        .collect();
    let found = settlement::find(
        &settlement::Expected {
            amount: expected.amount,
            currency: &expected.currency,
            creditor_account: &expected.creditor_account,
            end_to_end_id: &expected.end_to_end_id,
            remittance: expected.remittance.as_deref(),
        },
        &bookings,
    );
    let refs: Vec<String> = match &found {
        settlement::Evidence::Booked { reference, .. } => reference.iter().cloned().collect(),
        settlement::Evidence::Duplicated { references, .. } => {
            references.iter().flatten().cloned().collect()
        }
        settlement::Evidence::NotBooked | settlement::Evidence::Ambiguous { .. } => Vec::new(),
    };
    let booking_date = booked
        .iter()
        .filter(|b| b.transaction_ref.as_ref().is_some_and(|r| refs.contains(r)))
        .filter_map(|b| b.execution_date.as_deref())
        .filter_map(|d| {
            chrono::NaiveDate::parse_from_str(d.get(..10).unwrap_or(d), "%Y-%m-%d").ok()
        })
        .min();
    SettlementEvidence {
        outcome: found.outcome(),
        transaction_refs: refs,
        booking_date,
        checked_at,
    }
}

pub async fn run(bank: &BelfiusClient, call: ConsentCall) -> BankAnswer {
    let answer = match call {
        ConsentCall::Uri {
            request,
            verifier,
            sca_state,
        } => {
            let challenge = pkce::challenge_for(verifier.expose_secret());
            let scope = match request.scope {
                ConsentScope::Ais => portal::ConsentScope::Ais,
                ConsentScope::Caf => portal::ConsentScope::Caf,
            };
            let asked = ConsentRequest {
                brand: request.brand,
                scope,
                iban: request.account_iban.as_deref(),
                language: Some(request.language),
                redirect_uri: &request.redirect_uri,
                code_challenge: &challenge,
            };
            ConsentAnswer::Uri(match bank.consent_uris(&asked).await {
                Ok(uris) => consent_uri_with_state(&uris, request.language.as_str(), &sca_state)
                    .map_err(|message| CallFailure {
                        definite: true,
                        message,
                    }),
                Err(e) => Err(failure(&e)),
            })
        }
        ConsentCall::Exchange {
            brand,
            code,
            verifier,
            redirect_uri,
        } => ConsentAnswer::Tokens(
            bank.exchange_code(brand, &code, &verifier, &redirect_uri)
                .await
                .map_err(|e| failure(&e)),
        ),
        ConsentCall::Refresh {
            brand,
            refresh_token,
        } => ConsentAnswer::Refreshed(
            bank.refresh_token(brand, &refresh_token)
                .await
                .map_err(|e| classify_refresh_error(&e)),
        ),
        ConsentCall::Funds {
            brand,
            access_token,
            iban,
            amount,
            currency,
        } => ConsentAnswer::Funds(
            bank.funds_available(brand, &access_token, &iban, amount, &currency)
                .await
                .map_err(|e| failure(&e)),
        ),
        ConsentCall::Evidence {
            brand,
            access_token,
            iban,
            expected,
        } => ConsentAnswer::Evidence(evidence(bank, brand, &access_token, &iban, &expected).await),
    };
    BankAnswer::Consent(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(language: &str, consent_uri: &str) -> portal::ConsentUri {
        portal::ConsentUri {
            language: language.into(),
            consent_uri: consent_uri.into(),
        }
    }

    #[test]
    fn the_uri_of_the_language_gets_the_state() {
        let uris = [
            uri("fr", "https://bank.example/c?lang=fr"),
            uri("nl", "https://bank.example/c?lang=nl"),
        ];
        assert_eq!(
            consent_uri_with_state(&uris, "nl", "s1").as_deref(),
            Ok("https://bank.example/c?lang=nl&state=s1")
        );
        assert_eq!(
            consent_uri_with_state(&uris[..1], "nl", "s 2").as_deref(),
            Ok("https://bank.example/c?lang=fr&state=s+2"),
            "another language rather than none"
        );
        assert!(consent_uri_with_state(&[], "fr", "s").is_err());
        assert!(consent_uri_with_state(&[uri("fr", "not a url")], "fr", "s").is_err());
    }
}
