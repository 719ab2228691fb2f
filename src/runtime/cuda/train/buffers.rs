//! The trainer's preallocated device memory, sized by a [`TrainPlan`]: the tapes of the blocks
//! from the first MoLoRA block up, the backward's scratch, the head's buffers, ELDER's f32
//! trainable state (parameters, gradients, Adam moments) with its routing buffers, and the query
//! capture of the frozen prefix. Allocated once per capacity; iterations only read and write them.

use anyhow::{bail, Context, Result};
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use crate::backend::cuda::adam::{LossScale, LossScalePolicy};
use crate::backend::cuda::buffers::KernelDtype;
use crate::backend::cuda::device::GpuDevice;
use crate::backend::cuda::elementwise;
use crate::backend::cuda::router::{RouterOutputs, RouterShape};
use crate::elder::config::ElderConfig;
use crate::model::layers::Site;
use crate::model::BatchShape;
use crate::runtime::cuda::activations::write;
use crate::runtime::cuda::blocks::SiteHook;
use crate::runtime::cuda::plan::to_u32;

use super::plan::{ParamSizes, TrainPlan};

fn alloc<T: DeviceRepr + ValidAsZeroBits>(
    dev: &GpuDevice,
    n: usize,
    what: &str,
) -> Result<CudaSlice<T>> {
    // At least one element: a fixed pool has no routers, and an empty device buffer is not a
    // buffer every driver accepts.
    dev.zeros::<T>(n.max(1))
        .with_context(|| format!("allocating the trainer's {what} ({n} elements)"))
}

/// Zeroes elements `range` of `buf` on the stream (no host synchronisation).
pub fn clear<T: DeviceRepr + ValidAsZeroBits>(
    dev: &GpuDevice,
    buf: &mut CudaSlice<T>,
    range: std::ops::Range<usize>,
    what: &str,
) -> Result<()> {
    if range.end > buf.len() || range.start > range.end {
        bail!(
            "clearing elements {range:?} of the {what}, which holds {}",
            buf.len()
        );
    }
    if range.is_empty() {
        return Ok(());
    }
    dev.stream()
        .memset_zeros(&mut buf.slice_mut(range))
        .with_context(|| format!("clearing the {what}"))
}

/// Copies the first `n` elements of `src` into `dst` on the stream (no host synchronisation).
pub fn copy<T: DeviceRepr>(
    dev: &GpuDevice,
    src: &CudaSlice<T>,
    dst: &mut CudaSlice<T>,
    n: usize,
    what: &str,
) -> Result<()> {
    if n > src.len() || n > dst.len() {
        bail!(
            "copying {n} elements of the {what} between buffers of {} and {}",
            src.len(),
            dst.len()
        );
    }
    if n == 0 {
        return Ok(());
    }
    dev.stream()
        .memcpy_dtod(&src.slice(0..n), &mut dst.slice_mut(0..n))
        .with_context(|| format!("copying the {what}"))
}

/// One f32 tensor per kind of MoLoRA parameter, every layer stacked (see `plan::stack_params`):
/// the parameters themselves, their gradients, or one of Adam's moments.
pub struct ParamSet {
    pub a: CudaSlice<f32>,
    pub b: CudaSlice<f32>,
    pub w_r: CudaSlice<f32>,
    pub b_r: CudaSlice<f32>,
    sizes: ParamSizes,
}

/// A [`ParamSet`]'s tensors: A, B, router weight, router bias.
pub const PARAM_TENSORS: usize = 4;

impl ParamSet {
    fn zeros(dev: &GpuDevice, sizes: ParamSizes, what: &str) -> Result<Self> {
        Ok(ParamSet {
            a: alloc(dev, sizes.a, what)?,
            b: alloc(dev, sizes.b, what)?,
            w_r: alloc(dev, sizes.w_r, what)?,
            b_r: alloc(dev, sizes.b_r, what)?,
            sizes,
        })
    }

    pub fn sizes(&self) -> ParamSizes {
        self.sizes
    }

    /// In `MoloraLayer::tensors_mut` order.
    pub fn all(&self) -> [&CudaSlice<f32>; PARAM_TENSORS] {
        [&self.a, &self.b, &self.w_r, &self.b_r]
    }

