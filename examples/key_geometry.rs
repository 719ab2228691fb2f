//! Diagnostic: which key read from the frozen model can tell an edit's rephrasings from every kind
//! of locality probe (same relation, other relation, same subject, general)?
//!
//! For each candidate block it reads the inputs of two MLP projections at every prompt position
//! (`up_proj`: the normed residual stream; `down_proj`: the MLP's hidden activation), centres them
//! on the mean of the shipped generic text (data/generic_text.txt) and compares, by cosine:
//! - subject keys: an edit's key is its subject's last token; a prompt is matched at every position
//!   (the best position's similarity);
//! - relation keys: the last prompt token of an edit against the last token of a prompt.
//!
//! It prints, for a subject key alone and for a subject key with a relation check, the share of
//! rephrasings whose best edit is their own, and the share of each probe kind in scope when the
//! thresholds keep 90% of the rephrasings in scope.
//!
//! Usage: cargo run --release --example key_geometry -- [MODEL] [DATA] [T] [SUBJECT_BLOCKS] [RELATION_BLOCKS]

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use elder::data::{read_edits, DataFormat};
use elder::elder::capture::capture_inputs;
use elder::model::layers::{MlpProj, Site};
use elder::model::Model;
use elder::session::BaseModel;

/// Per site, per prompt, its rows `[len][d]`.
type Captured = BTreeMap<Site, Vec<Vec<Vec<f32>>>>;

/// The engine's own capture (`capture_inputs`, what the key store reads), split into rows.
fn capture(model: &Model, prompts: &[Vec<u32>], sites: &[Site]) -> Captured {
    let mut out: Captured = sites.iter().map(|&s| (s, Vec::new())).collect();
    for (prompt, per_site) in prompts.iter().zip(capture_inputs(model, prompts, sites)) {
        for (site, x) in per_site {
            let d = x.len() / prompt.len().max(1);
            out.get_mut(&site)
                .unwrap()
                .push(x.chunks(d).map(<[f32]>::to_vec).collect());
        }
    }
    out
}

