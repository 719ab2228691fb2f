//! The engine's high-level operations, shared by the command line and tests: open a base model,
//! open or create an edit state, apply an edit stream durably, evaluate.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::backend::cpu::in_pool;
use crate::data::background::background_sentences;
use crate::data::EditRecord;
use crate::elder::capture::{CpuSites, SiteReader};
use crate::elder::config::{ElderConfig, Preset, QUESTION_FRAMES};
use crate::elder::keystore::Derived;
use crate::elder::memory::EditEntry;
use crate::elder::molora::Elder;
use crate::elder::plan::{self, plan_edit, Replay};
use crate::elder::state::{config_differences, EditState};
use crate::elder::train_stored::{apply_stored_batch, apply_stored_batch_on, finish_stored_batch};
use crate::elder::trainer::{
    apply_edit_batch, calibrate_query_mean, EditExample, EditReport, EditTimes,
};
use crate::elder::words::WordMap;
use crate::eval::{CpuScorer, Evaluator, Metrics, PairScorer, Protocol, TokenizedEdit};
use crate::model::loader::{build_model, check_checkpoint};
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::Weights;
use crate::model::{Model, ModelConfig};
use crate::runtime::cuda::{GpuEditor, GpuScorer, WeightSource};

/// A frozen base model: its config, the checkpoint's memory map, its tokenizer and fingerprint.
///
/// The f32 CPU model is built from the map on first use ([`BaseModel::model`]), not on opening: a
/// command that runs on the GPU uploads from the map tensor by tensor
/// ([`BaseModel::weight_source`]) and never builds it (a 7B Llama's would be 27 GB of host memory);
/// only the CPU paths do.
pub struct BaseModel {
    pub dir: PathBuf,
    pub cfg: ModelConfig,
    pub weights: Weights,
    /// The CPU model, once something has asked for it.
    cpu: OnceLock<Model>,
    /// The tokenizer's words (`relation_words`), once something has asked for them.
    words: OnceLock<Arc<WordMap>>,
    pub tokenizer: Tokenizer,
    /// Identifies the weights; an edit state records it and refuses other models.
    pub fingerprint: String,
}

impl BaseModel {
    /// Opens a model directory: config, memory map and tokenizer. Every tensor's presence, shape
    /// and dtype is checked from the headers (nothing is read), so a broken checkpoint fails here.
    pub fn open(dir: &Path) -> Result<Self> {
        let cfg = ModelConfig::from_dir(dir)?;
        let weights = Weights::open(dir)?;
        cfg.validate()
            .and_then(|()| check_checkpoint(&cfg, &weights))
            .with_context(|| format!("loading model from {}", dir.display()))?;
        let tokenizer = Tokenizer::from_dir(dir, cfg.arch)?;
        Ok(BaseModel {
            dir: dir.to_path_buf(),
            fingerprint: weights.fingerprint(),
            cfg,
            weights,
            cpu: OnceLock::new(),
            words: OnceLock::new(),
            tokenizer,
        })
    }

    /// The f32 CPU model, built from the checkpoint the first time it is asked for.
    pub fn model(&self) -> Result<&Model> {
        if let Some(m) = self.cpu.get() {
            return Ok(m);
        }
        let built = build_model(&self.cfg, &self.weights)
            .with_context(|| format!("loading model from {}", self.dir.display()))?;
        Ok(self.cpu.get_or_init(|| built))
    }

    /// Whether the CPU model has been built (by [`BaseModel::model`]).
    pub fn cpu_model_built(&self) -> bool {
        self.cpu.get().is_some()
    }

