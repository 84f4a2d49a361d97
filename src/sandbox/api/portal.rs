//! The rest of the portal a payment worker uses, bank side: `GET /consent-uris` (the SCA
//! redirect of an AIS or CAF consent) and `POST /funds-confirmations` (CAF). What is known of
//! them, and what is guessed, is in docs/belfius-facts.md §3.1 and §13; the simulator is as
//! strict as for PIS (registered Client-ID certificate and redirect URIs, one version per
//! endpoint, tokens bound to their brand host and scope).

use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ApiError, ApiState, bearer, check_accept, check_client_id, check_content_type,
    check_debtor_account, check_request_id, iban_valid, language, parse_amount, pkce_challenge,
    required_header,
};
use crate::belfius::client::headers as h;
use crate::domain::model::Language;
use crate::sandbox::ledger::decimal;
use crate::sandbox::store::{NewConsent, Scope, TokenCheck};

/// [P] AIS consents: "only version 4 of GET /consent-uris … should be used" (no IBAN).
pub const CONSENT_URIS_AIS_VERSIONS: &[&str] = &["4"];
/// [I] A CAF consent is for one IBAN, which version 4 no longer takes: the last version with
/// an `iban` parameter, 3, is assumed (docs/belfius-facts.md §13).
pub const CONSENT_URIS_CAF_VERSIONS: &[&str] = &["3"];
/// [P caf/reference] `POST /funds-confirmations` version 1.
pub const FUNDS_CONFIRMATION_VERSIONS: &[&str] = &["1"];
/// [P] the accounts reference is at version 3 (Tink and Yolt sent 2).
pub const ACCOUNTS_VERSIONS: &[&str] = &["3"];
/// [I] a page of transactions when `pagesize` is not given, and the most one page holds.
pub const DEFAULT_PAGE_SIZE: usize = 50;
pub const MAX_PAGE_SIZE: usize = 200;

/// [I] The bank's logical id of an account is long and opaque (a JWE in the portal's example,
/// a UUID in Tink's traffic): here a name-based UUID of the IBAN, stable across restarts.
pub fn logical_id(iban: &str) -> String {
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_URL,
        format!("belfius-sandbox:{iban}").as_bytes(),
    )
    .to_string()
}

#[derive(Debug, Deserialize)]
pub(super) struct ConsentQuery {
    scope: Option<String>,
    iban: Option<String>,
}

/// `GET /consent-uris?scope=AIS|CAF[&iban=…]`: records a pending consent and answers its
/// consent URI, as a JSON array of `{language, consent_uri}` [P]: the requested language's
/// entry only when `Accept-Language` names fr or nl, both without the header, 406 for any
/// other language (the AIS and CAF references; docs/belfius-facts.md §13 notes the
/// contradiction with the consent reference).
pub(super) async fn consent_uris(
    State(state): State<ApiState>,
    Query(query): Query<ConsentQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let shared = &state.shared;
    check_request_id(&headers)?;
    let scope_text = query
        .scope
        .as_deref()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::missing_field("scope"))?;
    let scope = Scope::of_consent(scope_text)
        .ok_or_else(|| ApiError::invalid_field("scope", "must be AIS or CAF"))?;
    let versions = match scope {
        Scope::Ais => CONSENT_URIS_AIS_VERSIONS,
        Scope::Caf => CONSENT_URIS_CAF_VERSIONS,
        // `of_consent` gives no PIS.
        Scope::Pis => return Err(ApiError::invalid_field("scope", "must be AIS or CAF")),
    };
    check_accept(&headers, versions)?;
    check_client_id(shared, &headers)?;
    let languages: Vec<Language> = match headers.get(header::ACCEPT_LANGUAGE) {
        None => vec![Language::Fr, Language::Nl],
        Some(_) => vec![language(&headers).ok_or_else(ApiError::not_acceptable)?],
    };
    let redirect_uri = required_header(&headers, h::REDIRECT_URI)?;
    if let Some(why) = shared.onboarding.redirect_refusal(redirect_uri) {
        return Err(ApiError::invalid_header("Redirect-URI", why));
    }
    let challenge = pkce_challenge(&headers)?;
    let iban = match (scope, query.iban.filter(|i| !i.is_empty())) {
        (Scope::Ais, Some(_)) => {
            return Err(ApiError::invalid_field(
                "iban",
                "version 4 takes no IBAN: the PSU chooses the accounts",
            ));
        }
        (Scope::Ais | Scope::Pis, None) | (Scope::Pis, Some(_)) => None,
        (Scope::Caf, None) => return Err(ApiError::missing_field("iban")),
        (Scope::Caf, Some(iban)) => {
            if !iban_valid(&iban) {
                return Err(ApiError::invalid_field("iban", "not a valid IBAN"));
            }
            check_debtor_account(&shared.rules, state.brand, &iban)?;
            Some(iban)
        }
    };
    let id = shared
        .store()
        .insert_consent(
            NewConsent {
                brand: state.brand,
                scope,
                iban,
                redirect_uri: redirect_uri.to_owned(),
                challenge,
            },
            Instant::now(),
        )
        .id
        .clone();
    tracing::info!(
        consent_id = id,
        scope = scope.as_str(),
        brand = state.brand.as_str(),
        "sandbox: consent requested"
    );
    let answer: Vec<Value> = languages
        .into_iter()
        .map(|lang| {
            let uri = shared
                .admin_base
                .join(&format!("consent/{id}?lang={}", lang.as_str()))
                .map(|u| u.to_string())
                .unwrap_or_default();
            json!({"language": lang.as_str(), "consent_uri": uri})
        })
        .collect();
    Ok((StatusCode::OK, Json(answer)).into_response())
}

