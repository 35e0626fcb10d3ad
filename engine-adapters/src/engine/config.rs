//! The model configuration: a Llama-architecture shape (layers, heads,
//! grouped-query attention, SwiGLU width, RoPE), the KV block size and the
//! weight seed, loadable from TOML and validated at load.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::ConfigError;
use super::kv::KvLayout;
use super::tokenizer::BYTE_VOCAB_SIZE;

/// Upper bound on `hidden-size` and `intermediate-size` (keeps a bad config
/// from asking for terabytes of weights).
const MAX_WIDTH: usize = 1 << 16;
/// Upper bound on `num-layers`.
const MAX_LAYERS: usize = 1024;
/// Upper bound on `max-context`.
const MAX_CONTEXT: usize = 1 << 20;
/// Upper bound on `vocab-size`.
const MAX_VOCAB: usize = 1 << 20;
/// Upper bound on `tokens-per-block`.
const MAX_TOKENS_PER_BLOCK: usize = 4096;

/// Shape of a Llama-architecture model, its KV block size and the seed its
/// weights are generated from.
///
/// The default is the reference engine's model, `kvfabric-ref-tiny`: a
/// byte-level vocabulary (256 byte tokens, BOS = 256, EOS = 257, vocabulary
/// 258), hidden size 256, 4 layers, 8 attention heads of dimension 32 over 2
/// KV heads (grouped-query attention), SwiGLU width 512, RoPE theta 10 000,
/// RMSNorm epsilon 1e-5, a 2048-token context and 16-token KV blocks.
/// [`ModelConfig::tiny`] is a smaller one for fast tests.
///
/// In TOML the fields are kebab-case (`hidden-size = 256`); every field is
/// optional and defaults as documented.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct ModelConfig {
    /// Model identifier, written into every KV block layout so blocks of
    /// different models never mix. Default `"kvfabric-ref-tiny"`; non-empty,
    /// at most 128 bytes.
    pub model_id: String,
    /// Vocabulary size. Default 258 (bytes, BOS, EOS); at least 258 (the
    /// byte tokenizer's ids must exist), at most 2^20.
    pub vocab_size: usize,
    /// Width of the residual stream. Default 256; a multiple of
    /// `num-attention-heads`, at most 65 536.
    pub hidden_size: usize,
    /// Transformer layers. Default 4; 1 to 1024.
    pub num_layers: usize,
    /// Query heads. Default 8; `hidden-size / num-attention-heads` (the head
    /// dimension) must be even, for RoPE.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention). Default 2; divides
    /// `num-attention-heads`.
    pub num_kv_heads: usize,
    /// SwiGLU intermediate width. Default 512; 1 to 65 536.
    pub intermediate_size: usize,
    /// RoPE base frequency. Default 10 000; finite and greater than 1.
    pub rope_theta: f64,
    /// RMSNorm epsilon. Default 1e-5; finite and positive.
    pub rms_norm_eps: f32,
    /// Context window in tokens (prompt plus generated). Default 2048; 1 to
    /// 2^20.
    pub max_context: usize,
    /// Tokens per KV block. Default 16; 1 to 4096.
    pub tokens_per_block: usize,
    /// Seed the weights are generated from (see `Weights::generate`).
    /// Default 0.
    pub seed: u64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            model_id: "kvfabric-ref-tiny".to_owned(),
            vocab_size: BYTE_VOCAB_SIZE,
            hidden_size: 256,
            num_layers: 4,
            num_attention_heads: 8,
            num_kv_heads: 2,
            intermediate_size: 512,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            max_context: 2048,
            tokens_per_block: 16,
            seed: 0,
        }
    }
}

impl ModelConfig {
    /// A small model for fast tests (`kvfabric-ref-debug`): 2 layers, hidden
    /// size 64, 4 heads of dimension 16 over 2 KV heads, SwiGLU width 128,
    /// 512-token context, 16-token blocks.
    pub fn tiny() -> Self {
        Self {
            model_id: "kvfabric-ref-debug".to_owned(),
            hidden_size: 64,
            num_layers: 2,
            num_attention_heads: 4,
            num_kv_heads: 2,
            intermediate_size: 128,
            max_context: 512,
            ..Self::default()
        }
    }

    /// Dimension of one attention head: `hidden-size / num-attention-heads`.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Query heads per KV head.
    pub fn queries_per_kv(&self) -> usize {
        self.num_attention_heads / self.num_kv_heads.max(1)
    }

    /// Layout of this model's KV blocks.
    pub fn kv_layout(&self) -> KvLayout {
        KvLayout {
            model_id: self.model_id.clone(),
            dtype: KvLayout::DTYPE_F32.to_owned(),
            num_layers: self.num_layers as u32,
            tokens_per_block: self.tokens_per_block as u32,
            num_kv_heads: self.num_kv_heads as u32,
            head_dim: self.head_dim() as u32,
        }
    }

