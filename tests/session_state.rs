//! The durable edit state through the session layer: what is committed reopens identically, an
//! interrupted stream resumes after the last commit, and a state refuses another model or config.

use std::path::Path;

use elder::data::{read_edits, DataFormat, EditRecord};
use elder::elder::config::ElderConfig;
use elder::model::checkpoint::StoreDtype;
use elder::model::presets::write_random_checkpoint;
use elder::model::Arch;
use elder::session::{apply_stream, BaseModel, EditSession};

fn records(n: usize) -> Vec<EditRecord> {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/geo_facts.jsonl");
    let mut r = read_edits(&data, DataFormat::Auto).unwrap();
    r.truncate(n);
    r
}

fn tiny_model(dir: &Path, seed: u64) -> BaseModel {
    write_random_checkpoint(Arch::Llama, "tiny", seed, dir, StoreDtype::F32).unwrap();
    BaseModel::open(dir).unwrap()
}

fn config(base: &BaseModel, centering: bool) -> ElderConfig {
    ElderConfig {
        iterations: 5,
        query_centering: centering,
        ..ElderConfig::preset_for(&base.cfg)
    }
}

/// What a GPU command does before it runs (open the model and the state, stage the weights for
/// the upload) builds no f32 CPU model; the CPU path builds it on first use, once.
#[test]
fn the_cpu_model_is_built_only_when_asked_for() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_model(&tmp.path().join("model"), 3);
    let session =
        EditSession::open(&base, &tmp.path().join("state"), Some(config(&base, false))).unwrap();
    assert_eq!(
        session.elder.layers.len(),
        config(&base, false).molora_blocks.len()
    );
    let staged = base.weight_source().staged_tensors::<half::bf16>().unwrap();
    assert!(!staged.is_empty());
    assert!(
        !base.cpu_model_built(),
        "opening or staging built the CPU model"
    );
    let first: *const _ = base.model().unwrap();
    assert!(base.cpu_model_built());
    assert!(std::ptr::eq(first, base.model().unwrap()), "built twice");
}

#[test]
fn committed_state_reopens_identically() {
    for centering in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let base = tiny_model(&tmp.path().join("model"), 1);
        let state = tmp.path().join("state");
        let mut s = EditSession::open(&base, &state, Some(config(&base, centering))).unwrap();
        apply_stream(&base, &mut s, &records(3), false, None).unwrap();
        assert_eq!(s.elder.query_mean.is_some(), centering);
        let reopened = EditSession::open(&base, &state, None).unwrap();
        assert!(
            reopened.elder == s.elder,
            "centering={centering}: reopened state differs"
        );
        assert_eq!(reopened.state.applied_ids().len(), 3);
    }
}

#[test]
fn interrupted_stream_resumes_to_the_same_state() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_model(&tmp.path().join("model"), 2);
    let all = records(4);
    // One pass over all four edits...
    let mut straight =
        EditSession::open(&base, &tmp.path().join("a"), Some(config(&base, false))).unwrap();
    apply_stream(&base, &mut straight, &all, false, None).unwrap();
    // ...versus two edits, a "crash" (the session is dropped), and a rerun over the whole file.
    let b = tmp.path().join("b");
    let mut first = EditSession::open(&base, &b, Some(config(&base, false))).unwrap();
    apply_stream(&base, &mut first, &all[..2], false, None).unwrap();
    drop(first);
    let mut resumed = EditSession::open(&base, &b, None).unwrap();
    let summary = apply_stream(&base, &mut resumed, &all, false, None).unwrap();
    assert_eq!((summary.applied, summary.already_applied), (2, 2));
    assert!(
        resumed.elder == straight.elder,
        "resuming did not reproduce the uninterrupted state"
    );
}

#[test]
fn state_refuses_another_model_or_config() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny_model(&tmp.path().join("m1"), 3);
    let other = tiny_model(&tmp.path().join("m2"), 4);
    let state = tmp.path().join("state");
    let mut s = EditSession::open(&base, &state, Some(config(&base, false))).unwrap();
    apply_stream(&base, &mut s, &records(1), false, None).unwrap();
    let err = EditSession::open(&other, &state, None)
        .err()
        .expect("another model must be refused");
    assert!(format!("{err:#}").contains("another base model"), "{err:#}");
    let changed = ElderConfig {
        num_experts: 8,
        ..config(&base, false)
    };
    let err = EditSession::open(&base, &state, Some(changed))
        .err()
        .expect("another config must be refused");
    assert!(format!("{err:#}").contains("num_experts"), "{err:#}");
}
