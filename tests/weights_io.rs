//! Weights::open / load over files written by the checkpoint writer, and over broken files.

use std::path::Path;

use elder::model::checkpoint::{
    write_hf_dir, write_safetensors_streaming, NamedTensor, StoreDtype, TensorSpec,
};
use elder::model::weights::{Dtype, Weights};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random_tensors(seed: u64) -> Vec<NamedTensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let shapes: [(&str, Vec<usize>); 4] = [
        ("transformer.wte.weight", vec![37, 16]),
        ("transformer.h.0.attn.c_attn.bias", vec![48]),
        ("big", vec![300, 301]), // takes the parallel conversion path
        ("scalar", vec![]),
    ];
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            NamedTensor {
                name: name.to_string(),
                shape,
                // Wide range so f16 rounding, subnormals and large values all occur.
                data: (0..n)
                    .map(|_| rng.gen_range(-300.0f32..300.0) * rng.gen::<f32>().powi(8))
                    .collect(),
            }
        })
        .collect()
}

fn err_text(r: anyhow::Result<impl std::fmt::Debug>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

fn config() -> serde_json::Value {
    serde_json::json!({"model_type": "gpt2", "note": "test"})
}

#[test]
fn round_trip_is_bit_exact_in_f32_and_rounds_in_half_types() {
    for dtype in [StoreDtype::F32, StoreDtype::F16, StoreDtype::Bf16] {
        let dir = tempfile::tempdir().unwrap();
        let tensors = random_tensors(1);
        let expected: Vec<(String, Vec<usize>, Vec<f32>)> = tensors
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone(), t.data.clone()))
            .collect();
        write_hf_dir(dir.path(), &config(), tensors, Some("{\"x\":1}"), dtype).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("tokenizer.json")).unwrap(),
            "{\"x\":1}"
        );
        let w = Weights::open(dir.path()).unwrap();
        assert_eq!(w.len(), expected.len());
        for (name, shape, data) in &expected {
            let info = w.info(name).unwrap();
            assert_eq!(&info.shape, shape);
            let got = w.load_f32(name, shape).unwrap();
            let want: Vec<f32> = match dtype {
                StoreDtype::F32 => data.clone(),
                StoreDtype::F16 => data
                    .iter()
                    .map(|&x| half::f16::from_f32(x).to_f32())
                    .collect(),
                StoreDtype::Bf16 => data
                    .iter()
                    .map(|&x| half::bf16::from_f32(x).to_f32())
                    .collect(),
            };
            let same_bits = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same_bits && got.len() == want.len(), "{dtype:?} {name}");
        }
        // No temporary files are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}

#[test]
fn shape_mismatch_and_missing_names_are_reported_in_full() {
    let dir = tempfile::tempdir().unwrap();
    write_hf_dir(
        dir.path(),
        &config(),
        random_tensors(2),
        None,
        StoreDtype::F32,
    )
    .unwrap();
    let w = Weights::open(dir.path()).unwrap();
    let e = err_text(w.load_f32("transformer.wte.weight", &[16, 37]));
    for part in [
        "model.safetensors",
        "transformer.wte.weight",
        "[37, 16]",
        "[16, 37]",
    ] {
        assert!(e.contains(part), "{part:?} missing in: {e}");
    }
    let e = err_text(w.load_f32_any(&["wte.weight", "transformer.wte.bias"], &[37, 16]));
    assert!(
        e.contains("wte.weight") && e.contains("transformer.wte.bias"),
        "{e}"
    );
    // The alternative that exists is found.
    let a = w
        .load_f32_any(&["wte.weight", "transformer.wte.weight"], &[37, 16])
        .unwrap();
    assert_eq!(a, w.load_f32("transformer.wte.weight", &[37, 16]).unwrap());
    assert!(w.contains("big") && !w.contains("nope"));
    let names: Vec<&str> = w.names().collect();
    assert!(names.windows(2).all(|p| p[0] < p[1]), "{names:?}");
}

