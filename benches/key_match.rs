//! What the default preset adds to inference: matching a prompt's keys against the key store
//! (every position's key, centred and normalised, against every stored key variant, then the
//! relation tie-break on the context relation key), next to the forward of the same prompt it
//! is part of. The budget is under 5% of a forward.
//!
//! The store holds random unit keys (the cost depends only on the shapes): 1000 and 10000 edits,
//! three key variants each, width 576 (SmolLM2's hidden size; the key site is block 2's
//! `up_proj` input); relation keys of width 1536 (block 21's `down_proj` input). The forward is SmolLM2-135M when models/smollm2-135m exists, else the
//! `gpt2` preset with random weights, on a 12-token prompt (the datasets' prompts are 6-16 tokens).
//! Also the answer gate's two costs: one head row, and the blocks from the first MoLoRA layer.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use elder::elder::config::{ElderConfig, KeyKind, Preset, RelationKey};
use elder::elder::keystore::{Background, KeyCeilings, KeySpace, KeyStore, RelationKeys};
use elder::model::layers::{MlpProj, Site};
use elder::model::loader::{build_model, load_model_dir, RandomSource};
use elder::model::presets::preset;
use elder::model::runner::pad_batch;
use elder::model::{Arch, KvCache, NoAdapter};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const WIDTH: usize = 576;
const RELATION_WIDTH: usize = 1536;
const PROMPT: usize = 12;
const VARIANTS: usize = 3;
/// Rows per key (the default preset's `key_span`).
const SPAN: usize = 3;
/// Rows of the shipped background text at the relation site (SmolLM2's tokenizer).
const BACKGROUND_ROWS: usize = 1874;

fn unit_rows(rng: &mut ChaCha8Rng, rows: usize, width: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..rows * width)
        .map(|_| rng.gen_range(-1.0..1.0))
        .collect();
    for row in v.chunks_mut(width) {
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= n);
    }
    v
}

fn store(edits: usize, span: usize, rng: &mut ChaCha8Rng) -> KeyStore {
    let space = |block, proj, width| {
        let background = Background {
            first: vec![0.01; width],
            leading: Vec::new(),
            rest: vec![0.02; width],
        };
        KeySpace::new(Site { block, proj }, width, true, background, 0, 0)
    };
    let mut relation = RelationKeys::new(
        RelationKey::Context,
        space(21, MlpProj::DownProj, RELATION_WIDTH),
    );
    relation.rows = unit_rows(rng, edits, RELATION_WIDTH);
    relation.subject_tokens = vec![2; edits];
    let mut store = KeyStore::new(
        KeyKind::Subject,
        VARIANTS,
        span,
        space(2, MlpProj::UpProj, WIDTH),
        Some(relation),
        KeyCeilings::off(),
    );
    // Every key with all its rows: the most work a match can cost.
    store.set_keys(unit_rows(rng, edits * VARIANTS * span, WIDTH));
    store
}

fn bench_inference_overhead(c: &mut Criterion) {
    let mut group = c.benchmark_group("inference_overhead");
    group.sample_size(20);
    let smol_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smollm2-135m");
    let (name, model) = if smol_dir.join("config.json").exists() {
        ("smollm2-135m", load_model_dir(&smol_dir).unwrap())
    } else {
        let cfg = preset(Arch::Gpt2, "gpt2").unwrap();
        (
            "gpt2-124m-random",
            build_model(&cfg, &RandomSource { seed: 0 }).unwrap(),
        )
    };
    let ids: Vec<u32> = (0..PROMPT)
        .map(|i| ((i * 7919 + 13) % model.cfg.vocab_size) as u32)
        .collect();
    group.bench_function(BenchmarkId::new("forward_12_tokens", name), |b| {
        b.iter(|| model.logits(std::slice::from_ref(&ids), &mut NoAdapter))
    });
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut random_rows = |width: usize| -> Vec<f32> {
        (0..PROMPT * width)
            .map(|_| rng.gen_range(-2.0..2.0))
            .collect()
    };
    let (rows, relation_rows) = (random_rows(WIDTH), random_rows(RELATION_WIDTH));
    let background = random_rows(RELATION_WIDTH * BACKGROUND_ROWS / PROMPT);
    // Keys of one row (key_span = 1) and of the default preset's two.
    for edits in [1000usize, 10000] {
        for span in [1, SPAN] {
            let store = store(edits, span, &mut rng);
            let id = format!("{edits}-span{span}");
            group.bench_function(BenchmarkId::new("key_match_12_tokens", id), |b| {
                b.iter(|| store.match_prompt(&rows, Some(&relation_rows), 0.05))
            });
        }
    }
    // The relation key of a 12-token prompt (subject at rows 2..4), read when several edits of
    // one subject compete: the plain context mean, and the weighted one, which measures each row
    // against the background text's rows (1874 for SmolLM2 and data/generic_text.txt).
    let relation_space = store(1, 1, &mut rng).relation.unwrap().space;
    for kind in [RelationKey::Context, RelationKey::WeightedContext] {
        let mut keys = RelationKeys::new(kind, relation_space.clone());
        keys.set_background(&[&background]);
        let name = format!("{kind:?}");
        group.bench_function(BenchmarkId::new("relation_key_12_tokens", name), |b| {
            b.iter(|| keys.key(&relation_rows, 2..4))
        });
    }
    // The answer gate (`answer_gate`): each prompt in scope costs one head row (its matched
    // edit's answer token at the last prompt row), and a batch where a prompt is turned away
    // runs the blocks from the first MoLoRA layer again (8 of SmolLM2's 30).
    let first = ElderConfig::preset(Preset::Default, &model.cfg).molora_blocks[0];
    let (padded, shape) = pad_batch(std::slice::from_ref(&ids), &[0]);
    let mut cache = KvCache::new(&model.cfg, 1, PROMPT);
    let mut h = model.embed(&padded, &shape);
    for l in 0..first {
        model.attn_half(l, &mut h, &shape, &mut cache, None);
        model.mlp_half(l, &mut h, &shape, &mut NoAdapter, None);
    }
    let entering = h;
    let blocks_from = |cache: &mut KvCache| {
        let mut h = entering.clone();
        for l in first..model.blocks.len() {
            model.attn_half(l, &mut h, &shape, cache, None);
            model.mlp_half(l, &mut h, &shape, &mut NoAdapter, None);
        }
        h
    };
    let last = blocks_from(&mut cache.clone());
    group.bench_function(BenchmarkId::new("answer_gate_head_row", name), |b| {
        b.iter(|| model.head(&last, &[PROMPT - 1]))
    });
    let rerun = format!("answer_gate_blocks_{first}_on_12_tokens");
    group.bench_function(BenchmarkId::new(rerun, name), |b| {
        b.iter(|| blocks_from(&mut cache.clone()))
    });
    group.finish();
}

criterion_group!(benches, bench_inference_overhead);
criterion_main!(benches);
