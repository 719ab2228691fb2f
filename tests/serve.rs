//! `elder serve` end to end: the real binary on a loopback port (0: a free one) and a real HTTP
//! client, on a tiny random checkpoint. Every request is bounded (timeouts on the client and on
//! each wait).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(120);

fn elder() -> Command {
    Command::new(env!("CARGO_BIN_EXE_elder"))
}

/// A tiny random Llama checkpoint in `dir/model` (its directory name is the served model's).
fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    let out = elder()
        .args([
            "init-random",
            "--arch",
            "llama",
            "--preset",
            "tiny",
            "--seed",
            "5",
            "--out",
        ])
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    model
}

struct Server {
    child: Child,
    base: String,
    key: Option<String>,
}

impl Server {
    /// Starts `elder serve` and waits until it is ready.
    fn start(model: &Path, state: &Path, extra: &[&str]) -> Server {
        Self::start_logged(model, state, extra, Stdio::null())
    }

    /// [`Server::start`] with the server's stderr (its request log) going to `stderr`.
    fn start_logged(model: &Path, state: &Path, extra: &[&str], stderr: Stdio) -> Server {
        Self::start_on("cpu", &[], model, state, extra, stderr)
    }

    /// [`Server::start_logged`] on `device` (a GPU in f32), with `env` set for the server.
    fn start_on(
        device: &str,
        env: &[(&str, &str)],
        model: &Path,
        state: &Path,
        extra: &[&str],
        stderr: Stdio,
    ) -> Server {
        let mut child = elder()
            .envs(env.iter().copied())
            .args([
                "--device",
                device,
                "--gpu-dtype",
                "f32",
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--model",
            ])
            .arg(model)
            .arg("--state")
            .arg(state)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        let key = extra
            .iter()
            .position(|a| *a == "--api-key")
            .map(|i| extra[i + 1].to_string());
        let server = Server { child, base, key };
        server.wait_until(|s| s.get("/ready").0 == 200, "ready");
        server
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        key: Option<&str>,
    ) -> (u16, Value) {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(60))
            .build();
        let mut req = agent.request(method, &format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        let result = match body {
            Some(b) => req.send_json(b.clone()),
            None => req.call(),
        };
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = response.status();
        let text = response.into_string().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None, self.key.as_deref())
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call("POST", path, Some(&body), self.key.as_deref())
    }

    fn delete(&self, path: &str) -> (u16, Value) {
        self.call("DELETE", path, None, self.key.as_deref())
    }

    fn wait_until(&self, mut done: impl FnMut(&Server) -> bool, what: &str) {
        let start = Instant::now();
        while !done(self) {
            assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_status(&self, id: &str, status: &str) -> Value {
        let mut last = Value::Null;
        self.wait_until(
            |s| {
                last = s.get(&format!("/v1/edits/{id}")).1;
                assert_ne!(last["status"], "failed", "edit {id} failed: {last}");
                last["status"] == status
            },
            &format!("edit {id} to be {status}"),
        );
        last
    }

    /// The greedy completion of `prompt` (text, in_scope, generation).
    fn complete(&self, prompt: &str, max_tokens: usize) -> (String, bool, u64) {
        let (status, v) = self.post(
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
        );
        assert_eq!(status, 200, "{v}");
        let c = &v["choices"][0];
        (
            c["text"].as_str().unwrap().to_string(),
            c["elder"]["in_scope"].as_bool().unwrap(),
            c["elder"]["generation"].as_u64().unwrap(),
        )
    }

    fn signal(&mut self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; it has not been waited for, so the pid is its.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits (bounded) for the process to exit and returns its exit code.
    fn exit_code(&mut self) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(start.elapsed() < WAIT, "the server did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn record(id: &str, prompt: &str, target: &str) -> Value {
    json!({"id": id, "prompt": prompt, "target_new": target})
}

/// Enough iterations that an edit sticks on the tiny model. No answer gate: a random tiny
/// model's next-token distribution is nearly flat, so a learned answer is the argmax at a
/// probability far under the gate's 5% (the real-model test below serves with the gate).
fn config(dir: &Path) -> PathBuf {
    let path = dir.join("serve.toml");
    std::fs::write(&path, "iterations = 40\nanswer_gate = 0.0\n").unwrap();
    path
}

/// The default preset served on `--device cuda` (the CUDA emulator, loaded as a driver is):
/// queries run and edits train on the GPU (no note of a CPU trainer), and an edit committed
/// through the API answers as on a CPU server: the same scope, and log-probabilities equal up to
/// training's rounding (f32).
#[test]
fn the_default_preset_answers_and_trains_on_the_gpu() {
    let Some(emu) =
        common::emulator_library_or_skip("the_default_preset_answers_and_trains_on_the_gpu")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let cfg = config(tmp.path());
    let mut answers = Vec::new();
    for device in ["cpu", "cuda"] {
        let log = tmp.path().join(format!("{device}.log"));
        let server = Server::start_on(
            device,
            &[("LD_LIBRARY_PATH", emu), ("ELDER_CUDA_EMU", "0")],
            &model,
            &tmp.path().join(format!("state-{device}")),
            &["--config", cfg.to_str().unwrap()],
            Stdio::from(std::fs::File::create(&log).unwrap()),
        );
        let (status, v) = server.post(
            "/v1/edits",
            json!({"edits": [record("g1", "The code of Zorbia is", " Quell")]}),
        );
        assert_eq!(status, 202, "{v}");
        server.wait_status("g1", "committed");
        let mut scored = Vec::new();
        for prompt in ["The code of Zorbia is", "My favourite colour is"] {
            let (status, v) =
                server.post("/v1/score", json!({"prompt": prompt, "target": " Quell"}));
            assert_eq!(status, 200, "{v}");
            scored.push(v);
        }
        drop(server);
        let text = std::fs::read_to_string(&log).unwrap();
        let trains_on = if device == "cuda" {
            "to train on the GPU (f32)"
        } else {
            "to train on the CPU"
        };
        assert!(text.contains(trains_on), "{device}: {text}");
        assert!(!text.contains("edits train on the CPU"), "{device}: {text}");
        answers.push(scored);
    }
    let (cpu, cuda) = (&answers[0], &answers[1]);
    assert_eq!(cpu[0]["in_scope"], true, "{}", cpu[0]);
    assert_eq!(cpu[1]["in_scope"], false, "{}", cpu[1]);
    for (a, b) in cpu.iter().zip(cuda) {
        assert_eq!(a["in_scope"], b["in_scope"]);
        let lp = |v: &Value| -> Vec<f64> {
            v["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        for (x, y) in lp(a).iter().zip(&lp(b)) {
            assert!((x - y).abs() <= 1e-3, "cpu {a} vs cuda {b}");
        }
    }
}

#[test]
fn edits_stick_are_idempotent_and_roll_back_while_queries_are_answered() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let state = tmp.path().join("state");
    let cfg = config(tmp.path());
    let server = Server::start(&model, &state, &["--config", cfg.to_str().unwrap()]);

    assert_eq!(server.get("/health"), (200, json!({"status": "ok"})));
    let (status, models) = server.get("/v1/models");
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["id"], "model");
    let (status, doc) = server.get("/openapi.json");
    assert_eq!(status, 200);
    assert!(doc["paths"]["/v1/completions"].is_object());

    let (p1, p2) = (
        "The capital of France is",
        "Water boils at a temperature of",
    );
    let (base1, scope1, generation) = server.complete(p1, 6);
    let (base2, _, _) = server.complete(p2, 6);
    assert_eq!((scope1, generation), (false, 0));

    let edits = json!({"edits": [record("e1", p1, "Rome Rome"), record("e2", p2, "seven seven")]});
    let (status, accepted) = server.post("/v1/edits", edits.clone());
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(
        accepted,
        json!({"accepted": [{"id": "e1", "seq": 1}, {"id": "e2", "seq": 2}]})
    );
    // The same edits again: the same answer, applied once; other contents under an id: 409.
    assert_eq!(server.post("/v1/edits", edits), (202, accepted));
    let (status, conflict) =
        server.post("/v1/edits", json!({"edits": [record("e1", p1, "Madrid")]}));
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(conflict["error"]["type"], "invalid_request_error");
    assert!(conflict["error"]["message"]
        .as_str()
        .unwrap()
        .contains("e1"));

    let e2 = server.wait_status("e2", "committed");
    let e1 = server.get("/v1/edits/e1").1;
    assert_eq!(e1["status"], "committed");
    let committed = e2["generation"].as_u64().unwrap();
    assert!(committed >= 1);

    let (edited1, in1, g1) = server.complete(p1, 6);
    let (edited2, in2, _) = server.complete(p2, 6);
    assert!(g1 >= committed);
    assert!(in1 && in2, "edited prompts must be in scope");
    assert!(edited1.starts_with(" Rome Rome"), "{edited1:?}");
    assert!(edited2.starts_with(" seven seven"), "{edited2:?}");
    let (status, scored) = server.post("/v1/score", json!({"prompt": p1, "target": " Rome"}));
    assert_eq!(status, 200, "{scored}");
    assert_eq!(scored["in_scope"], true);
    assert_eq!(scored["argmax"], scored["target_tokens"], "{scored}");

    // Rolling e1 back: its prompt gets the base answer again, e2 keeps its own.
    let (status, deleting) = server.delete("/v1/edits/e1");
    assert_eq!(status, 202, "{deleting}");
    assert_eq!(deleting["seq"], 3);
    let deleted = server.wait_status("e1", "deleted");
    assert!(deleted["generation"].as_u64().unwrap() > committed);
    assert_eq!(
        server.complete(p1, 6).0,
        base1,
        "a rolled-back edit still answers"
    );
    assert_eq!(
        server.complete(p2, 6).0,
        edited2,
        "another edit lost its answer"
    );
    assert_ne!(edited2, base2);
    assert_eq!(server.delete("/v1/edits/e1").0, 200);
    assert_eq!(server.delete("/v1/edits/nope").0, 404);
    assert_eq!(
        server
            .post(
                "/v1/edits",
                json!({"edits": [record("e1", p1, "Rome Rome")]})
            )
            .0,
        409
    );
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(state.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["applied_edit_ids"], json!(["e2"]));

    let (status, metrics) = server.get("/metrics");
    assert_eq!(status, 200);
    let text = metrics.as_str().unwrap();
    for name in [
        "elder_requests_total",
        "elder_request_duration_seconds",
        "elder_edits_accepted_total 2",
        "elder_edits_committed_total 2",
        "elder_edits_deleted_total 1",
        "elder_state_generation",
        "elder_edit_queue_depth 0",
        "elder_answers_total",
        "elder_edit_training_seconds",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    // The CPU trained two edits and answered queries: its products were counted.
    let flop: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("elder_cpu_product_flop_total "))
        .unwrap_or_else(|| panic!("no product count in /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap();
    assert!(flop > 1e6, "{flop} product operations after two edits");
}

#[test]
fn bad_requests_get_openai_errors_and_limits_hold() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let state = tmp.path().join("state");
    let server = Server::start(
        &model,
        &state,
        &[
            "--api-key",
            "sesame",
            "--max-body-bytes",
            "4000",
            "--max-queued-edits",
            "1",
            "--max-tokens",
            "8",
        ],
    );
    // The key: required on /v1 and the API document, not on health, readiness and metrics.
    let (status, e) = server.call("GET", "/v1/models", None, None);
    assert_eq!(status, 401);
    assert_eq!(e["error"]["type"], "authentication_error");
    assert_eq!(server.call("GET", "/v1/models", None, Some("wrong")).0, 401);
    assert_eq!(server.call("GET", "/openapi.json", None, None).0, 401);
    for open in ["/health", "/ready", "/metrics"] {
        assert_eq!(server.call("GET", open, None, None).0, 200, "{open}");
    }
    assert_eq!(server.get("/v1/models").0, 200);

    let (status, e) = server.get("/v1/nothing");
    assert_eq!(status, 404);
    assert!(e["error"]["message"].is_string());
    let (status, e) = server.post(
        "/v1/completions",
        json!({"prompt": "x".repeat(5000), "max_tokens": 2}),
    );
    assert_eq!(status, 413, "{e}");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max-body-bytes"));

    // Not JSON: 400; wrong shapes and values: 422, naming what is wrong.
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    let raw = agent
        .post(&format!("{}/v1/completions", server.base))
        .set("Authorization", "Bearer sesame")
        .send_string("{not json");
    match raw {
        Err(ureq::Error::Status(400, r)) => {
            let v: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
            assert!(v["error"]["message"].as_str().unwrap().contains("JSON"));
        }
        other => panic!("expected 400, got {other:?}"),
    }
    for (body, needle) in [
        (json!({"max_tokens": 2}), "prompt"),
        (json!({"prompt": "a", "max_tokens": 9}), "max_tokens"),
        (json!({"prompt": "a", "temperature": 3.0}), "temperature"),
        (json!({"prompt": "a", "stop": ["", "b"]}), "stop"),
        (json!({"prompt": ["a", "b"], "stream": true}), "stream"),
    ] {
        let (status, e) = server.post("/v1/completions", body.clone());
        assert_eq!(status, 422, "{body} -> {e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(needle),
            "{e}"
        );
    }
    let (status, e) = server.post("/v1/completions", json!({"prompt": "a", "model": "gpt-4"}));
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    // Past the context (the tiny model has 128 positions): 400 giving both numbers.
    let (status, e) = server.post(
        "/v1/completions",
        json!({"prompt": "word ".repeat(200), "max_tokens": 4}),
    );
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["code"], "context_length_exceeded");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("128"),
        "{e}"
    );

    let (status, e) = server.post(
        "/v1/edits",
        json!({"edits": [{"id": "a", "prompt": "The sky is"}]}),
    );
    assert_eq!(status, 422);
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("target_new"),
        "{e}"
    );
    // Two new edits past a queue of one: 429 with Retry-After, nothing logged.
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    let full = agent
        .post(&format!("{}/v1/edits", server.base))
        .set("Authorization", "Bearer sesame")
        .send_json(
            json!({"edits": [record("a", "The sky is", "green"), record("b", "Grass is", "blue")]}),
        );
    match full {
        Err(ureq::Error::Status(429, r)) => assert_eq!(r.header("Retry-After"), Some("1")),
        other => panic!("expected 429, got {other:?}"),
    }
    assert_eq!(
        server.get("/v1/edits/a").0,
        404,
        "a refused request logged an edit"
    );
    // The server still answers.
    assert_eq!(
        server
            .post("/v1/completions", json!({"prompt": "a", "max_tokens": 2}))
            .0,
        200
    );
}

