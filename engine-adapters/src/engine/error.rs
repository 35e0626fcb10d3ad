//! Typed errors of the reference engine: one detailed enum per concern
//! (configuration, weights, KV blocks, serving) and [`EngineError`] over all
//! of them, with a small [`ErrorKind`] that tells a caller what to do.

use std::path::PathBuf;

/// What the caller should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request or its input is wrong: fix it, retrying will not help.
    InvalidInput,
    /// Out of room (KV blocks, context): free something or retry later.
    Capacity,
    /// Stored bytes (a weights file, a KV block) are malformed or corrupt.
    Data,
    /// The named sequence or block does not exist.
    NotFound,
    /// An I/O error reading or writing a file.
    Io,
}

/// An invalid model configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A field is out of its documented bounds or inconsistent with another.
    #[error("invalid model config: `{field}` {reason}")]
    Invalid {
        /// Field name as written in TOML.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The TOML text does not parse into a config.
    #[error("model config does not parse: {0}")]
    Parse(#[from] toml::de::Error),
    /// The config could not be written as TOML.
    #[error("model config does not serialise: {0}")]
    Serialize(#[from] toml::ser::Error),
    /// Reading the config file failed.
    #[error("reading model config {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// A weights file that does not fit the model configuration.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    /// The configuration itself is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The file is not a valid safetensors file.
    #[error("not a valid safetensors file: {0}")]
    Format(#[source] safetensors::SafeTensorError),
    /// A tensor the model needs is absent.
    #[error("weights file lacks tensor `{name}`")]
    MissingTensor {
        /// HF tensor name.
        name: String,
    },
    /// A tensor has a shape other than the configuration implies.
    #[error("tensor `{name}` has shape {actual:?}, the model config needs {expected:?}")]
    WrongShape {
        /// HF tensor name.
        name: String,
        /// Shape the configuration implies.
        expected: Vec<usize>,
        /// Shape in the file.
        actual: Vec<usize>,
    },
    /// A tensor is stored in an element type the loader does not convert.
    #[error("tensor `{name}` has dtype {dtype}; supported: F32, F16, BF16")]
    UnsupportedDtype {
        /// HF tensor name.
        name: String,
        /// The dtype, as safetensors names it.
        dtype: String,
    },
    /// The file holds a tensor this model does not have (a different
    /// architecture or a config with fewer layers).
    #[error("weights file has tensor `{name}`, which this model config does not use")]
    UnexpectedTensor {
        /// HF tensor name.
        name: String,
    },
    /// A tensor holds NaN or infinity.
    #[error("tensor `{name}` holds a non-finite value at element {index}")]
    NonFinite {
        /// HF tensor name.
        name: String,
        /// First bad element.
        index: usize,
    },
    /// Writing the safetensors file failed.
    #[error("serialising weights: {0}")]
    Serialize(#[source] safetensors::SafeTensorError),
    /// Reading or writing the weights file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// A paged-KV-cache failure.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// Every block of the pool is in use.
    #[error("KV block pool exhausted: need {needed} more blocks, {free} of {capacity} free")]
    PoolExhausted {
        /// Blocks the operation needed.
        needed: usize,
        /// Blocks free.
        free: usize,
        /// Pool capacity in blocks.
        capacity: usize,
    },
    /// The block id is out of range or the block is free.
    #[error("KV block {0} is not allocated")]
    UnknownBlock(u32),
    /// Only full blocks can be exported or shared.
    #[error("KV block {0} is not full yet: only full blocks can be exported or shared")]
    BlockNotFull(u32),
    /// Bytes offered as a block have the wrong length for the layout.
    #[error("KV block bytes have length {actual}, the layout needs {expected}")]
    WrongBlockLength {
        /// `KvLayout::block_bytes`.
        expected: usize,
        /// Length given.
        actual: usize,
    },
    /// Bytes offered as a block decode to NaN or infinity.
    #[error("KV block bytes hold a non-finite value at element {index}")]
    NonFiniteBlock {
        /// First bad f32 element.
        index: usize,
    },
    /// The layout (or pool size) cannot be used.
    #[error("invalid KV layout: {0}")]
    InvalidLayout(String),
}

/// Any failure of the reference engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Weights do not load.
    #[error(transparent)]
    Weights(#[from] WeightError),
    /// KV cache failure.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// A prompt with no tokens.
    #[error("empty prompt")]
    EmptyPrompt,
    /// A sequence would grow past the model's context window.
    #[error("sequence of {len} tokens exceeds the context window of {max_context}")]
    ContextExceeded {
        /// Length it would have.
        len: usize,
        /// `ModelConfig::max_context`.
        max_context: usize,
    },
    /// A token id outside the vocabulary.
    #[error("token id {token} is outside the vocabulary of {vocab_size}")]
    InvalidToken {
        /// Offending id.
        token: u32,
        /// `ModelConfig::vocab_size`.
        vocab_size: usize,
    },
    /// No sequence with this id.
    #[error("unknown sequence {0}")]
    UnknownSequence(u64),
    /// The same sequence appears twice in one batch.
    #[error("sequence {0} appears twice in one batch")]
    DuplicateSequence(u64),
    /// Prefill asked for a sequence that has no tokens waiting.
    #[error("sequence {0} has no tokens waiting for prefill")]
    NothingToPrefill(u64),
    /// Decode asked for a sequence whose prompt is not computed yet.
    #[error("sequence {0} has tokens waiting for prefill; prefill it before decoding")]
    NotPrefilled(u64),
    /// Invalid sampling parameters.
    #[error("invalid sampling parameters: {0}")]
    InvalidSampling(String),
    /// Logits that cannot be sampled (empty or NaN).
    #[error("cannot sample: {0}")]
    BadLogits(String),
}

impl EngineError {
    /// What the caller should do about this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::Config(ConfigError::Io { .. }) => ErrorKind::Io,
            EngineError::Config(_) => ErrorKind::InvalidInput,
            EngineError::Weights(WeightError::Io { .. }) => ErrorKind::Io,
            EngineError::Weights(WeightError::Config(_)) => ErrorKind::InvalidInput,
            EngineError::Weights(_) => ErrorKind::Data,
            EngineError::Kv(e) => match e {
                KvError::PoolExhausted { .. } => ErrorKind::Capacity,
                KvError::UnknownBlock(_) => ErrorKind::NotFound,
                KvError::WrongBlockLength { .. } | KvError::NonFiniteBlock { .. } => ErrorKind::Data,
                KvError::BlockNotFull(_) | KvError::InvalidLayout(_) => ErrorKind::InvalidInput,
            },
            EngineError::ContextExceeded { .. } => ErrorKind::Capacity,
            EngineError::UnknownSequence(_) => ErrorKind::NotFound,
            EngineError::EmptyPrompt
            | EngineError::InvalidToken { .. }
            | EngineError::DuplicateSequence(_)
            | EngineError::NothingToPrefill(_)
            | EngineError::NotPrefilled(_)
            | EngineError::InvalidSampling(_)
            | EngineError::BadLogits(_) => ErrorKind::InvalidInput,
        }
    }
}