    /// The checkpoint as a GPU upload reads it: tensor by tensor from the memory map, converted to
    /// the device dtype on the way (no CPU model is built).
    pub fn weight_source(&self) -> WeightSource<'_> {
        WeightSource::Checkpoint {
            cfg: &self.cfg,
            weights: &self.weights,
        }
    }

    /// `prompt` -> ids; `target` -> ids of `" " + target` (the engine adds the separating space).
    pub fn encode_pair(&self, prompt: &str, target: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let p = self.tokenizer.encode(prompt)?;
        let t = self.tokenizer.encode_continuation(&format!(" {target}"))?;
        anyhow::ensure!(!p.is_empty(), "prompt {prompt:?} has no tokens");
        anyhow::ensure!(!t.is_empty(), "target {target:?} has no tokens");
        self.cfg
            .check_context(&[("the prompt", p.len()), ("the target", t.len())])
            .with_context(|| format!("prompt {}", preview(prompt)))?;
        Ok((p, t))
    }

    /// The tokens of `target` written after a prompt, up to and including the first that is
    /// not only whitespace (an edit's answer, as `answer_gate` asks for it).
    pub fn answer_prefix(&self, target: &str) -> Result<Vec<u32>> {
        let tokens = self.tokenizer.encode_continuation(&format!(" {target}"))?;
        let mut prefix = Vec::new();
        for t in tokens {
            prefix.push(t);
            if !self.tokenizer.decode(&[t])?.trim().is_empty() {
                break;
            }
        }
        Ok(prefix)
    }

    /// Each token's word for the relation words ([`crate::elder::words`]): the tokenizer's
    /// vocabulary without the common words of the shipped generic text and the question
    /// framings' words. Built the first time it is asked for (a decode per vocabulary entry).
    pub fn word_map(&self) -> Result<Arc<WordMap>> {
        if let Some(m) = self.words.get() {
            return Ok(m.clone());
        }
        let framing: Vec<Vec<u32>> = QUESTION_FRAMES
            .iter()
            .map(|f| self.tokenizer.encode_continuation(&f.replace("{}", " ")))
            .collect::<Result<_>>()?;
        let map = WordMap::from_vocab(self.tokenizer.vocab_size(), |t| {
            self.tokenizer.decode(&[t]).ok()
        })
        .without_common(&self.background_prompts()?, &framing);
        Ok(self.words.get_or_init(|| Arc::new(map)).clone())
    }

    /// An edit prompt's words outside its subject (the relation words of an edit).
    pub fn prompt_words(
        &self,
        map: &WordMap,
        prompt: &str,
        subject: Option<&str>,
    ) -> Result<Vec<u32>> {
        let (tokens, span) = self
            .tokenizer
            .encode_with_subject_span(prompt, subject.unwrap_or(""))?;
        Ok(map.words(&tokens, span.unwrap_or(0..0)))
    }

    /// Gives `elder` what its relation words derive from the tokenizer (`relation_words`): the
    /// word map and each remembered edit's prompt words, then rebuilds the key store's words.
    pub fn derive_relation_words(&self, elder: &mut Elder) -> Result<()> {
        if elder.cfg.relation_words > 0.0 {
            elder.word_map = Derived(Some(self.fill_relation_words(&mut elder.memory)?));
        }
        elder.refresh_relation_words();
        Ok(())
    }

    /// Derives each entry's prompt words (`words`); returns the word map they were read with.
    pub fn fill_relation_words(&self, entries: &mut [EditEntry]) -> Result<Arc<WordMap>> {
        let map = self.word_map()?;
        for entry in entries {
            entry.words = self.prompt_words(&map, &entry.prompt, entry.subject.as_deref())?;
        }
        Ok(map)
    }

    /// The shipped background sentences, tokenized (the key store's background).
    pub fn background_prompts(&self) -> Result<Vec<Vec<u32>>> {
        background_sentences()
            .iter()
            .map(|s| self.tokenizer.encode(s))
            .collect()
    }

    /// Tokenizes every record, checking each sequence against the model's positions, so a
    /// record that cannot be trained or scored is refused before any work (and before any edit
    /// of the stream is committed), naming the record.
    pub fn tokenize_edits<'r>(
        &self,
        records: impl IntoIterator<Item = &'r EditRecord>,
    ) -> Result<Vec<TokenizedEdit>> {
        records.into_iter().map(|r| self.tokenize_edit(r)).collect()
    }

    pub fn tokenize_edit(&self, r: &EditRecord) -> Result<TokenizedEdit> {
        let (prompt, target) = self
            .encode_pair(&r.prompt, &r.target_new)
            .with_context(|| format!("edit {:?}", r.id))?;
        let rephrases = r
            .rephrases
            .iter()
            .map(|p| {
                let ids = self.tokenizer.encode(p)?;
                // A rephrasing is scored with the edit's target after it.
                self.cfg
                    .check_context(&[("the rephrasing", ids.len()), ("the target", target.len())])
                    .with_context(|| format!("rephrasing {}", preview(p)))?;
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("edit {:?}: rephrases", r.id))?;
        let locality = r
            .locality
            .iter()
            .map(|l| self.encode_pair(&l.prompt, &l.answer))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("edit {:?}: locality", r.id))?;
        Ok(TokenizedEdit {
            id: r.id.clone(),
            knowledge_id: r.knowledge_id.clone(),
            prompt,
            target,
            rephrases,
            locality,
            locality_kinds: r.locality.iter().map(|l| l.kind.clone()).collect(),
        })
    }
}