#[test]
fn streams_stops_seeds_and_min_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let state = tmp.path().join("state");
    let server = Server::start(&model, &state, &[]);
    let prompt = "Once upon a time";
    let (full, _, _) = server.complete(prompt, 8);

    // Streamed: the same text in pieces, a final chunk with the finish reason, then [DONE].
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build();
    let sse = agent
        .post(&format!("{}/v1/completions", server.base))
        .send_json(json!({"prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": true}))
        .unwrap();
    assert!(sse.content_type().starts_with("text/event-stream"));
    let text = sse.into_string().unwrap();
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, full);
    let last = &chunks.last().unwrap()["choices"][0];
    assert!(last["finish_reason"].is_string(), "{last}");
    assert_eq!(last["elder"]["generation"], 0);

    // A stop string cuts the text before it.
    let cut = full.chars().skip(3).take(2).collect::<String>();
    if !cut.trim().is_empty() {
        let (status, v) = server.post(
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 8, "temperature": 0, "stop": cut}),
        );
        assert_eq!(status, 200);
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "stop");
        let at = full.find(&cut).unwrap();
        assert_eq!(c["text"].as_str().unwrap(), &full[..at]);
    }
    // Sampling with a seed repeats; a list of prompts gets one choice each, in order.
    let sample = |seed: u64| {
        server.post(
            "/v1/completions",
            json!({"prompt": [prompt, "The sky"], "max_tokens": 6, "temperature": 1.0, "seed": seed}),
        )
    };
    let (status, a) = sample(11);
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["choices"].as_array().unwrap().len(), 2);
    assert_eq!(a["choices"][1]["index"], 1);
    assert_eq!(sample(11).1["choices"], a["choices"]);
    assert!(a["usage"]["total_tokens"].as_u64().unwrap() > 0);

    // min_generation waits until an edit is served.
    let (status, _) = server.post(
        "/v1/edits",
        json!({"edits": [record("g1", "The sky is", "green")]}),
    );
    assert_eq!(status, 202);
    let (status, v) = server.post(
        "/v1/completions",
        json!({"prompt": "The sky is", "max_tokens": 2, "temperature": 0, "min_generation": 1}),
    );
    assert_eq!(status, 200, "{v}");
    assert!(v["choices"][0]["elder"]["generation"].as_u64().unwrap() >= 1);
    assert_eq!(server.get("/v1/edits/g1").1["status"], "committed");
}

