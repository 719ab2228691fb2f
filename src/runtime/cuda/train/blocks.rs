//! The blocks of the training step on the device: the forward is the runtime's one block walk
//! ([`crate::runtime::cuda::blocks`]) on the tapes of [`super::buffers`] with the trained experts
//! as its site hook; the backward is one function per half-block in the order of the CPU
//! description (`Model::mlp_backward` / `attn_backward`), reading those tapes.

use anyhow::Result;
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaSlice;

use crate::backend::cuda::attention::{self, AttnDims, AttnGrads};
use crate::backend::cuda::buffers::KernelDtype;
use crate::backend::cuda::device::GpuDevice;
use crate::backend::cuda::elementwise;
use crate::model::layers::{Mlp, MlpProj, Site};
use crate::model::transformer::Block;
use crate::model::{Arch, BatchShape};
use crate::runtime::cuda::blocks::{attn_half, mlp_half, AttnIo, CallRows, Keys, MlpIo, SiteHook};
use crate::runtime::cuda::weights::qkv;

use super::buffers::{clear, AttnTape, Experts, MlpTape, Scratch};
use super::step::Step;

impl<T: KernelDtype> Step<'_, T>
where
    CudaBlas: Gemm<T>,
{
    /// Block `l`'s MLP half on its tape: `sc.delta = mlp(tape.normed)` with the trained experts
    /// after every projection ([`mlp_half`], the inference forward's own walk), keeping what
    /// [`Self::mlp_backward`] reads.
    pub(super) fn mlp_forward(
        &self,
        l: usize,
        tape: &mut MlpTape<T>,
        sc: &mut Scratch<T>,
        ex: &mut Experts,
    ) -> Result<()> {
        let blk = &self.w.blocks[l];
        // GPT-2 keeps bias + GELU's pre-activation (the product itself goes to scratch); Llama's
        // gate output is its pre-activation.
        let (first, keep_pre) = match &blk.mlp {
            Mlp::Gpt2 { .. } => (&mut sc.ffn, Some(&mut tape.pre)),
            Mlp::Llama { .. } => (&mut tape.pre, None),
        };
        let io = MlpIo {
            x: &tape.normed,
            first,
            up: &mut tape.up,
            keep_pre,
            act: &mut tape.act,
            out: &mut sc.delta,
        };
        let mut experts = TrainedExperts { step: self, ex };
        mlp_half(self.dev, blk, l, self.shape, io, Some(&mut experts))
    }

    /// Block `l`'s attention half on its tape: `sc.delta = attention(sc.normed)` ([`attn_half`]),
    /// the call's own rows as the keys, the log-sum-exp kept for [`Self::attn_backward`].
    pub(super) fn attn_forward(
        &self,
        l: usize,
        at: &mut AttnTape<T>,
        sc: &mut Scratch<T>,
    ) -> Result<()> {
        let rows = CallRows {
            shape: self.shape,
            positions: self.positions,
            q_start: self.q_start,
            q_valid: self.q_valid,
        };
        let io = AttnIo {
            x: &sc.normed,
            q: &mut at.q,
            k: &mut at.k,
            v: &mut at.v,
            keys: Keys::OwnRows,
            att: &mut at.att,
            lse: Some(&mut at.lse),
            out: &mut sc.delta,
        };
        attn_half(self.dev, self.cfg, &self.w.blocks[l], &rows, io)
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

    /// Backward of [`Self::mlp_forward`] (`Model::mlp_backward`): `sc.dh` holds dL/d(block output)
    /// and, with `need_input_grad`, becomes dL/d(MLP input residual); without it only the MoLoRA
    /// gradients are produced (the trainer stops there at its first block).
    pub(super) fn mlp_backward(
        &self,
        l: usize,
        blk: &Block<CudaSlice<T>>,
        tape: &MlpTape<T>,
        sc: &mut Scratch<T>,
        ex: &mut Experts,
        need_input_grad: bool,
    ) -> Result<()> {
        let (dev, rows) = (self.dev, self.rows());
        let site = |proj| Site { block: l, proj };
        match &blk.mlp {
            Mlp::Gpt2 { c_fc, c_proj } => {
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
            Mlp::Llama { gate, up, down } => {
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
            blk.norm2.backward(
                dev,
                (rows, self.cfg.hidden_size),
                &tape.x,
                &tape.mean,
                &tape.rstd,
                &sc.dnormed,
                &mut sc.dh,
                true,
            )?;
        }
        Ok(())
    }

    /// Backward of [`Self::attn_forward`] (`Model::attn_backward`): `sc.dh` holds dL/d(attention
    /// output residual) and becomes dL/d(block input).
    pub(super) fn attn_backward(
        &self,
        blk: &Block<CudaSlice<T>>,
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
        let (q, k, v) = qkv(blk)?;
        q.backward_input(dev, &sc.dq, rows, &mut sc.dnormed, false)?;
        k.backward_input(dev, &sc.dk, rows, &mut sc.dnormed, true)?;
        v.backward_input(dev, &sc.dv, rows, &mut sc.dnormed, true)?;
        blk.norm1.backward(
            dev,
            (rows, cfg.hidden_size),
            &at.x,
            &at.mean,
            &at.rstd,
            &sc.dnormed,
            &mut sc.dh,
            true,
        )
    }
}

/// The experts being trained as the walk's site hook: each MoLoRA site adds its mixture (every
/// sequence in scope) and saves its shrink for the backward.
struct TrainedExperts<'s, 'a, T: KernelDtype> {
    step: &'s Step<'a, T>,
    ex: &'s mut Experts,
}

impl<T: KernelDtype> SiteHook<T> for TrainedExperts<'_, '_, T>
where
    CudaBlas: Gemm<T>,
{
    fn after_linear(
        &mut self,
        _dev: &GpuDevice,
        site: Site,
        _shape: &BatchShape,
        x: &CudaSlice<T>,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        self.step.molora_forward(site, self.ex, x, out)
    }
}
