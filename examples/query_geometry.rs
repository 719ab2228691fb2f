//! Diagnostic: can a query vector tell an edit's rephrasings from unrelated prompts at all?
//!
//! ELDER routes (and defers) on one vector per prompt, read from the frozen model. Whatever the
//! routers learn, they only see that vector, so if an unrelated locality probe sits closer to some
//! edit than the edit's own rephrasings do, no threshold can give both generalization and locality.
//! For each candidate query block this prints, in cosine distance (raw, and centred on the mean of
//! every prompt):
//! - how often a rephrasing's nearest edit is its own edit,
//! - the AUC of "rephrasing -> own edit" against "locality probe -> nearest edit" (1.0: separable;
//!   0.5: chance; below 0.5: probes sit closer to the edits than rephrasings do),
//! - the fraction of rephrasings still within reach at the distance that keeps 95% of probes out.
//!
//! Usage: cargo run --release --example query_geometry -- [MODEL_DIR] [DATA] [T] [BLOCKS] [last|mean]
//! e.g. `-- models/smollm2-135m data/geo_facts.jsonl 100 5,10,21,25 mean`

use std::path::Path;

use anyhow::{Context, Result};
use elder::data::{read_edits, DataFormat};
use elder::elder::config::{ElderConfig, QueryPooling};
use elder::elder::molora::Elder;
use elder::elder::trainer::queries;
use elder::session::BaseModel;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let model_dir = arg(0, "models/smollm2-135m");
    let data = arg(1, "data/geo_facts.jsonl");
    let t: usize = arg(2, "100").parse().context("T")?;
    let blocks: Vec<usize> = arg(3, "5,10,15,21,25")
        .split(',')
        .map(|b| b.parse().context("blocks"))
        .collect::<Result<_>>()?;
    let pooling = match arg(4, "last").as_str() {
        "mean" => QueryPooling::PromptMean,
        _ => QueryPooling::LastToken,
    };

    let base = BaseModel::open(Path::new(&model_dir))?;
    let records = read_edits(Path::new(&data), DataFormat::Auto)?;
    let edits: Vec<_> = records
        .iter()
        .take(t)
        .map(|r| base.tokenize_edit(r))
        .collect::<Result<_>>()?;
    let prompts: Vec<Vec<u32>> = edits.iter().map(|e| e.prompt.clone()).collect();
    let (owners, rephrases): (Vec<usize>, Vec<Vec<u32>>) = edits
        .iter()
        .enumerate()
        .flat_map(|(i, e)| e.rephrases.iter().map(move |r| (i, r.clone())))
        .unzip();
    let probes: Vec<Vec<u32>> = edits
        .iter()
        .flat_map(|e| e.locality.iter().map(|(p, _)| p.clone()))
        .collect();

    println!(
        "{t} edits, {} rephrasings, {} locality probes, pooling {pooling:?}",
        rephrases.len(),
        probes.len()
    );
    println!("block  space    reph->own nearest  AUC    median reph-own  median probe-nearest  reph kept @5% probes");
    for block in blocks {
        let mut cfg = ElderConfig::preset_for(&base.cfg);
        cfg.query_block = block;
        cfg.query_pooling = pooling;
        cfg.molora_blocks = vec![block + 1];
        let elder = Elder::new(cfg, &base.cfg)?;
        let model = base.model()?;
        let q = [
            queries(model, &elder, &prompts),
            queries(model, &elder, &rephrases),
            queries(model, &elder, &probes),
        ];
        let d = q[0].len() / prompts.len();
        let mut mean = vec![0f32; d];
        let count = q.iter().map(|v| v.len() / d).sum::<usize>() as f32;
        for row in q.iter().flat_map(|v| v.chunks(d)) {
            mean.iter_mut().zip(row).for_each(|(m, v)| *m += v / count);
        }
        for (space, centre) in [("raw", None), ("centred", Some(&mean))] {
            let [e, r, l] = q.each_ref().map(|v| unit_rows(v, d, centre));
            let s = separation(&e, &r, &owners, &l);
            println!(
                "{block:5}  {space:7}  {:17.2}  {:.3}  {:15.3}  {:20.3}  {:.2}",
                s.own_nearest, s.auc, s.median_own, s.median_probe, s.kept_at_5pct
            );
        }
    }
    Ok(())
}

/// Rows of `v` (`[n, d]`), optionally minus `centre`, scaled to unit norm.
fn unit_rows(v: &[f32], d: usize, centre: Option<&Vec<f32>>) -> Vec<Vec<f32>> {
    v.chunks(d)
        .map(|row| {
            let c: Vec<f32> = match centre {
                Some(m) => row.iter().zip(m).map(|(a, b)| a - b).collect(),
                None => row.to_vec(),
            };
            let norm = c.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            c.iter().map(|x| x / norm).collect()
        })
        .collect()
}

struct Separation {
    own_nearest: f64,
    auc: f64,
    median_own: f32,
    median_probe: f32,
    kept_at_5pct: f64,
}

fn separation(
    edits: &[Vec<f32>],
    reph: &[Vec<f32>],
    owners: &[usize],
    probes: &[Vec<f32>],
) -> Separation {
    let dist = |a: &[f32], b: &[f32]| 1.0 - a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let nearest = |x: &[f32]| {
        edits
            .iter()
            .map(|e| dist(x, e))
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("at least one edit")
    };
    let mut hits = 0;
    let mut own: Vec<f32> = Vec::new();
    for (r, &owner) in reph.iter().zip(owners) {
        hits += usize::from(nearest(r).0 == owner);
        own.push(dist(r, &edits[owner]));
    }
    let mut probe: Vec<f32> = probes.iter().map(|p| nearest(p).1).collect();
    own.sort_by(f32::total_cmp);
    probe.sort_by(f32::total_cmp);
    // AUC: the chance that a rephrasing is nearer its own edit than a random probe is to any edit.
    let mut wins = 0.0;
    for o in &own {
        wins += probe
            .iter()
            .map(|p| {
                if o < p {
                    1.0
                } else if o == p {
                    0.5
                } else {
                    0.0
                }
            })
            .sum::<f64>();
    }
    let cut = probe[probe.len() / 20];
    Separation {
        own_nearest: hits as f64 / reph.len() as f64,
        auc: wins / (own.len() * probe.len()) as f64,
        median_own: own[own.len() / 2],
        median_probe: probe[probe.len() / 2],
        kept_at_5pct: own.iter().filter(|&&o| o < cut).count() as f64 / own.len() as f64,
    }
}