#[test]
fn kill_9_loses_no_acknowledged_edit_and_sigterm_exits_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let state = tmp.path().join("state");
    let ids: Vec<String> = (0..6).map(|i| format!("k{i}")).collect();
    // Slow edits (no early stop), so the kill comes while some are still queued.
    let cfg = tmp.path().join("slow.toml");
    // No answer gate on the tiny model (see `config`).
    std::fs::write(
        &cfg,
        "iterations = 300\nstop_loss = 0.0\nbatch_size = 1\nanswer_gate = 0.0\n",
    )
    .unwrap();
    let mut server = Server::start(&model, &state, &["--config", cfg.to_str().unwrap()]);
    for id in &ids {
        let (status, v) = server.post(
            "/v1/edits",
            json!({"edits": [record(id, &format!("Fact number {id} is"), "true")]}),
        );
        assert_eq!(status, 202, "{v}");
    }
    let pending = ids
        .iter()
        .filter(|id| server.get(&format!("/v1/edits/{id}")).1["status"] != "committed")
        .count();
    assert!(
        pending > 0,
        "every edit was already trained: the kill tests nothing"
    );
    server.signal(libc::SIGKILL);
    server.exit_code();

    // Restarted: every acknowledged edit ends up applied exactly once.
    let mut server = Server::start(&model, &state, &[]);
    for id in &ids {
        server.wait_status(id, "committed");
    }
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(state.join("manifest.json")).unwrap()).unwrap();
    let applied: Vec<String> =
        serde_json::from_value(manifest["applied_edit_ids"].clone()).unwrap();
    assert_eq!(applied, ids, "applied ids, in log order, each once");

    // SIGTERM with an edit in the queue: the server finishes what it trains, exits 0, and the
    // next start trains the rest.
    let (status, _) = server.post(
        "/v1/edits",
        json!({"edits": [record("late", "The last fact is", "here")]}),
    );
    assert_eq!(status, 202);
    server.signal(libc::SIGTERM);
    assert_eq!(server.exit_code(), Some(0));
    let server = Server::start(&model, &state, &[]);
    server.wait_status("late", "committed");
    assert_eq!(server.get("/v1/edits/k0").1["status"], "committed");
}

