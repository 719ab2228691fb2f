//! Model hyperparameters, read from (and written to) a Hugging Face `config.json`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The model families the engine knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Gpt2,
    Llama,
}

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Gpt2 => "gpt2",
            Arch::Llama => "llama",
        }
    }
}

impl std::str::FromStr for Arch {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gpt2" => Ok(Arch::Gpt2),
            "llama" => Ok(Arch::Llama),
            other => bail!("unknown model_type {other:?}: supported are \"gpt2\" and \"llama\""),
        }
    }
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// Grouped-query attention: heads that share one K/V head. Equal to `num_heads` for GPT-2.
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub max_positions: usize,
    pub norm_eps: f32,
    /// Llama only.
    pub rope_theta: f32,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

/// The largest vocabulary, width, depth, head count or context length a config may declare
/// (2^24: far above any real model, small enough that the product of two, such as q_dim or a
/// weight matrix's element count, cannot overflow).
pub const MAX_SIZE: usize = 1 << 24;

fn get_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|x| x as usize)
}

fn get_f32(v: &Value, key: &str) -> Option<f32> {
    v.get(key).and_then(Value::as_f64).map(|x| x as f32)
}

/// `eos_token_id` may be a number or a list of numbers in HF configs; the first one is used.
fn get_token_id(v: &Value, key: &str) -> Option<u32> {
    match v.get(key)? {
        Value::Number(n) => n.as_u64().map(|x| x as u32),
        Value::Array(a) => a.first().and_then(Value::as_u64).map(|x| x as u32),
        _ => None,
    }
}

/// Options the forward pass does not implement: refused by name rather than silently ignored.
fn refuse_unsupported(arch: Arch, v: &Value) -> Result<()> {
    let is_true = |k: &str| v.get(k).and_then(Value::as_bool) == Some(true);
    match arch {
        Arch::Gpt2 => {
            if let Some(act) = v.get("activation_function").and_then(Value::as_str) {
                if act != "gelu_new" && act != "gelu_pytorch_tanh" {
                    bail!("activation_function {act:?} is not supported (only gelu_new)");
                }
            }
        }
        Arch::Llama => {
            for key in ["attention_bias", "mlp_bias"] {
                if is_true(key) {
                    bail!("{key} = true is not supported (Llama projections without bias only)");
                }
            }
            let scaling = v.get("rope_scaling").filter(|s| !s.is_null());
            let nested = v
                .get("rope_parameters")
                .and_then(|r| r.get("rope_type"))
                .and_then(Value::as_str);
            if scaling.is_some() || nested.is_some_and(|t| t != "default") {
                bail!(
                    "rope scaling ({}) is not supported: only plain rotary embeddings",
                    scaling.or(v.get("rope_parameters")).unwrap_or(&Value::Null)
                );
            }
            if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
                if act != "silu" {
                    bail!("hidden_act {act:?} is not supported (only silu)");
                }
            }
        }
    }
    Ok(())
}

