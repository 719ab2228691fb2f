//! The CUDA edit step: ELDER's trainer on the device, mirroring the CPU reference
//! (`elder::trainer`). Per edit batch: the frozen prefix once (blocks below the first MoLoRA block,
//! and that block's attention, with the queries captured at the query site), then `iterations` x
//! (route, forward with tapes, cross-entropy on the supervised rows, backward down to the first
//! MoLoRA site, the routers' backward with the guided loss, Adam with the CPU trainer's schedule
//! and per-tensor rates), then the trained experts and routers go back into the CPU [`Elder`] and
//! the batch's codes are pushed by the CPU trainer's own code path (`trainer::push_codes`).
//!
//! - [`plan`]: buffer sizes, parameter stacking and row plans (host only, unit-tested);
//! - [`buffers`]: the preallocated device memory;
//! - [`step`]: one iteration (routing, MoLoRA sites, router backward, Adam), with the half-blocks in
//!   `blocks` and the head and loss in `head`.
//!
//! Host synchronisation: at three points per batch, never inside an iteration. While the batch is
//! prepared, the loss scale's skipped-step counter is read (so the batch reports its own skips)
//! and the queries come back from the prefix (the batch's codes are computed from them at the end
//! with the CPU's function, exactly as the CPU trainer does); after the last iteration the losses,
//! parameters and loss scale come back. Per-iteration losses therefore stay on the device until the
//! batch ends, and `on_iteration` is called for every iteration after the last one.
//!
//! CUDA graphs: iteration 0 runs eagerly (in `RouterFirstIteration` mode it fixes the presets);
//! iteration 1 is captured and every later iteration replays it, one launch instead of a few
//! hundred (`set_iteration_graphs(false)` or `ELDER_CUDA_GRAPHS=0` launch every kernel instead).
//! What changes between iterations is written before each replay: Adam's step sizes into
//! device memory (`Step::write_schedule`); the iteration's row losses are copied out after it
//! (`Step::keep_losses`). `tests/emu_launch_trace.rs` checks this structure on the emulator's trace.
//!
//! Trainable weights, gradients and Adam moments are f32 on the device; activations and their
//! gradients are in the model's dtype `T` (the attention's dq/dk/dv in f32, then rounded).
//!
//! Compiled only: none of this has run on a GPU yet (`tests/gpu_train.rs` compares it with the CPU
//! trainer when one is available).

mod blocks;
pub mod buffers;
mod head;
pub mod plan;
pub mod step;
mod stored;

use std::sync::Arc;

use anyhow::{Context, Result};
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaGraph;
use half::{bf16, f16};

use crate::backend::cuda::adam::{LossScale, LossScalePolicy, LossScaleStatus};
use crate::backend::cuda::buffers::KernelDtype;
use crate::backend::cuda::device::GpuDevice;
use crate::backend::cuda::router;
use crate::elder::capture::SiteReader;
use crate::elder::config::ElderConfig;
use crate::elder::molora::{Elder, MoloraLayer};
use crate::elder::train_stored::StoredSteps;
use crate::elder::trainer::{
    batch_presets, mean_query, push_codes, EditExample, EditReport, EditRows, EditTimes,
    LossAndGrads,
};
use crate::model::layers::Site;
use crate::model::runner::pad_batch;

use super::activations::write;
use super::forward::GpuModel;
use super::plan::{prompt_query_rows, to_u32, Capacity};
use super::staging::WeightSource;
use super::{GpuDtype, GpuRunner};
use buffers::{copy, QueryCapture, TrainBuffers};
use plan::{check_trainable, head_scatter_ids, stack_params, unstack_params, Pool, TrainPlan};
use step::Step;

/// Calibration prompts per frozen-prefix forward (the CPU's `trainer::queries` takes 16 too).
const CALIBRATION_CHUNK: usize = 16;

/// A base model on the GPU that trains ELDER states. Owns the [`GpuModel`] (weights uploaded once,
/// its activations run the frozen prefix) and the training buffers, grown on demand.
pub struct GpuTrainer<T: KernelDtype> {
    model: GpuModel<T>,
    bufs: Option<TrainBuffers<T>>,
    /// How the backward's loss scale moves (`LossScalePolicy::for_dtype` unless set).
    loss_scale: LossScalePolicy,
    /// Training buffer (re)allocations so far.
    allocations: usize,
    /// Whether iterations after the first replay a captured CUDA graph (`ELDER_CUDA_GRAPHS=0`
    /// turns it off, as for decode steps).
    iteration_graphs: bool,
    /// The stored allocation's batch in training (`stored::FixedBatch`, driven through
    /// `elder::train_stored::StoredSteps`).
    fixed: Option<stored::FixedBatch>,
}

