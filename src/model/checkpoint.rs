//! Writing model directories in the Hugging Face layout.
//! (TEMPORARY minimal version on the `gguf` branch so GGUF import can be tested; the weights
//! work's streaming writer replaces this at merge.)

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Storage dtype of a written checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDtype {
    F32,
    F16,
    Bf16,
}

/// One named tensor to write, held in f32.
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Writes `config.json`, `model.safetensors` and (when given) `tokenizer.json` into `out`.
pub fn write_hf_dir(
    out: &Path,
    config_json: &serde_json::Value,
    tensors: Vec<NamedTensor>,
    tokenizer_json: Option<&str>,
    dtype: StoreDtype,
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|t| {
            let bytes = match dtype {
                StoreDtype::F32 => bytemuck::cast_slice::<f32, u8>(&t.data).to_vec(),
                StoreDtype::F16 => t
                    .data
                    .iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                    .collect(),
                StoreDtype::Bf16 => t
                    .data
                    .iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect(),
            };
            (t.name, t.shape, bytes)
        })
        .collect();
    let st_dtype = match dtype {
        StoreDtype::F32 => safetensors::Dtype::F32,
        StoreDtype::F16 => safetensors::Dtype::F16,
        StoreDtype::Bf16 => safetensors::Dtype::BF16,
    };
    let views = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(st_dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .with_context(|| format!("tensor {name}: shape {shape:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let blob = safetensors::serialize(views, None).context("serializing safetensors")?;
    write_atomic(&out.join("model.safetensors"), &blob)?;
    let cfg = serde_json::to_string_pretty(config_json)?;
    write_atomic(&out.join("config.json"), cfg.as_bytes())?;
    if let Some(tok) = tokenizer_json {
        write_atomic(&out.join("tokenizer.json"), tok.as_bytes())?;
    }
    Ok(())
}

/// Temp file in the same directory, fsync, rename: readers never see a half-written file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}
