//! Launchers for `kernels/lora.cu`: the batched MoLoRA mixture of one site (forward: shrink,
//! gate and expand-and-add in one launch; backward: dh, dgates, dB, dA, dx). Every sequence has its own k experts, gates,
//! in-scope flag and first changed row; out-of-scope sequences, and the rows of a sequence before
//! its first changed row, leave the output untouched.
//! CPU twins: `ops::molora_forward` / `ops::molora_backward` (`backend/cpu/ops/lora.rs`) (same [`MixShape`]).

use anyhow::{bail, Result};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};

use super::buffers::{as_i32, input, opt_input, opt_output, output, KernelDtype};
use super::device::{GpuDevice, KArg};
use super::KernelFamily;
use crate::backend::shapes::MixShape;

const FAMILY: KernelFamily = KernelFamily::Lora;

/// Limits compiled into lora.cu (MAX_RANK, MAX_K, TOKENS_PER_BLOCK).
pub const MAX_RANK: usize = 32;
pub const MAX_K: usize = 8;
const TOKENS_PER_BLOCK: usize = 8;
const THREADS: u32 = 256;

/// One MoLoRA site: the mixture shape plus the number of experts its A/B tensors hold.
#[derive(Debug, Clone, Copy)]
pub struct LoraSite {
    pub shape: MixShape,
    pub n_experts: usize,
}

impl LoraSite {
    fn validate(&self) -> Result<()> {
        let s = &self.shape;
        if s.rank == 0 || s.rank > MAX_RANK {
            bail!("lora: rank must be in 1..={MAX_RANK}, found {}", s.rank);
        }
        if s.k == 0 || s.k > MAX_K || s.k > self.n_experts {
            bail!(
                "lora: k must be in 1..={} (and <= {} experts), found {}",
                MAX_K,
                self.n_experts,
                s.k
            );
        }
        if s.batch == 0 || s.seq == 0 || s.d_in == 0 || s.d_out == 0 {
            bail!("lora: empty shape {s:?}");
        }
        Ok(())
    }

