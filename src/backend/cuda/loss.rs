//! Launcher for `kernels/loss.cu`: vocabulary cross-entropy (forward + backward). CPU twin:
//! `ops::cross_entropy`. (The routers' backward is the router family's: `router.rs`.)

use anyhow::Result;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};

use super::buffers::{as_i32, input, opt_input, opt_output, output, KernelDtype};
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
    cross_entropy_rows(
        dev,
        logits,
        targets,
        (n, vocab),
        weight,
        loss_scale,
        dlogits,
        row_loss,
        PerRow::default(),
    )
}

/// What [`cross_entropy_rows`] reads and writes per row beyond the loss.
#[derive(Default)]
pub struct PerRow<'a> {
    /// A weight per row `[n]`, multiplying `weight` (`None`: 1 for every row).
    pub weights: Option<&'a CudaSlice<f32>>,
    /// Each row's argmax `[n]`, the first of equal logits (`None`: not computed).
    pub argmax: Option<&'a mut CudaSlice<u32>>,
}

/// [`cross_entropy`] over `(n, vocab)` with a weight per row and each row's argmax when asked
/// (the stored allocation's trainer weighs each edit's rows and stops once every target is the
/// argmax). CPU twins: `ops::cross_entropy` row by row and `ops::argmax`.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_rows<T: KernelDtype>(
    dev: &GpuDevice,
    logits: &impl DevicePtr<T>,
    targets: &impl DevicePtr<i32>,
    (n, vocab): (usize, usize),
    weight: f32,
    loss_scale: Option<&CudaSlice<f32>>,
    dlogits: &mut impl DevicePtrMut<T>,
    row_loss: &mut impl DevicePtrMut<f32>,
    per_row: PerRow,
) -> Result<()> {
    let s = dev.stream();
    let (pscale, _g0) = opt_input(s, "cross_entropy loss scale [1]", loss_scale, 1)?;
    let (pw, _g5) = opt_input(s, "cross_entropy row weights [n]", per_row.weights, n)?;
    let (pl, _g1) = input(s, "cross_entropy logits [n, vocab]", logits, n * vocab)?;
    let (pt, _g2) = input(s, "cross_entropy targets [n]", targets, n)?;
    let (pd, _g3) = output(s, "cross_entropy dlogits [n, vocab]", dlogits, n * vocab)?;
    let (pr, _g4) = output(s, "cross_entropy row_loss [n]", row_loss, n)?;
    let (pa, _g6) = opt_output(s, "cross_entropy argmax [n]", per_row.argmax, n)?;
    let args = [
        pl,
        pt,
        KArg::F32(weight),
        pw,
        pscale,
        KArg::I32(as_i32("n", n)?),
        KArg::I32(as_i32("vocab", vocab)?),
        pd,
        pr,
        pa,
    ];
    let cfg = LaunchConfig {
        grid_dim: (n.max(1) as u32, 1, 1),
        block_dim: (512, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: buffer lengths checked above; argument list matches cross_entropy_{T}.
    unsafe { dev.launch(FAMILY, &format!("cross_entropy_{}", T::SUFFIX), cfg, &args) }
}
