//! Builds a [`Model`] from any source of named tensors (a checkpoint on disk, or seeded random values)
//! following the tensor list of [`super::names`].

use std::cell::RefCell;
use std::collections::HashMap;

use anyhow::{Context, Result};
use rand::Rng;
use rayon::prelude::*;

use crate::backend::cpu::ops::Layout;

use super::config::{Arch, ModelConfig};
use super::layers::{Linear, Mlp, Norm};
use super::names::{tensor_specs, TensorSpec};
use super::presets::random_tensor;
use super::transformer::{Block, Model, QkvProj};
use super::weights::Weights;

/// Something that yields a model's tensors as f32, checked against the expected shape.
pub trait TensorSource: Sync {
    fn load(&self, spec: &TensorSpec) -> Result<Vec<f32>>;
}

/// Seeded random tensors, reproducible per (seed, tensor name) whatever the load order: the same
/// values `elder init-random` writes to disk.
pub struct RandomSource {
    pub seed: u64,
}

impl TensorSource for RandomSource {
    fn load(&self, spec: &TensorSpec) -> Result<Vec<f32>> {
        let n = spec.shape.iter().product();
        Ok(random_tensor(self.seed, &spec.name, n, spec.role))
    }
}

/// Box-Muller: one N(0,1) sample (for tests and initialisers that need single draws).
pub fn standard_normal(rng: &mut impl Rng) -> f32 {
    let u1: f32 = rng.gen_range(f32::MIN_POSITIVE..1.0);
    let u2: f32 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

impl TensorSource for Weights {
    /// Loads one tensor as f32, trying its aliases (GPT-2 keys without `transformer.`).
    fn load(&self, spec: &TensorSpec) -> Result<Vec<f32>> {
        let mut names: Vec<&str> = vec![&spec.name];
        names.extend(spec.aliases.iter().map(String::as_str));
        self.load_f32_any(&names, &spec.shape)
    }
}

/// Opens a model directory in the Hugging Face layout: `config.json` and the safetensors weights.
pub fn load_model_dir(dir: &std::path::Path) -> Result<Model> {
    let cfg = ModelConfig::from_dir(dir)?;
    let weights = Weights::open(dir)?;
    build_model(&cfg, &weights).with_context(|| format!("loading model from {}", dir.display()))
}

/// Loads every tensor of `cfg`'s family (in parallel) and assembles the model.
pub fn build_model(cfg: &ModelConfig, source: &dyn TensorSource) -> Result<Model> {
    cfg.validate()?;
    let specs = tensor_specs(cfg);
    let loaded: Vec<(String, Vec<f32>)> = specs
        .par_iter()
        .map(|s| Ok((s.name.clone(), source.load(s)?)))
        .collect::<Result<_>>()?;
    let tensors: RefCell<HashMap<String, Vec<f32>>> = RefCell::new(loaded.into_iter().collect());
    let take = |name: &str| -> Result<Vec<f32>> {
        tensors
            .borrow_mut()
            .remove(name)
            .with_context(|| format!("internal: tensor {name} was not loaded"))
    };
    let (d, ff) = (cfg.hidden_size, cfg.intermediate_size);
    let model = match cfg.arch {
        Arch::Gpt2 => {
            let conv1d = |p: &str, i: usize, o: usize| -> Result<Linear> {
                Ok(Linear {
                    weight: take(&format!("{p}.weight"))?,
                    bias: Some(take(&format!("{p}.bias"))?),
                    in_dim: i,
                    out_dim: o,
                    layout: Layout::InOut,
                })
            };
            let mut blocks = Vec::with_capacity(cfg.num_layers);
            for l in 0..cfg.num_layers {
                let p = format!("transformer.h.{l}");
                let c_attn = conv1d(&format!("{p}.attn.c_attn"), d, 3 * d)?;
                let o_proj = conv1d(&format!("{p}.attn.c_proj"), d, d)?;
                let c_fc = conv1d(&format!("{p}.mlp.c_fc"), d, ff)?;
                let c_proj = conv1d(&format!("{p}.mlp.c_proj"), ff, d)?;
                let eps = cfg.norm_eps;
                blocks.push(Block {
                    norm1: Norm::Layer {
                        weight: take(&format!("{p}.ln_1.weight"))?,
                        bias: take(&format!("{p}.ln_1.bias"))?,
                        eps,
                    },
                    qkv: QkvProj::Fused(c_attn),
                    o_proj,
                    norm2: Norm::Layer {
                        weight: take(&format!("{p}.ln_2.weight"))?,
                        bias: take(&format!("{p}.ln_2.bias"))?,
                        eps,
                    },
                    mlp: Mlp::Gpt2 { c_fc, c_proj },
                });
            }
            Model {
                cfg: cfg.clone(),
                embed: take("transformer.wte.weight")?,
                pos_embed: Some(take("transformer.wpe.weight")?),
                blocks,
                final_norm: Norm::Layer {
                    weight: take("transformer.ln_f.weight")?,
                    bias: take("transformer.ln_f.bias")?,
                    eps: cfg.norm_eps,
                },
                lm_head: None,
            }
        }
        Arch::Llama => {
            let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
            let linear = |name: String, i: usize, o: usize| -> Result<Linear> {
                Ok(Linear {
                    weight: take(&name)?,
                    bias: None,
                    in_dim: i,
                    out_dim: o,
                    layout: Layout::OutIn,
                })
            };
            let mut blocks = Vec::with_capacity(cfg.num_layers);
            for l in 0..cfg.num_layers {
                let p = format!("model.layers.{l}");
                let q = linear(format!("{p}.self_attn.q_proj.weight"), d, qd)?;
                let k = linear(format!("{p}.self_attn.k_proj.weight"), d, kvd)?;
                let v = linear(format!("{p}.self_attn.v_proj.weight"), d, kvd)?;
                let o_proj = linear(format!("{p}.self_attn.o_proj.weight"), qd, d)?;
                let gate = linear(format!("{p}.mlp.gate_proj.weight"), d, ff)?;
                let up = linear(format!("{p}.mlp.up_proj.weight"), d, ff)?;
                let down = linear(format!("{p}.mlp.down_proj.weight"), ff, d)?;
                blocks.push(Block {
                    norm1: Norm::Rms {
                        weight: take(&format!("{p}.input_layernorm.weight"))?,
                        eps: cfg.norm_eps,
                    },
                    qkv: QkvProj::Split { q, k, v },
                    o_proj,
                    norm2: Norm::Rms {
                        weight: take(&format!("{p}.post_attention_layernorm.weight"))?,
                        eps: cfg.norm_eps,
                    },
                    mlp: Mlp::Llama { gate, up, down },
                });
            }
            let lm_head = if cfg.tie_word_embeddings {
                None
            } else {
                Some(linear("lm_head.weight".into(), d, cfg.vocab_size)?)
            };
            Model {
                cfg: cfg.clone(),
                embed: take("model.embed_tokens.weight")?,
                pos_embed: None,
                blocks,
                final_norm: Norm::Rms {
                    weight: take("model.norm.weight")?,
                    eps: cfg.norm_eps,
                },
                lm_head,
            }
        }
    };
    Ok(model)
}