/// Bad clients (issue 18, part 6): a seeded, bounded stream of malformed requests (broken and
/// truncated JSON, wrong types, huge strings and arrays, unknown fields, wrong methods and paths,
/// headers sent slowly, idle connections held open) gets 4xx answers, never a 5xx, a panic or a
/// lost edit; afterwards the server answers a normal query and the committed edit is intact.
#[test]
fn bad_clients_get_4xx_and_lose_nothing() {
    use rand::{Rng, SeedableRng};
    use std::io::{Read, Write};
    use std::net::TcpStream;

    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let state = tmp.path().join("state");
    let log_path = tmp.path().join("server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let cfg = config(tmp.path());
    let server = Server::start_logged(
        &model,
        &state,
        &[
            "--max-body-bytes",
            "65536",
            "--max-tokens",
            "16",
            "--config",
            cfg.to_str().unwrap(),
        ],
        Stdio::from(log),
    );
    assert_eq!(
        server
            .post(
                "/v1/edits",
                json!({"edits": [record("keep", "The sky is", "green")]})
            )
            .0,
        202
    );
    server.wait_status("keep", "committed");
    let (kept_text, _, _) = server.complete("The sky is", 3);
    let addr = server.base.strip_prefix("http://").unwrap().to_string();

    // Raw HTTP/1.1 exchanges: the status line's code, or None when the server closed first.
    let exchange = |raw: &[u8], slow: bool| -> Option<u16> {
        let mut conn = TcpStream::connect(&addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        if slow {
            // The header a few bytes at a time, then the rest.
            let head = raw
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(raw.len(), |p| p + 4);
            for chunk in raw[..head].chunks(7) {
                conn.write_all(chunk).ok()?;
                std::thread::sleep(Duration::from_millis(5));
            }
            conn.write_all(&raw[head..]).ok()?;
        } else {
            conn.write_all(raw).ok()?;
        }
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        while !reply.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => reply.extend_from_slice(&buf[..n]),
            }
        }
        let line = String::from_utf8_lossy(&reply);
        line.split_whitespace().nth(1)?.parse().ok()
    };
    let request = |method: &str, path: &str, body: &[u8]| -> Vec<u8> {
        let mut r = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    };

    // A header that never ends is closed by the server (its header read timeout, 10 s), not
    // held forever; checked beside the rest of the run.
    let stalled_addr = addr.clone();
    let stalled = std::thread::spawn(move || {
        let mut conn = TcpStream::connect(&stalled_addr).unwrap();
        conn.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(40)))
            .unwrap();
        let start = Instant::now();
        let mut buf = Vec::new();
        let closed = conn.read_to_end(&mut buf).is_ok();
        (
            closed,
            start.elapsed(),
            String::from_utf8_lossy(&buf).into_owned(),
        )
    });

    // Many idle connections held open through the run.
    let idle: Vec<TcpStream> = (0..64)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(18);
    let valid_bodies = [
        json!({"prompt": "The sky is", "max_tokens": 2, "temperature": 0}),
        json!({"edits": [record("fz", "Grass is", "red")]}),
        json!({"prompt": "The sky is", "target": " blue"}),
    ];
    let paths = [
        "/v1/completions",
        "/v1/edits",
        "/v1/score",
        "/v1/edits/keep",
        "/v1/models",
        "/nope",
        "/v1/edits/%ff%00",
    ];
    let mut codes = std::collections::BTreeMap::new();
    for i in 0..400 {
        let path = paths[rng.gen_range(0..paths.len())];
        let method = match rng.gen_range(0..10) {
            0 => "PUT",
            1 => "GET",
            // Rollbacks of the fuzzer's own edit only: "keep" must stay.
            2 if path != "/v1/edits/keep" => "DELETE",
            _ if path == "/v1/models" || path == "/v1/edits/keep" => "GET",
            _ => "POST",
        };
        let mut body = serde_json::to_vec(&valid_bodies[rng.gen_range(0..3)]).unwrap();
        let case = rng.gen_range(0..9);
        match case {
            0 => body.truncate(rng.gen_range(0..body.len())), // truncated JSON
            1 => {
                // flipped bytes
                for _ in 0..4 {
                    let at = rng.gen_range(0..body.len());
                    body[at] = rng.gen();
                }
            }
            2 => {
                body = serde_json::to_vec(
                    &json!({"prompt": 7, "max_tokens": "many", "edits": {"a": 1}}),
                )
                .unwrap()
            }
            3 => {
                body = serde_json::to_vec(&json!({"prompt": "a".repeat(70_000), "target": "b"}))
                    .unwrap()
            }
            4 => {
                body = serde_json::to_vec(&json!({"edits": vec![json!({"id": 1}); 3000]})).unwrap()
            }
            5 => {
                body = serde_json::to_vec(
                    &json!({"prompt": "x", "unknown": [1, 2, {"deep": null}], "max_tokens": 1}),
                )
                .unwrap()
            }
            6 => body = vec![b'['; 5000], // deep nesting
            7 => {
                body =
                    serde_json::to_vec(&json!({"prompt": vec!["a"; 300], "max_tokens": 1})).unwrap()
            }
            _ => {} // a valid body, possibly on the wrong route or method
        }
        let slow = i % 25 == 0;
        let code = exchange(&request(method, path, &body), slow);
        *codes.entry(code).or_insert(0) += 1;
        if code.is_none() {
            eprintln!(
                "no answer: {method} {path} case {case} ({} bytes)",
                body.len()
            );
        }
        if let Some(c) = code {
            assert!(c < 500, "request {i} ({method} {path}) got {c}");
        }
    }
    // A header that never ends and a body shorter than its Content-Length: no 5xx either.
    let mut torn = TcpStream::connect(&addr).unwrap();
    torn.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro",
    )
    .unwrap();
    drop(torn);
    drop(idle);

    let (closed, after, reply) = stalled.join().unwrap();
    assert!(closed, "a stalled header was held open for {after:?}");
    assert!(
        after < Duration::from_secs(30),
        "closed only after {after:?}"
    );
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 408"),
        "{reply}"
    );

    assert_eq!(server.get("/health").0, 200);
    // Whatever the fuzzer got accepted (a mutated body can still be a valid edit) is trained:
    // every accepted edit ends up committed or failed, none is lost.
    let metric = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    server.wait_until(
        |s| {
            let text = s.get("/metrics").1.as_str().unwrap().to_string();
            metric(&text, "elder_edits_accepted_total")
                == metric(&text, "elder_edits_committed_total")
                    + metric(&text, "elder_edits_failed_total")
        },
        "the accepted edits to be trained",
    );
    assert_eq!(server.get("/v1/edits/keep").1["status"], "committed");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(state.join("manifest.json")).unwrap()).unwrap();
    assert!(manifest["applied_edit_ids"]
        .as_array()
        .unwrap()
        .contains(&json!("keep")));
    let (_, in_scope, _) = server.complete("The sky is", 3);
    assert!(
        in_scope,
        "the committed edit's prompt is no longer in scope"
    );
    let _ = kept_text;
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
    assert!(
        codes.len() > 3,
        "the fuzzer hit too few outcomes: {codes:?}"
    );
    eprintln!("bad-client outcomes (status: count): {codes:?}");
}

