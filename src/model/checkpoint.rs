//! Writing model directories in the Hugging Face layout.
//! (Stub: owned by the weights work; a streaming writer replaces this.)

use std::path::Path;

use anyhow::Result;

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
    _out: &Path,
    _config_json: &serde_json::Value,
    _tensors: Vec<NamedTensor>,
    _tokenizer_json: Option<&str>,
    _dtype: StoreDtype,
) -> Result<()> {
    anyhow::bail!("write_hf_dir: not implemented yet")
}
