//! Operator and PSU side of consents and accounts: list consents, grant or refuse one as a
//! PSU (operator API, or the consent page a browser opens from the consent URI), and read or
//! set an account's balance and bookings (the ledger CAF and AIS answer from).

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use secrecy::ExposeSecret as _;
use serde::Deserialize;
use serde_json::json;

use super::{error, escape, state_input};
use crate::domain::model::Amount;
use crate::sandbox::Shared;
use crate::sandbox::store::{
    ConsentAction, ConsentError, ConsentOutcome, DEFAULT_PSU, InvalidState, ScaState,
};

pub(super) async fn list(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.store().consents(Instant::now())).into_response()
}

/// `?psu=<id>&state=<opaque>` (operator) or the same as a form (browser).
#[derive(Debug, Default, Deserialize)]
pub(super) struct ConsentQuery {
    psu: Option<String>,
    state: Option<String>,
    /// The page's language (from the consent URI); shown only.
    lang: Option<String>,
    /// AIS: the accounts granted, comma-separated IBANs (default: every account the PSU
    /// holds).
    accounts: Option<String>,
}

fn action(name: &str, query: ConsentQuery) -> Result<ConsentAction, Refusal> {
    let state = query
        .state
        .as_deref()
        .map(ScaState::parse)
        .transpose()
        .map_err(Refusal::State)?;
    match name {
        "grant" => Ok(ConsentAction::Grant {
            psu: query.psu.unwrap_or_else(|| DEFAULT_PSU.into()),
            state,
            accounts: query
                .accounts
                .as_deref()
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect(),
        }),
        "refuse" => Ok(ConsentAction::Refuse { state }),
        other => Err(Refusal::NoAction(other.to_owned())),
    }
}

enum Refusal {
    NoAction(String),
    State(InvalidState),
}

impl Refusal {
    fn response(self) -> Response {
        match self {
            Refusal::NoAction(name) => error(StatusCode::NOT_FOUND, format!("no action {name:?}")),
            Refusal::State(e) => error(StatusCode::BAD_REQUEST, e.to_string()),
        }
    }
}

fn consent_error(e: &ConsentError) -> Response {
    match e {
        ConsentError::NotFound => error(StatusCode::NOT_FOUND, e.to_string()),
        ConsentError::Conflict(_) => error(StatusCode::CONFLICT, e.to_string()),
    }
}

/// `POST /admin/consents/{id}/{grant|refuse}`: the operator acts as the PSU; the answer holds
/// the redirect URL (with the code of a grant), as `/admin/payments/{id}/sign` does.
pub(super) async fn act(
    State(shared): State<Arc<Shared>>,
    Path((id, name)): Path<(String, String)>,
    Query(query): Query<ConsentQuery>,
) -> Response {
    let action = match action(&name, query) {
        Ok(action) => action,
        Err(refusal) => return refusal.response(),
    };
    match shared.store().act_on_consent(&id, action, Instant::now()) {
        Ok(ConsentOutcome {
            consent_id,
            status,
            redirect_url,
        }) => Json(json!({
            "consent_id": consent_id,
            "status": status,
            "redirect_url": redirect_url.expose_secret(),
        }))
        .into_response(),
        Err(e) => consent_error(&e),
    }
}

