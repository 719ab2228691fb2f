//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`, grown by the fuzzers), seeds
//! (`fuzz/seeds/<target>/`, tools/fuzz_seeds.py) and the inputs that crashed a fuzzer once
//! (`fuzz/regressions/<target>/`, optional) on the stable toolchain: every
//! input goes through the same function its cargo-fuzz target calls
//! (`elder::util::fuzz_entry`), which must return (Ok or Err) without panicking. A missing or
//! empty corpus or seed folder fails, so these cannot pass vacuously. `tools/fuzz.sh` grows the corpora.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use elder::util::fuzz_entry::{self, Entry, TARGETS};

/// Corpus files are committed: keep them small (`cargo fuzz cmin`, drop big ones).
const MAX_INPUT_BYTES: u64 = 64 * 1024;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn replay(target: &str) {
    let (_, entry) = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no fuzz entry named {target:?}"));
    let mut files = Vec::new();
    for kind in ["corpus", "seeds", "regressions"] {
        let dir = fuzz_dir().join(kind).join(target);
        if kind == "regressions" && !dir.exists() {
            continue;
        }
        let mut found: Vec<PathBuf> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("folder {} is missing: {e}", dir.display()))
            .map(|e| e.expect("reading a corpus folder").path())
            .filter(|p| p.is_file())
            .collect();
        assert!(!found.is_empty(), "folder {} is empty", dir.display());
        found.sort();
        files.extend(found);
    }
    let (mut ok, mut err) = (0, 0);
    let mut panics = Vec::new();
    for file in &files {
        let size = fs::metadata(file).expect("corpus file metadata").len();
        assert!(
            size <= MAX_INPUT_BYTES,
            "{} is {size} bytes; corpus files must stay under {MAX_INPUT_BYTES}",
            file.display()
        );
        let bytes = fs::read(file).expect("reading a corpus file");
        match catch_unwind(AssertUnwindSafe(|| entry(&bytes))) {
            Ok(Ok(())) => ok += 1,
            Ok(Err(_)) => err += 1,
            Err(_) => panics.push(file.display().to_string()),
        }
    }
    eprintln!(
        "{target}: {} inputs, {ok} Ok, {err} Err, {} panics",
        files.len(),
        panics.len()
    );
    assert!(
        panics.is_empty(),
        "{target}: inputs that panic: {panics:#?}"
    );
}

macro_rules! replay_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                replay(stringify!($name));
            }
        )*

        /// Every entry has a replay test above, a fuzz target and a corpus, and the reverse.
        #[test]
        fn every_target_has_an_entry_a_replay_test_and_a_corpus() {
            let tested: Vec<&str> = vec![$(stringify!($name)),*];
            let entries: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
            assert_eq!(tested, entries, "replay tests vs elder::util::fuzz_entry::TARGETS");
            let names = |sub: &str, ext: Option<&str>| -> Vec<String> {
                let mut names: Vec<String> = fs::read_dir(fuzz_dir().join(sub))
                    .unwrap_or_else(|e| panic!("fuzz/{sub}: {e}"))
                    .map(|e| e.expect("reading fuzz/").path())
                    .filter(|p| ext.is_none_or(|x| p.extension().is_some_and(|e| e == x)))
                    .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                names
            };
            let mut sorted: Vec<String> = entries.iter().map(|s| s.to_string()).collect();
            sorted.sort();
            assert_eq!(names("fuzz_targets", Some("rs")), sorted, "fuzz/fuzz_targets/*.rs");
            assert_eq!(names("corpus", None), sorted, "fuzz/corpus/*");
            assert_eq!(names("seeds", None), sorted, "fuzz/seeds/*");
        }
    };
}

replay_tests!(
    safetensors,
    gguf,
    gguf_dequant,
    tokenizer_json,
    config_json,
    elder_toml,
    edits,
    state_manifest,
    state_codebook,
    state_experts,
    state_memory,
    serve_bodies,
);

/// The hand-made seeds (tools/fuzz_seeds.py) of these targets are valid inputs: the
/// fuzzers start from inputs that reach past the first checks.
#[test]
fn valid_seeds_are_accepted() {
    let valid: &[(&str, Entry, &[&str])] = &[
        (
            "safetensors",
            fuzz_entry::safetensors,
            &["mixed.safetensors", "empty.safetensors"],
        ),
        ("gguf", fuzz_entry::gguf, &["tiny-llama.gguf"]),
        (
            "gguf_dequant",
            fuzz_entry::gguf_dequant,
            &["type12", "fixture-q6_k"],
        ),
        (
            "elder_toml",
            fuzz_entry::elder_toml,
            &["iterations.toml", "paper.toml"],
        ),
        (
            "edits",
            fuzz_entry::edits,
            &["0-edits.jsonl", "1-zsre.json", "2-counterfact.json"],
        ),
        (
            "state_codebook",
            fuzz_entry::state_codebook,
            &["two-16bit.bin", "one-100bit.bin"],
        ),
        ("state_memory", fuzz_entry::state_memory, &["hand.jsonl"]),
        (
            "serve_bodies",
            fuzz_entry::serve_bodies,
            &[
                "0-completion.json",
                "0-list.json",
                "1-edits.json",
                "2-score.json",
            ],
        ),
        (
            "state_experts",
            fuzz_entry::state_experts,
            &["small.safetensors"],
        ),
    ];
    for (target, entry, files) in valid {
        for file in *files {
            let path = fuzz_dir().join("seeds").join(target).join(file);
            let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if let Err(e) = entry(&bytes) {
                panic!("{}: {e:#}", path.display());
            }
        }
    }
}