/// A text for an error message: whole when short, else its start and its length (a refused
/// 20,000-token prompt must not fill the terminal).
pub fn preview(text: &str) -> String {
    const SHOWN: usize = 60;
    match text.char_indices().nth(SHOWN) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!(
            "{:?}... ({} characters)",
            &text[..cut],
            text.chars().count()
        ),
    }
}

/// ELDER's trainable state and where it is kept on disk.
pub struct EditSession {
    pub elder: Elder,
    pub state: EditState,
}

impl EditSession {
    /// Opens the state in `dir` (creating it with `config`, or the model's preset, if absent).
    /// An existing state keeps the config it was made with: a different `config` is refused.
    pub fn open(base: &BaseModel, dir: &Path, config: Option<ElderConfig>) -> Result<Self> {
        Self::open_after(base, dir, config, None)
    }

    /// [`EditSession::open`] for an edit stream: what a reloaded key store derives from the
    /// shipped background text is left to the stream, which reads it on its own device before
    /// its first batch ([`apply_stream_on`]), so a stream on the GPU builds no CPU model for it.
    /// Query it only after a stream has run.
    pub fn open_for_stream(
        base: &BaseModel,
        dir: &Path,
        config: Option<ElderConfig>,
    ) -> Result<Self> {
        Self::open_inner(base, dir, config, None, false)
    }

    /// [`EditSession::open`] for a state that replaces `previous` (a replica installing the next
    /// generation): what the key store derives from the shipped background text is taken from
    /// `previous` instead of recomputed, when both have the same config.
    pub fn open_after(
        base: &BaseModel,
        dir: &Path,
        config: Option<ElderConfig>,
        previous: Option<&Elder>,
    ) -> Result<Self> {
        Self::open_inner(base, dir, config, previous, true)
    }

    fn open_inner(
        base: &BaseModel,
        dir: &Path,
        config: Option<ElderConfig>,
        previous: Option<&Elder>,
        derive_background: bool,
    ) -> Result<Self> {
        let (cfg, cfg_json) = match EditState::stored_config(dir)? {
            Some(stored_json) => {
                let stored: ElderConfig = serde_json::from_value(stored_json.clone())
                    .with_context(|| {
                        format!(
                            "edit state {} has an unreadable method config",
                            dir.display()
                        )
                    })?;
                if let Some(requested) = config {
                    refuse_config_change(dir, &stored, &requested)?;
                }
                (stored, stored_json)
            }
            None => {
                let cfg = config.unwrap_or_else(|| ElderConfig::preset(Preset::Default, &base.cfg));
                let json = serde_json::to_value(&cfg)?;
                (cfg, json)
            }
        };
        let state = EditState::open_or_create(dir, &cfg_json, &base.fingerprint)?;
        let mut elder = Elder::from_state_after(cfg, &base.cfg, &state, previous)?;
        // Each edit's answer as the tokenizer writes it (derived, not stored).
        for entry in elder.memory.iter_mut() {
            entry.answer = base.answer_prefix(&entry.target)?;
        }
        base.derive_relation_words(&mut elder)?;
        if let Some(previous) = previous {
            elder.adopt_derived(previous);
        }
        if derive_background && elder.queries_need_background() {
            // What a reloaded key store derives from the shipped background text instead of
            // storing it (the rows that `weighted_context` relation keys are measured against):
            // read again here, once per process, so every query can be matched (about 3.5 s for
            // SmolLM2 on 2 cores; an edit stream reads it anyway).
            elder.ensure_key_store(&mut CpuSites(base.model()?), &base.background_prompts()?)?;
        }
        Ok(EditSession { elder, state })
    }
}

