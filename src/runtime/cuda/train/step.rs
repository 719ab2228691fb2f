//! One training iteration on the device, in the order of the CPU trainer's `loss_and_grads` and
//! `Adam::step`: route, forward from block `first`'s MLP with tapes, the head on the supervised
//! rows, cross-entropy, backward down to block `first`'s MoLoRA site, the routers' backward with the
//! guided loss, Adam. Everything is queued on the device stream: nothing here waits for the device
//! or copies from the host.
//!
//! Row layout as on the CPU: `B x T` rows of the padded batch, padding rows computed but masked out
//! of attention and unsupervised (their gradients stay zero). The residual stream is kept explicit
//! per half-block (the tapes need it anyway): each norm adds the previous sublayer's output to the
//! stream it writes into the next tape.

use anyhow::{Context, Result};
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaSlice;

use crate::backend::cuda::buffers::KernelDtype;
use crate::backend::cuda::device::GpuDevice;
use crate::backend::cuda::lora::{self, LoraGrads, LoraSite};
use crate::backend::cuda::router::{self, Guide, RouterGradShape, RouterParamShape, RouterShape};
use crate::backend::cuda::{adam, elementwise};
use crate::backend::shapes::MixShape;
use crate::elder::config::{AllocationMode, ElderConfig, ExpertRows};
use crate::elder::trainer::{adam_step, learning_rate, tensor_rates};
use crate::model::layers::Site;
use crate::model::{BatchShape, ModelConfig};
use crate::runtime::cuda::activations::write;
use crate::runtime::cuda::weights::{GpuWeights, NormIo};

use super::buffers::{Experts, TrainBuffers};
use super::plan::Pool;

/// What an iteration reads and never changes: the model, the batch's shape and its device-side
/// positions (written by the prefix forward), the ELDER config and the MoLoRA widths.
pub struct Step<'a, T: KernelDtype> {
    pub dev: &'a GpuDevice,
    pub cfg: &'a ModelConfig,
    pub ecfg: &'a ElderConfig,
    pub w: &'a GpuWeights<T>,
    pub positions: &'a CudaSlice<u32>,
    pub q_start: &'a CudaSlice<i32>,
    pub q_valid: &'a CudaSlice<i32>,
    pub shape: &'a BatchShape,
    /// Supervised rows of the batch.
    pub n_targets: usize,
    /// Input and output width of the MoLoRA projections.
    pub d_in: usize,
    pub d_out: usize,
    /// The routed pool, or a fixed one whose routing `prepare` wrote once for the batch.
    pub pool: Pool,
}

