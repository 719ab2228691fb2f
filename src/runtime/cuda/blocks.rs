//! The one block walk of the CUDA runtime: each half-block (`Model::attn_half`,
//! `Model::mlp_half` on the CPU) written once, for the inference forward ([`super::forward`]: KV
//! cache, ELDER's routing as the site hook) and for the edit step's training forward
//! ([`super::train`]: the tapes its backward reads, the trained experts as the site hook).
//!
//! The caller names the buffers a half-block writes: the inference forward passes its
//! preallocated activations, the training forward the tapes of that block, so what the backward
//! needs is written where it reads it and nothing is copied. The residual add is the caller's
//! (fused into the next norm, [`super::weights::NormIo`]).

use anyhow::Result;
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaSlice;

use crate::backend::cuda::attention::{self, AttnDims};
use crate::backend::cuda::buffers::KernelDtype;
use crate::backend::cuda::device::GpuDevice;
use crate::backend::cuda::elementwise::{self, KvAppend};
use crate::model::layers::{Mlp, MlpProj, Site};
use crate::model::transformer::Block;
use crate::model::{Arch, BatchShape, ModelConfig};

use super::weights::qkv;

/// A hook on the MLP projections of the device forward, the CUDA side of `model::Adapter`:
/// [`super::elder::GpuElder`] mixes its experts in here, the trainer's query capture reads the
/// query here, the training forward adds the experts it trains.
pub trait SiteHook<T: KernelDtype> {
    /// Called right after the frozen product at `site` (for GPT-2's c_fc before its bias, see
    /// [`mlp_half`]); `x` is the projection's input `[rows, in]`, `out` its output `[rows, out]`.
    fn after_linear(
        &mut self,
        dev: &GpuDevice,
        site: Site,
        shape: &BatchShape,
        x: &CudaSlice<T>,
        out: &mut CudaSlice<T>,
    ) -> Result<()>;
}

/// The per-row and per-sequence inputs of a call, on the device: each row's position (RoPE), and
/// each sequence's first new row in the cache and its number of valid rows (attention's mask).
pub struct CallRows<'a> {
    pub shape: &'a BatchShape,
    pub positions: &'a CudaSlice<u32>,
    pub q_start: &'a CudaSlice<i32>,
    pub q_valid: &'a CudaSlice<i32>,
}

/// Where an attention half finds the keys and values it attends to.
pub enum Keys<'a, T: KernelDtype> {
    /// Inference: this call's keys and values are appended to the layer's cache (`cap` rows per
    /// sequence) and attention reads the whole cache (prefill and decode alike).
    Cache {
        k: &'a mut CudaSlice<T>,
        v: &'a mut CudaSlice<T>,
        cap: usize,
    },
    /// Training: the cache starts empty, so this call's own rows are every key; the tape keeps
    /// them for the backward.
    OwnRows,
}

/// The buffers of one attention half: `out = o_proj(attention(rope(q), rope(k), v))` of `x`.
pub struct AttnIo<'a, T: KernelDtype> {
    pub x: &'a CudaSlice<T>,
    pub q: &'a mut CudaSlice<T>,
    pub k: &'a mut CudaSlice<T>,
    pub v: &'a mut CudaSlice<T>,
    pub keys: Keys<'a, T>,
    /// Attention output before `o_proj` `[rows, q_dim]`.
    pub att: &'a mut CudaSlice<T>,
    /// Each query's log-sum-exp, kept for a backward (training).
    pub lse: Option<&'a mut CudaSlice<f32>>,
    pub out: &'a mut CudaSlice<T>,
}