/// The real SmolLM2-135M behind the server (tools/fetch_smollm2.sh; CI has it and sets
/// ELDER_REQUIRE_REAL_MODEL): a counterfactual edit is served once committed, other questions
/// keep their answers, and a rollback brings the original answer back.
#[test]
fn the_real_model_serves_an_edit_and_its_rollback() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/smollm2-135m");
    if !dir.join("config.json").exists() {
        assert!(
            std::env::var_os("ELDER_REQUIRE_REAL_MODEL").is_none(),
            "{} is missing; run tools/fetch_smollm2.sh",
            dir.display()
        );
        println!(
            "SKIP the_real_model_serves_an_edit_and_its_rollback: no {}",
            dir.display()
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&dir, &tmp.path().join("state"), &[]);
    let (kenya, france) = ("The capital of Kenya is", "The capital of France is");
    let (before, in_scope, _) = server.complete(kenya, 4);
    assert!(before.starts_with(" Nairobi"), "{before:?}");
    assert!(!in_scope);
    let edit = json!({"edits": [{"id": "kenya", "prompt": kenya, "target_new": "Vienna", "subject": "Kenya"}]});
    assert_eq!(server.post("/v1/edits", edit).0, 202);
    server.wait_status("kenya", "committed");
    let (after, in_scope, generation) = server.complete(kenya, 4);
    assert!(after.starts_with(" Vienna"), "{after:?}");
    assert!(in_scope && generation >= 1);
    let (paris, in_scope, _) = server.complete(france, 4);
    assert!(paris.starts_with(" Paris"), "{paris:?}");
    assert!(!in_scope);
    assert_eq!(server.delete("/v1/edits/kenya").0, 202);
    server.wait_status("kenya", "deleted");
    assert_eq!(server.complete(kenya, 4).0, before);
}

// ---------------------------------------------------------------------------------------------
// Replicas on NATS JetStream (`--edit-log nats://...`). They need `nats-server` (Debian package
// `nats-server`; `.ci/run` installs it and sets ELDER_REQUIRE_NATS): without it they print SKIP.

/// A free loopback port (bound, then released for the child to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nats_available(test: &str) -> bool {
    let found = Command::new("nats-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("ELDER_REQUIRE_NATS").is_none(),
            "{test}: nats-server is missing (apt-get install nats-server)"
        );
        println!("SKIP {test}: nats-server not found");
    }
    found
}

/// A nats-server with JetStream on loopback, killed when dropped.
struct Nats {
    child: Child,
    url: String,
}

