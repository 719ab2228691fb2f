//! The bundled GPT-2 tokenizer and the small synthetic tokenizers.

use elder::model::tokenizer::{small_bpe_tokenizer_json, Tokenizer};
use elder::model::Arch;

#[test]
fn gpt2_asset_matches_known_ids() {
    let t = Tokenizer::gpt2().unwrap();
    assert_eq!(t.encode("Hello world").unwrap(), vec![15496, 995]);
    assert_eq!(t.decode(&[15496, 995]).unwrap(), "Hello world");
    assert_eq!(t.vocab_size(), 50257);
    assert_eq!(t.eos_id(), Some(50256));
    assert!(!t.adds_special_tokens());
    let prompt = " The capital of France is";
    let ids = t.encode(prompt).unwrap();
    // " The"=383, " capital"=3139, " of"=286, " France"=4881, " is"=318 in GPT-2's vocab.
    assert_eq!(ids, vec![383, 3139, 286, 4881, 318]);
    assert_eq!(t.decode(&ids).unwrap(), prompt);
    let odd = "naïve café — 日本語 🚀\n\ttabs  and  spaces";
    assert_eq!(t.decode(&t.encode(odd).unwrap()).unwrap(), odd);
    // Ids past the tokenizer's vocabulary (padded embedding rows) decode to nothing.
    assert_eq!(t.decode(&[15496, 50300, 995]).unwrap(), "Hello world");
}

#[test]
fn from_dir_falls_back_to_gpt2_only_for_gpt2() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tokenizer::from_dir(dir.path(), Arch::Gpt2).unwrap();
    assert_eq!(t.encode("Hello world").unwrap(), vec![15496, 995]);
    let e = format!(
        "{:#}",
        Tokenizer::from_dir(dir.path(), Arch::Llama).unwrap_err()
    );
    assert!(e.contains("tokenizer.json"), "{e}");
    std::fs::write(dir.path().join("tokenizer.json"), "{broken").unwrap();
    let e = format!(
        "{:#}",
        Tokenizer::from_dir(dir.path(), Arch::Gpt2).unwrap_err()
    );
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn small_tokenizers_fill_their_vocabulary_and_round_trip() {
    for arch in [Arch::Gpt2, Arch::Llama] {
        let json = small_bpe_tokenizer_json(arch, 512).unwrap();
        let t = Tokenizer::from_json(&json, arch).unwrap();
        assert_eq!(t.vocab_size(), 512, "{arch:?}");
        // Every id below 512 is a distinct token.
        let vocab = t.inner().get_vocab(true);
        let mut ids: Vec<u32> = vocab.values().copied().collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids, (0..512).collect::<Vec<u32>>(), "{arch:?}");
        let text = " The capital of France is Paris. Zoë 日本 🚀";
        let ids = t.encode(text).unwrap();
        assert!(ids.iter().all(|&i| i < 512));
        // Merges learned from the corpus make common words shorter than their bytes.
        let common = t.encode(" The capital of France is Paris.").unwrap();
        assert!(common.len() <= 12, "{arch:?}: {} ids", common.len());
        assert_eq!(t.decode(&ids).unwrap(), text);
        match arch {
            Arch::Gpt2 => {
                assert_eq!(t.eos_id(), Some(511));
                assert_ne!(ids[0], 511);
            }
            Arch::Llama => {
                assert_eq!(t.eos_id(), Some(2));
                assert_eq!(ids[0], 1, "Llama tokenizer prepends <s>");
            }
        }
    }
}

#[test]
fn small_tokenizers_are_deterministic_and_refuse_tiny_vocabularies() {
    assert_eq!(
        small_bpe_tokenizer_json(Arch::Llama, 400).unwrap(),
        small_bpe_tokenizer_json(Arch::Llama, 400).unwrap()
    );
    assert!(small_bpe_tokenizer_json(Arch::Llama, 258).is_err());
    assert!(small_bpe_tokenizer_json(Arch::Gpt2, 256).is_err());
    // Exactly the minimum: bytes plus specials, no merges.
    let t = Tokenizer::from_json(
        &small_bpe_tokenizer_json(Arch::Gpt2, 257).unwrap(),
        Arch::Gpt2,
    )
    .unwrap();
    assert_eq!(t.encode("ab").unwrap().len(), 2);
    assert_eq!(t.eos_id(), Some(256));
}

#[test]
fn big_vocabularies_stop_when_the_corpus_runs_out() {
    let t0 = std::time::Instant::now();
    let json = small_bpe_tokenizer_json(Arch::Llama, 32000).unwrap();
    let t = Tokenizer::from_json(&json, Arch::Llama).unwrap();
    assert!(
        t.vocab_size() > 512 && t.vocab_size() < 32000,
        "{}",
        t.vocab_size()
    );
    let ids = t.encode("The capital of France is Paris.").unwrap();
    assert_eq!(t.decode(&ids).unwrap(), "The capital of France is Paris.");
    // A gpt2-shaped vocabulary keeps <|endoftext|> as the last id, past the unused gap.
    let json = small_bpe_tokenizer_json(Arch::Gpt2, 5000).unwrap();
    let g = Tokenizer::from_json(&json, Arch::Gpt2).unwrap();
    assert_eq!((g.vocab_size(), g.eos_id()), (5000, Some(4999)));
    assert!(t0.elapsed().as_secs() < 30, "{:?}", t0.elapsed());
}
