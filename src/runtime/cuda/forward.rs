//! The CUDA forward of a padded batch, block by block in the order of the CPU description
//! (the half-blocks of [`super::blocks`], shared with the training forward, then the head), on the
//! uploaded weights and the preallocated buffers. Differences from the CPU that do not change
//! results:
//! - the residual add is fused into the next norm (`h + delta` is materialised by the norm kernel),
//!   and GPT-2's position embeddings ride on the first one;
//! - biases are added after the cuBLAS product (GPT-2's c_fc bias inside bias + GELU), so ELDER's
//!   mixture is added before the bias instead of after it: the same sum;
//! - keys and values go through `kv_append` into a `[B, capacity, kv_dim]` cache per layer and the
//!   attention always reads the cache (prefill and decode alike).

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::{CudaGraph, CudaSlice};

use crate::backend::shapes::Layout;
use crate::elder::molora::Elder;
use crate::eval::Routed;
use crate::model::{BatchShape, ModelConfig};

use super::activations::{write, Activations};
use super::blocks::{attn_half, mlp_half, AttnIo, CallRows, Keys, MlpIo, SiteHook};
use super::elder::{upload_elder, DeviceElder};
use super::plan::{check_shape, to_i32, to_u32, Capacity};
use super::staging::WeightSource;
use super::weights::{self, GpuWeights, NormIo};
use crate::backend::cuda::buffers::KernelDtype;
use crate::backend::cuda::device::GpuDevice;
use crate::backend::cuda::elementwise;
use crate::backend::cuda::gemm;
use crate::model::layers::Norm;
use crate::model::transformer::Block;

/// What ELDER does during one forward call.
#[derive(Debug, Clone, Copy)]
pub enum ElderStep<'a> {
    /// The base model: no ELDER at all.
    Off,
    /// A prompt: read each sequence's query at these rows and route; the call's token ids with
    /// them (the key store's relation words read the prompts' words).
    Prompt(&'a [usize], &'a [u32]),
    /// A later call of the same request (decode): keep the prompt's routing.
    Continue,
}

/// A base model (and optionally an ELDER state) resident on one GPU, in activation dtype `T`.
pub struct GpuModel<T: KernelDtype> {
    pub(super) dev: Arc<GpuDevice>,
    pub(super) cfg: ModelConfig,
    pub(super) weights: GpuWeights<T>,
    pub(super) act: Activations<T>,
    pub(super) elder: Option<Box<dyn DeviceElder<T>>>,
    /// Rows of the last forward call (what the head may read).
    last_rows: usize,
    /// Captured decode steps (see [`Self::decode_step`]); they hold the addresses of the buffers,
    /// so they are dropped whenever a buffer is reallocated or the ELDER state replaced.
    decode_graphs: Vec<DecodeGraph>,
    /// Whether decode steps are captured and replayed (`ELDER_CUDA_GRAPHS=0` turns it off).
    use_graphs: bool,
}

/// One captured decode step: the whole forward of `batch` single-token sequences plus the head,
/// replayed after the step's inputs are written into the same buffers.
struct DecodeGraph {
    batch: usize,
    edited: bool,
    graph: CudaGraph,
}

// SAFETY: a CUDA graph is not internally synchronised, and `GpuModel` only touches its graphs
// through `&mut self`, so moving the model to another thread never shares one.
unsafe impl Send for DecodeGraph {}

/// Decode steps and edit iterations replay captured CUDA graphs unless `ELDER_CUDA_GRAPHS=0`.
pub(super) fn graphs_enabled() -> bool {
    std::env::var("ELDER_CUDA_GRAPHS").map_or(true, |v| v != "0")
}

