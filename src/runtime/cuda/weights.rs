//! The frozen base model on the device: every tensor uploaded once in the activation dtype, in the
//! structure of the CPU [`Model`](crate::model::Model) (blocks, norms, linear layers and their layouts), so the CUDA
//! forward walks the same description the CPU does.
//!
//! The host prepares the tensors ([`super::staging`]: from the checkpoint's memory map or from an
//! f32 CPU model, GPT-2's fused `c_attn` split into q, k and v); this module only copies each one to
//! the device as it comes and puts the buffers in place.

use anyhow::{bail, Context, Result};
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaSlice;

use crate::backend::shapes::Layout;
use crate::model::layers::{Linear, Mlp, MlpProj, Norm};
use crate::model::transformer::{Block, QkvProj};

use super::staging::WeightSource;
use crate::backend::cuda::buffers::KernelDtype;
use crate::backend::cuda::device::GpuDevice;
use crate::backend::cuda::{elementwise, gemm};

/// A frozen linear layer on the device, weight kept in its checkpoint layout.
pub struct GpuLinear<T: KernelDtype> {
    pub w: CudaSlice<T>,
    pub bias: Option<CudaSlice<T>>,
    pub in_dim: usize,
    pub out_dim: usize,
    pub layout: Layout,
}

impl<T: KernelDtype> GpuLinear<T> {
    fn from_uploaded(l: Linear<CudaSlice<T>>) -> Self {
        GpuLinear {
            w: l.weight,
            bias: l.bias,
            in_dim: l.in_dim,
            out_dim: l.out_dim,
            layout: l.layout,
        }
    }

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
            &self.w,
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
            &self.w,
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

/// A pre-norm on the device (weights in the activation dtype, as the norm kernels take them).
pub enum GpuNorm<T: KernelDtype> {
    Layer {
        w: CudaSlice<T>,
        b: CudaSlice<T>,
        eps: f32,
    },
    Rms {
        w: CudaSlice<T>,
        eps: f32,
    },
}

impl<T: KernelDtype> GpuNorm<T> {
    fn from_uploaded(n: Norm<CudaSlice<T>>) -> Self {
        match n {
            Norm::Layer { weight, bias, eps } => GpuNorm::Layer {
                w: weight,
                b: bias,
                eps,
            },
            Norm::Rms { weight, eps } => GpuNorm::Rms { w: weight, eps },
        }
    }
}

/// The MLP of a block, mirroring [`Mlp`].
pub enum GpuMlp<T: KernelDtype> {
    Gpt2 {
        c_fc: GpuLinear<T>,
        c_proj: GpuLinear<T>,
    },
    Llama {
        gate: GpuLinear<T>,
        up: GpuLinear<T>,
        down: GpuLinear<T>,
    },
}

pub struct GpuBlock<T: KernelDtype> {
    pub norm1: GpuNorm<T>,
    pub q: GpuLinear<T>,
    pub k: GpuLinear<T>,
    pub v: GpuLinear<T>,
    pub o_proj: GpuLinear<T>,
    pub norm2: GpuNorm<T>,
    pub mlp: GpuMlp<T>,
}

impl<T: KernelDtype> GpuBlock<T> {
    fn from_uploaded(b: Block<CudaSlice<T>>) -> Result<Self> {
        let QkvProj::Split { q, k, v } = b.qkv else {
            bail!("internal: a fused q/k/v projection reached the device (staging splits it)");
        };
        let mlp = match b.mlp {
            Mlp::Gpt2 { c_fc, c_proj } => GpuMlp::Gpt2 {
                c_fc: GpuLinear::from_uploaded(c_fc),
                c_proj: GpuLinear::from_uploaded(c_proj),
            },
            Mlp::Llama { gate, up, down } => GpuMlp::Llama {
                gate: GpuLinear::from_uploaded(gate),
                up: GpuLinear::from_uploaded(up),
                down: GpuLinear::from_uploaded(down),
            },
        };
        Ok(GpuBlock {
            norm1: GpuNorm::from_uploaded(b.norm1),
            q: GpuLinear::from_uploaded(q),
            k: GpuLinear::from_uploaded(k),
            v: GpuLinear::from_uploaded(v),
            o_proj: GpuLinear::from_uploaded(b.o_proj),
            norm2: GpuNorm::from_uploaded(b.norm2),
            mlp,
        })
    }
}

impl<T: KernelDtype> GpuMlp<T> {
    /// The projection at `proj`, as [`Mlp::linear`].
    pub fn linear(&self, proj: MlpProj) -> Option<&GpuLinear<T>> {
        match (self, proj) {
            (GpuMlp::Gpt2 { c_fc, .. }, MlpProj::CFc) => Some(c_fc),
            (GpuMlp::Gpt2 { c_proj, .. }, MlpProj::CProj) => Some(c_proj),
            (GpuMlp::Llama { gate, .. }, MlpProj::GateProj) => Some(gate),
            (GpuMlp::Llama { up, .. }, MlpProj::UpProj) => Some(up),
            (GpuMlp::Llama { down, .. }, MlpProj::DownProj) => Some(down),
            _ => None,
        }
    }
}

/// Every weight of the base model on the device.
pub struct GpuWeights<T: KernelDtype> {
    /// `[vocab, d]`; also the head when it is tied.
    pub embed: CudaSlice<T>,
    /// `[max_positions, d]` (GPT-2).
    pub pos_embed: Option<CudaSlice<T>>,
    pub blocks: Vec<GpuBlock<T>>,
    pub final_norm: GpuNorm<T>,
    pub lm_head: Option<GpuLinear<T>>,
}

impl<T: KernelDtype> GpuWeights<T> {
    /// Uploads the model of `source` (once; nothing here changes afterwards), tensor by tensor as
    /// the host stages them, so host memory holds one staged tensor at a time.
    pub fn upload(dev: &GpuDevice, source: WeightSource<'_>) -> Result<Self> {
        let uploaded = source.stage::<T, CudaSlice<T>>(|s| {
            dev.upload(&s.values)
                .with_context(|| format!("uploading {}", s.name))
        })?;
        Ok(GpuWeights {
            embed: uploaded.embed,
            pos_embed: uploaded.pos_embed,
            blocks: uploaded
                .blocks
                .into_iter()
                .map(GpuBlock::from_uploaded)
                .collect::<Result<_>>()?,
            final_norm: GpuNorm::from_uploaded(uploaded.final_norm),
            lm_head: uploaded.lm_head.map(GpuLinear::from_uploaded),
        })
    }

    /// The output projection `(weight, layout)`: a tied head reads the embedding table as `[out, in]`.
    pub fn head(&self) -> (&CudaSlice<T>, Layout) {
        match &self.lm_head {
            Some(l) => (&l.w, l.layout),
            None => (&self.embed, Layout::OutIn),
        }
    }
}
