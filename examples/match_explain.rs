//! Diagnostic: why does a prompt match the edit it matches? For each prompt, the key store's best
//! edits with the key variant and prompt position that scored, and the relation similarity.
//!
//! Usage: cargo run --release --example match_explain -- MODEL STATE "prompt" ["prompt" ...]
use std::path::Path;

use anyhow::{Context, Result};
use elder::elder::capture::capture_inputs;
use elder::elder::plan::key_texts;
use elder::session::{BaseModel, EditSession};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(args.len() >= 3, "usage: MODEL STATE PROMPT...");
    let base = BaseModel::open(Path::new(&args[0]))?;
    let session = EditSession::open(&base, Path::new(&args[1]), None)?;
    let elder = &session.elder;
    let store = elder
        .key_store
        .as_ref()
        .context("the state has no key store")?;
    let model = base.model()?;
    let sites = elder.key_sites();
    println!("scope threshold {:.3}", elder.scope_threshold());
    for prompt in &args[2..] {
        let tokens = base.tokenizer.encode(prompt)?;
        let input = &capture_inputs(model, std::slice::from_ref(&tokens), &sites)[0];
        let w = store.space.width;
        let q = store.query_keys(&input[&sites[0]]);
        let dim = store.space.dim;
        // Every (score, edit, variant, position), best first.
        let mut hits = Vec::new();
        for (pos, qk) in q.chunks(dim).enumerate() {
            for (k, key) in store.keys.chunks(dim).enumerate() {
                let s: f32 = qk.iter().zip(key).map(|(a, b)| a * b).sum();
                hits.push((s, k / store.variants, k % store.variants, pos));
            }
        }
        hits.sort_by(|a, b| b.0.total_cmp(&a.0));
        let relation_rows = sites.get(1).map(|site| input[site].as_slice());
        let picked =
            store.match_prompt(&input[&sites[0]], relation_rows, elder.cfg.relation_margin);
        // The prompt's relation key as the engine read it (around the picked edit's subject).
        let rel = match (&store.relation, relation_rows, picked) {
            (Some(keys), Some(rows), Some(m)) => {
                Some(keys.key(rows, keys.query_subject(m.entry, m.position)))
            }
            _ => None,
        };
        println!("\n{prompt:?}  ({} tokens, key width {w})", tokens.len());
        if let Some(m) = picked {
            println!(
                "  picked {} ({:?}) score {:.3} at position {}",
                elder.memory[m.entry].id, elder.memory[m.entry].prompt, m.score, m.position
            );
        }
        let mut seen = Vec::new();
        for (s, e, v, pos) in hits {
            if seen.contains(&e) {
                continue;
            }
            seen.push(e);
            let relation_sim = match (&store.relation, &rel) {
                (Some(keys), Some(r)) => keys.similarity(e, r),
                _ => f32::NAN,
            };
            // The engine's own ceilings (best similarity to background text), when it keeps them.
            let ceiling = |k: usize| match store.ceilings.of_keys.get(k) {
                Some(c) => format!("{c:.3}"),
                None => "off".to_string(),
            };
            let c = ceiling(e * store.variants + v);
            let all: Vec<String> = (0..store.variants)
                .map(|v| ceiling(e * store.variants + v))
                .collect();
            println!(
                "  {s:.3} (ceiling {c}; variants {})  {} variant {v} at position {pos} ({:?})  relation {relation_sim:.3}  {:?}",
                all.join(" "),
                elder.memory[e].id,
                base.tokenizer.decode(&tokens[pos..=pos])?,
                elder.memory[e].prompt
            );
            if seen.len() <= 2 {
                // Where this edit's keys were read: each key text with its key row marked.
                for (i, text) in key_texts(
                    &elder.cfg,
                    &base.tokenizer,
                    &elder.memory[e],
                    base.cfg.max_positions,
                )?
                .iter()
                .enumerate()
                {
                    let pieces: Vec<String> = text
                        .tokens
                        .iter()
                        .enumerate()
                        .map(|(p, t)| {
                            let s = base.tokenizer.decode(&[*t]).unwrap_or_default();
                            if p == text.key_row {
                                format!("[{s}]")
                            } else {
                                s
                            }
                        })
                        .collect();
                    println!("      key text {i}: {}", pieces.join("|"));
                }
            }
            if seen.len() == 5 {
                break;
            }
        }
    }
    Ok(())
}
