//! GGUF container parsing and the Llama import, on small files built in memory here.

use elder::model::gguf::{convert, GgufFile, MetaValue};
use rand::{Rng, SeedableRng};
use std::str::FromStr;

/// A minimal GGUF writer (the test's independent description of the format).
#[derive(Default)]
struct Writer {
    kvs: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    alignment: u64,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn tag(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::Str(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend(x.to_le_bytes()),
        MetaValue::I16(x) => out.extend(x.to_le_bytes()),
        MetaValue::U32(x) => out.extend(x.to_le_bytes()),
        MetaValue::I32(x) => out.extend(x.to_le_bytes()),
        MetaValue::U64(x) => out.extend(x.to_le_bytes()),
        MetaValue::I64(x) => out.extend(x.to_le_bytes()),
        MetaValue::F32(x) => out.extend(x.to_le_bytes()),
        MetaValue::F64(x) => out.extend(x.to_le_bytes()),
        MetaValue::Bool(b) => out.push(*b as u8),
        MetaValue::Str(s) => put_str(out, s),
        MetaValue::Array(a) => {
            out.extend(a.first().map(tag).unwrap_or(4).to_le_bytes());
            out.extend((a.len() as u64).to_le_bytes());
            for x in a {
                put_value(out, x);
            }
        }
    }
}

impl Writer {
    fn kv(&mut self, k: &str, v: MetaValue) -> &mut Self {
        self.kvs.push((k.into(), v));
        self
    }
    fn f32_tensor(&mut self, name: &str, ne: &[u64], data: &[f32]) -> &mut Self {
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensors.push((name.into(), ne.to_vec(), 0, bytes));
        self
    }
    fn bytes(&self, version: u32) -> Vec<u8> {
        let align = if self.alignment == 0 {
            32
        } else {
            self.alignment
        };
        let mut out = b"GGUF".to_vec();
        out.extend(version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            put_str(&mut out, k);
            out.extend(tag(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, ne, ty, data) in &self.tensors {
            put_str(&mut out, name);
            out.extend((ne.len() as u32).to_le_bytes());
            for d in ne {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len() as u64).div_ceil(align) * align;
        }
        let start = (out.len() as u64).div_ceil(align) * align;
        out.resize(start as usize, 0);
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize((start + off) as usize, 0);
            out.extend(data);
        }
        out
    }
}

fn s(x: &str) -> MetaValue {
    MetaValue::Str(x.into())
}

fn sample_writer() -> Writer {
    let mut w = Writer::default();
    w.kv("general.architecture", s("llama"))
        .kv("u8", MetaValue::U8(200))
        .kv("i8", MetaValue::I8(-5))
        .kv("u16", MetaValue::U16(60000))
        .kv("i16", MetaValue::I16(-30000))
        .kv("u32", MetaValue::U32(4_000_000_000))
        .kv("i32", MetaValue::I32(-7))
        .kv("u64", MetaValue::U64(1 << 40))
        .kv("i64", MetaValue::I64(-(1 << 40)))
        .kv("f32", MetaValue::F32(1.5))
        .kv("f64", MetaValue::F64(-2.25))
        .kv("bool", MetaValue::Bool(true))
        .kv("str", s("héllo"))
        .kv("arr", MetaValue::Array(vec![s("a"), s(""), s("c")]))
        .kv(
            "nested",
            MetaValue::Array(vec![
                MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(2)]),
                MetaValue::Array(vec![MetaValue::I32(3)]),
            ]),
        )
        .f32_tensor("a", &[3, 2], &[1., 2., 3., 4., 5., 6.])
        .f32_tensor("b", &[5], &[7., 8., 9., 10., 11.]);
    w
}

