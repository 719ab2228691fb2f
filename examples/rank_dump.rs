//! Diagnostic: every candidate the key store ranks for each rephrasing and locality probe of the
//! records a state holds, with its key score and relation similarity, as JSONL (for analysis
//! outside the engine of signals that could choose among an edited subject's edits). The ranking
//! is the relation key's alone (no `relation_words`): the baseline such a signal is added to.
//!
//! Usage: cargo run --release --example rank_dump -- MODEL STATE DATA.jsonl OUT.jsonl
use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{Context, Result};
use elder::elder::capture::capture_inputs;
use elder::session::{BaseModel, EditSession};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(args.len() == 4, "usage: MODEL STATE DATA.jsonl OUT.jsonl");
    let base = BaseModel::open(Path::new(&args[0]))?;
    let session = EditSession::open(&base, Path::new(&args[1]), None)?;
    let elder = &session.elder;
    let store = elder.key_store.as_ref().context("no key store")?;
    let model = base.model()?;
    let sites = elder.key_sites();
    let ids: std::collections::HashMap<&str, usize> = elder
        .memory
        .iter()
        .enumerate()
        .map(|(i, e)| (e.id.as_str(), i))
        .collect();
    let mut out = std::fs::File::create(&args[3])?;
    for line in std::io::BufReader::new(std::fs::File::open(&args[2])?).lines() {
        let v: serde_json::Value = serde_json::from_str(&line?)?;
        let Some(&own) = ids.get(v["id"].as_str().context("id")?) else {
            continue;
        };
        let mut queries: Vec<(String, String)> = v["rephrases"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| ("rephrase".to_string(), r.as_str().unwrap_or("").to_string()))
            .collect();
        for l in v["locality"].as_array().into_iter().flatten() {
            queries.push((
                l["kind"].as_str().unwrap_or("").to_string(),
                l["prompt"].as_str().unwrap_or("").to_string(),
            ));
        }
        queries.push(("prompt".to_string(), elder.memory[own].prompt.clone()));
        for (kind, text) in queries {
            let tokens = base.tokenizer.encode(&text)?;
            let input = &capture_inputs(model, std::slice::from_ref(&tokens), &sites)[0];
            let relation_rows = sites.get(1).map(|s| input[s].as_slice());
            let at = store.scores_at(&store.query_keys(&input[&sites[0]]));
            let ranked = store.rank_scores(at, relation_rows, elder.cfg.relation_margin);
            let cands: Vec<serde_json::Value> = ranked
                .iter()
                .map(|m| {
                    serde_json::json!({
                        "entry": m.entry,
                        "id": elder.memory[m.entry].id,
                        "score": m.score,
                        "relation": m.relation,
                    })
                })
                .collect();
            writeln!(
                out,
                "{}",
                serde_json::json!({"own": own, "kind": kind, "text": text, "cands": cands,
                    "threshold": elder.scope_threshold()})
            )?;
        }
    }
    Ok(())
}
