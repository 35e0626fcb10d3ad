//! The OpenAI-compatible HTTP front end.
//!
//! `POST /v1/completions` and `POST /v1/chat/completions` are parsed only as
//! far as routing needs ([`openai`]), tokenised, routed with
//! [`Router::decide`] over the healthy workers and their in-flight load, and
//! forwarded unchanged to `POST {worker}/v1/...` over a pooled HTTP/1 client
//! (hyper-util, which tonic already brings in: no second HTTP stack). The
//! response carries `x-kvfabric-worker: NAME`.
//!
//! - Non-streaming responses are read whole before answering, so a worker
//!   that fails or stalls mid-response becomes a clean 502 / 504 for the
//!   client, never a truncated body or a hang.
//! - Streaming (`"stream": true`) responses pass through chunk by chunk; a
//!   failure or stall after the first byte ends the stream with an SSE
//!   `data: {"error": ...}` event (the status line is already sent).
//! - Errors are OpenAI-shaped: 400 bad JSON / types / missing fields, 404
//!   unknown model or route, 413 over `max-body-size`, 503 no healthy
//!   worker, 502 worker failure, 504 worker timeout.
//!
//! `GET /v1/models`, `GET /health` (200 while a worker is healthy, else
//! 503) and `GET /metrics` (Prometheus text) are served on the same port.

pub(crate) mod openai;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use serde_json::json;

use crate::Router;
use crate::events::EventCounters;
use crate::index::Tier;
use crate::metrics::Metrics;
use crate::tokenize::Tokenizer;
use crate::workers::{HttpClient, LoadGuard, Worker, Workers};
use openai::{Api, ApiError, Prompt};

/// Everything a request handler needs.
#[derive(Debug)]
pub(crate) struct AppState {
    pub(crate) router: Arc<Router>,
    pub(crate) workers: Arc<Workers>,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) metrics: Metrics,
    pub(crate) counters: Arc<EventCounters>,
    pub(crate) client: HttpClient,
    pub(crate) models: Vec<String>,
    pub(crate) max_body: usize,
    pub(crate) timeout: Duration,
    pub(crate) approximate_ttl_ms: u64,
    pub(crate) started: Instant,
}

/// The axum app.
pub(crate) fn app(state: Arc<AppState>) -> axum::Router {
    axum::Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn completions(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    handle(s, Api::Completions, headers, body).await
}

async fn chat(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    handle(s, Api::Chat, headers, body).await
}

async fn handle(s: Arc<AppState>, api: Api, headers: HeaderMap, body: Body) -> Response {
    let t0 = Instant::now();
    let r = match route_and_forward(&s, api, &headers, body).await {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(route = api.path(), status = %e.status, message = %e.message, "request failed");
            }
            e.into_response()
        }
    };
    s.metrics
        .requests
        .with_label_values(&[api.path(), r.status().as_str()])
        .inc();
    s.metrics
        .request_seconds
        .with_label_values(&[api.path()])
        .observe(t0.elapsed().as_secs_f64());
    r
}

/// The request body, at most `max` bytes, read within `timeout` (a client
/// that stops sending does not hold a connection and a task for good).
async fn read_body(max: usize, timeout: Duration, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body exceeds the router's limit of {max} bytes"),
        )
    };
    if let Some(n) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && n > max as u64
    {
        return Err(too_large());
    }
    let Ok(read) = tokio::time::timeout(timeout, Limited::new(body, max).collect()).await else {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            format!("the request body did not arrive within {timeout:?}"),
        ));
    };
    match read {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(e) => Err(ApiError::invalid(None, format!("could not read the request body: {e}"))),
    }
}

async fn route_and_forward(s: &Arc<AppState>, api: Api, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let body = read_body(s.max_body, s.timeout, headers, body).await?;
    let req = openai::parse(api, &body)?;
    if !s.models.is_empty() {
        let Some(m) = &req.model else {
            return Err(ApiError::invalid(Some("model"), "you must provide a 'model'"));
        };
        if !s.models.iter().any(|x| x == m) {
            let mut e = ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!("the model '{m}' does not exist; this router serves {:?}", s.models),
            );
            e.param = Some("model");
            return Err(e);
        }
    }
    let tokens = match &req.prompt {
        Prompt::Tokens(t) => t.clone(),
        Prompt::Text(t) => s.tokenizer.encode(t).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "tokenization_failed",
                e.to_string(),
            )
        })?,
    };
    let chain = s.router.chain(&tokens);
    // Approximate-mode records that ended are not scored.
    let now_ms = s.started.elapsed().as_millis() as u64;
    s.router.expire(now_ms);
    let (healthy, cands) = s.workers.candidates();
    let Some(d) = s.router.decide(&chain, tokens.len(), &cands) else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "no_healthy_worker",
            "no healthy worker is available; retry later",
        ));
    };
    let w = healthy[d.index].clone();
    record_decision(s, &w, &d, tokens.len());
    if w.approximate {
        s.router.assume_cached(w.holder, &chain, now_ms, s.approximate_ttl_ms);
    }
    let bt = s.router.settings().block_tokens as u64;
    let decode_blocks = (tokens.len() as u64)
        .saturating_add(req.max_tokens)
        .div_ceil(bt)
        .saturating_mul(req.batch);
    let guard = s.workers.admit(
        &w,
        d.chosen.prefill_tokens.saturating_mul(req.batch),
        decode_blocks,
        d.chosen.load_tokens() * req.batch as f64,
    );
    forward(s, api, &w, headers, body, req.stream, guard).await
}