/// An edit batch made ready on the device (prefix run, inputs written).
struct Prepared {
    rows: EditRows,
    /// Steps skipped for overflow before this batch (the counter lives on the device).
    skipped_before: u32,
    /// The queries `[B, d_in]` as the prefix computed them (f32 on the host; empty for a fixed
    /// pool, which has no routers).
    query: Vec<f32>,
    d_in: usize,
    d_out: usize,
    pool: Pool,
}

impl<T: KernelDtype> GpuTrainer<T>
where
    CudaBlas: Gemm<T>,
{
    /// Uploads the model of `source` with inference buffers for `cap`; the training buffers are
    /// sized by the first batch (they depend on the ELDER config) and grow with larger ones.
    pub fn new<'a>(
        dev: Arc<GpuDevice>,
        source: impl Into<WeightSource<'a>>,
        cap: Capacity,
    ) -> Result<Self> {
        Ok(Self::from_model(GpuModel::new(dev, source, cap)?))
    }

    pub fn from_model(model: GpuModel<T>) -> Self {
        GpuTrainer {
            model,
            bufs: None,
            loss_scale: LossScalePolicy::for_dtype::<T>(),
            allocations: 0,
            iteration_graphs: super::forward::graphs_enabled(),
            fixed: None,
        }
    }

    /// Runs iterations after a batch's first as replays of one captured CUDA graph (`true`), or
    /// launches every kernel of every iteration (`false`; same results, for comparison).
    pub fn set_iteration_graphs(&mut self, on: bool) {
        self.iteration_graphs = on;
    }

    /// The uploaded model (for inference on the same weights, e.g. evaluation after editing).
    pub fn model(&mut self) -> &mut GpuModel<T> {
        &mut self.model
    }

    /// Buffer (re)allocations so far, training and inference buffers together: unchanged by edit
    /// batches within the capacity already reserved.
    pub fn allocations(&self) -> usize {
        self.allocations + self.model.allocations()
    }

    /// Replaces the loss-scale policy (tests, experiments); the scale restarts at its `init`.
    pub fn set_loss_scale_policy(&mut self, policy: LossScalePolicy) -> Result<()> {
        if let Some(b) = self.bufs.as_mut() {
            b.experts.loss_scale = LossScale::new(&self.model.dev, policy)?;
        }
        self.loss_scale = policy;
        Ok(())
    }

    /// The loss scale now, its clean-step run and the steps skipped for overflow since the
    /// trainer's buffers were made (waits for the device). `None` before the first batch.
    pub fn loss_scale_status(&self) -> Result<Option<LossScaleStatus>> {
        self.bufs
            .as_ref()
            .map(|b| b.experts.loss_scale.status(&self.model.dev))
            .transpose()
    }

    /// `trainer::apply_edit_batch` on the device: trains `elder` on `batch` and appends the
    /// batch's codes to its codebook. `on_iteration(i, loss)` is called for every iteration once
    /// the batch is done (the losses stay on the device until then).
    pub fn edit_batch(
        &mut self,
        elder: &mut Elder,
        batch: &[EditExample],
        mut on_iteration: impl FnMut(usize, f32),
    ) -> Result<EditReport> {
        let cfg = elder.cfg.clone();
        let prep = self.prepare_batch(elder, batch, Pool::Routed)?;
        let iterations = cfg.iterations;
        let use_graphs = self.iteration_graphs;
        {
            let (step, bufs) = self.parts(&cfg, &prep)?;
            // Iteration 0 runs eagerly (it may fix the presets); iteration 1 is captured into a
            // CUDA graph that every later iteration replays: one launch instead of hundreds.
            let mut graph: Option<CudaGraph> = None;
            for it in 0..iterations {
                step.write_schedule(&mut bufs.experts, it)?;
                replay_or_capture(
                    step.dev,
                    &mut graph,
                    use_graphs && it > 0,
                    "edit iteration",
                    || step.iteration(bufs, it),
                )?;
                step.keep_losses(bufs, it)?;
            }
        }
        let (ce, guide) = self.losses(&cfg, &prep, iterations)?;
        let (step, bufs) = self.parts(&cfg, &prep)?;
        let trained = bufs.experts.params.download(step.dev)?;
        let scaling = bufs.experts.loss_scale.status(step.dev)?;
        unstack_params(&trained, &mut elder.layers)?;
        push_codes(elder, &prep.query)?;
        for (it, &loss) in ce.iter().enumerate() {
            on_iteration(it, loss);
        }
        Ok(EditReport {
            first_loss: ce[0],
            last_loss: ce[iterations - 1],
            guide_loss: guide,
            iterations,
            skipped_steps: (scaling.skipped_steps - prep.skipped_before) as usize,
            loss_scale: scaling.scale,
            // The device queues the prefix and the iterations as one graph: not split here.
            times: EditTimes::default(),
        })
    }

    /// `trainer::calibrate_query_mean` on the device: each calibration prompt's query is read by
    /// the frozen prefix (as in training), then averaged by the CPU's function. Does nothing when
    /// the state already has its mean or there are no prompts.
    pub fn calibrate_query_mean(&mut self, elder: &mut Elder, prompts: &[Vec<u32>]) -> Result<()> {
        if elder.query_mean.is_some() || prompts.is_empty() {
            return Ok(());
        }
        let cfg = &elder.cfg;
        check_trainable(cfg)?;
        let d_in = elder
            .layers
            .first()
            .context("the ELDER state has no MoLoRA layers")?
            .d_in;
        let site = Site {
            block: cfg.query_block,
            proj: cfg.query_proj,
        };
        let first = cfg.molora_blocks[0];
        let dev = self.model.dev.clone();
        let chunk = CALIBRATION_CHUNK.min(prompts.len());
        let mut capture = QueryCapture::<T>::new(&dev, site, d_in, chunk)?;
        let mut queries = Vec::with_capacity(prompts.len() * d_in);
        for prompts in prompts.chunks(chunk) {
            let (ids, shape) = pad_batch(prompts, &vec![0; prompts.len()]);
            self.model.reserve(Capacity {
                batch: shape.batch,
                seq: shape.seq,
            })?;
            let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
            capture.begin(&dev, site, &prompt_query_rows(shape.seq, &lens))?;
            self.model
                .forward_prefix(&ids, &shape, first, &mut capture)
                .context("calibrating the mean query")?;
            anyhow::ensure!(
                capture.captured(),
                "the query site (block {}, {:?}) was not reached below block {first}",
                cfg.query_block,
                cfg.query_proj
            );
            let n = prompts.len() * d_in;
            queries.extend(dev.download_f32::<T, _>(&capture.query.slice(0..n))?);
        }
        elder.query_mean = Some(mean_query(&queries, prompts.len()));
        Ok(())
    }

    /// The first iteration's loss and gradients without an Adam step (the CPU's
    /// `PreparedBatch::loss_and_grads` with the batch's presets): what the GPU-vs-CPU tests compare.
    pub fn loss_and_grads(&mut self, elder: &Elder, batch: &[EditExample]) -> Result<LossAndGrads> {
        let cfg = elder.cfg.clone();
        let prep = self.prepare_batch(elder, batch, Pool::Routed)?;
        {
            let (step, bufs) = self.parts(&cfg, &prep)?;
            step.forward(bufs, 0)?;
            step.backward(bufs)?;
            step.keep_losses(bufs, 0)?;
        }
        let (ce, guide) = self.losses(&cfg, &prep, 1)?;
        let (step, bufs) = self.parts(&cfg, &prep)?;
        let mut grads: Vec<MoloraLayer> = elder.layers.iter().map(|l| l.zeros_like()).collect();
        // The device's gradients are of the scaled loss (a power of two: dividing is exact).
        let scale = bufs.experts.loss_scale.status(step.dev)?.scale;
        let mut stacked = bufs.experts.grads.download(step.dev)?;
        stacked.iter_mut().flatten().for_each(|g| *g /= scale);
        unstack_params(&stacked, &mut grads)?;
        let per_layer = prep.rows.shape.batch * cfg.top_k;
        let chosen = step
            .dev
            .download(
                &bufs
                    .experts
                    .routed
                    .experts
                    .slice(0..grads.len() * per_layer),
            )?
            .chunks(per_layer)
            .map(<[u32]>::to_vec)
            .collect();
        Ok(LossAndGrads {
            ce: ce[0],
            guide,
            grads,
            chosen,
            rows: None,
        })
    }

    /// Grows the training buffers to cover `need` for this config (reallocating only when the
    /// plan changes). Capacity and the per-iteration loss slots only grow, so batches that are
    /// smaller or run fewer iterations than an earlier one reuse its buffers.
    fn reserve(
        &mut self,
        ecfg: &ElderConfig,
        widths: (usize, usize),
        need: Capacity,
        pool: Pool,
    ) -> Result<()> {
        let cap = self.bufs.as_ref().map_or(need, |b| b.plan.cap.union(need));
        let mut plan = TrainPlan::new(&self.model.cfg, ecfg, widths, cap, pool)?;
        if let Some(b) = &self.bufs {
            plan.ce = plan.ce.max(b.plan.ce);
        }
        if self.bufs.as_ref().is_some_and(|b| b.plan == plan) {
            return Ok(());
        }
        // Free the old set first so peak memory is one set, not two.
        self.bufs = None;
        self.bufs = Some(TrainBuffers::new(
            &self.model.dev,
            &plan,
            ecfg,
            widths.0,
            self.loss_scale,
        )?);
        self.allocations += 1;
        Ok(())
    }

    /// Runs the frozen prefix and writes everything an iteration reads: tape 0 (block `first`'s
    /// MLP input and norm), the current parameters (`elder`'s, `pool.experts` per layer) with
    /// fresh Adam moments, the supervised rows and their targets; for a routed pool also the
    /// router input and the guided loss's presets (a fixed pool's routing is the caller's).
    fn prepare_batch(
        &mut self,
        elder: &Elder,
        batch: &[EditExample],
        pool: Pool,
    ) -> Result<Prepared> {
        let cfg = &elder.cfg;
        let routed = pool == Pool::Routed;
        if routed {
            check_trainable(cfg)?;
        }
        let rows = EditRows::new(&self.model.cfg, batch)?;
        let layer = elder
            .layers
            .first()
            .context("the ELDER state has no MoLoRA layers")?;
        let (d_in, d_out) = (layer.d_in, layer.d_out);
        let shape = &rows.shape;
        let cap = Capacity {
            batch: shape.batch,
            seq: shape.seq,
        };
        self.model.reserve(cap)?;
        self.reserve(cfg, (d_in, d_out), cap, pool)?;
        let dev = self.model.dev.clone();
        let bufs = self.bufs.as_mut().context("training buffers missing")?;
        let first = cfg.molora_blocks[0];
        let (n_rows, d) = (shape.rows(), self.model.cfg.hidden_size);

        // The frozen prefix, capturing the query of each sequence at its last prompt token.
        let prompt_lens: Vec<usize> = rows.prompt_rows.iter().map(|r| r.len()).collect();
        let query_site = Site {
            block: cfg.query_block,
            proj: cfg.query_proj,
        };
        bufs.capture.begin(
            &dev,
            query_site,
            &prompt_query_rows(shape.seq, &prompt_lens),
        )?;
        self.model
            .forward_prefix(&rows.ids, shape, first, &mut bufs.capture)?;
        anyhow::ensure!(
            bufs.capture.captured() || !routed,
            "the query site (block {}, {:?}) was not reached below block {first}",
            cfg.query_block,
            cfg.query_proj
        );
        let act = &self.model.act;
        let tape = &mut bufs.mlp[0];
        copy(&dev, &act.h, &mut tape.x, n_rows * d, "prefix residual")?;
        copy(
            &dev,
            &act.normed,
            &mut tape.normed,
            n_rows * d,
            "prefix norm",
        )?;
        copy(&dev, &act.mean, &mut tape.mean, n_rows, "prefix norm mean")?;
        copy(&dev, &act.rstd, &mut tape.rstd, n_rows, "prefix norm rstd")?;

        let query = if routed {
            self.prepare_routers(elder, batch, shape.batch, d_in)?
        } else {
            Vec::new()
        };
        let bufs = self.bufs.as_mut().context("training buffers missing")?;
        let ex = &mut bufs.experts;
        // A routed batch's query download has synchronised already: reading the counter then
        // costs no extra wait.
        let skipped_before = ex.loss_scale.status(&dev)?.skipped_steps;
        ex.params.upload(&dev, &stack_params(&elder.layers))?;
        ex.adam_m.clear(&dev)?;
        ex.adam_v.clear(&dev)?;

        let hb = &mut bufs.head;
        let n = rows.target_rows.len();
        let targets = rows
            .targets
            .iter()
            .map(|&t| i32::try_from(t).context("target id does not fit an i32"))
            .collect::<Result<Vec<i32>>>()?;
        write(
            &dev,
            &mut hb.rows,
            &to_u32("target row", &rows.target_rows)?,
            "target rows",
        )?;
        write(&dev, &mut hb.targets, &targets, "targets")?;
        let scatter = head_scatter_ids(n_rows, &rows.target_rows)?;
        write(&dev, &mut hb.scatter, &scatter, "head scatter rows")?;
        // Row n of the head gradient feeds every unsupervised row: zero for the whole batch.
        buffers::clear(&dev, &mut hb.dx, n * d..(n + 1) * d, "head gradient")?;
        Ok(Prepared {
            rows,
            skipped_before,
            query,
            d_in,
            d_out,
            pool,
        })
    }

    /// The routers' input, made on the device (centred on the state's mean query if configured),
    /// and the guided loss's presets; returns the queries (f32, on the host).
    fn prepare_routers(
        &mut self,
        elder: &Elder,
        batch: &[EditExample],
        n_seq: usize,
        d_in: usize,
    ) -> Result<Vec<f32>> {
        let cfg = &elder.cfg;
        let dev = self.model.dev.clone();
        let bufs = self.bufs.as_mut().context("training buffers missing")?;
        let ex = &mut bufs.experts;
        let centre = match (&elder.query_mean, cfg.query_centering) {
            (Some(mean), true) => {
                anyhow::ensure!(
                    mean.len() == d_in,
                    "the state's mean query has {} values, the query site is {d_in} wide",
                    mean.len()
                );
                write(&dev, &mut ex.query_mean, mean, "mean query")?;
                true
            }
            _ => false,
        };
        router::router_input::<T>(
            &dev,
            n_seq,
            d_in,
            &bufs.capture.query,
            centre.then_some(&ex.query_mean),
            &mut ex.router_in,
        )
        .context("making the router input")?;
        // The raw queries stay on the host for the codebook entries pushed after training.
        let query = dev.download_f32::<T, _>(&bufs.capture.query.slice(0..n_seq * d_in))?;
        // Knowledge-seeded presets now; router-chosen ones are copied at the first iteration.
        if let Some(presets) = batch_presets(cfg, batch) {
            write(
                &dev,
                &mut ex.presets,
                &presets.concat(),
                "guided-loss presets",
            )?;
        }
        Ok(query)
    }

    /// The iteration's read-only context and the buffers it works on.
    fn parts<'a>(
        &'a mut self,
        ecfg: &'a ElderConfig,
        prep: &'a Prepared,
    ) -> Result<(Step<'a, T>, &'a mut TrainBuffers<T>)> {
        let bufs = self.bufs.as_mut().context("training buffers missing")?;
        let model: &'a GpuModel<T> = &self.model;
        let step = Step {
            dev: &model.dev,
            cfg: &model.cfg,
            ecfg,
            w: &model.weights,
            positions: &model.act.positions,
            q_start: &model.act.q_start,
            q_valid: &model.act.q_valid,
            shape: &prep.rows.shape,
            n_targets: prep.rows.target_rows.len(),
            d_in: prep.d_in,
            d_out: prep.d_out,
            pool: prep.pool,
        };
        Ok((step, bufs))
    }

    /// Mean cross-entropy of each of the first `iterations` iterations (the CPU's sum of row losses
    /// times `1 / n`) and the last iteration's guided loss summed over layers (waits for the device).
    fn losses(
        &mut self,
        ecfg: &ElderConfig,
        prep: &Prepared,
        iterations: usize,
    ) -> Result<(Vec<f32>, f32)> {
        let (step, bufs) = self.parts(ecfg, prep)?;
        let n = step.n_targets;
        let rows = step.dev.download(&bufs.head.ce.slice(0..iterations * n))?;
        let weight = 1.0 / n as f32;
        let ce = rows
            .chunks(n)
            .map(|r| r.iter().sum::<f32>() * weight)
            .collect();
        let guide_rows = ecfg.molora_blocks.len() * prep.rows.shape.batch;
        let guide = step
            .dev
            .download(&bufs.experts.guide.slice(0..guide_rows))?
            .iter()
            .sum();
        Ok((ce, guide))
    }
}

