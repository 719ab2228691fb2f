//! Diagnostic: the base model's next-token log-probabilities after each prompt of a JSONL file
//! (`{"text"}` per line), as raw little-endian f16 rows `[prompts, vocab]` in OUT.
//!
//! Usage: cargo run --release --example last_logits -- MODEL PROMPTS.jsonl OUT.f16

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{Context, Result};
use elder::model::runner::{last_rows, pad_batch};
use elder::model::transformer::{KvCache, NoAdapter};
use elder::session::BaseModel;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(args.len() == 3, "usage: MODEL PROMPTS.jsonl OUT.f16");
    let base = BaseModel::open(Path::new(&args[0]))?;
    let model = base.model()?;
    let mut prompts = Vec::new();
    for line in std::io::BufReader::new(std::fs::File::open(&args[1])?).lines() {
        let v: serde_json::Value = serde_json::from_str(&line?)?;
        prompts.push(base.tokenizer.encode(v["text"].as_str().context("text")?)?);
    }
    let mut out = std::io::BufWriter::new(std::fs::File::create(&args[2])?);
    let vocab = model.cfg.vocab_size;
    for (i, chunk) in prompts.chunks(16).enumerate() {
        let (ids, shape) = pad_batch(chunk, &vec![0; chunk.len()]);
        let mut cache = KvCache::new(&model.cfg, shape.batch, shape.seq);
        let h = model.forward_hidden(&ids, &shape, &mut cache, &mut NoAdapter);
        let (logits, _) = model.head(&h, &last_rows(&shape));
        for row in logits.chunks(vocab) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
            for x in row {
                out.write_all(&half::f16::from_f32(x - lse).to_le_bytes())?;
            }
        }
        eprint!("\r{} / {}", (i + 1) * 16, prompts.len());
    }
    eprintln!();
    Ok(())
}
