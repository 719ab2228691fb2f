//! Launchers for `kernels/attention.cu`: causal attention over a padded batch with a KV cache and
//! grouped-query heads. The forward of a prefill runs the tiled (FlashAttention-style) kernel and
//! saves the log-sum-exp; decode and very short queries run the row kernel (one warp per query
//! row); the backward is tiled over keys and recomputes the probabilities.
//! CPU twins: `ops::attention` / `ops::attention_backward` with the same [`AttnShape`] semantics.

use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};

use super::buffers::{as_i32, input, opt_output, output, KernelDtype};
use super::device::{GpuDevice, KArg};
use super::KernelFamily;
use crate::backend::cpu::ops::AttnShape;

const FAMILY: KernelFamily = KernelFamily::Attention;

/// Must match MAX_SLOTS * 32 in attention.cu.
pub const MAX_HEAD_DIM: usize = 256;
const WARPS_PER_BLOCK: usize = 4;
/// Queries shorter than this use the row kernel: a tile of mostly empty rows would waste its block.
const MIN_TILED_Q_LEN: usize = 4;
/// Threads of a tiled block (TILE_THREADS in attention.cu).
const TILE_THREADS: u32 = 128;

/// The tiled kernels' tile sizes, mirroring `Tiles<SLOTS>` in attention.cu: SLOTS (head_dim / 32
/// rounded up to 4 or 8) picks the instantiation, BC keys per tile, FWD_BR / BWD_BR query rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TileShape {
    slots: usize,
    bc: usize,
    fwd_br: usize,
    bwd_br: usize,
}

impl TileShape {
    fn for_head_dim(head_dim: usize) -> Self {
        let slots = if head_dim <= 128 { 4 } else { 8 };
        Self {
            slots,
            bc: 128 / slots,
            fwd_br: 64 / slots,
            bwd_br: 32 / slots,
        }
    }
}