impl<T: KernelDtype> GpuModel<T>
where
    CudaBlas: Gemm<T>,
{
    /// Uploads the model of `source` once (an f32 CPU [`Model`](crate::model::Model), or a
    /// checkpoint read tensor by tensor) and preallocates buffers for calls up to `cap`.
    pub fn new<'a>(
        dev: Arc<GpuDevice>,
        source: impl Into<WeightSource<'a>>,
        cap: Capacity,
    ) -> Result<Self> {
        let source = source.into();
        let cfg = source.config().clone();
        let weights = weights::upload(&dev, source)?;
        let act = Activations::new(&dev, &cfg, cap)?;
        // The cuBLAS handle allocates its workspace when created: now, rather than in the first
        // forward (or, worse, inside the capture of a first decode step, where allocating fails).
        dev.blas()?;
        Ok(GpuModel {
            dev,
            cfg,
            weights,
            act,
            elder: None,
            last_rows: 0,
            decode_graphs: Vec::new(),
            use_graphs: graphs_enabled(),
        })
    }

    pub fn device(&self) -> &Arc<GpuDevice> {
        &self.dev
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn capacity(&self) -> Capacity {
        self.act.cap
    }

    /// Buffer (re)allocations so far: unchanged by calls within the reserved capacity.
    pub fn allocations(&self) -> usize {
        self.act.allocations
    }

    /// Turns the capture and replay of decode steps on or off (on unless `ELDER_CUDA_GRAPHS=0`).
    pub fn set_decode_graphs(&mut self, on: bool) {
        self.use_graphs = on;
        if !on {
            self.decode_graphs.clear();
        }
    }

    /// Decode steps captured so far (one per batch size and edited/base mode).
    pub fn decode_graph_count(&self) -> usize {
        self.decode_graphs.len()
    }

    /// Uploads an ELDER state to edit the model with (`None` drops it).
    pub fn set_elder(&mut self, elder: Option<&Elder>) -> Result<()> {
        self.decode_graphs.clear();
        self.elder = match elder {
            Some(e) => Some(upload_elder::<T>(&self.dev, e, self.act.cap)?),
            None => None,
        };
        Ok(())
    }

    pub fn has_elder(&self) -> bool {
        self.elder.is_some()
    }

    /// Makes the buffers big enough for `cap` (grow-only; drops the KV cache when it grows).
    pub fn reserve(&mut self, cap: Capacity) -> Result<()> {
        if !self.act.cap.covers(cap) {
            self.decode_graphs.clear();
        }
        self.act.reserve(&self.dev, &self.cfg, cap)?;
        if let Some(e) = &mut self.elder {
            e.reserve(&self.dev, cap)?;
        }
        Ok(())
    }

    /// Runs new tokens `ids [B * T]` through every block, continuing the KV cache, and leaves the
    /// final-normed hidden state of every row in the device buffers for [`Self::head`].
    pub fn forward(&mut self, ids: &[u32], shape: &BatchShape, elder: ElderStep) -> Result<()> {
        self.start(ids, shape)?;
        self.forward_device(shape, elder)
    }

    /// One decode step: every sequence of `shape` (`seq` = 1) gets one new token, `ids [B]`;
    /// returns the logits `[B, vocab]` of those tokens. `edited` keeps the prompt's ELDER routing.
    ///
    /// The first step of a batch size captures the device work (every block and the head) into a
    /// CUDA graph; later steps write the new ids and positions into the same buffers and replay it:
    /// one launch per step instead of one per kernel, and no host work between kernels.
    pub fn decode_step(
        &mut self,
        ids: &[u32],
        shape: &BatchShape,
        edited: bool,
    ) -> Result<Vec<f32>> {
        if shape.seq != 1 {
            bail!(
                "a decode step has one token per sequence, found {}",
                shape.seq
            );
        }
        self.start(ids, shape)?;
        let batch = shape.batch;
        let rows: Vec<usize> = (0..batch).collect();
        self.write_head_rows(&rows, batch)?;
        let step = if edited {
            ElderStep::Continue
        } else {
            ElderStep::Off
        };
        if !self.use_graphs {
            self.forward_device(shape, step)?;
            self.head_device(batch)?;
        } else if let Some(g) = self
            .decode_graphs
            .iter()
            .find(|g| g.batch == batch && g.edited == edited)
        {
            g.graph
                .launch()
                .context("replaying the captured decode step")?;
            self.last_rows = batch;
        } else {
            let dev = self.dev.clone();
            let graph = dev
                .capture_graph(|| {
                    self.forward_device(shape, step)?;
                    self.head_device(batch)
                })
                .context("capturing the decode step")?;
            graph
                .launch()
                .context("launching the captured decode step")?;
            self.decode_graphs.push(DecodeGraph {
                batch,
                edited,
                graph,
            });
        }
        self.download_logits(batch)
    }

    /// The device work of a forward whose inputs [`Self::start`] has written (no host writes:
    /// [`Self::decode_step`] captures it).
    fn forward_device(&mut self, shape: &BatchShape, elder: ElderStep) -> Result<()> {
        let dev = &*self.dev;
        let hook: Option<&mut dyn SiteHook<T>> = match (elder, self.elder.as_mut()) {
            (ElderStep::Off, _) => None,
            (ElderStep::Prompt(rows, ids), Some(e)) => {
                e.begin(dev, rows, shape.seq, ids)?;
                Some(e.as_mut())
            }
            (ElderStep::Continue, Some(e)) => Some(e.as_mut()),
            (_, None) => bail!("an edited forward was asked for, but no ELDER state is uploaded"),
        };
        let (cfg, w, a) = (&self.cfg, &self.weights, &mut self.act);
        let rows = shape.rows();
        let pending = embed(dev, cfg, w, a, rows)?;
        let pending = run_blocks(dev, cfg, w, a, shape, 0..cfg.num_layers, pending, hook)?;
        add_and_norm(dev, &w.final_norm, rows, cfg.hidden_size, a, pending, false)?;
        self.last_rows = rows;
        Ok(())
    }

    /// The frozen part of an edit batch: embeds `ids`, runs blocks `0..first` with `hook` on their
    /// MLP projections (the trainer reads the query there) and then the attention half of block
    /// `first`. Leaves the residual stream after that attention in `act.h`, its `norm2` in
    /// `act.normed` and the norm's statistics in `act.mean` / `act.rstd`: the input of block
    /// `first`'s MLP, the first thing an edit changes.
    pub(super) fn forward_prefix(
        &mut self,
        ids: &[u32],
        shape: &BatchShape,
        first: usize,
        hook: &mut dyn SiteHook<T>,
    ) -> Result<()> {
        let pending = self.embed_and_run(ids, shape, 0..first, first, hook)?;
        let (dev, cfg, w, a) = (&*self.dev, &self.cfg, &self.weights, &mut self.act);
        let (rows, d) = (shape.rows(), cfg.hidden_size);
        let blk = &w.blocks[first];
        add_and_norm(dev, &blk.norm1, rows, d, a, pending, true)?;
        attn_of(dev, cfg, blk, first, a, shape)
            .with_context(|| format!("block {first} attention"))?;
        add_and_norm(dev, &blk.norm2, rows, d, a, true, true)
    }

    /// Embeds `ids` and runs blocks `0..=last` with `hook` on their MLP projections, nothing after
    /// them (what reads the key store's sites).
    pub(super) fn forward_through(
        &mut self,
        ids: &[u32],
        shape: &BatchShape,
        last: usize,
        hook: &mut dyn SiteHook<T>,
    ) -> Result<()> {
        self.embed_and_run(ids, shape, 0..last + 1, last, hook)
            .map(|_| ())
    }

    /// The start of [`Self::forward_prefix`] and [`Self::forward_through`]: checks that block
    /// `reaches` exists, embeds `ids` and runs `blocks` with `hook`; returns whether the last
    /// sublayer's output is still to be added to the stream (as `run_blocks`).
    fn embed_and_run(
        &mut self,
        ids: &[u32],
        shape: &BatchShape,
        blocks: std::ops::Range<usize>,
        reaches: usize,
        hook: &mut dyn SiteHook<T>,
    ) -> Result<bool> {
        if reaches >= self.cfg.num_layers {
            bail!(
                "block {reaches} is past the model's {} blocks",
                self.cfg.num_layers
            );
        }
        self.start(ids, shape)?;
        // The head must not read these rows as if a whole forward had run.
        self.last_rows = 0;
        let (dev, cfg, w, a) = (&*self.dev, &self.cfg, &self.weights, &mut self.act);
        let pending = embed(dev, cfg, w, a, shape.rows())?;
        run_blocks(dev, cfg, w, a, shape, blocks, pending, Some(hook))
    }

    /// Checks a call and writes its per-row and per-sequence inputs to the device.
    fn start(&mut self, ids: &[u32], shape: &BatchShape) -> Result<()> {
        check_shape(shape, self.act.cap, &self.cfg)?;
        if ids.len() != shape.rows() {
            bail!(
                "{} token ids for a {} x {} batch",
                ids.len(),
                shape.batch,
                shape.seq
            );
        }
        let dev = &*self.dev;
        let a = &mut self.act;
        write(dev, &mut a.ids, ids, "token ids")?;
        write(dev, &mut a.positions, &shape.positions(), "positions")?;
        write(
            dev,
            &mut a.q_start,
            &to_i32("start", &shape.start)?,
            "q_start",
        )?;
        write(
            dev,
            &mut a.q_valid,
            &to_i32("valid", &shape.valid)?,
            "q_valid",
        )
    }

    /// Logits `[rows.len(), vocab]` (as f32) of the chosen rows of the last forward call.
    pub fn head(&mut self, rows: &[usize]) -> Result<Vec<f32>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        self.write_head_rows(rows, self.last_rows)?;
        self.head_device(rows.len())?;
        self.download_logits(rows.len())
    }

    /// Writes the rows the head reads; each must be below `limit`, the rows of the forward call.
    fn write_head_rows(&mut self, rows: &[usize], limit: usize) -> Result<()> {
        if let Some(&r) = rows.iter().find(|&&r| r >= limit) {
            bail!("head row {r} is outside the forward call's {limit} rows");
        }
        write(
            &self.dev,
            &mut self.act.head_rows,
            &to_u32("head row", rows)?,
            "head rows",
        )
    }

    /// Gathers the first `n` rows named in `act.head_rows` (an embedding lookup into the normed
    /// activations), then one GEMM into `act.logits`.
    fn head_device(&mut self, n: usize) -> Result<()> {
        let (dev, a, cfg) = (&*self.dev, &mut self.act, &self.cfg);
        let (d, vocab) = (cfg.hidden_size, cfg.vocab_size);
        elementwise::embedding(
            dev,
            &a.head_rows,
            n,
            &a.normed,
            self.last_rows,
            d,
            &mut a.head_in,
        )?;
        let (head_w, layout): (&CudaSlice<T>, Layout) = self.weights.head_weight();
        gemm::matmul(
            dev,
            &a.head_in,
            n,
            head_w,
            d,
            vocab,
            layout,
            &mut a.logits,
            false,
        )
    }

    fn download_logits(&self, n: usize) -> Result<Vec<f32>> {
        let vocab = self.cfg.vocab_size;
        self.dev
            .download_f32::<T, _>(&self.act.logits.slice(0..n * vocab))
    }

    /// In-scope flags and code distances of the current ELDER request (empty without one).
    pub fn elder_scope(&self) -> Result<(Vec<bool>, Vec<Option<u32>>)> {
        let r = self.elder_report()?;
        Ok((r.in_scope, r.distances))
    }

    /// What the current ELDER request decided, as the CPU reports it (empty without one).
    pub fn elder_report(&self) -> Result<Routed> {
        match &self.elder {
            Some(e) => e.report(&self.dev),
            None => Ok(Routed::default()),
        }
    }
}

