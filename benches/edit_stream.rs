//! The default preset's edit stream on the CPU, as `elder edit` runs it (planning, augmentation,
//! negatives, training, keys, commits): four real edits of data/geo_facts.jsonl into a fresh
//! state per sample, one edit per batch against four per batch, with experts on every row
//! (the default) and on the answer rows only (`expert_rows = "answer"`). Needs SmolLM2-135M
//! (models/smollm2-135m; tools/fetch_smollm2.sh). Edits per second = 4 / the median.

use criterion::{criterion_group, criterion_main, Criterion};
use elder::data::{read_edits, DataFormat};
use elder::elder::config::{ElderConfig, ExpertRows, Preset};
use elder::session::{apply_stream, BaseModel, EditSession};

const EDITS: usize = 4;

fn bench_stream(c: &mut Criterion) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("models/smollm2-135m");
    if !dir.join("config.json").exists() {
        println!("SKIP edit_stream: {} not found", dir.display());
        return;
    }
    let base = BaseModel::open(&dir).unwrap();
    base.model().unwrap(); // load the f32 model outside the timings
    let mut records = read_edits(&root.join("data/geo_facts.jsonl"), DataFormat::Auto).unwrap();
    records.truncate(EDITS);
    let mut group = c.benchmark_group("edit_stream_4_geo_edits");
    for (name, batch_size, rows) in [
        ("default_batch_1", 1, ExpertRows::All),
        ("default_batch_4", 4, ExpertRows::All),
        ("answer_rows_batch_4", 4, ExpertRows::Answer),
    ] {
        let cfg = ElderConfig {
            batch_size,
            expert_rows: rows,
            ..ElderConfig::preset(Preset::Default, &base.cfg)
        };
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let tmp = tempfile::tempdir().unwrap();
                    let session = EditSession::open(&base, tmp.path(), Some(cfg.clone())).unwrap();
                    (tmp, session)
                },
                |(tmp, mut session)| {
                    apply_stream(&base, &mut session, &records, false, None).unwrap();
                    tmp
                },
                criterion::BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(std::time::Duration::from_secs(1));
    targets = bench_stream
}
criterion_main!(benches);