/// Runs `work` as one step of an iterated batch: replays `graph` once it holds one; with
/// `capture`, records `work` into it and launches that; else launches `work` eagerly.
fn replay_or_capture(
    dev: &GpuDevice,
    graph: &mut Option<CudaGraph>,
    capture: bool,
    what: &str,
    work: impl FnOnce() -> Result<()>,
) -> Result<()> {
    if let Some(g) = graph {
        return g.launch().with_context(|| format!("replaying the {what}"));
    }
    if !capture {
        return work();
    }
    let g = dev
        .capture_graph(work)
        .with_context(|| format!("capturing the {what}"))?;
    g.launch()
        .with_context(|| format!("launching the {what}"))?;
    *graph = Some(g);
    Ok(())
}

/// A [`GpuTrainer`] of any dtype, for callers that pick the dtype at run time (the command line).
pub trait GpuEditor {
    fn dtype(&self) -> GpuDtype;
    /// [`GpuTrainer::edit_batch`].
    fn edit_batch(
        &mut self,
        elder: &mut Elder,
        batch: &[EditExample],
        on_iteration: &mut dyn FnMut(usize, f32),
    ) -> Result<EditReport>;
    /// [`GpuTrainer::calibrate_query_mean`].
    fn calibrate_query_mean(&mut self, elder: &mut Elder, prompts: &[Vec<u32>]) -> Result<()>;
    /// The stored allocation's iterations on this trainer (`elder::train_stored`).
    fn stored_steps(&mut self) -> &mut dyn StoredSteps;
    /// The uploaded model reading the key store's sites (keys and background).
    fn site_reader(&mut self) -> &mut dyn SiteReader;
    /// The same uploaded model for inference (evaluation after or between edits).
    fn runner(&mut self) -> &mut dyn GpuRunner;
    fn allocations(&self) -> usize;
}

