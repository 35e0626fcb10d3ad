//! The reference CPU engine: a small Llama-architecture transformer in plain
//! Rust (f32, no BLAS) over a paged KV cache whose blocks can be exported as
//! bytes and imported again, so the fabric can store them and a later
//! prefill can skip the cached prefix.
//!
//! Pieces: [`ModelConfig`] (shape, TOML), [`Weights`] (seeded generation,
//! safetensors load and save), [`Model`] (the forward pass), [`BlockPool`]
//! and [`KvLayout`] (the paged cache and its byte layout), [`Engine`]
//! (sequences, batched prefill and decode, generation), [`Sampler`], and the
//! byte-level tokenizer ([`encode`], [`decode`]).
//!
//! ```
//! use kvfabric_engine_adapters::engine::{Engine, GenerationParams, Model, ModelConfig, decode, encode};
//!
//! let model = Model::from_seed(&ModelConfig::tiny())?;
//! let mut engine = Engine::new(model, 64)?;
//! let seq = engine.add_sequence(&encode("hello", true), &[])?;
//! let out = engine.generate(&[(seq, GenerationParams::greedy(8))])?;
//! println!("{}", decode(&out[0].tokens));
//! # Ok::<(), kvfabric_engine_adapters::engine::EngineError>(())
//! ```

mod config;
mod error;
mod kv;
mod model;
mod ops;
mod rng;
mod sampler;
mod serving;
mod tokenizer;
mod weights;

pub use config::ModelConfig;
pub use error::{ConfigError, EngineError, ErrorKind, KvError, WeightError};
pub use kv::{BlockId, BlockPool, KvLayout};
pub use model::Model;
pub use sampler::{Sampler, Sampling, argmax};
pub use serving::{Engine, EngineStats, FinishReason, FullBlock, Generation, GenerationParams, SeqId, Sequence};
pub use tokenizer::{BOS_TOKEN, BYTE_VOCAB_SIZE, EOS_TOKEN, decode, encode};
pub use weights::{TensorSpec, Weights, expected_tensors};
