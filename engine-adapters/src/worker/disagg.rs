//! Conditional disaggregation, the decode worker's side: once a request's
//! uncached part is long enough (the caller checks
//! `disagg-min-uncached-tokens`), ask every prefill worker's `/health` for
//! its queue depth (within `prefill-health-timeout-ms`), pick the least
//! loaded, and if its queue is below `disagg-max-prefill-queue` have it
//! prefill the prompt (`POST /v1/prefill`, within `prefill-timeout-ms`).
//! Its blocks then come through the fabric.
//!
//! Outcomes: [`PrefillPlace::Remote`] on success; [`PrefillPlace::Local`]
//! when every reachable prefill worker's queue is too long (a decision, not
//! a failure); [`PrefillPlace::RemoteFailedLocal`] when no prefill worker
//! answered its health check, or the chosen one failed, timed out or
//! answered an error: the request is prefilled here and still answered.

use std::time::Duration;

use axum::http::header;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use super::pipeline::{AppState, HttpClient, PrefillPlace};

/// GET `url` within `timeout`: (status, body).
async fn call(
    client: &HttpClient,
    req: hyper::Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<(hyper::StatusCode, Bytes), String> {
    let fut = async {
        let r = client.request(req).await.map_err(|e| e.to_string())?;
        let status = r.status();
        let body = r.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<_, String>((status, body))
    };
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => Err(format!("no answer within {timeout:?}")),
        Ok(r) => r,
    }
}

/// A prefill worker's queue depth from its `/health`.
async fn queue_depth(client: &HttpClient, url: &str, timeout: Duration) -> Result<u64, String> {
    let req = hyper::Request::get(format!("{url}/health"))
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let (status, body) = call(client, req, timeout).await?;
    if !status.is_success() {
        return Err(format!("health check returned {status}"));
    }
    let v: Value = serde_json::from_slice(&body).map_err(|e| format!("health body: {e}"))?;
    v.get("queue_depth")
        .and_then(Value::as_u64)
        .ok_or_else(|| "health body has no queue_depth".to_string())
}

/// Asks `url` to prefill `tokens`; the number of block keys it answered.
async fn prefill(
    client: &HttpClient,
    url: &str,
    tokens: &[u32],
    namespace: &str,
    timeout: Duration,
) -> Result<usize, String> {
    let body = json!({"prompt": tokens, "namespace": namespace}).to_string();
    let req = hyper::Request::post(format!("{url}/v1/prefill"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let (status, body) = call(client, req, timeout).await?;
    if !status.is_success() {
        let msg = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
        return Err(format!("answered {status}: {msg}"));
    }
    let v: Value = serde_json::from_slice(&body).map_err(|e| format!("prefill body: {e}"))?;
    v.get("block_keys")
        .and_then(Value::as_array)
        .map(Vec::len)
        .ok_or_else(|| "prefill answer has no block_keys".to_string())
}

/// Runs the decision and the remote prefill (see the module doc).
pub(crate) async fn remote_prefill(state: &AppState, tokens: &[u32]) -> PrefillPlace {
    let s = &state.settings;
    let m = &state.metrics;
    let health_timeout = Duration::from_millis(s.prefill_health_timeout_ms);
    let urls: Vec<&str> = s.prefill_workers.iter().map(|u| u.trim_end_matches('/')).collect();
    let depths = futures::future::join_all(urls.iter().map(|u| queue_depth(&state.client, u, health_timeout))).await;
    let mut best: Option<(&str, u64)> = None;
    let mut errors = Vec::new();
    for (u, d) in urls.iter().zip(depths) {
        match d {
            Ok(d) if best.is_none_or(|(_, b)| d < b) => best = Some((u, d)),
            Ok(_) => {}
            Err(e) => errors.push(format!("{u}: {e}")),
        }
    }
    let Some((url, depth)) = best else {
        m.remote_prefill.with_label_values(&["attempted"]).inc();
        m.remote_prefill.with_label_values(&["fell_back"]).inc();
        tracing::warn!(errors = ?errors, "no prefill worker reachable: prefilling locally");
        return PrefillPlace::RemoteFailedLocal;
    };
    if depth >= s.disagg_max_prefill_queue as u64 {
        tracing::debug!(url, depth, "prefill queue too long: prefilling locally");
        return PrefillPlace::Local;
    }
    m.remote_prefill.with_label_values(&["attempted"]).inc();
    let timeout = Duration::from_millis(s.prefill_timeout_ms);
    match prefill(&state.client, url, tokens, &s.namespace, timeout).await {
        Ok(blocks) => {
            m.remote_prefill.with_label_values(&["succeeded"]).inc();
            tracing::debug!(url, blocks, "prefilled remotely");
            PrefillPlace::Remote
        }
        Err(e) => {
            m.remote_prefill.with_label_values(&["fell_back"]).inc();
            tracing::warn!(url, error = %e, "remote prefill failed: prefilling locally");
            PrefillPlace::RemoteFailedLocal
        }
    }
}
