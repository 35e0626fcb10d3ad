//! Safetensors weights: seeded weights survive save -> load bit for bit (and
//! give identical logits), F16/BF16 files load, and files that do not fit
//! the config fail with the typed error naming the tensor.

use kvfabric_engine_adapters::engine::{Engine, Model, ModelConfig, WeightError, Weights, encode, expected_tensors};
use safetensors::{Dtype, tensor::TensorView};

fn first_logits(weights: Weights) -> Vec<f32> {
    let mut e = Engine::new(Model::new(weights), 16).unwrap();
    let s = e.add_sequence(&encode("safetensors round trip", true), &[]).unwrap();
    e.prefill(&[s]).unwrap().remove(0)
}

/// A safetensors file of `weights` with every tensor converted by `convert`
/// (`None` drops it) and the extra tensors appended.
fn custom_file(
    weights: &Weights,
    dtype: Dtype,
    convert: impl Fn(&str, &[f32]) -> Option<(Vec<usize>, Vec<u8>)>,
    extra: &[(&str, Vec<usize>)],
) -> Vec<u8> {
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for spec in expected_tensors(weights.config()) {
        if let Some((shape, data)) = convert(&spec.name, weights.tensor(&spec.name).unwrap()) {
            owned.push((spec.name, shape, data));
        }
    }
    for (name, shape) in extra {
        let n: usize = shape.iter().product();
        owned.push((name.to_string(), shape.clone(), vec![0u8; n * 4]));
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(name, shape, data)| {
            let dt = if extra.iter().any(|(e, _)| e == name) {
                Dtype::F32
            } else {
                dtype
            };
            (name.clone(), TensorView::new(dt, shape.clone(), data).unwrap())
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn shape_of(config: &ModelConfig, name: &str) -> Vec<usize> {
    expected_tensors(config)
        .into_iter()
        .find(|s| s.name == name)
        .unwrap()
        .shape
}

#[test]
fn save_load_round_trip_gives_identical_logits() {
    let config = ModelConfig::tiny();
    let weights = Weights::generate(&config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    weights.save_safetensors(&path).unwrap();
    let loaded = Weights::load_safetensors(&config, &path).unwrap();
    for spec in expected_tensors(&config) {
        assert_eq!(weights.tensor(&spec.name), loaded.tensor(&spec.name), "{}", spec.name);
    }
    assert_eq!(first_logits(weights), first_logits(loaded));
}

#[test]
fn half_precision_files_load() {
    let config = ModelConfig::tiny();
    let weights = Weights::generate(&config).unwrap();
    let cfg = config.clone();
    let bf16 = custom_file(
        &weights,
        Dtype::BF16,
        |name, v| {
            Some((
                shape_of(&cfg, name),
                v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
            ))
        },
        &[],
    );
    let loaded = Weights::from_safetensors(&config, &bf16).unwrap();
    let name = "model.layers.1.mlp.up_proj.weight";
    for (a, b) in weights.tensor(name).unwrap().iter().zip(loaded.tensor(name).unwrap()) {
        assert_eq!(half::bf16::from_f32(*a).to_f32(), *b);
    }
    let f16 = custom_file(
        &weights,
        Dtype::F16,
        |name, v| {
            Some((
                shape_of(&cfg, name),
                v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
            ))
        },
        &[],
    );
    let loaded = Weights::from_safetensors(&config, &f16).unwrap();
    let d = weights
        .tensor(name)
        .unwrap()
        .iter()
        .zip(loaded.tensor(name).unwrap())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(d < 1e-3, "{d}");
}

#[test]
fn missing_tensor_is_reported_by_name() {
    let config = ModelConfig::tiny();
    let weights = Weights::generate(&config).unwrap();
    let cfg = config.clone();
    let file = custom_file(
        &weights,
        Dtype::F32,
        |name, v| (name != "model.layers.1.self_attn.k_proj.weight").then(|| (shape_of(&cfg, name), f32_bytes(v))),
        &[],
    );
    match Weights::from_safetensors(&config, &file) {
        Err(WeightError::MissingTensor { name }) => assert_eq!(name, "model.layers.1.self_attn.k_proj.weight"),
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    // A config with more layers than the file.
    let deeper = ModelConfig {
        num_layers: 3,
        ..config.clone()
    };
    let full = weights.to_safetensors().unwrap();
    match Weights::from_safetensors(&deeper, &full) {
        Err(WeightError::MissingTensor { name }) => assert!(name.starts_with("model.layers.2."), "{name}"),
        other => panic!("expected MissingTensor, got {other:?}"),
    }
}

#[test]
fn wrong_shape_unexpected_tensor_and_garbage_are_typed_errors() {
    let config = ModelConfig::tiny();
    let weights = Weights::generate(&config).unwrap();
    let full = weights.to_safetensors().unwrap();

    let wider = ModelConfig {
        intermediate_size: 96,
        ..config.clone()
    };
    match Weights::from_safetensors(&wider, &full) {
        Err(WeightError::WrongShape { name, expected, actual }) => {
            assert_eq!(name, "model.layers.0.mlp.gate_proj.weight");
            assert_eq!(expected, vec![96, 64]);
            assert_eq!(actual, vec![128, 64]);
        }
        other => panic!("expected WrongShape, got {other:?}"),
    }

    let cfg = config.clone();
    let transposed = custom_file(
        &weights,
        Dtype::F32,
        |name, v| {
            let mut shape = shape_of(&cfg, name);
            if name == "model.layers.0.mlp.down_proj.weight" {
                shape.reverse();
            }
            Some((shape, f32_bytes(v)))
        },
        &[],
    );
    assert!(matches!(
        Weights::from_safetensors(&config, &transposed),
        Err(WeightError::WrongShape { .. })
    ));

    let extra = custom_file(
        &weights,
        Dtype::F32,
        |name, v| Some((shape_of(&cfg, name), f32_bytes(v))),
        &[
            ("model.layers.0.self_attn.rotary_emb.inv_freq", vec![8]),
            ("model.layers.0.self_attn.q_proj.bias", vec![64]),
        ],
    );
    match Weights::from_safetensors(&config, &extra) {
        Err(WeightError::UnexpectedTensor { name }) => assert_eq!(name, "model.layers.0.self_attn.q_proj.bias"),
        other => panic!("expected UnexpectedTensor, got {other:?}"),
    }
    let inv_freq_only = custom_file(
        &weights,
        Dtype::F32,
        |name, v| Some((shape_of(&cfg, name), f32_bytes(v))),
        &[("model.layers.0.self_attn.rotary_emb.inv_freq", vec![8])],
    );
    assert!(Weights::from_safetensors(&config, &inv_freq_only).is_ok());

    let ints = custom_file(
        &weights,
        Dtype::I32,
        |name, v| Some((shape_of(&cfg, name), f32_bytes(v))),
        &[],
    );
    assert!(matches!(
        Weights::from_safetensors(&config, &ints),
        Err(WeightError::UnsupportedDtype { .. })
    ));

    let nan = custom_file(
        &weights,
        Dtype::F32,
        |name, v| {
            let mut v = v.to_vec();
            if name == "model.norm.weight" {
                v[3] = f32::NAN;
            }
            Some((shape_of(&cfg, name), f32_bytes(&v)))
        },
        &[],
    );
    assert!(matches!(
        Weights::from_safetensors(&config, &nan),
        Err(WeightError::NonFinite { index: 3, .. })
    ));

    for garbage in [&b""[..], b"not a safetensors file", &full[..full.len() / 2]] {
        assert!(matches!(
            Weights::from_safetensors(&config, garbage),
            Err(WeightError::Format(_))
        ));
    }
    assert!(matches!(
        Weights::load_safetensors(&config, "/nonexistent/model.safetensors"),
        Err(WeightError::Io { .. })
    ));
}
