//! The frozen base model on the device: the CPU's own description ([`Model`]`<CudaSlice<T>>`,
//! the structure every loader walks) with each tensor uploaded once in the activation dtype, and
//! the device methods of its layers (a linear layer's product and input gradient, a norm fused
//! with the residual add and its backward). No mirror types: the CUDA forward, the training
//! forward and the backward walk the same `Block`, `Linear` and `Norm` the CPU does.
//!
//! The host prepares the tensors ([`super::staging`]: from the checkpoint's memory map or from an
//! f32 CPU model, GPT-2's fused `c_attn` split into q, k and v); this module only copies each one to
//! the device as it comes.

use anyhow::{bail, Context, Result};
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaSlice;

use crate::backend::shapes::Layout;
use crate::model::layers::{Linear, Norm};
use crate::model::transformer::{Block, Model};

use super::staging::WeightSource;
use crate::backend::cuda::buffers::KernelDtype;
use crate::backend::cuda::device::GpuDevice;
use crate::backend::cuda::norm::{self, NormRows};
use crate::backend::cuda::{elementwise, gemm};

/// Every weight of the base model on the device (q, k and v always split).
pub type GpuWeights<T> = Model<CudaSlice<T>>;

/// Uploads the model of `source` (once; nothing here changes afterwards), tensor by tensor as the
/// host stages them, so host memory holds one staged tensor at a time.
pub fn upload<T: KernelDtype>(dev: &GpuDevice, source: WeightSource<'_>) -> Result<GpuWeights<T>> {
    let uploaded = source.stage::<T, CudaSlice<T>>(|s| {
        dev.upload(&s.values)
            .with_context(|| format!("uploading {}", s.name))
    })?;
    if uploaded.blocks.iter().any(|b| b.qkv.split().is_none()) {
        bail!("internal: a fused q/k/v projection reached the device (staging splits it)");
    }
    Ok(uploaded)
}

/// A frozen linear layer on the device.
pub type DeviceLinear<T> = Linear<CudaSlice<T>>;

/// The q, k and v projections of an uploaded block (staging split them; [`upload`] checked).
pub fn qkv<T: KernelDtype>(
    blk: &Block<CudaSlice<T>>,
) -> Result<(&DeviceLinear<T>, &DeviceLinear<T>, &DeviceLinear<T>)> {
    blk.qkv
        .split()
        .context("internal: a fused q/k/v projection on the device")
}

impl<T: KernelDtype> Linear<CudaSlice<T>> {
    /// `out[rows, out] = x[rows, in] W` without the bias (cuBLAS). The bias is added separately
    /// because ELDER's update and GPT-2's GELU sit between the product and it on some layers.
    pub fn product(
        &self,
        dev: &GpuDevice,
        x: &CudaSlice<T>,
        rows: usize,
        out: &mut CudaSlice<T>,
    ) -> Result<()>
    where
        CudaBlas: Gemm<T>,
    {
        gemm::matmul(
            dev,
            x,
            rows,
            &self.weight,
            self.in_dim,
            self.out_dim,
            self.layout,
            out,
            false,
        )
    }

    /// `out[rows, :] += b` (nothing for bias-free layers).
    pub fn add_bias(&self, dev: &GpuDevice, out: &mut CudaSlice<T>, rows: usize) -> Result<()> {
        match &self.bias {
            Some(b) => elementwise::bias_add(dev, out, b, rows, self.out_dim),
            None => Ok(()),
        }
    }

    /// `out = x W + b`.
    pub fn forward(
        &self,
        dev: &GpuDevice,
        x: &CudaSlice<T>,
        rows: usize,
        out: &mut CudaSlice<T>,
    ) -> Result<()>
    where
        CudaBlas: Gemm<T>,
    {
        self.product(dev, x, rows, out)?;
        self.add_bias(dev, out, rows)
    }

