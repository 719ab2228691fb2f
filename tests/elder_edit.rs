//! ELDER end to end on a tiny random model: edits take, deferral leaves other sequences exactly at
//! the base model, and training is reproducible bit for bit.

use elder::elder::config::{ElderConfig, QueryPooling};
use elder::elder::molora::{Elder, ElderAdapter};
use elder::elder::trainer::{apply_edit_batch, EditExample};
use elder::eval::{score_pairs, Evaluator, Protocol, TokenizedEdit};
use elder::model::layers::MlpProj;
use elder::model::loader::{build_model, RandomSource};
use elder::model::runner::prompt_rows;
use elder::model::{Arch, Model, ModelConfig, NoAdapter};

fn tiny(arch: Arch) -> Model {
    let cfg = ModelConfig {
        arch,
        vocab_size: 113,
        hidden_size: 32,
        num_layers: 4,
        num_heads: 4,
        num_kv_heads: if arch == Arch::Llama { 2 } else { 4 },
        head_dim: 8,
        intermediate_size: 64,
        max_positions: 64,
        norm_eps: 1e-5,
        rope_theta: 10000.0,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
    };
    build_model(&cfg, &RandomSource { seed: 21 }).unwrap()
}

fn config(model: &Model) -> ElderConfig {
    let proj = if model.cfg.arch == Arch::Gpt2 {
        MlpProj::CFc
    } else {
        MlpProj::DownProj
    };
    ElderConfig {
        query_block: 0,
        query_proj: proj,
        molora_blocks: vec![1, 2, 3],
        molora_proj: proj,
        iterations: 40,
        learning_rate: 2e-2,
        ..ElderConfig::default()
    }
}

fn edits() -> Vec<EditExample> {
    vec![
        EditExample {
            prompt: vec![10, 11, 12, 13],
            target: vec![90, 91],
            knowledge_id: "k1".into(),
        },
        EditExample {
            prompt: vec![20, 21, 22],
            target: vec![80],
            knowledge_id: "k2".into(),
        },
        EditExample {
            prompt: vec![30, 31, 32, 33, 34],
            target: vec![70, 71, 72],
            knowledge_id: "k3".into(),
        },
    ]
}

#[test]
fn edits_take_and_are_reproducible() {
    for arch in [Arch::Gpt2, Arch::Llama] {
        let model = tiny(arch);
        let tokenize = |e: &EditExample| TokenizedEdit {
            id: e.knowledge_id.clone(),
            knowledge_id: e.knowledge_id.clone(),
            prompt: e.prompt.clone(),
            target: e.target.clone(),
            rephrases: vec![],
            locality: vec![(vec![50, 51, 52], vec![53, 54])],
            locality_kinds: vec![None],
        };
        // Protocol "each": every edit scored right after it was applied.
        let run = |ev: &mut Evaluator| {
            let mut elder = Elder::new(config(&model), &model.cfg).unwrap();
            for e in edits() {
                let report =
                    apply_edit_batch(&model, &mut elder, std::slice::from_ref(&e), |_, _| {})
                        .unwrap();
                assert!(
                    report.last_loss < report.first_loss,
                    "{arch:?}: loss did not drop: {report:?}"
                );
                ev.add(&model, &elder, &[tokenize(&e)]);
            }
            elder
        };
        let mut ev = Evaluator::default();
        let elder = run(&mut ev);
        assert_eq!(elder.codebook.len(), 3);
        let m = ev.metrics(Protocol::Each);
        assert_eq!(m.edits, 3);
        assert_eq!(
            m.in_scope_edits, 1.0,
            "{arch:?}: edit prompts must be in scope: {m:?}"
        );
        assert_eq!(m.reliability, 1.0, "{arch:?}: {m:?}");
        assert!(m.locality >= 0.0 && m.locality <= 1.0);
        // Same seed and input: the same state, bit for bit.
        let again = run(&mut Evaluator::default());
        assert!(elder == again, "{arch:?}: training is not reproducible");
    }
}

#[test]
fn out_of_scope_sequences_get_exactly_the_base_logits() {
    let model = tiny(Arch::Llama);
    let mut elder = Elder::new(config(&model), &model.cfg).unwrap();
    apply_edit_batch(&model, &mut elder, &edits()[..1], |_, _| {}).unwrap();
    let prompt: &[u32] = &[60, 61, 62, 63];
    let cont: &[u32] = &[64, 65];
    // Threshold 0: nothing is ever in scope.
    elder.cfg.threshold = 0;
    let edited = score_pairs(&model, Some(&elder), &[(prompt, cont)]).unwrap();
    assert!(!edited[0].in_scope);
    let seq = [prompt, cont].concat();
    let (base, _) = model.logits(std::slice::from_ref(&seq), &mut NoAdapter);
    let mut adapter = ElderAdapter::single(&elder, prompt.len());
    let (with, _) = model.logits(std::slice::from_ref(&seq), &mut adapter);
    assert_eq!(base, with, "out-of-scope logits differ from the base model");
    // Empty codebook: nothing in scope either.
    elder.cfg.threshold = 100;
    elder.codebook = elder::elder::codebook::Codebook::new(elder.cfg.code_bits()).unwrap();
    let mut adapter = ElderAdapter::single(&elder, prompt.len());
    let (with, _) = model.logits(std::slice::from_ref(&seq), &mut adapter);
    assert_eq!(base, with);
}

