//! Training an edit batch under the stored allocation (`inference_allocation = "stored"`): every
//! sequence trains the experts its edit was allocated (no router), on the edit, its prefixed
//! copies, its negatives and the replayed earlier edits ([`super::plan`]), and the batch stops as
//! soon as every target is the argmax (`stop_loss`).
//!
//! Only the experts the batch uses are trained: they are gathered into a small pool, trained
//! there with a fresh Adam, and written back, so the cost of a batch does not grow with the pool.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::model::{Model, NoAdapter};
use crate::util::stable_hash;

use super::codebook::Codebook;
use super::config::ExpertRows;
use super::molora::Elder;
use super::plan::{EditPlan, KeyText, Replay};
use super::trainer::{learning_rate, Adam, EditExample, EditReport, PreparedBatch, RowOptions};

/// Tokens of the base model's greedy answer a negative keeps: the next token and the one after.
const NEGATIVE_ANSWER_TOKENS: usize = 2;

/// One training sequence: its tokens, its experts, the row of its subject, and whether its
/// targets are the edit's (positive) or the base model's (negative).
struct Sequence {
    example: EditExample,
    allocation: Vec<Vec<u32>>,
    subject_row: usize,
    positive: bool,
}

/// Trains `plans` (with `replays`) into `elder`, then adds their keys to the key store and their
/// entries to the memory. The plans' allocations must name experts of the pool, except fresh
/// ones, which are created here (in plan order, so they get the indices the plans name).
pub fn apply_stored_batch(
    model: &Model,
    elder: &mut Elder,
    plans: &[EditPlan],
    replays: &[Replay],
    mut on_iteration: impl FnMut(usize, f32),
) -> anyhow::Result<EditReport> {
    anyhow::ensure!(!plans.is_empty(), "empty edit batch");
    let cfg = elder.cfg.clone();
    let r = cfg.rank;
    for plan in plans.iter().filter(|p| p.fresh_experts) {
        for (l, layer) in elder.layers.iter_mut().enumerate() {
            anyhow::ensure!(
                plan.entry.allocation[l].first() == Some(&(layer.experts(r) as u32)),
                "edit {}: its fresh experts are not the next in the pool",
                plan.entry.id
            );
            let seed =
                cfg.seed ^ stable_hash(&plan.entry.id) ^ (l as u64).wrapping_mul(0x9e37_79b9);
            layer.push_experts(
                r,
                plan.entry.allocation[l].len(),
                &mut ChaCha8Rng::seed_from_u64(seed),
            );
        }
    }
    let t0 = std::time::Instant::now();
    let sequences = sequences(model, plans, replays);
    let t_seq = t0.elapsed();

    // The pool this batch trains: the experts its sequences use, per layer, in index order.
    let used: Vec<Vec<u32>> = (0..elder.layers.len())
        .map(|l| {
            let mut u: Vec<u32> = sequences
                .iter()
                .flat_map(|s| s.allocation[l].iter().copied())
                .collect();
            u.sort_unstable();
            u.dedup();
            u
        })
        .collect();
    let mut work = Elder {
        cfg: cfg.clone(),
        layers: elder
            .layers
            .iter()
            .zip(&used)
            .map(|(layer, u)| layer.gather(r, u))
            .collect(),
        codebook: Codebook::new(cfg.code_bits())?,
        query_mean: None,
        key_store: None,
        memory: Vec::new(),
    };
    let local: Vec<Vec<Vec<u32>>> = sequences
        .iter()
        .map(|s| {
            s.allocation
                .iter()
                .zip(&used)
                .map(|(chosen, u)| {
                    chosen
                        .iter()
                        .map(|e| u.binary_search(e).expect("every used expert is gathered") as u32)
                        .collect()
                })
                .collect()
        })
        .collect();
    let routing = work.fixed_routing(&local.iter().map(|a| Some(a.as_slice())).collect::<Vec<_>>());
    let rows: Option<Vec<Option<usize>>> = (cfg.expert_rows == ExpertRows::Subject)
        .then(|| sequences.iter().map(|s| Some(s.subject_row)).collect());
    let answer_from: Option<Vec<usize>> = (cfg.expert_rows == ExpertRows::Answer).then(|| {
        sequences
            .iter()
            .map(|s| s.example.prompt.len() - 1)
            .collect()
    });
    let penalty = (cfg.delta_penalty > 0.0).then(|| {
        (
            cfg.delta_penalty,
            sequences.iter().map(|s| !s.positive).collect::<Vec<_>>(),
        )
    });

    let examples: Vec<EditExample> = sequences.iter().map(|s| s.example.clone()).collect();
    let (n_pos, n_neg) = sequences.iter().fold((0, 0), |(p, n), s| {
        let t = s.example.target.len();
        if s.positive {
            (p + t, n)
        } else {
            (p, n + t)
        }
    });
    let positive_rows: Vec<bool> = sequences
        .iter()
        .flat_map(|s| std::iter::repeat_n(s.positive, s.example.target.len()))
        .collect();
    let weights: Vec<f32> = positive_rows
        .iter()
        .map(|&p| {
            if p {
                1.0 / n_pos as f32
            } else {
                cfg.negative_weight / n_neg.max(1) as f32
            }
        })
        .collect();
    let targets: Vec<u32> = examples
        .iter()
        .flat_map(|e| e.target.iter().copied())
        .collect();
    let t1 = std::time::Instant::now();
    let mut prepared = PreparedBatch::weighted(model, &work, &examples, weights)?;
    let t_prep = t1.elapsed();
    let t2 = std::time::Instant::now();
    let mut adam = Adam::new(&work.layers);
    let mut report = EditReport {
        first_loss: 0.0,
        last_loss: 0.0,
        guide_loss: 0.0,
        iterations: 0,
        skipped_steps: 0,
        loss_scale: 1.0,
    };
    for it in 0..cfg.iterations {
        let mut step = prepared.loss_and_grads_routed(
            model,
            &work,
            &routing,
            RowOptions {
                rows: rows.as_deref(),
                answer_from: answer_from.as_deref(),
                delta_penalty: penalty.clone(),
            },
        );
        let rows = step
            .rows
            .take()
            .expect("weighted batches report their rows");
        let edit_loss = rows
            .loss
            .iter()
            .zip(&positive_rows)
            .filter(|(_, &p)| p)
            .map(|(l, _)| *l)
            .sum::<f32>()
            / n_pos as f32;
        if it == 0 {
            report.first_loss = edit_loss;
        }
        report.last_loss = edit_loss;
        on_iteration(it, edit_loss);
        let all_argmax = rows.argmax.iter().zip(&targets).all(|(a, t)| a == t);
        let learned = rows
            .loss
            .iter()
            .zip(&positive_rows)
            .all(|(l, &p)| !p || *l < cfg.stop_loss);
        if cfg.stop_loss > 0.0 && all_argmax && learned {
            break;
        }
        adam.step(
            &cfg,
            learning_rate(&cfg, it),
            &mut work.layers,
            &mut step.grads,
        );
        report.iterations = it + 1;
    }
    for ((layer, u), trained) in elder.layers.iter_mut().zip(&used).zip(&work.layers) {
        layer.scatter(r, u, trained);
    }
    let t_iter = t2.elapsed();
    let t3 = std::time::Instant::now();
    elder.add_keys(model, plans.iter().map(|p| p.key_texts.as_slice()))?;
    if std::env::var_os("ELDER_TIMING").is_some() {
        eprintln!(
            "timing: sequences {:.3} prefix {:.3} iterations {:.3} ({} its, rows {}) keys {:.3}",
            t_seq.as_secs_f64(),
            t_prep.as_secs_f64(),
            t_iter.as_secs_f64(),
            report.iterations,
            examples.len(),
            t3.elapsed().as_secs_f64()
        );
    }
    elder.memory.extend(plans.iter().map(|p| p.entry.clone()));
    elder.refresh_scope_calibration();
    Ok(report)
}

