//! The OpenAI request shapes the worker accepts and its OpenAI-style error
//! bodies (`{"error":{"message", "type", "param", "code"}}`).
//!
//! Completions: `model` (optional; when given, the served name), `prompt`
//! (a string, an array of token ids, or an array holding one of those),
//! `max_tokens` (default 16; `max_completion_tokens` is an alias),
//! `temperature` (default 0 = greedy), `seed` (default 0), `stream`,
//! `ignore_eos` (vLLM's extension). `n` other than 1, `echo`, non-empty
//! `stop` and `best_of` other than 1 are refused (400); other fields are
//! ignored. Chat completions take `messages` instead of `prompt`,
//! flattened with the router's template
//! (`<|{role}|>\n{content}\n ... <|assistant|>\n`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// Default `max_tokens`.
pub(crate) const DEFAULT_MAX_TOKENS: usize = 16;

/// An error answered to the client.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    pub(crate) kind: &'static str,
    pub(crate) param: Option<&'static str>,
    pub(crate) code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error` about `param`.
    pub(crate) fn invalid(param: Option<&'static str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    /// Any status, with a code.
    pub(crate) fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: Some(code),
        }
    }

    /// A 5xx `server_error`.
    pub(crate) fn server(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(status, "server_error", code, message)
    }

    /// Sets the code.
    pub(crate) fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    /// Sets the param.
    pub(crate) fn with_param(mut self, param: &'static str) -> ApiError {
        self.param = Some(param);
        self
    }

    /// The JSON error object.
    pub(crate) fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body().to_string();
        (
            self.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}

/// A prompt before tokenising.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Prompt {
    /// Text (a completion prompt or a flattened chat).
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// Which endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    Completions,
    Chat,
}

impl Api {
    pub(crate) fn path(self) -> &'static str {
        match self {
            Api::Completions => "/v1/completions",
            Api::Chat => "/v1/chat/completions",
        }
    }
}

/// A parsed completion or chat request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GenerateRequest {
    pub(crate) model: Option<String>,
    pub(crate) prompt: Prompt,
    pub(crate) max_tokens: usize,
    pub(crate) temperature: f32,
    pub(crate) seed: u64,
    pub(crate) stream: bool,
    pub(crate) ignore_eos: bool,
}

/// A parsed `/v1/prefill` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PrefillRequest {
    pub(crate) prompt: Vec<u32>,
    pub(crate) namespace: Option<String>,
}

fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            None,
            format!("We could not parse the JSON body of your request ({e}). Send a JSON object."),
        )
    })?;
    match v {
        Value::Object(o) => Ok(o),
        _ => Err(ApiError::invalid(None, "the request body must be a JSON object")),
    }
}

fn present<'a>(o: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    o.get(key).filter(|v| !v.is_null())
}

fn token_ids(a: &[Value]) -> Option<Vec<u32>> {
    a.iter()
        .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
        .collect()
}

/// Parses a request body of `api`.
pub(crate) fn parse_generate(api: Api, body: &[u8]) -> Result<GenerateRequest, ApiError> {
    let o = object(body)?;
    let model = match present(&o, "model") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::invalid(Some("model"), "'model' must be a string")),
    };
    let flag = |key: &'static str| match present(&o, key) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::invalid(Some(key), format!("'{key}' must be a boolean"))),
    };
    let stream = flag("stream")?;
    let ignore_eos = flag("ignore_eos")?;
    if flag("echo")? {
        return Err(ApiError::invalid(
            Some("echo"),
            "'echo' is not supported by this worker",
        ));
    }
    for key in ["n", "best_of"] {
        if let Some(v) = present(&o, key)
            && v.as_u64() != Some(1)
        {
            return Err(ApiError::invalid(
                Some(if key == "n" { "n" } else { "best_of" }),
                format!("'{key}' must be 1: this worker returns one choice per request"),
            ));
        }
    }
    match present(&o, "stop") {
        None => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(_) => {
            return Err(ApiError::invalid(
                Some("stop"),
                "stop sequences are not supported by this worker",
            ));
        }
    }
    let mut max_tokens = DEFAULT_MAX_TOKENS;
    for key in ["max_tokens", "max_completion_tokens"] {
        if let Some(v) = present(&o, key) {
            max_tokens = v
                .as_u64()
                .filter(|&n| n >= 1)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    ApiError::invalid(
                        Some(if key == "max_tokens" {
                            "max_tokens"
                        } else {
                            "max_completion_tokens"
                        }),
                        format!("'{key}' must be a positive integer"),
                    )
                })?;
            break;
        }
    }
    let temperature = match present(&o, "temperature") {
        None => 0.0,
        Some(v) => match v.as_f64() {
            Some(t) if t.is_finite() && (0.0..=100.0).contains(&t) => t as f32,
            _ => {
                return Err(ApiError::invalid(
                    Some("temperature"),
                    "'temperature' must be a number from 0 to 100",
                ));
            }
        },
    };
    let seed = match present(&o, "seed") {
        None => 0,
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_i64().map(|i| i as u64))
            .ok_or_else(|| ApiError::invalid(Some("seed"), "'seed' must be an integer"))?,
    };
    let prompt = match api {
        Api::Completions => completion_prompt(&o)?,
        Api::Chat => Prompt::Text(chat_prompt(&o)?),
    };
    Ok(GenerateRequest {
        model,
        prompt,
        max_tokens,
        temperature,
        seed,
        stream,
        ignore_eos,
    })
}

fn completion_prompt(o: &Map<String, Value>) -> Result<Prompt, ApiError> {
    let bad = || {
        ApiError::invalid(
            Some("prompt"),
            "'prompt' must be a string, an array of token ids, or an array holding one of those",
        )
    };
    let one = |v: &Value| match v {
        Value::String(s) => Ok(Prompt::Text(s.clone())),
        Value::Array(a) => token_ids(a).map(Prompt::Tokens).ok_or_else(bad),
        _ => Err(bad()),
    };
    match present(o, "prompt") {
        None => Err(ApiError::invalid(Some("prompt"), "you must provide a 'prompt'")),
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(a)) if a.is_empty() => Err(ApiError::invalid(Some("prompt"), "'prompt' must not be empty")),
        Some(Value::Array(a)) => match &a[0] {
            Value::Number(_) => token_ids(a).map(Prompt::Tokens).ok_or_else(bad),
            Value::String(_) | Value::Array(_) if a.len() == 1 => one(&a[0]),
            Value::String(_) | Value::Array(_) => Err(ApiError::invalid(
                Some("prompt"),
                format!(
                    "'prompt' holds {} prompts; this worker serves one prompt per request",
                    a.len()
                ),
            )),
            _ => Err(bad()),
        },
        Some(_) => Err(bad()),
    }
}

/// The chat template (the router's, so both see the same tokens).
pub(crate) fn chat_text<'a>(messages: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut s = String::new();
    for (role, content) in messages {
        s.push_str("<|");
        s.push_str(role);
        s.push_str("|>\n");
        s.push_str(content);
        s.push('\n');
    }
    s.push_str("<|assistant|>\n");
    s
}

fn chat_prompt(o: &Map<String, Value>) -> Result<String, ApiError> {
    let msgs = match present(o, "messages") {
        None => return Err(ApiError::invalid(Some("messages"), "you must provide 'messages'")),
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err(ApiError::invalid(Some("messages"), "'messages' must not be empty")),
        Some(_) => return Err(ApiError::invalid(Some("messages"), "'messages' must be an array")),
    };
    let mut pairs: Vec<(String, String)> = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid(Some("messages"), format!("messages[{i}] needs a string 'role'")))?;
        let content = match m.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut s = String::new();
                for p in parts {
                    if let Some(t) = p.get("text").and_then(Value::as_str) {
                        s.push_str(t);
                    } else if !p.is_object() {
                        return Err(ApiError::invalid(
                            Some("messages"),
                            format!("messages[{i}].content parts must be objects"),
                        ));
                    }
                }
                s
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    Some("messages"),
                    format!("messages[{i}].content must be a string or an array of parts"),
                ));
            }
        };
        pairs.push((role.to_string(), content));
    }
    Ok(chat_text(pairs.iter().map(|(r, c)| (r.as_str(), c.as_str()))))
}

/// Parses a `/v1/prefill` body: `{"prompt": [ids], "namespace": "..."}`.
pub(crate) fn parse_prefill(body: &[u8]) -> Result<PrefillRequest, ApiError> {
    let o = object(body)?;
    let prompt = match present(&o, "prompt") {
        Some(Value::Array(a)) => {
            token_ids(a).ok_or_else(|| ApiError::invalid(Some("prompt"), "'prompt' must be an array of token ids"))?
        }
        None => return Err(ApiError::invalid(Some("prompt"), "you must provide a 'prompt'")),
        Some(_) => {
            return Err(ApiError::invalid(
                Some("prompt"),
                "'prompt' must be an array of token ids",
            ));
        }
    };
    let namespace = match present(&o, "namespace") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::invalid(Some("namespace"), "'namespace' must be a string")),
    };
    Ok(PrefillRequest { prompt, namespace })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_of_every_shape() {
        let p = parse_generate(
            Api::Completions,
            br#"{"model":"m","prompt":"hi","max_tokens":3,"stream":true,"temperature":0.5,"seed":7}"#,
        )
        .unwrap();
        assert_eq!(p.prompt, Prompt::Text("hi".into()));
        assert_eq!((p.max_tokens, p.stream, p.seed), (3, true, 7));
        assert_eq!(p.temperature, 0.5);
        let p = parse_generate(Api::Completions, br#"{"prompt":[1,2,3]}"#).unwrap();
        assert_eq!(p.prompt, Prompt::Tokens(vec![1, 2, 3]));
        assert_eq!((p.max_tokens, p.temperature), (DEFAULT_MAX_TOKENS, 0.0));
        let p = parse_generate(Api::Completions, br#"{"prompt":[[4,5]]}"#).unwrap();
        assert_eq!(p.prompt, Prompt::Tokens(vec![4, 5]));
        let p = parse_generate(Api::Completions, br#"{"prompt":["a"],"n":1,"stop":[]}"#).unwrap();
        assert_eq!(p.prompt, Prompt::Text("a".into()));
        let p = parse_generate(
            Api::Chat,
            br#"{"messages":[{"role":"user","content":[{"type":"text","text":"x"}]}],"max_completion_tokens":2}"#,
        )
        .unwrap();
        assert_eq!(p.prompt, Prompt::Text("<|user|>\nx\n<|assistant|>\n".into()));
        assert_eq!(p.max_tokens, 2);
        let p = parse_prefill(br#"{"prompt":[1,2],"namespace":"ns"}"#).unwrap();
        assert_eq!((p.prompt, p.namespace.as_deref()), (vec![1, 2], Some("ns")));
    }

    #[test]
    fn bad_requests_name_the_param() {
        for (api, body, param) in [
            (Api::Completions, &b"{"[..], None),
            (Api::Completions, b"[1]", None),
            (Api::Completions, b"{}", Some("prompt")),
            (Api::Completions, br#"{"prompt":5}"#, Some("prompt")),
            (Api::Completions, br#"{"prompt":[1,-2]}"#, Some("prompt")),
            (Api::Completions, br#"{"prompt":[1,4294967296]}"#, Some("prompt")),
            (Api::Completions, br#"{"prompt":[]}"#, Some("prompt")),
            (Api::Completions, br#"{"prompt":["a","b"]}"#, Some("prompt")),
            (Api::Completions, br#"{"prompt":"x","model":3}"#, Some("model")),
            (Api::Completions, br#"{"prompt":"x","stream":"yes"}"#, Some("stream")),
            (
                Api::Completions,
                br#"{"prompt":"x","max_tokens":0}"#,
                Some("max_tokens"),
            ),
            (
                Api::Completions,
                br#"{"prompt":"x","max_tokens":-1}"#,
                Some("max_tokens"),
            ),
            (
                Api::Completions,
                br#"{"prompt":"x","temperature":-1}"#,
                Some("temperature"),
            ),
            (Api::Completions, br#"{"prompt":"x","n":2}"#, Some("n")),
            (Api::Completions, br#"{"prompt":"x","stop":["\n"]}"#, Some("stop")),
            (Api::Completions, br#"{"prompt":"x","seed":"s"}"#, Some("seed")),
            (Api::Chat, br#"{"messages":"hi"}"#, Some("messages")),
            (Api::Chat, br#"{"messages":[{"content":"hi"}]}"#, Some("messages")),
            (Api::Chat, br#"{}"#, Some("messages")),
        ] {
            let e = parse_generate(api, body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.param, param, "{}", String::from_utf8_lossy(body));
            assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        }
        assert!(parse_prefill(br#"{"prompt":"text"}"#).is_err());
        assert!(parse_prefill(br#"{"prompt":[1],"namespace":1}"#).is_err());
    }
}
