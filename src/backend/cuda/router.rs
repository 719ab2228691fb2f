//! Launchers for `kernels/router.cu`: routing of every MoLoRA layer, allocation codes, the minimum
//! Hamming distance to the codebook and the in-scope mask, in one launch with no host round trip;
//! and the routers' backward (logit gradients with ELDER's guided loss, parameter gradients).
//! CPU twins (`backend/cpu/ops/router.rs`): `ops::route` per layer plus the code / distance rule of docs/elder-method.md
//! section 4 (with a mean query, the input is centred first, `elder::molora::center_queries`, in the same
//! launch); `ops::route_backward` + `ops::guided_loss`, and `ops::router_param_grad`.

use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};

use super::buffers::{as_i32, input, opt_input, output, KernelDtype};
use super::device::{GpuDevice, KArg};
use super::KernelFamily;

/// Must match ROUTER_THREADS in router.cu.
const THREADS: u32 = 256;
const MAX_EXPERTS: usize = 64;
/// Shared memory stays under the 48 kB a launch gets without opting in.
const MAX_SHARED_BYTES: usize = 48 * 1024;

/// u64 words of one allocation code: bit `l * E + e` is word `bit / 64`, position `bit % 64`.
pub fn code_words(layers: usize, experts: usize) -> usize {
    (layers * experts).div_ceil(64)
}

/// Shapes and options of a fused routing call.
#[derive(Debug, Clone, Copy)]
pub struct RouterShape {
    pub batch: usize,
    pub layers: usize,
    pub experts: usize,
    pub d_in: usize,
    pub k: usize,
    pub renormalize: bool,
    /// A sequence is in scope when its minimum distance is `< threshold`.
    pub threshold: u32,
}

impl RouterShape {
    pub fn words(&self) -> usize {
        code_words(self.layers, self.experts)
    }

    fn validate(&self) -> Result<()> {
        if self.experts == 0 || self.experts > MAX_EXPERTS {
            bail!(
                "router: experts per layer must be in 1..={MAX_EXPERTS}, found {}",
                self.experts
            );
        }
        if self.k == 0 || self.k > self.experts {
            bail!(
                "router: top-k must be in 1..={} (experts), found {}",
                self.experts,
                self.k
            );
        }
        if self.layers == 0 || self.batch == 0 || self.d_in == 0 {
            bail!("router: layers, batch and d_in must be non-zero, found {self:?}");
        }
        if self.shared_bytes() > MAX_SHARED_BYTES {
            bail!("router: {} layers x {} experts on a {}-wide query need {} B of shared memory (max {MAX_SHARED_BYTES})",
                self.layers, self.experts, self.d_in, self.shared_bytes());
        }
        Ok(())
    }

    /// Code words, logits and the staged f32 router input.
    fn shared_bytes(&self) -> usize {
        self.words() * 8 + (self.layers * self.experts + self.d_in) * 4
    }
}

/// Everything the fused router writes. Layer-major: `probs [L, B, E]`, `experts`/`gates [L, B, k]`
/// (layer `l`'s `[B, k]` block is what the LoRA launchers take), `codes [B, words]`,
/// `min_dist [B]` (`i32::MAX` with an empty codebook), `in_scope [B]` (0/1).
pub struct RouterOutputs {
    pub probs: CudaSlice<f32>,
    pub experts: CudaSlice<u32>,
    pub gates: CudaSlice<f32>,
    pub codes: CudaSlice<u64>,
    pub min_dist: CudaSlice<i32>,
    pub in_scope: CudaSlice<u8>,
}

impl RouterOutputs {
    pub fn alloc(dev: &GpuDevice, s: &RouterShape) -> Result<Self> {
        let (l, b, e, k) = (s.layers, s.batch, s.experts, s.k);
        Ok(Self {
            probs: dev.zeros(l * b * e)?,
            experts: dev.zeros(l * b * k)?,
            gates: dev.zeros(l * b * k)?,
            codes: dev.zeros(b * s.words())?,
            min_dist: dev.zeros(b)?,
            in_scope: dev.zeros(b)?,
        })
    }
}

