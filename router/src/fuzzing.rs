//! Entry points for the fuzz targets in `fuzz/`; not part of the API. It owns
//! nothing: it hands the OpenAI request parser behind `/v1/completions` and
//! `/v1/chat/completions` to `fuzz/fuzz_targets/openai_request.rs`, with what
//! it parsed or the status and body a client would get.

use serde_json::Value;

use crate::http::openai::{self, Api, Prompt};

/// What the parser read from an accepted request.
#[derive(Debug)]
pub struct Accepted {
    /// Token ids of the routed prompt, when it came as ids.
    pub tokens: Option<Vec<u32>>,
    /// The routed prompt's text, when it came as text (a chat is flattened).
    pub text: Option<String>,
    /// Prompts in the request.
    pub batch: u64,
    /// Output tokens the load is priced for.
    pub max_tokens: u64,
}

/// Parses `body` as a chat (`chat`) or completion request; a refusal is the
/// HTTP status and the JSON error body the client would get.
pub fn parse_request(chat: bool, body: &[u8]) -> Result<Accepted, (u16, Value)> {
    let api = if chat { Api::Chat } else { Api::Completions };
    match openai::parse(api, body) {
        Ok(p) => {
            let (tokens, text) = match p.prompt {
                Prompt::Tokens(t) => (Some(t), None),
                Prompt::Text(t) => (None, Some(t)),
            };
            Ok(Accepted {
                tokens,
                text,
                batch: p.batch,
                max_tokens: p.max_tokens,
            })
        }
        Err(e) => Err((e.status.as_u16(), e.body())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_carry_an_openai_error_body() {
        let (status, body) = parse_request(false, b"{\"prompt\":").unwrap_err();
        assert_eq!(status, 400);
        assert!(body["error"]["message"].is_string());
        let ok = parse_request(true, br#"{"messages":[{"role":"user","content":"x"}]}"#).unwrap();
        assert_eq!((ok.batch, ok.tokens), (1, None));
    }
}