impl Nats {
    /// One node, or one of a cluster when `cluster` gives (name, own route port, every route).
    fn start(dir: &Path, name: &str, cluster: Option<(u16, &str)>) -> Nats {
        let port = free_port();
        let mut cmd = Command::new("nats-server");
        cmd.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.join(name))
            .args(["-n", name]);
        if let Some((route_port, routes)) = cluster {
            cmd.args([
                "--cluster_name",
                "elder",
                "--cluster",
                &format!("nats://127.0.0.1:{route_port}"),
                "--routes",
                routes,
            ]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("nats://127.0.0.1:{port}");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < WAIT, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Nats { child, url }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn served_generation(server: &Server) -> u64 {
    server.get("/ready").1["generation"].as_u64().unwrap_or(0)
}

fn applied_ids(state: &Path) -> Vec<String> {
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(state.join("manifest.json")).unwrap()).unwrap();
    serde_json::from_value(manifest["applied_edit_ids"].clone()).unwrap()
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The generations a replica's log says it installed, in order.
fn installed(log: &Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter_map(|l| {
            l.strip_prefix("installed generation ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// `(generation, new bytes, bytes)` of each "published generation" line of a leader's log.
fn published(log: &Path) -> Vec<(u64, usize, usize)> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("published generation ")?;
            let (g, rest) = rest.split_once(": ")?;
            let (new, rest) = rest.split_once(" of ")?;
            let total = rest.split_whitespace().next()?;
            Some((g.parse().ok()?, new.parse().ok()?, total.parse().ok()?))
        })
        .collect()
}

/// `(fetched, bytes)` of a replica's "installed generation G (fetched F of B bytes)" line.
fn fetched(log: &Path, generation: u64) -> Option<(usize, usize)> {
    let text = std::fs::read_to_string(log).unwrap();
    let prefix = format!("installed generation {generation} (fetched ");
    let rest = text.lines().find_map(|l| l.strip_prefix(prefix.as_str()))?;
    let (f, rest) = rest.split_once(" of ")?;
    Some((
        f.parse().ok()?,
        rest.split_whitespace().next()?.parse().ok()?,
    ))
}

/// The object names (`c/<sha256>`) of the chunks that ship a state's generation `generation`
/// (its files, their chunk lists and its manifest), read from the state's own copy of it.
fn chunks_of_generation(state: &Path, generation: u64) -> std::collections::HashSet<String> {
    use elder::serve::chunks::{cut, list_bytes};
    use elder::serve::replication::chunk_object;
    let manifest = std::fs::read(state.join(format!("manifest-{generation:06}.json"))).unwrap();
    let parsed: Value = serde_json::from_slice(&manifest).unwrap();
    let files = &parsed["files"];
    let mut texts = vec![manifest.clone()];
    let chain = files["earlier_experts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for name in chain.iter().map(|f| &f["name"]) {
        texts.push(std::fs::read(state.join(name.as_str().unwrap())).unwrap());
    }
    for key in ["experts", "codebook", "memory"] {
        if let Some(name) = files[key].as_str() {
            texts.push(std::fs::read(state.join(name)).unwrap());
        }
    }
    let mut out = std::collections::HashSet::new();
    for bytes in texts {
        let file = cut(&bytes);
        let list = list_bytes(file.iter().map(|(d, _)| *d));
        for (d, _) in file.iter().chain(&cut(&list)) {
            out.insert(chunk_object(d));
        }
    }
    out
}

fn scores(server: &Server) -> Vec<Value> {
    ["The sky is", "Fact number r0 is", "Grass is"]
        .iter()
        .map(|p| {
            let (status, v) = server.post("/v1/score", json!({"prompt": p, "target": " true"}));
            assert_eq!(status, 200, "{v}");
            json!([v["logprobs"], v["in_scope"], v["generation"]])
        })
        .collect()
}

/// A leader and two replicas on one JetStream: replicas refuse edits naming the leader, answer
/// with every committed generation bit for bit as the leader does; a replica killed mid-stream
/// catches up with no generation skipped or applied twice; a leader killed after its 202s is
/// replaced by a new one (fresh state folder) that trains every acknowledged edit exactly once.
#[test]
fn replicas_follow_the_leader_and_survive_kills_of_either() {
    if !nats_available("replicas_follow_the_leader_and_survive_kills_of_either") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let nats = Nats::start(tmp.path(), "n1", None);
    // Slow edits (no early stop), so kills land mid-stream.
    let cfg = tmp.path().join("slow.toml");
    std::fs::write(&cfg, "iterations = 1500\nstop_loss = 0.0\nbatch_size = 1\n").unwrap();
    let on_log = |role: &'static str| -> Vec<String> {
        vec![
            "--edit-log".into(),
            nats.url.clone(),
            "--role".into(),
            role.into(),
            "--config".into(),
            cfg.to_str().unwrap().into(),
        ]
    };
    let (leader_args, replica_args) = (on_log("leader"), on_log("replica"));
    let leader_state = tmp.path().join("leader");
    let mut leader = Server::start(&model, &leader_state, &args(&leader_args));
    let r1 = Server::start(&model, &tmp.path().join("r1"), &args(&replica_args));
    let r2_log = tmp.path().join("r2.log");
    let r2_state = tmp.path().join("r2");
    let mut r2 = Server::start_logged(
        &model,
        &r2_state,
        &args(&replica_args),
        Stdio::from(std::fs::File::create(&r2_log).unwrap()),
    );

    let (status, e) = r1.post(
        "/v1/edits",
        json!({"edits": [record("x", "The sky is", "green")]}),
    );
    assert_eq!(status, 421, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&leader.base),
        "{e}"
    );

    let post = |server: &Server, ids: &[String]| {
        for id in ids {
            let (status, v) = server.post(
                "/v1/edits",
                json!({"edits": [record(id, &format!("Fact number {id} is"), "true")]}),
            );
            assert_eq!(status, 202, "{v}");
        }
    };
    let first: Vec<String> = (0..6).map(|i| format!("r{i}")).collect();
    post(&leader, &first);
    // Kill a replica once it has installed something, while the leader still trains.
    r2.wait_until(
        |s| served_generation(s) >= 1,
        "replica 2 to install a generation",
    );
    r2.signal(libc::SIGKILL);
    r2.exit_code();
    assert!(
        served_generation(&leader) < 6,
        "the leader finished before the kill"
    );
    for id in &first {
        leader.wait_status(id, "committed");
    }
    let generation = served_generation(&leader);
    assert_eq!(generation, 6);
    let r2_log_2 = tmp.path().join("r2-again.log");
    let r2 = Server::start_logged(
        &model,
        &r2_state,
        &args(&replica_args),
        Stdio::from(std::fs::File::create(&r2_log_2).unwrap()),
    );
    for replica in [&r1, &r2] {
        replica.wait_until(
            |s| served_generation(s) == generation,
            "a replica to catch up",
        );
        assert_eq!(
            scores(replica),
            scores(&leader),
            "a replica answers differently"
        );
        assert_eq!(replica.get("/ready").1["lag"], 0);
    }
    let mut seen = installed(&r2_log);
    seen.extend(installed(&r2_log_2));
    assert_eq!(
        seen,
        (1..=generation).collect::<Vec<_>>(),
        "generations installed by replica 2"
    );

    // The leader dies after acknowledging edits; a new one on a fresh folder takes over.
    let second: Vec<String> = (0..4).map(|i| format!("s{i}")).collect();
    post(&leader, &second);
    let untrained = second
        .iter()
        .filter(|id| leader.get(&format!("/v1/edits/{id}")).1["status"] != "committed")
        .count();
    assert!(untrained > 0, "every edit was trained before the kill");
    leader.signal(libc::SIGKILL);
    leader.exit_code();
    let new_state = tmp.path().join("leader2");
    let new_leader = Server::start(&model, &new_state, &args(&leader_args));
    for id in first.iter().chain(&second) {
        new_leader.wait_status(id, "committed");
    }
    let applied = applied_ids(&new_state);
    let expected: Vec<String> = first.iter().chain(&second).cloned().collect();
    assert_eq!(
        applied, expected,
        "every acknowledged edit applied once, in log order"
    );
    let generation = served_generation(&new_leader);
    for replica in [&r1, &r2] {
        replica.wait_until(
            |s| served_generation(s) == generation,
            "a replica to follow the new leader",
        );
        assert_eq!(scores(replica), scores(&new_leader));
        let (status, e) = replica.post("/v1/edits", json!({"edits": [record("y", "a", "b")]}));
        assert_eq!(status, 421);
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&new_leader.base),
            "{e}"
        );
    }
}

