//! Operator API and the PSU's side of the simulator (plain HTTP, meant for loopback):
//! inspect payments, sign/reject as the PSU, read counters, reset; plus a tiny SCA page.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::Shared;
use super::store::{PsuError, PsuOutcome};

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/admin/payments", get(list))
        .route("/admin/payments/{id}", get(show))
        .route("/admin/payments/{id}/sign", post(sign_by_id))
        .route("/admin/payments/{id}/reject", post(reject_by_id))
        .route("/admin/e2e/{e2e}/sign", post(sign_by_e2e))
        .route("/admin/e2e/{e2e}/reject", post(reject_by_e2e))
        .route("/admin/counters", get(counters))
        .route("/admin/reset", post(reset))
        .route("/sca/{id}", get(sca_page))
        .route("/sca/{id}/sign", post(sca_sign))
        .route("/sca/{id}/reject", post(sca_reject))
        .with_state(shared)
}

fn error(status: StatusCode, description: String) -> Response {
    (
        status,
        Json(json!({"error": status.canonical_reason().unwrap_or("error"), "error_description": description})),
    )
        .into_response()
}

fn psu_response(result: Result<PsuOutcome, PsuError>) -> Response {
    match result {
        Ok(outcome) => Json(outcome).into_response(),
        Err(e @ PsuError::NotFound) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ PsuError::Conflict(_)) => error(StatusCode::CONFLICT, e.to_string()),
    }
}

async fn list(State(shared): State<Arc<Shared>>) -> Response {
    let mut store = shared.store();
    let views: Vec<_> = store
        .payments(Instant::now())
        .into_iter()
        .map(|p| p.view())
        .collect();
    Json(views).into_response()
}

async fn show(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match shared.store().payment(&id, Instant::now()) {
        Some(p) => Json(p.view()).into_response(),
        None => error(StatusCode::NOT_FOUND, "no such payment".into()),
    }
}

#[derive(Clone, Copy)]
enum Action {
    Sign,
    Reject,
}

fn act_on_id(shared: &Shared, id: &str, action: Action) -> Result<PsuOutcome, PsuError> {
    let mut store = shared.store();
    let now = Instant::now();
    let result = match action {
        Action::Sign => store.sign(id, now),
        Action::Reject => store.reject(id, now),
    };
    if let Ok(outcome) = &result {
        tracing::info!(
            payment_id = outcome.payment_id,
            status = outcome.status,
            "sandbox: PSU acted"
        );
    }
    result
}

fn act_on_e2e(shared: &Shared, e2e: &str, action: Action) -> Result<PsuOutcome, PsuError> {
    let id = shared
        .store()
        .latest_by_e2e(e2e)
        .ok_or(PsuError::NotFound)?;
    act_on_id(shared, &id, action)
}

async fn sign_by_id(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    psu_response(act_on_id(&shared, &id, Action::Sign))
}

async fn reject_by_id(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    psu_response(act_on_id(&shared, &id, Action::Reject))
}

async fn sign_by_e2e(State(shared): State<Arc<Shared>>, Path(e2e): Path<String>) -> Response {
    psu_response(act_on_e2e(&shared, &e2e, Action::Sign))
}

async fn reject_by_e2e(State(shared): State<Arc<Shared>>, Path(e2e): Path<String>) -> Response {
    psu_response(act_on_e2e(&shared, &e2e, Action::Reject))
}

async fn counters(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.store().counters.clone()).into_response()
}

async fn reset(State(shared): State<Arc<Shared>>) -> Response {
    shared.store().reset();
    tracing::info!("sandbox: state reset");
    StatusCode::NO_CONTENT.into_response()
}

// ---------------------------------------------------------------------------------------------
// The PSU's browser: a login/sign page standing in for Belfius' launcher.html.

async fn sca_page(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let mut store = shared.store();
    let Some(p) = store.payment(&id, Instant::now()) else {
        return (
            StatusCode::NOT_FOUND,
            Html("<p>Unknown payment.</p>".to_owned()),
        )
            .into_response();
    };
    let id = escape(&p.id);
    let page = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Belfius sandbox: sign payment</title></head>\
         <body><h1>Belfius sandbox (simulated PSU login)</h1>\
         <p>Pay <b>{amount} {currency}</b> to <b>{creditor}</b> ({iban})<br>\
         end-to-end id {e2e}, status <b>{status}</b></p>\
         <form method=\"post\" action=\"/sca/{id}/sign\"><button>Sign</button></form>\
         <form method=\"post\" action=\"/sca/{id}/reject\"><button>Refuse</button></form>\
         </body></html>",
        amount = p.amount,
        currency = escape(&p.currency),
        creditor = escape(&p.creditor_name),
        iban = escape(&p.creditor_iban),
        e2e = escape(&p.e2e),
        status = p.status.as_str(),
    );
    Html(page).into_response()
}

async fn sca_sign(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    browser_response(act_on_id(&shared, &id, Action::Sign))
}

async fn sca_reject(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    browser_response(act_on_id(&shared, &id, Action::Reject))
}

/// A browser is sent back to the TPP with 303, as Belfius' screens redirect to the Redirect-URI.
fn browser_response(result: Result<PsuOutcome, PsuError>) -> Response {
    match result {
        Ok(PsuOutcome {
            redirect_url: Some(url),
            ..
        }) => Redirect::to(&url).into_response(),
        Ok(PsuOutcome { status, .. }) => {
            Html(format!("<p>Done: payment is {status}.</p>")).into_response()
        }
        Err(e @ PsuError::NotFound) => {
            (StatusCode::NOT_FOUND, Html(format!("<p>{e}</p>"))).into_response()
        }
        Err(e @ PsuError::Conflict(_)) => {
            (StatusCode::CONFLICT, Html(format!("<p>{e}</p>"))).into_response()
        }
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            other => out.push(other),
        }
    }
    out
}
