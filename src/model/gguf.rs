//! GGUF import: turns a llama.cpp GGUF file (Llama architecture) into a Hugging Face model
//! directory (config.json, model.safetensors, tokenizer.json) that the rest of the engine loads.
//!
//! Three things differ between GGUF and HF and are undone here:
//! - dims are listed fastest-axis first, so GGUF `ne = [in, out]` is the HF `[out, in]` matrix
//!   (same bytes, reversed shape);
//! - tensor names (`blk.N.attn_q.weight` vs `model.layers.N.self_attn.q_proj.weight`);
//! - llama.cpp's converter permutes the rows of q_proj/k_proj so that each head's rotary pairs are
//!   interleaved (2j, 2j+1) instead of HF's half-split (j, j + head_dim/2); see [`unpermute_rows`].

pub mod dequant;
pub mod parse;
pub mod tokenizer;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

pub use dequant::GgmlType;
pub use parse::{GgufFile, MetaValue, TensorInfo};

use super::checkpoint::{write_hf_dir, NamedTensor, StoreDtype};
use super::config::{Arch, ModelConfig};

/// What [`import_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    pub config: ModelConfig,
    pub tensors: usize,
    pub params: u64,
    /// GGUF storage type -> number of tensors stored in it.
    pub dtypes: BTreeMap<String, usize>,
    /// Things that imported but deserve a look (e.g. an unknown pre-tokenizer).
    pub warnings: Vec<String>,
}

impl std::fmt::Display for ImportSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "imported {} tensors, {} parameters ({:.1}M)",
            self.tensors,
            self.params,
            self.params as f64 / 1e6
        )?;
        let dtypes: Vec<String> = self
            .dtypes
            .iter()
            .map(|(k, v)| format!("{k} x{v}"))
            .collect();
        writeln!(f, "gguf storage types: {}", dtypes.join(", "))?;
        writeln!(
            f,
            "llama: {} layers, hidden {}, heads {} (kv {}), head_dim {}, ffn {}, vocab {}, tied {}",
            c.num_layers,
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.intermediate_size,
            c.vocab_size,
            c.tie_word_embeddings
        )?;
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

/// Converts `gguf` into an HF Llama directory at `out` (f32 safetensors).
pub fn import_gguf(gguf: &Path, out: &Path) -> Result<ImportSummary> {
    let g = GgufFile::open(gguf)?;
    let (tensors, summary, tok_json) = convert(&g)?;
    write_hf_dir(
        out,
        &summary.config.to_hf_json(),
        tensors,
        Some(&tok_json),
        StoreDtype::F32,
    )
    .with_context(|| format!("writing the imported model to {}", out.display()))?;
    Ok(summary)
}

/// Everything `import_gguf` writes, computed in memory: HF tensors, summary, tokenizer.json.
pub fn convert(g: &GgufFile) -> Result<(Vec<NamedTensor>, ImportSummary, String)> {
    let file = g.path().display().to_string();
    let arch = g.get_str("general.architecture")?;
    ensure!(
        arch == "llama",
        "{file}: general.architecture is {arch:?}; only \"llama\" GGUF files can be imported"
    );
    let tok = tokenizer::build_tokenizer_json(g)?;
    let config = llama_config(g, tok.vocab_size)?;

    let mut tensors = Vec::with_capacity(g.tensors.len());
    let mut dtypes = BTreeMap::new();
    let mut params = 0u64;
    for info in &g.tensors {
        let Some(hf_name) = hf_tensor_name(&info.name) else {
            // rope_freqs and similar are derived data the HF model recomputes.
            if info.name == "rope_freqs.weight" {
                continue;
            }
            bail!(
                "{file}: tensor {:?} has no Hugging Face Llama counterpart",
                info.name
            );
        };
        let shape = info.hf_shape();
        // Shapes first: a tensor the config cannot hold is refused before any work on it.
        check_shape(&config, &hf_name, &shape)
            .with_context(|| format!("{file}: {:?}", info.name))?;
        let mut data = g.tensor_f32(info)?;
        if hf_name.ends_with("q_proj.weight") {
            unpermute_rows(&mut data, &shape, config.num_heads)
                .with_context(|| format!("{file}: tensor {:?}", info.name))?;
        } else if hf_name.ends_with("k_proj.weight") {
            unpermute_rows(&mut data, &shape, config.num_kv_heads)
                .with_context(|| format!("{file}: tensor {:?}", info.name))?;
        }
        *dtypes.entry(info.dtype.name()).or_insert(0) += 1;
        params += data.len() as u64;
        tensors.push(NamedTensor {
            name: hf_name,
            shape,
            data,
        });
    }
    for needed in ["model.embed_tokens.weight", "model.norm.weight"] {
        ensure!(
            tensors.iter().any(|t| t.name == needed),
            "{file}: no tensor maps to {needed}"
        );
    }
    let summary = ImportSummary {
        config,
        tensors: tensors.len(),
        params,
        dtypes,
        warnings: tok.warning.into_iter().collect(),
    };
    Ok((tensors, summary, tok.json))
}