impl EditSession {
    /// Rolls the applied edit `id` back ([`Elder::forget`]) and commits the result as a new
    /// generation whose applied ids leave it out. On an error the state on disk is unchanged
    /// (the in-memory `elder` may not be: reopen the session).
    pub fn forget(&mut self, id: &str) -> Result<()> {
        self.elder.forget(id)?;
        self.state
            .commit_removal(
                &self.elder.named_tensors(),
                &self.elder.codebook,
                &self.elder.memory_bytes()?,
                id,
            )
            .with_context(|| format!("committing the rollback of edit {id:?}"))
    }
}

/// A state keeps the config it was made with; a different one is an error naming each difference.
fn refuse_config_change(dir: &Path, stored: &ElderConfig, requested: &ElderConfig) -> Result<()> {
    if stored == requested {
        return Ok(());
    }
    let mut differences = Vec::new();
    config_differences(
        "",
        &serde_json::to_value(stored)?,
        &serde_json::to_value(requested)?,
        &mut differences,
    );
    anyhow::bail!(
        "edit state {} was made with a different method config (a state keeps its config; use a new --state):\n  {}",
        dir.display(),
        differences.join("\n  ")
    )
}

/// Where edit batches train (and, for the `each` protocol, are scored right after): the CPU
/// reference trainer or the CUDA one. Both train the same way and leave the same state behind;
/// the stream logic around them ([`apply_stream_on`]) is one.
pub enum EditDevice {
    Cpu,
    Cuda(Box<dyn GpuEditor>),
}

impl EditDevice {
    /// Trains `elder` on one batch of records and remembers them: under the paper's routing the
    /// device trains and the batch's codes join the codebook (the CPU trains on `base`'s CPU
    /// model; the GPU on the weights it uploaded); under the stored allocation the CPU trains each
    /// edit's plan ([`crate::elder::plan`]). Keys join the key store when there is one.
    pub fn apply_edit_batch(
        &mut self,
        base: &BaseModel,
        elder: &mut Elder,
        records: &[&EditRecord],
        tokenized: &[TokenizedEdit],
        mut on_iteration: impl FnMut(usize, f32) + Send,
    ) -> Result<EditReport> {
        let mut entries: Vec<EditEntry> = records
            .iter()
            .map(|r| {
                Ok(EditEntry {
                    id: r.id.clone(),
                    knowledge_id: r.knowledge_id.clone(),
                    prompt: r.prompt.clone(),
                    target: r.target_new.clone(),
                    subject: plan::find_subject(&r.prompt, r.subject.as_deref()),
                    allocation: Vec::new(),
                    answer: base.answer_prefix(&r.target_new)?,
                    words: Vec::new(),
                })
            })
            .collect::<Result<_>>()?;
        if elder.cfg.relation_words > 0.0 {
            elder.word_map = Derived(Some(base.fill_relation_words(&mut entries)?));
        }
        self.ensure_key_store(base, elder)?;
        if !elder.cfg.uses_routers() {
            return stored_batch(self, base, elder, entries, on_iteration);
        }
        let batch: Vec<EditExample> = tokenized
            .iter()
            .map(|t| EditExample {
                prompt: t.prompt.clone(),
                target: t.target.clone(),
                knowledge_id: t.knowledge_id.clone(),
            })
            .collect();
        let report = match self {
            EditDevice::Cpu => apply_edit_batch(base.model()?, elder, &batch, on_iteration)?,
            EditDevice::Cuda(gpu) => gpu.edit_batch(elder, &batch, &mut on_iteration)?,
        };
        if elder.key_store.is_some() {
            let texts = entries
                .iter()
                .map(|e| plan::key_texts(&elder.cfg, &base.tokenizer, e, base.cfg.max_positions))
                .collect::<Result<Vec<_>>>()?;
            self.with_sites(base, |sites| {
                elder.add_keys(sites, texts.iter().map(Vec::as_slice))
            })?;
        }
        elder.memory.extend(entries);
        elder.refresh_scope_calibration();
        Ok(report)
    }

