//! CPU forward of a 32-token prompt (all logits, as transformers' `model(ids)` returns them) on the
//! `gpt2` (124M) preset with seeded random weights, and on SmolLM2-135M when models/smollm2-135m
//! exists; and one cached decode step of SmolLM2 (a token per sequence after a 32-token prompt) at
//! batch 1 and 8. Compare with `tools/bench_torch_forward.py` (`--decode-tokens`, `--batch`) at the
//! same thread count (RAYON_NUM_THREADS / --threads).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use elder::model::loader::{build_model, load_model_dir, RandomSource};
use elder::model::presets::preset;
use elder::model::runner::{pad_batch, CpuForward, Forward};
use elder::model::{Adapter, Arch, Model, NoAdapter};

fn prompt(model: &Model, len: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((i * 7919 + 13) % model.cfg.vocab_size) as u32)
        .collect()
}

fn bench_forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu_forward_32_tokens");
    group.sample_size(20);
    let gpt2 = build_model(
        &preset(Arch::Gpt2, "gpt2").unwrap(),
        &RandomSource { seed: 0 },
    )
    .unwrap();
    let ids = prompt(&gpt2, 32);
    group.bench_function("gpt2-124m", |b| {
        b.iter(|| gpt2.logits(std::slice::from_ref(&ids), &mut NoAdapter))
    });
    let smol_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smollm2-135m");
    if smol_dir.join("config.json").exists() {
        let smol = load_model_dir(&smol_dir).unwrap();
        let ids = prompt(&smol, 32);
        group.bench_function("smollm2-135m", |b| {
            b.iter(|| smol.logits(std::slice::from_ref(&ids), &mut NoAdapter))
        });
    } else {
        println!("SKIP smollm2-135m: {} not found", smol_dir.display());
    }
    group.finish();
}

/// Decode steps timed per step: each sample prefills `batch` 32-token prompts (not timed), then
/// runs `STEPS` decode steps (timed), so the cache holds 33..=48 tokens while it is measured.
fn bench_decode(c: &mut Criterion) {
    const STEPS: usize = 16;
    let smol_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smollm2-135m");
    if !smol_dir.join("config.json").exists() {
        println!("SKIP decode: {} not found", smol_dir.display());
        return;
    }
    let smol = load_model_dir(&smol_dir).unwrap();
    let mut group = c.benchmark_group("cpu_decode_step");
    group.sample_size(10);
    for batch in [1usize, 8] {
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|b| {
                (0..32)
                    .map(|i| ((i * 7919 + 13 + b * 101) % smol.cfg.vocab_size) as u32)
                    .collect()
            })
            .collect();
        group.bench_function(BenchmarkId::new("smollm2-135m", batch), |bch| {
            bch.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut none = NoAdapter;
                    let mut fwd = CpuForward::new(&smol, &mut none as &mut dyn Adapter);
                    fwd.begin(batch, 32 + STEPS).unwrap();
                    let (ids, shape) = pad_batch(&prompts, &vec![0; batch]);
                    fwd.prompt(&ids, &shape, &vec![32; batch]).unwrap();
                    let start = Instant::now();
                    for step in 0..STEPS {
                        let next: Vec<Vec<u32>> = (0..batch)
                            .map(|b| vec![((step * 31 + b * 7 + 5) % smol.cfg.vocab_size) as u32])
                            .collect();
                        let (ids, shape) = pad_batch(&next, &vec![32 + step; batch]);
                        std::hint::black_box(fwd.decode_step(&ids, &shape).unwrap());
                    }
                    total += start.elapsed() / STEPS as u32;
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_forward, bench_decode);
criterion_main!(benches);