/// The batch's sequences: each edit, its prefixed copies, its negatives (continued with the base
/// model's greedy answer), then the replays.
fn sequences(model: &Model, plans: &[EditPlan], replays: &[Replay]) -> Vec<Sequence> {
    let negatives: Vec<Vec<u32>> = plans
        .iter()
        .flat_map(|p| p.negatives.iter().map(|n| n.tokens.clone()))
        .collect();
    let mut answers = if negatives.is_empty() {
        Vec::new()
    } else {
        model.generate(&negatives, NEGATIVE_ANSWER_TOKENS, None, &mut NoAdapter)
    }
    .into_iter();
    let mut out = Vec::new();
    for p in plans {
        let knowledge_id = p.entry.knowledge_id.clone();
        let positive = |prompt: &KeyText| Sequence {
            example: EditExample {
                prompt: prompt.tokens.clone(),
                target: p.target.clone(),
                knowledge_id: knowledge_id.clone(),
            },
            allocation: p.entry.allocation.clone(),
            subject_row: prompt.key_row,
            positive: true,
        };
        out.push(positive(&p.prompt));
        out.extend(p.augmented.iter().map(positive));
        for prompt in &p.negatives {
            let answer = answers.next().unwrap_or_default();
            if answer.is_empty() {
                continue;
            }
            out.push(Sequence {
                example: EditExample {
                    prompt: prompt.tokens.clone(),
                    target: answer,
                    knowledge_id: knowledge_id.clone(),
                },
                allocation: p.entry.allocation.clone(),
                subject_row: prompt.key_row,
                positive: false,
            });
        }
    }
    out.extend(replays.iter().map(|r| Sequence {
        example: EditExample {
            prompt: r.prompt.tokens.clone(),
            target: r.target.clone(),
            knowledge_id: String::new(),
        },
        allocation: r.allocation.clone(),
        subject_row: r.prompt.key_row,
        positive: true,
    }));
    out
}