    /// Creates the key store, or derives what a reloaded one reads from the shipped background
    /// text, on this device's forward (nothing to do when it has it).
    pub fn ensure_key_store(&mut self, base: &BaseModel, elder: &mut Elder) -> Result<()> {
        if !elder.key_store_needs_background() {
            return Ok(());
        }
        let background = base.background_prompts()?;
        self.with_sites(base, |sites| elder.ensure_key_store(sites, &background))
    }

    /// Runs `f` with this device's reader of the key store's sites: the CPU model, or the GPU's
    /// uploaded one (which then needs no CPU model).
    fn with_sites<R: Send>(
        &mut self,
        base: &BaseModel,
        f: impl FnOnce(&mut dyn SiteReader) -> Result<R> + Send,
    ) -> Result<R> {
        match self {
            EditDevice::Cpu => {
                let model = base.model()?;
                in_pool(|| f(&mut CpuSites(model)))
            }
            EditDevice::Cuda(editor) => f(editor.site_reader()),
        }
    }

    /// Sets the state's mean query (`query_centering`) from `prompts`, on this device's forward.
    pub fn calibrate_query_mean(
        &mut self,
        base: &BaseModel,
        elder: &mut Elder,
        prompts: &[Vec<u32>],
    ) -> Result<()> {
        match self {
            EditDevice::Cpu => {
                calibrate_query_mean(base.model()?, elder, prompts);
                Ok(())
            }
            EditDevice::Cuda(gpu) => gpu.calibrate_query_mean(elder, prompts),
        }
    }

    /// Scores `edits` on the edited model as it is now (the `each` protocol).
    fn score_applied(
        &mut self,
        ev: &mut Evaluator,
        base: &BaseModel,
        elder: &Elder,
        edits: &[TokenizedEdit],
    ) -> Result<()> {
        match self {
            EditDevice::Cpu => {
                ev.add(base.model()?, elder, edits);
                Ok(())
            }
            EditDevice::Cuda(gpu) => {
                let runner = gpu.runner();
                runner.set_elder(Some(elder))?;
                ev.add_with(&mut GpuScorer(runner), edits)
            }
        }
    }
}

/// What `apply_stream` did.
#[derive(Debug, Clone, Serialize)]
pub struct StreamSummary {
    pub applied: usize,
    pub already_applied: usize,
    pub total_applied: usize,
    /// Edit batches trained.
    pub batches: usize,
    pub seconds: f64,
    pub seconds_per_edit: f64,
    /// Of `seconds`, the time spent writing commits.
    pub commit_seconds: f64,
    pub mean_first_loss: f64,
    pub mean_last_loss: f64,
    /// Optimiser steps per batch (fewer than `iterations` when batches stop early).
    pub mean_iterations: f64,
    /// Optimiser steps skipped because their gradients overflowed (f16 loss scaling on the GPU).
    pub skipped_steps: usize,
    /// Edits applied per second of `seconds`.
    pub edits_per_second: f64,
    /// Of `seconds`, the time in each part of training (summed over batches).
    pub times: EditTimes,
}

impl StreamSummary {
    /// One summary of consecutive parts of a stream.
    pub fn combine(parts: &[StreamSummary]) -> StreamSummary {
        let batches: usize = parts.iter().map(|p| p.batches).sum();
        let applied: usize = parts.iter().map(|p| p.applied).sum();
        let seconds: f64 = parts.iter().map(|p| p.seconds).sum();
        let mean = |f: fn(&StreamSummary) -> f64| {
            if batches == 0 {
                f64::NAN
            } else {
                parts
                    .iter()
                    .filter(|p| p.batches > 0)
                    .map(|p| f(p) * p.batches as f64)
                    .sum::<f64>()
                    / batches as f64
            }
        };
        StreamSummary {
            applied,
            already_applied: parts.first().map_or(0, |p| p.already_applied),
            total_applied: parts.last().map_or(0, |p| p.total_applied),
            batches,
            seconds,
            seconds_per_edit: if applied == 0 {
                0.0
            } else {
                seconds / applied as f64
            },
            commit_seconds: parts.iter().map(|p| p.commit_seconds).sum(),
            mean_first_loss: mean(|p| p.mean_first_loss),
            mean_last_loss: mean(|p| p.mean_last_loss),
            mean_iterations: mean(|p| p.mean_iterations),
            skipped_steps: parts.iter().map(|p| p.skipped_steps).sum(),
            edits_per_second: per_second(applied, seconds),
            times: parts.iter().fold(EditTimes::default(), |mut t, p| {
                t.add(&p.times);
                t
            }),
        }
    }