/// Builds the model config from `llama.*` metadata. `vocab_size` comes from the token list.
pub fn llama_config(g: &GgufFile, vocab_size: usize) -> Result<ModelConfig> {
    let u = |key: &str| -> Result<usize> { Ok(g.get_u64(&format!("llama.{key}"))? as usize) };
    let hidden = u("embedding_length")?;
    let heads = u("attention.head_count")?;
    ensure!(
        heads > 0,
        "{}: llama.attention.head_count is 0",
        g.path().display()
    );
    let kv_heads = match g.get("llama.attention.head_count_kv") {
        Some(_) => u("attention.head_count_kv")?,
        None => heads,
    };
    let head_dim = match g.get("llama.attention.key_length") {
        Some(_) => u("attention.key_length")?,
        None => hidden / heads,
    };
    let token_id = |key: &str| -> Result<Option<u32>> {
        match g.get(key) {
            None => Ok(None),
            Some(_) => Ok(Some(g.get_u64(key)? as u32)),
        }
    };
    let config = ModelConfig {
        arch: Arch::Llama,
        vocab_size,
        hidden_size: hidden,
        num_layers: u("block_count")?,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        intermediate_size: u("feed_forward_length")?,
        max_positions: u("context_length")?,
        norm_eps: g.get_f64("llama.attention.layer_norm_rms_epsilon")? as f32,
        rope_theta: match g.get("llama.rope.freq_base") {
            Some(_) => g.get_f64("llama.rope.freq_base")? as f32,
            None => 10000.0,
        },
        tie_word_embeddings: g.tensor_info("output.weight").is_none(),
        bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
        eos_token_id: token_id("tokenizer.ggml.eos_token_id")?,
    };
    config
        .validate()
        .with_context(|| format!("{}: llama.* metadata", g.path().display()))?;
    Ok(config)
}

/// The HF Llama name for a GGUF tensor name, or None for names with no counterpart.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    let top = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undoes llama.cpp's q/k row permutation in place.
///
/// The converter reshapes the HF `[heads * head_dim, in]` matrix to `[heads, 2, head_dim/2, in]`
/// and swaps axes 1 and 2, so GGUF row `h*hd + 2*j + i` is HF row `h*hd + i*hd/2 + j`.
pub fn unpermute_rows(data: &mut [f32], shape: &[usize], heads: usize) -> Result<()> {
    let [rows, cols] = shape else {
        bail!("q/k projection should be 2-D, found shape {shape:?}");
    };
    let (rows, cols) = (*rows, *cols);
    ensure!(
        rows.checked_mul(cols) == Some(data.len()),
        "shape {shape:?} does not hold the tensor's {} values",
        data.len()
    );
    ensure!(
        heads > 0 && rows % heads == 0 && (rows / heads).is_multiple_of(2),
        "cannot split {rows} rows into {heads} heads of even size"
    );
    if data.is_empty() {
        return Ok(());
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let src = data.to_vec();
    for h in 0..heads {
        for j in 0..half {
            for i in 0..2 {
                let from = (h * head_dim + 2 * j + i) * cols;
                let to = (h * head_dim + i * half + j) * cols;
                data[to..to + cols].copy_from_slice(&src[from..from + cols]);
            }
        }
    }
    Ok(())
}

/// Checks an HF tensor's shape against the config, so a metadata/tensor mismatch fails here
/// with both numbers instead of deep inside the forward pass.
fn check_shape(c: &ModelConfig, name: &str, shape: &[usize]) -> Result<()> {
    let d = c.hidden_size;
    let expected: Vec<usize> = if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
        vec![c.vocab_size, d]
    } else if name.ends_with("norm.weight") {
        vec![d]
    } else if name.ends_with("q_proj.weight") {
        vec![c.q_dim(), d]
    } else if name.ends_with("k_proj.weight") || name.ends_with("v_proj.weight") {
        vec![c.kv_dim(), d]
    } else if name.ends_with("o_proj.weight") {
        vec![d, c.q_dim()]
    } else if name.ends_with("gate_proj.weight") || name.ends_with("up_proj.weight") {
        vec![c.intermediate_size, d]
    } else if name.ends_with("down_proj.weight") {
        vec![d, c.intermediate_size]
    } else {
        return Ok(());
    };
    ensure!(
        shape == expected.as_slice(),
        "{name}: expected shape {expected:?} from the metadata, found {shape:?}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hf() {
        assert_eq!(
            hf_tensor_name("blk.12.attn_k.weight").as_deref(),
            Some("model.layers.12.self_attn.k_proj.weight")
        );
        assert_eq!(
            hf_tensor_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(
            hf_tensor_name("output.weight").as_deref(),
            Some("lm_head.weight")
        );
        assert_eq!(hf_tensor_name("blk.x.attn_k.weight"), None);
        assert_eq!(hf_tensor_name("blk.0.mystery.weight"), None);
    }

    /// The converter's permutation, written the way llama.cpp's Python does it (reshape/swap).
    fn llama_cpp_permute(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
        let hd = rows / heads;
        let mut out = vec![0.0; w.len()];
        // out[h, j, i, :] = w[h, i, j, :] with w viewed as [heads, 2, hd/2, cols].
        for h in 0..heads {
            for i in 0..2 {
                for j in 0..hd / 2 {
                    let src = (h * hd + i * (hd / 2) + j) * cols;
                    let dst = (h * hd + j * 2 + i) * cols;
                    out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_the_converter() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for (heads, hd, cols) in [(3, 8, 5), (2, 4, 1), (4, 64, 3)] {
            let rows = heads * hd;
            let hf: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut g = llama_cpp_permute(&hf, rows, cols, heads);
            assert_ne!(g, hf, "permutation should move rows for hd {hd}");
            unpermute_rows(&mut g, &[rows, cols], heads).unwrap();
            assert_eq!(g, hf);
        }
    }

    #[test]
    fn unpermute_rejects_bad_heads() {
        let mut d = vec![0.0; 12];
        assert!(unpermute_rows(&mut d, &[6, 2], 4).is_err());
        assert!(unpermute_rows(&mut d, &[12], 1).is_err());
    }
}