fn unit(v: &[f32], mean: &[f32]) -> Vec<f32> {
    let c: Vec<f32> = v.iter().zip(mean).map(|(a, b)| a - b).collect();
    let n = c.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    c.iter().map(|x| x / n).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

struct Prompts {
    /// Edit prompts with their subject's last token.
    edits: Vec<(Vec<u32>, usize)>,
    reph: Vec<(usize, Vec<u32>)>,
    probes: Vec<(String, Vec<u32>)>,
    generic: Vec<Vec<u32>>,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let model_dir = arg(0, "models/smollm2-135m");
    let data = arg(1, "data/geo_facts.jsonl");
    let t: usize = arg(2, "200").parse().context("T")?;
    let parse = |s: String| -> Result<Vec<usize>> {
        s.split(',').map(|b| b.parse().context("blocks")).collect()
    };
    let subject_blocks = parse(arg(3, "2,4,6,8"))?;
    let relation_blocks = parse(arg(4, "8,12,16,21"))?;

    let base = BaseModel::open(Path::new(&model_dir))?;
    let model = base.model()?;
    let records = read_edits(Path::new(&data), DataFormat::Auto)?;
    let mut p = Prompts {
        edits: Vec::new(),
        reph: Vec::new(),
        probes: Vec::new(),
        generic: Vec::new(),
    };
    let generic_text = std::fs::read_to_string("data/generic_text.txt")?;
    let generic_lines: Vec<&str> = generic_text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    let mut prefixed = Vec::new();
    let mut bare = Vec::new();
    for (i, r) in records.iter().take(t).enumerate() {
        let subject = r.subject.as_deref().unwrap_or("");
        let (ids, pos) = base.tokenizer.encode_with_subject(&r.prompt, subject)?;
        p.edits.push((ids.clone(), pos.unwrap_or(ids.len() - 1)));
        let text = format!("{} {}", generic_lines[i % generic_lines.len()], r.prompt);
        let (ids, pos) = base.tokenizer.encode_with_subject(&text, subject)?;
        prefixed.push((ids.clone(), pos.unwrap_or(ids.len() - 1)));
        let ids = base.tokenizer.encode(subject)?;
        bare.push((ids.clone(), ids.len() - 1));
        for q in &r.rephrases {
            p.reph.push((i, base.tokenizer.encode(q)?));
        }
        for l in &r.locality {
            let kind = l.kind.clone().unwrap_or_else(|| "probe".into());
            p.probes.push((kind, base.tokenizer.encode(&l.prompt)?));
        }
    }
    for line in &generic_lines {
        p.generic.push(base.tokenizer.encode(line)?);
    }
    let two_keys = std::env::var_os("KEY_PREFIXED").is_some();
    let mut sites = Vec::new();
    for &b in subject_blocks.iter().chain(&relation_blocks) {
        for proj in [MlpProj::UpProj, MlpProj::DownProj] {
            let s = Site { block: b, proj };
            if !sites.contains(&s) {
                sites.push(s);
            }
        }
    }
    let edit_ids: Vec<Vec<u32>> = p.edits.iter().map(|e| e.0.clone()).collect();
    let reph_ids: Vec<Vec<u32>> = p.reph.iter().map(|e| e.1.clone()).collect();
    let probe_ids: Vec<Vec<u32>> = p.probes.iter().map(|e| e.1.clone()).collect();
    let ce = capture(model, &edit_ids, &sites);
    let pre_ids: Vec<Vec<u32>> = prefixed.iter().map(|e| e.0.clone()).collect();
    let cpre = capture(model, &pre_ids, &sites);
    let bare_ids: Vec<Vec<u32>> = bare.iter().map(|e| e.0.clone()).collect();
    let cbare = capture(model, &bare_ids, &sites);
    let cr = capture(model, &reph_ids, &sites);
    let cp = capture(model, &probe_ids, &sites);
    let cg = capture(model, &p.generic, &sites);
    let kinds: Vec<String> = {
        let mut k: Vec<String> = p.probes.iter().map(|x| x.0.clone()).collect();
        k.sort();
        k.dedup();
        k
    };
    println!(
        "{t} edits, {} rephrasings, {} probes ({kinds:?}), {} generic sentences",
        p.reph.len(),
        p.probes.len(),
        p.generic.len()
    );
    let mean0_of = |site: &Site| -> Vec<f32> {
        let rows: Vec<&Vec<f32>> = cg[site].iter().map(|s| &s[0]).collect();
        let d = rows[0].len();
        let mut m = vec![0f32; d];
        for r in &rows {
            for (a, b) in m.iter_mut().zip(r.iter()) {
                *a += b / rows.len() as f32;
            }
        }
        m
    };
    let mean_of = |site: &Site| -> Vec<f32> {
        let rows: Vec<&Vec<f32>> = cg[site].iter().flat_map(|s| s.iter().skip(1)).collect();
        let d = rows[0].len();
        let mut m = vec![0f32; d];
        for r in &rows {
            for (a, b) in m.iter_mut().zip(r.iter()) {
                *a += b / rows.len() as f32;
            }
        }
        m
    };
    // Subject similarity of every prompt of a set to every edit: [prompt][edit].
    // Centred unit rows of one site (position 0, the attention sink whose rows share one huge
    // direction, centred on its own mean).
    let centred_site = |site: &Site| {
        let (m, m0) = (mean_of(site), mean0_of(site));
        move |row: &Vec<f32>, pos: usize| unit(row, if pos == 0 { &m0 } else { &m })
    };
    let second: Option<usize> = std::env::var("KEY_SECOND_BLOCK")
        .ok()
        .and_then(|v| v.parse().ok());
    let subject_sims = |site: &Site, set: &Captured| -> Vec<Vec<f32>> {
        let mut key_sites = vec![*site];
        if let Some(b2) = second {
            key_sites.push(Site {
                block: b2,
                proj: site.proj,
            });
        }
        let centres: Vec<_> = key_sites.iter().map(|s| centred_site(s)).collect();
        let w = 1.0 / (key_sites.len() as f32).sqrt();
        // The concatenation of each site's centred unit row: a dot product is the mean cosine.
        let row_key = |c: &Captured, prompt: usize, pos: usize| -> Vec<f32> {
            key_sites
                .iter()
                .zip(&centres)
                .flat_map(|(ks, f)| f(&c[ks][prompt][pos], pos).into_iter().map(move |x| x * w))
                .collect()
        };
        let key_sets: Vec<Vec<Vec<f32>>> = [(&ce, &p.edits), (&cpre, &prefixed), (&cbare, &bare)]
            .iter()
            .take(if two_keys { 3 } else { 1 })
            .map(|(c, e)| {
                e.iter()
                    .enumerate()
                    .map(|(i, (_, pos))| row_key(c, i, *pos))
                    .collect()
            })
            .collect();
        (0..set[site].len())
            .map(|qi| {
                let us: Vec<Vec<f32>> = (0..set[site][qi].len())
                    .map(|i| row_key(set, qi, i))
                    .collect();
                (0..p.edits.len())
                    .map(|e| {
                        key_sets
                            .iter()
                            .map(|ks| us.iter().map(|u| dot(u, &ks[e])).fold(f32::MIN, f32::max))
                            .fold(f32::MIN, f32::max)
                    })
                    .collect()
            })
            .collect()
    };
    let relation_sims = |site: &Site, set: &Captured| -> Vec<Vec<f32>> {
        let m = mean_of(site);
        let keys: Vec<Vec<f32>> = ce[site]
            .iter()
            .map(|rows| unit(rows.last().unwrap(), &m))
            .collect();
        set[site]
            .iter()
            .map(|rows| {
                let u = unit(rows.last().unwrap(), &m);
                keys.iter().map(|k| dot(&u, k)).collect()
            })
            .collect()
    };
    let owners: Vec<usize> = p.reph.iter().map(|x| x.0).collect();
    if std::env::var_os("KEY_DEBUG").is_some() {
        let site = Site {
            block: subject_blocks[0],
            proj: MlpProj::DownProj,
        };
        let m = mean_of(&site);
        let key = unit(&ce[&site][0][p.edits[0].1], &m);
        for (ri, rows) in cr[&site].iter().enumerate().take(3) {
            let sims: Vec<String> = rows
                .iter()
                .map(|r| format!("{:.2}", dot(&unit(r, &m), &key)))
                .collect();
            println!("reph {ri} -> edit 0: {}", sims.join(" "));
        }
        for (ei, rows) in ce[&site].iter().enumerate().take(4) {
            let sims: Vec<String> = rows
                .iter()
                .map(|r| format!("{:.2}", dot(&unit(r, &m), &key)))
                .collect();
            println!("edit {ei} -> edit 0: {}", sims.join(" "));
        }
        let norms: Vec<String> = ce[&site][0]
            .iter()
            .map(|r| format!("{:.1}", r.iter().map(|x| x * x).sum::<f32>().sqrt()))
            .collect();
        println!(
            "norms edit 0 rows: {} mean norm {:.1}",
            norms.join(" "),
            m.iter().map(|x| x * x).sum::<f32>().sqrt()
        );
    }
    println!("\nsubject key alone (a prompt's score: best edit's similarity)");
    println!(
        "site                reph->own best  thr@90%reph  in scope per kind at that threshold"
    );
    for &b in &subject_blocks {
        for proj in [MlpProj::UpProj, MlpProj::DownProj] {
            let site = Site { block: b, proj };
            let sr = subject_sims(&site, &cr);
            let sp = subject_sims(&site, &cp);
            let best = |row: &Vec<f32>| {
                row.iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(i, v)| (i, *v))
                    .unwrap()
            };
            let own_hits = sr
                .iter()
                .zip(&owners)
                .filter(|(r, &o)| best(r).0 == o)
                .count();
            if std::env::var_os("KEY_DEBUG").is_some()
                && b == subject_blocks[0]
                && proj == MlpProj::UpProj
            {
                for (i, (r, &o)) in sr.iter().zip(&owners).enumerate().take(60) {
                    let (bi, bv) = best(r);
                    if bi != o || r[o] < 0.75 {
                        println!(
                            "reph {:?} own {:.2} best {:?} {bv:.2}",
                            records[o].rephrases, r[o], records[bi].prompt
                        );
                        let _ = i;
                    }
                }
                for (row, (kind, ids)) in sp.iter().zip(&p.probes).take(300) {
                    let (bi, bv) = best(row);
                    if (kind == "general" || kind == "same_relation") && bv > 0.87 {
                        println!(
                            "general {:?} best {:?} {bv:.2}",
                            base.tokenizer.decode(ids).unwrap(),
                            records[bi].prompt
                        );
                    }
                }
            }
            let mut own: Vec<f32> = sr.iter().zip(&owners).map(|(r, &o)| r[o]).collect();
            own.sort_by(f32::total_cmp);
            let thr = own[own.len() / 10];
            let per_kind: Vec<String> = kinds
                .iter()
                .map(|k| {
                    let (n, inside) = sp
                        .iter()
                        .zip(&p.probes)
                        .filter(|(_, (kind, _))| kind == k)
                        .fold((0, 0), |(n, i), (row, _)| {
                            (n + 1, i + usize::from(best(row).1 >= thr))
                        });
                    format!("{k} {:.2}", inside as f64 / n as f64)
                })
                .collect();
            println!(
                "{b:3} {:10}  {:14.2}  {thr:11.3}  {}",
                format!("{proj:?}"),
                own_hits as f64 / owners.len() as f64,
                per_kind.join("  ")
            );
        }
    }
    println!("\nthreshold calibration from the stream: best similarity of an edit prompt to edits of other subjects");
    for &b in &subject_blocks {
        let ss = Site {
            block: b,
            proj: MlpProj::UpProj,
        };
        let se = subject_sims(&ss, &ce);
        let sg = subject_sims(&ss, &cg);
        let subjects: Vec<&str> = records
            .iter()
            .take(t)
            .map(|r| r.subject.as_deref().unwrap_or(""))
            .collect();
        let mut neg: Vec<f32> = se
            .iter()
            .enumerate()
            .map(|(j, row)| {
                (0..row.len())
                    .filter(|&i| subjects[i] != subjects[j])
                    .map(|i| row[i])
                    .fold(f32::MIN, f32::max)
            })
            .collect();
        neg.extend(
            sg.iter()
                .map(|row| row.iter().cloned().fold(f32::MIN, f32::max)),
        );
        neg.sort_by(f32::total_cmp);
        let sr = subject_sims(&ss, &cr);
        let mut own: Vec<f32> = sr.iter().zip(&owners).map(|(r, &o)| r[o]).collect();
        own.sort_by(f32::total_cmp);
        let q = |v: &[f32], f: f64| v[((v.len() - 1) as f64 * f) as usize];
        println!(
            "block {b}: negatives q50 {:.3} q90 {:.3} q95 {:.3} q99 {:.3} max {:.3} | rephrasing own q05 {:.3} q10 {:.3} q15 {:.3} q50 {:.3}",
            q(&neg, 0.5), q(&neg, 0.9), q(&neg, 0.95), q(&neg, 0.99), q(&neg, 1.0),
            q(&own, 0.05), q(&own, 0.1), q(&own, 0.15), q(&own, 0.5)
        );
    }
    println!("\nrelation keys: rephrasing -> own edit vs same-subject probe -> its subject's edits (AUC; 1 = separable)");
    {
        let subjects: Vec<&str> = records
            .iter()
            .take(t)
            .map(|r| r.subject.as_deref().unwrap_or(""))
            .collect();
        // The subject of each same-subject probe is its record's.
        let probe_owner: Vec<usize> = records
            .iter()
            .take(t)
            .enumerate()
            .flat_map(|(i, r)| r.locality.iter().map(move |_| i))
            .collect();
        for &rb in &relation_blocks {
            for rproj in [MlpProj::UpProj, MlpProj::DownProj] {
                let site = Site {
                    block: rb,
                    proj: rproj,
                };
                let rr = relation_sims(&site, &cr);
                let rp = relation_sims(&site, &cp);
                let own: Vec<f32> = rr.iter().zip(&owners).map(|(r, &o)| r[o]).collect();
                let neg: Vec<f32> = rp
                    .iter()
                    .zip(&p.probes)
                    .zip(&probe_owner)
                    .filter(|((_, (k, _)), _)| k == "same_subject")
                    .map(|((row, _), &o)| {
                        (0..row.len())
                            .filter(|&e| subjects[e] == subjects[o])
                            .map(|e| row[e])
                            .fold(f32::MIN, f32::max)
                    })
                    .collect();
                let mut wins = 0.0;
                for a in &own {
                    for b in &neg {
                        wins += if a > b {
                            1.0
                        } else if a == b {
                            0.5
                        } else {
                            0.0
                        };
                    }
                }
                let mut sorted = neg.clone();
                sorted.sort_by(f32::total_cmp);
                let cut = sorted[(sorted.len() * 9) / 10];
                let kept = own.iter().filter(|&&o| o > cut).count() as f64 / own.len() as f64;
                println!(
                    "rel {rb:2} {rproj:?}: AUC {:.3}  rephrasings above the 90th percentile of same-subject probes: {kept:.2}",
                    wins / (own.len() * neg.len()) as f64
                );
            }
        }
    }
    println!("\nrelation tie-break: among edits within 0.05 of a rephrasing's best subject score, the best relation score (last token)");
    for &b in &subject_blocks {
        let ss = Site {
            block: b,
            proj: MlpProj::UpProj,
        };
        let sr = subject_sims(&ss, &cr);
        for &rb in &relation_blocks {
            for rproj in [MlpProj::UpProj, MlpProj::DownProj] {
                let rr = relation_sims(
                    &Site {
                        block: rb,
                        proj: rproj,
                    },
                    &cr,
                );
                let hits = sr
                    .iter()
                    .zip(&rr)
                    .zip(&owners)
                    .filter(|((s, r), &o)| {
                        let top = s.iter().cloned().fold(f32::MIN, f32::max);
                        let pick = (0..s.len())
                            .filter(|&i| s[i] >= top - 0.05)
                            .max_by(|&a, &b| r[a].total_cmp(&r[b]))
                            .unwrap();
                        pick == o
                    })
                    .count();
                println!(
                    "subj {b:2} rel {rb:2} {rproj:?}: own picked {:.2}",
                    hits as f64 / owners.len() as f64
                );
            }
        }
    }
    println!("\nsubject key + relation check (in scope: some edit passes both thresholds; grid of quantiles of the own-edit scores)");
    for &b in &subject_blocks {
        for &rb in &relation_blocks {
            for (sproj, rproj) in [
                (MlpProj::DownProj, MlpProj::DownProj),
                (MlpProj::DownProj, MlpProj::UpProj),
                (MlpProj::UpProj, MlpProj::UpProj),
            ] {
                let ss = Site {
                    block: b,
                    proj: sproj,
                };
                let rs = Site {
                    block: rb,
                    proj: rproj,
                };
                let (sr, sp) = (subject_sims(&ss, &cr), subject_sims(&ss, &cp));
                let (rr, rp) = (relation_sims(&rs, &cr), relation_sims(&rs, &cp));
                let own_s: Vec<f32> = sr.iter().zip(&owners).map(|(r, &o)| r[o]).collect();
                let own_r: Vec<f32> = rr.iter().zip(&owners).map(|(r, &o)| r[o]).collect();
                let q = |v: &[f32], f: f64| {
                    let mut s = v.to_vec();
                    s.sort_by(f32::total_cmp);
                    s[((s.len() as f64) * f) as usize]
                };
                let mut best_line = String::new();
                let mut best_score = f64::MIN;
                for fs in [0.02, 0.05, 0.1] {
                    for fr in [0.02, 0.05, 0.1] {
                        let (ts, tr) = (q(&own_s, fs), q(&own_r, fr));
                        let reph_in = own_s
                            .iter()
                            .zip(&own_r)
                            .filter(|(s, r)| **s >= ts && **r >= tr)
                            .count() as f64
                            / owners.len() as f64;
                        let mut worst: f64 = 0.0;
                        let per_kind: Vec<String> = kinds
                            .iter()
                            .map(|k| {
                                let (n, inside) = sp
                                    .iter()
                                    .zip(&rp)
                                    .zip(&p.probes)
                                    .filter(|(_, (kind, _))| kind == k)
                                    .fold((0, 0), |(n, i), ((s, r), _)| {
                                        let hit =
                                            s.iter().zip(r).any(|(a, b)| *a >= ts && *b >= tr);
                                        (n + 1, i + usize::from(hit))
                                    });
                                let f = inside as f64 / n as f64;
                                worst = worst.max(f);
                                format!("{k} {f:.2}")
                            })
                            .collect();
                        let score = reph_in - worst;
                        if score > best_score {
                            best_score = score;
                            best_line = format!(
                                "reph in {reph_in:.2} (s>={ts:.3}, r>={tr:.3})  {}",
                                per_kind.join("  ")
                            );
                        }
                    }
                }
                println!(
                    "subj {b:2} {:9} rel {rb:2} {:9}  {best_line}",
                    format!("{sproj:?}"),
                    format!("{rproj:?}")
                );
            }
        }
    }
    Ok(())
}
