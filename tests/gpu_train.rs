//! The CUDA edit step against the CPU trainer, on random tiny GPT-2 and Llama models: the loss and
//! gradients of the first iteration, the loss of every iteration, the trained experts and routers
//! and the codebook codes after a whole edit batch, and no allocation once the buffers fit.
//!
//! Cases cover both families, MoLoRA on the first and on the output projection of the MLP, both
//! allocation modes (knowledge-seeded presets and the routers' own first choice), renormalised
//! gates, query centring, batches of one to three edits of different lengths (padding rows), and a
//! block above the last MoLoRA block. The CPU reference runs on the weights rounded through the
//! GPU dtype, so the comparison measures the training step, not the weight rounding.
//!
//! Tolerances (`Tol`) are first guesses: nothing here has run on a GPU yet, and each check prints
//! its measured difference so the first GPU run can tighten them. Gradients and weight updates are
//! compared by relative L2 error per tensor (`|gpu - cpu| / |cpu|`), which stays meaningful where
//! single elements are near zero.
//!
//! Each test builds its cases on the CPU (and checks they mean something: the CPU trainer lowers
//! the loss, the routing is decisive) before asking for a GPU, so that part runs everywhere; without
//! a GPU it runs on the CUDA emulator (`EMULATED <test>`) or prints `SKIP <test>: <reason>`.

mod common;

use std::sync::Arc;

use cudarc::cublas::{CudaBlas, Gemm};
use elder::backend::cuda::adam::LossScalePolicy;
use elder::backend::cuda::{GpuDevice, KernelDtype};
use elder::data::EditRecord;
use elder::elder::config::{AllocationMode, ElderConfig};
use elder::elder::molora::{Elder, MoloraLayer};
use elder::elder::trainer::{
    apply_edit_batch, batch_presets, calibrate_query_mean, queries, EditExample, PreparedBatch,
};
use elder::model::checkpoint::StoreDtype;
use elder::model::layers::{MlpProj, Norm};
use elder::model::presets::write_random_checkpoint;
use elder::model::{Arch, Model};
use elder::runtime::cuda::{open_gpu_editor, Capacity, GpuDtype, GpuTrainer};
use elder::session::{apply_stream, apply_stream_on, BaseModel, EditDevice, EditSession};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use common::{assert_close, rounded, tiny};

type Dev = Arc<GpuDevice>;

/// Per-dtype tolerances: the loss `(atol, rtol)`, and relative L2 errors of the first iteration's
/// gradients and of the whole batch's weight updates.
struct Tol {
    loss: (f32, f32),
    grad: f32,
    update: f32,
    /// Smallest top-k margin of the routers at which the GPU must choose the CPU's experts.
    margin: f32,
}

fn tol<T: KernelDtype>() -> Tol {
    match T::SUFFIX {
        "f32" => Tol {
            loss: (2e-4, 2e-4),
            grad: 1e-3,
            update: 2e-3,
            margin: 1e-4,
        },
        "f16" => Tol {
            loss: (2e-2, 2e-2),
            grad: 5e-2,
            update: 0.2,
            margin: 2e-2,
        },
        _ => Tol {
            loss: (5e-2, 5e-2),
            grad: 0.15,
            update: 0.4,
            margin: 5e-2,
        },
    }
}

/// `|gpu - cpu| / |cpu|` (0 when both are zero, infinite when only the CPU's is).
fn rel_l2(gpu: &[f32], cpu: &[f32]) -> f32 {
    assert_eq!(gpu.len(), cpu.len());
    let diff: f32 = gpu.iter().zip(cpu).map(|(g, c)| (g - c) * (g - c)).sum();
    let norm: f32 = cpu.iter().map(|c| c * c).sum();
    if diff == 0.0 {
        0.0
    } else if norm == 0.0 {
        f32::INFINITY
    } else {
        (diff / norm).sqrt()
    }
}

