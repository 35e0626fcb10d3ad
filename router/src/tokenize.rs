//! Prompts to token ids, for routing only (the worker gets the original
//! request body and tokenises it itself).
//!
//! - With a Hugging Face `tokenizer.json` (setting `tokenizer`, feature
//!   `tokenizers`, on by default) text is encoded with it, special tokens
//!   added as the engine would.
//! - Without one, text is tokenised the way the bundled reference engine
//!   does: BOS ([`BYTE_BOS`], 256), then each UTF-8 byte as one token id
//!   (0..=255), so the router's block hashes are the engine's.
//!
//! Chat requests are flattened with a fixed template before tokenising, one
//! block per message and an open assistant turn at the end:
//!
//! ```text
//! <|{role}|>\n{content}\n ... <|assistant|>\n
//! ```
//!
//! (content given as an array of parts contributes its `text` parts,
//! concatenated). The template only has to be stable, so that requests
//! sharing leading messages share leading blocks; it need not be the model's.

use std::path::Path;

/// The beginning-of-sequence token the byte-level fallback starts text
/// with (the reference engine's BOS).
pub const BYTE_BOS: u32 = 256;

/// Why a tokenizer could not be loaded or a text encoded.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    /// The `tokenizer.json` could not be read or parsed.
    #[error("loading tokenizer {path}: {message}")]
    Load {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// A tokenizer was configured but this build lacks the feature.
    #[error("tokenizer {0} configured, but the router was built without the `tokenizers` feature")]
    Unsupported(String),
    /// The tokenizer refused the text.
    #[error("tokenizing: {0}")]
    Encode(String),
}

/// Turns text into token ids (see the module doc).
#[derive(Debug)]
pub enum Tokenizer {
    /// One token per UTF-8 byte.
    Bytes,
    /// A Hugging Face tokenizer.
    #[cfg(feature = "tokenizers")]
    Hf(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    /// Loads `path` (`None`: the byte-level fallback).
    pub fn load(path: Option<&Path>) -> Result<Tokenizer, TokenizeError> {
        let Some(p) = path else {
            return Ok(Tokenizer::Bytes);
        };
        #[cfg(feature = "tokenizers")]
        {
            tokenizers::Tokenizer::from_file(p)
                .map(|t| Tokenizer::Hf(Box::new(t)))
                .map_err(|e| TokenizeError::Load {
                    path: p.display().to_string(),
                    message: e.to_string(),
                })
        }
        #[cfg(not(feature = "tokenizers"))]
        {
            Err(TokenizeError::Unsupported(p.display().to_string()))
        }
    }

    /// Token ids of `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        match self {
            Tokenizer::Bytes => Ok(std::iter::once(BYTE_BOS).chain(text.bytes().map(u32::from)).collect()),
            #[cfg(feature = "tokenizers")]
            Tokenizer::Hf(t) => t
                .encode(text, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TokenizeError::Encode(e.to_string())),
        }
    }
}

/// Applies the chat template (module doc) to `(role, content)` pairs.
pub fn chat_text<'a>(messages: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_fallback_and_template() {
        let t = Tokenizer::load(None).unwrap();
        assert_eq!(t.encode("hé").unwrap(), vec![BYTE_BOS, 104, 195, 169]);
        assert_eq!(
            chat_text([("system", "be brief"), ("user", "hi")]),
            "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
        );
    }

    #[cfg(feature = "tokenizers")]
    #[test]
    fn loads_a_word_level_tokenizer_json() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        std::fs::write(&p, crate::tokenize::tests::WORD_LEVEL).unwrap();
        let t = Tokenizer::load(Some(&p)).unwrap();
        assert_eq!(t.encode("hello world hello").unwrap(), vec![1, 2, 1]);
        assert_eq!(t.encode("unseen").unwrap(), vec![0]);
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{").unwrap();
        assert!(
            Tokenizer::load(Some(&bad))
                .unwrap_err()
                .to_string()
                .contains("bad.json")
        );
    }

    /// A three-word WordLevel tokenizer split on whitespace.
    #[cfg(feature = "tokenizers")]
    pub(crate) const WORD_LEVEL: &str = r#"{
      "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
      "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
      "post_processor": null, "decoder": null,
      "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2}, "unk_token": "[UNK]"}
    }"#;
}
