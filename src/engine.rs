//! The engine handle: a base model and the device it runs on, chosen once per command.
//!
//! Every request the command line (and later the server) makes goes through an [`Engine`]:
//! generate, score, evaluate, apply an edit stream. The device is resolved once, in
//! [`DeviceChoice::resolve`], from `--device` and what the method asks for; no caller above this
//! module branches on the device. Below it, the CPU model and the CUDA runtime do the work (the
//! CUDA model and trainer are uploaded on first use, and the trainer's uploaded weights also
//! answer the queries that follow an edit).

use std::sync::Arc;

use anyhow::{bail, Result};

use crate::backend::cuda::GpuDevice;
use crate::backend::select::{self, Availability, Backend, DeviceRequest};
use crate::data::EditRecord;
use crate::elder::config::ElderConfig;
use crate::elder::molora::Elder;
use crate::eval::{
    self, CpuScorer, ElderRequest, Evaluator, Metrics, Protocol, Routed, EVAL_BATCH,
};
use crate::model::runner::{self, CpuForward, Decode, Forward, Sampling, Scored, TokenListener};
use crate::runtime::cuda::{
    open_gpu_editor, open_gpu_model, Capacity, GpuDtype, GpuRunner, GpuScorer,
};
use crate::session::{
    apply_stream_on, score_records, BaseModel, EditDevice, EditSession, StreamSummary,
};

/// What the command line asked for: `--device` and `--gpu-dtype`.
#[derive(Debug, Clone, Copy)]
pub struct DeviceChoice {
    pub request: DeviceRequest,
    pub dtype: GpuDtype,
}

impl DeviceChoice {
    /// The CPU, whatever the machine has.
    pub fn cpu() -> Self {
        DeviceChoice {
            request: DeviceRequest::Cpu,
            dtype: GpuDtype::Bf16,
        }
    }

    /// `--device cuda` without a usable CUDA build or driver fails here, naming the device,
    /// before any file is read.
    pub fn ensure_reachable(&self) -> Result<()> {
        if self.request == DeviceRequest::Cuda {
            select::choose(self.request, Ok(()), Availability::detect())?;
        }
        Ok(())
    }

    /// The device for a command that edits with `cfg` and answers (`None`: the base model only).
    /// Settings the GPU path does not have keep the command on the CPU (`auto`, with a note) or
    /// are refused (`cuda`). `auto` also falls back to the CPU, with a note, when a driver loads
    /// but no device opens.
    pub fn resolve(&self, cfg: Option<&ElderConfig>) -> Result<Device> {
        self.resolve_lacking(cfg, ElderConfig::gpu_unsupported)
    }

    /// [`DeviceChoice::resolve`] for a command that only answers with an edited state (generate,
    /// score, a final evaluation): only what GPU queries lack keeps it on the CPU.
    pub fn resolve_queries(&self, cfg: Option<&ElderConfig>) -> Result<Device> {
        self.resolve_lacking(cfg, ElderConfig::gpu_inference_unsupported)
    }

    fn resolve_lacking(
        &self,
        cfg: Option<&ElderConfig>,
        lacking: fn(&ElderConfig) -> Vec<&'static str>,
    ) -> Result<Device> {
        let reason = cfg.and_then(|cfg| {
            let missing = lacking(cfg);
            (!missing.is_empty()).then(|| {
                format!(
                    "the {} preset's {} {} not on the GPU yet",
                    cfg.preset.as_str(),
                    missing.join(", "),
                    if missing.len() == 1 { "is" } else { "are" }
                )
            })
        });
        let gpu_path = match &reason {
            Some(r) => Err(r.as_str()),
            None => Ok(()),
        };
        let avail = Availability::detect();
        if let (DeviceRequest::Auto, Err(reason), true) =
            (self.request, gpu_path, avail.kernels && avail.driver)
        {
            eprintln!("note: running on the CPU: {reason}");
        }
        match select::choose(self.request, gpu_path, avail)? {
            Backend::Cpu => Ok(Device::Cpu),
            Backend::Cuda => match GpuDevice::new(0) {
                Ok(dev) => Ok(Device::Cuda(dev, self.dtype)),
                Err(e) if self.request == DeviceRequest::Auto => {
                    eprintln!(
                        "note: a CUDA driver is present but no device opened ({e:#}); running on the CPU"
                    );
                    Ok(Device::Cpu)
                }
                Err(e) => Err(e.context("--device cuda")),
            },
        }
    }
}

/// Where an engine runs: the CPU reference, or a GPU in one dtype.
#[derive(Clone)]
pub enum Device {
    Cpu,
    Cuda(Arc<GpuDevice>, GpuDtype),
}

/// Each prompt's continuation and whether it was in scope (`None` without an edit state).
pub type Generated = (Vec<Vec<u32>>, Vec<Option<bool>>);