/// Asserts every tensor of every layer within `max` relative L2 error; returns the worst.
#[track_caller]
fn assert_layers_close(what: &str, gpu: &[MoloraLayer], cpu: &[MoloraLayer], max: f32) -> f32 {
    assert_eq!(gpu.len(), cpu.len(), "{what}: layer count");
    let names = ["A", "B", "router W", "router b"];
    let mut worst = 0.0f32;
    for (l, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        let (mut g, mut c) = (g.clone(), c.clone());
        for ((gt, ct), name) in g.tensors_mut().into_iter().zip(c.tensors_mut()).zip(names) {
            let e = rel_l2(gt, ct);
            assert!(
                e <= max, // false for NaN
                "{what}: layer {l} {name}: relative L2 error {e:.3e} > {max:.1e}"
            );
            worst = worst.max(e);
        }
    }
    worst
}

/// What training changed: `trained - init`, per layer.
fn updates(trained: &[MoloraLayer], init: &[MoloraLayer]) -> Vec<MoloraLayer> {
    trained
        .iter()
        .zip(init)
        .map(|(t, i)| {
            let mut d = t.clone();
            let mut i = i.clone();
            for (dv, iv) in d.tensors_mut().into_iter().zip(i.tensors_mut()) {
                dv.iter_mut().zip(iv.iter()).for_each(|(a, b)| *a -= b);
            }
            d
        })
        .collect()
}

/// The smallest gap between the k-th and (k+1)-th router probability over layers and sequences:
/// below the dtype's noise the GPU may legitimately choose other experts.
fn routing_margin(model: &Model, elder: &Elder, batch: &[EditExample]) -> f32 {
    let prompts: Vec<Vec<u32>> = batch.iter().map(|e| e.prompt.clone()).collect();
    let q = queries(model, elder, &prompts);
    elder
        .route_all(&q)
        .iter()
        .flat_map(|r| {
            r.probs
                .chunks(r.num_experts)
                .map(|p| {
                    let mut p = p.to_vec();
                    p.sort_by(|a, b| b.total_cmp(a));
                    p[r.k - 1] - p[r.k]
                })
                .collect::<Vec<_>>()
        })
        .fold(f32::INFINITY, f32::min)
}

// ---------------------------------------------------------------- cases

struct Case {
    name: String,
    model: Model,
    elder: Elder,
    batch: Vec<EditExample>,
}

struct Spec {
    arch: Arch,
    proj: MlpProj,
    allocation: AllocationMode,
    edits: usize,
    centering: bool,
    renormalize: bool,
}