    pub fn all_mut(&mut self) -> [&mut CudaSlice<f32>; PARAM_TENSORS] {
        [&mut self.a, &mut self.b, &mut self.w_r, &mut self.b_r]
    }

    /// Zeroes all four tensors on the stream.
    pub fn clear(&mut self, dev: &GpuDevice) -> Result<()> {
        let sizes = self.sizes.as_array();
        for (t, n) in self.all_mut().into_iter().zip(sizes) {
            clear(dev, t, 0..n, "MoLoRA state")?;
        }
        Ok(())
    }

    /// Copies stacked host tensors in (see `plan::stack_params`); sizes must match exactly.
    pub fn upload(&mut self, dev: &GpuDevice, host: &[Vec<f32>; 4]) -> Result<()> {
        let sizes = self.sizes.as_array();
        for ((t, h), n) in self.all_mut().into_iter().zip(host).zip(sizes) {
            if h.len() != n {
                bail!(
                    "MoLoRA tensor of {} values for a {n}-value device copy",
                    h.len()
                );
            }
            if n > 0 {
                write(dev, t, h, "MoLoRA parameters")?;
            }
        }
        Ok(())
    }

    /// Copies the four tensors back (waits for the stream).
    pub fn download(&self, dev: &GpuDevice) -> Result<[Vec<f32>; 4]> {
        let sizes = self.sizes.as_array();
        let [a, b, w, br] = self.all();
        let get = |t: &CudaSlice<f32>, n: usize| -> Result<Vec<f32>> {
            if n == 0 {
                return Ok(Vec::new());
            }
            dev.download(&t.slice(0..n))
        };
        Ok([
            get(a, sizes[0])?,
            get(b, sizes[1])?,
            get(w, sizes[2])?,
            get(br, sizes[3])?,
        ])
    }
}

/// What the attention half of a block saves (`model::transformer::AttnTape` on the device, plus
/// the attention's output and log-sum-exp, which the kernel's backward reads instead of probs).
pub struct AttnTape<T: KernelDtype> {
    /// The residual stream entering the norm `[rows, d]`, and the norm's statistics `[rows]`.
    pub x: CudaSlice<T>,
    pub mean: CudaSlice<f32>,
    pub rstd: CudaSlice<f32>,
    /// Rotated queries and keys, values `[rows, q_dim]` / `[rows, kv_dim]`: with a cache that
    /// starts empty, the keys of this call are the whole cache, laid out as the batch's rows.
    pub q: CudaSlice<T>,
    pub k: CudaSlice<T>,
    pub v: CudaSlice<T>,
    /// Attention output before `o_proj` `[rows, q_dim]` and its log-sum-exp `[batch, heads, seq]`.
    pub att: CudaSlice<T>,
    pub lse: CudaSlice<f32>,
}

/// What the MLP half of a block saves (`model::transformer::MlpTape` on the device).
pub struct MlpTape<T: KernelDtype> {
    pub x: CudaSlice<T>,
    pub normed: CudaSlice<T>,
    pub mean: CudaSlice<f32>,
    pub rstd: CudaSlice<f32>,
    /// GPT-2: pre-activation of gelu (bias and mixture included); Llama: gate output.
    pub pre: CudaSlice<T>,
    /// Llama: up projection output (a placeholder element for GPT-2).
    pub up: CudaSlice<T>,
    /// Input of the output projection.
    pub act: CudaSlice<T>,
}

