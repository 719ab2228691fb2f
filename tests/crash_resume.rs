//! `elder edit` killed with SIGKILL at random points of a stream, then resumed, ends with the
//! state an uninterrupted run writes, bit for bit: every edit applied exactly once, in order, and
//! nothing half-written left behind (state.rs: files first, then the manifest rename).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::Value;

const EDITS: usize = 40;
/// Kills that must land on a running `elder edit` (the issue asks for at least 10).
const KILLS: usize = 12;

fn elder() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_elder"));
    c.env("RAYON_NUM_THREADS", "1");
    c
}

fn edit(model: &Path, edits: &Path, state: &Path) -> Command {
    let mut c = elder();
    c.args(["edit", "--json", "--model"])
        .arg(model)
        .arg("--edits")
        .arg(edits)
        .arg("--state")
        .arg(state)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn manifest(state: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(state.join("manifest.json")).unwrap()).unwrap()
}

/// Every file of the state with its bytes, except the manifest (it carries timestamps).
fn data_files(state: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(state)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != "manifest.json")
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect()
}

#[test]
fn kill_9_at_random_points_then_resume_equals_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let status = elder()
        .args([
            "init-random",
            "--arch",
            "llama",
            "--preset",
            "tiny",
            "--seed",
            "1",
        ])
        .arg("--out")
        .arg(&model)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let edits = tmp.path().join("edits.jsonl");
    let words = ["red", "blue", "green", "seven"];
    let lines: Vec<String> = (0..EDITS)
        .map(|i| {
            serde_json::json!({"id": format!("e{i}"), "prompt": format!("The secret code of item {i} is"),
                "target_new": words[i % 4], "subject": format!("item {i}")})
            .to_string()
        })
        .collect();
    std::fs::write(&edits, lines.join("\n") + "\n").unwrap();

    let reference = tmp.path().join("uninterrupted");
    let started = Instant::now();
    assert!(edit(&model, &edits, &reference).status().unwrap().success());
    let whole_run = started.elapsed();

    // Kill at random times over the stream's length; a kill only counts if the process was
    // still running (it had not finished the stream).
    let crashed = tmp.path().join("crashed");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (mut kills, mut progress) = (0, Vec::new());
    while kills < KILLS {
        let mut child = edit(&model, &edits, &crashed).spawn().unwrap();
        // Start-up plus up to a few edits' time: twelve kills cover about half the stream.
        let wait = Duration::from_millis(50) + whole_run.mul_f64(rng.gen_range(0.0..0.06));
        std::thread::sleep(wait);
        if child.try_wait().unwrap().is_some() {
            break; // finished the stream before the kill
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        if crashed.join("manifest.json").exists() {
            let applied = manifest(&crashed)["applied_edit_ids"]
                .as_array()
                .unwrap()
                .len();
            progress.push(applied);
        }
    }
    assert!(kills >= 10, "only {kills} kills landed on a running stream");
    assert!(
        progress.last().is_some_and(|&n| n > 0 && n < EDITS),
        "the kills should land mid-stream: {progress:?}"
    );
    assert!(
        progress.windows(2).all(|w| w[0] <= w[1]),
        "a kill lost committed edits: {progress:?}"
    );
    eprintln!("{kills} kills; edits committed at each kill: {progress:?}");
    assert!(edit(&model, &edits, &crashed).status().unwrap().success());

    let (want, got) = (manifest(&reference), manifest(&crashed));
    let ids: Vec<Value> = (0..EDITS).map(|i| Value::from(format!("e{i}"))).collect();
    assert_eq!(
        got["applied_edit_ids"],
        Value::from(ids),
        "each edit once, in order"
    );
    for key in ["generation", "files", "method_config", "codebook_entries"] {
        assert_eq!(
            got[key], want[key],
            "{key} differs after {kills} kills ({progress:?})"
        );
    }
    assert!(
        data_files(&crashed) == data_files(&reference),
        "the state's files differ from an uninterrupted run's after {kills} kills ({progress:?})"
    );
}
