//! The worker's HTTP API (axum):
//!
//! - `POST /v1/completions`, `POST /v1/chat/completions`: OpenAI-shaped
//!   (see [`super::openai`] for the request), answered whole or, with
//!   `"stream": true`, as SSE `data: {...}` chunks (one per token) and
//!   `data: [DONE]`. Every choice carries `token_ids` (the generated ids);
//!   the response (the last chunk when streaming) carries `usage` with
//!   `prompt_tokens_details.cached_tokens` and a `kvfabric` object
//!   `{computed_tokens, own_pool_tokens, fabric_tokens, prefill}`.
//! - `POST /v1/prefill` (internal, for decode workers): `{prompt: [ids],
//!   namespace?}` -> `{block_keys: [hex...], cached_tokens,
//!   computed_tokens, own_pool_tokens, fabric_tokens, stored_blocks}`
//!   after every full block of the prompt is in the fabric; 503 when the
//!   worker has no fabric, cannot reach it or the store fails.
//! - `GET /v1/models`, `GET /health` (200, `{status, role, model,
//!   queue_depth, running, free_blocks, cached_blocks}`), `GET /metrics`.
//!
//! Bad input is a 4xx with an OpenAI error body: malformed JSON, missing or
//! mistyped fields (400), an unknown model (404), an empty prompt, token ids
//! outside the vocabulary, a prompt plus `max_tokens` over the model's
//! context or the pool (400), a body slower than `body-timeout-ms` (408), a
//! body over `max-body-size` (413). A full
//! waiting queue or pool is 503.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use super::openai::{self, Api, ApiError, GenerateRequest, Prompt};
use super::pipeline::{self, AppState, GenRequest, Generation, Step, Summary};
use super::scheduler::max_blocks;
use crate::engine::{Sampling, encode};

/// The axum app.
pub(crate) fn app(state: Arc<AppState>) -> axum::Router {
    axum::Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/prefill", post(prefill))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

fn count(s: &AppState, endpoint: &str, status: StatusCode) {
    s.metrics.requests.with_label_values(&[endpoint, status.as_str()]).inc();
}

async fn completions(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    generate(s, Api::Completions, headers, body).await
}

async fn chat(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    generate(s, Api::Chat, headers, body).await
}

async fn generate(s: Arc<AppState>, api: Api, headers: HeaderMap, body: Body) -> Response {
    let t0 = Instant::now();
    let r = match run_generate(&s, api, &headers, body, t0).await {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(route = api.path(), status = %e.status, message = %e.message, "request failed");
            }
            e.into_response()
        }
    };
    count(&s, api.path(), r.status());
    r
}

