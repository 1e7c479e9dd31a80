//! `sidrec serve`: the decoding engine behind an HTTP JSON API.
//!
//! ```text
//! POST /v1/recommend   {query, history, types, filter, k, exclude_seen, mode, beams,
//!                       mix_recent, recent_decay, memory}
//!                      -> {items: [{rank, id, title, type, score, sid}], ...}
//! POST /v1/generate    {query, history, mode, format, max_tokens, temperature, top_p, seed, ...}
//!                      -> {output: [{kind: "text", text} | {kind: "item", ...}], text}
//! GET  /v1/items/{id}  -> the catalog item and its SID
//! GET  /healthz        -> {status: "ok", probe: {ok, took_ms, items}, items, ...}
//! ```
//!
//! Before it listens, the server decodes one probe request ([`probe`]): a model that
//! cannot answer (non-finite weights from a diverged run decode to nothing) is refused
//! at start instead of answering every request with an empty list, and `/healthz` shows
//! the probe it passed.
//!
//! Every request shares one loaded model. Decoding is CPU work that blocks for
//! milliseconds, so it runs on a small pool of blocking workers (a semaphore of
//! `workers` permits in front of `spawn_blocking`), never on the async threads that
//! accept connections; requests beyond `workers + queue` get 503 at once rather than
//! piling up. Requests are held to the same [`Limits`] as `sidrec recommend` and the
//! REPL, with the same messages. Every error the server answers is a JSON `{"error": ...}`
//! with a 4xx status for bad input (what was wrong, in words) and 5xx only for the
//! server's own failures, whose details go to the server's log, not the client; no answer
//! names a path on the server. Malformed HTTP itself (a request line or header hyper
//! cannot parse) is answered by hyper with an empty body.
//!
//! Connections are served by [`conn`]: a request head and body must arrive within
//! `header_timeout`, a connection where nothing moves for `idle_timeout` is closed, and
//! shutdown (SIGINT/SIGTERM or the future given to [`serve`]) stops accepting, lets
//! requests in flight finish, and drops whatever is still open after `shutdown_timeout`.

mod conn;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

pub use conn::{serve, Timeouts};

use crate::decode::engine::{Output, Recommendation};
use crate::decode::{DecodeError, Engine, Format, GenConfig, Limits, Mode, Reading, Request};
use crate::trie::ItemIdx;

/// Limits, timeouts and pool sizes; the defaults suit the tiny models on a laptop.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Requests decoded at the same time (blocking workers).
    pub workers: usize,
    /// Requests that may wait for a worker; more get 503.
    pub queue: usize,
    /// Largest request body in bytes; larger ones get 413.
    pub max_body: usize,
    /// The bounds of a request, shared with `recommend` and the REPL.
    pub limits: Limits,
    /// How long a connection may take to send a request, sit idle, or finish at shutdown.
    pub timeouts: Timeouts,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            workers: 2,
            queue: 64,
            max_body: 64 * 1024,
            limits: Limits::default(),
            timeouts: Timeouts::default(),
        }
    }
}