/// Routes `q [B, d_in]` (centred on `mean [d_in]` when one is given) through `w_r [L, E, d_in]` /
/// `b_r [L, E]` (f32) and checks the codes against the first `n_codes` entries of
/// `codebook [N, words]`.
#[allow(clippy::too_many_arguments)]
pub fn router_fused<T: KernelDtype>(
    dev: &GpuDevice,
    s: &RouterShape,
    q: &impl DevicePtr<T>,
    mean: Option<&CudaSlice<f32>>,
    w_r: &impl DevicePtr<f32>,
    b_r: &impl DevicePtr<f32>,
    codebook: &impl DevicePtr<u64>,
    n_codes: usize,
    out: &mut RouterOutputs,
) -> Result<()> {
    s.validate()?;
    let (l, b, e, k, words) = (s.layers, s.batch, s.experts, s.k, s.words());
    let st = dev.stream();
    let (pq, _g1) = input(st, "router query [B, d_in]", q, b * s.d_in)?;
    let (pm, _g0) = opt_input(st, "router mean query [d_in]", mean, s.d_in)?;
    let (pw, _g2) = input(st, "router W_r [L, E, d_in]", w_r, l * e * s.d_in)?;
    let (pb, _g3) = input(st, "router b_r [L, E]", b_r, l * e)?;
    let (pc, _g4) = input(st, "codebook [N, words]", codebook, n_codes * words)?;
    let (pp, _g5) = output(st, "router probs [L, B, E]", &mut out.probs, l * b * e)?;
    let (pe, _g6) = output(st, "router experts [L, B, k]", &mut out.experts, l * b * k)?;
    let (pg, _g7) = output(st, "router gates [L, B, k]", &mut out.gates, l * b * k)?;
    let (pcode, _g8) = output(st, "router codes [B, words]", &mut out.codes, b * words)?;
    let (pd, _g9) = output(st, "router min_dist [B]", &mut out.min_dist, b)?;
    let (ps, _g10) = output(st, "router in_scope [B]", &mut out.in_scope, b)?;
    let args = [
        pq,
        pm,
        pw,
        pb,
        KArg::I32(as_i32("batch", b)?),
        KArg::I32(as_i32("layers", l)?),
        KArg::I32(as_i32("experts", e)?),
        KArg::I32(as_i32("d_in", s.d_in)?),
        KArg::I32(as_i32("k", k)?),
        KArg::I32(s.renormalize as i32),
        pc,
        KArg::I32(as_i32("n_codes", n_codes)?),
        KArg::I32(as_i32("words", words)?),
        KArg::I32(as_i32("threshold", s.threshold as usize)?),
        pp,
        pe,
        pg,
        pcode,
        pd,
        ps,
    ];
    let cfg = LaunchConfig {
        grid_dim: (b as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: s.shared_bytes() as u32,
    };
    // SAFETY: shapes validated and buffer lengths checked above; argument list matches router_fused_{T}.
    unsafe {
        dev.launch(
            KernelFamily::Router,
            &format!("router_fused_{}", T::SUFFIX),
            cfg,
            &args,
        )
    }
}

/// The routers' input alone: `q [B, d_in]` as f32 in `out [B, d_in]`, centred on `mean` when one is
/// given (what [`router_fused`] stages internally; the trainer keeps it for the router backward).
pub fn router_input<T: KernelDtype>(
    dev: &GpuDevice,
    batch: usize,
    d_in: usize,
    q: &impl DevicePtr<T>,
    mean: Option<&CudaSlice<f32>>,
    out: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    if batch == 0 || d_in == 0 {
        bail!("router input: batch and d_in must be non-zero, found {batch} x {d_in}");
    }
    let st = dev.stream();
    let (pq, _g1) = input(st, "router query [B, d_in]", q, batch * d_in)?;
    let (pm, _g2) = opt_input(st, "router mean query [d_in]", mean, d_in)?;
    let (po, _g3) = output(st, "router input [B, d_in]", out, batch * d_in)?;
    let args = [
        pq,
        pm,
        KArg::I32(as_i32("batch", batch)?),
        KArg::I32(as_i32("d_in", d_in)?),
        po,
    ];
    let cfg = LaunchConfig {
        grid_dim: (batch as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: buffer lengths checked above; argument list matches router_input_{T}.
    unsafe {
        dev.launch(
            KernelFamily::Router,
            &format!("router_input_{}", T::SUFFIX),
            cfg,
            &args,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(experts: usize, k: usize, layers: usize) -> RouterShape {
        RouterShape {
            batch: 2,
            layers,
            experts,
            d_in: 8,
            k,
            renormalize: false,
            threshold: 1,
        }
    }

    #[test]
    fn code_words_round_up_to_whole_u64() {
        assert_eq!(code_words(6, 4), 1); // the paper's 24 bits
        assert_eq!(code_words(1, 64), 1);
        assert_eq!(code_words(6, 64), 6);
        assert_eq!(code_words(5, 13), 2);
    }

    #[test]
    fn shapes_the_kernel_cannot_run_are_rejected_on_the_host() {
        assert!(shape(64, 2, 6).validate().is_ok());
        let e = shape(65, 2, 6).validate().unwrap_err().to_string();
        assert!(e.contains("experts per layer"), "{e}");
        assert!(shape(8, 9, 6).validate().is_err());
        assert!(shape(8, 0, 6).validate().is_err());
        // 4000 layers x 64 experts of logits exceed the 48 kB of shared memory.
        let e = shape(64, 2, 4000).validate().unwrap_err().to_string();
        assert!(e.contains("shared memory"), "{e}");
    }
}

// ------------------------------------------------------------------ the routers' backward

/// Shapes of a router backward call: `rows = layers * batch` rows of `E` probabilities.
#[derive(Debug, Clone, Copy)]
pub struct RouterGradShape {
    pub rows: usize,
    /// Sequences per layer (the guided loss divides by it).
    pub batch: usize,
    pub experts: usize,
    pub k: usize,
    pub renormalize: bool,
}

/// Guidance for the guided loss: `preset [rows, per_seq]` expert ids pushed up with `weight`
/// (times the device-side loss scale, when training scales its loss; see `adam::LossScale`).
pub struct Guide<'a, P> {
    pub preset: &'a P,
    pub per_seq: usize,
    pub weight: f32,
    pub loss_scale: Option<&'a CudaSlice<f32>>,
}

/// dL/dlogits `[rows, E]` of the routers from `dgates [rows, k]` and the optional guided loss;
/// `guide_loss [rows]` receives each row's guided-loss term (unweighted; 0 without guidance).
#[allow(clippy::too_many_arguments)]
pub fn router_backward<P: DevicePtr<u32>>(
    dev: &GpuDevice,
    s: RouterGradShape,
    probs: &impl DevicePtr<f32>,
    experts: &impl DevicePtr<u32>,
    gates: &impl DevicePtr<f32>,
    dgates: &impl DevicePtr<f32>,
    guide: Option<Guide<'_, P>>,
    dlogits: &mut impl DevicePtrMut<f32>,
    guide_loss: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    if s.experts == 0 || s.experts > 64 || s.k == 0 || s.k > s.experts || s.batch == 0 {
        bail!("router_backward: need 1 <= k <= experts <= 64 and batch > 0, found {s:?}");
    }
    let st = dev.stream();
    let (per_seq, weight) = guide.as_ref().map_or((0, 0.0), |g| (g.per_seq, g.weight));
    let (pp, _g1) = input(
        st,
        "router_backward probs [rows, E]",
        probs,
        s.rows * s.experts,
    )?;
    let (pe, _g2) = input(
        st,
        "router_backward experts [rows, k]",
        experts,
        s.rows * s.k,
    )?;
    let (pg, _g3) = input(st, "router_backward gates [rows, k]", gates, s.rows * s.k)?;
    let (pdg, _g4) = input(st, "router_backward dgates [rows, k]", dgates, s.rows * s.k)?;
    let (ppr, _g5) = opt_input(
        st,
        "router_backward preset [rows, per_seq]",
        guide.as_ref().map(|g| g.preset),
        s.rows * per_seq,
    )?;
    let (pdl, _g6) = output(
        st,
        "router_backward dlogits [rows, E]",
        dlogits,
        s.rows * s.experts,
    )?;
    let (pl, _g7) = output(st, "router_backward guide_loss [rows]", guide_loss, s.rows)?;
    let (pscale, _g8) = opt_input(
        st,
        "router_backward loss scale [1]",
        guide.as_ref().and_then(|g| g.loss_scale),
        1,
    )?;
    let args = [
        pp,
        pe,
        pg,
        pdg,
        KArg::I32(as_i32("rows", s.rows)?),
        KArg::I32(as_i32("experts", s.experts)?),
        KArg::I32(as_i32("k", s.k)?),
        KArg::I32(s.renormalize as i32),
        ppr,
        KArg::I32(as_i32("per_seq", per_seq)?),
        KArg::I32(as_i32("batch", s.batch)?),
        KArg::F32(weight),
        pscale,
        pdl,
        pl,
    ];
    let cfg = LaunchConfig {
        grid_dim: (s.rows.div_ceil(4).max(1) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: buffer lengths checked above; argument list matches router_backward_f32.
    unsafe { dev.launch(KernelFamily::Router, "router_backward_f32", cfg, &args) }
}

/// Shapes of [`router_param_grad`]: `layers` routers of `experts` rows over `d_in` inputs, fed
/// `batch` sequences.
#[derive(Debug, Clone, Copy)]
pub struct RouterParamShape {
    pub layers: usize,
    pub batch: usize,
    pub experts: usize,
    pub d_in: usize,
}

/// `dw_r [L, E, d_in] += dlogits[l]^T q` and `db_r [L, E] += column sums of dlogits[l]` for every
/// layer `l`, from `dlogits [L, B, E]` and the routers' input `q [B, d_in]`.
pub fn router_param_grad<G: DevicePtrMut<f32>>(
    dev: &GpuDevice,
    s: RouterParamShape,
    dlogits: &impl DevicePtr<f32>,
    q: &impl DevicePtr<f32>,
    dw_r: &mut G,
    db_r: &mut G,
) -> Result<()> {
    if s.layers == 0 || s.batch == 0 || s.experts == 0 || s.d_in == 0 {
        bail!("router_param_grad: empty shape {s:?}");
    }
    let (l, b, e, d) = (s.layers, s.batch, s.experts, s.d_in);
    let st = dev.stream();
    let (pl, _g1) = input(
        st,
        "router_param_grad dlogits [L, B, E]",
        dlogits,
        l * b * e,
    )?;
    let (pq, _g2) = input(st, "router_param_grad q [B, d_in]", q, b * d)?;
    let (pw, _g3) = output(st, "router_param_grad dW_r [L, E, d_in]", dw_r, l * e * d)?;
    let (pb, _g4) = output(st, "router_param_grad db_r [L, E]", db_r, l * e)?;
    let args = [
        pl,
        pq,
        KArg::I32(as_i32("layers", l)?),
        KArg::I32(as_i32("batch", b)?),
        KArg::I32(as_i32("experts", e)?),
        KArg::I32(as_i32("d_in", d)?),
        pw,
        pb,
    ];
    let total = l * e * (d + 1);
    let cfg = LaunchConfig {
        grid_dim: (dev.grid_for(total, 256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: buffer lengths checked above; argument list matches router_param_grad_f32.
    unsafe { dev.launch(KernelFamily::Router, "router_param_grad_f32", cfg, &args) }
}