/// Buffers every block reuses: the forward's sublayer output and norm output, and the backward's
/// gradients (activation dtype, except the attention gradients the kernel accumulates in f32).
pub struct Scratch<T: KernelDtype> {
    /// The sublayer output not yet added to the residual stream `[rows, d]`; after the last block,
    /// the final residual stream itself.
    pub delta: CudaSlice<T>,
    pub normed: CudaSlice<T>,
    /// GPT-2's c_fc product before bias and gelu `[rows, intermediate]`.
    pub ffn: CudaSlice<T>,
    /// dL/d(residual stream) `[rows, d]`, and dL/d(norm output).
    pub dh: CudaSlice<T>,
    pub dnormed: CudaSlice<T>,
    /// dL/d(MLP activation), dL/d(pre-activation or gate), dL/d(up) `[rows, intermediate]`.
    pub dact: CudaSlice<T>,
    pub dpre: CudaSlice<T>,
    pub dup: CudaSlice<T>,
    /// dL/d(attention output) `[rows, q_dim]`; dq, dk, dv as f32 (kernel atomics) and as T (GEMMs).
    pub datt: CudaSlice<T>,
    pub dq32: CudaSlice<f32>,
    pub dk32: CudaSlice<f32>,
    pub dv32: CudaSlice<f32>,
    pub dq: CudaSlice<T>,
    pub dk: CudaSlice<T>,
    pub dv: CudaSlice<T>,
}

/// The head on the supervised rows only, and the cross-entropy.
pub struct HeadBuffers<T: KernelDtype> {
    /// Supervised rows `[n]`, their targets `[n]`, and each row's row of `dx` (`plan::head_scatter_ids`).
    pub rows: CudaSlice<u32>,
    pub targets: CudaSlice<i32>,
    pub scatter: CudaSlice<u32>,
    /// The gathered residual rows `[n, d]`, the final norm's output and statistics.
    pub x: CudaSlice<T>,
    pub normed: CudaSlice<T>,
    pub mean: CudaSlice<f32>,
    pub rstd: CudaSlice<f32>,
    pub logits: CudaSlice<T>,
    pub dlogits: CudaSlice<T>,
    pub dnormed: CudaSlice<T>,
    /// `[n + 1, d]`: row `n` stays zero (cleared once per batch).
    pub dx: CudaSlice<T>,
    /// Per-row cross-entropy of every iteration `[iterations, n]`.
    pub ce: CudaSlice<f32>,
    /// The current iteration's per-row cross-entropy `[n]`, copied into `ce` after the iteration
    /// (an iteration writes the same address every time, so a captured graph can replay it).
    pub ce_now: CudaSlice<f32>,
    /// A fixed pool's loss weight of every supervised row `[n]` and each row's argmax `[n]`
    /// (read back every iteration for the early stop).
    pub weights: CudaSlice<f32>,
    pub argmax: CudaSlice<u32>,
}

/// ELDER's trainable state (f32, as the project keeps trainables) and its routing buffers.
pub struct Experts {
    pub params: ParamSet,
    pub grads: ParamSet,
    pub adam_m: ParamSet,
    pub adam_v: ParamSet,
    /// `x A_e` of every MoLoRA layer `[batch, k, seq, r]`, saved by the forward.
    pub shrink: Vec<CudaSlice<f32>>,
    /// The LoRA backward's `dh_raw` scratch `[batch, k, seq, r]`.
    pub dh_raw: CudaSlice<f32>,
    /// What the routers read `[batch, d_in]`: the query, centred when configured.
    pub router_in: CudaSlice<f32>,
    /// The state's mean query `[d_in]` (`query_centering`), copied in per batch.
    pub query_mean: CudaSlice<f32>,
    /// The loss scale of the backward (f16) and the skip-on-overflow state of Adam.
    pub loss_scale: LossScale,
    /// The current iteration's Adam `[step_size, bc2_sqrt]` of each parameter tensor (`[4, 2]`,
    /// `adam::step_schedule`), written before every iteration and read by its Adam launches.
    pub adam_schedule: CudaSlice<f32>,
    pub routed: RouterOutputs,
    /// `expert_rows = "answer"`: each sequence's first row the experts change (its last prompt
    /// token) `[batch]`, written once per stored batch.
    pub first_rows: CudaSlice<u32>,
    /// The fused router also checks codes against a codebook; training passes none (a stand-in).
    pub no_codes: CudaSlice<u64>,
    /// The guided loss's targets `[L, batch, k]`, the gates' gradients `[L, batch, k]`, the router
    /// logits' gradients `[L, batch, E]` and each row's guided loss `[L, batch]`.
    pub presets: CudaSlice<u32>,
    pub dgates: CudaSlice<f32>,
    pub dlogits: CudaSlice<f32>,
    pub guide: CudaSlice<f32>,
}