impl ModelConfig {
    /// Reads `config.json` from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_hf_json(&v).with_context(|| format!("in model config {}", path.display()))
    }

    pub fn from_hf_json(v: &Value) -> Result<Self> {
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .context("missing \"model_type\"")?;
        let arch: Arch = model_type.parse()?;
        let need = |key: &str| -> Result<usize> {
            get_usize(v, key).with_context(|| format!("missing or non-integer field {key:?}"))
        };
        refuse_unsupported(arch, v)?;
        let cfg = match arch {
            Arch::Gpt2 => {
                let d = need("n_embd")?;
                let heads = need("n_head")?;
                ModelConfig {
                    arch,
                    vocab_size: need("vocab_size")?,
                    hidden_size: d,
                    num_layers: need("n_layer")?,
                    num_heads: heads,
                    num_kv_heads: heads,
                    head_dim: d / heads.max(1),
                    // Saturating: an absurd n_embd is refused by `validate`, not an overflow.
                    intermediate_size: get_usize(v, "n_inner").unwrap_or(d.saturating_mul(4)),
                    max_positions: need("n_positions")?,
                    norm_eps: get_f32(v, "layer_norm_epsilon").unwrap_or(1e-5),
                    rope_theta: 0.0,
                    tie_word_embeddings: v
                        .get("tie_word_embeddings")
                        .and_then(Value::as_bool)
                        .unwrap_or(true),
                    bos_token_id: get_token_id(v, "bos_token_id"),
                    eos_token_id: get_token_id(v, "eos_token_id"),
                }
            }
            Arch::Llama => {
                let d = need("hidden_size")?;
                let heads = need("num_attention_heads")?;
                ModelConfig {
                    arch,
                    vocab_size: need("vocab_size")?,
                    hidden_size: d,
                    num_layers: need("num_hidden_layers")?,
                    num_heads: heads,
                    num_kv_heads: get_usize(v, "num_key_value_heads").unwrap_or(heads),
                    head_dim: get_usize(v, "head_dim").unwrap_or(d / heads.max(1)),
                    intermediate_size: need("intermediate_size")?,
                    max_positions: get_usize(v, "max_position_embeddings").unwrap_or(2048),
                    norm_eps: get_f32(v, "rms_norm_eps").unwrap_or(1e-6),
                    // transformers >= 5 nests it in `rope_parameters`.
                    rope_theta: get_f32(v, "rope_theta")
                        .or_else(|| {
                            v.get("rope_parameters")
                                .and_then(|r| get_f32(r, "rope_theta"))
                        })
                        .unwrap_or(10000.0),
                    tie_word_embeddings: v
                        .get("tie_word_embeddings")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                    bos_token_id: get_token_id(v, "bos_token_id"),
                    eos_token_id: get_token_id(v, "eos_token_id"),
                }
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects shapes the forward pass cannot run.
    pub fn validate(&self) -> Result<()> {
        // Bounds every size, so the products the engine forms from them (q_dim, kv_dim, a weight
        // matrix's element count) cannot overflow on a damaged config.
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
            ("max_positions", self.max_positions),
        ];
        for (name, size) in sizes {
            if size > MAX_SIZE {
                bail!("{name} {size} is too large (at most {MAX_SIZE})");
            }
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_layers == 0 {
            bail!("vocab_size, hidden_size and num_layers must be positive");
        }
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            bail!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if self.arch == Arch::Gpt2 && self.num_kv_heads != self.num_heads {
            bail!(
                "GPT-2 has no grouped-query attention: num_kv_heads must equal n_head ({})",
                self.num_heads
            );
        }
        if self.arch == Arch::Gpt2 && self.head_dim * self.num_heads != self.hidden_size {
            bail!(
                "n_embd ({}) is not divisible by n_head ({})",
                self.hidden_size,
                self.num_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) && self.arch == Arch::Llama {
            bail!(
                "head_dim ({}) must be even for rotary embeddings",
                self.head_dim
            );
        }
        Ok(())
    }

    /// Width of the K and V projections.
    /// Refuses a sequence longer than the model's positions before any work is done on it.
    /// `parts` names what the sequence is made of (`("the prompt", 3000), ("the target", 2)`), so
    /// the message gives every number: what was asked for and what the model has.
    pub fn check_context(&self, parts: &[(&str, usize)]) -> Result<()> {
        let total: usize = parts.iter().map(|&(_, n)| n).sum();
        if total <= self.max_positions {
            return Ok(());
        }
        let listed: Vec<String> = parts
            .iter()
            .map(|(what, n)| format!("{what} ({n} tokens)"))
            .collect();
        bail!(
            "{} = {total} positions, more than the model's {} (its context length)",
            listed.join(" + "),
            self.max_positions
        )
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Width of the Q projection (equals hidden_size unless `head_dim` is set explicitly).
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// The config as transformers writes it, so transformers can load what the engine writes.
    pub fn to_hf_json(&self) -> Value {
        match self.arch {
            Arch::Gpt2 => json!({
                "architectures": ["GPT2LMHeadModel"],
                "model_type": "gpt2",
                "vocab_size": self.vocab_size,
                "n_embd": self.hidden_size,
                "n_layer": self.num_layers,
                "n_head": self.num_heads,
                "n_inner": self.intermediate_size,
                "n_positions": self.max_positions,
                "n_ctx": self.max_positions,
                "layer_norm_epsilon": self.norm_eps,
                "activation_function": "gelu_new",
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "tie_word_embeddings": true,
                "bos_token_id": self.bos_token_id.unwrap_or(50256),
                "eos_token_id": self.eos_token_id.unwrap_or(50256),
                "torch_dtype": "float32",
            }),
            Arch::Llama => json!({
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads,
                "head_dim": self.head_dim,
                "intermediate_size": self.intermediate_size,
                "max_position_embeddings": self.max_positions,
                "rms_norm_eps": self.norm_eps,
                "rope_theta": self.rope_theta,
                "hidden_act": "silu",
                "attention_bias": false,
                "mlp_bias": false,
                "tie_word_embeddings": self.tie_word_embeddings,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
                "torch_dtype": "float32",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_defaults_and_gqa() {
        let v = json!({"model_type":"llama","vocab_size":100,"hidden_size":64,"num_hidden_layers":2,
            "num_attention_heads":8,"num_key_value_heads":2,"intermediate_size":128});
        let c = ModelConfig::from_hf_json(&v).unwrap();
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.kv_dim(), 16);
        assert!(!c.tie_word_embeddings);
        let back = ModelConfig::from_hf_json(&c.to_hf_json()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn context_check_names_every_part_and_the_limit() {
        let v = json!({"model_type":"llama","vocab_size":100,"hidden_size":64,"num_hidden_layers":2,
            "num_attention_heads":8,"intermediate_size":128,"max_position_embeddings":16});
        let c = ModelConfig::from_hf_json(&v).unwrap();
        c.check_context(&[("the prompt", 10), ("the target", 6)])
            .unwrap();
        let err = c
            .check_context(&[("the prompt", 10), ("the target", 7)])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "the prompt (10 tokens) + the target (7 tokens) = 17 positions, more than the \
             model's 16 (its context length)"
        );
    }

    #[test]
    fn unknown_model_type_is_named() {
        let err = ModelConfig::from_hf_json(&json!({"model_type":"bert"})).unwrap_err();
        assert!(format!("{err:#}").contains("bert"), "{err:#}");
    }

    #[test]
    fn bad_gqa_is_refused() {
        let v = json!({"model_type":"llama","vocab_size":100,"hidden_size":64,"num_hidden_layers":2,
            "num_attention_heads":8,"num_key_value_heads":3,"intermediate_size":128});
        assert!(ModelConfig::from_hf_json(&v).is_err());
    }
}