macro_rules! impl_editor {
    ($t:ty, $d:expr) => {
        impl GpuEditor for GpuTrainer<$t> {
            fn dtype(&self) -> GpuDtype {
                $d
            }
            fn edit_batch(
                &mut self,
                elder: &mut Elder,
                batch: &[EditExample],
                on_iteration: &mut dyn FnMut(usize, f32),
            ) -> Result<EditReport> {
                GpuTrainer::edit_batch(self, elder, batch, on_iteration)
            }
            fn calibrate_query_mean(
                &mut self,
                elder: &mut Elder,
                prompts: &[Vec<u32>],
            ) -> Result<()> {
                GpuTrainer::calibrate_query_mean(self, elder, prompts)
            }
            fn stored_steps(&mut self) -> &mut dyn StoredSteps {
                self
            }
            fn site_reader(&mut self) -> &mut dyn SiteReader {
                &mut self.model
            }
            fn runner(&mut self) -> &mut dyn GpuRunner {
                &mut self.model
            }
            fn allocations(&self) -> usize {
                GpuTrainer::allocations(self)
            }
        }
    };
}

impl_editor!(f32, GpuDtype::F32);
impl_editor!(f16, GpuDtype::F16);
impl_editor!(bf16, GpuDtype::Bf16);

/// Uploads the model of `source` to `dev` in `dtype` for editing, with inference buffers for `cap`.
pub fn open_gpu_editor<'a>(
    dev: Arc<GpuDevice>,
    source: impl Into<WeightSource<'a>>,
    dtype: GpuDtype,
    cap: Capacity,
) -> Result<Box<dyn GpuEditor>> {
    let source = source.into();
    Ok(match dtype {
        GpuDtype::F32 => Box::new(GpuTrainer::<f32>::new(dev, source, cap)?),
        GpuDtype::F16 => Box::new(GpuTrainer::<f16>::new(dev, source, cap)?),
        GpuDtype::Bf16 => Box::new(GpuTrainer::<bf16>::new(dev, source, cap)?),
    })
}
