//! One ELDER edit (all iterations of the default config: 6 MoLoRA layers x 4 experts, r = 8,
//! 50 Adam iterations, batch size 1) on the CPU, on the `gpt2` (124M) preset and on SmolLM2-135M
//! when present. Compare with `tools/bench_torch_edit.py` at the same thread count.

use criterion::{criterion_group, criterion_main, Criterion};
use elder::elder::config::ElderConfig;
use elder::elder::molora::Elder;
use elder::elder::trainer::{apply_edit_batch, EditExample};
use elder::model::loader::{build_model, load_model_dir, RandomSource};
use elder::model::presets::preset;
use elder::model::{Arch, Model};

/// A 20-token edit: a 17-token prompt and a 3-token target, like a short ZsRE question.
fn edit(model: &Model) -> EditExample {
    let v = model.cfg.vocab_size;
    EditExample {
        prompt: (0..17).map(|i| ((i * 7919 + 13) % v) as u32).collect(),
        target: (0..3).map(|i| ((i * 104_729 + 5) % v) as u32).collect(),
        knowledge_id: "bench".into(),
    }
}

fn bench_one(c: &mut Criterion, name: &str, model: &Model) {
    let ex = edit(model);
    let elder = Elder::new(ElderConfig::preset_for(&model.cfg), &model.cfg).unwrap();
    c.bench_function(&format!("cpu_edit_50_iterations/{name}"), |b| {
        b.iter_batched(
            || elder.clone(),
            |mut e| apply_edit_batch(model, &mut e, std::slice::from_ref(&ex), |_, _| {}).unwrap(),
            criterion::BatchSize::LargeInput,
        )
    });
}

fn bench_edit(c: &mut Criterion) {
    let gpt2 = build_model(
        &preset(Arch::Gpt2, "gpt2").unwrap(),
        &RandomSource { seed: 0 },
    )
    .unwrap();
    bench_one(c, "gpt2-124m", &gpt2);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smollm2-135m");
    if dir.join("config.json").exists() {
        bench_one(c, "smollm2-135m", &load_model_dir(&dir).unwrap());
    } else {
        println!("SKIP smollm2-135m: {} not found", dir.display());
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(std::time::Duration::from_secs(1));
    targets = bench_edit
}
criterion_main!(benches);
