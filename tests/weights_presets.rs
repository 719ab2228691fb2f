//! Random preset checkpoints: layout, determinism, readability by the engine's own loaders.

use elder::model::checkpoint::StoreDtype;
use elder::model::names::TensorRole;
use elder::model::presets::{hf_tensor_specs, preset, write_random_checkpoint};
use elder::model::tokenizer::Tokenizer;
use elder::model::weights::Weights;
use elder::model::{Arch, ModelConfig};

#[test]
fn tiny_checkpoints_have_exactly_the_hf_layout() {
    for arch in [Arch::Gpt2, Arch::Llama] {
        let dir = tempfile::tempdir().unwrap();
        write_random_checkpoint(arch, "tiny", 5, dir.path(), StoreDtype::F32).unwrap();
        let cfg = ModelConfig::from_dir(dir.path()).unwrap();
        assert_eq!(cfg, preset(arch, "tiny").unwrap());
        let w = Weights::open(dir.path()).unwrap();
        let specs = hf_tensor_specs(&cfg);
        assert_eq!(w.len(), specs.len());
        for (spec, init) in &specs {
            let v = w.load_f32(&spec.name, &spec.shape).unwrap();
            let mean = v.iter().sum::<f32>() / v.len() as f32;
            match init {
                TensorRole::NormWeight => assert!((mean - 1.0).abs() < 0.05, "{}", spec.name),
                _ => assert!(mean.abs() < 0.05, "{}", spec.name),
            }
            // Nothing is constant: a forgotten bias or norm gain would show.
            assert!(v.iter().any(|&x| x != v[0]), "{}", spec.name);
        }
        let tok = Tokenizer::from_dir(dir.path(), arch).unwrap();
        assert_eq!(tok.vocab_size(), cfg.vocab_size);
        assert_eq!(tok.eos_id(), cfg.eos_token_id);
        let ids = tok.encode("The capital of France is").unwrap();
        assert!(ids.iter().all(|&i| (i as usize) < cfg.vocab_size));
    }
}

#[test]
fn key_names_match_transformers() {
    let gpt2: Vec<String> = hf_tensor_specs(&preset(Arch::Gpt2, "tiny").unwrap())
        .into_iter()
        .map(|(s, _)| s.name)
        .collect();
    for k in [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.1.attn.c_attn.weight",
        "transformer.h.1.mlp.c_proj.bias",
        "transformer.ln_f.bias",
    ] {
        assert!(gpt2.iter().any(|n| n == k), "{k}");
    }
    assert!(!gpt2.iter().any(|n| n.contains("lm_head")));
    let llama = preset(Arch::Llama, "tiny").unwrap();
    let specs = hf_tensor_specs(&llama);
    let shape = |k: &str| {
        specs
            .iter()
            .find(|(s, _)| s.name == k)
            .map(|(s, _)| s.shape.clone())
    };
    assert_eq!(
        shape("model.layers.1.self_attn.k_proj.weight"),
        Some(vec![32, 64])
    );
    assert_eq!(
        shape("model.layers.0.mlp.down_proj.weight"),
        Some(vec![64, 128])
    );
    assert_eq!(shape("lm_head.weight"), Some(vec![512, 64]));
    let tied = hf_tensor_specs(&preset(Arch::Llama, "smollm2-135m").unwrap());
    assert!(!tied.iter().any(|(s, _)| s.name == "lm_head.weight"));
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes_and_half_dtypes_round() {
    let write = |seed, dtype| {
        let dir = tempfile::tempdir().unwrap();
        write_random_checkpoint(Arch::Llama, "tiny", seed, dir.path(), dtype).unwrap();
        dir
    };
    let a = write(9, StoreDtype::F32);
    let b = write(9, StoreDtype::F32);
    let c = write(10, StoreDtype::F32);
    let bytes = |d: &tempfile::TempDir| std::fs::read(d.path().join("model.safetensors")).unwrap();
    assert_eq!(bytes(&a), bytes(&b));
    assert_ne!(bytes(&a), bytes(&c));
    let fa = Weights::open(a.path()).unwrap().fingerprint();
    assert_eq!(fa, Weights::open(b.path()).unwrap().fingerprint());
    assert_ne!(fa, Weights::open(c.path()).unwrap().fingerprint());

    let h = write(9, StoreDtype::Bf16);
    let (wa, wh) = (
        Weights::open(a.path()).unwrap(),
        Weights::open(h.path()).unwrap(),
    );
    let name = "model.layers.0.self_attn.q_proj.weight";
    let full = wa.load_f32(name, &[64, 64]).unwrap();
    let half = wh.load_f32(name, &[64, 64]).unwrap();
    for (f, h) in full.iter().zip(&half) {
        assert_eq!(*h, half::bf16::from_f32(*f).to_f32());
    }
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(h.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg_json["torch_dtype"], "bfloat16");
}

#[test]
fn unknown_preset_is_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let e = format!(
        "{:#}",
        write_random_checkpoint(Arch::Gpt2, "gpt3", 1, &out, StoreDtype::F32).unwrap_err()
    );
    assert!(e.contains("gpt3") && e.contains("gpt2-xl"), "{e}");
    assert!(!out.exists());
}