    /// Parses TOML and validates the result.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a TOML file.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text)
    }

    /// The config as TOML (what [`ModelConfig::from_toml_str`] reads back).
    pub fn to_toml_string(&self) -> Result<String, ConfigError> {
        Ok(toml::to_string(self)?)
    }

    /// Checks every field against its documented bounds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                field,
                reason: reason.into(),
            }
        }
        fn range(field: &'static str, value: usize, lo: usize, hi: usize) -> Result<(), ConfigError> {
            if value < lo || value > hi {
                return Err(invalid(field, format!("is {value}, must be {lo} to {hi}")));
            }
            Ok(())
        }
        if self.model_id.is_empty() || self.model_id.len() > 128 {
            return Err(invalid("model-id", "must be 1 to 128 bytes"));
        }
        range("vocab-size", self.vocab_size, BYTE_VOCAB_SIZE, MAX_VOCAB)?;
        range("hidden-size", self.hidden_size, 2, MAX_WIDTH)?;
        range("num-layers", self.num_layers, 1, MAX_LAYERS)?;
        range("num-attention-heads", self.num_attention_heads, 1, self.hidden_size)?;
        range("num-kv-heads", self.num_kv_heads, 1, self.num_attention_heads)?;
        range("intermediate-size", self.intermediate_size, 1, MAX_WIDTH)?;
        range("max-context", self.max_context, 1, MAX_CONTEXT)?;
        range("tokens-per-block", self.tokens_per_block, 1, MAX_TOKENS_PER_BLOCK)?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(invalid(
                "hidden-size",
                format!(
                    "({}) must be a multiple of num-attention-heads ({})",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(invalid(
                "num-attention-heads",
                format!(
                    "gives an odd head dimension {}; RoPE needs an even one",
                    self.head_dim()
                ),
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads) {
            return Err(invalid(
                "num-kv-heads",
                format!(
                    "({}) must divide num-attention-heads ({})",
                    self.num_kv_heads, self.num_attention_heads
                ),
            ));
        }
        if !self.rope_theta.is_finite() || self.rope_theta <= 1.0 {
            return Err(invalid(
                "rope-theta",
                format!("is {}, must be finite and > 1", self.rope_theta),
            ));
        }
        if !self.rms_norm_eps.is_finite() || self.rms_norm_eps <= 0.0 {
            return Err(invalid(
                "rms-norm-eps",
                format!("is {}, must be finite and > 0", self.rms_norm_eps),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_have_the_documented_shape() {
        let c = ModelConfig::default();
        c.validate().unwrap();
        assert_eq!(c.vocab_size, 258);
        assert_eq!(c.head_dim(), 32);
        assert_eq!(c.queries_per_kv(), 4);
        ModelConfig::tiny().validate().unwrap();
        assert_eq!(ModelConfig::tiny().head_dim(), 16);
    }

    #[test]
    fn toml_round_trip_and_partial_files() {
        let c = ModelConfig::tiny();
        let text = c.to_toml_string().unwrap();
        assert!(text.contains("hidden-size = 64"), "{text}");
        assert_eq!(ModelConfig::from_toml_str(&text).unwrap(), c);

        let partial = ModelConfig::from_toml_str("num-layers = 2\nseed = 9\n").unwrap();
        assert_eq!(partial.num_layers, 2);
        assert_eq!(partial.seed, 9);
        assert_eq!(partial.hidden_size, 256);
    }

    #[test]
    fn bad_configs_are_rejected_with_the_field() {
        let cases: [(&str, &str); 7] = [
            ("hidden-size = 100\nnum-attention-heads = 8", "hidden-size"),
            ("num-kv-heads = 3", "num-kv-heads"),
            ("hidden-size = 24\nnum-attention-heads = 8", "num-attention-heads"),
            ("vocab-size = 100", "vocab-size"),
            ("rope-theta = -1.0", "rope-theta"),
            ("tokens-per-block = 0", "tokens-per-block"),
            ("model-id = \"\"", "model-id"),
        ];
        for (text, field) in cases {
            match ModelConfig::from_toml_str(text) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{text}"),
                other => panic!("{text}: expected Invalid({field}), got {other:?}"),
            }
        }
        assert!(matches!(
            ModelConfig::from_toml_str("no-such-field = 1"),
            Err(ConfigError::Parse(_))
        ));
        assert!(matches!(
            ModelConfig::from_toml_file("/nonexistent/model.toml"),
            Err(ConfigError::Io { .. })
        ));
    }
}
