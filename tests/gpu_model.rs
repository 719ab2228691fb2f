//! The CUDA forward against the CPU forward: logits of padded batches on the committed transformers
//! fixtures and on random tiny models, the upload straight from a checkpoint against the upload from
//! the CPU model, KV-cache decoding, teacher-forced scoring, greedy generation, and ELDER (mixed in/out-of-scope sequences in one batch, with and without query centring).
//!
//! The CPU reference runs on the model's weights rounded through the GPU dtype, so the comparison
//! measures the forward, not the weight rounding. Tolerances `|gpu - cpu| <= atol + rtol * |cpu|`
//! on logits: f32 1e-3/1e-3, f16 5e-2/2e-2, bf16 1.5e-1/5e-2 (activations are rounded to 8 bits of
//! mantissa at every step in bf16). They are first guesses: nothing here has run on a GPU yet, and
//! each test prints its worst difference so the first GPU run can tighten them.
//!
//! Each test builds its case on the CPU (and checks that the case means something: in-scope rows
//! really move, out-of-scope rows really stay) before asking for a GPU, so that part runs everywhere;
//! without a GPU it runs on the CUDA emulator (`EMULATED <test>`) or prints `SKIP <test>: <reason>`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::cublas::{CudaBlas, Gemm};
use elder::backend::cpu::ops::Routing;
use elder::backend::cuda::{GpuDevice, KernelDtype};
use elder::elder::config::{ElderConfig, ExpertRows};
use elder::elder::molora::{Elder, ElderAdapter};
use elder::eval::score_pairs;
use elder::model::layers::MlpProj;
use elder::model::loader::{build_model, load_model_dir, RandomSource};
use elder::model::runner::{pad_batch, prompt_rows};
use elder::model::weights::Weights;
use elder::model::{Arch, KvCache, Model, ModelConfig, NoAdapter};
use elder::runtime::cuda::{Capacity, ElderStep, GpuModel, WeightSource};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use common::{assert_close, rounded, sharpened, tiny};

type Dev = Arc<GpuDevice>;

// ---------------------------------------------------------------- helpers

fn tol<T: KernelDtype>() -> (f32, f32) {
    match T::SUFFIX {
        "f32" => (1e-3, 1e-3),
        "f16" => (5e-2, 2e-2),
        // bf16 keeps 3 fewer mantissa bits than f16: 8x its rounding noise. Measured on the CUDA
        // emulator: f16 at most 2.9e-2, bf16 at most about 0.26 (ELDER case, 4-layer Llama).
        _ => (3e-1, 6e-2),
    }
}

/// The case means something: the edited logits `[B, seq, V]` of each sequence in scope moved
/// away from `model`'s base logits, those of every other sequence not at all.
/// `answer_rows`: the experts change an in-scope prompt from its last token only (`expert_rows
/// = "answer"`), so its earlier rows must be the base model's exactly.
fn assert_moved_in_scope_only(
    model: &Model,
    prompts: &[Vec<u32>],
    edited: &[f32],
    seq: usize,
    in_scope: &[bool],
    answer_rows: bool,
    tag: &str,
) {
    let (base, _) = model.logits(prompts, &mut NoAdapter);
    let v = model.cfg.vocab_size;
    let moved = |rows: std::ops::Range<usize>| {
        edited[rows.clone()]
            .iter()
            .zip(&base[rows])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
    };
    for (b, p) in prompts.iter().enumerate() {
        let last = b * seq + p.len() - 1;
        if answer_rows && in_scope[b] {
            assert_eq!(
                moved(b * seq * v..last * v),
                0.0,
                "{tag}: sequence {b} moved before its last prompt token"
            );
        }
        let moved = moved(b * seq * v..(last + 1) * v);
        if in_scope[b] {
            assert!(
                moved > 1e-2,
                "{tag}: in-scope sequence {b} barely moved ({moved})"
            );
        } else {
            assert_eq!(moved, 0.0, "{tag}: out-of-scope sequence {b} moved");
        }
    }
}

/// The logits of the real (non-padding) rows of a padded `[B, T, V]` batch.
fn valid_rows(logits: &[f32], seqs: &[Vec<u32>], seq: usize, vocab: usize) -> Vec<f32> {
    seqs.iter()
        .enumerate()
        .flat_map(|(b, s)| logits[b * seq * vocab..][..s.len() * vocab].iter().copied())
        .collect()
}

fn mixed_batch() -> Vec<Vec<u32>> {
    vec![
        vec![5, 17, 3, 88, 42, 7, 19],
        vec![61, 2],
        vec![9, 9, 14, 70, 33, 21, 50, 64, 1, 12, 46],
        vec![30],
    ]
}

macro_rules! for_each_dtype {
    ($dev:expr, $f:ident ( $($arg:expr),* )) => {{
        $f::<f32>($dev, $($arg),*);
        $f::<f16>($dev, $($arg),*);
        $f::<bf16>($dev, $($arg),*);
    }};
}

// ---------------------------------------------------------------- base model