/// `POST /funds-confirmations` [P caf/reference]: `{"account": {"iban"}, "instructed_amount":
/// {"currency", "amount"}}` with the amount a decimal string, under a CAF token limited to
/// that IBAN; answers `{"funds_available": bool}` from the ledger's balance.
pub(super) async fn funds_confirmation(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let shared = &state.shared;
    shared.store().counters.funds_confirmation_requests += 1;
    check_request_id(&headers)?;
    check_accept(&headers, FUNDS_CONFIRMATION_VERSIONS)?;
    check_client_id(shared, &headers)?;
    check_content_type(&headers, "application/json")?;
    let token = bearer(&headers)?
        .filter(|t| !t.is_empty())
        .ok_or_else(ApiError::invalid_token)?;
    let covered =
        match shared
            .store()
            .check_access_token(token, state.brand, Scope::Caf, Instant::now())
        {
            TokenCheck::Valid { accounts, .. } => accounts,
            TokenCheck::Invalidated | TokenCheck::Expired | TokenCheck::Unknown => {
                return Err(ApiError::invalid_token());
            }
        };
    let value: Value = serde_json::from_slice(&body)
        .map_err(|_| ApiError::invalid_field("body", "not valid JSON"))?;
    let iban = value
        .pointer("/account/iban")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::missing_field("account.iban"))?;
    let currency = value
        .pointer("/instructed_amount/currency")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::missing_field("instructed_amount.currency"))?;
    let amount = match value.pointer("/instructed_amount/amount") {
        None => return Err(ApiError::missing_field("instructed_amount.amount")),
        Some(Value::String(text)) => parse_amount(text)?,
        // [P] "decimal separator is a dot": a string, as for PIS v3.
        Some(_) => {
            return Err(ApiError::invalid_field(
                "instructed_amount.amount",
                "must be a decimal string",
            ));
        }
    };
    if currency != "EUR" {
        return Err(ApiError::invalid_field(
            "instructed_amount.currency",
            "the account is in EUR",
        ));
    }
    // [I] The token is "limited to a given type and given IBAN" [P]: another account is
    // refused like a token that does not cover it.
    if !covered.iter().any(|a| a == iban) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "FAILED_SECURITY_VALIDATION",
            "GEN-1203-100003",
            "the access token does not cover this account",
        ));
    }
    let mut store = shared.store();
    store.advance_account(iban, Instant::now());
    let available = store.ledger.funds_available(iban, amount);
    store.counters.funds_confirmations += 1;
    let answers = store
        .counters
        .funds_answers
        .entry(format!("{iban}/{}", amount.minor()))
        .or_default();
    if available {
        answers.available += 1;
    } else {
        answers.unavailable += 1;
    }
    Ok((StatusCode::OK, Json(json!({"funds_available": available}))).into_response())
}

/// The PSU's AIS token on this host: the accounts it covers.
fn ais_accounts(state: &ApiState, headers: &HeaderMap) -> Result<Vec<String>, ApiError> {
    check_request_id(headers)?;
    check_accept(headers, ACCOUNTS_VERSIONS)?;
    check_client_id(&state.shared, headers)?;
    if headers.contains_key(header::ACCEPT_LANGUAGE) && language(headers).is_none() {
        return Err(ApiError::not_acceptable());
    }
    let token = bearer(headers)?
        .filter(|t| !t.is_empty())
        .ok_or_else(ApiError::invalid_token)?;
    match state
        .shared
        .store()
        .check_access_token(token, state.brand, Scope::Ais, Instant::now())
    {
        TokenCheck::Valid { accounts, .. } => Ok(accounts),
        TokenCheck::Invalidated | TokenCheck::Expired | TokenCheck::Unknown => {
            Err(ApiError::invalid_token())
        }
    }
}

fn account_json(store: &crate::sandbox::store::Store, iban: &str) -> Value {
    let id = logical_id(iban);
    json!({
        "logical_id": id,
        "iban": iban,
        "currency": "EUR",
        "balance": decimal(store.ledger.balance(iban)),
        "account_name": "Current account",
        "product_type": "CURRENT_ACCOUNT",
        "product_name": "Belfius Pack",
        "multicurrency": false,
        "_links": {"transactions": {"href": format!("/accounts/{id}/transactions")}},
    })
}

