//! Diagnostic: can an edit's own experts tell whether a prompt asks about that edit? For every
//! rephrasing and locality probe of the first T records, the key store's best-scoring edits are
//! tried one at a time (their experts forced on), and for each the script writes the probe's
//! accuracy under it and how strongly the experts push towards that edit's own target (the log
//! probability of its first token at the last prompt row, beside the base model's). An offline
//! analysis (tools/expert_gate.py) then replays selection and gating rules on the JSON lines.
//!
//! Usage: cargo run --release --example expert_gate -- MODEL STATE DATA T OUT.jsonl [CANDIDATES]
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use elder::backend::cpu::ops;
use elder::data::{read_edits, DataFormat};
use elder::elder::capture::capture_inputs;
use elder::elder::molora::{Elder, ElderAdapter};
use elder::model::runner::{pad_batch, prompt_rows, target_rows};
use elder::model::{KvCache, Model, NoAdapter};
use elder::session::{BaseModel, EditSession};

/// Per pair: the argmax of each continuation row and the log-softmax of the first one (the last
/// prompt row). `forced`: every sequence answered by that edit's experts; `None` with `elder`:
/// the engine's own decision; neither: the base model.
fn forward_pairs(
    model: &Model,
    elder: Option<&Elder>,
    forced: Option<&[usize]>,
    pairs: &[(&[u32], &[u32])],
) -> Vec<(Vec<u32>, Vec<f32>)> {
    let seqs: Vec<Vec<u32>> = pairs.iter().map(|(p, c)| [*p, *c].concat()).collect();
    let (ids, shape) = pad_batch(&seqs, &vec![0; seqs.len()]);
    let mut cache = KvCache::new(&model.cfg, shape.batch, shape.seq);
    let rows = prompt_rows(shape.seq, pairs.iter().map(|(p, _)| p.len()));
    let h = match elder {
        Some(e) => {
            let mut adapter = ElderAdapter::inference(e, rows);
            if let Some(f) = forced {
                let edits: Vec<Option<usize>> = f.iter().map(|&i| Some(i)).collect();
                adapter.routing = Some(e.stored_routing(&edits));
                adapter.in_scope = vec![true; f.len()];
            }
            model.forward_hidden(&ids, &shape, &mut cache, &mut adapter)
        }
        None => model.forward_hidden(&ids, &shape, &mut cache, &mut NoAdapter),
    };
    let trows = target_rows(shape.seq, pairs.iter().map(|(p, c)| (p.len(), c.len())));
    let (logits, _) = model.head(&h, &trows);
    let vocab = model.cfg.vocab_size;
    let mut it = logits.chunks(vocab);
    pairs
        .iter()
        .map(|(_, c)| {
            let rows: Vec<&[f32]> = (0..c.len()).map(|_| it.next().unwrap()).collect();
            let argmax = rows.iter().map(|r| ops::argmax(r) as u32).collect();
            let lse = ops::logsumexp(rows[0]);
            let first = rows[0].iter().map(|v| v - lse).collect();
            (argmax, first)
        })
        .collect()
}

