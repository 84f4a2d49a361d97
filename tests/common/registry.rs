//! A minimal Confluent-compatible Schema Registry for tests: the endpoints pis-worker uses.
//! No registry server is installable here, so this stands in for one.
//!
//! - `GET /schemas/ids/{id}` -> `{"schema": "..."}`, or 404 `{"error_code": 40403, ...}`
//! - `POST /subjects/{subject}/versions` `{"schema": "..."}` -> `{"id": N}` (registers; the same
//!   schema gets the same id under every subject, as Confluent's does)
//! - `POST /subjects/{subject}` `{"schema": "..."}` -> `{"subject", "id", "version", "schema"}`,
//!   or 404 `{"error_code": 40403}` when not registered under that subject
//!
//! `stop()` closes the listener and every open connection (clients see connection refused);
//! `start()` serves again on the same port with the same content.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

#[derive(Default)]
pub struct Content {
    /// id -> schema text (as registered).
    pub schemas: BTreeMap<u32, String>,
    /// subject -> ids, in version order.
    pub subjects: BTreeMap<String, Vec<u32>>,
    /// Every request, as "METHOD path".
    pub requests: Vec<String>,
}

type Shared = Arc<Mutex<Content>>;

pub struct StubRegistry {
    pub addr: SocketAddr,
    content: Shared,
    server: Option<tokio::task::JoinHandle<()>>,
}

fn same_schema(a: &str, b: &str) -> bool {
    match (
        serde_json::from_str::<Value>(a),
        serde_json::from_str::<Value>(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn not_found(code: i64, message: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"error_code": code, "message": message})),
    )
        .into_response()
}

fn log(content: &Shared, line: String) {
    content.lock().expect("lock").requests.push(line);
}

async fn schema_by_id(State(content): State<Shared>, Path(id): Path<u32>) -> Response {
    log(&content, format!("GET /schemas/ids/{id}"));
    let schema = content.lock().expect("lock").schemas.get(&id).cloned();
    match schema {
        Some(schema) => axum::Json(json!({ "schema": schema })).into_response(),
        None => not_found(40403, "Schema not found"),
    }
}

fn schema_of(body: &str) -> Option<String> {
    serde_json::from_str::<Value>(body)
        .ok()?
        .get("schema")?
        .as_str()
        .map(str::to_owned)
}

async fn register(
    State(content): State<Shared>,
    Path(subject): Path<String>,
    body: String,
) -> Response {
    log(&content, format!("POST /subjects/{subject}/versions"));
    let Some(schema) = schema_of(&body) else {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({"error_code": 42201, "message": "Invalid schema"})),
        )
            .into_response();
    };
    let mut content = content.lock().expect("lock");
    let existing = content
        .schemas
        .iter()
        .find(|(_, s)| same_schema(s, &schema))
        .map(|(id, _)| *id);
    let id = existing.unwrap_or_else(|| content.schemas.keys().max().map_or(1, |m| m + 1));
    content.schemas.entry(id).or_insert(schema);
    let versions = content.subjects.entry(subject).or_default();
    if !versions.contains(&id) {
        versions.push(id);
    }
    axum::Json(json!({ "id": id })).into_response()
}

async fn lookup(
    State(content): State<Shared>,
    Path(subject): Path<String>,
    body: String,
) -> Response {
    log(&content, format!("POST /subjects/{subject}"));
    let Some(schema) = schema_of(&body) else {
        return not_found(40403, "Schema not found");
    };
    let content = content.lock().expect("lock");
    let Some(versions) = content.subjects.get(&subject) else {
        return not_found(40401, "Subject not found");
    };
    for (i, id) in versions.iter().enumerate() {
        if content
            .schemas
            .get(id)
            .is_some_and(|s| same_schema(s, &schema))
        {
            return axum::Json(json!({
                "subject": subject, "id": id, "version": i + 1, "schema": schema
            }))
            .into_response();
        }
    }
    not_found(40403, "Schema not found")
}

fn router(content: Shared) -> Router {
    Router::new()
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/subjects/{subject}/versions", post(register))
        .route("/subjects/{subject}", post(lookup))
        .with_state(content)
}

impl StubRegistry {
    /// Starts on a free port of 127.0.0.1.
    pub async fn start_new() -> StubRegistry {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind registry");
        let addr = listener.local_addr().expect("addr");
        let mut stub = StubRegistry {
            addr,
            content: Arc::new(Mutex::new(Content::default())),
            server: None,
        };
        stub.serve(listener);
        stub
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = router(self.content.clone());
        self.server = Some(tokio::spawn(async move {
            // Connections live in this set: aborting the server drops it, which aborts them.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                connections.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        }));
    }

    /// Closes the listener and every connection: the registry is down.
    pub async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }

    /// Serves again on the same port.
    pub async fn start(&mut self) {
        let started = std::time::Instant::now();
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(e) if started.elapsed() < std::time::Duration::from_secs(10) => {
                    eprintln!("registry rebind: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("registry cannot rebind {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    /// Registers `schema` under `subject` directly (as a client's serializer would) and
    /// returns its id.
    pub fn register(&self, subject: &str, schema: &str) -> u32 {
        let mut content = self.content.lock().expect("lock");
        let existing = content
            .schemas
            .iter()
            .find(|(_, s)| same_schema(s, schema))
            .map(|(id, _)| *id);
        let id = existing.unwrap_or_else(|| content.schemas.keys().max().map_or(1, |m| m + 1));
        content
            .schemas
            .entry(id)
            .or_insert_with(|| schema.to_owned());
        let versions = content.subjects.entry(subject.to_owned()).or_default();
        if !versions.contains(&id) {
            versions.push(id);
        }
        id
    }

    /// The ids registered under `subject`.
    pub fn subject_ids(&self, subject: &str) -> Vec<u32> {
        self.content
            .lock()
            .expect("lock")
            .subjects
            .get(subject)
            .cloned()
            .unwrap_or_default()
    }

    pub fn requests(&self) -> Vec<String> {
        self.content.lock().expect("lock").requests.clone()
    }
}

impl Drop for StubRegistry {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}