fn case(spec: Spec, seed: u64) -> Case {
    let model = tiny(spec.arch, seed);
    // The query is read where the MoLoRA input width is the same (validated by the config).
    let query_proj = match spec.proj {
        MlpProj::UpProj => MlpProj::GateProj,
        p => p,
    };
    let cfg = ElderConfig {
        query_block: 0,
        query_proj,
        molora_blocks: vec![1, 2], // block 3 sits above the last MoLoRA block
        molora_proj: spec.proj,
        num_experts: 4,
        rank: 4,
        alpha: 8.0,
        top_k: 2,
        renormalize: spec.renormalize,
        allocation: spec.allocation,
        iterations: 8,
        learning_rate: 5e-3,
        router_lr_scale: 0.5,
        lr_decay_every: 3,
        lr_decay_factor: 0.5,
        query_centering: spec.centering,
        seed,
        ..ElderConfig::default()
    };
    let mut elder = Elder::new(cfg, &model.cfg).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7a1);
    let vocab = model.cfg.vocab_size as u32;
    let tokens = |rng: &mut ChaCha8Rng, n: usize| -> Vec<u32> {
        (0..n).map(|_| rng.gen_range(0..vocab)).collect()
    };
    let batch: Vec<EditExample> = (0..spec.edits)
        .map(|i| EditExample {
            // Different lengths, so batches of several edits have padding rows.
            prompt: tokens(&mut rng, 3 + 2 * i),
            target: tokens(&mut rng, 1 + i % 3),
            knowledge_id: format!("fact-{i}"),
        })
        .collect();
    if spec.centering {
        let calib: Vec<Vec<u32>> = (0..12).map(|i| tokens(&mut rng, 2 + i % 5)).collect();
        calibrate_query_mean(&model, &mut elder, &calib);
        assert!(elder.query_mean.is_some());
    }
    // Decisive routers (logits of a few units on these prompts, so every dtype routes alike) and
    // experts that already move the stream (B = 0 would leave A without gradient at first).
    let prompts: Vec<Vec<u32>> = batch.iter().map(|e| e.prompt.clone()).collect();
    let x = elder.router_input(&queries(&model, &elder, &prompts));
    let rms = |v: &[f32]| (v.iter().map(|a| a * a).sum::<f32>() / v.len() as f32).sqrt();
    let d_in = elder.layers[0].d_in as f32;
    let x_rms = rms(&x);
    for l in &mut elder.layers {
        l.b.iter_mut().for_each(|v| *v = rng.gen_range(-0.05..0.05));
        l.b_r.fill(0.0);
    }
    let name = format!(
        "{:?} {:?} {:?} B={} centring={} renorm={}",
        spec.arch, spec.proj, spec.allocation, spec.edits, spec.centering, spec.renormalize
    );
    // Redraw the routers until no sequence sits near a tie between its k-th and next expert.
    let mut margin = 0.0;
    for _ in 0..200 {
        for l in &mut elder.layers {
            l.w_r.iter_mut().for_each(|v| *v = rng.gen_range(-1.0..1.0));
            let scale = 3.0 / (x_rms * d_in.sqrt() * rms(&l.w_r));
            l.w_r.iter_mut().for_each(|v| *v *= scale);
        }
        margin = routing_margin(&model, &elder, &batch);
        if margin > 0.05 {
            break;
        }
    }
    assert!(
        margin > 0.05,
        "{name}: routing not decisive (margin {margin})"
    );
    // The case means something: the CPU trainer lowers the loss and moves every kind of tensor.
    let mut trained = elder.clone();
    let report = apply_edit_batch(&model, &mut trained, &batch, |_, _| {}).unwrap();
    assert!(
        report.last_loss < report.first_loss,
        "{name}: the CPU trainer did not lower the loss ({report:?})"
    );
    for (l, u) in updates(&trained.layers, &elder.layers)
        .iter_mut()
        .enumerate()
    {
        for (kind, t) in u.tensors_mut().into_iter().enumerate() {
            assert!(
                t.iter().any(|&v| v != 0.0),
                "{name}: layer {l} tensor {kind} did not train"
            );
        }
    }
    assert_eq!(trained.codebook.len(), batch.len());
    Case {
        name,
        model,
        elder,
        batch,
    }
}

fn cases() -> Vec<Case> {
    use AllocationMode::{KnowledgeSeed, RouterFirstIteration};
    let specs = [
        (Arch::Gpt2, MlpProj::CFc, KnowledgeSeed, 2, false, false),
        (
            Arch::Llama,
            MlpProj::DownProj,
            KnowledgeSeed,
            2,
            true,
            false,
        ),
        (
            Arch::Gpt2,
            MlpProj::CProj,
            RouterFirstIteration,
            1,
            false,
            true,
        ),
        (
            Arch::Llama,
            MlpProj::UpProj,
            RouterFirstIteration,
            3,
            false,
            false,
        ),
    ];
    specs
        .into_iter()
        .enumerate()
        .map(
            |(i, (arch, proj, allocation, edits, centering, renormalize))| {
                let spec = Spec {
                    arch,
                    proj,
                    allocation,
                    edits,
                    centering,
                    renormalize,
                };
                case(spec, 31 + i as u64)
            },
        )
        .collect()
}

// ---------------------------------------------------------------- GPU vs CPU