/// The parity fixtures: `$ELDER_FIXTURES_DIR` (set by tools/gpu_check.sh, which runs these test
/// binaries on a machine without the source tree), else the source tree's own.
fn fixtures_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("ELDER_FIXTURES_DIR") {
        return PathBuf::from(dir);
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity");
    if built.exists() {
        built
    } else {
        PathBuf::from("tests/fixtures/parity")
    }
}

fn fixture(name: &str) -> (Model, Value) {
    let dir = fixtures_dir().join(name);
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    (load_model_dir(&dir).unwrap(), expected)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    fn walk(v: &Value, out: &mut Vec<f32>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            Value::Number(n) => out.push(n.as_f64().unwrap() as f32),
            _ => panic!("unexpected {v}"),
        }
    }
    let mut out = Vec::new();
    walk(v, &mut out);
    out
}

fn check_fixture<T: KernelDtype>(dev: &Dev, name: &str, model: &Model, expected: &Value)
where
    CudaBlas: Gemm<T>,
{
    let prompts: Vec<Vec<u32>> = expected["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let vocab = model.cfg.vocab_size;
    let cpu = rounded::<T>(model);
    let (want, shape) = cpu.logits(&prompts, &mut NoAdapter);
    let cap = Capacity {
        batch: prompts.len(),
        seq: shape.seq,
    };
    let mut gpu = GpuModel::<T>::new(dev.clone(), model, cap).unwrap();
    let (got, gshape) = gpu.logits(&prompts, false).unwrap();
    assert_eq!(gshape, shape);
    let what = format!("{name} {} batched logits", T::SUFFIX);
    let worst = assert_close(
        &what,
        &valid_rows(&got, &prompts, shape.seq, vocab),
        &valid_rows(&want, &prompts, shape.seq, vocab),
        tol::<T>(),
    );
    eprintln!("{what}: max |gpu - cpu| {worst:.2e}");
    if T::SUFFIX == "f32" {
        // Against transformers itself, prompt by prompt.
        for (i, p) in prompts.iter().enumerate() {
            let (single, _) = gpu.logits(std::slice::from_ref(p), false).unwrap();
            let d = assert_close(
                &format!("{name} f32 prompt {i} vs transformers"),
                &single,
                &floats(&expected["logits"][i]),
                (1e-3, 1e-3),
            );
            eprintln!("{name} f32 prompt {i}: max |gpu - transformers| {d:.2e}");
        }
        let start = expected["generate_prompt_index"].as_u64().unwrap() as usize;
        let want_gen = ids(&expected["generated"]);
        let (got_gen, _) = gpu
            .generate(&[prompts[start].clone()], want_gen.len(), None, false)
            .unwrap();
        assert_eq!(got_gen[0], want_gen, "{name}: greedy continuation differs");
    }
}

#[test]
fn gpu_fixture_logits_match_cpu_and_transformers() {
    let cases: Vec<(&str, (Model, Value))> = ["gpt2-tiny", "llama-tiny", "llama-tiny-gqa"]
        .into_iter()
        .map(|n| (n, fixture(n)))
        .collect();
    let Some(dev) = common::test_device("gpu_fixture_logits_match_cpu_and_transformers") else {
        return;
    };
    for (name, (model, expected)) in &cases {
        for_each_dtype!(&dev, check_fixture(name, model, expected));
    }
}

/// The upload straight from the checkpoint's memory map (what the command line does) against the
/// upload from the CPU model: the same weight bits reach the device either way and the base
/// forward has no atomics, so the logits must be identical, not just close.
fn check_checkpoint_upload<T: KernelDtype>(dev: &Dev, name: &str, dir: &Path, model: &Model)
where
    CudaBlas: Gemm<T>,
{
    let cfg = ModelConfig::from_dir(dir).unwrap();
    let weights = Weights::open(dir).unwrap();
    let seqs = mixed_batch();
    let cap = Capacity { batch: 4, seq: 11 };
    let mut from_cpu = GpuModel::<T>::new(dev.clone(), model, cap).unwrap();
    let source = WeightSource::Checkpoint {
        cfg: &cfg,
        weights: &weights,
    };
    let mut from_map = GpuModel::<T>::new(dev.clone(), source, cap).unwrap();
    let (want, shape) = from_cpu.logits(&seqs, false).unwrap();
    let (got, got_shape) = from_map.logits(&seqs, false).unwrap();
    assert_eq!(got_shape, shape);
    let v = cfg.vocab_size;
    let (got, want) = (
        valid_rows(&got, &seqs, shape.seq, v),
        valid_rows(&want, &seqs, shape.seq, v),
    );
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0f32, f32::max);
    assert!(
        got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()),
        "{name} {}: logits from the checkpoint upload differ from the CPU model upload (max |diff| {worst:.2e})",
        T::SUFFIX
    );
    eprintln!(
        "{name} {}: checkpoint upload == CPU model upload",
        T::SUFFIX
    );
}