    fn per_token_cfg(&self) -> LaunchConfig {
        let s = &self.shape;
        LaunchConfig {
            grid_dim: (
                (s.batch * s.k) as u32,
                s.seq.div_ceil(TOKENS_PER_BLOCK) as u32,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn per_column_cfg(&self, rows: usize, d: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, d.div_ceil(THREADS as usize) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn dims(&self, d: usize) -> Result<[KArg; 6]> {
        let s = &self.shape;
        Ok([
            KArg::I32(as_i32("batch", s.batch)?),
            KArg::I32(as_i32("seq", s.seq)?),
            KArg::I32(as_i32("d", d)?),
            KArg::I32(as_i32("rank", s.rank)?),
            KArg::I32(as_i32("k", s.k)?),
            KArg::I32(as_i32("n_experts", self.n_experts)?),
        ])
    }
}

/// Column chunks per token of the one-launch forward: enough blocks to give every SM one when the
/// tokens alone are too few (decode), never chunks under one block's width of columns. Each chunk
/// repeats its token's shrink, so with enough tokens there is one chunk per token.
pub fn forward_chunks(sm_count: u32, tokens: usize, d_out: usize) -> usize {
    let by_sms = (sm_count as usize).div_ceil(tokens.max(1));
    by_sms.clamp(1, d_out.div_ceil(THREADS as usize).max(1))
}

/// `out [B, T, d_out] += in_scope * sum_j gates * scale * (x A_e) B_e`, in one launch. When
/// `shrink` is given it receives `x A_e` `[B, k, T, r]` (f32, zeros for out-of-scope sequences) for
/// the backward; inference passes `None`. `in_scope = None` means every sequence is in scope
/// (training). `first_row` `[B]`: the rows of sequence b before `first_row[b]` are left as if it
/// were out of scope (`expert_rows = "answer"`); `None`: every row is changed.
#[allow(clippy::too_many_arguments)]
pub fn lora_forward<T: KernelDtype, S: DevicePtrMut<f32>>(
    dev: &GpuDevice,
    site: LoraSite,
    x: &impl DevicePtr<T>,
    a: &impl DevicePtr<f32>,
    b: &impl DevicePtr<f32>,
    experts: &impl DevicePtr<u32>,
    gates: &impl DevicePtr<f32>,
    in_scope: Option<&impl DevicePtr<u8>>,
    first_row: Option<&impl DevicePtr<u32>>,
    shrink: Option<&mut S>,
    out: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    site.validate()?;
    let s = site.shape;
    let (bt, bk, e) = (s.batch * s.seq, s.batch * s.k, site.n_experts);
    let st = dev.stream();
    let (px, _g1) = input(st, "lora x [B, T, d_in]", x, bt * s.d_in)?;
    let (pa, _g2) = input(st, "lora A [E, d_in, r]", a, e * s.d_in * s.rank)?;
    let (pb, _g3) = input(st, "lora B [E, r, d_out]", b, e * s.rank * s.d_out)?;
    let (pe, _g4) = input(st, "lora experts [B, k]", experts, bk)?;
    let (pg, _g5) = input(st, "lora gates [B, k]", gates, bk)?;
    let (pi, _g6) = opt_input(st, "lora in_scope [B]", in_scope, s.batch)?;
    let (pf, _g6b) = opt_input(st, "lora first_row [B]", first_row, s.batch)?;
    let (ph, _g7) = opt_output(st, "lora shrink [B, k, T, r]", shrink, bk * s.seq * s.rank)?;
    let (po, _g8) = output(st, "lora out [B, T, d_out]", out, bt * s.d_out)?;
    let args = [
        px,
        pa,
        pb,
        pe,
        pg,
        pi,
        pf,
        KArg::I32(as_i32("batch", s.batch)?),
        KArg::I32(as_i32("seq", s.seq)?),
        KArg::I32(as_i32("d_in", s.d_in)?),
        KArg::I32(as_i32("d_out", s.d_out)?),
        KArg::I32(as_i32("rank", s.rank)?),
        KArg::I32(as_i32("k", s.k)?),
        KArg::I32(as_i32("n_experts", e)?),
        KArg::F32(s.scale),
        ph,
        po,
    ];
    let cfg = LaunchConfig {
        grid_dim: (
            bt as u32,
            forward_chunks(dev.sm_count(), bt, s.d_out) as u32,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: shapes validated and buffer lengths checked above; arguments match lora_forward_{T}
    // (which needs THREADS = 256 threads per block).
    unsafe { dev.launch(FAMILY, &format!("lora_forward_{}", T::SUFFIX), cfg, &args) }
}

/// Gradient buffers of [`lora_backward`]: `da [E, d_in, r]`, `db [E, r, d_out]` are accumulated
/// (f32 atomics), `dgates [B, k]` is written, `dx [B, T, d_in]` is accumulated when given.
pub struct LoraGrads<'a, G, X> {
    pub da: &'a mut G,
    pub db: &'a mut G,
    pub dgates: &'a mut G,
    pub dx: Option<&'a mut X>,
}

/// Backward of [`lora_forward`] with the same `in_scope` and `first_row`. `shrink` is what the
/// forward saved; `dh_raw` is f32 scratch of `B * k * T * r` elements (see [`super::Workspace`]).
#[allow(clippy::too_many_arguments)]
pub fn lora_backward<T: KernelDtype, G: DevicePtrMut<f32>, X: DevicePtrMut<T>>(
    dev: &GpuDevice,
    site: LoraSite,
    x: &impl DevicePtr<T>,
    a: &impl DevicePtr<f32>,
    b: &impl DevicePtr<f32>,
    experts: &impl DevicePtr<u32>,
    gates: &impl DevicePtr<f32>,
    in_scope: Option<&impl DevicePtr<u8>>,
    first_row: Option<&impl DevicePtr<u32>>,
    shrink: &impl DevicePtr<f32>,
    dout: &impl DevicePtr<T>,
    dh_raw: &mut impl DevicePtrMut<f32>,
    grads: LoraGrads<'_, G, X>,
) -> Result<()> {
    site.validate()?;
    let s = site.shape;
    let (bt, bk, e) = (s.batch * s.seq, s.batch * s.k, site.n_experts);
    let low = bk * s.seq * s.rank;
    let st = dev.stream();
    let (px, _g1) = input(st, "lora x [B, T, d_in]", x, bt * s.d_in)?;
    let (pa, _g2) = input(st, "lora A [E, d_in, r]", a, e * s.d_in * s.rank)?;
    let (pb, _g3) = input(st, "lora B [E, r, d_out]", b, e * s.rank * s.d_out)?;
    let (pe, _g4) = input(st, "lora experts [B, k]", experts, bk)?;
    let (pg, _g5) = input(st, "lora gates [B, k]", gates, bk)?;
    let (pi, _g6) = opt_input(st, "lora in_scope [B]", in_scope, s.batch)?;
    let (pf, _g6b) = opt_input(st, "lora first_row [B]", first_row, s.batch)?;
    let (ph, _g7) = input(st, "lora shrink [B, k, T, r]", shrink, low)?;
    let (pdo, _g8) = input(st, "lora dout [B, T, d_out]", dout, bt * s.d_out)?;
    let (pdh, _g9) = output(st, "lora dh_raw scratch [B, k, T, r]", dh_raw, low)?;
    let (pda, _g10) = output(st, "lora dA [E, d_in, r]", grads.da, e * s.d_in * s.rank)?;
    let (pdb, _g11) = output(st, "lora dB [E, r, d_out]", grads.db, e * s.rank * s.d_out)?;
    let (pdg, _g12) = output(st, "lora dgates [B, k]", grads.dgates, bk)?;
    let (pdx, _g13) = opt_output(st, "lora dx [B, T, d_in]", grads.dx, bt * s.d_in)?;
    let sfx = T::SUFFIX;

    // 1. dh_raw = dout B_e^T (zero before each sequence's first row, so 2-4 need no mask)
    let mut args = vec![pdo, pb, pe, pi, pf];
    args.extend(site.dims(s.d_out)?);
    args.push(pdh);
    // SAFETY: shapes validated and buffer lengths checked above; arguments match lora_bwd_dh_{T}.
    unsafe {
        dev.launch(
            FAMILY,
            &format!("lora_bwd_dh_{sfx}"),
            site.per_token_cfg(),
            &args,
        )?
    };

    // 2. dgates = scale * <shrink, dh_raw>
    let args = [
        ph,
        pdh,
        pi,
        KArg::I32(as_i32("batch", s.batch)?),
        KArg::I32(as_i32("seq", s.seq)?),
        KArg::I32(as_i32("rank", s.rank)?),
        KArg::I32(as_i32("k", s.k)?),
        KArg::F32(s.scale),
        pdg,
    ];
    let cfg = LaunchConfig {
        grid_dim: (bk as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: as above; arguments match lora_dgates_f32.
    unsafe { dev.launch(FAMILY, "lora_dgates_f32", cfg, &args)? };

    // 3. dB += (g shrink)^T dout
    let mut args = vec![pdo, ph, pe, pg, pi];
    args.extend(site.dims(s.d_out)?);
    args.extend([KArg::F32(s.scale), pdb]);
    // SAFETY: as above; arguments match lora_bwd_db_{T}.
    unsafe {
        dev.launch(
            FAMILY,
            &format!("lora_bwd_db_{sfx}"),
            site.per_column_cfg(bk, s.d_out),
            &args,
        )?
    };

    // 4. dA += x^T (g dh_raw)
    let mut args = vec![px, pdh, pe, pg, pi];
    args.extend(site.dims(s.d_in)?);
    args.extend([KArg::F32(s.scale), pda]);
    // SAFETY: as above; arguments match lora_bwd_da_{T}.
    unsafe {
        dev.launch(
            FAMILY,
            &format!("lora_bwd_da_{sfx}"),
            site.per_column_cfg(bk, s.d_in),
            &args,
        )?
    };

    // 5. dx += (g dh_raw) A_e^T
    if pdx_is_set(&pdx) {
        let mut args = vec![pdh, pa, pe, pg, pi, pf];
        args.extend(site.dims(s.d_in)?);
        args.extend([KArg::F32(s.scale), pdx]);
        // SAFETY: as above; arguments match lora_bwd_dx_{T}.
        unsafe {
            dev.launch(
                FAMILY,
                &format!("lora_bwd_dx_{sfx}"),
                site.per_column_cfg(bt, s.d_in),
                &args,
            )?
        };
    }
    Ok(())
}

fn pdx_is_set(p: &KArg) -> bool {
    !matches!(p, KArg::Ptr(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(rank: usize, k: usize, n_experts: usize) -> LoraSite {
        let shape = MixShape {
            batch: 2,
            seq: 3,
            d_in: 16,
            d_out: 8,
            rank,
            k,
            scale: 1.0,
        };
        LoraSite { shape, n_experts }
    }

    #[test]
    fn limits_compiled_into_the_kernels_are_enforced() {
        assert!(site(8, 2, 4).validate().is_ok());
        assert!(site(MAX_RANK, MAX_K, 64).validate().is_ok());
        assert!(site(MAX_RANK + 1, 2, 4)
            .validate()
            .unwrap_err()
            .to_string()
            .contains("rank"));
        assert!(site(8, MAX_K + 1, 64).validate().is_err());
        assert!(
            site(8, 3, 2).validate().is_err(),
            "k larger than the expert count"
        );
    }

    #[test]
    fn launch_grids_cover_every_token_and_column() {
        let s = site(8, 2, 4);
        let cfg = s.per_token_cfg();
        assert_eq!(cfg.grid_dim, (4, 1, 1)); // B*k blocks, ceil(3 / 8) token tiles
        let cfg = s.per_column_cfg(6, 600);
        assert_eq!(cfg.grid_dim, (6, 3, 1)); // ceil(600 / 256) = 3
    }

    #[test]
    fn forward_chunks_fill_the_sms_only_when_tokens_are_few() {
        // GPT2-XL's c_fc site (d_out 6400) on 132 SMs: a batch-1 decode step splits its columns
        // 25 ways (one 256-wide chunk each); 8 tokens 17 ways; a training batch of 200 rows not at all.
        assert_eq!(forward_chunks(132, 1, 6400), 25);
        assert_eq!(forward_chunks(132, 8, 6400), 17);
        assert_eq!(forward_chunks(132, 200, 6400), 1);
        // Never a chunk narrower than one block, never zero.
        assert_eq!(forward_chunks(132, 1, 100), 1);
        assert_eq!(forward_chunks(4, 0, 0), 1);
    }
}