    /// Rate and where the time went, for the commands' summary line: "0.75 edits/s; prepare
    /// 20%, iterations 55%, keys 9%, commit 11%, other 5%" (other: planning, tokenizing,
    /// scoring with `--protocol each`). Empty when nothing was applied.
    pub fn rate_and_shares(&self) -> String {
        if self.applied == 0 || self.seconds <= 0.0 {
            return String::new();
        }
        let share = |x: f64| 100.0 * x / self.seconds;
        let t = &self.times;
        let other = self.seconds - t.prepare - t.iterations - t.keys - self.commit_seconds;
        let shares = format!(
            "{:.2} edits/s; prepare {:.0}%, iterations {:.0}%, keys {:.0}%, commit {:.0}%, other {:.0}%",
            self.edits_per_second,
            share(t.prepare),
            share(t.iterations),
            share(t.keys),
            share(self.commit_seconds),
            share(other.max(0.0)),
        );
        match self.work_line() {
            Some(work) => format!("{shares}; {work}"),
            None => shares,
        }
    }

    /// The CPU products' work per edit and the rate the iterations ran them at: "products 52.1
    /// GFLOP per edit (iterations 45.3), 72 GFLOP/s in the iterations". `None` when the CPU
    /// counted none (the GPU trained).
    pub fn work_line(&self) -> Option<String> {
        let t = &self.times;
        let total = t.prepare_gflop + t.iterations_gflop + t.keys_gflop;
        if self.applied == 0 || t.iterations_gflop <= 0.0 || t.iterations <= 0.0 {
            return None;
        }
        let per_edit = |x: f64| x / self.applied as f64;
        Some(format!(
            "products {:.1} GFLOP per edit (iterations {:.1}), {:.0} GFLOP/s in the iterations",
            per_edit(total),
            per_edit(t.iterations_gflop),
            t.iterations_gflop / t.iterations,
        ))
    }
}

fn per_second(n: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        n as f64 / seconds
    } else {
        0.0
    }
}

/// Applies `records` in order, in batches of the config's batch size, committing the state after
/// every batch; records already in the state are skipped (so an interrupted run resumes). With
/// `each`, every batch is scored right after it is applied. Trains on the CPU
/// ([`apply_stream_on`] picks the device).
pub fn apply_stream(
    base: &BaseModel,
    session: &mut EditSession,
    records: &[EditRecord],
    show_progress: bool,
    each: Option<&mut Evaluator>,
) -> Result<StreamSummary> {
    apply_stream_on(
        &mut EditDevice::Cpu,
        base,
        session,
        records,
        show_progress,
        each,
    )
}

