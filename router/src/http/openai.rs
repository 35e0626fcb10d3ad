//! The OpenAI request shapes the router reads (only what routing needs;
//! the worker gets the original body) and OpenAI-style error bodies:
//! `{"error":{"message", "type", "param", "code"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// Decode load assumed for a request without `max_tokens`.
pub(crate) const DEFAULT_MAX_TOKENS: u64 = 256;

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

/// The prompt of a request, before tokenising.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Prompt {
    /// Text (completion prompt, or a chat flattened by the template).
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
}

/// What routing needs from a request.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub(crate) model: Option<String>,
    /// The prompt routed on (the first of a batch).
    pub(crate) prompt: Prompt,
    /// Prompts in the request (a batch of n costs n times the load).
    pub(crate) batch: u64,
    pub(crate) max_tokens: u64,
    pub(crate) stream: bool,
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

fn token_ids(a: &[Value]) -> Option<Vec<u32>> {
    a.iter()
        .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
        .collect()
}

/// Parses a request body of `api`.
pub(crate) fn parse(api: Api, body: &[u8]) -> Result<Parsed, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(
            None,
            format!("We could not parse the JSON body of your request ({e}). Send a JSON object."),
        )
    })?;
    let Value::Object(o) = v else {
        return Err(ApiError::invalid(None, "the request body must be a JSON object"));
    };
    let model = match o.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::invalid(Some("model"), "'model' must be a string")),
    };
    let stream = match o.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid(Some("stream"), "'stream' must be a boolean")),
    };
    let max_tokens = max_tokens(&o)?;
    let (prompt, batch) = match api {
        Api::Completions => completion_prompt(&o)?,
        Api::Chat => (Prompt::Text(chat_prompt(&o)?), 1),
    };
    Ok(Parsed {
        model,
        prompt,
        batch,
        max_tokens,
        stream,
    })
}

/// Largest `max_tokens` accepted: no model has a longer context, and the
/// router's load arithmetic stays far from overflow.
const MAX_MAX_TOKENS: u64 = u32::MAX as u64;

fn max_tokens(o: &Map<String, Value>) -> Result<u64, ApiError> {
    for (key, param) in [
        ("max_tokens", "max_tokens"),
        ("max_completion_tokens", "max_completion_tokens"),
    ] {
        match o.get(key) {
            None | Some(Value::Null) => {}
            Some(v) => {
                let n = v
                    .as_u64()
                    .ok_or_else(|| ApiError::invalid(Some(param), format!("'{key}' must be a non-negative integer")))?;
                if n > MAX_MAX_TOKENS {
                    return Err(ApiError::invalid(
                        Some(param),
                        format!("'{key}' is {n}; the largest accepted is {MAX_MAX_TOKENS}"),
                    ));
                }
                return Ok(n);
            }
        }
    }
    Ok(DEFAULT_MAX_TOKENS)
}

fn completion_prompt(o: &Map<String, Value>) -> Result<(Prompt, u64), ApiError> {
    let bad = || {
        ApiError::invalid(
            Some("prompt"),
            "'prompt' must be a string, an array of strings, an array of token ids or an array of token-id arrays",
        )
    };
    match o.get("prompt") {
        None | Some(Value::Null) => Err(ApiError::invalid(Some("prompt"), "you must provide a 'prompt'")),
        Some(Value::String(s)) => Ok((Prompt::Text(s.clone()), 1)),
        Some(Value::Array(a)) if a.is_empty() => Err(ApiError::invalid(Some("prompt"), "'prompt' must not be empty")),
        Some(Value::Array(a)) => match &a[0] {
            Value::String(_) => {
                let texts: Option<Vec<&str>> = a.iter().map(Value::as_str).collect();
                let texts = texts.ok_or_else(bad)?;
                Ok((Prompt::Text(texts[0].to_string()), texts.len() as u64))
            }
            Value::Number(_) => Ok((Prompt::Tokens(token_ids(a).ok_or_else(bad)?), 1)),
            Value::Array(_) => {
                let mut first = None;
                for p in a {
                    let ids = p.as_array().and_then(|p| token_ids(p)).ok_or_else(bad)?;
                    first.get_or_insert(ids);
                }
                Ok((Prompt::Tokens(first.unwrap_or_default()), a.len() as u64))
            }
            _ => Err(bad()),
        },
        Some(_) => Err(bad()),
    }
}

fn chat_prompt(o: &Map<String, Value>) -> Result<String, ApiError> {
    let msgs = match o.get("messages") {
        None | Some(Value::Null) => return Err(ApiError::invalid(Some("messages"), "you must provide 'messages'")),
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
    Ok(crate::tokenize::chat_text(
        pairs.iter().map(|(r, c)| (r.as_str(), c.as_str())),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_of_every_shape() {
        let p = parse(
            Api::Completions,
            br#"{"model":"m","prompt":"hi","max_tokens":3,"stream":true}"#,
        )
        .unwrap();
        assert_eq!(
            (p.prompt, p.max_tokens, p.stream, p.model.as_deref()),
            (Prompt::Text("hi".into()), 3, true, Some("m"))
        );
        let p = parse(Api::Completions, br#"{"prompt":[1,2,3]}"#).unwrap();
        assert_eq!(
            (p.prompt, p.batch, p.max_tokens),
            (Prompt::Tokens(vec![1, 2, 3]), 1, DEFAULT_MAX_TOKENS)
        );
        let p = parse(Api::Completions, br#"{"prompt":[[4,5],[6]]}"#).unwrap();
        assert_eq!((p.prompt, p.batch), (Prompt::Tokens(vec![4, 5]), 2));
        let p = parse(Api::Completions, br#"{"prompt":["a","b"]}"#).unwrap();
        assert_eq!((p.prompt, p.batch), (Prompt::Text("a".into()), 2));
        let p = parse(
            Api::Chat,
            br#"{"messages":[{"role":"user","content":[{"type":"text","text":"x"}]}]}"#,
        )
        .unwrap();
        assert_eq!(p.prompt, Prompt::Text("<|user|>\nx\n<|assistant|>\n".into()));
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
            (Api::Completions, br#"{"prompt":"x","model":3}"#, Some("model")),
            (Api::Completions, br#"{"prompt":"x","stream":"yes"}"#, Some("stream")),
            (
                Api::Completions,
                br#"{"prompt":"x","max_tokens":-1}"#,
                Some("max_tokens"),
            ),
            (
                Api::Completions,
                br#"{"prompt":"x","max_tokens":18446744073709551600}"#,
                Some("max_tokens"),
            ),
            (
                Api::Chat,
                br#"{"messages":[{"role":"user","content":"x"}],"max_completion_tokens":4294967296}"#,
                Some("max_completion_tokens"),
            ),
            (Api::Chat, br#"{"messages":"hi"}"#, Some("messages")),
            (Api::Chat, br#"{"messages":[{"content":"hi"}]}"#, Some("messages")),
            (Api::Chat, br#"{}"#, Some("messages")),
        ] {
            let e = parse(api, body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(e.param, param, "{}", String::from_utf8_lossy(body));
            assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        }
    }
}
