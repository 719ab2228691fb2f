//! Dense products of frozen linear layers through cuBLAS (f32 accumulation for f16/bf16), with the
//! same row-major conventions as the CPU twin `ops::matmul` (weights `[in, out]` or `[out, in]`,
//! never transposed in memory).

use anyhow::{anyhow, bail, Result};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::buffers::{as_i32, check_len, KernelDtype};
use super::device::GpuDevice;
use crate::backend::shapes::Layout;

/// `out[m, out_dim] (+)= x[m, in_dim] W` with `W` stored as `layout` says.
///
/// Row-major `C = X W` is column-major `C^T = W^T X^T`, so cuBLAS computes an `out_dim x m` product
/// with the weight as its first operand: an `[in, out]` weight is already `W^T` in column-major
/// (no transpose), an `[out, in]` weight needs the transpose flag.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: KernelDtype>(
    dev: &GpuDevice,
    x: &impl DevicePtr<T>,
    m: usize,
    w: &impl DevicePtr<T>,
    in_dim: usize,
    out_dim: usize,
    layout: Layout,
    out: &mut impl DevicePtrMut<T>,
    accumulate: bool,
) -> Result<()>
where
    CudaBlas: Gemm<T>,
{
    if m == 0 || in_dim == 0 || out_dim == 0 {
        bail!("matmul: empty product {m} x {in_dim} -> {out_dim}");
    }
    check_len("matmul x [m, in]", x.len(), m * in_dim)?;
    check_len("matmul weight", w.len(), in_dim * out_dim)?;
    check_len("matmul out [m, out]", out.len(), m * out_dim)?;
    let (transa, lda) = match layout {
        Layout::InOut => (cublasOperation_t::CUBLAS_OP_N, out_dim),
        Layout::OutIn => (cublasOperation_t::CUBLAS_OP_T, in_dim),
    };
    let cfg = GemmConfig {
        transa,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: as_i32("out_dim", out_dim)?,
        n: as_i32("m", m)?,
        k: as_i32("in_dim", in_dim)?,
        alpha: T::from_f32(1.0),
        lda: as_i32("lda", lda)?,
        ldb: as_i32("in_dim", in_dim)?,
        beta: T::from_f32(if accumulate { 1.0 } else { 0.0 }),
        ldc: as_i32("out_dim", out_dim)?,
    };
    // SAFETY: the lengths above cover every element cuBLAS reads or writes for these dimensions and
    // leading dimensions; the handle is bound to the device stream.
    unsafe { dev.blas()?.gemm(cfg, w, x, out) }
        .map_err(|e| anyhow!("cuBLAS gemm {m}x{in_dim}x{out_dim}: {e:?}"))
}
