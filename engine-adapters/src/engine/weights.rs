//! Model weights: the tensor list a [`ModelConfig`] implies (Hugging Face
//! Llama names and shapes), deterministic generation from the config's seed,
//! and safetensors load (F32, F16, BF16 converted to f32) and save (F32).
//!
//! # Generated weights
//!
//! Every tensor has its own SplitMix64 stream seeded with
//! `mix64(seed ^ fnv1a64(name))`, so a tensor's values depend only on the
//! seed, its name and its shape. Norm weights are 1. Other tensors are
//! uniform in `[-a, a)` with `a = sqrt(3) * std`: std 1 for the embedding,
//! `1 / sqrt(fan_in)` for every projection and the LM head (so activations
//! and logits keep unit scale and greedy output varies with the prompt).
//! Values are produced in row-major order, one `next_f32` each.

use std::collections::HashSet;
use std::path::Path;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use super::config::ModelConfig;
use super::error::WeightError;
use super::rng::{SplitMix64, fnv1a64, mix64};

/// Tensors per transformer layer, in [`Weights`] order.
const PER_LAYER: usize = 9;

/// How a generated tensor is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    Ones,
    Uniform { std: f32 },
}

/// Name and shape of one tensor the model needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Hugging Face Llama name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Shape, row-major; projections are `[out, in]`.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Elements in the tensor.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements (never, for a valid config).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn specs(c: &ModelConfig) -> Vec<(TensorSpec, Init)> {
    let (h, v, i) = (c.hidden_size, c.vocab_size, c.intermediate_size);
    let q = c.num_attention_heads * c.head_dim();
    let kv = c.num_kv_heads * c.head_dim();
    let inv = |fan_in: usize| Init::Uniform {
        std: (1.0 / (fan_in as f64).sqrt()) as f32,
    };
    let spec = |name: String, shape: Vec<usize>, init: Init| (TensorSpec { name, shape }, init);
    let mut out = vec![spec(
        "model.embed_tokens.weight".into(),
        vec![v, h],
        Init::Uniform { std: 1.0 },
    )];
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        out.push(spec(format!("{p}.input_layernorm.weight"), vec![h], Init::Ones));
        out.push(spec(format!("{p}.self_attn.q_proj.weight"), vec![q, h], inv(h)));
        out.push(spec(format!("{p}.self_attn.k_proj.weight"), vec![kv, h], inv(h)));
        out.push(spec(format!("{p}.self_attn.v_proj.weight"), vec![kv, h], inv(h)));
        out.push(spec(format!("{p}.self_attn.o_proj.weight"), vec![h, q], inv(q)));
        out.push(spec(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Init::Ones,
        ));
        out.push(spec(format!("{p}.mlp.gate_proj.weight"), vec![i, h], inv(h)));
        out.push(spec(format!("{p}.mlp.up_proj.weight"), vec![i, h], inv(h)));
        out.push(spec(format!("{p}.mlp.down_proj.weight"), vec![h, i], inv(i)));
    }
    out.push(spec("model.norm.weight".into(), vec![h], Init::Ones));
    out.push(spec("lm_head.weight".into(), vec![v, h], inv(h)));
    out
}

/// The tensors (names and shapes) a model with this config has, in the
/// order [`Weights`] keeps them.
pub fn expected_tensors(config: &ModelConfig) -> Vec<TensorSpec> {
    specs(config).into_iter().map(|(s, _)| s).collect()
}

/// The weights of one transformer layer, borrowed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerWeights<'a> {
    pub(crate) input_norm: &'a [f32],
    pub(crate) q: &'a [f32],
    pub(crate) k: &'a [f32],
    pub(crate) v: &'a [f32],
    pub(crate) o: &'a [f32],
    pub(crate) post_norm: &'a [f32],
    pub(crate) gate: &'a [f32],
    pub(crate) up: &'a [f32],
    pub(crate) down: &'a [f32],
}