/// Reads each sequence's query during the frozen prefix: the query site's input at one row per
/// sequence (the last prompt token), gathered into `query [batch, d_in]`.
pub struct QueryCapture<T: KernelDtype> {
    site: Site,
    rows: CudaSlice<u32>,
    pub query: CudaSlice<T>,
    d_in: usize,
    batch: usize,
    captured: bool,
}

impl<T: KernelDtype> QueryCapture<T> {
    /// Buffers for up to `batch` queries of `d_in` values read at `site`.
    pub fn new(dev: &GpuDevice, site: Site, d_in: usize, batch: usize) -> Result<Self> {
        Ok(Self {
            site,
            rows: alloc(dev, batch, "query rows")?,
            query: alloc(dev, batch * d_in, "queries")?,
            d_in,
            batch: 0,
            captured: false,
        })
    }

    /// Starts a batch: read sequence `b`'s query at row `rows[b]` of `site`'s input.
    pub fn begin(&mut self, dev: &GpuDevice, site: Site, rows: &[usize]) -> Result<()> {
        write(
            dev,
            &mut self.rows,
            &to_u32("query row", rows)?,
            "query rows",
        )?;
        self.site = site;
        self.batch = rows.len();
        self.captured = false;
        Ok(())
    }

    pub fn captured(&self) -> bool {
        self.captured
    }
}

impl<T: KernelDtype> SiteHook<T> for QueryCapture<T> {
    fn after_linear(
        &mut self,
        dev: &GpuDevice,
        site: Site,
        shape: &BatchShape,
        x: &CudaSlice<T>,
        _out: &mut CudaSlice<T>,
    ) -> Result<()> {
        if self.captured || site != self.site {
            return Ok(());
        }
        if shape.batch != self.batch {
            bail!(
                "{} query rows for a batch of {} sequences",
                self.batch,
                shape.batch
            );
        }
        // A row gather is an embedding lookup with the activations as the table.
        elementwise::embedding(
            dev,
            &self.rows,
            self.batch,
            x,
            shape.rows(),
            self.d_in,
            &mut self.query,
        )
        .context("capturing the queries")?;
        self.captured = true;
        Ok(())
    }
}

/// Everything the trainer keeps on the device for one plan.
pub struct TrainBuffers<T: KernelDtype> {
    pub plan: TrainPlan,
    /// Attention tapes of blocks `first + 1..`, MLP tapes of blocks `first..`.
    pub attn: Vec<AttnTape<T>>,
    pub mlp: Vec<MlpTape<T>>,
    pub scratch: Scratch<T>,
    pub head: HeadBuffers<T>,
    pub experts: Experts,
    pub capture: QueryCapture<T>,
}

