//! Rebuilds a Hugging Face `tokenizer.json` from GGUF tokenizer metadata.
//!
//! - `tokenizer.ggml.model == "gpt2"` (byte-level BPE): the GGUF vocabulary and merges are already
//!   in byte-level form ("Ġ" for space), so they go into a BPE model unchanged; the pre-tokenizer
//!   is chosen from `tokenizer.ggml.pre`, mirroring llama.cpp's regex table.
//! - `"llama"` (SentencePiece BPE, Llama 1/2 style): merges are rebuilt from token scores and the
//!   result matches HF's `LlamaTokenizerFast` layout ("▁" for space, byte fallback).

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Map, Value};

use super::parse::GgufFile;

/// ggml token types (llama.cpp `llama_token_type`). Unknown, control and user-defined tokens
/// become HF added tokens (matched whole); byte tokens (6, "<0x41>") serve SentencePiece's byte
/// fallback; only normal tokens take part in reconstructed SentencePiece merges.
const TOKEN_TYPE_NORMAL: u64 = 1;
const TOKEN_TYPE_UNKNOWN: u64 = 2;
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
    if model != "gpt2" && model != "llama" {
        bail!(
            "{file}: tokenizer.ggml.model is {model:?}; only \"gpt2\" (byte-level BPE) and \
             \"llama\" (SentencePiece BPE) can be converted to tokenizer.json"
        );
    }
    let tokens = string_array(g, "tokenizer.ggml.tokens")?;
    let types: Vec<u64> = match g.get("tokenizer.ggml.token_type") {
        None => vec![TOKEN_TYPE_NORMAL; tokens.len()],
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
        if matches!(
            ty,
            TOKEN_TYPE_UNKNOWN | TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED
        ) {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty != TOKEN_TYPE_USER_DEFINED,
            }));
        }
    }
    let token_at = |key: &str| -> Option<(u64, &str)> {
        let id = g.get(key)?.as_u64()?;
        Some((id, *tokens.get(id as usize)?))
    };
    let unk = token_at("tokenizer.ggml.unknown_token_id").map(|(_, t)| t);
    let bos = token_at("tokenizer.ggml.bos_token_id");
    let flag = |key: &str, default: bool| g.get(key).and_then(|v| v.as_bool()).unwrap_or(default);
    // llama.cpp's defaults: SentencePiece vocabularies add BOS and a leading space, GPT-2 ones not.
    let spm = model == "llama";
    let add_bos = flag("tokenizer.ggml.add_bos_token", spm);
    let post_processor = match bos {
        Some((id, tok)) if add_bos => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": tok, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": tok, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": tok, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {tok: {"id": tok, "ids": [id], "tokens": [tok]}},
        }),
        _ => Value::Null,
    };

    let mut warning = None;
    let (normalizer, pre_tokenizer, decoder, merges, byte_fallback) = if spm {
        let scores = float_array(g, "tokenizer.ggml.scores", tokens.len())?;
        let merges = spm_merges(&tokens, &types, &scores);
        let space_prefix = flag("tokenizer.ggml.add_space_prefix", true);
        let mut norm =
            vec![json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"})];
        let mut dec = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if space_prefix {
            norm.insert(0, json!({"type": "Prepend", "prepend": "\u{2581}"}));
            dec.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        (
            json!({"type": "Sequence", "normalizers": norm}),
            Value::Null,
            json!({"type": "Sequence", "decoders": dec}),
            merges,
            true,
        )
    } else {
        let merges = string_array(g, "tokenizer.ggml.merges")?
            .into_iter()
            .map(str::to_string)
            .collect();
        let pre = g
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let (pre_tokenizer, byte_level_regex, w) = pre_tokenizer_for(pre);
        warning = w;
        let decoder = json!({
            "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
            "use_regex": byte_level_regex,
        });
        (Value::Null, pre_tokenizer, decoder, merges, false)
    };
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": spm,
            "byte_fallback": byte_fallback,
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

/// Pieces longer than this (in bytes) get no merges: splitting a piece of length L costs O(L^2)
/// (every cut hashes both halves), so one crafted megabyte-long token would stall an import;
/// real SentencePiece vocabularies stay far below it (Llama 2's longest piece is 16 characters).
const MAX_MERGED_PIECE_BYTES: usize = 256;

/// SentencePiece GGUF vocabularies carry scores instead of merges. As HF's converter does, every
/// split of a normal token into two normal tokens is a merge, ranked by the merged token's score
/// (higher first), ties broken by the merged token's id and then by the ids of the two halves.
/// Pieces over [`MAX_MERGED_PIECE_BYTES`] are left out, so the work is linear in the vocabulary.
fn spm_merges(tokens: &[&str], types: &[u64], scores: &[f32]) -> Vec<String> {
    let normal: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, &ty))| ty == TOKEN_TYPE_NORMAL)
        .map(|(id, (&t, _))| (t, id))
        .collect();
    // (score of merged, merged id, left id, right id, text)
    let mut merges: Vec<(f32, usize, usize, usize, String)> = Vec::new();
    for (&piece, &id) in &normal {
        if piece.len() > MAX_MERGED_PIECE_BYTES {
            continue;
        }
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if let (Some(&li), Some(&ri)) = (normal.get(l), normal.get(r)) {
                merges.push((scores[id], id, li, ri, format!("{l} {r}")));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    merges.into_iter().map(|m| m.4).collect()
}

fn float_array(g: &GgufFile, key: &str, len: usize) -> Result<Vec<f32>> {
    let file = g.path().display();
    let values = g.get_array(key)?;
    ensure!(
        values.len() == len,
        "{file}: {key} has {} entries, expected one per token ({len})",
        values.len()
    );
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_f64()
                .map(|x| x as f32)
                .with_context(|| format!("{file}: {key}[{i}] should be a number, found {v}"))
        })
        .collect()
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

#[cfg(test)]
mod merge_tests {
    use super::*;

    #[test]
    fn merges_come_from_splits_into_normal_pieces_and_long_pieces_cost_nothing() {
        let long = "a".repeat(2_000_000);
        let tokens = ["a", "b", "ab", "ba", "aba", long.as_str(), "c"];
        let types = [TOKEN_TYPE_NORMAL; 7];
        let scores = [0.0, 0.0, -1.0, -2.0, -0.5, 5.0, 0.0];
        // "aba" (score -0.5) splits as a|ba and ab|a; then "ab", then "ba". A quadratic split
        // of the two-megabyte piece would not finish; it is left out.
        assert_eq!(
            spm_merges(&tokens, &types, &scores),
            ["a ba", "ab a", "a b", "b a"]
        );
    }
}