/// The dimensions of an attention call; the per-sequence `q_start` / `q_valid` live on the device
/// (i32 `[batch]`) so a captured CUDA graph can replay with new positions.
#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    pub batch: usize,
    pub q_len: usize,
    pub kv_capacity: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttnDims {
    fn validate(&self) -> Result<()> {
        if self.head_dim == 0 || self.head_dim > MAX_HEAD_DIM {
            bail!(
                "attention: head_dim must be in 1..={MAX_HEAD_DIM}, found {}",
                self.head_dim
            );
        }
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            bail!(
                "attention: n_heads {} must be a multiple of n_kv_heads {}",
                self.n_heads,
                self.n_kv_heads
            );
        }
        if self.batch == 0 || self.q_len == 0 || self.kv_capacity == 0 {
            bail!("attention: empty shape {self:?}");
        }
        Ok(())
    }

    fn q_elems(&self) -> usize {
        self.batch * self.q_len * self.n_heads * self.head_dim
    }

    fn kv_elems(&self) -> usize {
        self.batch * self.kv_capacity * self.n_kv_heads * self.head_dim
    }

    fn lse_elems(&self) -> usize {
        self.batch * self.n_heads * self.q_len
    }

    fn tiles(&self) -> TileShape {
        TileShape::for_head_dim(self.head_dim)
    }

    /// One block per (b, h, tile of query rows).
    fn tiled_fwd_cfg(&self) -> LaunchConfig {
        let t = self.tiles();
        let blocks = self.batch * self.n_heads * self.q_len.div_ceil(t.fwd_br);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (TILE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// One block per (b, h, tile of keys).
    fn tiled_bwd_cfg(&self) -> LaunchConfig {
        let t = self.tiles();
        let blocks = self.batch * self.n_heads * self.kv_capacity.div_ceil(t.bc);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (TILE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn cfg(&self) -> LaunchConfig {
        let warps = self.batch * self.q_len * self.n_heads;
        LaunchConfig {
            grid_dim: (warps.div_ceil(WARPS_PER_BLOCK) as u32, 1, 1),
            block_dim: (32 * WARPS_PER_BLOCK as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn args(&self) -> Result<[KArg; 7]> {
        Ok([
            KArg::I32(as_i32("batch", self.batch)?),
            KArg::I32(as_i32("q_len", self.q_len)?),
            KArg::I32(as_i32("kv_capacity", self.kv_capacity)?),
            KArg::I32(as_i32("n_heads", self.n_heads)?),
            KArg::I32(as_i32("n_kv_heads", self.n_kv_heads)?),
            KArg::I32(as_i32("head_dim", self.head_dim)?),
            KArg::F32(1.0 / (self.head_dim as f32).sqrt()),
        ])
    }
}

/// Validates a host [`AttnShape`] and uploads its `q_start` / `q_valid` as i32 device arrays.
pub fn upload_positions(
    dev: &GpuDevice,
    s: &AttnShape,
) -> Result<(AttnDims, CudaSlice<i32>, CudaSlice<i32>)> {
    if s.q_start.len() != s.batch || s.q_valid.len() != s.batch {
        bail!(
            "attention: q_start has {} and q_valid {} entries, expected batch = {}",
            s.q_start.len(),
            s.q_valid.len(),
            s.batch
        );
    }
    for b in 0..s.batch {
        if s.q_valid[b] > s.q_len || s.q_start[b] + s.q_valid[b] > s.kv_capacity {
            bail!(
                "attention: sequence {b} has q_start {} + q_valid {} beyond kv_capacity {} (q_len {})",
                s.q_start[b],
                s.q_valid[b],
                s.kv_capacity,
                s.q_len
            );
        }
    }
    let to_i32 = |v: &[usize]| {
        v.iter()
            .map(|&x| as_i32("position", x))
            .collect::<Result<Vec<i32>>>()
    };
    let dims = AttnDims {
        batch: s.batch,
        q_len: s.q_len,
        kv_capacity: s.kv_capacity,
        n_heads: s.n_heads,
        n_kv_heads: s.n_kv_heads,
        head_dim: s.head_dim,
    };
    Ok((
        dims,
        dev.upload(&to_i32(s.q_start)?)?,
        dev.upload(&to_i32(s.q_valid)?)?,
    ))
}

/// Forward: `out [B, Tq, H*D]` (padding rows zero) and, when given, `lse [B, H, Tq]` for the backward.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<T: KernelDtype, L: DevicePtrMut<f32>>(
    dev: &GpuDevice,
    dims: AttnDims,
    q_start: &impl DevicePtr<i32>,
    q_valid: &impl DevicePtr<i32>,
    q: &impl DevicePtr<T>,
    k: &impl DevicePtr<T>,
    v: &impl DevicePtr<T>,
    out: &mut impl DevicePtrMut<T>,
    lse: Option<&mut L>,
) -> Result<()> {
    dims.validate()?;
    let s = dev.stream();
    let (pq, _g1) = input(s, "attention q [B, Tq, H*D]", q, dims.q_elems())?;
    let (pk, _g2) = input(s, "attention k [B, Cap, Hkv*D]", k, dims.kv_elems())?;
    let (pv, _g3) = input(s, "attention v [B, Cap, Hkv*D]", v, dims.kv_elems())?;
    let (ps, _g4) = input(s, "attention q_start [B]", q_start, dims.batch)?;
    let (pn, _g5) = input(s, "attention q_valid [B]", q_valid, dims.batch)?;
    let (po, _g6) = output(s, "attention out [B, Tq, H*D]", out, dims.q_elems())?;
    let (pl, _g7) = opt_output(s, "attention lse [B, H, Tq]", lse, dims.lse_elems())?;
    let mut args = vec![pq, pk, pv, ps, pn];
    args.extend(dims.args()?);
    args.extend([po, pl]);
    let (name, cfg) = if dims.q_len >= MIN_TILED_Q_LEN {
        let slots = dims.tiles().slots;
        (
            format!("attention_tiled_fwd_{}_s{slots}", T::SUFFIX),
            dims.tiled_fwd_cfg(),
        )
    } else {
        (format!("attention_fwd_{}", T::SUFFIX), dims.cfg())
    };
    // SAFETY: shapes validated and buffer lengths checked above; the row and the tiled forward
    // take the same arguments.
    unsafe { dev.launch(FAMILY, &name, cfg, &args) }
}

/// Decode step: one new query per sequence (`dims.q_len` must be 1) over the KV cache.
#[allow(clippy::too_many_arguments)]
pub fn attention_decode<T: KernelDtype>(
    dev: &GpuDevice,
    dims: AttnDims,
    q_start: &impl DevicePtr<i32>,
    q_valid: &impl DevicePtr<i32>,
    q: &impl DevicePtr<T>,
    k: &impl DevicePtr<T>,
    v: &impl DevicePtr<T>,
    out: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    if dims.q_len != 1 {
        bail!("attention_decode: q_len must be 1, found {}", dims.q_len);
    }
    attention_forward::<T, CudaSlice<f32>>(dev, dims, q_start, q_valid, q, k, v, out, None)
}

/// Gradients accumulated (+=) into f32 `dq [B, Tq, H*D]`, `dk`, `dv [B, Cap, Hkv*D]`.
pub struct AttnGrads<'a, G> {
    pub dq: &'a mut G,
    pub dk: &'a mut G,
    pub dv: &'a mut G,
}

/// Backward from the forward's `out` and `lse`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: KernelDtype, X: DevicePtr<T>, G: DevicePtrMut<f32>>(
    dev: &GpuDevice,
    dims: AttnDims,
    q_start: &impl DevicePtr<i32>,
    q_valid: &impl DevicePtr<i32>,
    q: &X,
    k: &X,
    v: &X,
    out: &X,
    dout: &X,
    lse: &impl DevicePtr<f32>,
    grads: AttnGrads<'_, G>,
) -> Result<()> {
    dims.validate()?;
    let s = dev.stream();
    let (pq, _g1) = input(s, "attention q", q, dims.q_elems())?;
    let (pk, _g2) = input(s, "attention k", k, dims.kv_elems())?;
    let (pv, _g3) = input(s, "attention v", v, dims.kv_elems())?;
    let (po, _g4) = input(s, "attention out", out, dims.q_elems())?;
    let (pdo, _g5) = input(s, "attention dout", dout, dims.q_elems())?;
    let (pl, _g6) = input(s, "attention lse [B, H, Tq]", lse, dims.lse_elems())?;
    let (ps, _g7) = input(s, "attention q_start [B]", q_start, dims.batch)?;
    let (pn, _g8) = input(s, "attention q_valid [B]", q_valid, dims.batch)?;
    let (pdq, _g9) = output(s, "attention dq", grads.dq, dims.q_elems())?;
    let (pdk, _g10) = output(s, "attention dk", grads.dk, dims.kv_elems())?;
    let (pdv, _g11) = output(s, "attention dv", grads.dv, dims.kv_elems())?;
    let mut args = vec![pq, pk, pv, po, pdo, pl, ps, pn];
    args.extend(dims.args()?);
    args.extend([pdq, pdk, pdv]);
    let name = format!("attention_tiled_bwd_{}_s{}", T::SUFFIX, dims.tiles().slots);
    // SAFETY: shapes validated and buffer lengths checked above; arguments match
    // attention_tiled_bwd_{T}_s{SLOTS}.
    unsafe { dev.launch(FAMILY, &name, dims.tiled_bwd_cfg(), &args) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> AttnDims {
        AttnDims {
            batch: 2,
            q_len: 3,
            kv_capacity: 8,
            n_heads,
            n_kv_heads,
            head_dim,
        }
    }

    #[test]
    fn unsupported_shapes_are_rejected_on_the_host() {
        assert!(dims(8, 2, 64).validate().is_ok());
        assert!(dims(8, 2, 40).validate().is_ok(), "generic head_dim");
        assert!(
            dims(8, 3, 64).validate().is_err(),
            "heads not a multiple of kv heads"
        );
        assert!(dims(8, 2, MAX_HEAD_DIM + 32).validate().is_err());
    }

    #[test]
    fn tiles_follow_the_head_dim() {
        let small = TileShape::for_head_dim(64);
        assert_eq!(
            (small.slots, small.bc, small.fwd_br, small.bwd_br),
            (4, 32, 16, 8)
        );
        assert_eq!(TileShape::for_head_dim(128), small);
        let large = TileShape::for_head_dim(129);
        assert_eq!(
            (large.slots, large.bc, large.fwd_br, large.bwd_br),
            (8, 16, 8, 4)
        );
        // 2 sequences x 8 heads x ceil(3 / 16) query tiles; ceil(8 / 32) key tiles.
        assert_eq!(dims(8, 2, 64).tiled_fwd_cfg().grid_dim, (16, 1, 1));
        assert_eq!(dims(8, 2, 64).tiled_bwd_cfg().grid_dim, (16, 1, 1));
        assert_eq!(dims(8, 2, 200).tiled_bwd_cfg().grid_dim, (16, 1, 1));
    }

    #[test]
    fn one_warp_per_query_row() {
        let d = dims(8, 2, 64);
        // 2 * 3 * 8 = 48 warps in blocks of 4.
        assert_eq!(d.cfg().grid_dim, (12, 1, 1));
        assert_eq!(d.cfg().block_dim, (128, 1, 1));
    }
}
