//! Writing model directories in the Hugging Face layout (`config.json`, `model.safetensors`,
//! `tokenizer.json`) so that transformers and [`crate::model::weights::Weights`] can read them.
//!
//! Every file is written to a temporary name in the same directory, fsynced and renamed, so a
//! crash never leaves a half-written file under the real name. The safetensors writer streams:
//! the header is written from the shapes alone and each tensor is produced, converted and
//! written one at a time, so a 6 GB checkpoint never sits in memory twice.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use crate::util::atomic::{sync_dir, write_atomic, write_atomic_with};

/// Storage dtype of a written checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDtype {
    F32,
    F16,
    Bf16,
}

impl StoreDtype {
    /// The dtype tag in the safetensors header.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            StoreDtype::F32 => "F32",
            StoreDtype::F16 => "F16",
            StoreDtype::Bf16 => "BF16",
        }
    }

    pub fn size_bytes(self) -> usize {
        match self {
            StoreDtype::F32 => 4,
            StoreDtype::F16 | StoreDtype::Bf16 => 2,
        }
    }

    /// `torch_dtype` as transformers writes it in `config.json`.
    pub fn torch_name(self) -> &'static str {
        match self {
            StoreDtype::F32 => "float32",
            StoreDtype::F16 => "float16",
            StoreDtype::Bf16 => "bfloat16",
        }
    }
}

impl std::str::FromStr for StoreDtype {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(StoreDtype::F32),
            "f16" | "float16" | "fp16" => Ok(StoreDtype::F16),
            "bf16" | "bfloat16" => Ok(StoreDtype::Bf16),
            other => bail!("unknown dtype {other:?}: expected f32, f16 or bf16"),
        }
    }
}

/// One named f32 tensor; `data` is row-major with `shape.iter().product()` elements. Used for
/// checkpoints and for the edit state alike.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Name and shape of a tensor whose data is produced later by the streaming writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        TensorSpec {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Writes `config.json`, `model.safetensors` and (when given) `tokenizer.json` into `out`,
/// creating the directory. Tensors are written in the given order and each one's f32 buffer is
/// freed right after it is written.
pub fn write_hf_dir(
    out: &Path,
    config_json: &serde_json::Value,
    tensors: Vec<NamedTensor>,
    tokenizer_json: Option<&str>,
    dtype: StoreDtype,
) -> Result<()> {
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|t| TensorSpec::new(t.name.clone(), &t.shape))
        .collect();
    let mut slots: Vec<Option<Vec<f32>>> = tensors.into_iter().map(|t| Some(t.data)).collect();
    write_hf_dir_streaming(out, config_json, &specs, tokenizer_json, dtype, |i| {
        slots
            .get_mut(i)
            .and_then(Option::take)
            .with_context(|| format!("tensor #{i} requested twice"))
    })
}

/// Like [`write_hf_dir`], with tensor data produced on demand by `produce(index into specs)`.
pub fn write_hf_dir_streaming(
    out: &Path,
    config_json: &serde_json::Value,
    specs: &[TensorSpec],
    tokenizer_json: Option<&str>,
    dtype: StoreDtype,
    produce: impl FnMut(usize) -> Result<Vec<f32>>,
) -> Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create model directory {}", out.display()))?;
    let config_text =
        serde_json::to_string_pretty(config_json).context("cannot serialize config.json")?;
    // Weights first and config.json last: a directory with a config.json is complete.
    write_safetensors_streaming(&out.join("model.safetensors"), specs, dtype, produce)?;
    if let Some(tok) = tokenizer_json {
        write_atomic(&out.join("tokenizer.json"), tok.as_bytes())?;
    }
    write_atomic(&out.join("config.json"), config_text.as_bytes())?;
    sync_dir(out)
}

/// The safetensors header for `specs` stored as `dtype`, padded with spaces to a multiple of 8
/// bytes so the data that follows is aligned.
fn safetensors_header(specs: &[TensorSpec], dtype: StoreDtype) -> Result<Vec<u8>> {
    let mut map = serde_json::Map::new();
    map.insert(
        "__metadata__".to_string(),
        serde_json::json!({ "format": "pt" }),
    );
    let mut offset = 0usize;
    for spec in specs {
        let size = spec
            .shape
            .iter()
            .try_fold(dtype.size_bytes(), |acc, d| acc.checked_mul(*d))
            .with_context(|| format!("tensor {:?}: shape {:?} overflows", spec.name, spec.shape))?;
        let entry = serde_json::json!({
            "dtype": dtype.safetensors_name(),
            "shape": spec.shape,
            "data_offsets": [offset, offset + size],
        });
        if spec.name == "__metadata__" {
            bail!("\"__metadata__\" is reserved by safetensors and cannot name a tensor");
        }
        if map.insert(spec.name.clone(), entry).is_some() {
            bail!("tensor name {:?} is used twice", spec.name);
        }
        offset = offset
            .checked_add(size)
            .context("total checkpoint size overflows")?;
    }
    let mut header = serde_json::to_vec(&map).context("cannot serialize safetensors header")?;
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    Ok(header)
}

/// Writes a safetensors file whose tensors are produced one at a time by `produce(i)` for
/// `specs[i]`, in order. Each produced buffer must hold exactly `numel` values.
pub fn write_safetensors_streaming(
    path: &Path,
    specs: &[TensorSpec],
    dtype: StoreDtype,
    mut produce: impl FnMut(usize) -> Result<Vec<f32>>,
) -> Result<()> {
    let header = safetensors_header(specs, dtype)?;
    write_atomic_with(path, |w| {
        let io = |e: std::io::Error| anyhow::anyhow!("cannot write {}: {e}", path.display());
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&header).map_err(io)?;
        let mut buf: Vec<u8> = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let data = produce(i).with_context(|| {
                format!("producing tensor {:?} for {}", spec.name, path.display())
            })?;
            if data.len() != spec.numel() {
                bail!(
                    "tensor {:?} for {}: produced {} values, shape {:?} needs {}",
                    spec.name,
                    path.display(),
                    data.len(),
                    spec.shape,
                    spec.numel()
                );
            }
            encode_into(&data, dtype, &mut buf);
            drop(data);
            w.write_all(&buf).map_err(io)?;
        }
        Ok(())
    })
}

/// Elements per parallel work item when encoding; small tensors are encoded on one thread.
const ENCODE_CHUNK: usize = 1 << 15;

/// Little-endian encoding of `data` in `dtype` (round to nearest even for f16/bf16) into `buf`,
/// which is cleared first.
pub fn encode_into(data: &[f32], dtype: StoreDtype, buf: &mut Vec<u8>) {
    let size = dtype.size_bytes();
    buf.clear();
    buf.resize(data.len() * size, 0);
    let encode = |src: &[f32], dst: &mut [u8]| {
        for (v, out) in src.iter().zip(dst.chunks_exact_mut(size)) {
            match dtype {
                StoreDtype::F32 => out.copy_from_slice(&v.to_le_bytes()),
                StoreDtype::F16 => {
                    out.copy_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes())
                }
                StoreDtype::Bf16 => {
                    out.copy_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes())
                }
            }
        }
    };
    if data.len() <= ENCODE_CHUNK {
        encode(data, buf);
    } else {
        buf.par_chunks_mut(ENCODE_CHUNK * size)
            .zip(data.par_chunks(ENCODE_CHUNK))
            .for_each(|(dst, src)| encode(src, dst));
    }
}
