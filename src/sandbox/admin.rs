//! Operator API and the PSU's side of the simulator (plain HTTP, meant for loopback):
//! inspect payments, act as a PSU (sign, partially sign, refuse, walk away; by payment id,
//! end-to-end id or the SCA URL the TPP gave), change timings and the client secret at run
//! time, read counters, reset; plus a tiny SCA page. Fault injection (`/admin/faults`) is
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
use super::store::{
    DEFAULT_PSU, InvalidState, PsuAction, PsuError, PsuOutcome, ScaState, SettingsPatch,
};

mod consents;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/admin/payments", get(list))
        .route("/admin/payments/{id}", get(show))
        .route("/admin/payments/{id}/{action}", post(act_by_id))
        // The static segment wins over `{action}` below.
        .route("/admin/e2e/{e2e}/sign-all", post(sign_all))
        .route("/admin/e2e/{e2e}/{action}", post(act_by_e2e))
        .route("/admin/sca/{action}", post(act_by_sca_url))
        .route("/admin/counters", get(counters))
        .route("/admin/config", get(show_config).post(patch_config))
        .route("/admin/reset", post(reset))
        .route("/sca/{id}", get(sca_page))
        .route("/sca/{id}/{action}", post(sca_act))
        .route("/admin/consents", get(consents::list))
        .route("/admin/consents/{id}/{action}", post(consents::act))
        .route("/consent/{id}", get(consents::page))
        .route("/consent/{id}/{action}", post(consents::page_act))
        .route("/admin/accounts/{iban}", get(consents::account))
        .route(
            "/admin/accounts/{iban}/balance",
            post(consents::set_balance),
        )
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

/// `?psu=<id>&partial=true&state=<opaque>`: who acts, whether the signature is one of
/// several, and the TPP's `state` the PSU came with (echoed on the redirect).
#[derive(Debug, Default, Deserialize)]
struct PsuQuery {
    psu: Option<String>,
    #[serde(default)]
    partial: bool,
    state: Option<String>,
}

/// `?url=<SCA URL>&psu=<id>&partial=true`: the state comes from the SCA URL, so a second
/// one here is refused rather than silently preferred.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaUrlQuery {
    url: String,
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

/// Why a PSU request is refused before it reaches the store.
#[derive(Debug, thiserror::Error)]
enum BadRequest {
    #[error("no action {0:?}")]
    NoAction(String),
    #[error(transparent)]
    State(#[from] InvalidState),
    #[error("{0}")]
    NotAnScaLink(String),
    #[error("the SCA URL carries more than one state")]
    TwoStates,
}

impl BadRequest {
    fn status(&self) -> StatusCode {
        match self {
            BadRequest::NoAction(_) | BadRequest::NotAnScaLink(_) => StatusCode::NOT_FOUND,
            BadRequest::State(_) | BadRequest::TwoStates => StatusCode::BAD_REQUEST,
        }
    }

    fn json(&self) -> Response {
        error(self.status(), self.to_string())
    }

