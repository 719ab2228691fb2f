//! The edit state under crashes, a full disk and damage, through the command line: `elder edit`
//! killed with SIGKILL at random points, or stopped by a file-size limit mid-stream, then resumed,
//! ends with the state an uninterrupted run writes, bit for bit (every edit applied exactly once,
//! in order, nothing half-written left behind); a damaged newest generation is found by
//! `elder state verify` and rolled back with `elder state rollback`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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
    // One edit per commit, so that kills a few edits apart land between commits (the default
    // preset commits every 8 edits; a stream cut between batches resumes the same way).
    c.args(["edit", "--json", "--batch-size", "1", "--model"])
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

/// Every data file of the state with its bytes; manifests (they carry timestamps) are compared
/// by their fields instead.
fn data_files(state: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(state)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| !e.file_name().to_string_lossy().starts_with("manifest"))
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect()
}

/// A tiny random model, a stream of `EDITS` edits, and the state an uninterrupted run makes of
/// it (with the time that run took).
struct Fixture {
    tmp: tempfile::TempDir,
    model: PathBuf,
    edits: PathBuf,
    reference: PathBuf,
    /// From the start of the uninterrupted run to its first commit (start-up and one edit).
    first_commit: Duration,
    whole_run: Duration,
}

/// How many edits the state's manifest lists, if it has one to read.
fn applied(state: &Path) -> Option<usize> {
    let bytes = std::fs::read(state.join("manifest.json")).ok()?;
    let manifest: Value = serde_json::from_slice(&bytes).ok()?;
    Some(manifest["applied_edit_ids"].as_array()?.len())
}

fn fixture() -> Fixture {
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
    let mut child = edit(&model, &edits, &reference).spawn().unwrap();
    let mut first_commit = None;
    let status = loop {
        if first_commit.is_none() && applied(&reference).is_some_and(|n| n > 0) {
            first_commit = Some(started.elapsed());
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert!(status.success());
    let whole_run = started.elapsed();
    Fixture {
        tmp,
        model,
        edits,
        reference,
        first_commit: first_commit.unwrap_or(whole_run),
        whole_run,
    }
}

/// The resumed state equals the uninterrupted one: ids once and in order, same files.
fn assert_same_as_uninterrupted(f: &Fixture, state: &Path, what: &str) {
    let (want, got) = (manifest(&f.reference), manifest(state));
    let ids: Vec<Value> = (0..EDITS).map(|i| Value::from(format!("e{i}"))).collect();
    assert_eq!(
        got["applied_edit_ids"],
        Value::from(ids),
        "each edit once, in order"
    );
    for key in ["generation", "files", "method_config", "codebook_entries"] {
        assert_eq!(got[key], want[key], "{key} differs after {what}");
    }
    assert!(
        data_files(state) == data_files(&f.reference),
        "the state's files differ from an uninterrupted run's after {what}"
    );
}

#[test]
fn kill_9_at_random_points_then_resume_equals_an_uninterrupted_run() {
    let f = fixture();
    // Kill at random times over the stream's length; a kill only counts if the process was
    // still running (it had not finished the stream).
    let crashed = f.tmp.path().join("crashed");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (mut kills, mut progress) = (0, Vec::new());
    while kills < KILLS {
        let mut child = edit(&f.model, &f.edits, &crashed).spawn().unwrap();
        // Around the first commit (start-up and one edit, measured: a fraction of the whole run
        // would miss it where start-up dominates) plus up to a few edits' time: some kills land
        // before the first commit, most a commit or two after it, and twelve cover about a
        // third of the stream.
        let rest = f.whole_run.saturating_sub(f.first_commit);
        let wait = f.first_commit.mul_f64(rng.gen_range(0.7..1.0))
            + rest.mul_f64(rng.gen_range(0.0..0.08));
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
    assert!(edit(&f.model, &f.edits, &crashed)
        .status()
        .unwrap()
        .success());
    assert_same_as_uninterrupted(&f, &crashed, &format!("{kills} kills ({progress:?})"));
}

fn state_cli(args: &[&str], dir: &Path) -> (bool, String) {
    let out = elder().arg("state").args(args).arg(dir).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A commit that cannot be written (here: past a 100 KiB file-size limit, as on a full disk)
/// fails with a clear error, leaves nothing of the failed generation behind and the last one
/// loadable; without the limit the stream resumes to the uninterrupted state. On the way, a
/// damaged newest generation is found and rolled back through the command line.
#[test]
fn a_full_disk_fails_cleanly_and_a_damaged_generation_rolls_back() {
    let f = fixture();
    let state = f.tmp.path().join("limited");
    let out = Command::new("bash")
        .arg("-c")
        .arg("ulimit -f 100 && exec \"$@\"")
        .arg("elder-under-a-file-size-limit")
        .arg(env!("CARGO_BIN_EXE_elder"))
        .args(["edit", "--json", "--batch-size", "1", "--model"])
        .arg(&f.model)
        .arg("--edits")
        .arg(&f.edits)
        .arg("--state")
        .arg(&state)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("File too large") && err.contains("the state stays at generation"),
        "{err}"
    );
    let at = manifest(&state)["generation"].as_u64().unwrap();
    assert!(
        at > 1 && (at as usize) < EDITS,
        "stopped at generation {at}"
    );
    // Only the last two generations' files and the earlier tensors files their chains extend:
    // nothing of the failed one, no temp files.
    let names: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let previous: Value = serde_json::from_slice(
        &std::fs::read(state.join(format!("manifest-{:06}.json", at - 1))).unwrap(),
    )
    .unwrap();
    let chains: Vec<String> = [manifest(&state), previous]
        .iter()
        .flat_map(|m| {
            m["files"]["earlier_experts"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect();
    for name in &names {
        assert!(
            name == "manifest.json"
                || name.contains(&format!("{at:06}"))
                || name.contains(&format!("{:06}", at - 1))
                || chains.contains(name),
            "{name} left behind at generation {at}: {names:?}"
        );
    }
    let (ok, text) = state_cli(&["verify"], &state);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("generation {at} (current)")),
        "{text}"
    );

    // Damage the newest generation: verify fails and names the way back.
    let experts = state.join(format!("experts-{at:06}.safetensors"));
    let mut bytes = std::fs::read(&experts).unwrap();
    bytes[64] ^= 0x01;
    std::fs::write(&experts, &bytes).unwrap();
    let (ok, text) = state_cli(&["verify"], &state);
    assert!(!ok, "{text}");
    let hint = format!("elder state rollback {} --to {}", state.display(), at - 1);
    assert!(
        text.contains("is damaged") && text.contains(&hint),
        "{text}"
    );
    assert!(!edit(&f.model, &f.edits, &state).status().unwrap().success());
    let (ok, text) = state_cli(&["rollback", "--to", &(at - 1).to_string()], &state);
    assert!(ok, "{text}");

    assert!(edit(&f.model, &f.edits, &state).status().unwrap().success());
    assert_same_as_uninterrupted(&f, &state, "a full disk, damage and a rollback");

    // The tensors, whole, in one file outside the state.
    let out = f.tmp.path().join("exported.safetensors");
    let (ok, text) = state_cli(&["export", "--out", out.to_str().unwrap()], &state);
    assert!(ok, "{text}");
    let tensors = elder::elder::state::parse_experts(&std::fs::read(&out).unwrap()).unwrap();
    assert!(
        !tensors.is_empty() && tensors.iter().all(|t| !t.name.contains('@')),
        "{text}"
    );
}
