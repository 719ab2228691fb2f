//! The hand-written backward pass against central finite differences, on tiny GPT-2 and Llama
//! models, for every trainable tensor of every MoLoRA layer (experts and routers), with the guided
//! loss on. A wrong gradient anywhere between the loss and the first MoLoRA layer shows up here.

use elder::backend::cpu::ops::Routing;
use elder::elder::config::{AllocationMode, ElderConfig};
use elder::elder::molora::Elder;
use elder::elder::trainer::{preset_allocation, EditExample, PreparedBatch};
use elder::model::layers::MlpProj;
use elder::model::loader::{build_model, standard_normal, RandomSource};
use elder::model::{Arch, Model, ModelConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn tiny(arch: Arch) -> Model {
    let cfg = ModelConfig {
        arch,
        vocab_size: 61,
        hidden_size: 16,
        num_layers: 4,
        num_heads: 4,
        num_kv_heads: if arch == Arch::Llama { 2 } else { 4 },
        head_dim: 4,
        intermediate_size: 24,
        max_positions: 32,
        norm_eps: 1e-5,
        rope_theta: 10000.0,
        tie_word_embeddings: arch == Arch::Gpt2,
        bos_token_id: None,
        eos_token_id: None,
    };
    let mut m = build_model(&cfg, &RandomSource { seed: 11 }).unwrap();
    // Larger weights than a trained model's 0.02 so that every path carries a visible gradient.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    m.embed
        .iter_mut()
        .for_each(|v| *v = standard_normal(&mut rng));
    m
}

fn elder_for(model: &Model, proj: MlpProj, renormalize: bool) -> Elder {
    let cfg = ElderConfig {
        query_block: 0,
        query_proj: proj,
        molora_blocks: vec![1, 2],
        molora_proj: proj,
        num_experts: 4,
        rank: 3,
        alpha: 6.0,
        top_k: 2,
        renormalize,
        guide_weight: 0.3,
        allocation: AllocationMode::KnowledgeSeed,
        ..ElderConfig::default()
    };
    let mut e = Elder::new(cfg, &model.cfg).unwrap();
    // B starts at zero in the method; make it non-zero so A and the routers get gradients.
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for l in &mut e.layers {
        l.b.iter_mut()
            .for_each(|v| *v = 0.3 * standard_normal(&mut rng));
    }
    e
}

fn batch() -> Vec<EditExample> {
    vec![
        EditExample {
            prompt: vec![3, 17, 9, 22],
            target: vec![40, 7],
            knowledge_id: "a".into(),
        },
        EditExample {
            prompt: vec![5, 8],
            target: vec![33, 2, 50],
            knowledge_id: "b".into(),
        },
    ]
}

fn presets(cfg: &ElderConfig, batch: &[EditExample]) -> Vec<Vec<u32>> {
    let per: Vec<_> = batch
        .iter()
        .map(|e| preset_allocation(cfg, &e.knowledge_id))
        .collect();
    (0..cfg.molora_blocks.len())
        .map(|l| per.iter().flat_map(|p| p[l].clone()).collect())
        .collect()
}

fn check(arch: Arch, proj: MlpProj, renormalize: bool) {
    let model = tiny(arch);
    let mut elder = elder_for(&model, proj, renormalize);
    let batch = batch();
    let presets = presets(&elder.cfg, &batch);
    let mut prepared = PreparedBatch::new(&model, &elder, &batch).unwrap();
    let analytic = prepared.loss_and_grads(&model, &elder, Some(&presets));
    let base = analytic.total(&elder.cfg);
    assert!(base.is_finite() && base > 0.0);

    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let eps = 1e-2f32;
    let mut checked = 0;
    let mut worst: f32 = 0.0;
    for layer in 0..elder.layers.len() {
        for tensor in 0..4 {
            let len = elder.layers[layer].tensors_mut()[tensor].len();
            for _ in 0..6 {
                let i = rng.gen_range(0..len);
                let orig = elder.layers[layer].tensors_mut()[tensor][i];
                let mut eval = |v: f32, elder: &mut Elder| {
                    elder.layers[layer].tensors_mut()[tensor][i] = v;
                    let r = prepared.loss_and_grads(&model, elder, Some(&presets));
                    (r.total(&elder.cfg), r.chosen)
                };
                let (plus, chosen_p) = eval(orig + eps, &mut elder);
                let (minus, chosen_m) = eval(orig - eps, &mut elder);
                elder.layers[layer].tensors_mut()[tensor][i] = orig;
                if chosen_p != analytic.chosen || chosen_m != analytic.chosen {
                    continue; // the perturbation flipped a top-k choice: not differentiable there
                }
                let fd = (plus - minus) / (2.0 * eps);
                let an = analytic.grads[layer].tensors_mut_ref(tensor)[i];
                let err = (fd - an).abs();
                worst = worst.max(err / (1e-3 + an.abs()));
                assert!(
                    err <= 2e-3 + 3e-2 * an.abs(),
                    "{arch:?} {proj:?} layer {layer} tensor {tensor} index {i}: finite difference {fd}, analytic {an}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 30, "too few coordinates checked ({checked})");
    // The gradient must not be trivially zero.
    let norm: f32 = analytic
        .grads
        .iter()
        .flat_map(|g| g.a.iter())
        .map(|v| v * v)
        .sum();
    assert!(norm > 1e-8, "gradient of A is zero");
    eprintln!("{arch:?} {proj:?} renorm={renormalize}: {checked} coordinates, worst relative error {worst:.2e}");
}

trait TensorRef {
    fn tensors_mut_ref(&self, i: usize) -> &Vec<f32>;
}
impl TensorRef for elder::elder::molora::MoloraLayer {
    fn tensors_mut_ref(&self, i: usize) -> &Vec<f32> {
        [&self.a, &self.b, &self.w_r, &self.b_r][i]
    }
}

#[test]
fn gpt2_c_fc_gradients_match_finite_differences() {
    check(Arch::Gpt2, MlpProj::CFc, false);
}

#[test]
fn gpt2_c_proj_gradients_match_finite_differences() {
    check(Arch::Gpt2, MlpProj::CProj, true);
}

#[test]
fn llama_down_proj_gradients_match_finite_differences() {
    check(Arch::Llama, MlpProj::DownProj, false);
}

#[test]
fn llama_up_proj_gradients_match_finite_differences() {
    check(Arch::Llama, MlpProj::UpProj, true);
}

/// The trainer's fused head (norm, lm_head and cross-entropy in one pass over the vocabulary)
/// against the unfused path: logits, `ops::cross_entropy`, `head_backward`.
fn check_fused_head(arch: Arch) {
    use elder::backend::cpu::ops;
    let model = tiny(arch);
    let d = model.cfg.hidden_size;
    let rows_total = 9;
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let h: Vec<f32> = (0..rows_total * d)
        .map(|_| 2.0 * standard_normal(&mut rng))
        .collect();
    let rows = [1usize, 4, 5, 8];
    let targets = [7u32, 60, 0, 33];
    let weight = 0.5;

    let (logits, tape) = model.head(&h, &rows);
    let mut dlogits = vec![0.0f32; logits.len()];
    let some: Vec<Option<u32>> = targets.iter().map(|&t| Some(t)).collect();
    let want = ops::cross_entropy(&logits, model.cfg.vocab_size, &some, weight, &mut dlogits);
    let mut want_dh = vec![0.1f32; h.len()];
    model.head_backward(&tape, &dlogits, &mut want_dh);

    let mut got_dh = vec![0.1f32; h.len()];
    let got = model.head_loss(&h, &rows, &targets, weight, &mut got_dh);
    assert!(
        (got - want).abs() <= 1e-5 * want.abs(),
        "{arch:?}: loss {got} vs {want}"
    );
    for (i, (g, w)) in got_dh.iter().zip(&want_dh).enumerate() {
        assert!((g - w).abs() <= 1e-5, "{arch:?}: dh[{i}] {g} vs {w}");
    }
    // Rows without a target keep what was in dh.
    assert!(
        got_dh[..d].iter().all(|&v| v == 0.1),
        "{arch:?}: row 0 changed"
    );
}

#[test]
fn fused_head_loss_matches_the_unfused_head_gpt2() {
    check_fused_head(Arch::Gpt2);
}

#[test]
fn fused_head_loss_matches_the_unfused_head_llama() {
    check_fused_head(Arch::Llama);
}

/// Per MoLoRA layer, each sequence's preset experts with gate 1 (the stored allocation).
fn preset_routing(elder: &Elder, batch: &[EditExample]) -> Vec<Routing> {
    let allocations: Vec<Vec<Vec<u32>>> = batch
        .iter()
        .map(|e| preset_allocation(&elder.cfg, &e.knowledge_id))
        .collect();
    elder.fixed_routing(
        &allocations
            .iter()
            .map(|a| Some(a.as_slice()))
            .collect::<Vec<_>>(),
    )
}

/// Experts under the stored allocation acting on the answer rows (`expert_rows = "answer"`), on
/// each architecture's MLP projection.
fn stored_answer_elder(model: &Model) -> Elder {
    use elder::elder::config::{ExpertRows, InferenceAllocation};
    let proj = match model.cfg.arch {
        Arch::Gpt2 => MlpProj::CFc,
        Arch::Llama => MlpProj::DownProj,
    };
    let mut elder = elder_for(model, proj, false);
    elder.cfg.inference_allocation = InferenceAllocation::Stored;
    elder.cfg.expert_rows = ExpertRows::Answer;
    elder
}

/// `expert_rows = "answer"` trains on the answer windows only (the frozen rows' keys and values
/// computed once): the losses, argmaxes and every gradient must be those of the full pass that
/// masks the rows before each answer, on both architectures and with a one-token prompt (no
/// frozen rows at all) in the batch.
fn check_answer_window(arch: Arch) {
    use elder::elder::trainer::RowOptions;
    let model = tiny(arch);
    let elder = stored_answer_elder(&model);
    let mut batch = batch();
    batch.push(EditExample {
        prompt: vec![12],
        target: vec![4, 19],
        knowledge_id: "c".into(),
    });
    let routing = preset_routing(&elder, &batch);
    let n_targets: usize = batch.iter().map(|e| e.target.len()).sum();
    let weights: Vec<f32> = (0..n_targets).map(|i| 0.5 + 0.1 * i as f32).collect();
    let answer_from: Vec<usize> = batch.iter().map(|e| e.prompt.len() - 1).collect();

    let mut full = PreparedBatch::weighted(&model, &elder, &batch, weights.clone()).unwrap();
    assert!(!full.is_windowed());
    let want = full.loss_and_grads_routed(
        &model,
        &elder,
        &routing,
        RowOptions {
            answer_from: Some(&answer_from),
            ..RowOptions::default()
        },
    );
    let mut window = PreparedBatch::answer_window(&model, &elder, &batch, weights).unwrap();
    assert!(window.is_windowed());
    let got = window.loss_and_grads_routed(&model, &elder, &routing, RowOptions::default());

    let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 + 1e-4 * a.abs().max(b.abs());
    let (want_rows, got_rows) = (want.rows.unwrap(), got.rows.unwrap());
    assert_eq!(want_rows.argmax, got_rows.argmax, "{arch:?}: argmax");
    for (w, g) in want_rows.loss.iter().zip(&got_rows.loss) {
        assert!(
            close(*w, *g),
            "{arch:?}: row loss {g} (window) vs {w} (full)"
        );
    }
    assert!(
        close(want.ce, got.ce),
        "{arch:?}: loss {} vs {}",
        got.ce,
        want.ce
    );
    let mut nonzero = 0;
    let (mut diff2, mut norm2) = (0.0f64, 0.0f64);
    for (wl, gl) in want.grads.iter().zip(&got.grads) {
        for (wt, gt) in wl.a.iter().chain(&wl.b).zip(gl.a.iter().chain(&gl.b)) {
            assert!(
                close(*wt, *gt),
                "{arch:?}: gradient {gt} (window) vs {wt} (full)"
            );
            nonzero += usize::from(wt.abs() > 1e-6);
            diff2 += f64::from(wt - gt).powi(2);
            norm2 += f64::from(*wt).powi(2);
        }
    }
    assert!(
        nonzero > 20,
        "{arch:?}: the gradients are (nearly) all zero"
    );
    // As a whole too: the paths through the cached keys and values carry a small part of the
    // gradient (on the tiny Llama, about 1e-3 of it), which the element-wise bound could miss.
    let relative = (diff2 / norm2).sqrt();
    assert!(
        relative < 2e-5,
        "{arch:?}: gradient off by {relative:.2e} of its norm"
    );
}

#[test]
fn answer_window_matches_the_masked_full_pass_gpt2() {
    check_answer_window(Arch::Gpt2);
}

#[test]
fn answer_window_matches_the_masked_full_pass_llama() {
    check_answer_window(Arch::Llama);
}

/// Dropping sequences from a prepared batch (`retain`, what a batch of edits does once an edit
/// has learned) leaves exactly the batch prepared from the kept sequences alone: same row
/// losses, argmaxes and gradients, for answer windows and for full passes.
fn check_retain(arch: Arch, windowed: bool) {
    use elder::elder::trainer::RowOptions;
    let model = tiny(arch);
    let elder = stored_answer_elder(&model);
    let mut batch = batch();
    batch.push(EditExample {
        prompt: vec![12, 30, 1, 2, 9, 44],
        target: vec![4],
        knowledge_id: "c".into(),
    });
    let keep = [true, false, true];
    let weights_of = |b: &[EditExample]| -> Vec<f32> {
        b.iter()
            .flat_map(|e| e.target.iter().map(|&t| 0.25 + 0.01 * t as f32))
            .collect()
    };
    let prepare = |b: &[EditExample]| {
        if windowed {
            PreparedBatch::answer_window(&model, &elder, b, weights_of(b)).unwrap()
        } else {
            PreparedBatch::weighted(&model, &elder, b, weights_of(b)).unwrap()
        }
    };
    let run = |prepared: &mut PreparedBatch, b: &[EditExample]| {
        let routing = preset_routing(&elder, b);
        let answer_from: Vec<usize> = b.iter().map(|e| e.prompt.len() - 1).collect();
        let options = RowOptions {
            answer_from: (!windowed).then_some(answer_from.as_slice()),
            ..RowOptions::default()
        };
        prepared.loss_and_grads_routed(&model, &elder, &routing, options)
    };
    let subset: Vec<EditExample> = batch
        .iter()
        .zip(keep)
        .filter(|(_, k)| *k)
        .map(|(e, _)| e.clone())
        .collect();
    let mut alone = prepare(&subset);
    let want = run(&mut alone, &subset);
    let mut whole = prepare(&batch);
    let _ = run(&mut whole, &batch);
    let kept_rows = whole.retain(&keep);
    assert_eq!(kept_rows, vec![0, 1, 5], "{arch:?}: kept target rows");
    let got = run(&mut whole, &subset);

    let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 + 1e-4 * a.abs().max(b.abs());
    let (w, g) = (want.rows.unwrap(), got.rows.unwrap());
    assert_eq!(w.argmax, g.argmax, "{arch:?} windowed={windowed}: argmax");
    for (a, b) in w.loss.iter().zip(&g.loss) {
        assert!(
            close(*a, *b),
            "{arch:?} windowed={windowed}: row loss {b} vs {a}"
        );
    }
    for (wl, gl) in want.grads.iter().zip(&got.grads) {
        for (a, b) in wl.a.iter().chain(&wl.b).zip(gl.a.iter().chain(&gl.b)) {
            assert!(
                close(*a, *b),
                "{arch:?} windowed={windowed}: gradient {b} vs {a}"
            );
        }
    }
}

#[test]
fn retained_sequences_train_as_if_prepared_alone() {
    for arch in [Arch::Gpt2, Arch::Llama] {
        check_retain(arch, true);
        check_retain(arch, false);
    }
}

/// The CPU's stored steps run a batch in length buckets, each padded on its own: the row
/// losses, argmaxes and summed gradients are those of the batch padded as one, before and after
/// sequences leave it (one leaving a bucket it shares, one emptying its bucket), with answer
/// windows and with full passes.
fn check_buckets(arch: Arch, windowed: bool) {
    use elder::elder::config::ExpertRows;
    use elder::elder::train_stored::{CpuSteps, StoredBatch, StoredSteps};
    use elder::elder::trainer::RowOptions;
    let model = tiny(arch);
    let mut elder = stored_answer_elder(&model);
    if !windowed {
        elder.cfg.expert_rows = ExpertRows::All;
    }
    let seq = |prompt: &[u32], target: &[u32], kid: &str| EditExample {
        prompt: prompt.to_vec(),
        target: target.to_vec(),
        knowledge_id: kid.into(),
    };
    let examples = vec![
        seq(&[3, 17], &[40], "a"),
        seq(&[5, 8, 1, 2, 3, 4, 5, 6, 7], &[33, 2], "b"),
        seq(&[9, 21], &[12], "c"),
        seq(&[12, 30, 1, 2, 9, 44, 7, 7, 8, 9], &[4], "d"),
        seq(
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
            &[6, 50],
            "e",
        ),
    ];
    let weights_of = |b: &[EditExample]| -> Vec<f32> {
        b.iter()
            .flat_map(|e| e.target.iter().map(|&t| 0.25 + 0.01 * t as f32))
            .collect()
    };
    let allocations_of = |b: &[EditExample]| -> Vec<Vec<Vec<u32>>> {
        b.iter()
            .map(|e| preset_allocation(&elder.cfg, &e.knowledge_id))
            .collect()
    };
    // The reference: the sequences padded as one batch.
    let reference = |b: &[EditExample]| {
        let mut prepared = if windowed {
            PreparedBatch::answer_window(&model, &elder, b, weights_of(b)).unwrap()
        } else {
            PreparedBatch::weighted(&model, &elder, b, weights_of(b)).unwrap()
        };
        let routing = preset_routing(&elder, b);
        prepared.loss_and_grads_routed(&model, &elder, &routing, RowOptions::default())
    };
    let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 + 1e-4 * a.abs().max(b.abs());
    let compare = |steps: &mut CpuSteps, b: &[EditExample], what: &str| {
        let want = reference(b);
        let got = steps.losses().unwrap();
        let w = want.rows.unwrap();
        assert_eq!(
            w.argmax, got.argmax,
            "{arch:?} windowed={windowed} {what}: argmax"
        );
        assert_eq!(w.loss.len(), got.loss.len());
        for (a, g) in w.loss.iter().zip(&got.loss) {
            assert!(
                close(*a, *g),
                "{arch:?} windowed={windowed} {what}: loss {g} vs {a}"
            );
        }
        let mut moved = 0;
        for (wl, gl) in want.grads.iter().zip(steps.last_grads()) {
            assert_eq!(wl.b.len(), gl.b.len());
            for (a, g) in wl.a.iter().chain(&wl.b).zip(gl.a.iter().chain(&gl.b)) {
                assert!(
                    close(*a, *g),
                    "{arch:?} windowed={windowed} {what}: grad {g} vs {a}"
                );
                moved += (*a != 0.0) as usize;
            }
        }
        assert!(moved > 0, "{what}: no gradient to compare");
    };

    let batch = StoredBatch {
        weights: weights_of(&examples),
        allocations: allocations_of(&examples),
        subject_rows: vec![0; examples.len()],
        positive: vec![true; examples.len()],
        examples: examples.clone(),
    };
    let mut steps = CpuSteps::new(&model).with_bucket_overhead(1);
    steps.prepare(elder.clone(), &batch).unwrap();
    // Lengths 3, 11, 3, 11, 16: the two short ones together, the two of 11 together. Answer
    // windows iterate as one batch; their frozen pass ran in those buckets (prompt lengths).
    let buckets = |n: usize| if windowed { 1 } else { n };
    assert_eq!(
        steps.buckets(),
        buckets(3),
        "{arch:?} windowed={windowed}: buckets"
    );
    compare(&mut steps, &examples, "whole batch");

    let keep = [true, true, false, false, true];
    let kept_rows = steps.retain(&keep).unwrap();
    assert_eq!(kept_rows, vec![0, 1, 2, 5, 6], "{arch:?}: kept target rows");
    assert_eq!(steps.buckets(), buckets(3));
    let subset: Vec<EditExample> = examples
        .iter()
        .zip(keep)
        .filter(|(_, k)| *k)
        .map(|(e, _)| e.clone())
        .collect();
    compare(&mut steps, &subset, "after retain");
    // Dropping the last of a bucket leaves the others.
    let kept_rows = steps.retain(&[true, false, true]).unwrap();
    assert_eq!(kept_rows, vec![0, 3, 4]);
    assert_eq!(steps.buckets(), buckets(2));
    compare(
        &mut steps,
        &[examples[0].clone(), examples[4].clone()],
        "after a bucket left",
    );

    // A bucket dearer than any padding: one batch, bit for bit the reference.
    let mut one = CpuSteps::new(&model).with_bucket_overhead(10_000);
    one.prepare(elder.clone(), &batch).unwrap();
    assert_eq!(one.buckets(), 1);
    let got = one.losses().unwrap();
    assert_eq!(got.loss, reference(&examples).rows.unwrap().loss);
}

#[test]
fn length_buckets_train_as_one_padded_batch() {
    for arch in [Arch::Gpt2, Arch::Llama] {
        check_buckets(arch, true);
        check_buckets(arch, false);
    }
}

/// The stored trainer's fast layout: sequences without their last target token, the last block
/// only on the rows the head reads and the rows before them for keys and values only
/// ([`elder::elder::last_block`]), the first MoLoRA block's frozen MLP computed once per batch.
/// Across iterations that change the experts and a retain, the row losses, argmaxes and
/// gradients must be those of a batch prepared afresh with every row run in full, with a
/// one-token prompt (no rows before its answer) and sequences of other lengths in the batch.
#[test]
fn the_last_block_on_target_rows_trains_as_the_whole_block() {
    use elder::elder::config::{ExpertRows, InferenceAllocation};
    use elder::elder::trainer::RowOptions;
    for arch in [Arch::Gpt2, Arch::Llama] {
        let model = tiny(arch);
        let proj = match arch {
            Arch::Gpt2 => MlpProj::CProj,
            Arch::Llama => MlpProj::DownProj,
        };
        let mut elder = elder_for(&model, proj, false);
        elder.cfg.inference_allocation = InferenceAllocation::Stored;
        elder.cfg.expert_rows = ExpertRows::All;
        let mut batch = batch();
        batch.push(EditExample {
            prompt: vec![12],
            target: vec![4, 19],
            knowledge_id: "c".into(),
        });
        batch.push(EditExample {
            prompt: vec![12, 30, 1, 2, 9, 44, 7],
            target: vec![4],
            knowledge_id: "d".into(),
        });
        let weights_of = |b: &[EditExample]| -> Vec<f32> {
            b.iter()
                .flat_map(|e| e.target.iter().map(|&t| 0.25 + 0.01 * t as f32))
                .collect()
        };
        let mut split =
            PreparedBatch::weighted(&model, &elder, &batch, weights_of(&batch)).unwrap();
        assert!(
            split.splits_last_block(&model, &elder),
            "{arch:?}: no split to test"
        );
        let mut kept = batch.clone();
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        for round in 0..3 {
            if round > 0 {
                // An optimiser step's worth of change in every expert.
                for l in &mut elder.layers {
                    l.b.iter_mut()
                        .for_each(|v| *v += 0.1 * standard_normal(&mut rng));
                }
            }
            if round == 2 {
                let keep = [true, false, true, true];
                split.retain(&keep);
                kept = kept
                    .into_iter()
                    .zip(keep)
                    .filter(|(_, k)| *k)
                    .map(|(e, _)| e)
                    .collect();
            }
            let routing = preset_routing(&elder, &kept);
            let mut whole =
                PreparedBatch::weighted_in_full(&model, &elder, &kept, weights_of(&kept)).unwrap();
            assert!(!whole.splits_last_block(&model, &elder));
            let want = whole.loss_and_grads_routed(&model, &elder, &routing, RowOptions::default());
            let got = split.loss_and_grads_routed(&model, &elder, &routing, RowOptions::default());
            let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 + 1e-4 * a.abs().max(b.abs());
            let (w, g) = (want.rows.unwrap(), got.rows.unwrap());
            assert_eq!(w.argmax, g.argmax, "{arch:?} round {round}: argmax");
            for (a, b) in w.loss.iter().zip(&g.loss) {
                assert!(close(*a, *b), "{arch:?} round {round}: row loss {b} vs {a}");
            }
            let (mut diff2, mut norm2) = (0.0f64, 0.0f64);
            for (wl, gl) in want.grads.iter().zip(&got.grads) {
                for (a, b) in wl.a.iter().chain(&wl.b).zip(gl.a.iter().chain(&gl.b)) {
                    assert!(close(*a, *b), "{arch:?} round {round}: gradient {b} vs {a}");
                    diff2 += f64::from(a - b).powi(2);
                    norm2 += f64::from(*a).powi(2);
                }
            }
            assert!(
                norm2 > 1e-6,
                "{arch:?}: the gradients are (nearly) all zero"
            );
            // As a whole: the path through the earlier rows' keys and values is a small part of
            // the gradient, which the element-wise bound alone could miss.
            let relative = (diff2 / norm2).sqrt();
            assert!(
                relative < 2e-6,
                "{arch:?} round {round}: gradient off by {relative:.2e}"
            );
        }
    }
}