fn write_raw(path: &Path, header: &str, data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(7u8, data_len));
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn unsupported_dtype_names_file_tensor_and_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let header = r#"{"ids":{"dtype":"I32","shape":[4],"data_offsets":[0,16]}}"#;
    write_raw(&dir.path().join("model.safetensors"), header, 16);
    let w = Weights::open(dir.path()).unwrap();
    assert_eq!(w.info("ids").unwrap().dtype, Dtype::I32);
    let e = err_text(w.load_f32("ids", &[4]));
    for part in ["model.safetensors", "ids", "I32"] {
        assert!(e.contains(part), "{part:?} missing in: {e}");
    }
}

#[test]
fn broken_files_are_errors_naming_the_file() {
    let good = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    type Case = (&'static str, Box<dyn Fn(&Path)>);
    let cases: Vec<Case> = vec![
        ("empty file", Box::new(|p| std::fs::write(p, b"").unwrap())),
        (
            "header length beyond the file",
            Box::new(|p| {
                let mut b = (1u64 << 20).to_le_bytes().to_vec();
                b.extend_from_slice(b"{}");
                std::fs::write(p, b).unwrap()
            }),
        ),
        ("bad JSON", Box::new(|p| write_raw(p, "{\"a\": [1, 2", 0))),
        (
            "data offsets beyond the file",
            Box::new(|p| {
                write_raw(
                    p,
                    r#"{"a":{"dtype":"F32","shape":[100],"data_offsets":[0,400]}}"#,
                    16,
                )
            }),
        ),
        ("truncated data", Box::new(move |p| write_raw(p, good, 12))),
        (
            "offsets disagree with shape",
            Box::new(|p| {
                write_raw(
                    p,
                    r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}"#,
                    16,
                )
            }),
        ),
    ];
    for (what, make) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        make(&path);
        let e = err_text(Weights::open(dir.path()));
        assert!(e.contains("model.safetensors"), "{what}: {e}");
    }
    // The well-formed version of the same file opens.
    let dir = tempfile::tempdir().unwrap();
    write_raw(&dir.path().join("model.safetensors"), good, 16);
    assert!(Weights::open(dir.path()).is_ok());
}

fn write_shards(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let mut all = Vec::new();
    for (k, names) in [["a.weight", "a.bias"], ["b.weight", "b.bias"]]
        .iter()
        .enumerate()
    {
        let specs: Vec<TensorSpec> = names.iter().map(|n| TensorSpec::new(*n, &[3, 5])).collect();
        let datas: Vec<Vec<f32>> = (0..2)
            .map(|i| {
                (0..15)
                    .map(|j| (k * 100 + i * 10 + j) as f32 * 0.5)
                    .collect()
            })
            .collect();
        let file = dir.join(format!("model-0000{}-of-00002.safetensors", k + 1));
        write_safetensors_streaming(&file, &specs, StoreDtype::F32, |i| Ok(datas[i].clone()))
            .unwrap();
        for (n, d) in names.iter().zip(datas) {
            all.push((n.to_string(), d));
        }
    }
    all
}

fn write_index(dir: &Path, map: serde_json::Value) {
    let idx = serde_json::json!({"metadata": {"total_size": 240}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), idx.to_string()).unwrap();
}

