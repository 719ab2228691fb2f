//! CPU forward of a 32-token prompt (all logits, as transformers' `model(ids)` returns them) on the
//! `gpt2` (124M) preset with seeded random weights, and on SmolLM2-135M when models/smollm2-135m
//! exists. Compare with `tools/bench_torch_forward.py` at the same thread count
//! (RAYON_NUM_THREADS / --threads).

use criterion::{criterion_group, criterion_main, Criterion};
use elder::model::loader::{build_model, load_model_dir, RandomSource};
use elder::model::presets::preset;
use elder::model::{Arch, Model, NoAdapter};

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

criterion_group!(benches, bench_forward);
criterion_main!(benches);