#[test]
fn metadata_of_every_type_round_trips() {
    let w = sample_writer();
    for version in [2, 3] {
        let g = GgufFile::from_bytes("sample.gguf", w.bytes(version)).unwrap();
        assert_eq!(g.version, version);
        for (k, v) in &w.kvs {
            assert_eq!(g.get(k), Some(v), "key {k}");
        }
        assert_eq!(g.get_u64("u32").unwrap(), 4_000_000_000);
        assert!(g.get_u64("i8").is_err(), "negative values are not u64");
        let a = g.tensor_info("a").unwrap();
        assert_eq!(a.hf_shape(), vec![2, 3]);
        assert_eq!(g.tensor_f32(a).unwrap(), vec![1., 2., 3., 4., 5., 6.]);
        let b = g.tensor_info("b").unwrap();
        assert_eq!(b.offset % 32, 0);
        assert_eq!(g.tensor_f32(b).unwrap(), vec![7., 8., 9., 10., 11.]);
    }
}

#[test]
fn custom_alignment_is_honoured() {
    let mut w = sample_writer();
    w.alignment = 64;
    w.kv("general.alignment", MetaValue::U32(64));
    let g = GgufFile::from_bytes("aligned.gguf", w.bytes(3)).unwrap();
    assert_eq!(g.alignment, 64);
    let b = g.tensor_info("b").unwrap();
    assert_eq!(b.offset, 64);
    assert_eq!(g.tensor_f32(b).unwrap(), vec![7., 8., 9., 10., 11.]);
}

#[test]
fn truncated_files_are_errors_not_panics() {
    let bytes = sample_writer().bytes(3);
    for cut in 0..bytes.len() {
        let parsed = GgufFile::from_bytes("cut.gguf", bytes[..cut].to_vec());
        // A cut inside the data section parses, but reading the cut tensor must fail.
        let ok = parsed.and_then(|g| {
            for t in g.tensors.clone() {
                g.tensor_f32(&t)?;
            }
            Ok(())
        });
        assert!(
            ok.is_err(),
            "a file cut at {cut} of {} bytes was accepted",
            bytes.len()
        );
    }
}

#[test]
fn corrupt_headers_name_the_problem() {
    let good = sample_writer().bytes(3);
    let err_of = |bytes: Vec<u8>| match GgufFile::from_bytes("bad.gguf", bytes) {
        Ok(_) => panic!("corrupt file accepted"),
        Err(e) => format!("{e:#}"),
    };
    let mut b = good.clone();
    b[0] = b'X';
    assert!(err_of(b).contains("magic"));
    let mut b = good.clone();
    b[4] = 1;
    assert!(err_of(b).contains("version 1"));
    // A kv count of 2^62 must not allocate or loop forever.
    let mut b = good.clone();
    b[16..24].copy_from_slice(&(1u64 << 62).to_le_bytes());
    assert!(!err_of(b).is_empty());
    // First key length claims more bytes than the file has.
    let mut b = good.clone();
    b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = err_of(b);
    assert!(e.contains("exceeds"), "{e}");
    let e = match GgufFile::open(std::path::Path::new("/nonexistent/x.gguf")) {
        Ok(_) => panic!(),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("/nonexistent/x.gguf"), "{e}");
}