/// Why the server did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The probe request failed or came back empty: the model cannot answer.
    #[error("the model failed its start-up probe: {0}")]
    Probe(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What the start-up probe found, as `/healthz` reports it.
#[derive(Clone, Debug, Serialize)]
pub struct Probe {
    /// Always true on a running server: one that failed its probe does not start.
    pub ok: bool,
    pub took_ms: f64,
    /// Items the probe got back.
    pub items: usize,
}

/// Decodes one request as a client would send it (recommend after the catalog's first
/// item, k = 1): it must return an item with a finite score. A model whose weights are
/// not finite decodes to nothing, or to NaN scores, without any error of its own; this
/// turns that into a refusal to start rather than a server that answers every request
/// with an empty list.
pub fn probe(engine: &Engine) -> Result<Probe, ServeError> {
    let t0 = Instant::now();
    if engine.catalog().items.is_empty() {
        return Err(ServeError::Probe("the catalog has no items".into()));
    }
    let req = Request {
        mode: Mode::Recommend,
        format: Format::Items,
        history: vec![0],
        k: 1,
        ..Default::default()
    };
    let items = engine
        .recommend(&req)
        .map_err(|e| ServeError::Probe(e.to_string()))?;
    let Some(first) = items.first() else {
        return Err(ServeError::Probe(
            "a recommend request came back with no items (are the weights finite?)".into(),
        ));
    };
    if !first.score.is_finite() {
        return Err(ServeError::Probe(format!(
            "a recommend request scored its item {} (are the weights finite?)",
            first.score
        )));
    }
    Ok(Probe {
        ok: true,
        took_ms: millis(t0),
        items: items.len(),
    })
}

struct AppState {
    engine: Arc<Engine>,
    opts: ServeOptions,
    probe: Probe,
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
}

/// An error as the client sees it: a status and `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl From<DecodeError> for ApiError {
    /// Bad input is the client's to know in full; the model's own failures (I/O, tensor
    /// errors) may name files on the server, so the client gets a plain 500 and the
    /// details go to the server's log.
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::Invalid(_)
            | DecodeError::Filter { .. }
            | DecodeError::NothingAllowed(_) => ApiError::bad(e.to_string()),
            _ => {
                eprintln!("error while decoding: {e}");
                ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    message: "the model failed on this request (the server's log says why)".into(),
                }
            }
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError {
            status: r.status(),
            message: r.body_text(),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        ApiError {
            status: r.status(),
            message: r.body_text(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body {
            error: String,
        }
        (
            self.status,
            Json(Body {
                error: self.message,
            }),
        )
            .into_response()
    }
}

/// A request body that must be a JSON object, read as `T`.
///
/// Serde reads a JSON array as a struct's fields in order (`["Heat"]` as `{"query":
/// "Heat"}`), which is never what a client meant, so anything but an object is refused
/// before it is read. Otherwise it answers as axum's `Json` does: 415 without a JSON
/// content type, 400 for bad JSON, 422 (naming the field) for the wrong fields or types.
pub struct JsonObject<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for JsonObject<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        if !json_content_type(req.headers()) {
            return Err(ApiError {
                status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                message: "expected a request with Content-Type: application/json".into(),
            });
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|r| ApiError {
                status: r.status(),
                message: r.body_text(),
            })?;
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            // Valid JSON of another kind is named; anything else gets the parser's word.
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
                let kind = match v {
                    serde_json::Value::Array(_) => "an array",
                    serde_json::Value::String(_) => "a string",
                    serde_json::Value::Number(_) => "a number",
                    serde_json::Value::Bool(_) => "a boolean",
                    _ => "null",
                };
                return Err(ApiError::bad(format!(
                    "the request body must be a JSON object ({{\"field\": value, ...}}), not {kind}"
                )));
            }
        }
        let Json(t) = Json::<T>::from_bytes(&bytes)?;
        Ok(JsonObject(t))
    }
}

/// `application/json` or `application/*+json`, parameters (charset) aside.
fn json_content_type(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// `POST /v1/recommend`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecommendBody {
    /// The request in words; titles after "like" join the history.
    pub query: String,
    /// The user's items, oldest first: ids or titles.
    pub history: Vec<String>,
    /// Allowed entity types (empty: all).
    pub types: Vec<String>,
    /// Attribute filter, e.g. `year>=1990, genre=Comedy`.
    pub filter: Option<String>,
    /// Items to return (default 10).
    pub k: Option<usize>,
    pub exclude_seen: bool,
    /// auto (default), recommend or search.
    pub mode: Option<String>,
    pub beams: Option<usize>,
    /// Rank by the mixture of the whole history and each of its last N items alone
    /// (0: the whole history only; at most [`Limits::max_mix_recent`]; absent: as the
    /// model's recipe ranks, in `sidrec.json`).
    pub mix_recent: Option<usize>,
    /// Under `mix_recent`, each further recent item weighs this many times the one
    /// after it (default: the recipe's, else 0.5; must be positive).
    pub recent_decay: Option<f32>,
    /// Mix in the model's transition memory at this weight against the whole history's
    /// 1 (absent: as the model's recipe ranks; 0: off; a model without `transitions.json`
    /// answers 400).
    pub memory: Option<f32>,
    /// Give the words to the model only (no titles or attribute words read as limits).
    pub literal: bool,
}

#[derive(Debug, Serialize)]
pub struct RecommendResponse {
    pub items: Vec<Recommendation>,
    /// The history the model read (ids), including items named in the query.
    pub history: Vec<String>,
    /// The words the model read after titles were taken out.
    pub query: String,
    /// The filter applied: the request's own plus the attribute words read from it.
    pub filter: Option<String>,
    /// What was read from the words, and the limit each became.
    pub read: Vec<Reading>,
    pub took_ms: f64,
}

/// `POST /v1/generate`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerateBody {
    pub query: String,
    pub history: Vec<String>,
    pub types: Vec<String>,
    pub filter: Option<String>,
    pub exclude_seen: bool,
    /// chat (default with a query), describe (default with only a history), recommend,
    /// search.
    pub mode: Option<String>,
    /// The mode's own by default (text for describe, both for chat), or text, items,
    /// both.
    pub format: Option<String>,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub literal: bool,
}

#[derive(Debug, Serialize)]
pub struct GenerateResponse {
    pub output: Vec<Output>,
    /// The answer as one string, items written as their titles.
    pub text: String,
    /// What was read from the words (recommend and search modes), and the limit each
    /// became.
    pub read: Vec<Reading>,
    pub took_ms: f64,
}