/// The consent page a consent URI opens: what is asked, and two buttons.
pub(super) async fn page(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(query): Query<ConsentQuery>,
) -> Response {
    let state = match query.state.as_deref().map(ScaState::parse).transpose() {
        Ok(state) => state,
        Err(e) => return (StatusCode::BAD_REQUEST, Html(format!("<p>{e}</p>"))).into_response(),
    };
    let state_input = state_input(state.as_ref());
    let mut store = shared.store();
    let Some(consent) = store.consent(&id, Instant::now()) else {
        return (
            StatusCode::NOT_FOUND,
            Html("<p>Unknown consent.</p>".to_owned()),
        )
            .into_response();
    };
    let id = escape(&consent.id);
    let page = format!(
        "<!doctype html><html lang=\"{lang}\"><head><meta charset=\"utf-8\"><title>Belfius sandbox: consent</title></head>\
         <body><h1>Belfius sandbox (simulated PSU login)</h1>\
         <p>{scope} consent on {brand}{account}, status <b>{status}</b></p>\
         <form method=\"post\" action=\"/consent/{id}/grant\">{state_input}\
         <label>PSU <input name=\"psu\" value=\"{psu}\"></label> <button>Grant</button></form>\
         <form method=\"post\" action=\"/consent/{id}/refuse\">{state_input}<button>Refuse</button></form>\
         </body></html>",
        lang = escape(query.lang.as_deref().unwrap_or("fr")),
        scope = consent.scope.as_str(),
        brand = consent.brand.as_str(),
        account = consent
            .iban
            .as_deref()
            .map(|iban| format!(" for account {}", escape(iban)))
            .unwrap_or_default(),
        status = consent.status.as_str(),
        psu = escape(DEFAULT_PSU),
    );
    Html(page).into_response()
}

/// The page's buttons: the browser goes back to the TPP with 303.
pub(super) async fn page_act(
    State(shared): State<Arc<Shared>>,
    Path((id, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Ok(query) = serde_urlencoded::from_bytes::<ConsentQuery>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            Html("<p>Malformed form.</p>".to_owned()),
        )
            .into_response();
    };
    let action = match action(&name, query) {
        Ok(action) => action,
        Err(refusal) => return refusal.response(),
    };
    let result = shared.store().act_on_consent(&id, action, Instant::now());
    match result {
        Ok(outcome) => Redirect::to(outcome.redirect_url.expose_secret()).into_response(),
        Err(e) => {
            let status = match e {
                ConsentError::NotFound => StatusCode::NOT_FOUND,
                ConsentError::Conflict(_) => StatusCode::CONFLICT,
            };
            (status, Html(format!("<p>{e}</p>"))).into_response()
        }
    }
}

/// `GET /admin/accounts/{iban}`: balance and bookings, oldest first.
pub(super) async fn account(
    State(shared): State<Arc<Shared>>,
    Path(iban): Path<String>,
) -> Response {
    let store = shared.store();
    let bookings: Vec<_> = store.ledger.bookings(&iban).collect();
    Json(json!({
        "iban": iban,
        "balance": crate::sandbox::ledger::decimal(store.ledger.balance(&iban)),
        "balance_minor": store.ledger.balance(&iban),
        "psu": store.ledger.owner(&iban),
        "bookings": bookings,
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BalancePatch {
    /// `12.34`, or `-12.34` for an overdrawn account.
    balance: String,
    /// The PSU who holds the account (AIS consents list it).
    psu: Option<String>,
}

/// `POST /admin/accounts/{iban}/balance` with `{"balance": "12.34"}`.
pub(super) async fn set_balance(
    State(shared): State<Arc<Shared>>,
    Path(iban): Path<String>,
    body: Bytes,
) -> Response {
    let Ok(patch) = serde_json::from_slice::<BalancePatch>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected {\"balance\": \"12.34\"}".into(),
        );
    };
    let (negative, digits) = match patch.balance.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, patch.balance.as_str()),
    };
    let Ok(amount) = Amount::parse(digits) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("balance {:?} is not a decimal amount", patch.balance),
        );
    };
    let minor = if negative {
        -amount.minor()
    } else {
        amount.minor()
    };
    let mut store = shared.store();
    store.ledger.set_balance(&iban, minor);
    if let Some(psu) = patch.psu.as_deref().filter(|p| !p.is_empty()) {
        store.ledger.set_owner(&iban, psu);
    }
    drop(store);
    tracing::info!(iban, minor, "sandbox: balance set");
    Json(json!({"iban": iban, "balance_minor": minor})).into_response()
}