fn check_case<T: KernelDtype>(dev: &Dev, case: &Case)
where
    CudaBlas: Gemm<T>,
{
    let t = tol::<T>();
    let tag = format!("{} {}", case.name, T::SUFFIX);
    let cpu_model = rounded::<T>(&case.model);
    let cfg = &case.elder.cfg;

    // First iteration: loss, guided loss, routing and gradients, before any Adam step.
    let mut prepared = PreparedBatch::new(&cpu_model, &case.elder, &case.batch).unwrap();
    let presets = batch_presets(cfg, &case.batch);
    let want = prepared.loss_and_grads(&cpu_model, &case.elder, presets.as_deref());
    let start = Capacity { batch: 1, seq: 1 };
    let mut gpu = GpuTrainer::<T>::new(dev.clone(), &case.model, start).unwrap();
    let got = gpu.loss_and_grads(&case.elder, &case.batch).unwrap();
    let d = assert_close(
        &format!("{tag}: first-iteration cross-entropy"),
        &[got.ce],
        &[want.ce],
        t.loss,
    );
    assert_close(
        &format!("{tag}: first-iteration guided loss"),
        &[got.guide],
        &[want.guide],
        t.loss,
    );
    if routing_margin(&cpu_model, &case.elder, &case.batch) > t.margin {
        assert_eq!(got.chosen, want.chosen, "{tag}: experts chosen");
    }
    let g = assert_layers_close(
        &format!("{tag}: first-iteration gradients"),
        &got.grads,
        &want.grads,
        t.grad,
    );
    eprintln!("{tag}: first CE |gpu - cpu| {d:.2e}, gradients rel. L2 <= {g:.2e}");
    let allocations = gpu.allocations();

    // A whole edit batch: every iteration's loss, the trained state, the codes.
    let (mut on_cpu, mut on_gpu) = (case.elder.clone(), case.elder.clone());
    let mut cpu_losses = Vec::new();
    let want = apply_edit_batch(&cpu_model, &mut on_cpu, &case.batch, |_, l| {
        cpu_losses.push(l)
    })
    .unwrap();
    let mut gpu_losses = Vec::new();
    let got = gpu
        .edit_batch(&mut on_gpu, &case.batch, |i, l| {
            assert_eq!(i, gpu_losses.len(), "iterations reported in order");
            gpu_losses.push(l)
        })
        .unwrap();
    assert_eq!(got.iterations, cfg.iterations);
    assert_eq!(gpu_losses.len(), cfg.iterations);
    assert_eq!(
        (got.first_loss, got.last_loss),
        (gpu_losses[0], gpu_losses[cfg.iterations - 1])
    );
    // Later iterations compound the differences: twice the first iteration's tolerance.
    let late = (2.0 * t.loss.0, 2.0 * t.loss.1);
    let dl = assert_close(
        &format!("{tag}: loss per iteration"),
        &gpu_losses,
        &cpu_losses,
        late,
    );
    assert_close(
        &format!("{tag}: final guided loss"),
        &[got.guide_loss],
        &[want.guide_loss],
        late,
    );
    let u = assert_layers_close(
        &format!("{tag}: weight updates"),
        &updates(&on_gpu.layers, &case.elder.layers),
        &updates(&on_cpu.layers, &case.elder.layers),
        t.update,
    );
    assert_eq!(
        on_gpu.codebook.len(),
        on_cpu.codebook.len(),
        "{tag}: codes pushed"
    );
    let margin = routing_margin(&cpu_model, &on_cpu, &case.batch);
    if margin > t.margin {
        assert_eq!(
            on_gpu.codebook.entries(),
            on_cpu.codebook.entries(),
            "{tag}: codebook codes"
        );
    } else {
        eprintln!("{tag}: codes not compared (trained routing margin {margin:.1e})");
    }
    eprintln!("{tag}: losses |gpu - cpu| <= {dl:.2e}, weight updates rel. L2 <= {u:.2e}");

    // Steady state: more batches of the same shape allocate nothing.
    gpu.edit_batch(&mut on_gpu, &case.batch, |_, _| {}).unwrap();
    assert_eq!(
        gpu.allocations(),
        allocations,
        "{tag}: edit batches within the reserved capacity must not allocate"
    );
}

#[test]
fn gpu_edit_step_matches_cpu_trainer() {
    let cases = cases();
    let Some(dev) = common::test_device("gpu_edit_step_matches_cpu_trainer") else {
        return;
    };
    for case in &cases {
        check_case::<f32>(&dev, case);
        check_case::<f16>(&dev, case);
        check_case::<bf16>(&dev, case);
    }
}

