//! Tests on the real SmolLM2-135M (fetched and converted by tools/fetch_smollm2.sh into
//! models/smollm2-135m). Without the model they print a SKIP line, unless ELDER_REQUIRE_REAL_MODEL
//! is set (CI sets it), in which case a missing model is a failure.

use std::path::PathBuf;

use elder::data::{read_edits, DataFormat};
use elder::elder::config::ElderConfig;
use elder::eval::Evaluator;
use elder::model::NoAdapter;
use elder::session::{apply_stream, evaluate_final, BaseModel, EditSession};

fn model_dir(test: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/smollm2-135m");
    if dir.join("config.json").exists() {
        return Some(dir);
    }
    if std::env::var_os("ELDER_REQUIRE_REAL_MODEL").is_some() {
        panic!(
            "{test}: {} is missing; run tools/fetch_smollm2.sh",
            dir.display()
        );
    }
    println!(
        "SKIP {test}: {} not found (run tools/fetch_smollm2.sh)",
        dir.display()
    );
    eprintln!(
        "SKIP {test}: {} not found (run tools/fetch_smollm2.sh)",
        dir.display()
    );
    None
}

#[test]
fn smollm2_knows_the_capital_of_france() {
    let Some(dir) = model_dir("smollm2_knows_the_capital_of_france") else {
        return;
    };
    let base = BaseModel::open(&dir).unwrap();
    let prompt = base.tokenizer.encode("The capital of France is").unwrap();
    let out = base
        .model
        .generate(&[prompt], 6, base.tokenizer.eos_id(), &mut NoAdapter);
    let text = base.tokenizer.decode(&out[0]).unwrap();
    assert!(text.contains("Paris"), "greedy continuation was {text:?}");
}

/// A small stream of real counterfactual edits: the edits must take, and prompts about other
/// subjects must keep the unedited model's answers.
#[test]
fn smollm2_edit_stream_takes_and_keeps_locality() {
    let Some(dir) = model_dir("smollm2_edit_stream_takes_and_keeps_locality") else {
        return;
    };
    let n: usize = std::env::var("ELDER_REAL_EDITS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let base = BaseModel::open(&dir).unwrap();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/geo_facts.jsonl");
    let mut records = read_edits(&data, DataFormat::Auto).unwrap();
    records.truncate(n);
    let state = tempfile::tempdir().unwrap();
    let cfg = ElderConfig::preset_for(&base.model.cfg);
    let mut session = EditSession::open(&base, state.path(), Some(cfg)).unwrap();
    let mut each = Evaluator::default();
    let summary = apply_stream(&base, &mut session, &records, false, Some(&mut each)).unwrap();
    assert_eq!(summary.applied, n);
    let right_after = each.metrics(elder::eval::Protocol::Each);
    let m = evaluate_final(&base, &session.elder, &records, false).unwrap();
    eprintln!("each: {}", right_after.table());
    eprintln!("final: {}", m.table());
    assert!(
        right_after.reliability >= 0.9,
        "edits did not take: {right_after:?}"
    );
    assert!(
        m.reliability >= 0.8,
        "edits were forgotten by the end of the stream: {m:?}"
    );
    assert!(m.locality >= 0.8, "unrelated prompts changed: {m:?}");
    // The state on disk reproduces the session.
    let reopened = EditSession::open(&base, state.path(), None).unwrap();
    assert!(
        reopened.elder == session.elder,
        "the committed state differs from the trained one"
    );
}
