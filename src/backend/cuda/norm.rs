//! Launchers for `kernels/norm.cu`: fused residual-add + LayerNorm / RMSNorm forward and their input
//! gradients. CPU twins: `ops::add_inplace` + `ops::layernorm` / `ops::rmsnorm`, and
//! `ops::layernorm_backward` / `ops::rmsnorm_backward`.

use anyhow::Result;
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};

use super::buffers::{as_i32, input, opt_input, opt_output, output, KernelDtype};
use super::device::{GpuDevice, KArg};
use super::KernelFamily;

const FAMILY: KernelFamily = KernelFamily::Norm;

/// Must match ROWS_PER_BLOCK in norm.cu (one warp per row).
const ROWS_PER_BLOCK: usize = 4;

fn rows_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(ROWS_PER_BLOCK).max(1) as u32, 1, 1),
        block_dim: (32 * ROWS_PER_BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Rows `[n, d]` and epsilon of a norm call.
#[derive(Debug, Clone, Copy)]
pub struct NormRows {
    pub n: usize,
    pub d: usize,
    pub eps: f32,
}

/// `sum_out = x + residual` (when both given), `out = LayerNorm(x + residual) * w + b`; saves
/// per-row `mean` and `rstd` `[n]`.
#[allow(clippy::too_many_arguments)]
pub fn residual_layernorm<T: KernelDtype, X: DevicePtr<T>, O: DevicePtrMut<T>>(
    dev: &GpuDevice,
    rows: NormRows,
    x: &X,
    residual: Option<&X>,
    sum_out: Option<&mut O>,
    w: &X,
    b: Option<&X>,
    out: &mut O,
    mean: &mut impl DevicePtrMut<f32>,
    rstd: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    let (n, d) = (rows.n, rows.d);
    let s = dev.stream();
    let (px, _g1) = input(s, "layernorm x [n, d]", x, n * d)?;
    let (pr, _g2) = opt_input(s, "layernorm residual [n, d]", residual, n * d)?;
    let (ps, _g3) = opt_output(s, "layernorm sum_out [n, d]", sum_out, n * d)?;
    let (pw, _g4) = input(s, "layernorm weight [d]", w, d)?;
    let (pb, _g5) = opt_input(s, "layernorm bias [d]", b, d)?;
    let (po, _g6) = output(s, "layernorm out [n, d]", out, n * d)?;
    let (pm, _g7) = output(s, "layernorm mean [n]", mean, n)?;
    let (pq, _g8) = output(s, "layernorm rstd [n]", rstd, n)?;
    let args = [
        px,
        pr,
        ps,
        pw,
        pb,
        po,
        pm,
        pq,
        KArg::I32(as_i32("n", n)?),
        KArg::I32(as_i32("d", d)?),
        KArg::F32(rows.eps),
    ];
    // SAFETY: buffer lengths checked above; argument list matches residual_layernorm_{T}.
    unsafe {
        dev.launch(
            FAMILY,
            &format!("residual_layernorm_{}", T::SUFFIX),
            rows_cfg(n),
            &args,
        )
    }
}

/// LayerNorm input gradient; `x` is the normalised input (the residual sum), `accumulate` adds into `dx`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<T: KernelDtype, X: DevicePtr<T>>(
    dev: &GpuDevice,
    rows: NormRows,
    x: &X,
    w: &X,
    mean: &impl DevicePtr<f32>,
    rstd: &impl DevicePtr<f32>,
    dout: &X,
    dx: &mut impl DevicePtrMut<T>,
    accumulate: bool,
) -> Result<()> {
    let (n, d) = (rows.n, rows.d);
    let s = dev.stream();
    let (px, _g1) = input(s, "layernorm_backward x [n, d]", x, n * d)?;
    let (pw, _g2) = input(s, "layernorm_backward weight [d]", w, d)?;
    let (pm, _g3) = input(s, "layernorm_backward mean [n]", mean, n)?;
    let (pr, _g4) = input(s, "layernorm_backward rstd [n]", rstd, n)?;
    let (pd, _g5) = input(s, "layernorm_backward dout [n, d]", dout, n * d)?;
    let (pdx, _g6) = output(s, "layernorm_backward dx [n, d]", dx, n * d)?;
    let args = [
        px,
        pw,
        pm,
        pr,
        pd,
        pdx,
        KArg::I32(accumulate as i32),
        KArg::I32(as_i32("n", n)?),
        KArg::I32(as_i32("d", d)?),
    ];
    // SAFETY: buffer lengths checked above; argument list matches layernorm_backward_{T}.
    unsafe {
        dev.launch(
            FAMILY,
            &format!("layernorm_backward_{}", T::SUFFIX),
            rows_cfg(n),
            &args,
        )
    }
}