/// The mean query of `query_centering` calibrated on the GPU (the frozen prefix, on more prompts
/// than one forward takes, of different lengths) against the CPU's on the same rounded weights.
#[test]
fn gpu_query_mean_calibration_matches_cpu() {
    let mut rng = ChaCha8Rng::seed_from_u64(0xca1);
    let models: Vec<(Model, Elder, Vec<Vec<u32>>)> =
        [(Arch::Gpt2, MlpProj::CFc), (Arch::Llama, MlpProj::GateProj)]
            .into_iter()
            .enumerate()
            .map(|(i, (arch, proj))| {
                let model = tiny(arch, 70 + i as u64);
                let cfg = ElderConfig {
                    query_block: 0,
                    query_proj: proj,
                    molora_blocks: vec![1, 2],
                    molora_proj: proj,
                    num_experts: 4,
                    rank: 4,
                    query_centering: true,
                    ..ElderConfig::default()
                };
                let elder = Elder::new(cfg, &model.cfg).unwrap();
                let vocab = model.cfg.vocab_size as u32;
                // 21 prompts: two forwards of the 16 the calibration takes at once.
                let prompts = (0..21)
                    .map(|j| (0..1 + j % 7).map(|_| rng.gen_range(0..vocab)).collect())
                    .collect();
                (model, elder, prompts)
            })
            .collect();
    let Some(dev) = common::test_device("gpu_query_mean_calibration_matches_cpu") else {
        return;
    };
    fn check<T: KernelDtype>(
        dev: &Dev,
        model: &Model,
        elder: &Elder,
        prompts: &[Vec<u32>],
        rel: f32,
    ) where
        CudaBlas: Gemm<T>,
    {
        let mut cpu = elder.clone();
        calibrate_query_mean(&rounded::<T>(model), &mut cpu, prompts);
        let mut gpu = elder.clone();
        let start = Capacity { batch: 1, seq: 1 };
        let mut trainer = GpuTrainer::<T>::new(dev.clone(), model, start).unwrap();
        trainer.calibrate_query_mean(&mut gpu, &[]).unwrap();
        assert!(gpu.query_mean.is_none(), "no prompts, no mean");
        trainer.calibrate_query_mean(&mut gpu, prompts).unwrap();
        let (g, c) = (gpu.query_mean.clone().unwrap(), cpu.query_mean.unwrap());
        assert_eq!(g.len(), c.len());
        let e = rel_l2(&g, &c);
        eprintln!(
            "{:?} {}: mean query rel. L2 {e:.2e}",
            model.cfg.arch,
            T::SUFFIX
        );
        assert!(
            e <= rel,
            "{:?} {}: mean query rel. L2 {e} > {rel}",
            model.cfg.arch,
            T::SUFFIX
        );
        // Calibrated once: a second call keeps the mean.
        trainer
            .calibrate_query_mean(&mut gpu, &prompts[..3])
            .unwrap();
        assert_eq!(gpu.query_mean.unwrap(), g);
    }
    for (model, elder, prompts) in &models {
        check::<f32>(&dev, model, elder, prompts, 1e-5);
        check::<f16>(&dev, model, elder, prompts, 5e-3);
        check::<bf16>(&dev, model, elder, prompts, 3e-2);
    }
}

