//! Rebuilds a Hugging Face `tokenizer.json` from GGUF tokenizer metadata.
//!
//! Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`) is supported: the GGUF vocabulary and
//! merges are already in byte-level form ("Ġ" for space), so they go into a BPE model unchanged.
//! The pre-tokenizer is chosen from `tokenizer.ggml.pre`, mirroring llama.cpp's regex table.

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Map, Value};

use super::parse::GgufFile;

/// ggml token types (llama.cpp `llama_token_type`): these are matched as whole special tokens.
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// The regex of llama.cpp's `LLAMA_VOCAB_PRE_TYPE_LLAMA3` (also used by the HF Llama 3 tokenizer).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer.json document and anything the caller should be told about it.
pub struct BuiltTokenizer {
    pub json: String,
    pub vocab_size: usize,
    /// Set when `tokenizer.ggml.pre` was unknown and a plain GPT-2 pre-tokenizer was used.
    pub warning: Option<String>,
}

/// Builds tokenizer.json text from the file's `tokenizer.ggml.*` metadata.
pub fn build_tokenizer_json(g: &GgufFile) -> Result<BuiltTokenizer> {
    let file = g.path().display().to_string();
    let model = g.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        bail!(
            "{file}: tokenizer.ggml.model is {model:?}; only \"gpt2\" (byte-level BPE) can be \
             converted to tokenizer.json (SentencePiece \"llama\" vocabularies are not supported yet)"
        );
    }
    let tokens = string_array(g, "tokenizer.ggml.tokens")?;
    let merges = string_array(g, "tokenizer.ggml.merges")?;
    let types: Vec<u64> = match g.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(_) => g
            .get_array("tokenizer.ggml.token_type")?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                // token_type is an i32 array in practice; as_u64 accepts any non-negative integer.
                v.as_u64()
                    .with_context(|| format!("{file}: tokenizer.ggml.token_type[{i}] is {v}"))
            })
            .collect::<Result<_>>()?,
    };
    ensure!(
        types.len() == tokens.len(),
        "{file}: tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {}",
        types.len(),
        tokens.len()
    );

    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, (tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        // Duplicate token strings would silently shift ids in a JSON map; refuse them.
        ensure!(
            vocab.insert(tok.to_string(), json!(id)).is_none(),
            "{file}: token {tok:?} appears twice in tokenizer.ggml.tokens (second at id {id})"
        );
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == TOKEN_TYPE_CONTROL,
            }));
        }
    }
    let unk = g
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(|v| v.as_u64())
        .and_then(|id| tokens.get(id as usize))
        .map(|s| json!(s))
        .unwrap_or(Value::Null);

    let pre = g
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let (pre_tokenizer, byte_level_regex, warning) = pre_tokenizer_for(pre);
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {
            "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false,
            "use_regex": byte_level_regex,
        },
        "decoder": {
            "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
            "use_regex": byte_level_regex,
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });
    let json = serde_json::to_string(&doc).context("serializing tokenizer.json")?;
    Ok(BuiltTokenizer {
        json,
        vocab_size: tokens.len(),
        warning,
    })
}

/// (pre_tokenizer JSON, whether ByteLevel applies the GPT-2 regex itself, warning).
fn pre_tokenizer_for(pre: &str) -> (Value, bool, Option<String>) {
    let byte_level = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
               "use_regex": use_regex})
    };
    match pre {
        "gpt-2" | "gpt2" | "default" => (byte_level(true), true, None),
        // llama.cpp splits these on every single digit first, then applies the GPT-2 regex;
        // the HF SmolLM / StarCoder tokenizers express the same as Digits(individual) + ByteLevel.
        "smollm" | "starcoder" | "refact" | "codeshell" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}),
            true,
            None,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT},
                 "behavior": "Isolated", "invert": false},
                byte_level(false),
            ]}),
            false,
            None,
        ),
        other => (
            byte_level(true),
            true,
            Some(format!(
                "unknown tokenizer.ggml.pre {other:?}: used the plain GPT-2 pre-tokenizer, \
                 which may split some text differently from the original"
            )),
        ),
    }
}

fn string_array<'a>(g: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    g.get_array(key)?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str().with_context(|| {
                format!(
                    "{}: {key}[{i}] should be a string, found {}",
                    g.path().display(),
                    v.type_name()
                )
            })
        })
        .collect()
}
