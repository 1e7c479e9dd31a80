//! `sidrec serve`: the decoding engine behind an HTTP JSON API.
//!
//! ```text
//! POST /v1/recommend   {query, history, types, filter, k, exclude_seen, mode, beams,
//!                       mix_recent, recent_decay, memory}
//!                      -> {items: [{rank, id, title, type, score, sid}], ...}
//! POST /v1/generate    {query, history, mode, format, max_tokens, temperature, top_p, seed, ...}
//!                      -> {output: [{kind: "text", text} | {kind: "item", ...}], text}
//! GET  /v1/items/{id}  -> the catalog item and its SID
//! GET  /healthz        -> {status: "ok", items, ...}
//! ```
//!
//! Every request shares one loaded model. Decoding is CPU work that blocks for
//! milliseconds, so it runs on a small pool of blocking workers (a semaphore of
//! `workers` permits in front of `spawn_blocking`), never on the async threads that
//! accept connections; requests beyond `workers + queue` get 503 at once rather than
//! piling up. Every error is a JSON `{"error": ...}` with a 4xx status for bad input
//! (what was wrong, in words) and 5xx only for the server's own failures. Shutdown
//! (SIGINT/SIGTERM or the future given to [`serve`]) stops accepting connections and lets
//! requests in flight finish.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::decode::engine::{Output, Recommendation};
use crate::decode::{DecodeError, Engine, Format, GenConfig, Mode, Reading, Request};
use crate::trie::ItemIdx;

/// Limits and pool sizes; the defaults suit the tiny models on a laptop.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Requests decoded at the same time (blocking workers).
    pub workers: usize,
    /// Requests that may wait for a worker; more get 503.
    pub queue: usize,
    /// Largest request body in bytes; larger ones get 413.
    pub max_body: usize,
    /// Longest `query` in bytes.
    pub max_query: usize,
    /// Most history entries.
    pub max_history: usize,
    /// Largest `k` (and beam width).
    pub max_k: usize,
    /// Most generated tokens a request may ask for.
    pub max_tokens: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            workers: 2,
            queue: 64,
            max_body: 64 * 1024,
            max_query: 2000,
            max_history: 500,
            max_k: 100,
            max_tokens: 512,
        }
    }
}

struct AppState {
    engine: Arc<Engine>,
    opts: ServeOptions,
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
    fn from(e: DecodeError) -> Self {
        let status = match e {
            DecodeError::Invalid(_)
            | DecodeError::Filter { .. }
            | DecodeError::NothingAllowed(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError {
            status,
            message: e.to_string(),
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
    /// (0, the default: the whole history only; at most [`MAX_MIX_RECENT`]).
    pub mix_recent: usize,
    /// Under `mix_recent`, each further recent item weighs this many times the one
    /// after it (default 0.5; must be positive).
    pub recent_decay: Option<f32>,
    /// Mix in the model's transition memory at this weight against the whole history's
    /// 1 (default: off; a model without `transitions.json` answers 400).
    pub memory: Option<f32>,
    /// Give the words to the model only (no titles or attribute words read as limits).
    pub literal: bool,
}

/// Most recent items a recommend request may mix in: each costs a decoder pass.
pub const MAX_MIX_RECENT: usize = 8;

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
pub fn router(engine: Arc<Engine>, opts: ServeOptions) -> Router {
    let state = Arc::new(AppState {
        engine,
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

/// Serves `router` on `listener` until `shutdown` resolves, then lets requests in flight
/// finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
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

/// Binds `addr` and serves until SIGINT/SIGTERM; `on_ready` gets the bound address
/// (port 0 picks a free one) before the first request is accepted.
pub fn run(
    engine: Engine,
    addr: SocketAddr,
    opts: ServeOptions,
    on_ready: impl FnOnce(SocketAddr),
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        on_ready(listener.local_addr()?);
        serve(listener, router(Arc::new(engine), opts), shutdown_signal()).await
    })
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

async fn healthz(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let e = &state.engine;
    Json(serde_json::json!({
        "status": "ok",
        "model": e.dir().display().to_string(),
        "items": e.catalog().items.len(),
        "types": e.catalog().types(),
        "workers": state.opts.workers,
    }))
}

async fn item(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let e = &state.engine;
    let i = e.index_of(&id).ok_or_else(|| ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("no item with id {id:?}"),
    })?;
    let it = &e.catalog().items[i as usize];
    let mut v = serde_json::to_value(it).map_err(|e| ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: e.to_string(),
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

fn build(
    e: &Engine,
    opts: &ServeOptions,
    c: Common<'_>,
    mode: Mode,
    k: usize,
) -> Result<(Request, Vec<Reading>), ApiError> {
    if c.query.len() > opts.max_query {
        return Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "query is {} bytes; at most {} are read",
                c.query.len(),
                opts.max_query
            ),
        });
    }
    if c.history.len() > opts.max_history {
        return Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "history has {} items; at most {} are read",
                c.history.len(),
                opts.max_history
            ),
        });
    }
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

fn check_k(k: usize, what: &str, max: usize) -> Result<usize, ApiError> {
    if k == 0 || k > max {
        return Err(ApiError::bad(format!("{what} must be 1 to {max}, got {k}")));
    }
    Ok(k)
}

fn millis(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}

async fn recommend(
    State(state): State<Arc<AppState>>,
    body: Result<Json<RecommendBody>, JsonRejection>,
) -> Result<Json<RecommendResponse>, ApiError> {
    let Json(b) = body?;
    let t0 = Instant::now();
    let opts = &state.opts;
    let k = check_k(b.k.unwrap_or(10), "k", opts.max_k)?;
    let beams = match b.beams {
        Some(n) => Some(check_k(n, "beams", opts.max_k.max(2 * k))?.max(k)),
        None => None,
    };
    let mode = parse_mode(
        b.mode.as_deref(),
        Mode::Auto,
        &[Mode::Auto, Mode::Recommend, Mode::Search],
    )?;
    let (mut req, read) = build(
        &state.engine,
        opts,
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
    if b.mix_recent > MAX_MIX_RECENT {
        return Err(ApiError::bad(format!(
            "mix_recent must be 0 to {MAX_MIX_RECENT}, got {}",
            b.mix_recent
        )));
    }
    req.beams = beams;
    req.mix_recent = b.mix_recent;
    req.recent_decay = b.recent_decay;
    req.memory = b.memory;
    req.format = Format::Items;
    let (items, req) = on_worker(&state, move |e| Ok((e.recommend(&req)?, req))).await?;
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
    body: Result<Json<GenerateBody>, JsonRejection>,
) -> Result<Json<GenerateResponse>, ApiError> {
    let Json(b) = body?;
    let t0 = Instant::now();
    let opts = &state.opts;
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
    let max_tokens = check_k(b.max_tokens.unwrap_or(96), "max_tokens", opts.max_tokens)?;
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
        opts,
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