/// [`apply_stream`] training (and scoring) on `device`.
pub fn apply_stream_on(
    device: &mut EditDevice,
    base: &BaseModel,
    session: &mut EditSession,
    records: &[EditRecord],
    show_progress: bool,
    mut each: Option<&mut Evaluator>,
) -> Result<StreamSummary> {
    let done: std::collections::HashSet<&str> = session
        .state
        .applied_ids()
        .iter()
        .map(String::as_str)
        .collect();
    let todo: Vec<&EditRecord> = records
        .iter()
        .filter(|r| !done.contains(r.id.as_str()))
        .collect();
    let already = records.len() - todo.len();
    let tokenized_todo = base.tokenize_edits(todo.iter().copied())?;
    if session.elder.cfg.query_centering && session.elder.query_mean.is_none() {
        // Once per state: later batches (and resumed runs) keep the stored mean.
        let prompts = calibration_prompts(base, records, session.elder.cfg.calibration_records)?;
        device.calibrate_query_mean(base, &mut session.elder, &prompts)?;
    }
    // A state opened for the stream (`EditSession::open_for_stream`) gets what its key store
    // derives here, before any batch: on this device's forward, and also when nothing is left
    // to apply.
    device.ensure_key_store(base, &mut session.elder)?;
    let bar = progress_bar(todo.len() as u64, show_progress);
    let start = Instant::now();
    let (mut first_sum, mut last_sum, mut batches) = (0.0f64, 0.0f64, 0usize);
    let (mut skipped_steps, mut iterations, mut commit_seconds) = (0, 0usize, 0.0f64);
    let mut times = EditTimes::default();
    let batch = session.elder.cfg.batch_size.max(1);
    for (chunk, tokenized) in todo.chunks(batch).zip(tokenized_todo.chunks(batch)) {
        let report =
            device.apply_edit_batch(base, &mut session.elder, chunk, tokenized, |_, loss| {
                bar.set_message(format!("loss {loss:.3}"));
            })?;
        let ids: Vec<String> = chunk.iter().map(|r| r.id.clone()).collect();
        let commit_start = Instant::now();
        session
            .state
            .commit(
                &session.elder.named_tensors(),
                &session.elder.codebook,
                &session.elder.memory_bytes()?,
                &ids,
            )
            .with_context(|| format!("committing edits {ids:?}"))?;
        commit_seconds += commit_start.elapsed().as_secs_f64();
        iterations += report.iterations;
        times.add(&report.times);
        if let Some(ev) = each.as_deref_mut() {
            device.score_applied(ev, base, &session.elder, tokenized)?;
        }
        first_sum += report.first_loss as f64;
        last_sum += report.last_loss as f64;
        skipped_steps += report.skipped_steps;
        batches += 1;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let n = todo.len();
    Ok(StreamSummary {
        applied: n,
        already_applied: already,
        total_applied: session.state.applied_ids().len(),
        batches,
        seconds,
        seconds_per_edit: if n == 0 { 0.0 } else { seconds / n as f64 },
        commit_seconds,
        mean_iterations: if batches == 0 {
            f64::NAN
        } else {
            iterations as f64 / batches as f64
        },
        mean_first_loss: if batches == 0 {
            f64::NAN
        } else {
            first_sum / batches as f64
        },
        mean_last_loss: if batches == 0 {
            f64::NAN
        } else {
            last_sum / batches as f64
        },
        skipped_steps,
        edits_per_second: per_second(n, seconds),
        times,
    })
}

/// Trains one batch under the stored allocation on `device`: a plan per edit, the replays its
/// allocations call for, then [`apply_stored_batch_on`] the device's iterations and the keys read
/// on its forward ([`finish_stored_batch`]).
fn stored_batch(
    device: &mut EditDevice,
    base: &BaseModel,
    elder: &mut Elder,
    entries: Vec<EditEntry>,
    on_iteration: impl FnMut(usize, f32) + Send,
) -> Result<EditReport> {
    let cfg = elder.cfg.clone();
    let pool = elder.layers[0].experts(cfg.rank);
    let mut plans = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        // Fresh experts of earlier edits of this batch come first in the pool.
        let pool = if cfg.allocation == crate::elder::config::AllocationMode::Fresh {
            pool + i * cfg.top_k
        } else {
            pool
        };
        let id = entry.id.clone();
        plans.push(
            plan_edit(
                &cfg,
                &base.tokenizer,
                base.cfg.max_positions,
                entry.clone(),
                &elder.memory,
                &entries,
                pool,
            )
            .with_context(|| format!("edit {id:?}"))?,
        );
    }
    let allocations: Vec<&[Vec<u32>]> = plans
        .iter()
        .map(|p| p.entry.allocation.as_slice())
        .collect();
    let replays = plan::replays(&elder.memory, &allocations, cfg.replay)
        .into_iter()
        .map(|e| {
            let (_, target) = base.encode_pair(&e.prompt, &e.target)?;
            Ok(Replay {
                prompt: plan::subject_text(&base.tokenizer, &e.prompt, e.subject.as_deref())?,
                target,
                allocation: e.allocation.clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    match device {
        EditDevice::Cpu => apply_stored_batch(base.model()?, elder, &plans, &replays, on_iteration),
        EditDevice::Cuda(editor) => {
            let report = apply_stored_batch_on(
                editor.stored_steps(),
                elder,
                &plans,
                &replays,
                on_iteration,
            )?;
            finish_stored_batch(editor.site_reader(), elder, &plans, report)
        }
    }
}

/// Prompts for the mean query: the edit prompts of the first `n` records and the shipped
/// background sentences (never a record's rephrasings or locality probes: those are the test).
fn calibration_prompts(
    base: &BaseModel,
    records: &[EditRecord],
    n: usize,
) -> Result<Vec<Vec<u32>>> {
    let mut prompts = Vec::new();
    for r in records.iter().take(n) {
        prompts.push(base.tokenizer.encode(&r.prompt)?);
    }
    prompts.extend(base.background_prompts()?);
    prompts.retain(|p| !p.is_empty());
    Ok(prompts)
}

/// Scores the final model on `records` (the paper's protocol).
pub fn evaluate_final(
    base: &BaseModel,
    elder: &Elder,
    records: &[EditRecord],
    show_progress: bool,
) -> Result<Metrics> {
    let mut cpu = CpuScorer {
        model: base.model()?,
        elder,
    };
    evaluate_final_with(base, &mut cpu, records, show_progress)
}

/// [`evaluate_final`] on any backend (the scorer holds the model and the ELDER state).
pub fn evaluate_final_with(
    base: &BaseModel,
    scorer: &mut dyn PairScorer,
    records: &[EditRecord],
    show_progress: bool,
) -> Result<Metrics> {
    let mut ev = Evaluator::default();
    score_records(base, scorer, records, show_progress, &mut ev)?;
    Ok(ev.metrics(Protocol::Final))
}

/// Scores `records` into `ev` (the final protocol's loop; `ev` may keep every item's details).
pub fn score_records(
    base: &BaseModel,
    scorer: &mut dyn PairScorer,
    records: &[EditRecord],
    show_progress: bool,
    ev: &mut Evaluator,
) -> Result<()> {
    let tokenized = base.tokenize_edits(records)?;
    let bar = progress_bar(records.len() as u64, show_progress);
    bar.set_message("evaluating");
    for chunk in tokenized.chunks(8) {
        ev.add_with(scorer, chunk)?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(())
}

fn progress_bar(len: u64, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} edits  {per_sec}  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(applied: usize, seconds: f64, commit: f64, times: EditTimes) -> StreamSummary {
        StreamSummary {
            applied,
            already_applied: 0,
            total_applied: applied,
            batches: 1,
            seconds,
            seconds_per_edit: seconds / applied.max(1) as f64,
            commit_seconds: commit,
            mean_first_loss: 1.0,
            mean_last_loss: 0.0,
            mean_iterations: 10.0,
            skipped_steps: 0,
            edits_per_second: per_second(applied, seconds),
            times,
        }
    }

    #[test]
    fn the_summary_line_gives_the_rate_and_where_the_time_went() {
        let times = EditTimes {
            prepare: 2.0,
            iterations: 5.0,
            keys: 1.0,
            ..EditTimes::default()
        };
        let s = summary(4, 10.0, 1.5, times);
        assert_eq!(
            s.rate_and_shares(),
            "0.40 edits/s; prepare 20%, iterations 50%, keys 10%, commit 15%, other 5%"
        );
        // With the CPU's products counted, their work per edit and the iterations' rate.
        let counted = EditTimes {
            prepare_gflop: 8.0,
            iterations_gflop: 200.0,
            keys_gflop: 2.0,
            ..times
        };
        assert_eq!(
            summary(4, 10.0, 1.5, counted).rate_and_shares(),
            "0.40 edits/s; prepare 20%, iterations 50%, keys 10%, commit 15%, other 5%; \
             products 52.5 GFLOP per edit (iterations 50.0), 40 GFLOP/s in the iterations"
        );
        // Two parts of a stream: rates and times add up over the whole.
        let both = StreamSummary::combine(&[s.clone(), summary(6, 5.0, 0.5, times)]);
        assert!((both.edits_per_second - 10.0 / 15.0).abs() < 1e-12);
        assert_eq!(both.times.iterations, 10.0);
        assert_eq!(summary(0, 0.0, 0.0, times).rate_and_shares(), "");
    }
}