fn regression(target: &str, file: &str) -> Vec<u8> {
    let path = fuzz_dir().join("regressions").join(target).join(file);
    fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn expect_error(result: anyhow::Result<()>, needle: &str) {
    match result {
        Ok(()) => panic!("expected an error mentioning {needle:?}, got Ok"),
        Err(e) => {
            let message = format!("{e:#}");
            assert!(message.contains(needle), "{message}");
        }
    }
}

/// Found by the tokenizer_json fuzzer: tokenizers 0.22 panics ("Helper") on a JSON syntax error
/// inside the `decoder` object; `Tokenizer::from_json` now checks the JSON first.
#[test]
fn tokenizer_json_with_a_syntax_error_in_its_decoder_is_an_error() {
    let bytes = regression("tokenizer_json", "decoder-syntax-error.json");
    expect_error(fuzz_entry::tokenizer_json(&bytes), "invalid JSON");
}

/// tokenizers 0.22 panics ("Precompiled") on a well-formed `Precompiled` normalizer without its
/// charsmap; `Tokenizer::from_json` catches the panic and returns an error.
#[test]
fn tokenizer_json_with_a_precompiled_normalizer_without_charsmap_is_an_error() {
    let bytes = regression("tokenizer_json", "precompiled-without-charsmap.json");
    expect_error(
        fuzz_entry::tokenizer_json(&bytes),
        "not a valid tokenizer.json",
    );
}

/// Found by probing the config_json target: a GPT-2 config with a huge `n_embd` and no `n_inner`
/// overflowed `4 * n_embd` (a panic in debug builds); it is now refused by `validate`.
#[test]
fn config_json_with_a_huge_n_embd_is_an_error() {
    let bytes = regression("config_json", "gpt2-huge-n_embd.json");
    expect_error(fuzz_entry::config_json(&bytes), "too large");
}

/// A Llama config with a huge `head_dim` passed `validate`, then `q_dim()` overflowed where the
/// GGUF importer checks shapes; sizes are now bounded by `validate`.
#[test]
fn config_json_with_a_huge_head_dim_is_an_error() {
    let bytes = regression("config_json", "llama-huge-head_dim.json");
    expect_error(fuzz_entry::config_json(&bytes), "head_dim");
}

/// Found by the gguf fuzzer (a 10 s timeout): an empty `attn_q` tensor whose shape is
/// `[2^62 + 8, 0]` made `unpermute_rows` loop over 2^62 empty rows. Shapes are now checked
/// against the config before any work, and `unpermute_rows` checks the shape holds the data.
#[test]
fn gguf_with_an_empty_q_proj_of_huge_rows_is_an_error_not_a_hang() {
    let bytes = regression("gguf", "empty-q_proj-with-huge-rows.gguf");
    let start = std::time::Instant::now();
    expect_error(fuzz_entry::gguf(&bytes), "expected shape");
    assert!(start.elapsed().as_secs() < 5, "took {:?}", start.elapsed());
}

/// Found by the tokenizer_json fuzzer: a TemplateProcessing post-processor whose template names a
/// special token (`<w>`) missing from its `special_tokens` loads, then tokenizers 0.22 panics
/// ("no entry found for key") on every encode. `Tokenizer::from_json` now encodes a probe text
/// and refuses it, and every call into the crate turns a panic into an error.
#[test]
fn tokenizer_json_whose_template_names_an_undefined_special_token_is_an_error() {
    let bytes = regression(
        "tokenizer_json",
        "template-with-undefined-special-token.json",
    );
    expect_error(
        fuzz_entry::tokenizer_json(&bytes),
        "not a valid tokenizer.json: the tokenizers library failed on it",
    );
}

/// Seen (caught) by the tokenizer_json fuzzer after the fixes above: a BPE merge whose right half
/// is shorter than `continuing_subword_prefix` makes tokenizers 0.22 slice out of bounds while
/// loading; the panic is caught and the file refused.
#[test]
fn tokenizer_json_with_a_merge_shorter_than_the_subword_prefix_is_an_error() {
    let bytes = regression("tokenizer_json", "merge-shorter-than-subword-prefix.json");
    expect_error(
        fuzz_entry::tokenizer_json(&bytes),
        "not a valid tokenizer.json: the tokenizers library failed on it",
    );
}