/// Token embeddings of `rows` rows into `act.h`; GPT-2's position rows go to `act.delta`, which
/// the first norm adds (returns whether such a pending delta exists).
fn embed<T: KernelDtype>(
    dev: &GpuDevice,
    cfg: &ModelConfig,
    w: &GpuWeights<T>,
    a: &mut Activations<T>,
    rows: usize,
) -> Result<bool> {
    elementwise::embedding(
        dev,
        &a.ids,
        rows,
        &w.embed,
        cfg.vocab_size,
        cfg.hidden_size,
        &mut a.h,
    )?;
    let Some(pos) = &w.pos_embed else {
        return Ok(false);
    };
    elementwise::embedding(
        dev,
        &a.positions,
        rows,
        pos,
        cfg.max_positions,
        cfg.hidden_size,
        &mut a.delta,
    )?;
    Ok(true)
}

/// Blocks `blocks` in order, each `h += attn(norm1(h)); h += mlp(norm2(h))` with the last add left
/// pending in `act.delta` (the next norm fuses it). Returns `true`: a delta is pending.
#[allow(clippy::too_many_arguments)]
fn run_blocks<T: KernelDtype>(
    dev: &GpuDevice,
    cfg: &ModelConfig,
    w: &GpuWeights<T>,
    a: &mut Activations<T>,
    shape: &BatchShape,
    blocks: std::ops::Range<usize>,
    mut pending: bool,
    mut hook: Option<&mut dyn SiteHook<T>>,
) -> Result<bool>
where
    CudaBlas: Gemm<T>,
{
    let rows = shape.rows();
    for l in blocks {
        let blk = &w.blocks[l];
        add_and_norm(dev, &blk.norm1, rows, cfg.hidden_size, a, pending, true)?;
        attn_of(dev, cfg, blk, l, a, shape).with_context(|| format!("block {l} attention"))?;
        add_and_norm(dev, &blk.norm2, rows, cfg.hidden_size, a, true, true)?;
        // A fresh reborrow per block (`as_deref_mut` would tie it to the hook's own lifetime).
        let block_hook: Option<&mut dyn SiteHook<T>> = match &mut hook {
            Some(h) => Some(&mut **h),
            None => None,
        };
        let io = MlpIo {
            x: &a.normed,
            first: &mut a.ffn_a,
            up: &mut a.ffn_b,
            keep_pre: None,
            act: &mut a.act,
            out: &mut a.delta,
        };
        mlp_half(dev, blk, l, shape, io, block_hook).with_context(|| format!("block {l} MLP"))?;
        pending = true;
    }
    Ok(pending)
}