/// `GET /accounts` [P]: the accounts the AIS consent covers. [I] The list's wrapper key
/// (`accounts`) is not documented.
pub(super) async fn accounts(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let covered = ais_accounts(&state, &headers)?;
    let mut store = state.shared.store();
    for iban in &covered {
        store.advance_account(iban, Instant::now());
    }
    let list: Vec<Value> = covered
        .iter()
        .map(|iban| account_json(&store, iban))
        .collect();
    Ok((StatusCode::OK, Json(json!({"accounts": list}))).into_response())
}

/// The covered account a logical id names; an id the token does not cover is 404 [I].
fn covered_account(covered: &[String], id: &str) -> Result<String, ApiError> {
    covered
        .iter()
        .find(|iban| logical_id(iban) == id)
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "GEN-1202-100002",
                "no such account under this consent",
            )
        })
}

/// `GET /accounts/{logical-id}` [P].
pub(super) async fn account(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let covered = ais_accounts(&state, &headers)?;
    let iban = covered_account(&covered, &id)?;
    let mut store = state.shared.store();
    store.advance_account(&iban, Instant::now());
    Ok((StatusCode::OK, Json(account_json(&store, &iban))).into_response())
}

#[derive(Debug, Deserialize)]
pub(super) struct TransactionsQuery {
    date_from: Option<String>,
    date_to: Option<String>,
    next: Option<String>,
    pagesize: Option<String>,
    /// [C Yolt] `false` for a call the PSU is not present for: at most
    /// `UNATTENDED_PER_DAY` per account and day. Query parameter [I] (header or query is not
    /// known).
    psu_involved: Option<String>,
}

/// `GET /accounts/{logical-id}/transactions` [P, C]: booked transactions newest first, paged
/// with `next_page_key`.
pub(super) async fn transactions(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(query): Query<TransactionsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let covered = ais_accounts(&state, &headers)?;
    let iban = covered_account(&covered, &id)?;
    let date = |name: &str, text: Option<&str>| -> Result<Option<chrono::NaiveDate>, ApiError> {
        text.filter(|t| !t.is_empty())
            .map(|t| {
                chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d")
                    .map_err(|_| ApiError::invalid_field(name, "expected YYYY-MM-DD"))
            })
            .transpose()
    };
    let from = date("date_from", query.date_from.as_deref())?;
    let to = date("date_to", query.date_to.as_deref())?;
    let size = match query.pagesize.as_deref().filter(|p| !p.is_empty()) {
        None => DEFAULT_PAGE_SIZE,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE_SIZE).contains(n))
            .ok_or_else(|| ApiError::invalid_field("pagesize", &format!("1 to {MAX_PAGE_SIZE}")))?,
    };
    let before = query
        .next
        .as_deref()
        .filter(|n| !n.is_empty())
        .map(|n| {
            n.parse::<u64>()
                .map_err(|_| ApiError::invalid_field("next", "not a page key of this account"))
        })
        .transpose()?;
    let unattended = match query.psu_involved.as_deref() {
        None | Some("true") => false,
        Some("false") => true,
        Some(_) => return Err(ApiError::invalid_field("psu_involved", "true or false")),
    };
    let mut store = state.shared.store();
    if unattended && let Err(wait) = store.count_unattended(&iban, Instant::now()) {
        *store
            .counters
            .unattended_refused
            .entry(iban.clone())
            .or_default() += 1;
        let mut error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "ACCESS_EXCEEDED",
            "",
            format!(
                "{} unattended calls per account and 24 hours",
                crate::sandbox::store::UNATTENDED_PER_DAY
            ),
        );
        error.retry_after = Some(wait.as_secs().max(1));
        return Err(error);
    }
    if unattended {
        *store
            .counters
            .unattended_reads
            .entry(iban.clone())
            .or_default() += 1;
    }
    store.advance_account(&iban, Instant::now());
    let (page, next) = store.ledger.page(&iban, before, size, from, to);
    let booked: Vec<Value> = page
        .iter()
        .map(|b| {
            json!({
                "transaction_ref": b.reference.to_string(),
                "transaction_seqnumber": b.reference,
                "counterparty_info": b.counterparty_name,
                "counterparty_account": b.counterparty_account,
                "communication": b.remittance.clone().unwrap_or_default(),
                "communication_type": "FREETEXT",
                "remittance_info": b.remittance,
                // [I] not seen in public traffic; the client reads it when present.
                "end_to_end_id": b.end_to_end_id,
                "amount": decimal(b.amount_minor),
                "currency": b.currency,
                "execution_date": b.execution_date.format("%Y-%m-%d").to_string(),
                "value_date": b.execution_date.format("%Y-%m-%d").to_string(),
            })
        })
        .collect();
    let mut links = serde_json::Map::new();
    if let Some(next) = next {
        links.insert(
            "next".into(),
            json!({"href": format!("/accounts/{id}/transactions?next={next}&pagesize={size}")}),
        );
    }
    Ok((
        StatusCode::OK,
        Json(json!({
            "transactions": {"booked": booked, "next_page_key": next.map(|n| n.to_string())},
            "_links": links,
        })),
    )
        .into_response())
}
