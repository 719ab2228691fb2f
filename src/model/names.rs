//! The one description of each model family: the structure of the model with every tensor's
//! Hugging Face name, shape, role and layout ([`describe`]). Loading (the CPU model, and the GPU
//! upload straight from the checkpoint), random initialisation and checkpoint writing all follow it.

use crate::backend::shapes::Layout;

use super::config::{Arch, ModelConfig};
use super::layers::{Linear, Mlp, MlpProj, Norm};
use super::transformer::{Block, Model, QkvProj};
use TensorRole::*;

/// What a tensor is, which decides how it is initialised and laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    Embedding,
    Matrix,
    NormWeight,
    Bias,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Canonical name as transformers writes it.
    pub name: String,
    /// Other names the same tensor is found under in the wild (GPT-2 without `transformer.`).
    pub aliases: Vec<String>,
    pub shape: Vec<usize>,
    pub role: TensorRole,
}

fn spec(name: String, shape: Vec<usize>, role: TensorRole, arch: Arch) -> TensorSpec {
    let aliases = match (arch, name.strip_prefix("transformer.")) {
        (Arch::Gpt2, Some(short)) => vec![short.to_string()],
        _ => Vec::new(),
    };
    TensorSpec {
        name,
        aliases,
        shape,
        role,
    }
}

