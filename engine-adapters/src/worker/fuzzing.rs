//! Entry points for the fuzz targets in `fuzz/`; not part of the API. It owns
//! nothing: it hands the worker's request parsers (`/v1/completions`,
//! `/v1/chat/completions`, `/v1/prefill`) to
//! `fuzz/fuzz_targets/openai_request.rs`, with what they parsed or the status
//! and body a client would get.

use serde_json::Value;

use super::openai::{self, Api, Prompt};

/// What the parser read from an accepted generate request.
#[derive(Debug)]
pub struct Accepted {
    /// Token ids of the prompt, when it came as ids.
    pub tokens: Option<Vec<u32>>,
    /// The prompt's text, when it came as text (a chat is flattened).
    pub text: Option<String>,
    /// Output tokens asked for.
    pub max_tokens: usize,
    /// Sampling temperature (0: greedy).
    pub temperature: f32,
}

/// Parses `body` as a chat (`chat`) or completion request; a refusal is the
/// HTTP status and the JSON error body the client would get.
pub fn parse_generate(chat: bool, body: &[u8]) -> Result<Accepted, (u16, Value)> {
    let api = if chat { Api::Chat } else { Api::Completions };
    match openai::parse_generate(api, body) {
        Ok(r) => {
            let (tokens, text) = match r.prompt {
                Prompt::Tokens(t) => (Some(t), None),
                Prompt::Text(t) => (None, Some(t)),
            };
            Ok(Accepted {
                tokens,
                text,
                max_tokens: r.max_tokens,
                temperature: r.temperature,
            })
        }
        Err(e) => Err((e.status.as_u16(), e.body())),
    }
}

/// Parses `body` as a `/v1/prefill` request: its prompt's token ids, or the
/// refusal's status and body.
pub fn parse_prefill(body: &[u8]) -> Result<Vec<u32>, (u16, Value)> {
    openai::parse_prefill(body)
        .map(|r| r.prompt)
        .map_err(|e| (e.status.as_u16(), e.body()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_carry_an_openai_error_body() {
        let (status, body) = parse_generate(false, br#"{"prompt":"x","n":2}"#).unwrap_err();
        assert_eq!(status, 400);
        assert!(body["error"]["message"].is_string());
        assert_eq!(parse_prefill(br#"{"prompt":[1,2]}"#).unwrap(), vec![1, 2]);
        assert_eq!(parse_prefill(b"[]").unwrap_err().0, 400);
    }
}
