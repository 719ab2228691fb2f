//! Walking a model's tensors whatever holds them ([`Model`]`<W>`): one fixed order, the order the
//! Hugging Face checkpoints list them in (embeddings, then block by block norm, attention, norm,
//! MLP, each linear weight before its bias, then the final norm and the head).
//!
//! [`Model::try_map`] turns the model description (names and shapes) into the CPU model or into
//! anything else with the same structure; [`Model::tensors`] lists the leaves in that order.

use anyhow::{ensure, Context, Result};

use super::layers::{Linear, Mlp, Norm};
use super::transformer::{Block, Model, QkvProj};
use crate::backend::shapes::Layout;

impl<W> Linear<W> {
    /// The same layer with every tensor replaced by `f` of it (weight, then bias).
    pub fn try_map<'a, U>(&'a self, f: &mut impl FnMut(&'a W) -> Result<U>) -> Result<Linear<U>> {
        Ok(Linear {
            weight: f(&self.weight)?,
            bias: self.bias.as_ref().map(&mut *f).transpose()?,
            in_dim: self.in_dim,
            out_dim: self.out_dim,
            layout: self.layout,
            layout_copy: Default::default(),
        })
    }
}

impl<W> Norm<W> {
    pub fn try_map<'a, U>(&'a self, f: &mut impl FnMut(&'a W) -> Result<U>) -> Result<Norm<U>> {
        Ok(match self {
            Norm::Layer { weight, bias, eps } => Norm::Layer {
                weight: f(weight)?,
                bias: f(bias)?,
                eps: *eps,
            },
            Norm::Rms { weight, eps } => Norm::Rms {
                weight: f(weight)?,
                eps: *eps,
            },
        })
    }
}

impl<W> Mlp<W> {
    pub fn try_map<'a, U>(&'a self, f: &mut impl FnMut(&'a W) -> Result<U>) -> Result<Mlp<U>> {
        Ok(match self {
            Mlp::Gpt2 { c_fc, c_proj } => Mlp::Gpt2 {
                c_fc: c_fc.try_map(f)?,
                c_proj: c_proj.try_map(f)?,
            },
            Mlp::Llama { gate, up, down } => Mlp::Llama {
                gate: gate.try_map(f)?,
                up: up.try_map(f)?,
                down: down.try_map(f)?,
            },
        })
    }
}

impl<W> QkvProj<W> {
    /// The q, k and v projections when they are separate (always so on a device: staging splits
    /// GPT-2's fused `c_attn`).
    pub fn split(&self) -> Option<(&Linear<W>, &Linear<W>, &Linear<W>)> {
        match self {
            QkvProj::Split { q, k, v } => Some((q, k, v)),
            QkvProj::Fused(_) => None,
        }
    }

    pub fn try_map<'a, U>(&'a self, f: &mut impl FnMut(&'a W) -> Result<U>) -> Result<QkvProj<U>> {
        Ok(match self {
            QkvProj::Fused(l) => QkvProj::Fused(l.try_map(f)?),
            QkvProj::Split { q, k, v } => QkvProj::Split {
                q: q.try_map(f)?,
                k: k.try_map(f)?,
                v: v.try_map(f)?,
            },
        })
    }
}

impl<W> Block<W> {
    pub fn try_map<'a, U>(&'a self, f: &mut impl FnMut(&'a W) -> Result<U>) -> Result<Block<U>> {
        Ok(Block {
            norm1: self.norm1.try_map(f)?,
            qkv: self.qkv.try_map(f)?,
            o_proj: self.o_proj.try_map(f)?,
            norm2: self.norm2.try_map(f)?,
            mlp: self.mlp.try_map(f)?,
        })
    }
}

impl<W> Model<W> {
    /// The output projection's weight and layout: a tied head reads the embedding table as
    /// `[out, in]`.
    pub fn head_weight(&self) -> (&W, Layout) {
        match &self.lm_head {
            Some(l) => (&l.weight, l.layout),
            None => (&self.embed, Layout::OutIn),
        }
    }

    /// The same model with every tensor replaced by `f` of it, called in checkpoint order.
    pub fn try_map<'a, U>(&'a self, mut f: impl FnMut(&'a W) -> Result<U>) -> Result<Model<U>> {
        let f = &mut f;
        Ok(Model {
            cfg: self.cfg.clone(),
            embed: f(&self.embed)?,
            pos_embed: self.pos_embed.as_ref().map(&mut *f).transpose()?,
            blocks: self
                .blocks
                .iter()
                .map(|b| b.try_map(f))
                .collect::<Result<_>>()?,
            final_norm: self.final_norm.try_map(f)?,
            lm_head: self.lm_head.as_ref().map(|l| l.try_map(f)).transpose()?,
        })
    }

    /// Every tensor, in checkpoint order.
    pub fn tensors(&self) -> Vec<&W> {
        let mut out = Vec::new();
        self.try_map(|w| {
            out.push(w);
            Ok(())
        })
        .expect("collecting never fails");
        out
    }

    /// Pairs every tensor of `self` with the tensor of `other` in the same place. `other` must
    /// have the same structure; a different number of tensors is an error.
    pub fn zip<'a, U>(&'a self, other: &'a Model<U>) -> Result<Model<(&'a W, &'a U)>> {
        let theirs = other.tensors();
        let mut next = theirs.into_iter();
        let zipped = self.try_map(|w| {
            next.next()
                .map(|u| (w, u))
                .context("the second model has fewer tensors than the first")
        })?;
        ensure!(
            next.next().is_none(),
            "the second model has more tensors than the first"
        );
        Ok(zipped)
    }
}