#[test]
fn gpu_upload_from_the_checkpoint_matches_the_upload_from_the_cpu_model() {
    // f32 fixtures (converted on the host for f16/bf16), and a bf16 checkpoint (copied for bf16).
    let bf16_dir = tempfile::tempdir().unwrap();
    elder::model::presets::write_random_checkpoint(
        Arch::Llama,
        "tiny",
        3,
        bf16_dir.path(),
        elder::model::checkpoint::StoreDtype::Bf16,
    )
    .unwrap();
    let cases: Vec<(&str, PathBuf)> = vec![
        ("gpt2-tiny", fixtures_dir().join("gpt2-tiny")),
        ("llama-tiny-gqa", fixtures_dir().join("llama-tiny-gqa")),
        ("random llama bf16", bf16_dir.path().to_path_buf()),
    ];
    let models: Vec<Model> = cases
        .iter()
        .map(|(_, dir)| load_model_dir(dir).unwrap())
        .collect();
    let Some(dev) =
        common::test_device("gpu_upload_from_the_checkpoint_matches_the_upload_from_the_cpu_model")
    else {
        return;
    };
    for ((name, dir), model) in cases.iter().zip(&models) {
        for_each_dtype!(&dev, check_checkpoint_upload(name, dir, model));
    }
}

/// Prefill, then one token at a time through the KV cache, against the CPU doing the same.
fn check_decode<T: KernelDtype>(dev: &Dev, model: &Model)
where
    CudaBlas: Gemm<T>,
{
    let cpu = rounded::<T>(model);
    let seqs = [vec![3u32, 1, 4, 1, 5, 9, 2, 6], vec![8u32, 6, 7, 5, 3]];
    let prefill = [3usize, 2];
    let cap = Capacity { batch: 2, seq: 8 };
    let mut gpu = GpuModel::<T>::new(dev.clone(), model, cap).unwrap();
    let mut cache = KvCache::new(&cpu.cfg, 2, cap.seq);
    let firsts: Vec<Vec<u32>> = seqs
        .iter()
        .zip(prefill)
        .map(|(s, n)| s[..n].to_vec())
        .collect();
    let (ids, shape) = pad_batch(&firsts, &[0, 0]);
    cpu.forward_hidden(&ids, &shape, &mut cache, &mut NoAdapter);
    gpu.forward(&ids, &shape, ElderStep::Off).unwrap();
    let allocations = gpu.allocations();
    let mut worst = 0.0f32;
    let mut lens = prefill.to_vec();
    // Each step feeds both sequences their next token; the shorter one repeats its last token once
    // it runs out (any token will do: the check is GPU against CPU on the same inputs).
    for _ in 0..5 {
        let next: Vec<Vec<u32>> = seqs
            .iter()
            .zip(&lens)
            .map(|(s, &l)| vec![s[l.min(s.len() - 1)]])
            .collect();
        let start = lens.clone();
        let (ids, shape) = pad_batch(&next, &start);
        let h = cpu.forward_hidden(&ids, &shape, &mut cache, &mut NoAdapter);
        let (want, _) = cpu.head(&h, &[0, 1]);
        gpu.forward(&ids, &shape, ElderStep::Off).unwrap();
        let got = gpu.head(&[0, 1]).unwrap();
        worst = worst.max(assert_close(
            &format!("decode {:?} {}", model.cfg.arch, T::SUFFIX),
            &got,
            &want,
            tol::<T>(),
        ));
        for (l, s) in lens.iter_mut().zip(&start) {
            *l = s + 1;
        }
    }
    assert_eq!(
        gpu.allocations(),
        allocations,
        "decode steps inside the capacity must not allocate"
    );
    eprintln!(
        "decode {:?} {}: max |gpu - cpu| {worst:.2e}",
        model.cfg.arch,
        T::SUFFIX
    );
}

fn check_random_batch<T: KernelDtype>(dev: &Dev, model: &Model)
where
    CudaBlas: Gemm<T>,
{
    let cpu = rounded::<T>(model);
    let seqs = mixed_batch();
    let (want, shape) = cpu.logits(&seqs, &mut NoAdapter);
    let mut gpu = GpuModel::<T>::new(dev.clone(), model, Capacity { batch: 1, seq: 1 }).unwrap();
    let (got, _) = gpu.logits(&seqs, false).unwrap();
    let v = model.cfg.vocab_size;
    let what = format!("random {:?} {} batched logits", model.cfg.arch, T::SUFFIX);
    let worst = assert_close(
        &what,
        &valid_rows(&got, &seqs, shape.seq, v),
        &valid_rows(&want, &seqs, shape.seq, v),
        tol::<T>(),
    );
    eprintln!("{what}: max |gpu - cpu| {worst:.2e}");
    // The buffers grew once for this batch; the same or a smaller batch allocates nothing more.
    let n = gpu.allocations();
    gpu.logits(&seqs[..2], false).unwrap();
    gpu.logits(&seqs, false).unwrap();
    assert_eq!(gpu.allocations(), n, "steady-state calls must not allocate");

    // Teacher-forced scoring as Model::score.
    let (prompt, target) = (&seqs[2][..6], &seqs[2][6..]);
    let want = cpu.score(prompt, target, &mut NoAdapter);
    let (got, scope) = gpu.score(prompt, target, false).unwrap();
    assert_eq!(scope, None);
    assert_close(
        &format!("score logprobs {}", T::SUFFIX),
        &got.logprobs,
        &want.logprobs,
        tol::<T>(),
    );
    if T::SUFFIX == "f32" {
        assert_eq!(got.argmax, want.argmax);
        let want = cpu.generate(&seqs, 6, None, &mut NoAdapter);
        let (got, _) = gpu.generate(&seqs, 6, None, false).unwrap();
        assert_eq!(got, want, "batched greedy generation");
    }
}