impl<T: KernelDtype> Step<'_, T>
where
    CudaBlas: Gemm<T>,
{
    pub(super) fn rows(&self) -> usize {
        self.shape.rows()
    }

    pub(super) fn first(&self) -> usize {
        self.ecfg.molora_blocks[0]
    }

    /// Iteration `it`: forward, backward, Adam. Everything but the first iteration's choice of
    /// presets (`RouterFirstIteration`) is the same device work in every iteration (the step sizes
    /// come from [`Self::write_schedule`], the row losses go to `head.ce_now`), so iterations after
    /// the first can replay one captured CUDA graph.
    pub fn iteration(&self, b: &mut TrainBuffers<T>, it: usize) -> Result<()> {
        self.forward(b, it)?;
        self.backward(b)?;
        self.adam(&mut b.experts)
    }

    /// Writes iteration `it`'s Adam step sizes and bias corrections (the CPU trainer's schedule
    /// and per-tensor rates; fresh moments per batch, so step `it + 1`) where its Adam launches
    /// read them. Called before the iteration runs, outside any capture.
    pub fn write_schedule(&self, ex: &mut Experts, it: usize) -> Result<()> {
        let rates = tensor_rates(self.ecfg, learning_rate(self.ecfg, it));
        let t = u32::try_from(it + 1).context("iteration count")?;
        let schedule: Vec<f32> = rates
            .into_iter()
            .flat_map(|rate| adam::step_schedule(adam_step(self.ecfg, rate, t)))
            .collect();
        write(self.dev, &mut ex.adam_schedule, &schedule, "Adam schedule")
    }

    /// Copies iteration `it`'s row losses from `head.ce_now` into slot `it` of `head.ce` (read
    /// back once, after the batch).
    pub fn keep_losses(&self, b: &mut TrainBuffers<T>, it: usize) -> Result<()> {
        let n = self.n_targets;
        self.dev
            .stream()
            .memcpy_dtod(
                &b.head.ce_now.slice(0..n),
                &mut b.head.ce.slice_mut(it * n..(it + 1) * n),
            )
            .context("keeping the iteration's losses")
    }

    /// The forward of the iteration: routing, blocks `first..` with tapes, the head and the
    /// cross-entropy of the supervised rows (row losses into `head.ce_now`).
    pub fn forward(&self, b: &mut TrainBuffers<T>, it: usize) -> Result<()> {
        self.route(&mut b.experts, it)?;
        let first = self.first();
        let (rows, d) = (self.rows(), self.cfg.hidden_size);
        let sc = &mut b.scratch;
        // Block `first`: its MLP input and norm come from the frozen prefix (tape 0 is filled once
        // per batch).
        self.mlp_forward(first, &mut b.mlp[0], sc, &mut b.experts)
            .with_context(|| format!("block {first} MLP (training forward)"))?;
        for l in first + 1..self.cfg.num_layers {
            let i = l - first;
            let blk = &self.w.blocks[l];
            let at = &mut b.attn[i - 1];
            // residual = previous MLP input + its output; attention norm of it.
            blk.norm1.forward(
                self.dev,
                NormIo {
                    rows,
                    d,
                    x: &sc.delta,
                    residual: Some(&b.mlp[i - 1].x),
                    sum_out: Some(&mut at.x),
                    out: &mut sc.normed,
                    mean: &mut at.mean,
                    rstd: &mut at.rstd,
                },
            )?;
            self.attn_forward(l, at, sc)
                .with_context(|| format!("block {l} attention (training forward)"))?;
            let tape = &mut b.mlp[i];
            blk.norm2.forward(
                self.dev,
                NormIo {
                    rows,
                    d,
                    x: &sc.delta,
                    residual: Some(&b.attn[i - 1].x),
                    sum_out: Some(&mut tape.x),
                    out: &mut tape.normed,
                    mean: &mut tape.mean,
                    rstd: &mut tape.rstd,
                },
            )?;
            self.mlp_forward(l, tape, sc, &mut b.experts)
                .with_context(|| format!("block {l} MLP (training forward)"))?;
        }
        // The final residual stream, in `delta`.
        let last = b.mlp.last().context("no MLP tape")?;
        elementwise::residual_add(self.dev, &mut sc.delta, &last.x, rows * d)?;
        self.head_forward(&mut b.head, &sc.delta, b.experts.loss_scale.scale())
    }

    /// The forward and the backward of an iteration (no Adam): what a fixed pool's batch runs
    /// before it reads the row losses back.
    pub fn forward_backward(&self, b: &mut TrainBuffers<T>, it: usize) -> Result<()> {
        self.forward(b, it)?;
        self.backward(b)
    }

    /// The backward of the iteration down to block `first`'s MoLoRA site, then the routers'.
    pub fn backward(&self, b: &mut TrainBuffers<T>) -> Result<()> {
        let first = self.first();
        let sc = &mut b.scratch;
        self.head_backward(&mut b.head, sc)?;
        for l in (first + 1..self.cfg.num_layers).rev() {
            let i = l - first;
            let blk = &self.w.blocks[l];
            self.mlp_backward(l, blk, &b.mlp[i], sc, &mut b.experts, true)
                .with_context(|| format!("block {l} MLP backward"))?;
            self.attn_backward(blk, &b.attn[i - 1], sc)
                .with_context(|| format!("block {l} attention backward"))?;
        }
        let blk = &self.w.blocks[first];
        self.mlp_backward(first, blk, &b.mlp[0], sc, &mut b.experts, false)
            .with_context(|| format!("block {first} MLP backward"))?;
        self.router_backward(&mut b.experts)
    }

    /// Adam on every trainable tensor with the step sizes [`Self::write_schedule`] wrote, the
    /// loss scale divided out. An iteration whose gradients overflowed changes nothing but the
    /// scale; its step number is not reused (the bias correction of later steps counts it, a
    /// difference only after an overflow).
    pub fn adam(&self, ex: &mut Experts) -> Result<()> {
        // beta1, beta2 and eps; the rate and step count come from the device schedule.
        let betas = adam_step(self.ecfg, 0.0, 1);
        let sizes = ex.params.sizes().as_array();
        let tensors = ex
            .params
            .all_mut()
            .into_iter()
            .zip(ex.grads.all())
            .zip(ex.adam_m.all_mut())
            .zip(ex.adam_v.all_mut());
        // Every tensor's check before any step, so an overflow anywhere skips all of them. (A
        // fixed pool has no routers: their tensors are empty.)
        for (g, &n) in ex.grads.all().into_iter().zip(&sizes) {
            if n > 0 {
                ex.loss_scale.check(self.dev, g, n)?;
            }
        }
        for (i, ((((p, g), m), v), n)) in tensors.zip(sizes).enumerate() {
            if n == 0 {
                continue;
            }
            let schedule = ex.adam_schedule.slice(2 * i..2 * i + 2);
            let schedule = adam::Schedule::Device {
                betas,
                schedule: &schedule,
            };
            adam::adam(self.dev, p, g, m, v, n, schedule, Some(&ex.loss_scale))?;
        }
        ex.loss_scale.update(self.dev)
    }

    // ------------------------------------------------------------ routing

    fn router_shape(&self) -> RouterShape {
        RouterShape {
            batch: self.shape.batch,
            layers: self.ecfg.molora_blocks.len(),
            experts: self.ecfg.num_experts,
            d_in: self.d_in,
            k: self.ecfg.top_k,
            renormalize: self.ecfg.renormalize,
            threshold: self.ecfg.threshold,
        }
    }

    /// Every router on the fixed router input, with the current weights; clears the gradients the
    /// backward accumulates into. In `RouterFirstIteration` mode the first pass's choice becomes the
    /// guided loss's targets (a device-to-device copy).
    fn route(&self, ex: &mut Experts, it: usize) -> Result<()> {
        ex.grads.clear(self.dev)?;
        if self.pool != Pool::Routed {
            return Ok(());
        }
        router::router_fused::<f32>(
            self.dev,
            &self.router_shape(),
            &ex.router_in,
            None, // router_in is already centred
            &ex.params.w_r,
            &ex.params.b_r,
            &ex.no_codes,
            0,
            &mut ex.routed,
        )
        .context("routing (training)")?;
        if it == 0 && self.ecfg.allocation == AllocationMode::RouterFirstIteration {
            let n = self.layers_chosen();
            self.dev
                .stream()
                .memcpy_dtod(
                    &ex.routed.experts.slice(0..n),
                    &mut ex.presets.slice_mut(0..n),
                )
                .context("keeping the first iteration's experts as the presets")?;
        }
        Ok(())
    }

    /// `[L, B, k]` elements of this batch's routing.
    fn layers_chosen(&self) -> usize {
        self.ecfg.molora_blocks.len() * self.shape.batch * self.ecfg.top_k
    }

    fn router_backward(&self, ex: &mut Experts) -> Result<()> {
        if self.pool != Pool::Routed {
            return Ok(());
        }
        let (l, batch) = (self.ecfg.molora_blocks.len(), self.shape.batch);
        let shape = RouterGradShape {
            rows: l * batch,
            batch,
            experts: self.ecfg.num_experts,
            k: self.ecfg.top_k,
            renormalize: self.ecfg.renormalize,
        };
        let guide = Guide {
            preset: &ex.presets,
            per_seq: self.ecfg.top_k,
            weight: self.ecfg.guide_weight,
            loss_scale: Some(ex.loss_scale.scale()),
        };
        router::router_backward(
            self.dev,
            shape,
            &ex.routed.probs,
            &ex.routed.experts,
            &ex.routed.gates,
            &ex.dgates,
            Some(guide),
            &mut ex.dlogits,
            &mut ex.guide,
        )?;
        let params = RouterParamShape {
            layers: l,
            batch,
            experts: self.ecfg.num_experts,
            d_in: self.d_in,
        };
        router::router_param_grad(
            self.dev,
            params,
            &ex.dlogits,
            &ex.router_in,
            &mut ex.grads.w_r,
            &mut ex.grads.b_r,
        )
    }

    // ------------------------------------------------------------ MoLoRA sites

    fn lora_site(&self) -> LoraSite {
        LoraSite {
            shape: MixShape {
                batch: self.shape.batch,
                seq: self.shape.seq,
                d_in: self.d_in,
                d_out: self.d_out,
                rank: self.ecfg.rank,
                k: self.ecfg.top_k,
                scale: self.ecfg.scale(),
            },
            n_experts: self.pool.experts(self.ecfg),
        }
    }

    /// Layer `layer`'s slices of the stacked A and B, and of the `[L, B, k]` routing.
    fn layer_ranges(
        &self,
        layer: usize,
    ) -> (
        std::ops::Range<usize>,
        std::ops::Range<usize>,
        std::ops::Range<usize>,
    ) {
        let (e, r) = (self.pool.experts(self.ecfg), self.ecfg.rank);
        let (a, bm) = (e * self.d_in * r, e * r * self.d_out);
        let bk = self.shape.batch * self.ecfg.top_k;
        (
            layer * a..(layer + 1) * a,
            layer * bm..(layer + 1) * bm,
            layer * bk..(layer + 1) * bk,
        )
    }

    /// Each sequence's first changed row under `expert_rows = "answer"` (`None`: every row).
    fn first_rows<'e>(&self, rows: &'e CudaSlice<u32>) -> Option<&'e CudaSlice<u32>> {
        (self.ecfg.expert_rows == ExpertRows::Answer).then_some(rows)
    }

    /// `out += mixture(x)` when `site` is a MoLoRA site (every sequence in scope, as while
    /// training on the CPU), saving the shrink for the backward.
    pub(super) fn molora_forward(
        &self,
        site: Site,
        ex: &mut Experts,
        x: &CudaSlice<T>,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        let Some(layer) = self.ecfg.layer_at(site) else {
            return Ok(());
        };
        let (ra, rb, rc) = self.layer_ranges(layer);
        lora::lora_forward(
            self.dev,
            self.lora_site(),
            x,
            &ex.params.a.slice(ra),
            &ex.params.b.slice(rb),
            &ex.routed.experts.slice(rc.clone()),
            &ex.routed.gates.slice(rc),
            None::<&CudaSlice<u8>>,
            self.first_rows(&ex.first_rows),
            Some(&mut ex.shrink[layer]),
            out,
        )
        .with_context(|| format!("MoLoRA layer {layer} forward"))
    }

    /// The backward of what [`Self::molora_forward`] added at `site`: accumulates dA and dB, writes
    /// the layer's dgates and, when given, adds the input gradient to `dx`.
    pub(super) fn molora_backward(
        &self,
        site: Site,
        ex: &mut Experts,
        x: &CudaSlice<T>,
        dout: &CudaSlice<T>,
        dx: Option<&mut CudaSlice<T>>,
    ) -> Result<()> {
        let Some(layer) = self.ecfg.layer_at(site) else {
            return Ok(());
        };
        let (ra, rb, rc) = self.layer_ranges(layer);
        let first_rows = self.first_rows(&ex.first_rows);
        let mut da = ex.grads.a.slice_mut(ra.clone());
        let mut db = ex.grads.b.slice_mut(rb.clone());
        let mut dgates = ex.dgates.slice_mut(rc.clone());
        lora::lora_backward(
            self.dev,
            self.lora_site(),
            x,
            &ex.params.a.slice(ra),
            &ex.params.b.slice(rb),
            &ex.routed.experts.slice(rc.clone()),
            &ex.routed.gates.slice(rc),
            None::<&CudaSlice<u8>>,
            first_rows,
            &ex.shrink[layer],
            dout,
            &mut ex.dh_raw,
            LoraGrads {
                da: &mut da,
                db: &mut db,
                dgates: &mut dgates,
                dx,
            },
        )
        .with_context(|| format!("MoLoRA layer {layer} backward"))
    }
}