    fn html(&self) -> Response {
        (
            self.status(),
            Html(format!("<p>{}</p>", escape(&self.to_string()))),
        )
            .into_response()
    }
}

/// The PSU (default when none or blank) and the validated state.
struct Signer {
    psu: String,
    partial: bool,
    state: Option<ScaState>,
}

fn psu_or_default(psu: Option<String>) -> String {
    psu.filter(|p| !p.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_PSU.to_owned())
}

/// The state is checked whatever the action, `abandon` included: a malformed one is the
/// caller's mistake either way.
fn signer(query: PsuQuery) -> Result<Signer, BadRequest> {
    Ok(Signer {
        psu: psu_or_default(query.psu),
        partial: query.partial,
        state: query.state.as_deref().map(ScaState::parse).transpose()?,
    })
}

fn action(name: &str, query: PsuQuery) -> Result<Action, BadRequest> {
    signer_action(name, signer(query)?)
}

fn signer_action(name: &str, signer: Signer) -> Result<Action, BadRequest> {
    let Signer {
        psu,
        partial,
        state,
    } = signer;
    match name {
        "sign" => Ok(Action::Psu(PsuAction::Sign {
            psu,
            partial,
            state,
        })),
        "reject" => Ok(Action::Psu(PsuAction::Reject { psu, state })),
        "abandon" => Ok(Action::Abandon),
        _ => Err(BadRequest::NoAction(name.to_owned())),
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
        Ok(action) => psu_response(act_on_id(&shared, &id, action)),
        Err(refusal) => refusal.json(),
    }
}

async fn act_by_e2e(
    State(shared): State<Arc<Shared>>,
    Path((e2e, name)): Path<(String, String)>,
    Query(query): Query<PsuQuery>,
) -> Response {
    let action = match action(&name, query) {
        Ok(action) => action,
        Err(refusal) => return refusal.json(),
    };
    let id = shared.store().latest_by_e2e(&e2e);
    match id {
        Some(id) => psu_response(act_on_id(&shared, &id, action)),
        None => psu_response(Err(PsuError::NotFound)),
    }
}

/// The PSU signs every payment with this end-to-end id still waiting for its first signature
/// (e.g. a retried initiation and the orphan of its lost answer, seen in a banking app).
async fn sign_all(
    State(shared): State<Arc<Shared>>,
    Path(e2e): Path<String>,
    Query(query): Query<PsuQuery>,
) -> Response {
    let signer = match signer(query) {
        Ok(signer) => signer,
        Err(refusal) => return refusal.json(),
    };
    let outcomes = shared.store().sign_all(
        &e2e,
        &signer.psu,
        signer.partial,
        signer.state.as_ref(),
        Instant::now(),
    );
    if outcomes.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            format!("no payment with end-to-end id {e2e:?} waits for its first signature"),
        );
    }
    for outcome in &outcomes {
        tracing::info!(
            payment_id = outcome.payment_id,
            status = outcome.status,
            "sandbox: PSU signed (sign-all)"
        );
    }
    Json(outcomes).into_response()
}

/// The payment id and the TPP's state of `link`, when it is one of the SCA links this
/// simulator hands out (`{admin}/sca/{id}`, any query the TPP appended).
fn sca_link(admin_base: &url::Url, link: &str) -> Result<(String, Option<ScaState>), BadRequest> {
    let expected = || {
        format!(
            "the URL is not an SCA link of this simulator (expected {admin_base}sca/{{payment id}})"
        )
    };
    let url = url::Url::parse(link)
        .map_err(|e| BadRequest::NotAnScaLink(format!("{}: {e}", expected())))?;
    if url.origin() != admin_base.origin() {
        return Err(BadRequest::NotAnScaLink(expected()));
    }
    let base: Vec<&str> = admin_base
        .path_segments()
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .collect();
    let segments: Vec<&str> = url.path_segments().into_iter().flatten().collect();
    let id = match segments.strip_prefix(base.as_slice()) {
        Some(["sca", id]) if !id.is_empty() => (*id).to_owned(),
        Some(_) | None => return Err(BadRequest::NotAnScaLink(expected())),
    };
    let mut states = url
        .query_pairs()
        .filter(|(k, _)| k == "state")
        .map(|(_, v)| v);
    let state = match (states.next(), states.next()) {
        (None, _) => None,
        (Some(state), None) => Some(ScaState::parse(&state)?),
        (Some(_), Some(_)) => return Err(BadRequest::TwoStates),
    };
    Ok((id, state))
}