/// The router: every endpoint, the body limit, JSON errors for unknown paths and methods.
/// `probe` is what [`probe`] found, for `/healthz`.
pub fn router(engine: Arc<Engine>, opts: ServeOptions, probe: Probe) -> Router {
    let state = Arc::new(AppState {
        engine,
        probe,
        permits: Arc::new(Semaphore::new(opts.workers.max(1))),
        waiting: AtomicUsize::new(0),
        opts: opts.clone(),
    });
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/items/{id}", get(item))
        .route("/v1/recommend", post(recommend))
        .route("/v1/generate", post(generate))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such endpoint (POST /v1/recommend, POST /v1/generate, GET /v1/items/{id}, GET /healthz)".into(),
            }
        })
        .method_not_allowed_fallback(|| async {
            ApiError {
                status: StatusCode::METHOD_NOT_ALLOWED,
                message: "method not allowed on this endpoint".into(),
            }
        })
        .layer(DefaultBodyLimit::max(opts.max_body))
        .with_state(state)
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Probes the model, binds `addr` and serves until SIGINT/SIGTERM; `on_ready` gets the
/// bound address (port 0 picks a free one) before the first request is accepted. A model
/// that fails its [`probe`] is refused before anything listens.
pub fn run(
    engine: Engine,
    addr: SocketAddr,
    opts: ServeOptions,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let probe = probe(&engine)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let served = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        on_ready(listener.local_addr()?);
        let app = router(Arc::new(engine), opts.clone(), probe);
        serve(listener, app, &opts, shutdown_signal()).await
    });
    // A decode still running past the shutdown deadline is not waited for: the
    // deadline is the promise.
    rt.shutdown_timeout(Duration::from_millis(100));
    Ok(served?)
}

/// Counts a request as waiting for a worker until dropped (also when the client goes
/// away while it waits).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs `job` on a blocking worker once one is free; 503 when the queue is full.
async fn on_worker<T: Send + 'static>(
    state: &Arc<AppState>,
    job: impl FnOnce(&Engine) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let before = state.waiting.fetch_add(1, Ordering::SeqCst);
    let waiting = Waiting(&state.waiting);
    if before >= state.opts.workers + state.opts.queue {
        return Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "busy: too many requests waiting; retry later".into(),
        });
    }
    let permit = state
        .permits
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "shutting down".into(),
        })?;
    let engine = state.engine.clone();
    let joined = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        job(&engine)
    })
    .await;
    drop(waiting);
    joined.map_err(|_| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: "internal error while decoding".into(),
    })?
}

/// The probe the server passed at start, and what it serves. No path: the model's
/// place on the server's disk is none of the client's business.
async fn healthz(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let e = &state.engine;
    Json(serde_json::json!({
        "status": if state.probe.ok { "ok" } else { "failing" },
        "probe": state.probe,
        "items": e.catalog().items.len(),
        "types": e.catalog().types(),
        "workers": state.opts.workers,
    }))
}

async fn item(
    State(state): State<Arc<AppState>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(id) = path?;
    let e = &state.engine;
    let i = e.index_of(&id).ok_or_else(|| ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("no item with id {id:?}"),
    })?;
    let it = &e.catalog().items[i as usize];
    let mut v = serde_json::to_value(it).map_err(|e| {
        eprintln!("error while writing item {id:?}: {e}");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "the item could not be written as JSON".into(),
        }
    })?;
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "sid".into(),
            e.sids().records[i as usize].sid.clone().into(),
        );
    }
    Ok(Json(v))
}

fn parse_mode(s: Option<&str>, default: Mode, allowed: &[Mode]) -> Result<Mode, ApiError> {
    let mode = match s {
        None => default,
        Some(s) => s.parse::<Mode>().map_err(ApiError::bad)?,
    };
    if allowed.contains(&mode) {
        Ok(mode)
    } else {
        let names: Vec<String> = allowed.iter().map(|m| m.to_string()).collect();
        Err(ApiError::bad(format!(
            "mode {mode} is not served here (use {})",
            names.join(", ")
        )))
    }
}

/// The parts of a request both endpoints share, checked against the limits.
struct Common<'a> {
    query: &'a str,
    history: &'a [String],
    types: &'a [String],
    filter: &'a Option<String>,
    exclude_seen: bool,
    literal: bool,
}

/// A query or history over its limit is 413 (too large), the rest of the limits' errors
/// 400: the message is [`Limits`]'s either way.
fn too_large(e: DecodeError) -> ApiError {
    ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: e.to_string(),
    }
}