impl<T: KernelDtype> TrainBuffers<T> {
    pub fn new(
        dev: &GpuDevice,
        p: &TrainPlan,
        ecfg: &ElderConfig,
        d_in: usize,
        loss_scale: LossScalePolicy,
    ) -> Result<Self> {
        let rows = p.rows;
        let attn = (0..p.attn_tapes)
            .map(|_| -> Result<AttnTape<T>> {
                Ok(AttnTape {
                    x: alloc(dev, p.hidden, "attention tape")?,
                    mean: alloc(dev, rows, "attention tape")?,
                    rstd: alloc(dev, rows, "attention tape")?,
                    q: alloc(dev, p.q, "attention tape")?,
                    k: alloc(dev, p.kv, "attention tape")?,
                    v: alloc(dev, p.kv, "attention tape")?,
                    att: alloc(dev, p.q, "attention tape")?,
                    lse: alloc(dev, p.lse, "attention tape")?,
                })
            })
            .collect::<Result<_>>()?;
        let mlp = (0..p.mlp_tapes)
            .map(|_| -> Result<MlpTape<T>> {
                Ok(MlpTape {
                    x: alloc(dev, p.hidden, "MLP tape")?,
                    normed: alloc(dev, p.hidden, "MLP tape")?,
                    mean: alloc(dev, rows, "MLP tape")?,
                    rstd: alloc(dev, rows, "MLP tape")?,
                    pre: alloc(dev, p.ffn, "MLP tape")?,
                    up: alloc(dev, p.up, "MLP tape")?,
                    act: alloc(dev, p.ffn, "MLP tape")?,
                })
            })
            .collect::<Result<_>>()?;
        let scratch = Scratch {
            delta: alloc(dev, p.hidden, "scratch")?,
            normed: alloc(dev, p.hidden, "scratch")?,
            ffn: alloc(dev, p.ffn, "scratch")?,
            dh: alloc(dev, p.hidden, "scratch")?,
            dnormed: alloc(dev, p.hidden, "scratch")?,
            dact: alloc(dev, p.ffn, "scratch")?,
            dpre: alloc(dev, p.ffn, "scratch")?,
            dup: alloc(dev, p.ffn, "scratch")?,
            datt: alloc(dev, p.q, "scratch")?,
            dq32: alloc(dev, p.q, "scratch")?,
            dk32: alloc(dev, p.kv, "scratch")?,
            dv32: alloc(dev, p.kv, "scratch")?,
            dq: alloc(dev, p.q, "scratch")?,
            dk: alloc(dev, p.kv, "scratch")?,
            dv: alloc(dev, p.kv, "scratch")?,
        };
        let head = HeadBuffers {
            rows: alloc(dev, rows, "head")?,
            targets: alloc(dev, rows, "head")?,
            scatter: alloc(dev, rows, "head")?,
            x: alloc(dev, p.hidden, "head")?,
            normed: alloc(dev, p.hidden, "head")?,
            mean: alloc(dev, rows, "head")?,
            rstd: alloc(dev, rows, "head")?,
            logits: alloc(dev, p.logits, "head")?,
            dlogits: alloc(dev, p.logits, "head")?,
            dnormed: alloc(dev, p.hidden, "head")?,
            dx: alloc(dev, p.head_dx, "head")?,
            ce: alloc(dev, p.ce, "head")?,
            ce_now: alloc(dev, rows, "head")?,
            weights: alloc(dev, rows, "head")?,
            argmax: alloc(dev, rows, "head")?,
        };
        let router_shape = RouterShape {
            batch: p.cap.batch,
            layers: p.layers,
            experts: ecfg.num_experts,
            d_in,
            k: ecfg.top_k,
            renormalize: ecfg.renormalize,
            threshold: ecfg.threshold,
        };
        let experts = Experts {
            params: ParamSet::zeros(dev, p.params, "MoLoRA parameters")?,
            grads: ParamSet::zeros(dev, p.params, "MoLoRA gradients")?,
            adam_m: ParamSet::zeros(dev, p.params, "Adam moments")?,
            adam_v: ParamSet::zeros(dev, p.params, "Adam moments")?,
            shrink: (0..p.layers)
                .map(|_| alloc(dev, p.low_rank, "MoLoRA shrink"))
                .collect::<Result<_>>()?,
            dh_raw: alloc(dev, p.low_rank, "MoLoRA scratch")?,
            router_in: alloc(dev, p.query, "router input")?,
            query_mean: alloc(dev, d_in, "mean query")?,
            loss_scale: LossScale::new(dev, loss_scale)?,
            adam_schedule: alloc(dev, 2 * PARAM_TENSORS, "Adam schedule")?,
            routed: RouterOutputs::alloc(dev, &router_shape)?,
            first_rows: alloc(dev, p.cap.batch, "first changed rows")?,
            no_codes: alloc(dev, 1, "empty codebook")?,
            presets: alloc(dev, p.chosen, "guided-loss presets")?,
            dgates: alloc(dev, p.chosen, "gate gradients")?,
            dlogits: alloc(dev, p.router_logits, "router gradients")?,
            guide: alloc(dev, p.router_rows, "guided loss")?,
        };
        let site = Site {
            block: ecfg.query_block,
            proj: ecfg.query_proj,
        };
        let capture = QueryCapture::new(dev, site, d_in, p.cap.batch)?;
        Ok(TrainBuffers {
            plan: p.clone(),
            attn,
            mlp,
            scratch,
            head,
            experts,
            capture,
        })
    }
}
