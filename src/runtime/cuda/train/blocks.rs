//! The blocks of the training forward and backward on the device, one function per half-block in
//! the order of the CPU description (`Model::mlp_half` / `attn_half` / `mlp_backward` /
//! `attn_backward`), filling and reading the tapes of [`super::buffers`].

use anyhow::Result;
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaSlice;

use crate::backend::cuda::attention::{self, AttnDims, AttnGrads};
use crate::backend::cuda::buffers::KernelDtype;
use crate::backend::cuda::device::GpuDevice;
use crate::backend::cuda::elementwise;
use crate::backend::cuda::norm::{self, NormRows};
use crate::model::layers::{MlpProj, Site};
use crate::model::Arch;
use crate::runtime::cuda::weights::{GpuBlock, GpuMlp, GpuNorm};

use super::buffers::{clear, AttnTape, Experts, MlpTape, Scratch};
use super::step::Step;

impl<T: KernelDtype> Step<'_, T>
where
    CudaBlas: Gemm<T>,
{
    /// `delta = mlp(tape.normed)` with ELDER after every projection, filling the tape
    /// (as `Model::mlp_half`).
    pub(super) fn mlp_forward(
        &self,
        l: usize,
        tape: &mut MlpTape<T>,
        sc: &mut Scratch<T>,
        ex: &mut Experts,
    ) -> Result<()> {
        let (dev, rows) = (self.dev, self.rows());
        let site = |proj| Site { block: l, proj };
        match &self.w.blocks[l].mlp {
            GpuMlp::Gpt2 { c_fc, c_proj } => {
                // The mixture joins the product before the bias, as in the inference forward.
                c_fc.product(dev, &tape.normed, rows, &mut sc.ffn)?;
                self.molora_forward(site(MlpProj::CFc), ex, &tape.normed, &mut sc.ffn)?;
                elementwise::bias_gelu(
                    dev,
                    &sc.ffn,
                    c_fc.bias.as_ref(),
                    Some(&mut tape.pre),
                    &mut tape.act,
                    rows,
                    c_fc.out_dim,
                )?;
                c_proj.forward(dev, &tape.act, rows, &mut sc.delta)?;
                self.molora_forward(site(MlpProj::CProj), ex, &tape.act, &mut sc.delta)
            }
            GpuMlp::Llama { gate, up, down } => {
                gate.forward(dev, &tape.normed, rows, &mut tape.pre)?;
                self.molora_forward(site(MlpProj::GateProj), ex, &tape.normed, &mut tape.pre)?;
                up.forward(dev, &tape.normed, rows, &mut tape.up)?;
                self.molora_forward(site(MlpProj::UpProj), ex, &tape.normed, &mut tape.up)?;
                elementwise::silu_mul(
                    dev,
                    &tape.pre,
                    &tape.up,
                    &mut tape.act,
                    rows * gate.out_dim,
                )?;
                down.forward(dev, &tape.act, rows, &mut sc.delta)?;
                self.molora_forward(site(MlpProj::DownProj), ex, &tape.act, &mut sc.delta)
            }
        }
    }

    fn attn_dims(&self) -> AttnDims {
        // The keys of a training call are its own rows (the cache starts empty), so the capacity
        // is the padded length and the tapes' k / v are the whole cache.
        AttnDims {
            batch: self.shape.batch,
            q_len: self.shape.seq,
            kv_capacity: self.shape.seq,
            n_heads: self.cfg.num_heads,
            n_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    /// `delta = o_proj(attention(rope(q), rope(k), v))` of `sc.normed`, filling the tape
    /// (as `Model::attn_half`).
    pub(super) fn attn_forward(
        &self,
        blk: &GpuBlock<T>,
        at: &mut AttnTape<T>,
        sc: &mut Scratch<T>,
    ) -> Result<()> {
        let (dev, cfg, rows) = (self.dev, self.cfg, self.rows());
        blk.q.forward(dev, &sc.normed, rows, &mut at.q)?;
        blk.k.forward(dev, &sc.normed, rows, &mut at.k)?;
        blk.v.forward(dev, &sc.normed, rows, &mut at.v)?;
        if cfg.arch == Arch::Llama {
            let (hd, theta) = (cfg.head_dim, cfg.rope_theta);
            let pos = self.positions;
            elementwise::rope(dev, &mut at.q, pos, rows, cfg.num_heads, hd, theta, false)?;
            elementwise::rope(
                dev,
                &mut at.k,
                pos,
                rows,
                cfg.num_kv_heads,
                hd,
                theta,
                false,
            )?;
        }
        attention::attention_forward::<T, CudaSlice<f32>>(
            dev,
            self.attn_dims(),
            self.q_start,
            self.q_valid,
            &at.q,
            &at.k,
            &at.v,
            &mut at.att,
            Some(&mut at.lse),
        )?;
        blk.o_proj.forward(dev, &at.att, rows, &mut sc.delta)
    }

    /// Backward of [`Self::mlp_forward`] (`Model::mlp_backward`): `sc.dh` holds dL/d(block output)
    /// and, with `need_input_grad`, becomes dL/d(MLP input residual); without it only the MoLoRA
    /// gradients are produced (the trainer stops there at its first block).
    pub(super) fn mlp_backward(
        &self,
        l: usize,
        blk: &GpuBlock<T>,
        tape: &MlpTape<T>,
        sc: &mut Scratch<T>,
        ex: &mut Experts,
        need_input_grad: bool,
    ) -> Result<()> {
        let (dev, rows) = (self.dev, self.rows());
        let site = |proj| Site { block: l, proj };
        match &blk.mlp {
            GpuMlp::Gpt2 { c_fc, c_proj } => {
                c_proj.backward_input(dev, &sc.dh, rows, &mut sc.dact, false)?;
                let s = site(MlpProj::CProj);
                self.molora_backward(s, ex, &tape.act, &sc.dh, Some(&mut sc.dact))?;
                let count = rows * c_fc.out_dim;
                elementwise::gelu_backward(dev, &tape.pre, &sc.dact, &mut sc.dpre, count)?;
                if need_input_grad {
                    c_fc.backward_input(dev, &sc.dpre, rows, &mut sc.dnormed, false)?;
                }
                let dx = need_input_grad.then_some(&mut sc.dnormed);
                self.molora_backward(site(MlpProj::CFc), ex, &tape.normed, &sc.dpre, dx)?;
            }
            GpuMlp::Llama { gate, up, down } => {
                down.backward_input(dev, &sc.dh, rows, &mut sc.dact, false)?;
                let s = site(MlpProj::DownProj);
                self.molora_backward(s, ex, &tape.act, &sc.dh, Some(&mut sc.dact))?;
                elementwise::silu_mul_backward(
                    dev,
                    &tape.pre,
                    &tape.up,
                    &sc.dact,
                    &mut sc.dpre,
                    &mut sc.dup,
                    rows * gate.out_dim,
                )?;
                if need_input_grad {
                    up.backward_input(dev, &sc.dup, rows, &mut sc.dnormed, false)?;
                    gate.backward_input(dev, &sc.dpre, rows, &mut sc.dnormed, true)?;
                }
                let dx = need_input_grad.then_some(&mut sc.dnormed);
                self.molora_backward(site(MlpProj::UpProj), ex, &tape.normed, &sc.dup, dx)?;
                let dx = need_input_grad.then_some(&mut sc.dnormed);
                self.molora_backward(site(MlpProj::GateProj), ex, &tape.normed, &sc.dpre, dx)?;
            }
        }
        if need_input_grad {
            norm_backward(
                dev,
                &blk.norm2,
                rows,
                self.cfg.hidden_size,
                &tape.x,
                &tape.mean,
                &tape.rstd,
                &sc.dnormed,
                &mut sc.dh,
            )?;
        }
        Ok(())
    }

    /// Backward of [`Self::attn_forward`] (`Model::attn_backward`): `sc.dh` holds dL/d(attention
    /// output residual) and becomes dL/d(block input).
    pub(super) fn attn_backward(
        &self,
        blk: &GpuBlock<T>,
        at: &AttnTape<T>,
        sc: &mut Scratch<T>,
    ) -> Result<()> {
        let (dev, cfg, rows) = (self.dev, self.cfg, self.rows());
        let (nq, nkv) = (rows * cfg.q_dim(), rows * cfg.kv_dim());
        blk.o_proj
            .backward_input(dev, &sc.dh, rows, &mut sc.datt, false)?;
        // The kernel accumulates (f32 atomics: query rows and GQA heads share keys).
        clear(dev, &mut sc.dq32, 0..nq, "dq")?;
        clear(dev, &mut sc.dk32, 0..nkv, "dk")?;
        clear(dev, &mut sc.dv32, 0..nkv, "dv")?;
        attention::attention_backward(
            dev,
            self.attn_dims(),
            self.q_start,
            self.q_valid,
            &at.q,
            &at.k,
            &at.v,
            &at.att,
            &sc.datt,
            &at.lse,
            AttnGrads {
                dq: &mut sc.dq32,
                dk: &mut sc.dk32,
                dv: &mut sc.dv32,
            },
        )?;
        if cfg.arch == Arch::Llama {
            // Rotate back in f32, as the CPU does, before rounding to the GEMMs' dtype.
            let (hd, theta, pos) = (cfg.head_dim, cfg.rope_theta, self.positions);
            elementwise::rope(dev, &mut sc.dq32, pos, rows, cfg.num_heads, hd, theta, true)?;
            elementwise::rope(
                dev,
                &mut sc.dk32,
                pos,
                rows,
                cfg.num_kv_heads,
                hd,
                theta,
                true,
            )?;
        }
        elementwise::cast_f32(dev, &sc.dq32, &mut sc.dq, nq)?;
        elementwise::cast_f32(dev, &sc.dk32, &mut sc.dk, nkv)?;
        elementwise::cast_f32(dev, &sc.dv32, &mut sc.dv, nkv)?;
        // GPT-2's fused c_attn was split into q | k | v on upload: the sum of the three input
        // gradients is the fused layer's.
        blk.q
            .backward_input(dev, &sc.dq, rows, &mut sc.dnormed, false)?;
        blk.k
            .backward_input(dev, &sc.dk, rows, &mut sc.dnormed, true)?;
        blk.v
            .backward_input(dev, &sc.dv, rows, &mut sc.dnormed, true)?;
        norm_backward(
            dev,
            &blk.norm1,
            rows,
            cfg.hidden_size,
            &at.x,
            &at.mean,
            &at.rstd,
            &sc.dnormed,
            &mut sc.dh,
        )
    }
}

/// A pre-norm over `(n, d)` rows with the residual add fused: `sum_out = x + residual` (when
/// given) and `out = norm(x + residual)`, saving the statistics.
#[allow(clippy::too_many_arguments)]
pub(super) fn norm_forward<T: KernelDtype>(
    dev: &GpuDevice,
    norm: &GpuNorm<T>,
    (n, d): (usize, usize),
    x: &CudaSlice<T>,
    residual: Option<&CudaSlice<T>>,
    sum_out: Option<&mut CudaSlice<T>>,
    out: &mut CudaSlice<T>,
    mean: &mut CudaSlice<f32>,
    rstd: &mut CudaSlice<f32>,
) -> Result<()> {
    match norm {
        GpuNorm::Layer { w, b, eps } => norm::residual_layernorm(
            dev,
            NormRows { n, d, eps: *eps },
            x,
            residual,
            sum_out,
            w,
            Some(b),
            out,
            mean,
            rstd,
        ),
        GpuNorm::Rms { w, eps } => norm::residual_rmsnorm(
            dev,
            NormRows { n, d, eps: *eps },
            x,
            residual,
            sum_out,
            w,
            out,
            rstd,
        ),
    }
}

/// `dx += d(norm)/dx^T dout` over `rows` rows (`Norm::backward_accumulate`); `x` is the norm's
/// input (the residual stream it normalised).
#[allow(clippy::too_many_arguments)]
pub(super) fn norm_backward<T: KernelDtype>(
    dev: &GpuDevice,
    norm: &GpuNorm<T>,
    rows: usize,
    d: usize,
    x: &CudaSlice<T>,
    mean: &CudaSlice<f32>,
    rstd: &CudaSlice<f32>,
    dout: &CudaSlice<T>,
    dx: &mut CudaSlice<T>,
) -> Result<()> {
    let shape = NormRows {
        n: rows,
        d,
        eps: 0.0,
    };
    match norm {
        GpuNorm::Layer { w, .. } => {
            norm::layernorm_backward(dev, shape, x, w, mean, rstd, dout, dx, true)
        }
        GpuNorm::Rms { w, .. } => norm::rmsnorm_backward(dev, shape, x, w, rstd, dout, dx, true),
    }
}
