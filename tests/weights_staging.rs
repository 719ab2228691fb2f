//! The host half of the GPU upload (`runtime::cuda::staging`), which needs no GPU: the
//! tensors staged straight from a checkpoint's memory map in bf16, f16 and f32 are exactly what the
//! upload from the f32 CPU model produces (checked against an independent re-statement of that
//! upload: GPT-2's `c_attn` split into q|k|v column blocks by hand, every value through
//! `T::from_f32`), and a checkpoint stored in bf16 or f16 reaches the staged buffer byte for byte.

use std::path::{Path, PathBuf};

use bytemuck::Pod;
use elder::backend::dtype::Element;
use elder::backend::shapes::Layout;
use elder::model::checkpoint::{write_hf_dir, NamedTensor, StoreDtype};
use elder::model::layers::{Linear, Mlp, Norm};
use elder::model::loader::{check_checkpoint, load_model_dir};
use elder::model::names::tensor_specs;
use elder::model::transformer::QkvProj;
use elder::model::weights::Weights;
use elder::model::{Arch, Model, ModelConfig};
use elder::runtime::cuda::{Staged, WeightSource};
use half::{bf16, f16};

/// GPT-2 (fused c_attn, tied head), Llama (tied head), Llama with GQA and a separate lm_head.
const FIXTURES: [&str; 3] = ["gpt2-tiny", "llama-tiny", "llama-tiny-gqa"];

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity")
        .join(name)
}

fn checkpoint(dir: &Path) -> (ModelConfig, Weights) {
    (
        ModelConfig::from_dir(dir).unwrap(),
        Weights::open(dir).unwrap(),
    )
}

fn staged_from_checkpoint<T: Element>(dir: &Path) -> Vec<Staged<T>> {
    let (cfg, weights) = checkpoint(dir);
    WeightSource::Checkpoint {
        cfg: &cfg,
        weights: &weights,
    }
    .staged_tensors()
    .unwrap()
}

fn bytes<T: Pod>(v: &[T]) -> &[u8] {
    bytemuck::cast_slice(v)
}

/// The device tensors the upload from the CPU model made before staging existed, in its order:
/// embeddings, then per block norm1, q, k, v (GPT-2's fused layer cut into column blocks here, by
/// hand), o_proj, norm2, the MLP, then the final norm and an untied head; weight before bias.
fn cpu_upload<T: Element>(m: &Model) -> Vec<Vec<T>> {
    fn conv<T: Element>(v: &[f32]) -> Vec<T> {
        v.iter().map(|&x| T::from_f32(x)).collect()
    }
    fn lin<T: Element>(l: &Linear, out: &mut Vec<Vec<T>>) {
        out.push(conv(&l.weight));
        if let Some(b) = &l.bias {
            out.push(conv(b));
        }
    }
    fn norm<T: Element>(n: &Norm, out: &mut Vec<Vec<T>>) {
        match n {
            Norm::Layer { weight, bias, .. } => {
                out.push(conv(weight));
                out.push(conv(bias));
            }
            Norm::Rms { weight, .. } => out.push(conv(weight)),
        }
    }
    let mut out = vec![conv(&m.embed)];
    if let Some(p) = &m.pos_embed {
        out.push(conv(p));
    }
    for b in &m.blocks {
        norm(&b.norm1, &mut out);
        match &b.qkv {
            QkvProj::Fused(l) => {
                assert_eq!(l.layout, Layout::InOut, "GPT-2's Conv1D is [in, out]");
                let (d_in, width) = (l.in_dim, l.out_dim / 3);
                for j in 0..3 {
                    let w: Vec<f32> = (0..d_in)
                        .flat_map(|r| &l.weight[r * l.out_dim + j * width..][..width])
                        .copied()
                        .collect();
                    out.push(conv(&w));
                    let bias = l.bias.as_ref().expect("GPT-2's c_attn has a bias");
                    out.push(conv(&bias[j * width..(j + 1) * width]));
                }
            }
            QkvProj::Split { q, k, v } => [q, k, v].into_iter().for_each(|l| lin(l, &mut out)),
        }
        lin(&b.o_proj, &mut out);
        norm(&b.norm2, &mut out);
        match &b.mlp {
            Mlp::Gpt2 { c_fc, c_proj } => [c_fc, c_proj].into_iter().for_each(|l| lin(l, &mut out)),
            Mlp::Llama { gate, up, down } => {
                [gate, up, down].into_iter().for_each(|l| lin(l, &mut out))
            }
        }
    }
    norm(&m.final_norm, &mut out);
    if let Some(h) = &m.lm_head {
        lin(h, &mut out);
    }
    out
}