#[test]
fn sharded_checkpoints_load_and_bad_indexes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let all = write_shards(dir.path());
    let s1 = "model-00001-of-00002.safetensors";
    let s2 = "model-00002-of-00002.safetensors";
    write_index(
        dir.path(),
        serde_json::json!({"a.weight": s1, "a.bias": s1, "b.weight": s2, "b.bias": s2}),
    );
    let w = Weights::open(dir.path()).unwrap();
    assert_eq!(w.len(), 4);
    for (name, data) in &all {
        assert_eq!(&w.load_f32(name, &[3, 5]).unwrap(), data);
    }
    assert!(w.info("b.bias").unwrap().file.ends_with(s2));

    // Index naming a shard that is not there.
    write_index(
        dir.path(),
        serde_json::json!({"a.weight": s1, "c.weight": "model-00003-of-00003.safetensors"}),
    );
    let e = err_text(Weights::open(dir.path()));
    assert!(
        e.contains("model-00003-of-00003.safetensors") && e.contains("index"),
        "{e}"
    );

    // Index placing a tensor in the wrong shard.
    write_index(
        dir.path(),
        serde_json::json!({"a.weight": s2, "b.weight": s2}),
    );
    let e = err_text(Weights::open(dir.path()));
    assert!(e.contains("a.weight") && e.contains(s2), "{e}");

    // Index that is not JSON.
    std::fs::write(dir.path().join("model.safetensors.index.json"), "{oops").unwrap();
    let e = err_text(Weights::open(dir.path()));
    assert!(e.contains("model.safetensors.index.json"), "{e}");

    // A directory with no weights at all.
    let empty = tempfile::tempdir().unwrap();
    let e = err_text(Weights::open(empty.path()));
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn streaming_writer_rejects_wrong_sizes_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let specs = [TensorSpec::new("x", &[2, 3])];
    let e = err_text(write_safetensors_streaming(
        &path,
        &specs,
        StoreDtype::F16,
        |_| Ok(vec![1.0; 5]),
    ));
    assert!(
        e.contains("\"x\"") && e.contains('5') && e.contains('6'),
        "{e}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn fingerprint_is_stable_and_sensitive() {
    let dir = tempfile::tempdir().unwrap();
    write_hf_dir(
        dir.path(),
        &config(),
        random_tensors(3),
        None,
        StoreDtype::F32,
    )
    .unwrap();
    let fp = Weights::open(dir.path()).unwrap().fingerprint();
    assert_eq!(fp.len(), 64);
    assert_eq!(fp, Weights::open(dir.path()).unwrap().fingerprint());

    // Same files in another directory: same fingerprint.
    let copy = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(dir.path().join(f), copy.path().join(f)).unwrap();
    }
    assert_eq!(fp, Weights::open(copy.path()).unwrap().fingerprint());

    // A changed config changes it.
    std::fs::write(copy.path().join("config.json"), "{\"model_type\":\"gpt2\"}").unwrap();
    let fp_cfg = Weights::open(copy.path()).unwrap().fingerprint();
    assert_ne!(fp, fp_cfg);

    // Different weights (first bytes of data differ) change it.
    let other = tempfile::tempdir().unwrap();
    write_hf_dir(
        other.path(),
        &config(),
        random_tensors(4),
        None,
        StoreDtype::F32,
    )
    .unwrap();
    assert_ne!(fp, Weights::open(other.path()).unwrap().fingerprint());
}

#[test]
fn bad_names_and_failing_producers_leave_no_model_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let dup = [TensorSpec::new("x", &[2]), TensorSpec::new("x", &[3])];
    let e = err_text(write_safetensors_streaming(
        &path,
        &dup,
        StoreDtype::F32,
        |_| Ok(vec![0.5; 2]),
    ));
    assert!(e.contains("\"x\""), "{e}");
    let reserved = [TensorSpec::new("__metadata__", &[2])];
    assert!(
        write_safetensors_streaming(&path, &reserved, StoreDtype::F32, |_| Ok(vec![0.5; 2]))
            .is_err()
    );

    // A producer failing on the second tensor: no weights, no config.json, no temp files.
    let out = dir.path().join("model");
    let specs = [TensorSpec::new("a", &[2]), TensorSpec::new("b", &[2])];
    let e = err_text(elder::model::checkpoint::write_hf_dir_streaming(
        &out,
        &config(),
        &specs,
        Some("{}"),
        StoreDtype::F32,
        |i| {
            if i == 0 {
                Ok(vec![1.0, 2.0])
            } else {
                anyhow::bail!("generator broke")
            }
        },
    ));
    assert!(e.contains("generator broke") && e.contains("\"b\""), "{e}");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
}

#[test]
fn a_file_path_opens_that_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("custom.safetensors");
    let specs = [TensorSpec::new("w", &[2, 2])];
    write_safetensors_streaming(&file, &specs, StoreDtype::Bf16, |_| {
        Ok(vec![1.0, -2.0, 0.5, 3.0])
    })
    .unwrap();
    let w = Weights::open(&file).unwrap();
    assert_eq!(w.load_f32("w", &[2, 2]).unwrap(), vec![1.0, -2.0, 0.5, 3.0]);
    assert_eq!(w.info("w").unwrap().dtype, Dtype::BF16);
    let (raw, _) = w.raw_bytes("w").unwrap();
    assert_eq!(raw.len(), 8);
}