#[test]
fn gpu_random_models_match_cpu() {
    let models: Vec<Model> = [Arch::Gpt2, Arch::Llama]
        .into_iter()
        .map(|a| tiny(a, 5))
        .chain([Arch::Gpt2, Arch::Llama].into_iter().map(|a| {
            let cfg = elder::model::presets::preset(a, "tiny").unwrap();
            sharpened(build_model(&cfg, &RandomSource { seed: 9 }).unwrap())
        }))
        .collect();
    let Some(dev) = common::test_device("gpu_random_models_match_cpu") else {
        return;
    };
    for m in &models {
        for_each_dtype!(&dev, check_random_batch(m));
        for_each_dtype!(&dev, check_decode(m));
    }
}

// ---------------------------------------------------------------- ELDER

/// An ELDER state with decisive routers and non-zero experts, and a codebook that puts some of
/// `candidates` in scope and leaves others out (decided by the CPU; checked here).
struct ElderCase {
    model: Model,
    elder: Elder,
    prompts: Vec<Vec<u32>>,
    cpu_scope: Vec<bool>,
}

/// The routing of one prompt on the CPU (and the smallest top-k margin of its routers).
fn cpu_routing(model: &Model, elder: &Elder, prompt: &[u32]) -> (Vec<Routing>, f32) {
    let mut adapter = ElderAdapter::single(elder, prompt.len());
    model.logits(&[prompt.to_vec()], &mut adapter);
    let routing = adapter.routing.expect("the query site was reached");
    let margin = routing
        .iter()
        .map(|r| {
            let mut p = r.probs.clone();
            p.sort_by(|a, b| b.total_cmp(a));
            p[r.k - 1] - p[r.k]
        })
        .fold(f32::INFINITY, f32::min);
    (routing, margin)
}