/// `io.out = o_proj(attention(rope(q), rope(k), v))` of `io.x` for block `blk`, as
/// `Model::attn_half`.
pub fn attn_half<T: KernelDtype>(
    dev: &GpuDevice,
    cfg: &ModelConfig,
    blk: &Block<CudaSlice<T>>,
    rows: &CallRows<'_>,
    io: AttnIo<'_, T>,
) -> Result<()>
where
    CudaBlas: Gemm<T>,
{
    let shape = rows.shape;
    let n = shape.rows();
    let (q, k, v) = qkv(blk)?;
    q.forward(dev, io.x, n, &mut *io.q)?;
    k.forward(dev, io.x, n, &mut *io.k)?;
    v.forward(dev, io.x, n, &mut *io.v)?;
    if cfg.arch == Arch::Llama {
        let (hd, theta) = (cfg.head_dim, cfg.rope_theta);
        let pos = rows.positions;
        elementwise::rope(dev, &mut *io.q, pos, n, cfg.num_heads, hd, theta, false)?;
        elementwise::rope(dev, &mut *io.k, pos, n, cfg.num_kv_heads, hd, theta, false)?;
    }
    let (keys, values, kv_capacity): (&CudaSlice<T>, &CudaSlice<T>, usize) = match io.keys {
        Keys::Cache {
            k: cache_k,
            v: cache_v,
            cap,
        } => {
            let append = KvAppend {
                batch: shape.batch,
                seq: shape.seq,
                cap,
                width: cfg.kv_dim(),
            };
            elementwise::kv_append(dev, append, &*io.k, rows.q_start, rows.q_valid, cache_k)?;
            elementwise::kv_append(dev, append, &*io.v, rows.q_start, rows.q_valid, cache_v)?;
            (&*cache_k, &*cache_v, cap)
        }
        Keys::OwnRows => (&*io.k, &*io.v, shape.seq),
    };
    let dims = AttnDims {
        batch: shape.batch,
        q_len: shape.seq,
        kv_capacity,
        n_heads: cfg.num_heads,
        n_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
    };
    attention::attention_forward::<T, CudaSlice<f32>>(
        dev,
        dims,
        rows.q_start,
        rows.q_valid,
        &*io.q,
        keys,
        values,
        &mut *io.att,
        io.lse,
    )?;
    blk.o_proj.forward(dev, &*io.att, n, io.out)
}

/// The buffers of one MLP half.
pub struct MlpIo<'a, T: KernelDtype> {
    /// The MLP's input (its norm's output) `[rows, d]`.
    pub x: &'a CudaSlice<T>,
    /// GPT-2: c_fc's product before its bias; Llama: gate's output (the pre-activation the
    /// backward reads).
    pub first: &'a mut CudaSlice<T>,
    /// Llama: up's output (unused by GPT-2).
    pub up: &'a mut CudaSlice<T>,
    /// GPT-2: where bias + GELU also keeps its pre-activation, for a backward (training).
    pub keep_pre: Option<&'a mut CudaSlice<T>>,
    /// The output projection's input `[rows, intermediate]`.
    pub act: &'a mut CudaSlice<T>,
    pub out: &'a mut CudaSlice<T>,
}

/// `io.out = mlp(io.x)` of block `l`, `hook` after every projection, as `Model::mlp_half`. GPT-2's
/// c_fc bias is added inside bias + GELU, after the hook: ELDER's mixture joins the product before
/// the bias instead of after it, the same sum.
pub fn mlp_half<T: KernelDtype>(
    dev: &GpuDevice,
    blk: &Block<CudaSlice<T>>,
    l: usize,
    shape: &BatchShape,
    io: MlpIo<'_, T>,
    mut hook: Option<&mut dyn SiteHook<T>>,
) -> Result<()>
where
    CudaBlas: Gemm<T>,
{
    let rows = shape.rows();
    let mut adapt = |proj, x: &CudaSlice<T>, out: &mut CudaSlice<T>| match hook.as_deref_mut() {
        Some(h) => h.after_linear(dev, Site { block: l, proj }, shape, x, out),
        None => Ok(()),
    };
    match &blk.mlp {
        Mlp::Gpt2 { c_fc, c_proj } => {
            c_fc.product(dev, io.x, rows, &mut *io.first)?;
            adapt(MlpProj::CFc, io.x, &mut *io.first)?;
            elementwise::bias_gelu(
                dev,
                &*io.first,
                c_fc.bias.as_ref(),
                io.keep_pre,
                &mut *io.act,
                rows,
                c_fc.out_dim,
            )?;
            c_proj.forward(dev, &*io.act, rows, &mut *io.out)?;
            adapt(MlpProj::CProj, io.act, io.out)
        }
        Mlp::Llama { gate, up, down } => {
            gate.forward(dev, io.x, rows, &mut *io.first)?;
            adapt(MlpProj::GateProj, io.x, &mut *io.first)?;
            up.forward(dev, io.x, rows, &mut *io.up)?;
            adapt(MlpProj::UpProj, io.x, &mut *io.up)?;
            elementwise::silu_mul(dev, &*io.first, &*io.up, &mut *io.act, rows * gate.out_dim)?;
            down.forward(dev, &*io.act, rows, &mut *io.out)?;
            adapt(MlpProj::DownProj, io.act, io.out)
        }
    }
}
