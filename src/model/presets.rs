//! Named model shapes and seeded random checkpoints in the exact Hugging Face key layout.
//!
//! Random checkpoints let every part of the engine (CLI, trainer, GPU kernels, benchmarks) run
//! end to end without downloading a model, at the real shapes of GPT-2, GPT-2 XL, Llama-7B and
//! SmolLM2-135M. Token ids in the big Llama-family presets follow the small synthetic tokenizer
//! written next to them (`<s>` = 1, `</s>` = 2), not the original tokenizers.
//!
//! Dtype: [`default_dtype`] picks f32 up to 200M parameters (tiny, gpt2: exact values, easy to
//! compare with references) and bf16 above (gpt2-xl is 6 GB in f32, 3 GB in bf16; llama-7b
//! 13.5 GB in bf16), which is how those models are distributed anyway.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::model::checkpoint::{write_hf_dir_streaming, StoreDtype, TensorSpec};
use crate::model::config::{Arch, ModelConfig};
use crate::model::names::{self, TensorRole};
use crate::model::tokenizer::{small_bpe_tokenizer_json, GPT2_TOKENIZER_JSON};

/// Preset names per architecture, in the order error messages list them.
pub fn preset_names(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::Gpt2 => &["tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"],
        Arch::Llama => &["tiny", "smollm2-135m", "llama-7b"],
    }
}

/// GPT-2's `<|endoftext|>`, used as both BOS and EOS.
const GPT2_EOS: u32 = 50256;
/// Ids of `<s>` and `</s>` in the synthetic Llama-family tokenizer (and in real Llama).
const LLAMA_BOS: u32 = 1;
const LLAMA_EOS: u32 = 2;

fn gpt2_shape(
    vocab: usize,
    d: usize,
    layers: usize,
    heads: usize,
    positions: usize,
) -> ModelConfig {
    // The synthetic tokenizer of small vocabularies puts <|endoftext|> last, as GPT-2 does.
    let eos = if vocab > GPT2_EOS as usize {
        GPT2_EOS
    } else {
        vocab as u32 - 1
    };
    ModelConfig {
        arch: Arch::Gpt2,
        vocab_size: vocab,
        hidden_size: d,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: heads,
        head_dim: d / heads,
        intermediate_size: 4 * d,
        max_positions: positions,
        norm_eps: 1e-5,
        rope_theta: 0.0,
        tie_word_embeddings: true,
        bos_token_id: Some(eos),
        eos_token_id: Some(eos),
    }
}

struct LlamaShape {
    vocab: usize,
    d: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    intermediate: usize,
    positions: usize,
    rope_theta: f32,
    tied: bool,
}

fn llama_shape(s: LlamaShape) -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        vocab_size: s.vocab,
        hidden_size: s.d,
        num_layers: s.layers,
        num_heads: s.heads,
        num_kv_heads: s.kv_heads,
        head_dim: s.d / s.heads,
        intermediate_size: s.intermediate,
        max_positions: s.positions,
        norm_eps: 1e-5,
        rope_theta: s.rope_theta,
        tie_word_embeddings: s.tied,
        bos_token_id: Some(LLAMA_BOS),
        eos_token_id: Some(LLAMA_EOS),
    }
}

/// The config of a named preset; an unknown name is an error listing the valid ones.
pub fn preset(arch: Arch, name: &str) -> Result<ModelConfig> {
    let cfg = match (arch, name) {
        (Arch::Gpt2, "tiny") => gpt2_shape(512, 64, 2, 4, 128),
        (Arch::Gpt2, "gpt2") => gpt2_shape(50257, 768, 12, 12, 1024),
        (Arch::Gpt2, "gpt2-medium") => gpt2_shape(50257, 1024, 24, 16, 1024),
        (Arch::Gpt2, "gpt2-large") => gpt2_shape(50257, 1280, 36, 20, 1024),
        (Arch::Gpt2, "gpt2-xl") => gpt2_shape(50257, 1600, 48, 25, 1024),
        (Arch::Llama, "tiny") => llama_shape(LlamaShape {
            vocab: 512,
            d: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 128,
            positions: 128,
            rope_theta: 10000.0,
            // Untied so the tiny model exercises the separate lm_head path.
            tied: false,
        }),
        (Arch::Llama, "smollm2-135m") => llama_shape(LlamaShape {
            vocab: 49152,
            d: 576,
            layers: 30,
            heads: 9,
            kv_heads: 3,
            intermediate: 1536,
            positions: 8192,
            rope_theta: 100000.0,
            tied: true,
        }),
        (Arch::Llama, "llama-7b") => llama_shape(LlamaShape {
            vocab: 32000,
            d: 4096,
            layers: 32,
            heads: 32,
            kv_heads: 32,
            intermediate: 11008,
            positions: 4096,
            rope_theta: 10000.0,
            tied: false,
        }),
        _ => bail!(
            "unknown {} preset {name:?}: valid presets are {}",
            arch.as_str(),
            preset_names(arch).join(", ")
        ),
    };
    cfg.validate()
        .with_context(|| format!("preset {name:?} is inconsistent"))?;
    Ok(cfg)
}

const INIT_STD: f32 = 0.02;

/// Every tensor of a model in transformers' key layout and shapes (the one list in
/// [`super::names`]), with how each is initialised.
pub fn hf_tensor_specs(cfg: &ModelConfig) -> Vec<(TensorSpec, TensorRole)> {
    names::tensor_specs(cfg)
        .into_iter()
        .map(|s| (TensorSpec::new(s.name, &s.shape), s.role))
        .collect()
}

/// Total parameter count of a config (tied embeddings counted once).
pub fn param_count(cfg: &ModelConfig) -> usize {
    hf_tensor_specs(cfg).iter().map(|(s, _)| s.numel()).sum()
}