fn elder_case(arch: Arch, centering: bool) -> ElderCase {
    let model = tiny(arch, 11);
    let proj = if arch == Arch::Gpt2 {
        MlpProj::CFc
    } else {
        MlpProj::DownProj
    };
    let cfg = ElderConfig {
        query_block: 0,
        query_proj: proj,
        molora_blocks: vec![1, 2, 3],
        molora_proj: proj,
        threshold: 1, // in scope = the same allocation in every layer
        query_centering: centering,
        ..ElderConfig::default()
    };
    let mut elder = Elder::new(cfg, &model.cfg).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    let vocab = model.cfg.vocab_size as u32;
    let random_prompt = |rng: &mut ChaCha8Rng| -> Vec<u32> {
        (0..rng.gen_range(2..10))
            .map(|_| rng.gen_range(0..vocab))
            .collect()
    };
    // The queries of a few prompts set the scales: the site's input is O(1) on GPT-2's c_fc but
    // O(1e-2) on Llama's down_proj.
    let calib: Vec<Vec<u32>> = (0..16).map(|_| random_prompt(&mut rng)).collect();
    let (_, shape) = pad_batch(&calib, &vec![0; calib.len()]);
    let rows = prompt_rows(shape.seq, calib.iter().map(Vec::len));
    let mut probe = ElderAdapter::inference(&elder, rows);
    model.logits(&calib, &mut probe);
    let query = probe.query.take().expect("the query site was reached");
    let d_in = elder.layers[0].d_in;
    if centering {
        let mut mean = vec![0.0f32; d_in];
        for q in query.chunks(d_in) {
            mean.iter_mut()
                .zip(q)
                .for_each(|(m, v)| *m += v / calib.len() as f32);
        }
        elder.query_mean = Some(mean);
    }
    let routed = elder.router_input(&query);
    let rms = |v: &[f32]| (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
    let (q_rms, x_rms) = (rms(&query), rms(&routed));
    let rank = elder.cfg.rank as f32;
    for l in &mut elder.layers {
        // Router logits of about 3 units (decisive top-k, so bf16 routes like f32), no bias.
        let w_std = rms(&l.w_r);
        let scale = 3.0 / (x_rms * (d_in as f32).sqrt() * w_std);
        l.w_r.iter_mut().for_each(|v| *v *= scale);
        l.b_r.fill(0.0);
        // Experts that move the residual stream by about 0.5 (B = 0 would make them no-ops).
        let xa_rms = q_rms * (d_in as f32 / (3.0 * rank)).sqrt();
        let half_width = 3f32.sqrt() * 0.5 / (xa_rms * rank.sqrt());
        l.b.iter_mut()
            .for_each(|v| *v = rng.gen_range(-half_width..half_width));
    }
    // Candidate prompts whose routing is decisive (top-k margin well above bf16 noise).
    let mut prompts = Vec::new();
    let mut codes = Vec::new();
    for _ in 0..64 {
        let p = random_prompt(&mut rng);
        let (routing, margin) = cpu_routing(&model, &elder, &p);
        if margin > 0.05 {
            codes.push(elder.codes(&routing).remove(0));
            prompts.push(p);
        }
        if prompts.len() == 8 {
            break;
        }
    }
    assert!(
        prompts.len() >= 4,
        "too few decisive prompts ({})",
        prompts.len()
    );
    // The first half's codes go into the codebook.
    for c in &codes[..prompts.len() / 2] {
        elder.codebook.push_words(c).unwrap();
    }
    let rows = {
        let (_, shape) = pad_batch(&prompts, &vec![0; prompts.len()]);
        prompt_rows(shape.seq, prompts.iter().map(Vec::len))
    };
    let mut adapter = ElderAdapter::inference(&elder, rows);
    let (edited, shape) = model.logits(&prompts, &mut adapter);
    let cpu_scope = adapter.in_scope.clone();
    assert!(
        cpu_scope.iter().any(|&s| s) && cpu_scope.iter().any(|&s| !s),
        "the case needs in- and out-of-scope sequences, got {cpu_scope:?}"
    );
    // The case means something: in-scope rows move away from the base model, the others not at all.
    assert_moved_in_scope_only(
        &model,
        &prompts,
        &edited,
        shape.seq,
        &cpu_scope,
        false,
        "ELDER case",
    );
    ElderCase {
        model,
        elder,
        prompts,
        cpu_scope,
    }
}

fn check_elder<T: KernelDtype>(dev: &Dev, case: &ElderCase)
where
    CudaBlas: Gemm<T>,
{
    let (model, elder, prompts) = (&case.model, &case.elder, &case.prompts);
    let cpu = rounded::<T>(model);
    let (_, shape) = pad_batch(prompts, &vec![0; prompts.len()]);
    let cpu_rows = prompt_rows(shape.seq, prompts.iter().map(Vec::len));
    let mut adapter = ElderAdapter::inference(elder, cpu_rows.clone());
    let (want, _) = cpu.logits(prompts, &mut adapter);
    let cap = Capacity {
        batch: prompts.len(),
        seq: shape.seq,
    };
    let mut gpu = GpuModel::<T>::new(dev.clone(), model, cap).unwrap();
    gpu.set_elder(Some(elder)).unwrap();
    // The GPU router reads the last prompt token (the only pooling it has).
    let (got, _) = gpu.logits(prompts, true).unwrap();
    let (scope, dist) = gpu.elder_scope().unwrap();
    let tag = format!(
        "{:?} {} centring={}",
        model.cfg.arch,
        T::SUFFIX,
        elder.cfg.query_centering
    );
    assert_eq!(scope, adapter.in_scope, "{tag}: in-scope mask");
    assert_eq!(scope, case.cpu_scope, "{tag}: in-scope mask (f32 CPU)");
    assert_eq!(dist, adapter.distances, "{tag}: code distances");
    let v = model.cfg.vocab_size;
    let worst = assert_close(
        &format!("{tag}: edited logits"),
        &valid_rows(&got, prompts, shape.seq, v),
        &valid_rows(&want, prompts, shape.seq, v),
        tol::<T>(),
    );
    eprintln!("{tag}: edited logits max |gpu - cpu| {worst:.2e}");

    // Evaluation scoring (prompt, continuation) pairs on both backends, edited and base.
    let pairs: Vec<(&[u32], &[u32])> = prompts
        .iter()
        .map(|p| (&p[..p.len() / 2 + 1], &p[p.len() / 2 + 1..]))
        .collect();
    // The prefixes were not chosen for a decisive top-k (the whole prompts were): in f16/bf16 a
    // near-tie may route differently, so their scope is compared only where the CPU margin is
    // well above that noise.
    let decisive: Vec<bool> = pairs
        .iter()
        .map(|(p, _)| T::SUFFIX == "f32" || cpu_routing(&cpu, elder, p).1 > 0.05)
        .collect();
    eprintln!(
        "{tag}: eval scope compared on {} of {} prefixes",
        decisive.iter().filter(|&&d| d).count(),
        pairs.len()
    );
    for edited in [true, false] {
        let want = score_pairs(&cpu, edited.then_some(elder), &pairs).unwrap();
        let got = gpu.score_pairs(edited, &pairs).unwrap();
        for ((g, w), _) in got.iter().zip(&want).zip(&decisive).filter(|(_, &d)| d) {
            assert_eq!(
                (g.in_scope, g.distance),
                (w.in_scope, w.distance),
                "{tag}: eval scope"
            );
            if T::SUFFIX == "f32" {
                assert_eq!(g.argmax, w.argmax, "{tag}: eval argmax (edited={edited})");
            }
        }
    }
    // Generation keeps the prompt's routing through the decode steps.
    if T::SUFFIX == "f32" {
        let mut adapter = ElderAdapter::inference(elder, cpu_rows);
        let want = cpu.generate(prompts, 5, None, &mut adapter);
        let (got, scope) = gpu.generate(prompts, 5, None, true).unwrap();
        assert_eq!(scope, case.cpu_scope, "{tag}: generation scope");
        assert_eq!(got, want, "{tag}: edited greedy generation");
    }
}

#[test]
fn gpu_elder_mixed_scope_batch_matches_cpu() {
    let cases: Vec<ElderCase> = [Arch::Gpt2, Arch::Llama]
        .into_iter()
        .flat_map(|a| [elder_case(a, false), elder_case(a, true)])
        .collect();
    let Some(dev) = common::test_device("gpu_elder_mixed_scope_batch_matches_cpu") else {
        return;
    };
    for case in &cases {
        for_each_dtype!(&dev, check_elder(case));
    }
}

#[test]
fn gpu_elder_with_empty_codebook_is_the_base_model() {
    let model = tiny(Arch::Gpt2, 3);
    let cfg = ElderConfig {
        query_block: 0,
        molora_blocks: vec![1, 2],
        ..ElderConfig::preset_for(&model.cfg)
    };
    let mut elder = Elder::new(cfg, &model.cfg).unwrap();
    elder.layers.iter_mut().for_each(|l| l.b.fill(0.3));
    let seqs = mixed_batch();
    let Some(dev) = common::test_device("gpu_elder_with_empty_codebook_is_the_base_model") else {
        return;
    };
    let mut gpu = GpuModel::<f32>::new(dev, &model, Capacity { batch: 4, seq: 11 }).unwrap();
    gpu.set_elder(Some(&elder)).unwrap();
    let (edited, _) = gpu.logits(&seqs, true).unwrap();
    let (scope, dist) = gpu.elder_scope().unwrap();
    assert_eq!(scope, vec![false; 4]);
    assert_eq!(dist, vec![None; 4]);
    let (base, _) = gpu.logits(&seqs, false).unwrap();
    assert_eq!(edited, base, "nothing is in scope with an empty codebook");
}

/// A decode step replayed from its captured CUDA graph gives exactly the eager step's logits,
/// step after step (new ids and positions reach the graph through the same buffers), and one
/// graph is captured per batch size.
#[test]
fn gpu_decode_graph_replays_the_eager_step() {
    let Some(dev) = common::test_device("gpu_decode_graph_replays_the_eager_step") else {
        return;
    };
    for arch in [Arch::Gpt2, Arch::Llama] {
        let model = tiny(arch, 5);
        let cap = Capacity { batch: 3, seq: 16 };
        let mut graphed = GpuModel::<f32>::new(dev.clone(), &model, cap).unwrap();
        let mut eager = GpuModel::<f32>::new(dev.clone(), &model, cap).unwrap();
        graphed.set_decode_graphs(true);
        eager.set_decode_graphs(false);
        let prompts: Vec<Vec<u32>> = vec![vec![3, 9, 4, 1], vec![7, 2], vec![5, 5, 6]];
        let (ids, shape) = pad_batch(&prompts, &[0, 0, 0]);
        let mut lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        for m in [&mut graphed, &mut eager] {
            m.forward(&ids, &shape, ElderStep::Off).unwrap();
        }
        let v = model.cfg.vocab_size;
        for step in 0..4u32 {
            let next: Vec<Vec<u32>> = (0..3)
                .map(|b| vec![(step * 7 + b * 3 + 1) % v as u32])
                .collect();
            let (ids, shape) = pad_batch(&next, &lens);
            let got = graphed.decode_step(&ids, &shape, false).unwrap();
            let want = eager.decode_step(&ids, &shape, false).unwrap();
            assert_eq!(got.len(), 3 * v);
            assert_eq!(
                got, want,
                "{arch:?} decode step {step}: graph replay differs from the eager step"
            );
            lens.iter_mut().for_each(|l| *l += 1);
        }
        assert_eq!(
            graphed.decode_graph_count(),
            1,
            "one capture, three replays"
        );
        assert_eq!(eager.decode_graph_count(), 0);
        // A different batch size is a different graph.
        let (ids, shape) = pad_batch(&[vec![2u32], vec![4]], &lens[..2]);
        graphed.decode_step(&ids, &shape, false).unwrap();
        assert_eq!(graphed.decode_graph_count(), 2);
        // Growing the buffers drops the graphs that point at the old ones.
        graphed.reserve(Capacity { batch: 4, seq: 32 }).unwrap();
        assert_eq!(graphed.decode_graph_count(), 0);
    }
}

// ---------------------------------------------------------------- key store

/// Default-preset states edited on the CPU answer on the device as on the CPU: per sequence the
/// same matched edit, scope and answer-gate decision, the same edited logits, and generation
/// keeps the prompt's decision. The batch mixes edit prompts (two edits of one subject among
/// them, so the relation check decides), prompts about other subjects, and a question about an
/// edited subject that none of its edits answers (the gate's case). Two states: the gate off
/// (a short training, every edit prompt in scope), the default preset's gate, the gate with its
/// fallback to the runner-up edit, and the gate asking every candidate.
#[test]
fn gpu_key_store_state_matches_cpu() {
    use elder::data::EditRecord;
    use elder::elder::config::Preset;
    use elder::model::checkpoint::StoreDtype;
    use elder::model::presets::write_random_checkpoint;
    use elder::session::{apply_stream, BaseModel, EditSession};

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    write_random_checkpoint(Arch::Llama, "tiny", 5, &dir, StoreDtype::F32).unwrap();
    let base = BaseModel::open(&dir).unwrap();
    let record = |id: &str, subject: &str, prompt: &str, target: &str| EditRecord {
        id: id.into(),
        knowledge_id: id.into(),
        prompt: prompt.into(),
        target_new: target.into(),
        target_true: None,
        subject: Some(subject.into()),
        rephrases: Vec::new(),
        locality: Vec::new(),
    };
    let records = vec![
        record("a", "Zorbia", "The capital of Zorbia is", " Quell"),
        record("b", "Zorbia", "The currency of Zorbia is", " marks"),
        record("c", "Plimsoll", "Plimsoll was born in", " Varn"),
        record("d", "Ostrava", "Ostrava is located in", " Kettle"),
    ];
    let texts = [
        "The capital of Zorbia is",
        "The currency of Zorbia is",
        "Plimsoll was born in",
        "Ostrava is located in",
        "The river through Lund is",
        "My favourite colour is",
        "The tallest mountain of Zorbia is",
    ];
    let prompts: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| base.tokenizer.encode(t).unwrap())
        .collect();
    let model = base.model().unwrap();
    let default = ElderConfig::preset(Preset::Default, &base.cfg);
    let cases = [
        (
            "gate off",
            ElderConfig {
                iterations: 6,
                batch_size: 1,
                answer_gate: 0.0,
                ..default.clone()
            },
        ),
        // Four edits on a random tiny model learn their answers only a little (log-probabilities
        // of -10 to -17 after training): a gate of 2e-6 (log -13.1) keeps some and turns the
        // others away, so both outcomes are compared.
        (
            "gate on",
            ElderConfig {
                answer_gate: 2e-6,
                ..default.clone()
            },
        ),
        // The same gate with its fallback: a turned-away Zorbia prompt asks the subject's other
        // edit next, on a pass with that edit's experts.
        (
            "gate with fallback",
            ElderConfig {
                answer_gate: 2e-6,
                answer_gate_fallback: true,
                ..default.clone()
            },
        ),
        // Experts that change each prompt from its last token on, the gate on.
        (
            "answer rows",
            ElderConfig {
                answer_gate: 2e-6,
                expert_rows: ExpertRows::Answer,
                ..default.clone()
            },
        ),
        // The same gate asking three candidates: each Zorbia prompt asks both Zorbia edits in
        // turn and the better answer decides.
        (
            "gate asking candidates",
            ElderConfig {
                answer_gate: 2e-6,
                answer_gate_candidates: 3,
                ..default.clone()
            },
        ),
    ];
    let mut states = Vec::new();
    for (i, (name, cfg)) in cases.into_iter().enumerate() {
        assert!(cfg.gpu_inference_unsupported().is_empty(), "{cfg:?}");
        let mut session =
            EditSession::open(&base, &tmp.path().join(format!("state{i}")), Some(cfg)).unwrap();
        apply_stream(&base, &mut session, &records, false, None).unwrap();
        states.push((name, session));
    }
    let Some(dev) = common::test_device("gpu_key_store_state_matches_cpu") else {
        return;
    };
    for (name, session) in &states {
        for_each_dtype!(
            &dev,
            check_key_store_state(model, &session.elder, &prompts, name)
        );
    }
}