/// A base model on its device, with the device's model and trainer made on first use. Several
/// engines may share one base model (a server's query engine and its trainer).
pub struct Engine {
    pub base: Arc<BaseModel>,
    runtime: Runtime,
}

/// The device of an engine and what it has uploaded there.
struct Runtime {
    device: Device,
    /// The GPU model for queries (none on the CPU, or once the trainer serves them).
    runner: Option<Box<dyn GpuRunner>>,
    /// The trainer, once something was edited (on the GPU it also answers later queries).
    editor: Option<EditDevice>,
}

impl Runtime {
    /// The GPU model that answers queries (`None` on the CPU): the trainer's when one was made,
    /// else a model of `base` uploaded on first use.
    fn gpu(&mut self, base: &BaseModel) -> Result<Option<&mut dyn GpuRunner>> {
        let Device::Cuda(dev, dtype) = &self.device else {
            return Ok(None);
        };
        if let Some(EditDevice::Cuda(editor)) = &mut self.editor {
            return Ok(Some(editor.runner()));
        }
        if self.runner.is_none() {
            // Buffers for one evaluation batch of short prompts; they grow on demand.
            let cap = Capacity {
                batch: EVAL_BATCH,
                seq: 64,
            };
            self.runner = Some(open_gpu_model(
                dev.clone(),
                base.weight_source(),
                *dtype,
                cap,
            )?);
        }
        // (Reborrowed: a `&mut` to a boxed trait object does not shorten its lifetime itself.)
        Ok(self.runner.as_mut().map(|r| &mut **r as &mut dyn GpuRunner))
    }

    /// The trainer for edit batches of `batch` edits, made on first use.
    fn editor(&mut self, base: &BaseModel, batch: usize) -> Result<&mut EditDevice> {
        if self.editor.is_none() {
            self.editor = Some(match &self.device {
                Device::Cpu => EditDevice::Cpu,
                Device::Cuda(dev, dtype) => {
                    // Buffers for the state's batch size (they grow with longer edits), the
                    // weights uploaded straight from the checkpoint; the trainer then answers
                    // queries too, so a separate query model is dropped.
                    self.runner = None;
                    let cap = Capacity { batch, seq: 64 };
                    EditDevice::Cuda(open_gpu_editor(
                        dev.clone(),
                        base.weight_source(),
                        *dtype,
                        cap,
                    )?)
                }
            });
        }
        Ok(self.editor.as_mut().expect("made above"))
    }
}

impl Engine {
    pub fn new(base: BaseModel, device: Device) -> Self {
        Self::shared(Arc::new(base), device)
    }

    /// An engine on a base model that other engines also use (the CPU model is built once).
    pub fn shared(base: Arc<BaseModel>, device: Device) -> Self {
        Engine {
            base,
            runtime: Runtime {
                device,
                runner: None,
                editor: None,
            },
        }
    }

    /// The device in words, for logs.
    pub fn device_name(&self) -> String {
        match &self.runtime.device {
            Device::Cpu => "cpu".to_string(),
            Device::Cuda(_, dtype) => format!("cuda ({})", dtype.as_str()),
        }
    }

    /// The greedy continuation of `prompt` (at most `max_new` tokens, stopping at the model's
    /// end-of-text token), by the edited model of `elder` when given; also whether the prompt
    /// was in scope (`None` without an edit state).
    pub fn generate(
        &mut self,
        elder: Option<&Elder>,
        prompt: &[u32],
        max_new: usize,
    ) -> Result<(Vec<u32>, Option<bool>)> {
        let (mut out, scope) = self.generate_batch(
            elder,
            &[prompt.to_vec()],
            &[Sampling::greedy(max_new)],
            None,
        )?;
        Ok((out.remove(0), scope[0]))
    }

    /// The continuations of several prompts in one batch (padded prefill, shared decode steps),
    /// each decoded as its `sampling` says; `listener` hears every token as it is decoded. Also
    /// whether each prompt was in scope (`None` without an edit state).
    pub fn generate_batch(
        &mut self,
        elder: Option<&Elder>,
        prompts: &[Vec<u32>],
        sampling: &[Sampling],
        listener: Option<TokenListener>,
    ) -> Result<Generated> {
        anyhow::ensure!(
            prompts.len() == sampling.len(),
            "{} prompts but {} sampling settings",
            prompts.len(),
            sampling.len()
        );
        for (prompt, s) in prompts.iter().zip(sampling) {
            if prompt.is_empty() {
                bail!("the prompt has no tokens");
            }
            self.base.cfg.check_context(&[
                ("the prompt", prompt.len()),
                ("--max-new-tokens", s.max_new),
            ])?;
        }
        // The model config's eos is what generation stops on (transformers' generate does the
        // same); the tokenizer's may be a different special token (SmolLM2: <|endoftext|> vs
        // <|im_end|>).
        let eos = self.base.cfg.eos_token_id.or(self.base.tokenizer.eos_id());
        let mut decode = Decode::with_sampling(sampling, eos);
        if let Some(listener) = listener {
            decode = decode.listen(listener);
        }
        let (out, report) =
            self.with_forward(elder, |fwd| runner::generate(fwd, prompts, decode))?;
        Ok((out, scopes(elder, report, prompts.len())))
    }

