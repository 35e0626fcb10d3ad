//! End-to-end properties of the reference engine: incremental decode equals
//! full recompute, a prefill that starts from exported-and-imported KV
//! blocks equals one that computes everything, batching and thread counts
//! change nothing, and bad input is a typed error that leaves the engine
//! usable.

use kvfabric_engine_adapters::engine::{
    EOS_TOKEN, Engine, EngineError, ErrorKind, FinishReason, GenerationParams, KvError, Model, ModelConfig, Sampling,
    SeqId, decode, encode,
};

fn engine(config: &ModelConfig, blocks: usize) -> Engine {
    Engine::new(Model::from_seed(config).unwrap(), blocks).unwrap()
}

/// A deterministic prompt of `len` tokens (BOS + text bytes).
fn prompt(len: usize, salt: u8) -> Vec<u32> {
    let text = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. ";
    let mut ids = vec![kvfabric_engine_adapters::engine::BOS_TOKEN];
    ids.extend(
        text.bytes()
            .cycle()
            .skip(salt as usize * 7)
            .map(|b| u32::from(b ^ (salt & 0x1f)))
            .take(len - 1),
    );
    ids
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn greedy(engine: &mut Engine, seq: SeqId, n: usize) -> (Vec<u32>, Vec<f32>) {
    let g = engine.generate(&[(seq, GenerationParams::greedy(n))]).unwrap();
    let g = g.into_iter().next().unwrap();
    (g.tokens, g.first_logits)
}

#[test]
fn incremental_decode_matches_full_recompute() {
    let config = ModelConfig::tiny();
    let mut inc = engine(&config, 64);
    let p = prompt(21, 1);
    let seq = inc.add_sequence(&p, &[]).unwrap();
    let mut logits = inc.prefill(&[seq]).unwrap().pop().unwrap();
    let mut tokens = p.clone();
    let mut worst = 0.0f32;
    for _ in 0..24 {
        // Full recompute of the same tokens in a fresh engine.
        let mut full = engine(&config, 64);
        let s = full.add_sequence(&tokens, &[]).unwrap();
        let reference = full.prefill(&[s]).unwrap().pop().unwrap();
        worst = worst.max(max_abs_diff(&logits, &reference));
        let next = kvfabric_engine_adapters::engine::argmax(&logits).unwrap();
        tokens.push(next);
        logits = inc.decode_step(&[(seq, next)]).unwrap().pop().unwrap();
    }
    println!("incremental vs full recompute: max abs logit diff {worst:e}");
    assert!(worst <= 1e-5, "{worst}");
}

/// Prefill in one go vs. import the first `k` full blocks (`k` from
/// `blocks_to_reuse(full_blocks)`) and prefill the rest; returns the worst
/// first-step logit difference.
fn check_prefix_reuse(config: &ModelConfig, lens: &[usize], blocks_to_reuse: fn(usize) -> usize) -> f32 {
    let tpb = config.tokens_per_block;
    let mut worst = 0.0f32;
    for (i, &len) in lens.iter().enumerate() {
        let p = prompt(len, i as u8);
        let mut a = engine(config, 128);
        let sa = a.add_sequence(&p, &[]).unwrap();
        let (tokens_a, logits_a) = greedy(&mut a, sa, 12);
        assert_eq!(a.prefill_tokens_computed(), len as u64);

        let prompt_blocks: Vec<_> = a.full_blocks(sa).unwrap().into_iter().take(len / tpb).collect();
        for (j, fb) in prompt_blocks.iter().enumerate() {
            assert_eq!(fb.index, j);
            assert_eq!(fb.tokens, p[j * tpb..(j + 1) * tpb]);
        }
        let k = blocks_to_reuse(prompt_blocks.len()).min((len - 1) / tpb);
        let bytes: Vec<Vec<u8>> = prompt_blocks[..k]
            .iter()
            .map(|fb| a.export_block(fb.block).unwrap())
            .collect();
        for b in &bytes {
            assert_eq!(b.len(), a.kv_layout().block_bytes());
        }

        let mut b = engine(config, 128);
        let sb = b.add_sequence_from_bytes(&p, &bytes).unwrap();
        assert_eq!(b.sequence(sb).unwrap().cached_tokens(), k * tpb);
        let (tokens_b, logits_b) = greedy(&mut b, sb, 12);
        assert_eq!(
            b.prefill_tokens_computed(),
            (len - k * tpb) as u64,
            "only the uncached tokens are computed"
        );
        let d = max_abs_diff(&logits_a, &logits_b);
        println!(
            "len {len}: reused {k} blocks ({} tokens), computed {}, max abs first-step logit diff {d:e}",
            k * tpb,
            b.prefill_tokens_computed()
        );
        worst = worst.max(d);
        assert!(d <= 1e-4, "len {len}: {d}");
        assert_eq!(tokens_a, tokens_b, "len {len}: greedy generations differ");
        // The reused blocks are bit-identical to the exporter's.
        for (fb, bytes) in b.full_blocks(sb).unwrap().iter().zip(&bytes) {
            assert_eq!(&b.export_block(fb.block).unwrap(), bytes);
        }
    }
    worst
}

#[test]
fn prefix_import_matches_full_prefill() {
    let worst = check_prefix_reuse(&ModelConfig::tiny(), &[17, 33, 48, 64, 100, 161], |n| n);
    println!("tiny, all full prompt blocks reused: worst {worst:e}");
}

#[test]
fn half_prefix_import_matches_full_prefill() {
    let worst = check_prefix_reuse(&ModelConfig::tiny(), &[40, 64, 100, 161], |n| n / 2);
    println!("tiny, half the prompt blocks reused: worst {worst:e}");
}

#[test]
fn prefix_import_matches_full_prefill_default_model() {
    let worst = check_prefix_reuse(&ModelConfig::default(), &[50, 130], |n| n);
    println!("default model, all full prompt blocks reused: worst {worst:e}");
}

#[test]
fn batched_prefill_and_decode_match_single_sequences() {
    let config = ModelConfig::tiny();
    let prompts = [prompt(9, 3), prompt(40, 4), prompt(23, 5)];
    let mut alone = Vec::new();
    for p in &prompts {
        let mut e = engine(&config, 64);
        let s = e.add_sequence(p, &[]).unwrap();
        alone.push(e.generate(&[(s, GenerationParams::greedy(10))]).unwrap().remove(0));
    }
    let mut e = engine(&config, 64);
    let ids: Vec<SeqId> = prompts.iter().map(|p| e.add_sequence(p, &[]).unwrap()).collect();
    let reqs: Vec<_> = ids.iter().map(|&s| (s, GenerationParams::greedy(10))).collect();
    let batched = e.generate(&reqs).unwrap();
    assert_eq!(e.stats().prefill_batches, 1);
    let mut worst = 0.0f32;
    for (a, b) in alone.iter().zip(&batched) {
        worst = worst.max(max_abs_diff(&a.first_logits, &b.first_logits));
        assert_eq!(a.tokens, b.tokens);
    }
    println!("batched vs alone: max abs first-step logit diff {worst:e}");
    assert!(worst <= 1e-6, "{worst}");
    assert_eq!(e.prefill_tokens_computed(), (9 + 40 + 23) as u64);
}

#[test]
fn batch_mixing_cached_and_uncached_sequences() {
    let config = ModelConfig::tiny();
    let p = prompt(70, 6);
    let q = prompt(30, 7);
    let mut src = engine(&config, 64);
    let s = src.add_sequence(&p, &[]).unwrap();
    let reference = src.prefill(&[s]).unwrap().remove(0);
    let bytes: Vec<Vec<u8>> = src
        .full_blocks(s)
        .unwrap()
        .iter()
        .map(|fb| src.export_block(fb.block).unwrap())
        .collect();
    let mut alone_q = engine(&config, 64);
    let sq = alone_q.add_sequence(&q, &[]).unwrap();
    let reference_q = alone_q.prefill(&[sq]).unwrap().remove(0);

    let mut e = engine(&config, 64);
    let a = e.add_sequence_from_bytes(&p, &bytes).unwrap();
    let b = e.add_sequence(&q, &[]).unwrap();
    let logits = e.prefill(&[b, a]).unwrap();
    assert_eq!(max_abs_diff(&logits[0], &reference_q), 0.0);
    assert_eq!(max_abs_diff(&logits[1], &reference), 0.0);
    assert_eq!(e.prefill_tokens_computed(), (70 - 64 + 30) as u64);
}

#[test]
fn chunked_prefill_matches_one_shot() {
    let config = ModelConfig::tiny();
    let p = prompt(75, 8);
    let mut one = engine(&config, 64);
    let s = one.add_sequence(&p, &[]).unwrap();
    let reference = one.prefill(&[s]).unwrap().remove(0);

    let mut chunked = engine(&config, 64);
    let s = chunked.add_sequence(&p[..5], &[]).unwrap();
    chunked.prefill(&[s]).unwrap();
    for chunk in p[5..].chunks(13) {
        chunked.append_tokens(s, chunk).unwrap();
        let logits = chunked.prefill(&[s]).unwrap().remove(0);
        if chunked.sequence(s).unwrap().num_computed() == p.len() {
            assert_eq!(logits, reference);
        }
    }
    assert_eq!(chunked.prefill_tokens_computed(), 75);
}

#[test]
fn thread_count_does_not_change_results() {
    let config = ModelConfig::default();
    let p = prompt(120, 9);
    let mut runs = Vec::new();
    for threads in [1, 2, 3] {
        let mut e = engine(&config, 64);
        e.set_threads(threads);
        let s = e.add_sequence(&p, &[]).unwrap();
        runs.push(greedy(&mut e, s, 6));
    }
    assert_eq!(runs[0], runs[1]);
    assert_eq!(runs[0], runs[2]);
}

#[test]
fn prefix_sharing_within_one_engine() {
    let config = ModelConfig::tiny();
    let tpb = config.tokens_per_block;
    let mut e = engine(&config, 64);
    let base = prompt(50, 10);
    let a = e.add_sequence(&base, &[]).unwrap();
    e.prefill(&[a]).unwrap();
    let shared: Vec<_> = e.full_blocks(a).unwrap().iter().map(|fb| fb.block).collect();
    assert_eq!(shared.len(), 3);

    // A second sequence with the same first 48 tokens and a different tail.
    let mut other = base[..48].to_vec();
    other.extend(encode(" and then something else", false));
    let b = e.add_sequence(&other, &shared).unwrap();
    assert_eq!(e.pool().ref_count(shared[0]), Some(2));
    let logits = e.prefill(&[b]).unwrap().remove(0);
    assert_eq!(e.prefill_tokens_computed(), (50 + other.len() - 3 * tpb) as u64);

    let mut fresh = engine(&config, 64);
    let f = fresh.add_sequence(&other, &[]).unwrap();
    assert_eq!(logits, fresh.prefill(&[f]).unwrap().remove(0));

    let used = e.pool().num_used();
    e.remove_sequence(a).unwrap();
    assert_eq!(e.pool().ref_count(shared[0]), Some(1));
    assert_eq!(e.pool().num_used(), used - 1, "only a's private partial block is freed");
    e.remove_sequence(b).unwrap();
    assert_eq!(e.pool().num_used(), 0);
}

#[test]
fn full_prefix_hit_still_computes_the_last_token() {
    let config = ModelConfig::tiny();
    let p = prompt(64, 11);
    let mut a = engine(&config, 64);
    let s = a.add_sequence(&p, &[]).unwrap();
    let reference = a.prefill(&[s]).unwrap().remove(0);
    let blocks = a.full_blocks(s).unwrap();
    assert_eq!(blocks.len(), 4);
    let bytes: Vec<_> = blocks.iter().map(|fb| a.export_block(fb.block).unwrap()).collect();
    let mut b = engine(&config, 64);
    let sb = b.add_sequence_from_bytes(&p, &bytes).unwrap();
    assert_eq!(b.sequence(sb).unwrap().cached_tokens(), 48);
    assert_eq!(b.pool().num_used(), 3, "the unusable fourth block is not imported");
    assert_eq!(b.prefill(&[sb]).unwrap().remove(0), reference);
    assert_eq!(b.prefill_tokens_computed(), 16);
}

#[test]
fn partial_blocks_stay_private() {
    let config = ModelConfig::tiny();
    let mut e = engine(&config, 64);
    let s = e.add_sequence(&prompt(20, 12), &[]).unwrap();
    e.prefill(&[s]).unwrap();
    let seq = e.sequence(s).unwrap();
    assert_eq!(seq.blocks().len(), 2);
    let partial = seq.blocks()[1];
    assert_eq!(e.full_blocks(s).unwrap().len(), 1);
    assert!(matches!(
        e.export_block(partial),
        Err(EngineError::Kv(KvError::BlockNotFull(_)))
    ));
    assert!(matches!(
        e.add_sequence(&prompt(40, 12), &[partial]),
        Err(EngineError::Kv(KvError::BlockNotFull(_)))
    ));
    // Decoding fills it; then it is exportable.
    for t in 0..12 {
        e.decode_step(&[(s, 100 + t)]).unwrap();
    }
    assert_eq!(e.full_blocks(s).unwrap().len(), 2);
    assert!(e.export_block(partial).is_ok());
}

#[test]
fn greedy_output_depends_on_the_prompt() {
    let config = ModelConfig::default();
    let mut outputs = Vec::new();
    for text in ["Hello, world", "Once upon a time", "fn main() {"] {
        let mut e = engine(&config, 32);
        let s = e.add_sequence(&encode(text, true), &[]).unwrap();
        let (tokens, logits) = greedy(&mut e, s, 8);
        let mean = logits.iter().sum::<f32>() / logits.len() as f32;
        let std = (logits.iter().map(|l| (l - mean).powi(2)).sum::<f32>() / logits.len() as f32).sqrt();
        println!("{text:?} -> {:?} ({tokens:?}), logit std {std:.3}", decode(&tokens));
        assert!(std > 0.1, "logits are not degenerate");
        outputs.push(tokens);
    }
    assert_ne!(outputs[0], outputs[1]);
    assert_ne!(outputs[1], outputs[2]);
}

#[test]
fn temperature_sampling_is_reproducible() {
    let config = ModelConfig::tiny();
    let run = |seed| {
        let mut e = engine(&config, 64);
        let s = e.add_sequence(&prompt(10, 13), &[]).unwrap();
        let params = GenerationParams {
            max_tokens: 20,
            sampling: Sampling::Temperature { temperature: 1.0, seed },
        };
        e.generate(&[(s, params)]).unwrap().remove(0).tokens
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn generation_stops_at_max_tokens_eos_or_context() {
    let config = ModelConfig {
        max_context: 24,
        ..ModelConfig::tiny()
    };
    let mut e = engine(&config, 8);
    let s = e.add_sequence(&prompt(20, 14), &[]).unwrap();
    let g = e.generate(&[(s, GenerationParams::greedy(100))]).unwrap().remove(0);
    if g.finish_reason == FinishReason::Eos {
        assert_eq!(*g.tokens.last().unwrap(), EOS_TOKEN);
    } else {
        assert_eq!(g.finish_reason, FinishReason::ContextFull);
        assert_eq!(g.tokens.len(), 5, "4 fed back plus the last sampled");
        assert_eq!(e.sequence(s).unwrap().tokens().len(), 24);
    }

    let s2 = e.add_sequence(&prompt(3, 15), &[]).unwrap();
    let g = e.generate(&[(s2, GenerationParams::greedy(0))]).unwrap().remove(0);
    assert!(g.tokens.is_empty());
    assert_eq!(g.first_logits.len(), config.vocab_size);
    assert_eq!(g.finish_reason, FinishReason::MaxTokens);
}

#[test]
fn bad_input_is_a_typed_error_and_changes_nothing() {
    let config = ModelConfig::tiny();
    let mut e = engine(&config, 4);
    assert!(matches!(e.add_sequence(&[], &[]), Err(EngineError::EmptyPrompt)));
    let long = vec![65; config.max_context + 1];
    let err = e.add_sequence(&long, &[]).unwrap_err();
    assert!(matches!(err, EngineError::ContextExceeded { .. }));
    assert_eq!(err.kind(), ErrorKind::Capacity);
    assert!(matches!(
        e.add_sequence(&[1, 2, 999], &[]),
        Err(EngineError::InvalidToken { token: 999, .. })
    ));

    // Wrong-length and non-finite block bytes.
    let block_bytes = e.kv_layout().block_bytes();
    for bad in [vec![0u8; block_bytes - 1], vec![0u8; block_bytes + 4], Vec::new()] {
        let err = e.import_block(&bad).unwrap_err();
        assert!(matches!(err, EngineError::Kv(KvError::WrongBlockLength { .. })));
        assert_eq!(err.kind(), ErrorKind::Data);
        let err = e
            .add_sequence_from_bytes(&prompt(40, 1), &[vec![0u8; block_bytes], bad])
            .unwrap_err();
        assert!(matches!(err, EngineError::Kv(KvError::WrongBlockLength { .. })));
    }
    assert_eq!(e.pool().num_used(), 0, "failed imports leave nothing behind");
    assert!(e.sequence_ids().is_empty());

    // Pool exhaustion: 4 blocks of 16 tokens.
    let big = e.add_sequence(&prompt(65, 2), &[]).unwrap();
    let err = e.prefill(&[big]).unwrap_err();
    assert!(matches!(err, EngineError::Kv(KvError::PoolExhausted { needed: 5, .. })));
    assert_eq!(err.kind(), ErrorKind::Capacity);
    assert_eq!(e.pool().num_used(), 0);
    assert_eq!(e.prefill_tokens_computed(), 0);
    e.remove_sequence(big).unwrap();
    let s = e.add_sequence(&prompt(64, 2), &[]).unwrap();
    e.prefill(&[s]).unwrap();
    assert_eq!(e.pool().num_free(), 0);
    let err = e.decode_step(&[(s, 65)]).unwrap_err();
    assert!(matches!(err, EngineError::Kv(KvError::PoolExhausted { .. })));
    assert_eq!(
        e.sequence(s).unwrap().tokens().len(),
        64,
        "the failed step appended nothing"
    );
    let err = e.import_block(&vec![0u8; block_bytes]).unwrap_err();
    assert!(matches!(err, EngineError::Kv(KvError::PoolExhausted { .. })));

    // Batches.
    let other = e.add_sequence(&prompt(5, 3), &[]).unwrap();
    assert!(matches!(
        e.decode_step(&[(other, 1)]),
        Err(EngineError::NotPrefilled(_))
    ));
    assert!(matches!(e.prefill(&[s]), Err(EngineError::NothingToPrefill(_))));
    assert!(matches!(
        e.prefill(&[other, other]),
        Err(EngineError::DuplicateSequence(_))
    ));
    e.remove_sequence(other).unwrap();
    let err = e.prefill(&[other]).unwrap_err();
    assert!(matches!(err, EngineError::UnknownSequence(_)));
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(matches!(
        e.generate(&[(
            s,
            GenerationParams {
                max_tokens: 1,
                sampling: Sampling::Temperature {
                    temperature: f32::NAN,
                    seed: 0
                }
            }
        )]),
        Err(EngineError::InvalidSampling(_))
    ));
}
