//! The CPU forward against logits computed by transformers (fixtures made by
//! tools/parity/make_fixtures.py): single prompts, one right-padded batch, and greedy decoding
//! with the KV cache. Tolerance: max |diff| <= 1e-4 in f32.

use std::path::Path;

use elder::model::loader::load_model_dir;
use elder::model::NoAdapter;
use serde_json::Value;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<f32>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            Value::Number(n) => out.push(n.as_f64().unwrap() as f32),
            _ => panic!("unexpected {v}"),
        }
    }
    walk(v, &mut out);
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check(name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity")
        .join(name);
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let model = load_model_dir(&dir).unwrap();
    let v = model.cfg.vocab_size;
    let prompts: Vec<Vec<u32>> = expected["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let mut worst = 0.0f32;
    for (i, p) in prompts.iter().enumerate() {
        let (logits, _) = model.logits(std::slice::from_ref(p), &mut NoAdapter);
        let want = floats(&expected["logits"][i]);
        let d = max_diff(&logits, &want);
        worst = worst.max(d);
        assert!(d <= 1e-4, "{name} prompt {i}: max |diff| {d}");
    }
    // The same prompts as one right-padded batch.
    let (batched, shape) = model.logits(&prompts, &mut NoAdapter);
    for (i, p) in prompts.iter().enumerate() {
        let got = &batched[i * shape.seq * v..][..p.len() * v];
        let d = max_diff(got, &floats(&expected["logits"][i]));
        assert!(d <= 1e-4, "{name} batched prompt {i}: max |diff| {d}");
    }
    // Greedy decoding with the KV cache.
    let start = expected["generate_prompt_index"].as_u64().unwrap() as usize;
    let want_gen = ids(&expected["generated"]);
    let got_gen = model.generate(
        &[prompts[start].clone()],
        want_gen.len(),
        None,
        &mut NoAdapter,
    );
    assert_eq!(got_gen[0], want_gen, "{name}: greedy continuation differs");
    eprintln!("{name}: max |logit diff| vs transformers {worst:.2e}");
}

#[test]
fn gpt2_matches_transformers() {
    check("gpt2-tiny");
}

#[test]
fn llama_matches_transformers() {
    check("llama-tiny");
}

#[test]
fn llama_gqa_untied_matches_transformers() {
    check("llama-tiny-gqa");
}
