//! Diagnostic: does the unedited model answer each rephrasing template with the true fact?
//! For every template (the rephrasing with its subject replaced by {}), the base model's token
//! accuracy on `target_true`, next to the edit prompt's own template.
//!
//! Usage: cargo run --release --example template_check -- [MODEL] [DATA] [N]
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use elder::data::{read_edits, DataFormat};
use elder::eval::score_pairs;
use elder::session::BaseModel;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.into());
    let base = BaseModel::open(Path::new(&arg(0, "models/smollm2-135m")))?;
    let records = read_edits(Path::new(&arg(1, "data/geo_facts.jsonl")), DataFormat::Auto)?;
    let n: usize = arg(2, "200").parse()?;
    let mut items = Vec::new();
    for r in records.iter().take(n) {
        let (Some(t), Some(s)) = (&r.target_true, &r.subject) else {
            continue;
        };
        for p in std::iter::once(&r.prompt).chain(&r.rephrases) {
            items.push((p.replace(s.as_str(), "{}"), base.encode_pair(p, t)?));
        }
    }
    let pairs: Vec<(&[u32], &[u32])> = items.iter().map(|(_, (p, t))| (&p[..], &t[..])).collect();
    let scored = score_pairs(base.model()?, None, &pairs)?;
    let mut by: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for ((tmpl, (_, t)), s) in items.iter().zip(&scored) {
        let acc = s.argmax.iter().zip(t).filter(|(a, b)| a == b).count() as f64 / t.len() as f64;
        let e = by.entry(tmpl).or_default();
        e.0 += acc;
        e.1 += 1;
    }
    for (t, (sum, n)) in by {
        println!("{:.2}  ({n:3})  {t}", sum / n as f64);
    }
    Ok(())
}
