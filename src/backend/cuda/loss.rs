//! Launchers for `kernels/loss.cu`: vocabulary cross-entropy (forward + backward), the router
//! backward with the guided loss, and the routers' parameter gradients. CPU twins:
//! `ops::cross_entropy`, `molora::route_backward`, `molora::guided_loss`,
//! `molora::router_param_grad`.

use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};

use super::buffers::{as_i32, input, opt_input, output, KernelDtype};
use super::device::{GpuDevice, KArg};
use super::KernelFamily;

const FAMILY: KernelFamily = KernelFamily::Loss;

/// Cross-entropy over `n` rows of `logits [n, vocab]` against `targets [n]` (i32, -1 = ignored).
/// Writes `dlogits = (softmax - onehot) * weight * loss_scale` (`None`: 1) and `row_loss [n]`,
/// unscaled (sum it for the CPU twin's total).
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy<T: KernelDtype>(
    dev: &GpuDevice,
    logits: &impl DevicePtr<T>,
    targets: &impl DevicePtr<i32>,
    n: usize,
    vocab: usize,
    weight: f32,
    loss_scale: Option<&CudaSlice<f32>>,
    dlogits: &mut impl DevicePtrMut<T>,
    row_loss: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    let s = dev.stream();
    let (pscale, _g0) = opt_input(s, "cross_entropy loss scale [1]", loss_scale, 1)?;
    let (pl, _g1) = input(s, "cross_entropy logits [n, vocab]", logits, n * vocab)?;
    let (pt, _g2) = input(s, "cross_entropy targets [n]", targets, n)?;
    let (pd, _g3) = output(s, "cross_entropy dlogits [n, vocab]", dlogits, n * vocab)?;
    let (pr, _g4) = output(s, "cross_entropy row_loss [n]", row_loss, n)?;
    let args = [
        pl,
        pt,
        KArg::F32(weight),
        pscale,
        KArg::I32(as_i32("n", n)?),
        KArg::I32(as_i32("vocab", vocab)?),
        pd,
        pr,
    ];
    let cfg = LaunchConfig {
        grid_dim: (n.max(1) as u32, 1, 1),
        block_dim: (512, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: buffer lengths checked above; argument list matches cross_entropy_{T}.
    unsafe { dev.launch(FAMILY, &format!("cross_entropy_{}", T::SUFFIX), cfg, &args) }
}

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
    unsafe { dev.launch(FAMILY, "router_backward_f32", cfg, &args) }
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
    unsafe { dev.launch(FAMILY, "router_param_grad_f32", cfg, &args) }
}