/// f32 up to 200M parameters, bf16 above (see the module docs).
pub fn default_dtype(cfg: &ModelConfig) -> StoreDtype {
    if param_count(cfg) <= 200_000_000 {
        StoreDtype::F32
    } else {
        StoreDtype::Bf16
    }
}

/// Elements drawn from one ChaCha stream; chunks use separate streams so generation can run in
/// parallel and still give the same values on any number of threads.
const RNG_CHUNK: usize = 1 << 16;

/// The values of one tensor of a random checkpoint: a pure function of (seed, name, len, init).
pub fn random_tensor(seed: u64, name: &str, len: usize, init: TensorRole) -> Vec<f32> {
    let mut key_hash = Sha256::new();
    key_hash.update(seed.to_le_bytes());
    key_hash.update(name.as_bytes());
    let key: [u8; 32] = key_hash.finalize().into();
    let mut out = vec![0f32; len];
    out.par_chunks_mut(RNG_CHUNK)
        .enumerate()
        .for_each(|(chunk, dst)| {
            let mut rng = ChaCha8Rng::from_seed(key);
            rng.set_stream(chunk as u64);
            fill_normal(&mut rng, dst);
            // Norm gains sit near 1 with visible noise, so a forgotten norm weight changes the output.
            let (offset, std) = if init == TensorRole::NormWeight {
                (1.0, 0.1)
            } else {
                (0.0, INIT_STD)
            };
            for x in dst.iter_mut() {
                *x = offset + std * *x;
            }
        });
    out
}

/// Standard normal samples by Box-Muller (two per pair of uniforms).
fn fill_normal(rng: &mut ChaCha8Rng, dst: &mut [f32]) {
    for pair in dst.chunks_mut(2) {
        // 1 - u keeps the log argument in (0, 1].
        let u1: f32 = 1.0 - rng.gen::<f32>();
        let u2: f32 = rng.gen::<f32>();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
        pair[0] = r * c;
        if let Some(second) = pair.get_mut(1) {
            *second = r * s;
        }
    }
}

/// The tokenizer.json written with a random checkpoint of `cfg`.
pub fn tokenizer_json_for(cfg: &ModelConfig) -> Result<String> {
    if cfg.arch == Arch::Gpt2 && cfg.vocab_size > GPT2_EOS as usize {
        Ok(GPT2_TOKENIZER_JSON.to_string())
    } else {
        small_bpe_tokenizer_json(cfg.arch, cfg.vocab_size)
    }
}

/// Writes a seeded random checkpoint of a named preset (config.json, model.safetensors,
/// tokenizer.json) into `out`.
pub fn write_random_checkpoint(
    arch: Arch,
    preset_name: &str,
    seed: u64,
    out: &Path,
    dtype: StoreDtype,
) -> Result<()> {
    let cfg = preset(arch, preset_name)?;
    write_random_checkpoint_for(&cfg, seed, out, dtype)
}

/// Writes a seeded random checkpoint of any config. Tensors are generated one at a time while
/// the file is written, so memory stays at about one tensor.
pub fn write_random_checkpoint_for(
    cfg: &ModelConfig,
    seed: u64,
    out: &Path,
    dtype: StoreDtype,
) -> Result<()> {
    cfg.validate()?;
    let specs_init = hf_tensor_specs(cfg);
    let specs: Vec<TensorSpec> = specs_init.iter().map(|(s, _)| s.clone()).collect();
    let mut config_json = cfg.to_hf_json();
    config_json["torch_dtype"] = serde_json::Value::from(dtype.torch_name());
    let tokenizer = tokenizer_json_for(cfg)?;
    write_hf_dir_streaming(out, &config_json, &specs, Some(&tokenizer), dtype, |i| {
        let (spec, init) = &specs_init[i];
        Ok(random_tensor(seed, &spec.name, spec.numel(), *init))
    })
    .with_context(|| format!("writing random checkpoint to {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_preset_lists_valid_names() {
        let err = preset(Arch::Llama, "gpt2").unwrap_err().to_string();
        for name in preset_names(Arch::Llama) {
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn every_preset_is_valid_and_param_counts_match_the_real_models() {
        for arch in [Arch::Gpt2, Arch::Llama] {
            for name in preset_names(arch) {
                preset(arch, name).unwrap();
            }
        }
        // Published sizes: GPT-2 124.4M, GPT-2 XL 1.558B, Llama-7B 6.74B, SmolLM2 134.5M.
        let count = |a, n| param_count(&preset(a, n).unwrap());
        assert_eq!(count(Arch::Gpt2, "gpt2"), 124_439_808);
        assert_eq!(count(Arch::Gpt2, "gpt2-xl"), 1_557_611_200);
        assert_eq!(count(Arch::Llama, "llama-7b"), 6_738_415_616);
        assert_eq!(count(Arch::Llama, "smollm2-135m"), 134_515_008);
    }

    #[test]
    fn random_tensors_are_deterministic_and_distributed_as_asked() {
        let n = 3 * RNG_CHUNK + 5;
        let a = random_tensor(42, "w", n, TensorRole::Matrix);
        assert_eq!(a, random_tensor(42, "w", n, TensorRole::Matrix));
        assert_ne!(a, random_tensor(43, "w", n, TensorRole::Matrix));
        assert_ne!(a, random_tensor(42, "v", n, TensorRole::Matrix));
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 5e-4, "std {}", var.sqrt());
        let g = random_tensor(42, "g", 1000, TensorRole::NormWeight);
        let gmean = g.iter().sum::<f32>() / 1000.0;
        assert!((gmean - 1.0).abs() < 0.01 && g.iter().any(|&x| x != 1.0));
    }
}