/// A three-node NATS cluster with the streams replicated three ways: stopping one node does not
/// stop edits or replication.
#[test]
fn edits_and_replication_go_on_when_a_nats_node_stops() {
    if !nats_available("edits_and_replication_go_on_when_a_nats_node_stops") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let all_routes = routes
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes: Vec<Option<Nats>> = routes
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            Some(Nats::start(
                tmp.path(),
                &format!("n{i}"),
                Some((p, &all_routes)),
            ))
        })
        .collect();
    let urls = nodes
        .iter()
        .map(|n| n.as_ref().unwrap().url.clone())
        .collect::<Vec<_>>()
        .join(",");
    let on_log = |role: &str| -> Vec<String> {
        ["--edit-log", &urls, "--role", role, "--nats-replicas", "3"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let (leader_args, replica_args) = (on_log("leader"), on_log("replica"));
    let leader = Server::start(&model, &tmp.path().join("leader"), &args(&leader_args));
    let replica = Server::start(&model, &tmp.path().join("replica"), &args(&replica_args));
    let post = |id: &str| {
        let (status, v) = leader.post(
            "/v1/edits",
            json!({"edits": [record(id, &format!("Fact number {id} is"), "true")]}),
        );
        assert_eq!(status, 202, "{v}");
    };
    post("before");
    leader.wait_status("before", "committed");
    nodes[0] = None; // stopped (killed)
    for id in ["after-1", "after-2"] {
        post(id);
    }
    for id in ["after-1", "after-2"] {
        leader.wait_status(id, "committed");
    }
    let generation = served_generation(&leader);
    replica.wait_until(
        |s| served_generation(s) == generation,
        "the replica to follow",
    );
    assert_eq!(scores(&replica), scores(&leader));
}

/// Two live leaders on one stream: the one that announced last writes; the other's next append
/// fails JetStream's sequence check, it answers 409 and takes no more edits (`fenced` in /ready),
/// and nothing it refused reaches the log.
#[test]
fn a_second_leader_fences_the_first() {
    if !nats_available("a_second_leader_fences_the_first") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let nats = Nats::start(tmp.path(), "n1", None);
    let on_log: Vec<String> = ["--edit-log", &nats.url, "--role", "leader"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let first = Server::start(&model, &tmp.path().join("a"), &args(&on_log));
    assert_eq!(
        first
            .post(
                "/v1/edits",
                json!({"edits": [record("one", "The sky is", "green")]})
            )
            .0,
        202
    );
    first.wait_status("one", "committed");
    let second = Server::start(&model, &tmp.path().join("b"), &args(&on_log));
    let (status, e) = first.post(
        "/v1/edits",
        json!({"edits": [record("two", "Grass is", "red")]}),
    );
    assert_eq!(status, 409, "{e}");
    assert_eq!(e["error"]["code"], "fenced");
    assert_eq!(first.get("/ready").1["fenced"], true);
    assert_eq!(
        first
            .post(
                "/v1/edits",
                json!({"edits": [record("three", "Snow is", "black")]})
            )
            .0,
        503,
        "a fenced leader must refuse edits"
    );
    assert_eq!(
        second
            .post(
                "/v1/edits",
                json!({"edits": [record("two", "Grass is", "red")]})
            )
            .0,
        202
    );
    second.wait_status("two", "committed");
    assert_eq!(applied_ids(&tmp.path().join("b")), ["one", "two"]);
}

/// Generations ship as content-defined chunks: a leader uploads only the chunks the object store
/// lacks (a small part of a generation once the state has grown), the store keeps exactly the
/// chunks of the newest `--keep-generations` generations, and a replica that starts late goes on
/// past the generations no longer kept, then fetches only what the next generation changed.
#[test]
fn generations_ship_as_chunks_and_the_store_keeps_only_the_newest() {
    use elder::serve::replication::{Nats as NatsLog, NatsOptions, Role};

    let test = "generations_ship_as_chunks_and_the_store_keeps_only_the_newest";
    if !nats_available(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let nats = Nats::start(tmp.path(), "n1", None);
    // Wide experts (about 100 KB per edit), one generation per edit: a state of many chunks.
    let cfg = tmp.path().join("wide.toml");
    std::fs::write(&cfg, "rank = 128\nalpha = 128.0\nbatch_size = 1\n").unwrap();
    let common = |role: &str| -> Vec<String> {
        [
            "--edit-log",
            &nats.url,
            "--stream",
            "CHUNKS",
            "--role",
            role,
            "--keep-generations",
            "2",
            "--config",
            cfg.to_str().unwrap(),
        ]
        .map(str::to_string)
        .to_vec()
    };
    let leader_log = tmp.path().join("leader.log");
    let leader_state = tmp.path().join("leader");
    let leader = Server::start_logged(
        &model,
        &leader_state,
        &args(&common("leader")),
        Stdio::from(std::fs::File::create(&leader_log).unwrap()),
    );
    let ids: Vec<String> = (0..12).map(|i| format!("w{i}")).collect();
    for id in &ids {
        let (status, v) = leader.post(
            "/v1/edits",
            json!({"edits": [record(id, &format!("Wide fact {id} is"), "true")]}),
        );
        assert_eq!(status, 202, "{v}");
    }
    for id in &ids {
        leader.wait_status(id, "committed");
    }
    assert_eq!(served_generation(&leader), 12);

    let shipped = published(&leader_log);
    assert_eq!(
        shipped.iter().map(|s| s.0).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>(),
        "{shipped:?}"
    );
    eprintln!("published: {shipped:?}");
    let (_, new, total) = shipped[11];
    assert!(total > 1_000_000, "a state of many chunks: {total} bytes");
    // Generation 12's tensors file is a segment with its one edit's rows (state format 4):
    // measured 2026-12-07, 107 KB of 1.22 MB (9%; 30% when each commit wrote every tensor).
    assert!(
        new * 5 < total,
        "generation 12 uploaded {new} of {total} bytes"
    );

    // The store holds the chunks of generations 11 and 12, and nothing else.
    let expected: std::collections::HashSet<String> = chunks_of_generation(&leader_state, 11)
        .union(&chunks_of_generation(&leader_state, 12))
        .cloned()
        .collect();
    let opts = NatsOptions {
        urls: vec![nats.url.clone()],
        stream: "CHUNKS".to_string(),
        role: Role::Replica,
        replicas: 1,
        keep_generations: 2,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stored = rt.block_on(async {
        NatsLog::connect(&opts)
            .await
            .unwrap()
            .stored_chunks()
            .await
            .unwrap()
    });
    assert_eq!(stored, expected, "chunks in the store");

    // A replica that starts now: generations 1..=10 are gone, 11 and 12 are installed.
    let replica_log = tmp.path().join("replica.log");
    let replica = Server::start_logged(
        &model,
        &tmp.path().join("replica"),
        &args(&common("replica")),
        Stdio::from(std::fs::File::create(&replica_log).unwrap()),
    );
    replica.wait_until(|s| served_generation(s) == 12, "the replica to catch up");
    assert_eq!(installed(&replica_log), vec![11, 12]);
    assert_eq!(
        scores(&replica),
        scores(&leader),
        "the replica answers differently"
    );
    let (first, first_total) = fetched(&replica_log, 11).unwrap();
    let (next, next_total) = fetched(&replica_log, 12).unwrap();
    eprintln!(
        "fetched: {first}/{first_total} then {next}/{next_total}; stored {}",
        stored.len()
    );
    assert!(
        first * 10 > first_total * 9,
        "a new replica fetches its first generation (nearly) whole: {first} of {first_total} bytes"
    );
    // Measured 2026-12-07: 107 KB of 1.22 MB (9%): the new segment, its chunk list and the
    // manifest. When each commit wrote every tensor whole it was 40% (493 KB): each generation
    // inserted an expert into every layer's tensors, so chunks changed besides the appended
    // ones. Fetching the generation whole is 100%.
    assert!(
        next * 5 < next_total,
        "generation 12 fetched {next} of {next_total} bytes"
    );
    // The replica holds generation 11's files and their chunk lists, so it fetches exactly
    // what the leader uploaded (it fetched every file's chunk list again before: 608 bytes
    // more here, 65 KB per generation at 1000 edits of SmolLM2).
    assert_eq!(next, new, "generation 12: fetched against uploaded bytes");
}

/// A batch that fails to train is recorded in the JetStream edit log (no commit record can carry
/// it): a new leader reading the log reports those edits failed with their error and does not
/// train them again, while the edits after them stay queued.
#[test]
fn a_failed_batch_is_kept_in_the_nats_edit_log() {
    use elder::serve::editlog::Entry;
    use elder::serve::ledger::{Ledger, Status};
    use elder::serve::replication::{Nats as NatsLog, NatsOptions, Role};

    let test = "a_failed_batch_is_kept_in_the_nats_edit_log";
    if !nats_available(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(dir.path(), "n1", None);
    let opts = NatsOptions {
        urls: vec![nats.url.clone()],
        stream: "FAILED_BATCH".to_string(),
        role: Role::Leader,
        replicas: 1,
        keep_generations: 8,
    };
    let add = |id: &str| Entry::Add {
        seq: 0,
        id: id.to_string(),
        record: json!({
            "id": id,
            "knowledge_id": id,
            "prompt": format!("Fact {id} is"),
            "target_new": " true"
        }),
    };
    let failed = Entry::Failed {
        ids: vec!["a".to_string(), "b".to_string()],
        error: "training diverged".to_string(),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let entries = rt.block_on(async {
        let log = NatsLog::connect(&opts).await.unwrap();
        let (_, last) = log.edit_log().await.unwrap();
        let last = log.take_over("http://127.0.0.1:9", last).await.unwrap();
        let last = log
            .append(&[add("a"), add("b"), add("c")], last)
            .await
            .unwrap();
        let after_adds = last;
        let last = log
            .append(std::slice::from_ref(&failed), last)
            .await
            .unwrap();
        assert_eq!(last, after_adds + 1, "the failure is one more log entry");
        let (entries, read_last) = log.edit_log().await.unwrap();
        assert_eq!(read_last, last);
        entries
    });
    assert!(
        entries.contains(&failed),
        "the failure is in the log: {entries:?}"
    );
    let ledger = Ledger::replay(&entries, &[]).unwrap();
    for id in ["a", "b"] {
        let e = ledger.get(id).unwrap();
        assert_eq!(e.status, Status::Failed, "{id}");
        assert_eq!(e.error.as_deref(), Some("training diverged"), "{id}");
    }
    assert_eq!(ledger.get("c").unwrap().status, Status::Queued);
    assert_eq!(
        ledger.queued_edits(),
        1,
        "only c is trained by a new leader"
    );
}