/// Staged from the checkpoint == staged from the CPU model == the old upload, bit for bit.
fn check_against_cpu<T: Element + Pod>(name: &str, dir: &Path) {
    let what = format!("{name} as {:?}", T::STORED);
    let cpu = load_model_dir(dir).unwrap();
    let from_checkpoint = staged_from_checkpoint::<T>(dir);
    let from_cpu = WeightSource::Model(&cpu).staged_tensors::<T>().unwrap();
    let oracle = cpu_upload::<T>(&cpu);
    assert_eq!(from_checkpoint.len(), oracle.len(), "{what}: tensor count");
    assert_eq!(from_cpu.len(), oracle.len(), "{what}: tensor count (CPU)");
    for ((c, m), want) in from_checkpoint.iter().zip(&from_cpu).zip(&oracle) {
        assert_eq!(c.name, m.name, "{what}: upload order");
        assert!(
            bytes(&c.values) == bytes(want),
            "{what}: {} differs from the CPU model's upload",
            c.name
        );
        assert!(
            bytes(&m.values) == bytes(want),
            "{what}: {} staged from the CPU model differs",
            m.name
        );
    }
}

#[test]
fn staged_checkpoints_equal_the_upload_of_the_cpu_model_in_every_dtype() {
    for name in FIXTURES {
        let dir = fixture_dir(name);
        check_against_cpu::<bf16>(name, &dir);
        check_against_cpu::<f16>(name, &dir);
        check_against_cpu::<f32>(name, &dir);
    }
}

/// What the device model is assembled from: q, k and v always split, with the widths and layouts
/// the kernels are given, and the head where (and only where) it is untied.
#[test]
fn staged_structure_has_split_qkv_and_the_right_head() {
    for name in FIXTURES {
        let (cfg, weights) = checkpoint(&fixture_dir(name));
        let source = WeightSource::Checkpoint {
            cfg: &cfg,
            weights: &weights,
        };
        let lens = source.stage::<bf16, _>(|s| Ok(s.values.len())).unwrap();
        let names: Vec<String> = source
            .staged_tensors::<bf16>()
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        let d = cfg.hidden_size;
        for b in &lens.blocks {
            let QkvProj::Split { q, k, v } = &b.qkv else {
                panic!("{name}: q/k/v reached the device fused");
            };
            assert_eq!((q.in_dim, q.out_dim), (d, cfg.q_dim()), "{name} q");
            for (l, tag) in [(k, "k"), (v, "v")] {
                assert_eq!((l.in_dim, l.out_dim), (d, cfg.kv_dim()), "{name} {tag}");
            }
            for l in [q, k, v] {
                assert_eq!(l.weight, l.in_dim * l.out_dim, "{name}: weight size");
                assert_eq!(l.bias, (cfg.arch == Arch::Gpt2).then_some(l.out_dim));
            }
        }
        match cfg.arch {
            Arch::Gpt2 => {
                assert!(names.contains(&"transformer.h.1.attn.c_attn.weight[k]".to_string()));
                assert!(names.contains(&"transformer.h.0.attn.c_attn.bias[v]".to_string()));
                assert!(!names.iter().any(|n| n.ends_with("c_attn.weight")));
                assert!(lens.lm_head.is_none(), "{name}: GPT-2's head is tied");
            }
            Arch::Llama => {
                assert_ne!(cfg.q_dim(), 0);
                let untied = !cfg.tie_word_embeddings;
                assert_eq!(lens.lm_head.is_some(), untied, "{name}: head");
                assert_eq!(names.last().unwrap() == "lm_head.weight", untied, "{name}");
            }
        }
    }
    // The GQA fixture really has fewer k/v heads and an untied head: the case above is not vacuous.
    let (gqa, _) = checkpoint(&fixture_dir("llama-tiny-gqa"));
    assert!(gqa.kv_dim() < gqa.q_dim() && !gqa.tie_word_embeddings);
}

