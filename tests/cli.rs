//! The `elder` command line end to end on a tiny random checkpoint.

mod common;

use std::path::Path;

use assert_cmd::Command;
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
    let Some(emu) =
        common::emulator_library_or_skip("cuda_command_line_on_the_emulator_matches_the_cpu")
    else {
        return;
    };
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

/// The default preset on `--device cuda` (the emulator, loaded as a driver is): a state edited
/// on the CPU scores an edit prompt (in scope, moved by its edit) and another prompt (out of
/// scope) as `--device cpu` does; the same edits trained on the GPU (`--device auto` picks it)
/// leave a state that answers as the CPU-trained one; an option the GPU trainer lacks is refused
/// on `--device cuda` by name, and `--device auto` edits such a state on the CPU saying why.
#[test]
fn default_preset_on_the_emulator_matches_the_cpu() {
    let Some(emu) =
        common::emulator_library_or_skip("default_preset_on_the_emulator_matches_the_cpu")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
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
    let edits = tmp.path().join("edits.jsonl");
    let lines: Vec<String> = (1..=6)
        .map(|i| {
            format!(
                r#"{{"id":"k{i}","subject":"Subject{i}","prompt":"The code of Subject{i} is","target_new":" v{i}"}}"#
            )
        })
        .collect();
    std::fs::write(&edits, lines.join("\n")).unwrap();
    // The gate off: a random tiny model learns too little for its experts to pass it.
    let config = tmp.path().join("ungated.toml");
    std::fs::write(&config, "answer_gate = 0.0\n").unwrap();
    let state = tmp.path().join("state");
    let cmd = |device: &str| {
        let mut c = elder();
        c.env("LD_LIBRARY_PATH", emu)
            .env("ELDER_CUDA_EMU", "0")
            .args(["--device", device, "--gpu-dtype", "f32"]);
        c
    };
    // A config the GPU trainer lacks an option of (`delta_penalty`).
    let penalised = tmp.path().join("penalised.toml");
    std::fs::write(&penalised, "answer_gate = 0.0\ndelta_penalty = 0.1\n").unwrap();
    let edit = |device: &str, state: &Path, config: &Path| {
        let out = cmd(device)
            .arg("edit")
            .arg("--model")
            .arg(&model)
            .arg("--edits")
            .arg(&edits)
            .arg("--state")
            .arg(state)
            .arg("--config")
            .arg(config)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = edit("cuda", &tmp.path().join("refused"), &penalised);
    assert!(!ok && err.contains("delta_penalty"), "{err}");
    let (ok, err) = edit("auto", &tmp.path().join("penalised"), &penalised);
    assert!(ok && err.contains("note: running on the CPU"), "{err}");
    let (ok, err) = edit("cpu", &state, &config);
    assert!(ok, "{err}");
    let gpu_state = tmp.path().join("gpu-state");
    let (ok, err) = edit("auto", &gpu_state, &config);
    assert!(ok && !err.contains("running on the CPU"), "{err}");
    let score = |device: &str, prompt: &str, target: &str, state: Option<&Path>| -> Value {
        let mut c = cmd(device);
        c.args([
            "score", "--prompt", prompt, "--target", target, "--json", "--model",
        ])
        .arg(&model);
        if let Some(s) = state {
            c.arg("--state").arg(s);
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "--device {device} score {prompt:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        json(&out.stdout)
    };
    let lp = |v: &Value| -> Vec<f64> {
        v["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    for (prompt, target, inside) in [
        ("The code of Subject3 is", " v3", true),
        ("My favourite colour is", " red", false),
    ] {
        let cpu = score("cpu", prompt, target, Some(&state));
        let cuda = score("cuda", prompt, target, Some(&state));
        assert_eq!(cpu["in_scope"], inside, "{prompt}: {cpu}");
        assert_eq!(cuda["in_scope"], cpu["in_scope"], "{prompt}");
        for (x, y) in lp(&cpu).iter().zip(&lp(&cuda)) {
            assert!((x - y).abs() <= 1e-4, "{prompt}: {cpu} vs {cuda}");
        }
        // Trained on the GPU (f32): the same scope, the same answers up to training's rounding.
        let gpu_trained = score("cuda", prompt, target, Some(&gpu_state));
        assert_eq!(gpu_trained["in_scope"], cpu["in_scope"], "{prompt}");
        for (x, y) in lp(&cpu).iter().zip(&lp(&gpu_trained)) {
            assert!((x - y).abs() <= 1e-3, "{prompt}: {cpu} vs {gpu_trained}");
        }
        if inside {
            let base = score("cpu", prompt, target, None);
            let moved = lp(&cpu)
                .iter()
                .zip(&lp(&base))
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(moved > 0.05, "{prompt}: the edit moved it by {moved}");
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