#[test]
fn generation_keeps_the_prompt_routing() {
    let model = tiny(Arch::Gpt2);
    let mut elder = Elder::new(config(&model), &model.cfg).unwrap();
    let e = &edits()[2];
    apply_edit_batch(&model, &mut elder, std::slice::from_ref(e), |_, _| {}).unwrap();
    let mut adapter = ElderAdapter::single(&elder, e.prompt.len());
    let out = model.generate(std::slice::from_ref(&e.prompt), 3, None, &mut adapter);
    assert_eq!(adapter.in_scope, vec![true]);
    assert_eq!(
        out[0], e.target,
        "greedy generation with the KV cache must produce the edit"
    );
}

#[test]
fn prompt_mean_pooling_averages_only_each_prompts_rows() {
    let model = tiny(Arch::Gpt2);
    let cfg = ElderConfig {
        query_pooling: QueryPooling::PromptMean,
        ..config(&model)
    };
    let elder = Elder::new(cfg, &model.cfg).unwrap();
    // Two sequences padded to 4 rows each; prompts of 3 and 2 rows; the rest is padding/target.
    let d = 5;
    let x: Vec<f32> = (0..8 * d).map(|i| (i as f32 * 0.37).sin()).collect();
    let rows = prompt_rows(4, [3, 2]);
    assert_eq!(rows, vec![0..3, 4..6]);
    let q = elder.pool_query(&x, d, &rows);
    for (b, r) in rows.iter().enumerate() {
        for j in 0..d {
            let want: f32 = r.clone().map(|row| x[row * d + j]).sum::<f32>() / r.len() as f32;
            assert!((q[b * d + j] - want).abs() < 1e-6, "seq {b} dim {j}");
        }
    }
    // Last-token pooling reads exactly the last prompt row.
    let last = Elder::new(config(&model), &model.cfg).unwrap();
    let q = last.pool_query(&x, d, &rows);
    assert_eq!(&q[..d], &x[2 * d..3 * d]);
    assert_eq!(&q[d..], &x[5 * d..6 * d]);
}

#[test]
fn edits_take_with_prompt_mean_pooling() {
    let model = tiny(Arch::Llama);
    let cfg = ElderConfig {
        query_pooling: QueryPooling::PromptMean,
        ..config(&model)
    };
    let mut elder = Elder::new(cfg, &model.cfg).unwrap();
    for e in edits() {
        apply_edit_batch(&model, &mut elder, std::slice::from_ref(&e), |_, _| {}).unwrap();
    }
    // The last edit, scored in a padded batch next to a longer unrelated sequence: the padding
    // must not leak into its query, so it routes exactly as during training and keeps its target.
    let e = &edits()[2];
    let other: (&[u32], &[u32]) = (&[40, 41, 42, 43, 44, 45, 46], &[47]);
    let scored = score_pairs(
        &model,
        Some(&elder),
        &[(e.prompt.as_slice(), e.target.as_slice()), other],
    )
    .unwrap();
    assert!(scored[0].in_scope);
    assert_eq!(scored[0].distance, Some(0), "{:?}", scored[0]);
    assert_eq!(scored[0].argmax, e.target, "{:?}", scored[0]);
}

#[test]
fn router_lr_scale_zero_freezes_the_routers_but_not_the_experts() {
    let model = tiny(Arch::Gpt2);
    let cfg = ElderConfig {
        router_lr_scale: 0.0,
        ..config(&model)
    };
    let mut elder = Elder::new(cfg, &model.cfg).unwrap();
    let before = elder.clone();
    apply_edit_batch(&model, &mut elder, &edits()[..1], |_, _| {}).unwrap();
    for (l, b) in elder.layers.iter().zip(&before.layers) {
        assert_eq!(l.w_r, b.w_r);
        assert_eq!(l.b_r, b.b_r);
        assert_ne!(l.b, b.b, "experts must still train");
    }
    // A scale of 1 moves the routers.
    let mut moving = Elder::new(config(&model), &model.cfg).unwrap();
    apply_edit_batch(&model, &mut moving, &edits()[..1], |_, _| {}).unwrap();
    assert_ne!(moving.layers[0].w_r, before.layers[0].w_r);
}