impl TensorSpec {
    /// The names to look the tensor up under: its own, then its aliases.
    pub fn candidates(&self) -> Vec<&str> {
        std::iter::once(self.name.as_str())
            .chain(self.aliases.iter().map(String::as_str))
            .collect()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The model of `cfg` as a description: the structure of [`Model`] with each tensor's name, shape
/// and role in place of its values. Loading (CPU and GPU), random initialisation and checkpoint
/// writing all walk this one description.
pub fn describe(cfg: &ModelConfig) -> Model<TensorSpec> {
    let d = cfg.hidden_size;
    let blocks = (0..cfg.num_layers)
        .map(|l| describe_block(cfg, l))
        .collect();
    match cfg.arch {
        Arch::Gpt2 => {
            let t = |name: &str, shape, role| {
                spec(format!("transformer.{name}"), shape, role, cfg.arch)
            };
            Model {
                cfg: cfg.clone(),
                embed: t("wte.weight", vec![cfg.vocab_size, d], Embedding),
                pos_embed: Some(t("wpe.weight", vec![cfg.max_positions, d], Embedding)),
                blocks,
                final_norm: Norm::Layer {
                    weight: t("ln_f.weight", vec![d], NormWeight),
                    bias: t("ln_f.bias", vec![d], Bias),
                    eps: cfg.norm_eps,
                },
                // Tied: the head reads the token embeddings.
                lm_head: None,
            }
        }
        Arch::Llama => {
            let t = |name: &str, shape, role| spec(name.to_string(), shape, role, cfg.arch);
            Model {
                cfg: cfg.clone(),
                embed: t(
                    "model.embed_tokens.weight",
                    vec![cfg.vocab_size, d],
                    Embedding,
                ),
                pos_embed: None,
                blocks,
                final_norm: Norm::Rms {
                    weight: t("model.norm.weight", vec![d], NormWeight),
                    eps: cfg.norm_eps,
                },
                lm_head: (!cfg.tie_word_embeddings)
                    .then(|| out_in(t("lm_head.weight", vec![cfg.vocab_size, d], Matrix), None)),
            }
        }
    }
}

/// Block `l` of [`describe`].
fn describe_block(cfg: &ModelConfig, l: usize) -> Block<TensorSpec> {
    let (d, ff, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.norm_eps);
    match cfg.arch {
        Arch::Gpt2 => {
            let t = |name: &str, shape, role| {
                spec(format!("transformer.h.{l}.{name}"), shape, role, cfg.arch)
            };
            let norm = |name: &str| Norm::Layer {
                weight: t(&format!("{name}.weight"), vec![d], NormWeight),
                bias: t(&format!("{name}.bias"), vec![d], Bias),
                eps,
            };
            // Conv1D: weight [in, out], used as `x W`.
            let conv1d = |name: &str, i: usize, o: usize| Linear {
                weight: t(&format!("{name}.weight"), vec![i, o], Matrix),
                bias: Some(t(&format!("{name}.bias"), vec![o], Bias)),
                in_dim: i,
                out_dim: o,
                layout: Layout::InOut,
                layout_copy: Default::default(),
            };
            Block {
                norm1: norm("ln_1"),
                qkv: QkvProj::Fused(conv1d("attn.c_attn", d, 3 * d)),
                o_proj: conv1d("attn.c_proj", d, d),
                norm2: norm("ln_2"),
                mlp: Mlp::Gpt2 {
                    c_fc: conv1d("mlp.c_fc", d, ff),
                    c_proj: conv1d("mlp.c_proj", ff, d),
                },
            }
        }
        Arch::Llama => {
            let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
            let t = |name: &str, shape, role| {
                spec(format!("model.layers.{l}.{name}"), shape, role, cfg.arch)
            };
            let rms = |name: &str| Norm::Rms {
                weight: t(&format!("{name}.weight"), vec![d], NormWeight),
                eps,
            };
            // nn.Linear: weight [out, in], no bias.
            let linear = |name: &str, i: usize, o: usize| {
                out_in(t(&format!("{name}.weight"), vec![o, i], Matrix), None)
            };
            Block {
                norm1: rms("input_layernorm"),
                qkv: QkvProj::Split {
                    q: linear("self_attn.q_proj", d, qd),
                    k: linear("self_attn.k_proj", d, kvd),
                    v: linear("self_attn.v_proj", d, kvd),
                },
                o_proj: linear("self_attn.o_proj", qd, d),
                norm2: rms("post_attention_layernorm"),
                mlp: Mlp::Llama {
                    gate: linear("mlp.gate_proj", d, ff),
                    up: linear("mlp.up_proj", d, ff),
                    down: linear("mlp.down_proj", ff, d),
                },
            }
        }
    }
}

/// An `nn.Linear`-style layer over a `[out, in]` weight.
fn out_in(weight: TensorSpec, bias: Option<TensorSpec>) -> Linear<TensorSpec> {
    let (out_dim, in_dim) = (weight.shape[0], weight.shape[1]);
    Linear {
        weight,
        bias,
        in_dim,
        out_dim,
        layout: Layout::OutIn,
        layout_copy: Default::default(),
    }
}

/// Every tensor of [`describe`], in checkpoint order.
pub fn tensor_specs(cfg: &ModelConfig) -> Vec<TensorSpec> {
    describe(cfg).tensors().into_iter().cloned().collect()
}

/// `(input, output)` width of the MLP projection `proj` in `cfg`'s blocks, or `None` when this
/// family has no such projection.
pub fn site_dims(cfg: &ModelConfig, proj: MlpProj) -> Option<(usize, usize)> {
    describe_block(cfg, 0)
        .mlp
        .linear(proj)
        .map(|l| (l.in_dim, l.out_dim))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::presets::preset;

    /// Every layer's weight and bias have the shapes its widths and layout promise, so a loader
    /// that trusts the description reads each tensor the right way round.
    #[test]
    fn described_layers_match_their_tensor_shapes() {
        for (arch, name) in [
            (Arch::Gpt2, "tiny"),
            (Arch::Llama, "tiny"),
            (Arch::Llama, "smollm2-135m"),
        ] {
            let cfg = preset(arch, name).unwrap();
            let desc = describe(&cfg);
            let check = |l: &Linear<TensorSpec>| {
                let want = match l.layout {
                    Layout::InOut => vec![l.in_dim, l.out_dim],
                    Layout::OutIn => vec![l.out_dim, l.in_dim],
                };
                assert_eq!(l.weight.shape, want, "{}", l.weight.name);
                if let Some(b) = &l.bias {
                    assert_eq!(b.shape, vec![l.out_dim], "{}", b.name);
                }
            };
            for b in &desc.blocks {
                match &b.qkv {
                    QkvProj::Fused(l) => check(l),
                    QkvProj::Split { q, k, v } => [q, k, v].into_iter().for_each(check),
                }
                check(&b.o_proj);
                match &b.mlp {
                    Mlp::Gpt2 { c_fc, c_proj } => [c_fc, c_proj].into_iter().for_each(check),
                    Mlp::Llama { gate, up, down } => [gate, up, down].into_iter().for_each(check),
                }
            }
            desc.lm_head.iter().for_each(check);
            // GPT-2's head is always the embedding table; Llama's only when tied.
            let untied_llama = arch == Arch::Llama && !cfg.tie_word_embeddings;
            assert_eq!(desc.lm_head.is_some(), untied_llama, "{arch:?} {name}");
        }
    }

    #[test]
    fn site_dims_follow_the_description() {
        let cfg = preset(Arch::Llama, "tiny").unwrap();
        let (d, ff) = (cfg.hidden_size, cfg.intermediate_size);
        assert_eq!(site_dims(&cfg, MlpProj::DownProj), Some((ff, d)));
        assert_eq!(site_dims(&cfg, MlpProj::GateProj), Some((d, ff)));
        assert_eq!(site_dims(&cfg, MlpProj::CFc), None);
        let gpt2 = preset(Arch::Gpt2, "tiny").unwrap();
        assert_eq!(
            site_dims(&gpt2, MlpProj::CProj),
            Some((gpt2.intermediate_size, gpt2.hidden_size))
        );
    }
}