/// The fixture rewritten with every tensor stored as `dtype`.
fn rewrite(name: &str, dtype: StoreDtype) -> tempfile::TempDir {
    let src = fixture_dir(name);
    let (cfg, weights) = checkpoint(&src);
    let tensors = tensor_specs(&cfg)
        .into_iter()
        .map(|s| NamedTensor {
            data: weights.load_spec(&s).unwrap(),
            name: s.name,
            shape: s.shape,
        })
        .collect();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let out = tempfile::tempdir().unwrap();
    write_hf_dir(out.path(), &config, tensors, None, dtype).unwrap();
    out
}

/// Stored as `T`: every tensor the upload takes whole is the checkpoint's bytes unchanged, and the
/// split parts are cut from those bytes.
fn check_copied<T: Element + Pod>(name: &str, dir: &Path) {
    let (_, weights) = checkpoint(dir);
    let staged = staged_from_checkpoint::<T>(dir);
    let mut whole = 0;
    for s in &staged {
        if s.name.ends_with(']') {
            continue;
        }
        let (raw, info) = weights.raw_bytes(&s.name).unwrap();
        assert_eq!(
            info.dtype,
            T::STORED,
            "{name}: {} not stored as expected",
            s.name
        );
        assert!(bytes(&s.values) == raw, "{name}: {} was not copied", s.name);
        whole += 1;
    }
    assert!(whole > staged.len() / 2, "{name}: too few whole tensors");
}

#[test]
fn half_checkpoints_are_copied_without_change_and_convert_like_the_cpu_model() {
    for name in ["gpt2-tiny", "llama-tiny-gqa"] {
        let as_bf16 = rewrite(name, StoreDtype::Bf16);
        let as_f16 = rewrite(name, StoreDtype::F16);
        check_copied::<bf16>(name, as_bf16.path());
        check_copied::<f16>(name, as_f16.path());
        // The split parts, and every cross-type conversion (bf16 -> f16, f16 -> bf16, either ->
        // f32), against the CPU model loaded from the same half checkpoint.
        for dir in [as_bf16.path(), as_f16.path()] {
            check_against_cpu::<bf16>(name, dir);
            check_against_cpu::<f16>(name, dir);
            check_against_cpu::<f32>(name, dir);
        }
    }
}

#[test]
fn a_missing_tensor_is_named_by_the_header_check_and_by_staging() {
    let src = fixture_dir("llama-tiny-gqa");
    let (cfg, weights) = checkpoint(&src);
    let missing = "model.layers.1.self_attn.k_proj.weight";
    let tensors = tensor_specs(&cfg)
        .into_iter()
        .filter(|s| s.name != missing)
        .map(|s| NamedTensor {
            data: weights.load_spec(&s).unwrap(),
            name: s.name,
            shape: s.shape,
        })
        .collect();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let out = tempfile::tempdir().unwrap();
    write_hf_dir(out.path(), &config, tensors, None, StoreDtype::Bf16).unwrap();
    let (cfg, weights) = checkpoint(out.path());
    let e = format!("{:#}", check_checkpoint(&cfg, &weights).unwrap_err());
    assert!(e.contains(missing), "{e}");
    let mut staged = 0;
    let e = WeightSource::Checkpoint {
        cfg: &cfg,
        weights: &weights,
    }
    .stage::<bf16, ()>(|_| {
        staged += 1;
        Ok(())
    })
    .unwrap_err();
    assert!(format!("{e:#}").contains(missing), "{e:#}");
    // Block 0 and the embeddings went through before block 1's k_proj was found missing.
    assert!(staged > 0);
}