/// `sum_out = x + residual`, `out = RMSNorm(x + residual) * w`; saves `rstd [n]`.
#[allow(clippy::too_many_arguments)]
pub fn residual_rmsnorm<T: KernelDtype, X: DevicePtr<T>, O: DevicePtrMut<T>>(
    dev: &GpuDevice,
    rows: NormRows,
    x: &X,
    residual: Option<&X>,
    sum_out: Option<&mut O>,
    w: &X,
    out: &mut O,
    rstd: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    let (n, d) = (rows.n, rows.d);
    let s = dev.stream();
    let (px, _g1) = input(s, "rmsnorm x [n, d]", x, n * d)?;
    let (pr, _g2) = opt_input(s, "rmsnorm residual [n, d]", residual, n * d)?;
    let (ps, _g3) = opt_output(s, "rmsnorm sum_out [n, d]", sum_out, n * d)?;
    let (pw, _g4) = input(s, "rmsnorm weight [d]", w, d)?;
    let (po, _g5) = output(s, "rmsnorm out [n, d]", out, n * d)?;
    let (pq, _g6) = output(s, "rmsnorm rstd [n]", rstd, n)?;
    let args = [
        px,
        pr,
        ps,
        pw,
        po,
        pq,
        KArg::I32(as_i32("n", n)?),
        KArg::I32(as_i32("d", d)?),
        KArg::F32(rows.eps),
    ];
    // SAFETY: buffer lengths checked above; argument list matches residual_rmsnorm_{T}.
    unsafe {
        dev.launch(
            FAMILY,
            &format!("residual_rmsnorm_{}", T::SUFFIX),
            rows_cfg(n),
            &args,
        )
    }
}

/// RMSNorm input gradient.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward<T: KernelDtype, X: DevicePtr<T>>(
    dev: &GpuDevice,
    rows: NormRows,
    x: &X,
    w: &X,
    rstd: &impl DevicePtr<f32>,
    dout: &X,
    dx: &mut impl DevicePtrMut<T>,
    accumulate: bool,
) -> Result<()> {
    let (n, d) = (rows.n, rows.d);
    let s = dev.stream();
    let (px, _g1) = input(s, "rmsnorm_backward x [n, d]", x, n * d)?;
    let (pw, _g2) = input(s, "rmsnorm_backward weight [d]", w, d)?;
    let (pr, _g3) = input(s, "rmsnorm_backward rstd [n]", rstd, n)?;
    let (pd, _g4) = input(s, "rmsnorm_backward dout [n, d]", dout, n * d)?;
    let (pdx, _g5) = output(s, "rmsnorm_backward dx [n, d]", dx, n * d)?;
    let args = [
        px,
        pw,
        pr,
        pd,
        pdx,
        KArg::I32(accumulate as i32),
        KArg::I32(as_i32("n", n)?),
        KArg::I32(as_i32("d", d)?),
    ];
    // SAFETY: buffer lengths checked above; argument list matches rmsnorm_backward_{T}.
    unsafe {
        dev.launch(
            FAMILY,
            &format!("rmsnorm_backward_{}", T::SUFFIX),
            rows_cfg(n),
            &args,
        )
    }
}
