//! The host half of uploading the frozen model: every device tensor prepared in the device dtype
//! `T`, one at a time, and handed to a sink (the device upload; in tests, a list) before the next
//! one is read. Nothing here touches a GPU, so all of it is tested on any machine.
//!
//! The tensors come from either
//! - the checkpoint's memory map ([`WeightSource::Checkpoint`]): each tensor is converted from its
//!   stored dtype straight to `T` (copied unchanged when stored as `T`), so the extra host memory is
//!   about one tensor, and no f32 copy of the model is ever made (a 7B Llama would need 27 GB);
//! - an f32 CPU [`Model`] that already exists ([`WeightSource::Model`]: tests, the CPU twin),
//!   rounded to `T`;
//! - seeded random tensors ([`WeightSource::Random`]: the values `elder init-random` writes, made one
//!   tensor at a time, so a GPT2-XL-shaped benchmark needs no 6 GB f32 host model).
//!
//! Both walk the one model description ([`describe`]) with [`stage_model`], which applies the one
//! change of shape the device model wants: GPT-2's fused `c_attn` is split into its q, k and v column
//! blocks, so both families hand the attention three projections and the fused output never has to
//! be de-interleaved on the device. A tied head stays absent: the device head reads the embedding
//! table ([`super::weights::GpuWeights::head`]).

use anyhow::{bail, ensure, Context, Result};

use crate::backend::dtype::Element;
use crate::backend::shapes::Layout;
use crate::model::layers::Linear;
use crate::model::loader::{RandomSource, TensorSource};
use crate::model::names::describe;
use crate::model::transformer::{Block, QkvProj};
use crate::model::weights::Weights;
use crate::model::{Model, ModelConfig};

/// One device tensor ready on the host: the checkpoint tensor it comes from (a part of a split
/// tensor carries `[q]`, `[k]` or `[v]` after the name) and its values in the device dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct Staged<T> {
    pub name: String,
    pub values: Vec<T>,
}

/// Where the device model's weights come from.
#[derive(Debug, Clone, Copy)]
pub enum WeightSource<'a> {
    /// An f32 CPU model that already exists.
    Model(&'a Model),
    /// A checkpoint's memory map, read tensor by tensor (no f32 model is built).
    Checkpoint {
        cfg: &'a ModelConfig,
        weights: &'a Weights,
    },
    /// Seeded random weights for `cfg` (what `build_model(cfg, &RandomSource { seed })` holds).
    Random { cfg: &'a ModelConfig, seed: u64 },
}

impl<'a> From<&'a Model> for WeightSource<'a> {
    fn from(m: &'a Model) -> Self {
        WeightSource::Model(m)
    }
}

impl WeightSource<'_> {
    pub fn config(&self) -> &ModelConfig {
        match self {
            WeightSource::Model(m) => &m.cfg,
            WeightSource::Checkpoint { cfg, .. } | WeightSource::Random { cfg, .. } => cfg,
        }
    }

    /// Prepares every device tensor in `T`, in checkpoint order, handing each to `put` before the
    /// next is read; returns the model's structure (q/k/v always split) over what `put` returned.
    pub fn stage<T: Element, D>(
        &self,
        put: impl FnMut(Staged<T>) -> Result<D>,
    ) -> Result<Model<D>> {
        match *self {
            WeightSource::Model(m) => {
                let desc = describe(&m.cfg);
                let pairs = desc
                    .zip(m)
                    .context("the CPU model does not have its config's structure")?;
                stage_model(
                    &pairs,
                    |(spec, values)| {
                        ensure!(
                            values.len() == spec.numel(),
                            "the CPU model's {} has {} values, its shape {:?} needs {}",
                            spec.name,
                            values.len(),
                            spec.shape,
                            spec.numel()
                        );
                        Ok(Staged {
                            name: spec.name.clone(),
                            values: values.iter().map(|&v| T::from_f32(v)).collect(),
                        })
                    },
                    put,
                )
            }
            WeightSource::Checkpoint { cfg, weights } => {
                cfg.validate()?;
                stage_model(
                    &describe(cfg),
                    |spec| {
                        Ok(Staged {
                            name: spec.name.clone(),
                            values: weights.load_spec(spec)?,
                        })
                    },
                    put,
                )
                .with_context(|| format!("staging the model in {}", weights.dir().display()))
            }
            WeightSource::Random { cfg, seed } => {
                cfg.validate()?;
                let random = RandomSource { seed };
                stage_model(
                    &describe(cfg),
                    |spec| {
                        Ok(Staged {
                            name: spec.name.clone(),
                            values: random.load(spec)?.into_iter().map(T::from_f32).collect(),
                        })
                    },
                    put,
                )
            }
        }
    }

    /// Every staged tensor, in upload order (all in host memory at once: for tests and tools).
    pub fn staged_tensors<T: Element>(&self) -> Result<Vec<Staged<T>>> {
        let mut out = Vec::new();
        self.stage::<T, ()>(|s| {
            out.push(s);
            Ok(())
        })?;
        Ok(out)
    }
}

