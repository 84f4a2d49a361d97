//! Operator API and the PSU's side of the simulator (plain HTTP, meant for loopback):
//! inspect payments, act as a PSU (sign, partially sign, refuse, walk away), change timings at
//! run time, read counters, reset; plus a tiny SCA page. Fault injection (`/admin/faults`) is
//! merged in by `sandbox::start`.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::Shared;
use super::store::{DEFAULT_PSU, PsuAction, PsuError, PsuOutcome, SettingsPatch};

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/admin/payments", get(list))
        .route("/admin/payments/{id}", get(show))
        .route("/admin/payments/{id}/{action}", post(act_by_id))
        .route("/admin/e2e/{e2e}/{action}", post(act_by_e2e))
        .route("/admin/counters", get(counters))
        .route("/admin/config", get(show_config).post(patch_config))
        .route("/admin/reset", post(reset))
        .route("/sca/{id}", get(sca_page))
        .route("/sca/{id}/{action}", post(sca_act))
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
        Err(e @ (PsuError::Conflict(_) | PsuError::Orphaned)) => {
            error(StatusCode::CONFLICT, e.to_string())
        }
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

/// `?psu=<id>&partial=true`: who acts, and whether the signature is one of several.
#[derive(Debug, Default, Deserialize)]
struct PsuQuery {
    psu: Option<String>,
    #[serde(default)]
    partial: bool,
}

/// What the operator (or the PSU's browser) asks for.
#[derive(Debug, Clone)]
enum Action {
    Psu(PsuAction),
    /// The PSU never signs: the payment expires after the SCA expiry.
    Abandon,
}

fn action(name: &str, query: PsuQuery) -> Option<Action> {
    let psu = query
        .psu
        .filter(|p| !p.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_PSU.to_owned());
    match name {
        "sign" => Some(Action::Psu(PsuAction::Sign {
            psu,
            partial: query.partial,
        })),
        "reject" => Some(Action::Psu(PsuAction::Reject { psu })),
        "abandon" => Some(Action::Abandon),
        _ => None,
    }
}

fn act_on_id(shared: &Shared, id: &str, action: Action) -> Result<PsuOutcome, PsuError> {
    let mut store = shared.store();
    let now = Instant::now();
    let result = match action {
        Action::Psu(action) => store.act(id, action, now),
        Action::Abandon => store.abandon(id, now),
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

async fn act_by_id(
    State(shared): State<Arc<Shared>>,
    Path((id, name)): Path<(String, String)>,
    Query(query): Query<PsuQuery>,
) -> Response {
    match action(&name, query) {
        Some(action) => psu_response(act_on_id(&shared, &id, action)),
        None => error(StatusCode::NOT_FOUND, format!("no action {name:?}")),
    }
}

async fn act_by_e2e(
    State(shared): State<Arc<Shared>>,
    Path((e2e, name)): Path<(String, String)>,
    Query(query): Query<PsuQuery>,
) -> Response {
    let Some(action) = action(&name, query) else {
        return error(StatusCode::NOT_FOUND, format!("no action {name:?}"));
    };
    let id = shared.store().latest_by_e2e(&e2e);
    match id {
        Some(id) => psu_response(act_on_id(&shared, &id, action)),
        None => psu_response(Err(PsuError::NotFound)),
    }
}

async fn counters(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.store().counters.clone()).into_response()
}

async fn show_config(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.store().settings.view()).into_response()
}

/// Changes timings and switches while the simulator runs; applies to existing payments too
/// (e.g. shorten the SCA expiry after an `abandon`).
async fn patch_config(
    State(shared): State<Arc<Shared>>,
    Json(patch): Json<SettingsPatch>,
) -> Response {
    if patch.verify_signatures == Some(true) && shared.verifier.is_none() {
        return error(
            StatusCode::CONFLICT,
            "no test QSeal certificate: signatures cannot be verified".into(),
        );
    }
    let mut store = shared.store();
    match store.settings.patched(&patch) {
        Ok(settings) => {
            store.settings = settings;
            tracing::info!(?settings, "sandbox: settings changed");
            Json(settings.view()).into_response()
        }
        Err(why) => error(StatusCode::BAD_REQUEST, why),
    }
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
         <p>{kind} on {brand}: pay <b>{amount} {currency}</b> to <b>{creditor}</b> ({iban})<br>\
         end-to-end id {e2e}, status <b>{status}</b></p>\
         <form method=\"post\" action=\"/sca/{id}/sign\">\
         <label>PSU <input name=\"psu\" value=\"{psu}\"></label> <button>Sign</button></form>\
         <form method=\"post\" action=\"/sca/{id}/reject\">\
         <input type=\"hidden\" name=\"psu\" value=\"{psu}\"><button>Refuse</button></form>\
         </body></html>",
        kind = p.kind.path_prefix(),
        brand = p.brand.as_str(),
        amount = p.amount,
        currency = escape(&p.currency),
        creditor = escape(&p.creditor_name),
        iban = escape(&p.creditor_account),
        e2e = escape(&p.e2e),
        status = p.status.as_str(),
        psu = escape(DEFAULT_PSU),
    );
    Html(page).into_response()
}

/// The page's buttons post a form (`psu=…`); a bare POST acts as the default PSU.
async fn sca_act(
    State(shared): State<Arc<Shared>>,
    Path((id, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let query = serde_urlencoded::from_bytes::<PsuQuery>(&body).unwrap_or_default();
    match action(&name, query) {
        Some(action @ Action::Psu(_)) => browser_response(act_on_id(&shared, &id, action)),
        Some(Action::Abandon) | None => (
            StatusCode::NOT_FOUND,
            Html("<p>No such action.</p>".to_owned()),
        )
            .into_response(),
    }
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
        Err(e @ (PsuError::Conflict(_) | PsuError::Orphaned)) => {
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
