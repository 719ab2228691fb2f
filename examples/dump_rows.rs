//! Diagnostic: dumps the inputs of MLP projections at every position of a list of prompts, for
//! analysis outside the engine (numpy). Input: JSONL of `{"text", "subject"}`; output in DIR:
//! `index.jsonl` (tokens, the subject's last-token position, the subject's token count) and one
//! raw little-endian f16 file per site (`b{block}_{proj}.f16`, rows of every prompt in order).
//!
//! Usage: cargo run --release --example dump_rows -- MODEL PROMPTS.jsonl OUT_DIR up:2,up:21,down:21

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{Context, Result};
use elder::elder::capture::capture_inputs;
use elder::model::layers::{MlpProj, Site};
use elder::session::BaseModel;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(args.len() == 4, "usage: MODEL PROMPTS.jsonl OUT_DIR SITES");
    let base = BaseModel::open(Path::new(&args[0]))?;
    let model = base.model()?;
    let tokenizer = &base.tokenizer;
    let out = Path::new(&args[2]);
    std::fs::create_dir_all(out)?;
    let sites: Vec<Site> = args[3]
        .split(',')
        .map(|s| {
            let (p, b) = s.split_once(':').context("site as proj:block")?;
            let proj = match p {
                "up" => MlpProj::UpProj,
                "down" => MlpProj::DownProj,
                other => anyhow::bail!("unknown projection {other}"),
            };
            Ok(Site {
                block: b.parse()?,
                proj,
            })
        })
        .collect::<Result<_>>()?;
    let mut prompts = Vec::new();
    let mut index = std::fs::File::create(out.join("index.jsonl"))?;
    for line in std::io::BufReader::new(std::fs::File::open(&args[1])?).lines() {
        let v: serde_json::Value = serde_json::from_str(&line?)?;
        let text = v["text"].as_str().context("text")?;
        let subject = v["subject"].as_str().unwrap_or("");
        let (tokens, pos) = tokenizer.encode_with_subject(text, subject)?;
        let subject_len = tokenizer
            .encode_continuation(&format!(" {}", subject.trim()))?
            .len();
        writeln!(
            index,
            "{}",
            serde_json::json!({"n": tokens.len(), "subject_pos": pos, "subject_len": subject_len})
        )?;
        prompts.push(tokens);
    }
    let mut files: Vec<_> = sites
        .iter()
        .map(|s| {
            let name = format!(
                "b{}_{}.f16",
                s.block,
                if s.proj == MlpProj::UpProj {
                    "up"
                } else {
                    "down"
                }
            );
            std::fs::File::create(out.join(name)).map(std::io::BufWriter::new)
        })
        .collect::<std::io::Result<_>>()?;
    for (i, chunk) in prompts.chunks(64).enumerate() {
        for per_site in capture_inputs(model, chunk, &sites) {
            for (site, file) in sites.iter().zip(files.iter_mut()) {
                for x in &per_site[site] {
                    file.write_all(&half::f16::from_f32(*x).to_le_bytes())?;
                }
            }
        }
        eprint!("\r{} / {}", (i + 1) * 64, prompts.len());
    }
    eprintln!();
    Ok(())
}
