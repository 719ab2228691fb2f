//! The `elder` command line end to end on a tiny random checkpoint.

use assert_cmd::Command;
use elder::backend::cuda::{announce, BUILT_WITH_KERNELS, NO_KERNELS_MSG};
use serde_json::Value;

fn elder() -> Command {
    Command::cargo_bin("elder").unwrap()
}

fn json(out: &[u8]) -> Value {
    serde_json::from_slice(out)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(out)))
}

#[test]
fn init_generate_score_edit_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let state = tmp.path().join("state");
    elder()
        .args([
            "init-random",
            "--arch",
            "llama",
            "--preset",
            "tiny",
            "--seed",
            "3",
            "--out",
        ])
        .arg(&model)
        .assert()
        .success();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(model.join(f).exists(), "{f} missing");
    }

    let out = elder()
        .args([
            "generate",
            "--prompt",
            "The capital of",
            "--max-new-tokens",
            "4",
            "--json",
            "--model",
        ])
        .arg(&model)
        .output()
        .unwrap();
    assert!(out.status.success());
    let g = json(&out.stdout);
    assert!(g["tokens"].as_array().unwrap().len() <= 4);

    let out = elder()
        .args([
            "score",
            "--prompt",
            "The capital of",
            "--target",
            " France",
            "--json",
            "--model",
        ])
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = json(&out.stdout);
    let n = s["target_tokens"].as_array().unwrap().len();
    assert!(n > 0);
    assert_eq!(s["logprobs"].as_array().unwrap().len(), n);
    assert_eq!(s["argmax"].as_array().unwrap().len(), n);
    assert!(s["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v.as_f64().unwrap() <= 0.0));
    assert!(!s["prompt_tokens"].as_array().unwrap().is_empty());

    // An edit file with one malformed line between two good ones.
    let edits = tmp.path().join("edits.jsonl");
    std::fs::write(
        &edits,
        concat!(
            r#"{"id":"a","prompt":"The capital of France is","target_new":"Rome","rephrases":["France's capital is"],"locality":[{"prompt":"The sky is","answer":"blue"}]}"#, "\n",
            r#"{"id":"b","prompt":"Water is","target_new":7}"#, "\n",
            r#"{"id":"c","prompt":"The Eiffel Tower is in","target_new":"Berlin","rephrases":[],"locality":[]}"#, "\n",
        ),
    )
    .unwrap();
    let cfg = tmp.path().join("cfg.toml");
    std::fs::write(&cfg, "iterations = 5\n").unwrap();
    let out = elder()
        .args(["edit", "--json", "--model"])
        .arg(&model)
        .arg("--edits")
        .arg(&edits)
        .arg("--state")
        .arg(&state)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a malformed record must give exit code 2"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 2") && stderr.contains("target_new"),
        "{stderr}"
    );
    let summary = json(&out.stdout);
    assert_eq!(
        summary["applied"], 2,
        "the good records around the bad one must be applied"
    );

    // Running it again resumes: nothing left to apply.
    let out = elder()
        .args(["edit", "--json", "--model"])
        .arg(&model)
        .arg("--edits")
        .arg(&edits)
        .arg("--state")
        .arg(&state)
        .output()
        .unwrap();
    assert_eq!(json(&out.stdout)["already_applied"], 2);

    for protocol in ["final", "each"] {
        let out = elder()
            .args(["eval", "--json", "--protocol", protocol, "--model"])
            .arg(&model)
            .arg("--state")
            .arg(&state)
            .arg("--data")
            .arg(&edits)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let m = json(&out.stdout);
        assert_eq!(m["protocol"], protocol);
        assert_eq!(m["edits"], 2);
        for key in [
            "reliability",
            "reliability_exact",
            "generalization",
            "locality",
            "in_scope_edits",
            "in_scope_rephrases",
            "in_scope_locality",
        ] {
            let v = m[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key} missing: {m}"));
            assert!((0.0..=1.0).contains(&v), "{key} = {v}");
        }
    }

    // Answering with the edited model reports the scope decision.
    let out = elder()
        .args([
            "score",
            "--prompt",
            "The capital of France is",
            "--target",
            " Rome",
            "--json",
            "--model",
        ])
        .arg(&model)
        .arg("--state")
        .arg(&state)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(json(&out.stdout)["in_scope"].is_boolean());
}