/// How much of an oversized body the worker still reads (and discards)
/// before it answers 413, so that a client still writing its body reads the
/// answer instead of a reset connection. Past this (or [`DRAIN_TIME`]) the
/// connection is closed.
const DRAIN_BYTES: u64 = 16 << 20;
/// How long the worker keeps draining an oversized body.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads a request body of at most `max` bytes that must arrive within
/// `timeout` (else 408).
async fn read_body(max: usize, timeout: Duration, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body exceeds the worker's limit of {max} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = body;
    let mut buf = bytes::BytesMut::new();
    let mut over = declared.is_some_and(|n| n > max as u64);
    let mut seen = 0u64;
    let deadline = tokio::time::Instant::now() + DRAIN_TIME;
    let body_deadline = tokio::time::Instant::now() + timeout;
    loop {
        let frame = if over {
            // Discard mode: bounded in bytes and time.
            if seen > max as u64 + DRAIN_BYTES {
                break;
            }
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(f) => f,
                Err(_) => break,
            }
        } else {
            match tokio::time::timeout_at(body_deadline, body.frame()).await {
                Ok(f) => f,
                Err(_) => {
                    return Err(ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "invalid_request_error",
                        "request_timeout",
                        format!(
                            "the request body did not arrive within the worker's body-timeout-ms ({} ms)",
                            timeout.as_millis()
                        ),
                    ));
                }
            }
        };
        match frame {
            None => break,
            Some(Err(e)) if over => {
                tracing::debug!(error = %e, "oversized request body ended early");
                break;
            }
            Some(Err(e)) => {
                return Err(ApiError::invalid(None, format!("could not read the request body: {e}")));
            }
            Some(Ok(f)) => {
                let Ok(data) = f.into_data() else { continue };
                seen += data.len() as u64;
                if !over && buf.len() + data.len() > max {
                    over = true;
                    buf = bytes::BytesMut::new();
                }
                if !over {
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
    if over { Err(too_large()) } else { Ok(buf.freeze()) }
}

fn body_timeout(s: &AppState) -> Duration {
    Duration::from_millis(s.settings.body_timeout_ms)
}

/// Checks a prompt against the model and the pool.
fn check_prompt(s: &AppState, tokens: &[u32], max_tokens: usize) -> Result<(), ApiError> {
    let m = &s.model;
    if tokens.is_empty() {
        return Err(ApiError::invalid(Some("prompt"), "the prompt is empty"));
    }
    if let Some((i, t)) = tokens.iter().enumerate().find(|(_, t)| **t as usize >= m.vocab_size) {
        return Err(ApiError::invalid(
            Some("prompt"),
            format!(
                "token id {t} at position {i} is outside the model's vocabulary of {} ids",
                m.vocab_size
            ),
        ));
    }
    if max_tokens > s.settings.max_tokens_limit {
        return Err(ApiError::invalid(
            Some("max_tokens"),
            format!(
                "max_tokens is {max_tokens}; this worker allows at most {}",
                s.settings.max_tokens_limit
            ),
        ));
    }
    let total = tokens.len() + max_tokens;
    if total > m.max_context {
        return Err(ApiError::invalid(
            Some("prompt"),
            format!(
                "This model's maximum context length is {} tokens. However, you requested {total} tokens ({} in the prompt, {max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                m.max_context,
                tokens.len()
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let blocks = max_blocks(tokens.len(), max_tokens, m.max_context, m.tokens_per_block);
    if blocks > s.pool_capacity {
        return Err(ApiError::invalid(
            Some("prompt"),
            format!(
                "the request needs {blocks} KV blocks; this worker's pool holds {}",
                s.pool_capacity
            ),
        ));
    }
    Ok(())
}

fn check_model(s: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != s.model_name => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("the model '{m}' does not exist; this worker serves '{}'", s.model_name),
        )
        .with_param("model")),
        _ => Ok(()),
    }
}

async fn run_generate(
    s: &Arc<AppState>,
    api: Api,
    headers: &HeaderMap,
    body: Body,
    t0: Instant,
) -> Result<Response, ApiError> {
    let body = read_body(s.settings.max_body_size.0 as usize, body_timeout(s), headers, body).await?;
    let req: GenerateRequest = openai::parse_generate(api, &body)?;
    check_model(s, req.model.as_deref())?;
    let tokens = match &req.prompt {
        Prompt::Text(t) if t.is_empty() => return Err(ApiError::invalid(Some("prompt"), "the prompt is empty")),
        Prompt::Text(t) => encode(t, s.settings.add_bos),
        Prompt::Tokens(ids) => ids.clone(),
    };
    check_prompt(s, &tokens, req.max_tokens)?;
    let sampling = if req.temperature == 0.0 {
        Sampling::Greedy
    } else {
        Sampling::Temperature {
            temperature: req.temperature,
            seed: req.seed,
        }
    };
    let generation = pipeline::start(
        s,
        GenRequest {
            tokens,
            max_tokens: req.max_tokens,
            sampling,
            ignore_eos: req.ignore_eos,
        },
        t0,
    )
    .await?;
    let id = s.request_id(match api {
        Api::Completions => "cmpl",
        Api::Chat => "chatcmpl",
    });
    let created = s.clock.now_secs() as u64;
    let rendering = Render {
        api,
        id,
        created,
        model: s.model_name.clone(),
    };
    if req.stream {
        let st = Sse {
            generation,
            render: rendering,
            text: Utf8Stream::default(),
            state: s.clone(),
            t0,
            phase: Phase::Tokens,
        };
        let body = Body::from_stream(futures::stream::unfold(st, Sse::next));
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(body)
            .map_err(|e| ApiError::server(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()));
    }
    let mut generation = generation;
    let mut ids = Vec::new();
    let summary = loop {
        match generation.next().await? {
            Step::Token(t) => ids.push(t),
            Step::Done(sum) => break sum,
        }
    };
    s.metrics.request_seconds.observe(t0.elapsed().as_secs_f64());
    let text = crate::engine::decode(&ids);
    Ok(json_response(StatusCode::OK, rendering.whole(&text, &ids, &summary)))
}

/// How responses of one request look.
#[derive(Debug)]
struct Render {
    api: Api,
    id: String,
    created: u64,
    model: String,
}

impl Render {
    fn whole(&self, text: &str, ids: &[u32], sum: &Summary) -> Value {
        let (object, choice) = match self.api {
            Api::Completions => (
                "text_completion",
                json!({"index": 0, "text": text, "logprobs": null,
                       "finish_reason": sum.finish_reason(), "token_ids": ids}),
            ),
            Api::Chat => (
                "chat.completion",
                json!({"index": 0, "message": {"role": "assistant", "content": text},
                       "logprobs": null, "finish_reason": sum.finish_reason(), "token_ids": ids}),
            ),
        };
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [choice], "usage": sum.usage(), "kvfabric": sum.extension(),
        })
    }

    fn chunk(&self, text: &str, ids: &[u32], finish: Option<&Summary>) -> Value {
        let reason = finish.map(Summary::finish_reason);
        let (object, choice) = match self.api {
            Api::Completions => (
                "text_completion",
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": reason, "token_ids": ids}),
            ),
            Api::Chat => (
                "chat.completion.chunk",
                json!({"index": 0, "delta": if text.is_empty() && finish.is_some() { json!({}) } else { json!({"content": text}) },
                       "logprobs": null, "finish_reason": reason, "token_ids": ids}),
            ),
        };
        let mut v = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [choice],
        });
        if let Some(sum) = finish {
            v["usage"] = sum.usage();
            v["kvfabric"] = sum.extension();
        }
        v
    }
}