    /// `dx (+)= dy W^T`, as `Linear::backward_input` (the bias has no part in it).
    pub fn backward_input(
        &self,
        dev: &GpuDevice,
        dy: &CudaSlice<T>,
        rows: usize,
        dx: &mut CudaSlice<T>,
        accumulate: bool,
    ) -> Result<()>
    where
        CudaBlas: Gemm<T>,
    {
        input_grad(
            dev,
            dy,
            rows,
            &self.weight,
            self.in_dim,
            self.out_dim,
            self.layout,
            dx,
            accumulate,
        )
    }
}

/// `dx[rows, in] (+)= dy[rows, out] W^T` for a weight `w` of `layout` used as `y = x W`: the same
/// memory read as the transposed product (an `[in, out]` weight is the `[out', in']` layout of
/// `W^T`, and the other way round), so no transposed copy is needed. CPU twin: `ops::matmul_input_grad`.
#[allow(clippy::too_many_arguments)]
pub fn input_grad<T: KernelDtype>(
    dev: &GpuDevice,
    dy: &CudaSlice<T>,
    rows: usize,
    w: &CudaSlice<T>,
    in_dim: usize,
    out_dim: usize,
    layout: Layout,
    dx: &mut CudaSlice<T>,
    accumulate: bool,
) -> Result<()>
where
    CudaBlas: Gemm<T>,
{
    let transposed = match layout {
        Layout::InOut => Layout::OutIn,
        Layout::OutIn => Layout::InOut,
    };
    gemm::matmul(
        dev, dy, rows, w, out_dim, in_dim, transposed, dx, accumulate,
    )
}

/// Where a norm reads and writes: `out = norm(x + residual)` over `rows` rows of width `d`, the
/// sum itself into `sum_out` when given (the next residual stream), the statistics its backward
/// reads into `mean` (LayerNorm only) and `rstd`.
pub struct NormIo<'a, T: KernelDtype> {
    pub rows: usize,
    pub d: usize,
    pub x: &'a CudaSlice<T>,
    pub residual: Option<&'a CudaSlice<T>>,
    pub sum_out: Option<&'a mut CudaSlice<T>>,
    pub out: &'a mut CudaSlice<T>,
    pub mean: &'a mut CudaSlice<f32>,
    pub rstd: &'a mut CudaSlice<f32>,
}

impl<T: KernelDtype> Norm<CudaSlice<T>> {
    /// The pre-norm with the residual add fused (one kernel), as `Norm::forward` of `x + residual`.
    pub fn forward(&self, dev: &GpuDevice, io: NormIo<'_, T>) -> Result<()> {
        match self {
            Norm::Layer { weight, bias, eps } => norm::residual_layernorm(
                dev,
                NormRows {
                    n: io.rows,
                    d: io.d,
                    eps: *eps,
                },
                io.x,
                io.residual,
                io.sum_out,
                weight,
                Some(bias),
                io.out,
                io.mean,
                io.rstd,
            ),
            Norm::Rms { weight, eps } => norm::residual_rmsnorm(
                dev,
                NormRows {
                    n: io.rows,
                    d: io.d,
                    eps: *eps,
                },
                io.x,
                io.residual,
                io.sum_out,
                weight,
                io.out,
                io.rstd,
            ),
        }
    }

    /// `dx (+)= d(norm)/dx^T dout` over `rows` rows (`Norm::backward_accumulate`); `x` is the
    /// norm's input (the residual stream it normalised), `mean` / `rstd` what the forward saved.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        dev: &GpuDevice,
        (rows, d): (usize, usize),
        x: &CudaSlice<T>,
        mean: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        dout: &CudaSlice<T>,
        dx: &mut CudaSlice<T>,
        accumulate: bool,
    ) -> Result<()> {
        // The backward has no epsilon: the saved statistics carry it.
        let shape = NormRows {
            n: rows,
            d,
            eps: 0.0,
        };
        match self {
            Norm::Layer { weight, .. } => {
                norm::layernorm_backward(dev, shape, x, weight, mean, rstd, dout, dx, accumulate)
            }
            Norm::Rms { weight, .. } => {
                norm::rmsnorm_backward(dev, shape, x, weight, rstd, dout, dx, accumulate)
            }
        }
    }
}