/// All weights of a model, f32, with the config they were built for.
#[derive(Clone)]
pub struct Weights {
    config: ModelConfig,
    /// In [`expected_tensors`] order.
    tensors: Vec<Vec<f32>>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("model_id", &self.config.model_id)
            .field("tensors", &self.tensors.len())
            .field("parameters", &self.num_parameters())
            .finish()
    }
}

impl Weights {
    /// Generates the weights from `config.seed` (see the module doc).
    pub fn generate(config: &ModelConfig) -> Result<Self, WeightError> {
        config.validate()?;
        let tensors = specs(config)
            .into_iter()
            .map(|(spec, init)| match init {
                Init::Ones => vec![1.0; spec.len()],
                Init::Uniform { std } => {
                    let bound = (f64::from(std) * 3f64.sqrt()) as f32;
                    let mut rng = SplitMix64::new(mix64(config.seed ^ fnv1a64(spec.name.as_bytes())));
                    (0..spec.len()).map(|_| rng.uniform(bound)).collect()
                }
            })
            .collect();
        Ok(Self {
            config: config.clone(),
            tensors,
        })
    }

    /// Loads weights for `config` from safetensors bytes. Every tensor of
    /// [`expected_tensors`] must be present with its shape, as F32, F16 or
    /// BF16, and finite; tensors the model does not use are an error, except
    /// `*.rotary_emb.inv_freq` buffers, which are ignored.
    pub fn from_safetensors(config: &ModelConfig, bytes: &[u8]) -> Result<Self, WeightError> {
        config.validate()?;
        let file = SafeTensors::deserialize(bytes).map_err(WeightError::Format)?;
        let specs = expected_tensors(config);
        let known: HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        let mut names = file.names();
        names.sort_unstable();
        if let Some(extra) = names
            .iter()
            .find(|n| !known.contains(**n) && !n.ends_with("rotary_emb.inv_freq"))
        {
            return Err(WeightError::UnexpectedTensor {
                name: (*extra).to_owned(),
            });
        }
        let mut tensors = Vec::with_capacity(specs.len());
        for spec in &specs {
            let view = file.tensor(&spec.name).map_err(|e| match e {
                safetensors::SafeTensorError::TensorNotFound(_) => WeightError::MissingTensor {
                    name: spec.name.clone(),
                },
                other => WeightError::Format(other),
            })?;
            if view.shape() != spec.shape.as_slice() {
                return Err(WeightError::WrongShape {
                    name: spec.name.clone(),
                    expected: spec.shape.clone(),
                    actual: view.shape().to_vec(),
                });
            }
            let values = to_f32(&spec.name, &view)?;
            if let Some(index) = values.iter().position(|v| !v.is_finite()) {
                return Err(WeightError::NonFinite {
                    name: spec.name.clone(),
                    index,
                });
            }
            tensors.push(values);
        }
        Ok(Self {
            config: config.clone(),
            tensors,
        })
    }