/// Turns byte tokens into text a piece at a time without splitting UTF-8
/// characters (special tokens contribute nothing).
#[derive(Debug, Default)]
struct Utf8Stream {
    buf: Vec<u8>,
}

impl Utf8Stream {
    fn push(&mut self, token: u32) -> String {
        if let Ok(b) = u8::try_from(token) {
            self.buf.push(b);
        }
        match std::str::from_utf8(&self.buf) {
            Ok(s) => {
                let out = s.to_owned();
                self.buf.clear();
                out
            }
            Err(e) if e.error_len().is_none() => {
                // An incomplete character at the end: keep it for later.
                let n = e.valid_up_to();
                let out = String::from_utf8_lossy(&self.buf[..n]).into_owned();
                self.buf.drain(..n);
                out
            }
            Err(_) => {
                let out = String::from_utf8_lossy(&self.buf).into_owned();
                self.buf.clear();
                out
            }
        }
    }

    fn flush(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.buf).into_owned();
        self.buf.clear();
        out
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    Tokens,
    Done,
    Ended,
}

#[derive(Debug)]
struct Sse {
    generation: Generation,
    render: Render,
    text: Utf8Stream,
    state: Arc<AppState>,
    t0: Instant,
    phase: Phase,
}

fn event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

impl Sse {
    async fn next(mut self) -> Option<(Result<Bytes, Infallible>, Sse)> {
        match self.phase {
            Phase::Ended => None,
            Phase::Done => {
                self.phase = Phase::Ended;
                Some((Ok(Bytes::from_static(b"data: [DONE]\n\n")), self))
            }
            Phase::Tokens => {
                let ev = match self.generation.next().await {
                    Ok(Step::Token(t)) => {
                        let piece = self.text.push(t);
                        event(&self.render.chunk(&piece, &[t], None))
                    }
                    Ok(Step::Done(sum)) => {
                        self.phase = Phase::Done;
                        self.state
                            .metrics
                            .request_seconds
                            .observe(self.t0.elapsed().as_secs_f64());
                        let rest = self.text.flush();
                        event(&self.render.chunk(&rest, &[], Some(&sum)))
                    }
                    Err(e) => {
                        tracing::warn!(message = %e.message, "streamed request failed");
                        self.phase = Phase::Ended;
                        event(&e.body())
                    }
                };
                Some((Ok(ev), self))
            }
        }
    }
}

