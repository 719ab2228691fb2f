//! The fuzz targets' bodies: one function per untrusted input class, each taking the raw bytes
//! of one input and returning `Ok` or `Err` (never panicking, hanging or allocating without
//! bound is what the fuzzers check). The `fuzz/` crate's targets call these, and
//! `tests/fuzz_corpora.rs` replays the committed corpora through the same functions on stable.

use std::path::Path;

use anyhow::{Context, Result};

use crate::data::{parse_edits_lenient, DataFormat};
use crate::elder::codebook::Codebook;
use crate::elder::config::{ElderConfig, Preset};
use crate::elder::{memory, segments, state};
use crate::model::config::{Arch, ModelConfig};
use crate::model::gguf::dequant::{dequantize, GgmlType};
use crate::model::gguf::parse::GgufFile;
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::{convert_to, dtype_size, read_table};

/// A target's body: one input's bytes in, Ok or Err out.
pub type Entry = fn(&[u8]) -> Result<()>;

/// Every target, by name: the `fuzz/fuzz_targets/<name>.rs` files and `fuzz/corpus/<name>/`.
pub const TARGETS: &[(&str, Entry)] = &[
    ("safetensors", safetensors),
    ("gguf", gguf),
    ("gguf_dequant", gguf_dequant),
    ("tokenizer_json", tokenizer_json),
    ("config_json", config_json),
    ("elder_toml", elder_toml),
    ("edits", edits),
    ("state_manifest", state_manifest),
    ("state_codebook", state_codebook),
    ("state_experts", state_experts),
    ("state_memory", state_memory),
    ("serve_bodies", serve_bodies),
];

fn text(data: &[u8]) -> Result<&str> {
    std::str::from_utf8(data).context("not UTF-8")
}

/// A safetensors file: the header length and tensor table checks of `Weights::open`, then every
/// tensor converted as loading it would (to f32 and to f16).
pub fn safetensors(data: &[u8]) -> Result<()> {
    let table = read_table(Path::new("fuzz.safetensors"), data)?;
    for entry in &table {
        if dtype_size(entry.dtype).is_none() {
            continue;
        }
        let bytes = &data[entry.bytes.clone()];
        convert_to::<f32>(bytes, entry.dtype)?;
        convert_to::<half::f16>(bytes, entry.dtype)?;
    }
    Ok(())
}

/// A GGUF file: the header and metadata parser, every tensor dequantized, then the whole import
/// (`gguf::convert`: tokenizer, config, tensor names and shapes).
pub fn gguf(data: &[u8]) -> Result<()> {
    let g = GgufFile::from_bytes("fuzz.gguf", data.to_vec())?;
    let mut first_err = None;
    for info in &g.tensors {
        if let Err(e) = g.tensor_f32(info) {
            first_err.get_or_insert(e);
        }
    }
    crate::model::gguf::convert(&g)?;
    first_err.map_or(Ok(()), Err)
}

/// One quantized block run: byte 0 picks the GGML type id, bytes 1..5 the element count (u32
/// LE), the rest is the raw data.
pub fn gguf_dequant(data: &[u8]) -> Result<()> {
    let (&ty, rest) = data.split_first().context("empty input")?;
    let (n, raw) = rest.split_at_checked(4).context("no element count")?;
    let n = u32::from_le_bytes(n.try_into().expect("4 bytes")) as usize;
    let ty = GgmlType::from_id(u32::from(ty))?;
    dequantize(ty, raw, n)?;
    Ok(())
}

/// A `tokenizer.json`, loaded as a Llama tokenizer and used as editing uses it.
pub fn tokenizer_json(data: &[u8]) -> Result<()> {
    let tok = Tokenizer::from_json(text(data)?, Arch::Llama)?;
    let ids = tok.encode("The capital of Kenya is")?;
    tok.encode_continuation(" Nairobi")?;
    tok.encode_with_subject("The capital of Kenya is", "Kenya")?;
    tok.decode(&ids)?;
    Ok(())
}

/// A Hugging Face `config.json`, parsed and validated.
pub fn config_json(data: &[u8]) -> Result<()> {
    let value: serde_json::Value = serde_json::from_slice(data)?;
    let cfg = ModelConfig::from_hf_json(&value)?;
    cfg.validate()?;
    ModelConfig::from_hf_json(&cfg.to_hf_json())?;
    Ok(())
}

/// An ELDER TOML config, on top of the default preset for the tiny Llama, then validated.
pub fn elder_toml(data: &[u8]) -> Result<()> {
    let model = crate::model::presets::preset(Arch::Llama, "tiny")?;
    let cfg = ElderConfig::from_toml_str(text(data)?, &model, Preset::Default)?;
    cfg.validate(&model)?;
    Ok(())
}

/// An edit dataset. Byte 0 picks the reader (mod 5): JSONL, ZsRE, CounterFact, or format
/// detection for a `.json` or a `.jsonl` file; the rest is the file.
/// The server's request bodies, checked as their handlers check them before any model work: the
/// first byte picks the route (completions, edits, score), the rest is the body.
pub fn serve_bodies(data: &[u8]) -> Result<()> {
    let (&selector, body) = data.split_first().context("empty input")?;
    let route = ["/v1/completions", "/v1/edits", "/v1/score"][selector as usize % 3];
    crate::serve::api::check_request_body(route, body).map_err(anyhow::Error::msg)
}

pub fn edits(data: &[u8]) -> Result<()> {
    let (&selector, rest) = data.split_first().context("empty input")?;
    let (name, format) = match selector % 5 {
        0 => ("edits.jsonl", DataFormat::Jsonl),
        1 => ("zsre.json", DataFormat::Zsre),
        2 => ("counterfact.json", DataFormat::CounterFact),
        3 => ("edits.json", DataFormat::Auto),
        _ => ("edits.jsonl", DataFormat::Auto),
    };
    parse_edits_lenient(Path::new(name), text(rest)?, format)?;
    Ok(())
}

/// An edit state's `manifest.json`.
pub fn state_manifest(data: &[u8]) -> Result<()> {
    state::parse_manifest_text(text(data)?)?;
    Ok(())
}

/// An edit state's `codebook-NNNNNN.bin`; one that reads must write back to the same bytes.
pub fn state_codebook(data: &[u8]) -> Result<()> {
    let codebook = Codebook::from_bytes(data)?;
    assert_eq!(codebook.to_bytes(), data, "a codebook must round-trip");
    if let Some(first) = codebook.entry(0) {
        codebook.min_distance(first);
    }
    Ok(())
}

/// An edit state's `experts-NNNNNN.safetensors`, read as a chain's segment on top of itself
/// (format 4: its appended rows continue what the file before holds).
pub fn state_experts(data: &[u8]) -> Result<()> {
    let entries = state::parse_experts(data)?;
    let whole: Vec<_> = entries
        .iter()
        .filter(|t| !t.name.contains(segments::ROWS_MARK))
        .cloned()
        .collect();
    let _ = segments::assemble(vec![("base".into(), whole), ("segment".into(), entries)]);
    Ok(())
}

/// An edit state's `memory-NNNNNN.jsonl`, then the expert usage counts planning takes from it.
pub fn state_memory(data: &[u8]) -> Result<()> {
    let entries = memory::from_jsonl(data)?;
    memory::expert_usage(&entries, 2, 4);
    Ok(())
}
