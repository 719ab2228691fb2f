//! The frozen base model on the device: every tensor of the CPU [`Model`] uploaded once in the
//! activation dtype, in the same structure (blocks, norms, linear layers and their layouts), so the
//! CUDA forward walks the same description the CPU does.
//!
//! One change of shape on the way up: GPT-2's fused `c_attn` is split into its q, k and v column
//! blocks on the host, so both families hand the attention three projections and the fused output
//! never has to be de-interleaved on the device.

use anyhow::{bail, Context, Result};
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaSlice;

use crate::backend::cpu::ops::Layout;
use crate::model::layers::{Linear, Mlp, MlpProj, Norm};
use crate::model::transformer::{Block, Model, QkvProj};

use super::super::buffers::KernelDtype;
use super::super::device::GpuDevice;
use super::super::{elementwise, gemm};

/// A frozen linear layer on the device, weight kept in its checkpoint layout.
pub struct GpuLinear<T: KernelDtype> {
    pub w: CudaSlice<T>,
    pub bias: Option<CudaSlice<T>>,
    pub in_dim: usize,
    pub out_dim: usize,
    pub layout: Layout,
}

impl<T: KernelDtype> GpuLinear<T> {
    pub fn upload(dev: &GpuDevice, l: &Linear) -> Result<Self> {
        Ok(GpuLinear {
            w: dev.upload_as::<T>(&l.weight)?,
            bias: l
                .bias
                .as_deref()
                .map(|b| dev.upload_as::<T>(b))
                .transpose()?,
            in_dim: l.in_dim,
            out_dim: l.out_dim,
            layout: l.layout,
        })
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

/// Splits a linear layer whose output is `parts` equal column blocks (GPT-2's `c_attn`: q | k | v)
/// into one layer per block, in either weight layout. Host-only, exact (a copy of the values).
pub fn split_output_blocks(l: &Linear, parts: usize) -> Result<Vec<Linear>> {
    if parts == 0 || !l.out_dim.is_multiple_of(parts) {
        bail!(
            "cannot split an output of width {} into {parts} equal blocks",
            l.out_dim
        );
    }
    let o = l.out_dim / parts;
    let (i_dim, total) = (l.in_dim, l.out_dim);
    Ok((0..parts)
        .map(|j| {
            let weight = match l.layout {
                // [in, out]: block j is columns j*o .. (j+1)*o of every row.
                Layout::InOut => (0..i_dim)
                    .flat_map(|r| l.weight[r * total + j * o..r * total + (j + 1) * o].iter())
                    .copied()
                    .collect(),
                // [out, in]: block j is rows j*o .. (j+1)*o, contiguous.
                Layout::OutIn => l.weight[j * o * i_dim..(j + 1) * o * i_dim].to_vec(),
            };
            Linear {
                weight,
                bias: l.bias.as_ref().map(|b| b[j * o..(j + 1) * o].to_vec()),
                in_dim: i_dim,
                out_dim: o,
                layout: l.layout,
            }
        })
        .collect())
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
    pub fn upload(dev: &GpuDevice, n: &Norm) -> Result<Self> {
        Ok(match n {
            Norm::Layer { weight, bias, eps } => GpuNorm::Layer {
                w: dev.upload_as(weight)?,
                b: dev.upload_as(bias)?,
                eps: *eps,
            },
            Norm::Rms { weight, eps } => GpuNorm::Rms {
                w: dev.upload_as(weight)?,
                eps: *eps,
            },
        })
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
    fn upload(dev: &GpuDevice, blk: &Block, l: usize) -> Result<Self> {
        let (q, k, v) = match &blk.qkv {
            QkvProj::Fused(lin) => {
                let mut parts = split_output_blocks(lin, 3)
                    .with_context(|| format!("block {l}: fused q/k/v projection"))?
                    .into_iter();
                let mut next = || -> Result<GpuLinear<T>> {
                    let part = parts.next().context("split gave fewer than 3 blocks")?;
                    GpuLinear::upload(dev, &part)
                };
                (next()?, next()?, next()?)
            }
            QkvProj::Split { q, k, v } => (
                GpuLinear::upload(dev, q)?,
                GpuLinear::upload(dev, k)?,
                GpuLinear::upload(dev, v)?,
            ),
        };
        let mlp = match &blk.mlp {
            Mlp::Gpt2 { c_fc, c_proj } => GpuMlp::Gpt2 {
                c_fc: GpuLinear::upload(dev, c_fc)?,
                c_proj: GpuLinear::upload(dev, c_proj)?,
            },
            Mlp::Llama { gate, up, down } => GpuMlp::Llama {
                gate: GpuLinear::upload(dev, gate)?,
                up: GpuLinear::upload(dev, up)?,
                down: GpuLinear::upload(dev, down)?,
            },
        };
        Ok(GpuBlock {
            norm1: GpuNorm::upload(dev, &blk.norm1)?,
            q,
            k,
            v,
            o_proj: GpuLinear::upload(dev, &blk.o_proj)?,
            norm2: GpuNorm::upload(dev, &blk.norm2)?,
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
    /// Uploads `model` (once; nothing here changes afterwards).
    pub fn upload(dev: &GpuDevice, model: &Model) -> Result<Self> {
        let blocks = model
            .blocks
            .iter()
            .enumerate()
            .map(|(l, b)| {
                GpuBlock::upload(dev, b, l).with_context(|| format!("uploading block {l}"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GpuWeights {
            embed: dev
                .upload_as(&model.embed)
                .context("uploading the embeddings")?,
            pos_embed: model
                .pos_embed
                .as_deref()
                .map(|p| dev.upload_as(p))
                .transpose()
                .context("uploading the position embeddings")?,
            blocks,
            final_norm: GpuNorm::upload(dev, &model.final_norm)?,
            lm_head: model
                .lm_head
                .as_ref()
                .map(|l| GpuLinear::upload(dev, l))
                .transpose()
                .context("uploading lm_head")?,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fused(layout: Layout) -> Linear {
        let (i, o) = (5, 3 * 4);
        Linear {
            weight: (0..i * o).map(|x| (x as f32 * 0.37).sin()).collect(),
            bias: Some((0..o).map(|x| x as f32 * 0.1 - 0.5).collect()),
            in_dim: i,
            out_dim: o,
            layout,
        }
    }

    /// The split layers compute exactly the column blocks of the fused layer's output.
    #[test]
    fn split_blocks_reproduce_the_fused_output() {
        for layout in [Layout::InOut, Layout::OutIn] {
            let lin = fused(layout);
            let rows = 3;
            let x: Vec<f32> = (0..rows * lin.in_dim)
                .map(|v| (v as f32 * 0.71).cos())
                .collect();
            let full = lin.forward(&x, rows);
            let parts = split_output_blocks(&lin, 3).unwrap();
            assert_eq!(parts.len(), 3);
            for (j, p) in parts.iter().enumerate() {
                assert_eq!((p.in_dim, p.out_dim, p.layout), (5, 4, layout));
                let got = p.forward(&x, rows);
                for r in 0..rows {
                    let want = &full[r * 12 + j * 4..r * 12 + (j + 1) * 4];
                    for (g, w) in got[r * 4..(r + 1) * 4].iter().zip(want) {
                        assert!(
                            (g - w).abs() <= 1e-6,
                            "{layout:?} block {j} row {r}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn uneven_splits_are_refused() {
        let lin = fused(Layout::InOut);
        assert!(split_output_blocks(&lin, 5).is_err());
        assert!(split_output_blocks(&lin, 0).is_err());
    }
}