/// f16 keeps small gradients only with loss scaling. On a model whose final norm shrinks every
/// gradient by 1e-4 (the backward's activations fall into f16's subnormal range), the scaled f16
/// step's gradients match the CPU's, and the same step at scale 1 loses much of them.
#[test]
fn gpu_f16_loss_scaling_keeps_small_gradients() {
    let spec = Spec {
        arch: Arch::Llama,
        proj: MlpProj::DownProj,
        allocation: AllocationMode::KnowledgeSeed,
        edits: 2,
        centering: false,
        renormalize: false,
    };
    let mut case = case(spec, 91);
    match &mut case.model.final_norm {
        Norm::Rms { weight, .. } | Norm::Layer { weight, .. } => {
            weight.iter_mut().for_each(|w| *w *= 1e-4)
        }
    }
    let cpu_model = rounded::<f16>(&case.model);
    let presets = batch_presets(&case.elder.cfg, &case.batch);
    let want = PreparedBatch::new(&cpu_model, &case.elder, &case.batch)
        .unwrap()
        .loss_and_grads(&cpu_model, &case.elder, presets.as_deref());
    let Some(dev) = common::test_device("gpu_f16_loss_scaling_keeps_small_gradients") else {
        return;
    };
    let error = |policy: LossScalePolicy| -> f32 {
        let start = Capacity { batch: 1, seq: 1 };
        let mut gpu = GpuTrainer::<f16>::new(dev.clone(), &case.model, start).unwrap();
        gpu.set_loss_scale_policy(policy).unwrap();
        let got = gpu.loss_and_grads(&case.elder, &case.batch).unwrap();
        got.grads
            .iter()
            .zip(&want.grads)
            .flat_map(|(g, c)| {
                [
                    rel_l2(&g.a, &c.a),
                    rel_l2(&g.b, &c.b),
                    rel_l2(&g.w_r, &c.w_r),
                ]
            })
            .fold(0.0, f32::max)
    };
    let scaled = error(LossScalePolicy::for_dtype::<f16>());
    let unscaled = error(LossScalePolicy::fixed(1.0));
    eprintln!(
        "f16 gradients, rel. L2 against the CPU: {scaled:.2e} scaled, {unscaled:.2e} at scale 1"
    );
    assert!(
        scaled <= tol::<f16>().grad,
        "scaled f16 gradients: rel. L2 {scaled}"
    );
    assert!(
        unscaled > 4.0 * scaled,
        "scale 1 lost nothing ({unscaled} vs {scaled}): the test shows nothing"
    );
}

/// A loss scale too large for f16 overflows: those steps are skipped (the parameters stay finite),
/// the scale backs off until the gradients fit, and the batch still learns; the report counts them.
#[test]
fn gpu_f16_overflowing_steps_are_skipped_and_the_scale_backs_off() {
    let spec = Spec {
        arch: Arch::Gpt2,
        proj: MlpProj::CFc,
        allocation: AllocationMode::KnowledgeSeed,
        edits: 2,
        centering: false,
        renormalize: false,
    };
    let mut case = case(spec, 92);
    case.elder.cfg.iterations = 20;
    let Some(dev) =
        common::test_device("gpu_f16_overflowing_steps_are_skipped_and_the_scale_backs_off")
    else {
        return;
    };
    let start = Capacity { batch: 1, seq: 1 };
    let mut gpu = GpuTrainer::<f16>::new(dev, &case.model, start).unwrap();
    let policy = LossScalePolicy {
        init: 2f32.powi(24),
        ..LossScalePolicy::for_dtype::<f16>()
    };
    gpu.set_loss_scale_policy(LossScalePolicy {
        max: policy.init,
        ..policy
    })
    .unwrap();
    let mut elder = case.elder.clone();
    let report = gpu.edit_batch(&mut elder, &case.batch, |_, _| {}).unwrap();
    eprintln!(
        "2^24 start: {} of {} steps skipped, scale now {}, loss {:.3} -> {:.3}",
        report.skipped_steps,
        report.iterations,
        report.loss_scale,
        report.first_loss,
        report.last_loss
    );
    assert!(report.skipped_steps >= 1, "2^24 must overflow f16");
    assert!(
        report.skipped_steps < report.iterations,
        "every step was skipped"
    );
    assert!(report.loss_scale < policy.init);
    assert!(report.loss_scale <= f16::MAX.to_f32());
    for l in &elder.layers {
        assert!(
            l.a.iter().chain(&l.b).chain(&l.w_r).all(|v| v.is_finite()),
            "non-finite parameters"
        );
    }
    assert!(report.last_loss < report.first_loss, "{report:?}");
    let status = gpu.loss_scale_status().unwrap().unwrap();
    assert_eq!(status.skipped_steps as usize, report.skipped_steps);
    // The next batch starts from the backed-off scale: nothing more is skipped.
    let again = gpu.edit_batch(&mut elder, &case.batch, |_, _| {}).unwrap();
    assert_eq!(again.skipped_steps, 0, "{again:?}");
}