/// The PSU opens exactly the SCA URL the TPP gave them: the payment comes from its path, the
/// state from its query.
async fn act_by_sca_url(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    Query(query): Query<ScaUrlQuery>,
) -> Response {
    let (id, state) = match sca_link(&shared.admin_base, &query.url) {
        Ok(link) => link,
        Err(refusal) => return refusal.json(),
    };
    let signer = Signer {
        psu: psu_or_default(query.psu),
        partial: query.partial,
        state,
    };
    match signer_action(&name, signer) {
        Ok(action) => psu_response(act_on_id(&shared, &id, action)),
        Err(refusal) => refusal.json(),
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
            // Only after the whole patch is known good: a refused patch changes nothing.
            if let Some(secret) = &patch.client_secret {
                shared.rotate_client_secret(secret);
            }
            tracing::info!(
                ?settings,
                client_secret_rotated = patch.client_secret.is_some(),
                "sandbox: settings changed"
            );
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

/// `?state=<opaque>` as the TPP appended it; other parameters are ignored.
#[derive(Debug, Default, Deserialize)]
struct ScaPageQuery {
    state: Option<String>,
}

async fn sca_page(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Query(query): Query<ScaPageQuery>,
) -> Response {
    let state = match query.state.as_deref().map(ScaState::parse).transpose() {
        Ok(state) => state,
        Err(e) => return BadRequest::from(e).html(),
    };
    let state_input = state_input(state.as_ref());
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
         <form method=\"post\" action=\"/sca/{id}/sign\">{state_input}\
         <label>PSU <input name=\"psu\" value=\"{psu}\"></label> <button>Sign</button></form>\
         <form method=\"post\" action=\"/sca/{id}/reject\">{state_input}\
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

/// The page's buttons post a form (`psu=…[&state=…]`); a bare POST acts as the default PSU.
async fn sca_act(
    State(shared): State<Arc<Shared>>,
    Path((id, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    // A broken form is refused: acting without the state it may carry would lose it.
    let Ok(query) = serde_urlencoded::from_bytes::<PsuQuery>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            Html("<p>Malformed form.</p>".to_owned()),
        )
            .into_response();
    };
    match action(&name, query) {
        Ok(action @ Action::Psu(_)) => browser_response(act_on_id(&shared, &id, action)),
        Ok(Action::Abandon) => BadRequest::NoAction(name).html(),
        Err(refusal) => refusal.html(),
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

/// The hidden `state` field of a PSU page's forms: both buttons carry the TPP's state on, so
/// the redirect can echo it.
fn state_input(state: Option<&ScaState>) -> String {
    state
        .map(|s| {
            format!(
                "<input type=\"hidden\" name=\"state\" value=\"{}\">",
                escape(s.as_str())
            )
        })
        .unwrap_or_default()
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::{Method, Request, header};
    use serde_json::Value;
    use tower::ServiceExt as _;

    use super::*;
    use crate::domain::model::{Amount, Brand, PaymentKind, PaymentProduct};
    use crate::sandbox::Rules;
    use crate::sandbox::accounts::BankCodes;
    use crate::sandbox::onboarding::Onboarding;
    use crate::sandbox::store::{
        Challenge, ChallengeMethod, DEFAULT_ACCESS_TOKEN_LIFETIME, DEFAULT_REFRESH_TOKEN_LIFETIME,
        NewPayment, Scenario, Settings, Store, digest,
    };

    const ADMIN: &str = "http://127.0.0.1:8444/";
    const REDIRECT: &str = "https://tpp.example/cb";
    const SECRET: &str = "first-secret";

    fn shared() -> Arc<Shared> {
        Arc::new(Shared {
            client_id: "tpp".into(),
            client_secret_digest: Mutex::new(digest(SECRET)),
            admin_base: url::Url::parse(ADMIN).expect("url"),
            dialect: crate::belfius::dialect::Dialect::default_dialect(),
            rules: Rules {
                amount: crate::belfius::AmountFormat::String,
                banx_bank_codes: BankCodes::default(),
                belfius_bank_codes: BankCodes::default(),
                denied_countries: vec![],
                bic_required_countries: vec![],
            },
            onboarding: Onboarding::new(
                [[1; 32]],
                &[REDIRECT.to_owned()],
                crate::belfius::SignatureEncoding::Base64Padded,
            )
            .expect("onboarding"),
            verifier: None,
            store: Mutex::new(Store::new(Settings {
                auto_sign_after: None,
                settle_after: Duration::from_secs(60),
                sca_expiry: Duration::from_secs(900),
                access_token_lifetime: DEFAULT_ACCESS_TOKEN_LIFETIME,
                refresh_token_lifetime: DEFAULT_REFRESH_TOKEN_LIFETIME,
                verify_signatures: false,
                cancel_status: 204,
                orphans_signable: false,
            })),
            fallback: crate::sandbox::fallback::FallbackState::new(Default::default()),
        })
    }

    fn insert(shared: &Shared, e2e: &str) -> String {
        let new = NewPayment {
            kind: PaymentKind::Single,
            brand: Brand::Belfius,
            product: PaymentProduct::SepaCreditTransfers,
            e2e: e2e.into(),
            amount: Amount::from_minor(100),
            currency: "EUR".into(),
            creditor_name: "ACME".into(),
            creditor_account: "BE71096123456769".into(),
            debtor_iban: None,
            requested_execution_date: None,
            schedule: None,
            entries: Vec::new(),
            redirect_uri: REDIRECT.into(),
            challenge: Some(Challenge {
                value: "x".repeat(43),
                method: ChallengeMethod::S256,
            }),
            psu: None,
            scenario: Scenario::default(),
            request: serde_json::json!({}),
        };
        shared
            .store()
            .insert_payment(new, Instant::now())
            .id
            .clone()
    }

    struct Answer {
        status: StatusCode,
        location: Option<String>,
        body: String,
    }

    impl Answer {
        fn json(&self) -> Value {
            serde_json::from_str(&self.body).expect("JSON answer")
        }
    }

    async fn call(shared: &Arc<Shared>, method: Method, uri: &str, form: Option<&str>) -> Answer {
        let mut request = Request::builder().method(method).uri(uri);
        let body = match form {
            Some(form) => {
                request = request.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
                Body::from(form.to_owned())
            }
            None => Body::empty(),
        };
        let response = router(shared.clone())
            .oneshot(request.body(body).expect("request"))
            .await
            .expect("infallible");
        let status = response.status();
        let location = response
            .headers()
            .get(header::LOCATION)
            .map(|v| v.to_str().expect("ASCII").to_owned());
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        Answer {
            status,
            location,
            body: String::from_utf8(bytes.to_vec()).expect("UTF-8"),
        }
    }

    async fn post(shared: &Arc<Shared>, uri: &str) -> Answer {
        call(shared, Method::POST, uri, None).await
    }

    fn states(redirect: &str) -> Vec<String> {
        url::Url::parse(redirect)
            .expect("redirect URL")
            .query_pairs()
            .filter(|(k, _)| k == "state")
            .map(|(_, v)| v.into_owned())
            .collect()
    }

    fn redirect_of(answer: &Answer) -> String {
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        answer.json()["redirect_url"]
            .as_str()
            .expect("redirect_url")
            .to_owned()
    }

    fn status_of(shared: &Shared, id: &str) -> &'static str {
        shared
            .store()
            .payment(id, Instant::now())
            .expect("payment")
            .status
            .as_str()
    }

    /// `url=` of the by-SCA-URL endpoint, percent-encoded as a client would.
    fn sca_param(link: &str) -> String {
        serde_urlencoded::to_string([("url", link)]).expect("encodes")
    }

    #[tokio::test]
    async fn operator_endpoints_echo_the_state_only_when_given() {
        let shared = shared();
        let id = insert(&shared, "E1");
        let redirect =
            redirect_of(&post(&shared, &format!("/admin/payments/{id}/sign?state=S-1")).await);
        assert_eq!(states(&redirect), ["S-1"]);
        assert!(redirect.contains("code="), "{redirect}");

        let id = insert(&shared, "E2");
        let redirect = redirect_of(&post(&shared, &format!("/admin/payments/{id}/sign")).await);
        assert!(states(&redirect).is_empty(), "{redirect}");

        insert(&shared, "E3");
        let redirect =
            redirect_of(&post(&shared, "/admin/e2e/E3/reject?psu=bob&state=r.2~x_").await);
        assert_eq!(states(&redirect), ["r.2~x_"]);
        assert!(redirect.contains("error=access_denied"), "{redirect}");
    }

    #[tokio::test]
    async fn a_malformed_state_is_refused_and_nothing_happens() {
        let shared = shared();
        let id = insert(&shared, "E1");
        let too_long = "x".repeat(513);
        for bad in ["a%20b", "", "a%26b", "%C3%A9", too_long.as_str()] {
            for uri in [
                format!("/admin/payments/{id}/sign?state={bad}"),
                format!("/admin/payments/{id}/abandon?state={bad}"),
                format!("/admin/e2e/E1/reject?state={bad}"),
                format!("/admin/e2e/E1/sign-all?state={bad}"),
            ] {
                let answer = post(&shared, &uri).await;
                assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{uri}");
                assert!(
                    answer.json()["error_description"]
                        .as_str()
                        .expect("description")
                        .contains("state must be 1 to 512 characters")
                );
            }
            let page = call(
                &shared,
                Method::GET,
                &format!("/sca/{id}?state={bad}"),
                None,
            )
            .await;
            assert_eq!(page.status, StatusCode::BAD_REQUEST, "{bad}");
            let form = format!("psu=alice&state={bad}");
            let browser = call(
                &shared,
                Method::POST,
                &format!("/sca/{id}/sign"),
                Some(&form),
            )
            .await;
            assert_eq!(browser.status, StatusCode::BAD_REQUEST, "{bad}");
        }
        assert_eq!(status_of(&shared, &id), "RCVD");
        // The longest allowed state is fine.
        let longest = "y".repeat(512);
        let redirect = redirect_of(
            &post(
                &shared,
                &format!("/admin/payments/{id}/sign?state={longest}"),
            )
            .await,
        );
        assert_eq!(states(&redirect), [longest]);
    }

    #[tokio::test]
    async fn the_browser_carries_the_state_from_page_to_redirect() {
        let shared = shared();
        let id = insert(&shared, "E1");
        let page = call(
            &shared,
            Method::GET,
            &format!("/sca/{id}?state=tpp-7&appkey=ignored"),
            None,
        )
        .await;
        assert_eq!(page.status, StatusCode::OK);
        assert_eq!(
            page.body
                .matches("<input type=\"hidden\" name=\"state\" value=\"tpp-7\">")
                .count(),
            2,
            "{}",
            page.body
        );
        let plain = call(&shared, Method::GET, &format!("/sca/{id}"), None).await;
        assert!(!plain.body.contains("name=\"state\""), "{}", plain.body);

        let signed = call(
            &shared,
            Method::POST,
            &format!("/sca/{id}/sign"),
            Some("psu=alice&state=tpp-7"),
        )
        .await;
        assert_eq!(signed.status, StatusCode::SEE_OTHER);
        let location = signed.location.expect("Location");
        assert_eq!(states(&location), ["tpp-7"]);
        assert_eq!(
            shared
                .store()
                .payment(&id, Instant::now())
                .expect("payment")
                .psu
                .as_deref(),
            Some("alice")
        );

        let id = insert(&shared, "E2");
        let refused = call(
            &shared,
            Method::POST,
            &format!("/sca/{id}/reject"),
            Some("psu=bob"),
        )
        .await;
        assert_eq!(refused.status, StatusCode::SEE_OTHER);
        let location = refused.location.expect("Location");
        assert!(location.contains("error=access_denied"), "{location}");
        assert!(states(&location).is_empty(), "{location}");
        let broken = call(
            &shared,
            Method::POST,
            &format!("/sca/{id}/sign"),
            Some("partial=maybe"),
        )
        .await;
        assert_eq!(broken.status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn the_sca_url_names_the_payment_and_carries_the_state() {
        let shared = shared();
        let id = insert(&shared, "E1");
        let link = format!("{ADMIN}sca/{id}?appkey=k&state=tpp-9");
        let answer = post(
            &shared,
            &format!("/admin/sca/sign?{}&psu=alice", sca_param(&link)),
        )
        .await;
        let body = answer.json();
        assert_eq!(body["payment_id"], id.as_str());
        assert_eq!(body["status"], "ACTC");
        assert_eq!(states(&redirect_of(&answer)), ["tpp-9"]);
        let view = shared
            .store()
            .payment(&id, Instant::now())
            .expect("payment")
            .view();
        assert_eq!(view.psu.as_deref(), Some("alice"));
        assert_eq!(
            view.redirect_url,
            body["redirect_url"].as_str().map(str::to_owned)
        );

        // Without a state in the link, none on the redirect; partial and reject work as by id.
        let id = insert(&shared, "E2");
        let link = format!("{ADMIN}sca/{id}");
        let answer = post(
            &shared,
            &format!("/admin/sca/sign?{}&partial=true", sca_param(&link)),
        )
        .await;
        assert_eq!(answer.json()["status"], "PATC");
        assert!(states(&redirect_of(&answer)).is_empty());

        let other = insert(&shared, "E3");
        let not_ours = [
            format!("http://127.0.0.1:9999/sca/{other}"),
            format!("https://127.0.0.1:8444/sca/{other}"),
            format!("{ADMIN}admin/payments/{other}"),
            format!("{ADMIN}sca/{other}/sign"),
            format!("{ADMIN}sca/"),
            "not a url".to_owned(),
        ];
        for link in not_ours {
            let answer = post(&shared, &format!("/admin/sca/sign?{}", sca_param(&link))).await;
            assert_eq!(answer.status, StatusCode::NOT_FOUND, "{link}");
            assert!(
                answer.body.contains("not an SCA link of this simulator"),
                "{link}: {}",
                answer.body
            );
        }
        let unknown = post(
            &shared,
            &format!("/admin/sca/sign?{}", sca_param(&format!("{ADMIN}sca/nope"))),
        )
        .await;
        assert_eq!(unknown.status, StatusCode::NOT_FOUND);
        assert!(unknown.body.contains("no such payment"), "{}", unknown.body);

        let link = format!("{ADMIN}sca/{other}");
        for (uri, status) in [
            (
                format!(
                    "/admin/sca/sign?{}",
                    sca_param(&format!("{link}?state=a%20b"))
                ),
                StatusCode::BAD_REQUEST,
            ),
            (
                format!(
                    "/admin/sca/sign?{}",
                    sca_param(&format!("{link}?state=a&state=b"))
                ),
                StatusCode::BAD_REQUEST,
            ),
            // The state belongs in the link, not next to it.
            (
                format!("/admin/sca/sign?{}&state=x", sca_param(&link)),
                StatusCode::BAD_REQUEST,
            ),
            (
                format!("/admin/sca/dance?{}", sca_param(&link)),
                StatusCode::NOT_FOUND,
            ),
            ("/admin/sca/sign".to_owned(), StatusCode::BAD_REQUEST),
        ] {
            assert_eq!(post(&shared, &uri).await.status, status, "{uri}");
        }
        assert_eq!(status_of(&shared, &other), "RCVD");
    }

    #[tokio::test]
    async fn orphans_by_mode_and_sign_all() {
        let shared = shared();
        let signed = insert(&shared, "E");
        let first = insert(&shared, "E");
        let orphan = insert(&shared, "E");
        let last = insert(&shared, "E");
        insert(&shared, "F");
        shared.store().orphan(&orphan);
        assert_eq!(
            post(&shared, &format!("/admin/payments/{signed}/sign?psu=bob"))
                .await
                .status,
            StatusCode::OK
        );

        let refused = post(&shared, &format!("/admin/payments/{orphan}/sign")).await;
        assert_eq!(refused.status, StatusCode::CONFLICT);
        let browser = call(&shared, Method::POST, &format!("/sca/{orphan}/sign"), None).await;
        assert_eq!(browser.status, StatusCode::CONFLICT);

        let all = post(&shared, "/admin/e2e/E/sign-all?psu=alice&state=b-1").await;
        assert_eq!(all.status, StatusCode::OK, "{}", all.body);
        let outcomes = all.json();
        let outcomes = outcomes.as_array().expect("array");
        let ids: Vec<_> = outcomes
            .iter()
            .map(|o| o["payment_id"].as_str().expect("id"))
            .collect();
        assert_eq!(ids, [first.as_str(), last.as_str()]);
        for outcome in outcomes {
            assert_eq!(outcome["status"], "ACTC");
            assert_eq!(
                states(outcome["redirect_url"].as_str().expect("redirect")),
                ["b-1"]
            );
        }
        let none = post(&shared, "/admin/e2e/E/sign-all").await;
        assert_eq!(none.status, StatusCode::NOT_FOUND);
        assert!(
            none.body.contains("waits for its first signature"),
            "{}",
            none.body
        );
        assert_eq!(status_of(&shared, &orphan), "RCVD");

        let on = config_post(&shared, r#"{"orphans_signable":true}"#).await;
        assert_eq!(on.status, StatusCode::OK);
        assert_eq!(on.json()["orphans_signable"], true);
        let all = post(&shared, "/admin/e2e/E/sign-all").await;
        let outcomes = all.json();
        assert_eq!(outcomes.as_array().map(Vec::len), Some(1));
        assert_eq!(outcomes[0]["payment_id"], orphan.as_str());
        assert!(states(outcomes[0]["redirect_url"].as_str().expect("redirect")).is_empty());
        let counters = call(&shared, Method::GET, "/admin/counters", None)
            .await
            .json();
        assert_eq!(counters["orphans_signed"], 1);
        assert_eq!(counters["orphaned_initiations"], 1);
    }

    async fn config_post(shared: &Arc<Shared>, json: &str) -> Answer {
        let request = Request::builder()
            .method(Method::POST)
            .uri("/admin/config")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(json.to_owned()))
            .expect("request");
        let response = router(shared.clone())
            .oneshot(request)
            .await
            .expect("infallible");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        Answer {
            status,
            location: None,
            body: String::from_utf8(bytes.to_vec()).expect("UTF-8"),
        }
    }

    #[tokio::test]
    async fn the_client_secret_rotates_and_is_never_shown() {
        let shared = shared();
        assert!(shared.client_secret_matches(SECRET));
        // A refused patch changes nothing, the secret included.
        let refused =
            config_post(&shared, r#"{"client_secret":"second","cancel_status":201}"#).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);
        let empty = config_post(&shared, r#"{"client_secret":""}"#).await;
        assert_eq!(empty.status, StatusCode::BAD_REQUEST);
        assert!(
            empty.body.contains("client_secret must not be empty"),
            "{}",
            empty.body
        );
        assert!(shared.client_secret_matches(SECRET));

        let rotated = config_post(&shared, r#"{"client_secret":"second"}"#).await;
        assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.body);
        assert!(!rotated.body.contains("second"), "{}", rotated.body);
        assert!(!rotated.body.contains("secret"), "{}", rotated.body);
        assert!(shared.client_secret_matches("second"));
        assert!(!shared.client_secret_matches(SECRET));
        let shown = call(&shared, Method::GET, "/admin/config", None).await;
        assert!(!shown.body.contains("second"), "{}", shown.body);
        // A reset keeps the rotated secret, like every setting.
        assert_eq!(
            post(&shared, "/admin/reset").await.status,
            StatusCode::NO_CONTENT
        );
        assert!(shared.client_secret_matches("second"));
    }
}