fn accuracy(argmax: &[u32], target: &[u32]) -> f64 {
    argmax.iter().zip(target).filter(|(a, b)| a == b).count() as f64 / target.len() as f64
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        args.len() >= 5,
        "usage: MODEL STATE DATA T OUT [CANDIDATES]"
    );
    let base = BaseModel::open(Path::new(&args[0]))?;
    let session = EditSession::open(&base, Path::new(&args[1]), None)?;
    let elder = &session.elder;
    let model = base.model()?;
    let t: usize = args[3].parse()?;
    let max_candidates: usize = args.get(5).map_or(Ok(6), |s| s.parse())?;
    let records = read_edits(Path::new(&args[2]), DataFormat::Auto)?;
    let edits = base.tokenize_edits(records.iter().take(t))?;
    let store = elder.key_store.as_ref().context("no key store")?;
    let sites = elder.key_sites();
    let theta = elder.scope_threshold();
    let own_target: Vec<Vec<u32>> = elder
        .memory
        .iter()
        .map(|m| {
            base.tokenizer
                .encode_continuation(&format!(" {}", m.target))
        })
        .collect::<Result<_>>()?;
    let subject_of = |i: usize| elder.memory[i].subject.clone().unwrap_or_default();
    // (record id, role, kind, index, prompt, continuation, whether accuracy is against the base)
    type Item<'a> = (&'a str, &'static str, String, usize, &'a [u32], &'a [u32]);
    let mut items: Vec<Item> = Vec::new();
    for e in &edits {
        for (i, r) in e.rephrases.iter().enumerate() {
            items.push((&e.id, "rephrase", String::new(), i, r, &e.target));
        }
        for (i, (p, a)) in e.locality.iter().enumerate() {
            let kind = e.locality_kinds[i].clone().unwrap_or_default();
            items.push((&e.id, "locality", kind, i, p, a));
        }
    }
    let mut out = std::io::BufWriter::new(std::fs::File::create(&args[4])?);
    eprintln!("{} items, scope threshold {theta:.3}", items.len());
    for (n, chunk) in items.chunks(16).enumerate() {
        let pairs: Vec<(&[u32], &[u32])> = chunk.iter().map(|it| (it.4, it.5)).collect();
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|it| it.4.to_vec()).collect();
        let inputs = capture_inputs(model, &prompts, &sites);
        let base_out = forward_pairs(model, None, None, &pairs);
        let engine = forward_pairs(model, Some(elder), None, &pairs);
        // Candidates of each item: the best-scoring edits at or near the threshold.
        let mut cands: Vec<Vec<(usize, f32)>> = Vec::new();
        let mut picks: Vec<Option<(usize, f32)>> = Vec::new();
        for input in &inputs {
            let q = store.query_keys(&input[&sites[0]]);
            let mut scored: Vec<(usize, f32)> = store
                .scores(&q)
                .into_iter()
                .enumerate()
                .filter(|(_, s)| s.is_finite() && *s >= theta - 0.1)
                .collect();
            scored.sort_by(|a, b| b.1.total_cmp(&a.1));
            scored.truncate(max_candidates);
            cands.push(scored);
            let relation_rows = sites.get(1).map(|s| input[s].as_slice());
            picks.push(
                store
                    .match_prompt(&input[&sites[0]], relation_rows, elder.cfg.relation_margin)
                    .map(|m| (m.entry, m.score)),
            );
        }
        // Flatten (item, candidate) and run them 16 at a time.
        let flat: Vec<(usize, usize)> = cands
            .iter()
            .enumerate()
            .flat_map(|(i, c)| c.iter().map(move |&(e, _)| (i, e)))
            .collect();
        let mut tried: Vec<(Vec<u32>, Vec<f32>)> = Vec::with_capacity(flat.len());
        for part in flat.chunks(16) {
            let p: Vec<(&[u32], &[u32])> = part.iter().map(|&(i, _)| pairs[i]).collect();
            let f: Vec<usize> = part.iter().map(|&(_, e)| e).collect();
            tried.extend(forward_pairs(model, Some(elder), Some(&f), &p));
        }
        let mut k = 0;
        for (i, it) in chunk.iter().enumerate() {
            let is_loc = it.1 == "locality";
            let reference: &[u32] = if is_loc { &base_out[i].0 } else { it.5 };
            let mut list = Vec::new();
            for &(e, score) in &cands[i] {
                let (argmax, first) = &tried[k];
                k += 1;
                let tok = own_target[e][0] as usize;
                list.push(serde_json::json!({
                    "edit": e,
                    "id": elder.memory[e].id,
                    "subject": subject_of(e),
                    "score": score,
                    "acc": accuracy(argmax, reference),
                    "lp_own": first[tok],
                    "lp_own_base": base_out[i].1[tok],
                    "top_is_own": argmax.first() == Some(&(tok as u32)),
                }));
            }
            let line = serde_json::json!({
                "record": it.0,
                "role": it.1,
                "kind": it.2,
                "index": it.3,
                "acc_engine": accuracy(&engine[i].0, reference),
                "acc_base": accuracy(&base_out[i].0, reference),
                "pick": picks[i].map(|p| p.0),
                "pick_score": picks[i].map(|p| p.1),
                "threshold": theta,
                "candidates": list,
            });
            writeln!(out, "{line}")?;
        }
        if n % 20 == 0 {
            eprintln!("{} / {}", (n + 1) * 16, items.len());
        }
    }
    Ok(())
}