fn record_decision(s: &AppState, w: &Worker, d: &crate::Decision, tokens: usize) {
    let m = &s.metrics;
    m.decisions.with_label_values(&[&w.name]).inc();
    for t in Tier::ALL {
        let n = d.chosen.blocks_by_tier[t as usize];
        if n > 0 {
            m.cached_blocks.with_label_values(&[&w.name, t.name()]).inc_by(n as u64);
        }
    }
    let left = d.chosen.prefill_tokens;
    m.prefill_tokens.with_label_values(&[&w.name]).inc_by(left);
    m.prefill_saved
        .with_label_values(&[&w.name])
        .inc_by((tokens as u64).saturating_sub(left));
    tracing::debug!(worker = %w.name, cached = d.chosen.cached_blocks, prefill = left, "routed");
}

fn worker_error(s: &AppState, w: &Worker, kind: &'static str, e: impl std::fmt::Display) -> ApiError {
    s.metrics.worker_errors.with_label_values(&[&w.name, kind]).inc();
    if kind == "timeout" {
        return ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            "worker_timeout",
            format!("worker {} did not answer within {:?}", w.name, s.timeout),
        );
    }
    // A transport failure: the worker is gone or broken until a health check passes.
    s.workers.set_healthy(w, false, &e.to_string());
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "server_error",
        "worker_error",
        format!("worker {} failed: {e}", w.name),
    )
}

async fn forward(
    s: &Arc<AppState>,
    api: Api,
    w: &Arc<Worker>,
    headers: &HeaderMap,
    body: Bytes,
    stream: bool,
    mut guard: LoadGuard,
) -> Result<Response, ApiError> {
    let mut b =
        hyper::Request::post(format!("{}{}", w.url, api.path())).header(header::CONTENT_TYPE, "application/json");
    for h in [header::ACCEPT, header::AUTHORIZATION] {
        if let Some(v) = headers.get(&h) {
            b = b.header(h, v);
        }
    }
    let req = b.body(Full::new(body)).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal",
            e.to_string(),
        )
    })?;
    let resp = match tokio::time::timeout(s.timeout, s.client.request(req)).await {
        Err(_) => return Err(worker_error(s, w, "timeout", "")),
        Ok(Err(e)) => {
            let kind = if e.is_connect() { "connect" } else { "body" };
            return Err(worker_error(s, w, kind, error_chain(&e)));
        }
        Ok(Ok(r)) => r,
    };
    let (parts, incoming) = resp.into_parts();
    let mut out = Response::builder().status(parts.status);
    for h in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
        if let Some(v) = parts.headers.get(&h) {
            out = out.header(h, v);
        }
    }
    out = out.header(
        "x-kvfabric-worker",
        HeaderValue::from_str(&w.name).unwrap_or(HeaderValue::from_static("?")),
    );
    let internal = |e: axum::http::Error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal",
            e.to_string(),
        )
    };
    if stream && parts.status.is_success() {
        let st = StreamState {
            body: incoming,
            guard,
            timeout: s.timeout,
            worker: w.clone(),
            app: s.clone(),
            done: false,
        };
        let body = Body::from_stream(futures::stream::unfold(st, next_chunk));
        return out.body(body).map_err(internal);
    }
    let collected = tokio::time::timeout(s.timeout, incoming.collect()).await;
    if parts.status.is_success() && matches!(collected, Ok(Ok(_))) {
        // Answered: its load ran. A refusal or a broken answer gives it back.
        guard.prefill_done();
    }
    drop(guard);
    match collected {
        Err(_) => Err(worker_error(s, w, "timeout", "")),
        Ok(Err(e)) => Err(worker_error(
            s,
            w,
            "body",
            format!("response broke off: {}", error_chain(&e)),
        )),
        Ok(Ok(c)) => out.body(Body::from(c.to_bytes())).map_err(internal),
    }
}

/// `e` and its sources, `: `-separated.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

struct StreamState {
    body: hyper::body::Incoming,
    guard: LoadGuard,
    timeout: Duration,
    worker: Arc<Worker>,
    app: Arc<AppState>,
    done: bool,
}

async fn next_chunk(mut st: StreamState) -> Option<(Result<Bytes, std::convert::Infallible>, StreamState)> {
    if st.done {
        return None;
    }
    loop {
        let err = match tokio::time::timeout(st.timeout, st.body.frame()).await {
            Ok(None) => return None,
            Ok(Some(Ok(frame))) => {
                st.guard.prefill_done();
                match frame.into_data() {
                    Ok(d) if d.is_empty() => continue,
                    Ok(d) => return Some((Ok(d), st)),
                    Err(_) => continue, // trailers
                }
            }
            Ok(Some(Err(e))) => worker_error(
                &st.app,
                &st.worker,
                "body",
                format!("stream broke off: {}", error_chain(&e)),
            ),
            Err(_) => worker_error(&st.app, &st.worker, "timeout", ""),
        };
        tracing::warn!(worker = %st.worker.name, message = %err.message, "streamed response failed");
        st.done = true;
        let ev = format!("data: {}\n\n", err.body());
        return Some((Ok(Bytes::from(ev)), st));
    }
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    let data: Vec<_> = s
        .models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "kvfabric"}))
        .collect();
    s.metrics.requests.with_label_values(&["/v1/models", "200"]).inc();
    json_response(StatusCode::OK, json!({"object": "list", "data": data}))
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    let all = s.workers.all();
    let healthy = all.iter().filter(|w| w.is_healthy()).count();
    let status = if healthy > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if healthy > 0 { "ok" } else { "no healthy worker" },
        "healthy_workers": healthy,
        "workers": all.len(),
        "registered_workers": all.iter().filter(|w| w.registered).count(),
    });
    json_response(status, body)
}

fn json_response(status: StatusCode, v: serde_json::Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let text = s.metrics.render(&s.counters, s.router.index().as_ref());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!("{} does not take {method}", uri.path()),
    )
    .into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown_url",
        format!("unknown route {}", uri.path()),
    )
    .into_response()
}