fn check_key_store_state<T: KernelDtype>(
    dev: &Dev,
    model: &Model,
    elder: &Elder,
    prompts: &[Vec<u32>],
    case: &str,
) where
    CudaBlas: Gemm<T>,
{
    use elder::eval::ElderRequest;
    use elder::model::runner::{logits, CpuForward, Forward};

    let cpu = rounded::<T>(model);
    let (_, shape) = pad_batch(prompts, &vec![0; prompts.len()]);
    let tag = format!("key store, {case}, {}", T::SUFFIX);
    // The CPU's request layer, as the GPU's: logits and what ELDER reported.
    let request = ElderRequest::new(Some(elder));
    let mut fwd = CpuForward::new(&cpu, request);
    let (want, _) = logits(&mut fwd, prompts).unwrap();
    let cpu_report = fwd.report().unwrap().expect("an edited request reports");
    let ids = |m: &[Option<(f32, String, Option<f32>)>]| -> Vec<Option<String>> {
        m.iter().map(|m| m.as_ref().map(|m| m.1.clone())).collect()
    };
    // The case means something.
    let some = |id: &str| Some(id.to_string());
    // Each edit prompt matches its edit first (the fallback may move it on afterwards: the
    // first edit the gate asked is the first match then).
    let moves = elder.cfg.answer_gate_fallback || elder.cfg.answer_gate_candidates > 1;
    let first_matches: Vec<Option<String>> = if moves {
        cpu_report.asked[..4]
            .iter()
            .map(|a| a.first().map(|(id, _)| id.clone()))
            .collect()
    } else {
        ids(&cpu_report.matches)[..4].to_vec()
    };
    assert_eq!(
        first_matches,
        [some("a"), some("b"), some("c"), some("d")],
        "{tag}: the edit prompts match their edits on the CPU"
    );
    assert_eq!(ids(&cpu_report.matches)[4..6], [None, None], "{tag}");
    if elder.cfg.answer_gate > 0.0 {
        // The gate keeps some matched sequences and turns others away (the question among them).
        // With the fallback, the question first goes to the subject's other edit.
        let kept = cpu_report.in_scope.iter().filter(|&&s| s).count();
        let gated = cpu_report.gated.iter().filter(|&&g| g).count();
        assert!(kept > 0 && gated > 0, "{tag}: {cpu_report:?}");
        if moves {
            assert_eq!(
                cpu_report.asked[6].len(),
                2,
                "{tag}: the question asked the subject's other edit: {:?}",
                cpu_report.asked
            );
        } else {
            assert!(
                cpu_report.gated[6],
                "{tag}: the question no edit answers is turned away"
            );
        }
        // Answers of several tokens: the GPU asks with its teacher-forced pass.
        assert!(elder.memory.iter().any(|e| e.answer.len() > 1), "{tag}");
    } else {
        assert!(cpu_report.gated.is_empty());
        assert_eq!(
            &cpu_report.in_scope[..6],
            &[true, true, true, true, false, false],
            "{tag}"
        );
    }

    let cap = Capacity {
        batch: prompts.len(),
        seq: shape.seq,
    };
    let mut gpu = GpuModel::<T>::new(dev.clone(), model, cap).unwrap();
    gpu.set_elder(Some(elder)).unwrap();
    let (got, _) = gpu.logits(prompts, true).unwrap();
    let report = gpu.elder_report().unwrap();
    assert_eq!(report.in_scope, cpu_report.in_scope, "{tag}: in scope");
    assert_eq!(report.gated, cpu_report.gated, "{tag}: gated");
    // The same edits asked by the gate, with the same answers' log-probabilities.
    let asked_ids = |a: &[Vec<(String, f32)>]| -> Vec<Vec<String>> {
        a.iter()
            .map(|v| v.iter().map(|(id, _)| id.clone()).collect())
            .collect()
    };
    assert_eq!(
        asked_ids(&report.asked),
        asked_ids(&cpu_report.asked),
        "{tag}: asked"
    );
    assert_eq!(
        cpu_report.asked.iter().all(Vec::is_empty),
        cpu_report.gated.is_empty(),
        "{tag}: the gate asks when it is on"
    );
    for (g, c) in report
        .asked
        .iter()
        .flatten()
        .zip(cpu_report.asked.iter().flatten())
    {
        assert!(
            (g.1 - c.1).abs() < 0.25,
            "{tag}: answer log-probability {} vs {}",
            g.1,
            c.1
        );
    }
    assert_eq!(
        ids(&report.matches),
        ids(&cpu_report.matches),
        "{tag}: matched edits"
    );
    for (g, c) in report.matches.iter().zip(&cpu_report.matches) {
        if let (Some(g), Some(c)) = (g, c) {
            assert!(
                (g.0 - c.0).abs() < 2e-2,
                "{tag}: key similarity {} vs {}",
                g.0,
                c.0
            );
        }
    }
    let v = model.cfg.vocab_size;
    let worst = assert_close(
        &format!("{tag}: edited logits"),
        &valid_rows(&got, prompts, shape.seq, v),
        &valid_rows(&want, prompts, shape.seq, v),
        tol::<T>(),
    );
    eprintln!("{tag}: edited logits max |gpu - cpu| {worst:.2e}");
    // The edits moved the prompts in scope and only those: the comparison is not of two base
    // models.
    let answer_rows = elder.cfg.expert_rows == ExpertRows::Answer;
    assert_moved_in_scope_only(
        &cpu,
        prompts,
        &want,
        shape.seq,
        &cpu_report.in_scope,
        answer_rows,
        &tag,
    );
    if T::SUFFIX == "f32" {
        let rows = prompt_rows(shape.seq, prompts.iter().map(Vec::len));
        let mut adapter = ElderAdapter::inference(elder, rows);
        let want = cpu.generate(prompts, 4, None, &mut adapter);
        let (got, scope) = gpu.generate(prompts, 4, None, true).unwrap();
        assert_eq!(scope, cpu_report.in_scope, "{tag}: generation scope");
        assert_eq!(got, want, "{tag}: edited greedy generation");
    }
}