#[test]
fn bad_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = elder()
        .args(["generate", "--prompt", "x", "--model"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.json"));
    let out = elder()
        .args(["init-random", "--arch", "gpt2", "--preset", "nope", "--out"])
        .arg(tmp.path().join("m"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("gpt2-xl"),
        "should list valid presets"
    );
    if !elder::backend::cuda::cuda_available() {
        let out = elder()
            .args(["--device", "cuda", "generate", "--prompt", "x", "--model"])
            .arg(tmp.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--device cuda"));
    }
    // Editing trains on CUDA too: without a driver, asking for it fails naming the device before
    // any file is read (the model folder here has no config.json).
    if !elder::backend::cuda::cuda_available() {
        let out = elder()
            .args(["--device", "cuda", "edit", "--edits", "x.jsonl", "--state"])
            .arg(tmp.path().join("s"))
            .arg("--model")
            .arg(tmp.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--device cuda") && !err.contains("config.json"),
            "{err}"
        );
    }
}

/// `--device cuda` through the command line on the CUDA emulator, loaded the way a real driver is
/// (found on the library path by cudarc, not preloaded by the test): greedy generation (whose
/// decode steps replay CUDA graphs) and scores in f32 match `--device cpu`. Without the emulator
/// (no C++ compiler) or the embedded kernels (no nvcc) it prints SKIP.
#[test]
fn cuda_command_line_on_the_emulator_matches_the_cpu() {
    let name = "cuda_command_line_on_the_emulator_matches_the_cpu";
    let Some(emu) = elder_cuda_emu::LIBRARY_DIR else {
        announce(&format!("SKIP {name}: the CUDA emulator was not built"));
        return;
    };
    if !BUILT_WITH_KERNELS {
        announce(&format!("SKIP {name}: {NO_KERNELS_MSG}"));
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["gpt2", "llama"] {
        let model = tmp.path().join(arch);
        elder()
            .args([
                "init-random",
                "--arch",
                arch,
                "--preset",
                "tiny",
                "--seed",
                "5",
                "--out",
            ])
            .arg(&model)
            .assert()
            .success();
        let run = |device: &str, args: &[&str]| -> Value {
            let out = elder()
                .env("LD_LIBRARY_PATH", emu)
                .env("ELDER_CUDA_EMU", "0")
                .args(["--device", device, "--gpu-dtype", "f32"])
                .args(args)
                .arg("--json")
                .arg("--model")
                .arg(&model)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{arch} --device {device} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            json(&out.stdout)
        };
        let gen = ["generate", "--prompt", "a b c d e", "--max-new-tokens", "8"];
        let (cpu, cuda) = (run("cpu", &gen), run("cuda", &gen));
        assert_eq!(cuda["tokens"], cpu["tokens"], "{arch}: generated tokens");
        let score = ["score", "--prompt", "a b c d", "--target", " e f"];
        let (cpu, cuda) = (run("cpu", &score), run("cuda", &score));
        let lp = |v: &Value| -> Vec<f64> {
            v["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let (a, b) = (lp(&cpu), lp(&cuda));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-4,
                "{arch}: logprobs {a:?} (cpu) vs {b:?} (cuda)"
            );
        }
    }
}

/// A sequence longer than the model's positions (128 for the tiny GPT-2) is refused before any
/// work, with both numbers in the message, on every command: `generate` (prompt plus
/// `--max-new-tokens`), `score` (prompt plus target) and the edit readers of `edit` and `eval`
/// (an over-long record is skipped like a malformed one, naming it; the others are applied).
#[test]
fn sequences_beyond_the_context_are_refused_with_both_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    elder()
        .args(["init-random", "--arch", "gpt2", "--preset", "tiny", "--out"])
        .arg(&model)
        .assert()
        .success();
    let long = "word ".repeat(3000);
    let refused = |args: &[&str], wants: &[&str]| {
        let out = elder()
            .args(args)
            .arg("--model")
            .arg(&model)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was not refused");
        assert!(!err.contains("panicked"), "{err}");
        for w in wants {
            assert!(err.contains(w), "{args:?}: {w:?} missing from {err}");
        }
    };
    refused(
        &["generate", "--prompt", &long],
        &[
            "the prompt (",
            "more than the model's 128 (its context length)",
        ],
    );
    // A prompt that fits, but not with the tokens asked for.
    refused(
        &[
            "generate",
            "--prompt",
            "The capital of",
            "--max-new-tokens",
            "200",
        ],
        &["--max-new-tokens (200 tokens)", "the model's 128"],
    );
    refused(
        &["score", "--prompt", "The capital of", "--target", &long],
        &["the target (", "the model's 128"],
    );
    // The good record after the over-long one is still applied and the bad one named.
    let edits = tmp.path().join("edits.jsonl");
    std::fs::write(
        &edits,
        format!(
            concat!(
                r#"{{"id":"long","prompt":"{}","target_new":"Rome"}}"#,
                "\n",
                r#"{{"id":"ok","prompt":"The Eiffel Tower is in","target_new":"Berlin","rephrases":["{}"]}}"#,
                "\n",
                r#"{{"id":"fine","prompt":"The capital of France is","target_new":"Rome"}}"#,
                "\n",
            ),
            long, long
        ),
    )
    .unwrap();
    let cfg = tmp.path().join("cfg.toml");
    std::fs::write(&cfg, "iterations = 2\n").unwrap();
    let out = elder()
        .args(["edit", "--json", "--model"])
        .arg(&model)
        .arg("--edits")
        .arg(&edits)
        .arg("--state")
        .arg(tmp.path().join("state"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("edit \"long\"") && err.contains("the model's 128"),
        "{err}"
    );
    assert!(
        err.contains("edit \"ok\": rephrases") && err.contains("the rephrasing ("),
        "{err}"
    );
    assert!(!err.contains(&long), "the refused text is shortened: {err}");
    assert_eq!(json(&out.stdout)["applied"], 1);
}