/// Walks `desc` in checkpoint order: `load` prepares each tensor, `put` takes it (and returns what
/// the result keeps in its place). GPT-2's fused q/k/v is loaded whole, split into three column
/// blocks and put part by part, weight then bias of q, then of k, then of v.
pub fn stage_model<L, T: Copy, D>(
    desc: &Model<L>,
    mut load: impl FnMut(&L) -> Result<Staged<T>>,
    mut put: impl FnMut(Staged<T>) -> Result<D>,
) -> Result<Model<D>> {
    let embed = put(load(&desc.embed)?)?;
    let pos_embed = match &desc.pos_embed {
        Some(p) => Some(put(load(p)?)?),
        None => None,
    };
    let blocks = desc
        .blocks
        .iter()
        .enumerate()
        .map(|(l, b)| stage_block(b, &mut load, &mut put).with_context(|| format!("block {l}")))
        .collect::<Result<_>>()?;
    let final_norm = desc.final_norm.try_map(&mut |x| put(load(x)?))?;
    let lm_head = match &desc.lm_head {
        Some(h) => Some(h.try_map(&mut |x| put(load(x)?))?),
        None => None,
    };
    Ok(Model {
        cfg: desc.cfg.clone(),
        embed,
        pos_embed,
        blocks,
        final_norm,
        lm_head,
    })
}

fn stage_block<L, T: Copy, D>(
    b: &Block<L>,
    load: &mut impl FnMut(&L) -> Result<Staged<T>>,
    put: &mut impl FnMut(Staged<T>) -> Result<D>,
) -> Result<Block<D>> {
    let norm1 = b.norm1.try_map(&mut |x| put(load(x)?))?;
    let qkv = match &b.qkv {
        QkvProj::Fused(lin) => {
            split_fused_qkv(lin, load, put).context("splitting the fused q/k/v projection")?
        }
        split => split.try_map(&mut |x| put(load(x)?))?,
    };
    Ok(Block {
        norm1,
        qkv,
        o_proj: b.o_proj.try_map(&mut |x| put(load(x)?))?,
        norm2: b.norm2.try_map(&mut |x| put(load(x)?))?,
        mlp: b.mlp.try_map(&mut |x| put(load(x)?))?,
    })
}

/// Loads a fused q/k/v layer and puts its three column blocks as separate layers. Peak host memory
/// is the fused tensor plus its parts.
fn split_fused_qkv<L, T: Copy, D>(
    lin: &Linear<L>,
    load: &mut impl FnMut(&L) -> Result<Staged<T>>,
    put: &mut impl FnMut(Staged<T>) -> Result<D>,
) -> Result<QkvProj<D>> {
    let weight = load(&lin.weight)?;
    let bias = lin.bias.as_ref().map(&mut *load).transpose()?;
    let bias_name = bias.as_ref().map(|b| b.name.clone());
    let fused = Linear {
        weight: weight.values,
        bias: bias.map(|b| b.values),
        in_dim: lin.in_dim,
        out_dim: lin.out_dim,
        layout: lin.layout,
        layout_copy: Default::default(),
    };
    let parts = split_output_blocks(&fused, 3)?;
    drop(fused);
    let mut staged = Vec::with_capacity(3);
    for (part, tag) in parts.into_iter().zip(["q", "k", "v"]) {
        let w = put(Staged {
            name: format!("{}[{tag}]", weight.name),
            values: part.weight,
        })?;
        let b = match (part.bias, &bias_name) {
            (Some(values), Some(name)) => Some(put(Staged {
                name: format!("{name}[{tag}]"),
                values,
            })?),
            _ => None,
        };
        staged.push(Linear {
            weight: w,
            bias: b,
            in_dim: part.in_dim,
            out_dim: part.out_dim,
            layout: part.layout,
            layout_copy: Default::default(),
        });
    }
    let mut staged = staged.into_iter();
    match (staged.next(), staged.next(), staged.next()) {
        (Some(q), Some(k), Some(v)) => Ok(QkvProj::Split { q, k, v }),
        _ => bail!("internal: the fused projection did not split into three"),
    }
}

/// Splits a linear layer whose output is `parts` equal column blocks (GPT-2's `c_attn`: q | k | v)
/// into one layer per block, in either weight layout. Exact: a copy of the values.
pub fn split_output_blocks<E: Copy>(
    l: &Linear<Vec<E>>,
    parts: usize,
) -> Result<Vec<Linear<Vec<E>>>> {
    if parts == 0 || !l.out_dim.is_multiple_of(parts) {
        bail!(
            "cannot split an output of width {} into {parts} equal blocks",
            l.out_dim
        );
    }
    let o = l.out_dim / parts;
    let (i_dim, total) = (l.in_dim, l.out_dim);
    ensure!(
        l.weight.len() == i_dim * total,
        "a {i_dim} x {total} layer has {} weights",
        l.weight.len()
    );
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
                layout_copy: Default::default(),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::loader::build_model;
    use crate::model::presets::preset;
    use crate::model::Arch;

    /// Random weights staged tensor by tensor are the random CPU model's, rounded the same way.
    #[test]
    fn random_weights_stage_like_the_random_cpu_model() {
        for arch in [Arch::Gpt2, Arch::Llama] {
            let cfg = preset(arch, "tiny").unwrap();
            let model = build_model(&cfg, &RandomSource { seed: 5 }).unwrap();
            let direct = WeightSource::Random { cfg: &cfg, seed: 5 };
            let want = WeightSource::Model(&model)
                .staged_tensors::<half::bf16>()
                .unwrap();
            assert_eq!(
                direct.staged_tensors::<half::bf16>().unwrap(),
                want,
                "{arch:?}"
            );
            let other = WeightSource::Random { cfg: &cfg, seed: 6 };
            assert_ne!(other.staged_tensors::<half::bf16>().unwrap(), want);
        }
    }

    fn fused(layout: Layout) -> Linear {
        let (i, o) = (5, 3 * 4);
        Linear {
            weight: (0..i * o).map(|x| (x as f32 * 0.37).sin()).collect(),
            bias: Some((0..o).map(|x| x as f32 * 0.1 - 0.5).collect()),
            in_dim: i,
            out_dim: o,
            layout,
            layout_copy: Default::default(),
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