    /// Reads a safetensors file; see [`Weights::from_safetensors`].
    pub fn load_safetensors(config: &ModelConfig, path: impl AsRef<Path>) -> Result<Self, WeightError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| WeightError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_safetensors(config, &bytes)
    }

    /// The weights as a safetensors file (F32, HF Llama names, metadata
    /// `format = pt` and `kvfabric.model-id`).
    pub fn to_safetensors(&self) -> Result<Vec<u8>, WeightError> {
        let specs = expected_tensors(&self.config);
        let raw: Vec<Vec<u8>> = self
            .tensors
            .iter()
            .map(|t| t.iter().flat_map(|v| v.to_le_bytes()).collect())
            .collect();
        let views = specs
            .iter()
            .zip(&raw)
            .map(|(spec, data)| {
                TensorView::new(Dtype::F32, spec.shape.clone(), data)
                    .map(|view| (spec.name.clone(), view))
                    .map_err(WeightError::Serialize)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let metadata = [
            ("format".to_owned(), "pt".to_owned()),
            ("kvfabric.model-id".to_owned(), self.config.model_id.clone()),
        ]
        .into_iter()
        .collect();
        safetensors::serialize(views, Some(metadata)).map_err(WeightError::Serialize)
    }

    /// Writes [`Weights::to_safetensors`] to a file.
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<(), WeightError> {
        let path = path.as_ref();
        let bytes = self.to_safetensors()?;
        std::fs::write(path, bytes).map_err(|source| WeightError::Io {
            path: path.to_owned(),
            source,
        })
    }

    /// The config these weights were built for.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Total parameters.
    pub fn num_parameters(&self) -> usize {
        self.tensors.iter().map(Vec::len).sum()
    }

    /// A tensor's values by HF name, row-major.
    pub fn tensor(&self, name: &str) -> Option<&[f32]> {
        expected_tensors(&self.config)
            .iter()
            .position(|s| s.name == name)
            .map(|i| self.tensors[i].as_slice())
    }

    pub(crate) fn embed(&self) -> &[f32] {
        &self.tensors[0]
    }

    pub(crate) fn final_norm(&self) -> &[f32] {
        &self.tensors[self.tensors.len() - 2]
    }

    pub(crate) fn lm_head(&self) -> &[f32] {
        &self.tensors[self.tensors.len() - 1]
    }

    pub(crate) fn layer(&self, l: usize) -> LayerWeights<'_> {
        let t = &self.tensors[1 + l * PER_LAYER..1 + (l + 1) * PER_LAYER];
        LayerWeights {
            input_norm: &t[0],
            q: &t[1],
            k: &t[2],
            v: &t[3],
            o: &t[4],
            post_norm: &t[5],
            gate: &t[6],
            up: &t[7],
            down: &t[8],
        }
    }
}

fn to_f32(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>, WeightError> {
    let data = view.data();
    let out = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(WeightError::UnsupportedDtype {
                name: name.to_owned(),
                dtype: format!("{other:?}"),
            });
        }
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_seed_dependent() {
        let c = ModelConfig::tiny();
        let a = Weights::generate(&c).unwrap();
        let b = Weights::generate(&c).unwrap();
        assert_eq!(a.tensors, b.tensors);
        let other = Weights::generate(&ModelConfig { seed: 1, ..c.clone() }).unwrap();
        assert_ne!(a.embed(), other.embed());
        // A tensor depends only on seed, name and shape: adding a layer
        // leaves the existing ones alone.
        let deeper = Weights::generate(&ModelConfig {
            num_layers: 3,
            ..c.clone()
        })
        .unwrap();
        let name = "model.layers.1.mlp.down_proj.weight";
        assert_eq!(a.tensor(name), deeper.tensor(name));
        // Pinned first values, so a change to the generator is noticed.
        let embed = a.tensor("model.embed_tokens.weight").unwrap();
        assert_eq!(&embed[..3], &[-1.4509689, -0.25147584, -1.714178]);
        let q = a.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
        assert_eq!(&q[..3], &[0.2117977, -0.160591, 0.1957746]);
        let bound = 3f32.sqrt() / 8.0;
        assert!(q.iter().all(|v| v.abs() <= bound));
        let std = (q.iter().map(|v| v * v).sum::<f32>() / q.len() as f32).sqrt();
        assert!((std - 0.125).abs() < 0.01, "{std}");
    }

    #[test]
    fn specs_follow_hf_names_and_shapes() {
        let c = ModelConfig::tiny();
        let s = expected_tensors(&c);
        assert_eq!(s.len(), 3 + PER_LAYER * c.num_layers);
        assert_eq!(s[2].name, "model.layers.0.self_attn.q_proj.weight");
        assert_eq!(s[2].shape, vec![64, 64]);
        assert_eq!(s[3].shape, vec![32, 64], "k_proj is [kv_heads * head_dim, hidden]");
        assert_eq!(s[9].shape, vec![64, 128], "down_proj is [hidden, intermediate]");
        let w = Weights::generate(&c).unwrap();
        for (spec, t) in s.iter().zip(&w.tensors) {
            assert_eq!(spec.len(), t.len(), "{}", spec.name);
        }
    }
}