/// The pre-norm of a sublayer, fused with the residual add of the previous one:
/// with `pending`, `h <- h + delta` (into `h_next`, then swapped) and `normed = norm(h)`;
/// without, `normed = norm(h)`. `keep_sum = false` skips writing the sum (the final norm).
fn add_and_norm<T: KernelDtype>(
    dev: &GpuDevice,
    norm: &Norm<CudaSlice<T>>,
    rows: usize,
    d: usize,
    a: &mut Activations<T>,
    pending: bool,
    keep_sum: bool,
) -> Result<()> {
    let (x, residual) = if pending {
        (&a.delta, Some(&a.h))
    } else {
        (&a.h, None)
    };
    let io = NormIo {
        rows,
        d,
        x,
        residual,
        sum_out: (pending && keep_sum).then_some(&mut a.h_next),
        out: &mut a.normed,
        mean: &mut a.mean,
        rstd: &mut a.rstd,
    };
    norm.forward(dev, io)?;
    if pending && keep_sum {
        std::mem::swap(&mut a.h, &mut a.h_next);
    }
    Ok(())
}

/// Block `l`'s attention half on the inference buffers: `delta = attention(normed)`, this call's
/// keys and values appended to the layer's cache.
fn attn_of<T: KernelDtype>(
    dev: &GpuDevice,
    cfg: &ModelConfig,
    blk: &Block<CudaSlice<T>>,
    l: usize,
    a: &mut Activations<T>,
    shape: &BatchShape,
) -> Result<()>
where
    CudaBlas: Gemm<T>,
{
    let rows = CallRows {
        shape,
        positions: &a.positions,
        q_start: &a.q_start,
        q_valid: &a.q_valid,
    };
    let io = AttnIo {
        x: &a.normed,
        q: &mut a.q,
        k: &mut a.k_new,
        v: &mut a.v_new,
        keys: Keys::Cache {
            k: &mut a.cache_k[l],
            v: &mut a.cache_v[l],
            cap: a.cap.seq,
        },
        att: &mut a.att,
        lse: None,
        out: &mut a.delta,
    };
    attn_half(dev, cfg, blk, &rows, io)
}