    /// Scores several `(prompt, target)` pairs in batches (teacher forcing), by the edited model
    /// of `elder` when given: each pair's log-probabilities, argmax and scope.
    pub fn score_batch(
        &mut self,
        elder: Option<&Elder>,
        pairs: &[(&[u32], &[u32])],
    ) -> Result<Vec<crate::eval::Scored>> {
        for (prompt, target) in pairs {
            if prompt.is_empty() || target.is_empty() {
                bail!("both the prompt and the target need at least one token");
            }
            self.base
                .cfg
                .check_context(&[("the prompt", prompt.len()), ("the target", target.len())])?;
        }
        self.with_forward(elder, |fwd| eval::score_pairs_on(fwd, pairs))
    }

    /// The log-probability and argmax of each token of `target` after `prompt` (teacher
    /// forcing), by the edited model of `elder` when given; also whether the prompt was in scope.
    pub fn score(
        &mut self,
        elder: Option<&Elder>,
        prompt: &[u32],
        target: &[u32],
    ) -> Result<(Scored, Option<bool>)> {
        if prompt.is_empty() || target.is_empty() {
            bail!("both the prompt and the target need at least one token");
        }
        self.base
            .cfg
            .check_context(&[("the prompt", prompt.len()), ("the target", target.len())])?;
        let (scored, report) =
            self.with_forward(elder, |fwd| runner::score(fwd, prompt, target))?;
        Ok((scored, scopes(elder, report, 1).remove(0)))
    }

    /// Runs one request on the forward of the device chosen at start: the CUDA runtime with
    /// `elder` uploaded, or the CPU model with `elder`'s adapter (`None`: the base model). The
    /// one place a request picks its backend; the request itself is written once
    /// (`model::runner`, `eval::score_pairs_on`).
    fn with_forward<R>(
        &mut self,
        elder: Option<&Elder>,
        request: impl FnOnce(&mut dyn Forward<Report = Routed>) -> Result<R>,
    ) -> Result<R> {
        if let Some(gpu) = self.runtime.gpu(&self.base)? {
            gpu.set_elder(elder)?;
            return request(&mut *gpu.request(elder.is_some()));
        }
        let mut cpu = CpuForward::new(self.base.model()?, ElderRequest::new(elder));
        request(&mut cpu)
    }

    /// Scores the edited model of `elder` on `records` into `ev` (the paper's final protocol:
    /// reliability, generalization, locality; `ev` may keep every item's details).
    pub fn score_records(
        &mut self,
        elder: &Elder,
        records: &[EditRecord],
        show_progress: bool,
        ev: &mut Evaluator,
    ) -> Result<()> {
        match self.runtime.gpu(&self.base)? {
            Some(gpu) => {
                gpu.set_elder(Some(elder))?;
                score_records(&self.base, &mut GpuScorer(gpu), records, show_progress, ev)
            }
            None => {
                let mut cpu = CpuScorer {
                    model: self.base.model()?,
                    elder,
                };
                score_records(&self.base, &mut cpu, records, show_progress, ev)
            }
        }
    }

    /// [`Engine::score_records`] into a fresh evaluator: the final protocol's metrics.
    pub fn evaluate(
        &mut self,
        elder: &Elder,
        records: &[EditRecord],
        show_progress: bool,
    ) -> Result<Metrics> {
        let mut ev = Evaluator::default();
        self.score_records(elder, records, show_progress, &mut ev)?;
        Ok(ev.metrics(Protocol::Final))
    }

    /// Applies `records` to `session` in order, committing after every batch; records already in
    /// the state are skipped (an interrupted run resumes). With `each`, every batch is scored
    /// right after it is applied (the `each` protocol).
    pub fn apply_stream(
        &mut self,
        session: &mut EditSession,
        records: &[EditRecord],
        show_progress: bool,
        each: Option<&mut Evaluator>,
    ) -> Result<StreamSummary> {
        let editor = self
            .runtime
            .editor(&self.base, session.elder.cfg.batch_size)?;
        apply_stream_on(editor, &self.base, session, records, show_progress, each)
    }
}

/// Whether each of `n` prompts was in scope, from what the forward reported (`None` for every
/// prompt without an edit state; a prompt the report does not cover was out of scope).
fn scopes(elder: Option<&Elder>, report: Option<Routed>, n: usize) -> Vec<Option<bool>> {
    let in_scope = report.map(|r| r.in_scope).unwrap_or_default();
    (0..n)
        .map(|i| elder.map(|_| in_scope.get(i).copied().unwrap_or(false)))
        .collect()
}