async fn prefill(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let t0 = Instant::now();
    let r = match run_prefill(&s, &headers, body, t0).await {
        Ok(v) => json_response(StatusCode::OK, v),
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(status = %e.status, message = %e.message, "prefill request failed");
            }
            e.into_response()
        }
    };
    count(&s, "/v1/prefill", r.status());
    r
}

async fn run_prefill(s: &Arc<AppState>, headers: &HeaderMap, body: Body, t0: Instant) -> Result<Value, ApiError> {
    let body = read_body(s.settings.max_body_size.0 as usize, body_timeout(s), headers, body).await?;
    let req = openai::parse_prefill(&body)?;
    if let Some(ns) = &req.namespace
        && *ns != s.settings.namespace
    {
        return Err(ApiError::invalid(
            Some("namespace"),
            format!(
                "this worker stores blocks in namespace '{}', not '{ns}'",
                s.settings.namespace
            ),
        ));
    }
    check_prompt(s, &req.prompt, 0)?;
    if s.fabric.is_none() {
        return Err(ApiError::server(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_fabric",
            "this worker has no fabric to put prefilled blocks into",
        ));
    }
    let mut generation = pipeline::start(
        s,
        GenRequest {
            tokens: req.prompt.clone(),
            max_tokens: 0,
            sampling: Sampling::Greedy,
            ignore_eos: false,
        },
        t0,
    )
    .await?;
    let sum = loop {
        if let Step::Done(sum) = generation.next().await? {
            break sum;
        }
    };
    if let Some(e) = &sum.store_error {
        return Err(ApiError::server(
            StatusCode::SERVICE_UNAVAILABLE,
            "fabric_store_failed",
            format!("storing the prefilled blocks in the fabric failed: {e}"),
        ));
    }
    s.metrics.request_seconds.observe(t0.elapsed().as_secs_f64());
    let full = req.prompt.len() / s.model.tokens_per_block;
    let keys: Vec<String> = s.keys(&req.prompt)[..full].iter().map(hex::encode).collect();
    Ok(json!({
        "block_keys": keys,
        "cached_tokens": sum.own_pool_tokens + sum.fabric_tokens,
        "computed_tokens": sum.computed_tokens,
        "own_pool_tokens": sum.own_pool_tokens,
        "fabric_tokens": sum.fabric_tokens,
        "stored_blocks": sum.stored_blocks,
    }))
}

fn json_response(status: StatusCode, v: Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    count(&s, "/v1/models", StatusCode::OK);
    json_response(
        StatusCode::OK,
        json!({"object": "list", "data": [{
            "id": s.model_name, "object": "model", "created": 0, "owned_by": "kvfabric",
            "max_model_len": s.model.max_context,
        }]}),
    )
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    let st = s.metrics.stats();
    json_response(
        StatusCode::OK,
        json!({
            "status": "ok",
            "role": s.settings.role.as_str(),
            "model": s.model_name,
            "queue_depth": st.queue_depth,
            "running": st.running,
            "free_blocks": st.free_blocks,
            "cached_blocks": st.cached_blocks,
        }),
    )
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    if let Some(kv) = s.fabric.as_ref().and_then(|f| f.connected()) {
        s.metrics.mirror_fabric(kv.counters());
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_pieces_never_split_a_character() {
        let mut u = Utf8Stream::default();
        let text = "aé✓";
        let mut out = String::new();
        let mut pieces = Vec::new();
        for b in text.bytes() {
            let p = u.push(u32::from(b));
            out.push_str(&p);
            pieces.push(p);
        }
        out.push_str(&u.flush());
        assert_eq!(out, text);
        assert_eq!(pieces, vec!["a", "", "é", "", "", "✓"]);
        assert_eq!(u.push(257), "");
        assert_eq!(u.push(0xff), "\u{fffd}");
    }
}
