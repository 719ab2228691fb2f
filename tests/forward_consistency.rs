//! Self-consistency of the CPU forward: padding, batching and the KV cache must not change results.

use elder::model::loader::{build_model, RandomSource};
use elder::model::runner::pad_batch;
use elder::model::{Arch, KvCache, Model, ModelConfig, NoAdapter};

fn tiny(arch: Arch) -> Model {
    let cfg = ModelConfig {
        arch,
        vocab_size: 97,
        hidden_size: 32,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: if arch == Arch::Llama { 2 } else { 4 },
        head_dim: 8,
        intermediate_size: 48,
        max_positions: 64,
        norm_eps: 1e-5,
        rope_theta: 10000.0,
        tie_word_embeddings: arch == Arch::Gpt2,
        bos_token_id: None,
        eos_token_id: None,
    };
    build_model(&cfg, &RandomSource { seed: 7 }).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn padded_batch_matches_single_sequences() {
    for arch in [Arch::Gpt2, Arch::Llama] {
        let m = tiny(arch);
        let seqs = vec![
            vec![1, 5, 9, 3, 7],
            vec![2, 4],
            vec![8, 6, 1, 2, 3, 4, 5, 9],
        ];
        let (batched, shape) = m.logits(&seqs, &mut NoAdapter);
        let v = m.cfg.vocab_size;
        for (b, s) in seqs.iter().enumerate() {
            let (single, _) = m.logits(std::slice::from_ref(s), &mut NoAdapter);
            let rows = &batched[b * shape.seq * v..][..s.len() * v];
            assert!(
                max_diff(rows, &single) < 1e-5,
                "{arch:?} seq {b}: {}",
                max_diff(rows, &single)
            );
        }
    }
}

#[test]
fn kv_cache_decode_matches_full_forward() {
    for arch in [Arch::Gpt2, Arch::Llama] {
        let m = tiny(arch);
        let seq: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6];
        let (full, _) = m.logits(std::slice::from_ref(&seq), &mut NoAdapter);
        let v = m.cfg.vocab_size;
        let mut cache = KvCache::new(&m.cfg, 1, seq.len());
        // Prefill 3 tokens, then one token at a time.
        let (ids, shape) = pad_batch(&[seq[..3].to_vec()], &[0]);
        m.forward_hidden(&ids, &shape, &mut cache, &mut NoAdapter);
        for (i, &tok) in seq.iter().enumerate().skip(3) {
            let (ids, shape) = pad_batch(&[vec![tok]], &cache.lens.clone());
            let h = m.forward_hidden(&ids, &shape, &mut cache, &mut NoAdapter);
            let (logits, _) = m.head(&h, &[0]);
            let diff = max_diff(&logits, &full[i * v..(i + 1) * v]);
            assert!(diff < 1e-5, "{arch:?} position {i}: {diff}");
        }
    }
}

#[test]
fn batched_generation_matches_single() {
    let m = tiny(Arch::Llama);
    let prompts = vec![vec![1, 2, 3], vec![9, 8, 7, 6, 5]];
    let batched = m.generate(&prompts, 6, None, &mut NoAdapter);
    for (p, b) in prompts.iter().zip(&batched) {
        let single = m.generate(std::slice::from_ref(p), 6, None, &mut NoAdapter);
        assert_eq!(&single[0], b);
        assert_eq!(b.len(), 6);
    }
}

#[test]
fn score_matches_logits() {
    let m = tiny(Arch::Gpt2);
    let prompt = vec![5, 6, 7];
    let target = vec![8, 9];
    let s = m.score(&prompt, &target, &mut NoAdapter);
    let (logits, _) = m.logits(&[vec![5, 6, 7, 8, 9]], &mut NoAdapter);
    let v = m.cfg.vocab_size;
    for (i, &t) in target.iter().enumerate() {
        let row = &logits[(2 + i) * v..(3 + i) * v];
        let lse = row.iter().map(|x| x.exp()).sum::<f32>().ln();
        assert!((s.logprobs[i] - (row[t as usize] - lse)).abs() < 1e-4);
        assert!(s.logprobs[i] < 0.0);
    }
}