/// Buffers sized by a long batch serve shorter and smaller ones, and a second state with the same
/// config, without one more allocation (iterations run entirely in preallocated memory).
#[test]
fn gpu_edit_steady_state_allocates_nothing() {
    let spec = Spec {
        arch: Arch::Gpt2,
        proj: MlpProj::CFc,
        allocation: AllocationMode::KnowledgeSeed,
        edits: 3,
        centering: false,
        renormalize: false,
    };
    let case = case(spec, 5);
    let Some(dev) = common::test_device("gpu_edit_steady_state_allocates_nothing") else {
        return;
    };
    let start = Capacity { batch: 1, seq: 1 };
    let mut gpu = GpuTrainer::<bf16>::new(dev, &case.model, start).unwrap();
    let mut elder = case.elder.clone();
    gpu.edit_batch(&mut elder, &case.batch, |_, _| {}).unwrap();
    let n = gpu.allocations();
    assert!(
        n >= 2,
        "the first batch sized the buffers ({n} allocations)"
    );
    for batch in [&case.batch[..1], &case.batch[1..], &case.batch[..]] {
        gpu.edit_batch(&mut elder, batch, |_, _| {}).unwrap();
        assert_eq!(
            gpu.allocations(),
            n,
            "a batch of {} edits allocated",
            batch.len()
        );
    }
    let mut other = case.elder.clone();
    gpu.edit_batch(&mut other, &case.batch, |_, _| {}).unwrap();
    assert_eq!(gpu.allocations(), n, "a second state allocated");
    assert_eq!(elder.codebook.len(), 3 + 1 + 2 + 3);
}

/// Iterations replayed from the captured CUDA graph give exactly the eager iterations' results:
/// the same losses, experts, routers and codes, bit for bit, in both allocation modes (the
/// router's first choice is fixed by the eager first iteration).
#[test]
fn gpu_edit_iteration_graph_replays_the_eager_iterations() {
    use AllocationMode::{KnowledgeSeed, RouterFirstIteration};
    let specs = [
        (Arch::Gpt2, MlpProj::CFc, RouterFirstIteration, false),
        (Arch::Llama, MlpProj::DownProj, KnowledgeSeed, true),
    ];
    let cases: Vec<Case> = specs
        .into_iter()
        .map(|(arch, proj, allocation, centering)| {
            let spec = Spec {
                arch,
                proj,
                allocation,
                edits: 2,
                centering,
                renormalize: false,
            };
            case(spec, 71)
        })
        .collect();
    let Some(dev) = common::test_device("gpu_edit_iteration_graph_replays_the_eager_iterations")
    else {
        return;
    };
    fn check<T: KernelDtype>(dev: &Dev, case: &Case)
    where
        CudaBlas: Gemm<T>,
    {
        let run = |graphs: bool| {
            let cap = Capacity { batch: 2, seq: 8 };
            let mut gpu = GpuTrainer::<T>::new(dev.clone(), &case.model, cap).unwrap();
            gpu.set_iteration_graphs(graphs);
            let mut elder = case.elder.clone();
            let mut losses = Vec::new();
            let report = gpu
                .edit_batch(&mut elder, &case.batch, |_, l| losses.push(l))
                .unwrap();
            (elder, losses, report)
        };
        let (graphed, graphed_losses, graphed_report) = run(true);
        let (eager, eager_losses, eager_report) = run(false);
        let tag = format!("{} {}", case.name, T::SUFFIX);
        assert_eq!(graphed_losses, eager_losses, "{tag}: losses");
        assert_eq!(graphed_report, eager_report, "{tag}: report");
        assert_eq!(
            graphed.layers, eager.layers,
            "{tag}: trained experts and routers"
        );
        assert_eq!(
            graphed.codebook.entries(),
            eager.codebook.entries(),
            "{tag}: codes"
        );
        assert!(
            graphed_losses.last() < graphed_losses.first(),
            "{tag}: the replayed iterations trained ({graphed_losses:?})"
        );
        eprintln!(
            "{tag}: {} iterations, graph replay == eager",
            graphed_losses.len()
        );
    }
    for case in &cases {
        check::<f32>(&dev, case);
        check::<bf16>(&dev, case);
    }
}