/// llama.cpp's q/k row permutation (HF half-split pairs -> interleaved pairs).
fn permute_like_llama_cpp(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..hd / 2 {
                let src = (h * hd + i * (hd / 2) + j) * cols;
                let dst = (h * hd + 2 * j + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

#[test]
fn tiny_llama_imports_with_names_shapes_and_unpermuted_qk() {
    let (d, heads, kv, hd, ffn, layers) = (8usize, 2usize, 1usize, 4usize, 12usize, 2usize);
    let tokens = ["<|endoftext|>", "a", "b", "ab", "Ġ", "Ġab"];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut rand = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
    let mut w = Writer::default();
    let u = |x: usize| MetaValue::U32(x as u32);
    w.kv("general.architecture", s("llama"))
        .kv("llama.context_length", u(128))
        .kv("llama.embedding_length", u(d))
        .kv("llama.block_count", u(layers))
        .kv("llama.feed_forward_length", u(ffn))
        .kv("llama.attention.head_count", u(heads))
        .kv("llama.attention.head_count_kv", u(kv))
        .kv(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-5),
        )
        .kv("llama.rope.freq_base", MetaValue::F32(10000.0))
        .kv("tokenizer.ggml.model", s("gpt2"))
        .kv("tokenizer.ggml.pre", s("smollm"))
        .kv(
            "tokenizer.ggml.tokens",
            MetaValue::Array(tokens.iter().map(|t| s(t)).collect()),
        )
        .kv(
            "tokenizer.ggml.token_type",
            MetaValue::Array(
                [3, 1, 1, 1, 1, 1]
                    .iter()
                    .map(|&t| MetaValue::I32(t))
                    .collect(),
            ),
        )
        .kv(
            "tokenizer.ggml.merges",
            MetaValue::Array(vec![s("a b"), s("Ġ ab")]),
        )
        .kv("tokenizer.ggml.bos_token_id", u(0))
        .kv("tokenizer.ggml.eos_token_id", u(0));
    let embed = rand(tokens.len() * d);
    w.f32_tensor(
        "token_embd.weight",
        &[d as u64, tokens.len() as u64],
        &embed,
    );
    let mut hf_q = Vec::new();
    let mut hf_k = Vec::new();
    for l in 0..layers {
        let q = rand(heads * hd * d);
        let k = rand(kv * hd * d);
        let p = |n: &str| format!("blk.{l}.{n}.weight");
        let (d64, f64_, kvd) = (d as u64, ffn as u64, (kv * hd) as u64);
        w.f32_tensor(&p("attn_norm"), &[d64], &rand(d))
            .f32_tensor(
                &p("attn_q"),
                &[d64, d64],
                &permute_like_llama_cpp(&q, d, d, heads),
            )
            .f32_tensor(
                &p("attn_k"),
                &[d64, kvd],
                &permute_like_llama_cpp(&k, kv * hd, d, kv),
            )
            .f32_tensor(&p("attn_v"), &[d64, kvd], &rand(kv * hd * d))
            .f32_tensor(&p("attn_output"), &[d64, d64], &rand(d * d))
            .f32_tensor(&p("ffn_norm"), &[d64], &rand(d))
            .f32_tensor(&p("ffn_gate"), &[d64, f64_], &rand(d * ffn))
            .f32_tensor(&p("ffn_up"), &[d64, f64_], &rand(d * ffn))
            .f32_tensor(&p("ffn_down"), &[f64_, d64], &rand(d * ffn));
        hf_q.push(q);
        hf_k.push(k);
    }
    w.f32_tensor("output_norm.weight", &[d as u64], &rand(d));

    let g = GgufFile::from_bytes("tiny.gguf", w.bytes(3)).unwrap();
    let (tensors, summary, tok_json) = convert(&g).unwrap();
    let c = &summary.config;
    assert_eq!(
        (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim),
        (d, heads, kv, hd)
    );
    assert_eq!(
        (c.num_layers, c.intermediate_size, c.vocab_size),
        (layers, ffn, tokens.len())
    );
    assert!(c.tie_word_embeddings);
    assert_eq!((c.bos_token_id, c.eos_token_id), (Some(0), Some(0)));
    assert_eq!(summary.tensors, 2 + 9 * layers);
    assert_eq!(summary.dtypes.get("F32"), Some(&(2 + 9 * layers)));

    let find = |n: &str| tensors.iter().find(|t| t.name == n).unwrap();
    assert_eq!(find("model.embed_tokens.weight").data, embed);
    assert_eq!(
        find("model.embed_tokens.weight").shape,
        vec![tokens.len(), d]
    );
    for l in 0..layers {
        let q = find(&format!("model.layers.{l}.self_attn.q_proj.weight"));
        assert_eq!(q.shape, vec![d, d]);
        assert_eq!(q.data, hf_q[l], "layer {l} q_proj not unpermuted");
        let k = find(&format!("model.layers.{l}.self_attn.k_proj.weight"));
        assert_eq!(k.shape, vec![kv * hd, d]);
        assert_eq!(k.data, hf_k[l], "layer {l} k_proj not unpermuted");
        assert_eq!(
            find(&format!("model.layers.{l}.mlp.down_proj.weight")).shape,
            vec![d, ffn]
        );
    }

    let tok = tokenizers::Tokenizer::from_str(&tok_json).unwrap();
    let enc = tok.encode("ab ab<|endoftext|>", false).unwrap();
    assert_eq!(enc.get_ids(), &[3, 5, 0]);
}

#[test]
fn metadata_shape_mismatch_is_reported() {
    // Claims hidden size 8 but the embedding is 6 wide.
    let mut w = Writer::default();
    let u = |x: u32| MetaValue::U32(x);
    w.kv("general.architecture", s("llama"))
        .kv("llama.context_length", u(16))
        .kv("llama.embedding_length", u(8))
        .kv("llama.block_count", u(1))
        .kv("llama.feed_forward_length", u(4))
        .kv("llama.attention.head_count", u(2))
        .kv(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-5),
        )
        .kv("tokenizer.ggml.model", s("gpt2"))
        .kv(
            "tokenizer.ggml.tokens",
            MetaValue::Array(vec![s("a"), s("b")]),
        )
        .kv("tokenizer.ggml.merges", MetaValue::Array(vec![]))
        .f32_tensor("token_embd.weight", &[6, 2], &[0.0; 12]);
    let g = GgufFile::from_bytes("mismatch.gguf", w.bytes(3)).unwrap();
    let e = match convert(&g) {
        Ok(_) => panic!("mismatch accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("token_embd.weight") && e.contains("[2, 8]") && e.contains("[2, 6]"),
        "{e}"
    );
}

#[test]
fn sentencepiece_vocabulary_becomes_a_working_tokenizer() {
    // Llama-2 style: merges come from scores; "c" is only reachable through byte fallback.
    let toks = [
        "<unk>",
        "<s>",
        "</s>",
        "<0x63>",
        "\u{2581}",
        "a",
        "b",
        "ab",
        "\u{2581}ab",
        "ba",
    ];
    let types = [2, 3, 3, 6, 1, 1, 1, 1, 1, 1];
    let scores = [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -9.0];
    let mut w = Writer::default();
    w.kv("tokenizer.ggml.model", s("llama"))
        .kv(
            "tokenizer.ggml.tokens",
            MetaValue::Array(toks.iter().map(|t| s(t)).collect()),
        )
        .kv(
            "tokenizer.ggml.token_type",
            MetaValue::Array(types.iter().map(|&t| MetaValue::I32(t)).collect()),
        )
        .kv(
            "tokenizer.ggml.scores",
            MetaValue::Array(scores.iter().map(|&x| MetaValue::F32(x)).collect()),
        )
        .kv("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
        .kv("tokenizer.ggml.unknown_token_id", MetaValue::U32(0));
    let g = GgufFile::from_bytes("spm.gguf", w.bytes(3)).unwrap();
    let built = elder::model::gguf::tokenizer::build_tokenizer_json(&g).unwrap();
    let tok = tokenizers::Tokenizer::from_str(&built.json).unwrap();
    let enc = tok.encode("ab abc", true).unwrap();
    assert_eq!(enc.get_ids(), &[1, 8, 8, 3], "{:?}", enc.get_tokens());
    assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "ab abc");
    // "ba" must win over "b" + "a" only through its merge; "bab" -> "ba" + "b" or "b" + "ab":
    // "ab" has the higher score (-4 > -9), so the merge "a b" applies first.
    let enc = tok.encode("bab", false).unwrap();
    assert_eq!(enc.get_tokens(), &["\u{2581}", "b", "ab"]);
}
