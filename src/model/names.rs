//! The Hugging Face tensor names and shapes of each model family: the one list that loading,
//! random initialisation and checkpoint writing all follow.

use super::config::{Arch, ModelConfig};

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

/// Names of the tensors of block `l` and of the whole model, in checkpoint order.
pub fn tensor_specs(cfg: &ModelConfig) -> Vec<TensorSpec> {
    use TensorRole::*;
    let (d, v, ff) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let mut out = Vec::new();
    let mut add =
        |name: String, shape: Vec<usize>, role| out.push(spec(name, shape, role, cfg.arch));
    match cfg.arch {
        Arch::Gpt2 => {
            add("transformer.wte.weight".into(), vec![v, d], Embedding);
            add(
                "transformer.wpe.weight".into(),
                vec![cfg.max_positions, d],
                Embedding,
            );
            for l in 0..cfg.num_layers {
                let p = format!("transformer.h.{l}");
                add(format!("{p}.ln_1.weight"), vec![d], NormWeight);
                add(format!("{p}.ln_1.bias"), vec![d], Bias);
                add(format!("{p}.attn.c_attn.weight"), vec![d, 3 * d], Matrix);
                add(format!("{p}.attn.c_attn.bias"), vec![3 * d], Bias);
                add(format!("{p}.attn.c_proj.weight"), vec![d, d], Matrix);
                add(format!("{p}.attn.c_proj.bias"), vec![d], Bias);
                add(format!("{p}.ln_2.weight"), vec![d], NormWeight);
                add(format!("{p}.ln_2.bias"), vec![d], Bias);
                add(format!("{p}.mlp.c_fc.weight"), vec![d, ff], Matrix);
                add(format!("{p}.mlp.c_fc.bias"), vec![ff], Bias);
                add(format!("{p}.mlp.c_proj.weight"), vec![ff, d], Matrix);
                add(format!("{p}.mlp.c_proj.bias"), vec![d], Bias);
            }
            add("transformer.ln_f.weight".into(), vec![d], NormWeight);
            add("transformer.ln_f.bias".into(), vec![d], Bias);
        }
        Arch::Llama => {
            let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
            add("model.embed_tokens.weight".into(), vec![v, d], Embedding);
            for l in 0..cfg.num_layers {
                let p = format!("model.layers.{l}");
                add(format!("{p}.input_layernorm.weight"), vec![d], NormWeight);
                add(format!("{p}.self_attn.q_proj.weight"), vec![qd, d], Matrix);
                add(format!("{p}.self_attn.k_proj.weight"), vec![kvd, d], Matrix);
                add(format!("{p}.self_attn.v_proj.weight"), vec![kvd, d], Matrix);
                add(format!("{p}.self_attn.o_proj.weight"), vec![d, qd], Matrix);
                add(
                    format!("{p}.post_attention_layernorm.weight"),
                    vec![d],
                    NormWeight,
                );
                add(format!("{p}.mlp.gate_proj.weight"), vec![ff, d], Matrix);
                add(format!("{p}.mlp.up_proj.weight"), vec![ff, d], Matrix);
                add(format!("{p}.mlp.down_proj.weight"), vec![d, ff], Matrix);
            }
            add("model.norm.weight".into(), vec![d], NormWeight);
            if !cfg.tie_word_embeddings {
                add("lm_head.weight".into(), vec![v, d], Matrix);
            }
        }
    }
    out
}