/// The stream logic is one for both devices: on the GPU, `apply_stream_on` commits after every
/// batch, resumes after an interruption and leaves the state the CPU leaves (the same applied ids
/// and codes, experts within f32 tolerance). With query centring, the GPU calibrates the mean
/// itself: its base model never builds the f32 CPU model.
#[test]
fn gpu_edit_stream_commits_and_resumes_like_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    write_random_checkpoint(Arch::Llama, "tiny", 4, &model_dir, StoreDtype::F32).unwrap();
    let base = BaseModel::open(&model_dir).unwrap();
    let records: Vec<EditRecord> = (0..5)
        .map(|i| EditRecord {
            id: format!("r{i}"),
            knowledge_id: format!("k{}", i % 3),
            prompt: format!("the {i} of a b is"),
            target_new: format!("c {i}"),
            target_true: None,
            subject: None,
            rephrases: vec![],
            locality: vec![],
        })
        .collect();
    let cfg = |centering| ElderConfig {
        iterations: 5,
        batch_size: 1, // resuming must not regroup batches, or the states would differ
        query_centering: centering,
        ..ElderConfig::preset_for(&base.cfg)
    };
    let cpu: Vec<EditSession> = [false, true]
        .into_iter()
        .map(|centering| {
            let dir = tmp.path().join(format!("cpu-{centering}"));
            let mut cpu = EditSession::open(&base, &dir, Some(cfg(centering))).unwrap();
            // Split as the GPU run is: the mean query comes from the first call's records.
            apply_stream(&base, &mut cpu, &records[..3], false, None).unwrap();
            apply_stream(&base, &mut cpu, &records, false, None).unwrap();
            cpu
        })
        .collect();
    let Some(dev) = common::test_device("gpu_edit_stream_commits_and_resumes_like_the_cpu") else {
        return;
    };
    // The GPU side opens the model anew, so what builds the CPU model can be seen.
    let gpu_base = BaseModel::open(&model_dir).unwrap();
    let cap = Capacity { batch: 1, seq: 8 };
    let editor = open_gpu_editor(dev, gpu_base.weight_source(), GpuDtype::F32, cap).unwrap();
    let mut device = EditDevice::Cuda(editor);
    for (centering, cpu) in [false, true].into_iter().zip(&cpu) {
        let dir = tmp.path().join(format!("gpu-{centering}"));
        let mut first = EditSession::open(&gpu_base, &dir, Some(cfg(centering))).unwrap();
        let s = apply_stream_on(
            &mut device,
            &gpu_base,
            &mut first,
            &records[..3],
            false,
            None,
        )
        .unwrap();
        assert_eq!((s.applied, s.already_applied), (3, 0));
        drop(first); // "interrupted": the next session reopens from disk
        let mut resumed = EditSession::open(&gpu_base, &dir, None).unwrap();
        let s =
            apply_stream_on(&mut device, &gpu_base, &mut resumed, &records, false, None).unwrap();
        assert_eq!((s.applied, s.already_applied, s.total_applied), (2, 3, 5));
        let on_disk = EditSession::open(&gpu_base, &dir, None).unwrap();
        assert_eq!(on_disk.state.applied_ids(), cpu.state.applied_ids());
        match (&on_disk.elder.query_mean, &cpu.elder.query_mean) {
            (Some(g), Some(c)) => assert!(rel_l2(g, c) < 1e-5, "mean query {}", rel_l2(g, c)),
            (None, None) => assert!(!centering),
            other => panic!("centring={centering}: mean query {other:?}"),
        }
        // Both started from the config's seeded initialisation.
        let init = Elder::new(cpu.elder.cfg.clone(), &base.cfg).unwrap().layers;
        let u = assert_layers_close(
            &format!("stream weight updates (f32), centring={centering}"),
            &updates(&on_disk.elder.layers, &init),
            &updates(&cpu.elder.layers, &init),
            tol::<f32>().update,
        );
        eprintln!("stream, centring={centering}: weight updates rel. L2 <= {u:.2e}");
        assert_eq!(
            on_disk.elder.codebook.entries(),
            cpu.elder.codebook.entries(),
            "codes, centring={centering}"
        );
    }
    assert!(
        !gpu_base.cpu_model_built(),
        "the GPU stream built the f32 CPU model"
    );
}