fn build(
    e: &Engine,
    limits: &Limits,
    c: Common<'_>,
    mode: Mode,
    k: usize,
) -> Result<(Request, Vec<Reading>), ApiError> {
    limits.check_query(c.query).map_err(too_large)?;
    limits.check_history(c.history.len()).map_err(too_large)?;
    let history = c
        .history
        .iter()
        .map(|h| e.resolve_item(h))
        .collect::<Result<Vec<ItemIdx>, DecodeError>>()?;
    let mut req = Request {
        mode,
        query: c.query.to_string(),
        history,
        types: c.types.to_vec(),
        filter: c.filter.clone(),
        exclude_seen: c.exclude_seen,
        k,
        ..Default::default()
    };
    let read = if c.literal {
        Vec::new()
    } else {
        e.read_request(&mut req)
    };
    Ok((req, read))
}

fn millis(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}

async fn recommend(
    State(state): State<Arc<AppState>>,
    JsonObject(b): JsonObject<RecommendBody>,
) -> Result<Json<RecommendResponse>, ApiError> {
    let t0 = Instant::now();
    let limits = &state.opts.limits;
    let k = limits.check_k(b.k.unwrap_or(10))?;
    let beams = limits.check_beams(b.beams, k)?;
    // As the model's recipe ranks (sidrec.json), unless the request says otherwise.
    let rank = state
        .engine
        .ranking()
        .with(b.mix_recent, b.recent_decay, b.memory);
    let mix_recent = limits.check_mix_recent(rank.mix_recent)?;
    let mode = parse_mode(
        b.mode.as_deref(),
        Mode::Auto,
        &[Mode::Auto, Mode::Recommend, Mode::Search],
    )?;
    let (mut req, read) = build(
        &state.engine,
        limits,
        Common {
            query: &b.query,
            history: &b.history,
            types: &b.types,
            filter: &b.filter,
            exclude_seen: b.exclude_seen,
            literal: b.literal,
        },
        mode,
        k,
    )?;
    req.beams = beams;
    req.mix_recent = mix_recent;
    req.recent_decay = rank.recent_decay;
    req.memory = rank.memory;
    req.format = Format::Items;
    let (items, req) = on_worker(&state, move |e| Ok((e.recommend(&req)?, req))).await?;
    // The limits left items to choose from (else `recommend` says so), so an empty or
    // NaN-scored answer is the model failing, never a 200.
    if items.is_empty() || items.iter().any(|r| !r.score.is_finite()) {
        eprintln!("error while decoding: no usable items (none, or non-finite scores)");
        return Err(ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "the model returned no usable items for this request".into(),
        });
    }
    let e = &state.engine;
    Ok(Json(RecommendResponse {
        items,
        history: req
            .history
            .iter()
            .map(|&i| e.catalog().items[i as usize].id.clone())
            .collect(),
        query: req.query,
        filter: req.filter,
        read,
        took_ms: millis(t0),
    }))
}

async fn generate(
    State(state): State<Arc<AppState>>,
    JsonObject(b): JsonObject<GenerateBody>,
) -> Result<Json<GenerateResponse>, ApiError> {
    let t0 = Instant::now();
    let limits = &state.opts.limits;
    let default_mode = if b.query.trim().is_empty() {
        Mode::Describe
    } else {
        Mode::Chat
    };
    let mode = parse_mode(
        b.mode.as_deref(),
        default_mode,
        &[Mode::Chat, Mode::Describe, Mode::Recommend, Mode::Search],
    )?;
    let format = match b.format.as_deref() {
        None => Format::Auto,
        Some(f) => f.parse::<Format>().map_err(ApiError::bad)?,
    };
    let max_tokens = limits.check_max_tokens(b.max_tokens.unwrap_or(96))?;
    let temperature = b.temperature.unwrap_or(0.0);
    if !temperature.is_finite() || temperature < 0.0 {
        return Err(ApiError::bad(format!(
            "temperature must be 0 (greedy) or positive, got {temperature}"
        )));
    }
    let top_p = b.top_p.unwrap_or(0.9);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad(format!(
            "top_p must be in (0, 1], got {top_p}"
        )));
    }
    let (mut req, read) = build(
        &state.engine,
        limits,
        Common {
            query: &b.query,
            history: &b.history,
            types: &b.types,
            filter: &b.filter,
            exclude_seen: b.exclude_seen,
            literal: b.literal,
        },
        mode,
        10,
    )?;
    req.format = format;
    let cfg = GenConfig {
        max_tokens,
        temperature,
        top_p,
        seed: b.seed.unwrap_or(0),
        stop: Vec::new(),
        items: true,
    };
    let output = on_worker(&state, move |e| Ok(e.generate(&req, &cfg)?)).await?;
    let text = output
        .iter()
        .map(|o| match o {
            Output::Text { text } => text.clone(),
            Output::Item(r) => r.title.clone(),
        })
        .collect::<Vec<_>>()
        .join("");
    Ok(Json(GenerateResponse {
        output,
        text,
        read,
        took_ms: millis(t0),
    }))
}
