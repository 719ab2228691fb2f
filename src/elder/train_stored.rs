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
use super::config::{AllocationMode, ExpertRows};
use super::molora::Elder;
use super::plan::{EditPlan, KeyText, Replay};
use super::trainer::{
    learning_rate, Adam, EditExample, EditReport, EditTimes, PreparedBatch, RowOptions,
};

/// Tokens of the base model's greedy answer a negative keeps: the next token and the one after.
const NEGATIVE_ANSWER_TOKENS: usize = 2;

/// One training sequence: its tokens, its experts, the row of its subject, and whether its
/// targets are the edit's (positive) or the base model's (negative).
struct Sequence {
    example: EditExample,
    /// The plan it trains (`None`: a replay).
    edit: Option<usize>,
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
    let mut routing =
        work.fixed_routing(&local.iter().map(|a| Some(a.as_slice())).collect::<Vec<_>>());
    let mut rows: Option<Vec<Option<usize>>> = (cfg.expert_rows == ExpertRows::Subject)
        .then(|| sequences.iter().map(|s| Some(s.subject_row)).collect());
    let mut penalty = (cfg.delta_penalty > 0.0).then(|| {
        (
            cfg.delta_penalty,
            sequences.iter().map(|s| !s.positive).collect::<Vec<_>>(),
        )
    });

    let examples: Vec<EditExample> = sequences.iter().map(|s| s.example.clone()).collect();
    // Each edit's rows (and the replays' together) are one group with a loss of its own: the
    // edit's positive rows weigh 1 in all, its negatives `negative_weight`, so an edit trains the
    // same in a batch of many as alone.
    let groups = plans.len() + 1;
    let group_of = |s: &Sequence| s.edit.unwrap_or(plans.len());
    let mut n_pos = vec![0usize; groups];
    let mut n_neg = vec![0usize; groups];
    for s in &sequences {
        let t = s.example.target.len();
        if s.positive {
            n_pos[group_of(s)] += t;
        } else {
            n_neg[group_of(s)] += t;
        }
    }
    // Per target row: its group and whether it is an edit's (positive) row.
    let mut row_group: Vec<(usize, bool)> = sequences
        .iter()
        .flat_map(|s| std::iter::repeat_n((group_of(s), s.positive), s.example.target.len()))
        .collect();
    let weights: Vec<f32> = row_group
        .iter()
        .map(|&(g, positive)| {
            if positive {
                1.0 / n_pos[g] as f32
            } else {
                cfg.negative_weight / n_neg[g].max(1) as f32
            }
        })
        .collect();
    let mut targets: Vec<u32> = examples
        .iter()
        .flat_map(|e| e.target.iter().copied())
        .collect();
    // An edit that has learned stops training while the rest of its batch goes on, when no
    // expert is shared between edits (fresh experts, no replays): its experts are written out
    // as they were and no later step moves them.
    let stop_per_edit = cfg.stop_loss > 0.0
        && cfg.allocation == AllocationMode::Fresh
        && replays.is_empty()
        && plans.len() > 1;
    let mut done = vec![false; plans.len()];
    // The sequences still in the prepared batch (indices into `sequences`), and each group's
    // latest mean positive loss (an edit's stays at its value when it stopped).
    let mut alive: Vec<usize> = (0..sequences.len()).collect();
    let mut group_loss = vec![0.0f32; groups];
    let t1 = std::time::Instant::now();
    // Under `expert_rows = "answer"` only the answer windows run each iteration.
    let mut prepared = if cfg.expert_rows == ExpertRows::Answer {
        PreparedBatch::answer_window(model, &work, &examples, weights)?
    } else {
        PreparedBatch::weighted(model, &work, &examples, weights)?
    };
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
        times: EditTimes::default(),
    };
    for it in 0..cfg.iterations {
        let mut step = prepared.loss_and_grads_routed(
            model,
            &work,
            &routing,
            RowOptions {
                rows: rows.as_deref(),
                answer_from: None,
                delta_penalty: penalty.clone(),
            },
        );
        let row_losses = step
            .rows
            .take()
            .expect("weighted batches report their rows");
        // Per group: its mean positive loss, and whether every row is the argmax with every
        // positive row under `stop_loss`.
        let mut learned = vec![true; groups];
        for &(g, _) in &row_group {
            group_loss[g] = 0.0;
        }
        for (((&(g, positive), l), a), t) in row_group
            .iter()
            .zip(&row_losses.loss)
            .zip(&row_losses.argmax)
            .zip(&targets)
        {
            if positive {
                group_loss[g] += l / n_pos[g] as f32;
            }
            learned[g] &= a == t && (!positive || *l < cfg.stop_loss);
        }
        let edit_loss = group_loss[..plans.len()].iter().sum::<f32>() / plans.len() as f32;
        if it == 0 {
            report.first_loss = edit_loss;
        }
        report.last_loss = edit_loss;
        on_iteration(it, edit_loss);
        if cfg.stop_loss > 0.0 && learned.iter().all(|&l| l) {
            break;
        }
        if stop_per_edit {
            let mut stopped = false;
            for (e, plan) in plans.iter().enumerate() {
                if !done[e] && learned[e] {
                    done[e] = true;
                    stopped = true;
                    write_experts(elder, &work, &used, &plan.entry.allocation, r);
                }
            }
            if stopped {
                // Drop the stopped edits' sequences: later iterations cost only what trains.
                let keep: Vec<bool> = alive
                    .iter()
                    .map(|&i| sequences[i].edit.is_none_or(|e| !done[e]))
                    .collect();
                let kept_rows = prepared.retain(&keep);
                alive = alive
                    .iter()
                    .zip(&keep)
                    .filter(|(_, &k)| k)
                    .map(|(&i, _)| i)
                    .collect();
                row_group = kept_rows.iter().map(|&j| row_group[j]).collect();
                targets = kept_rows.iter().map(|&j| targets[j]).collect();
                routing = work.fixed_routing(
                    &alive
                        .iter()
                        .map(|&i| Some(local[i].as_slice()))
                        .collect::<Vec<_>>(),
                );
                if let Some(subject_rows) = &mut rows {
                    *subject_rows = alive
                        .iter()
                        .map(|&i| Some(sequences[i].subject_row))
                        .collect();
                }
                if let Some((_, negative)) = &mut penalty {
                    *negative = alive.iter().map(|&i| !sequences[i].positive).collect();
                }
            }
        }
        adam.step(
            &cfg,
            learning_rate(&cfg, it),
            &mut work.layers,
            &mut step.grads,
        );
        report.iterations = it + 1;
    }
    if stop_per_edit {
        for (plan, _) in plans.iter().zip(&done).filter(|(_, &d)| !d) {
            write_experts(elder, &work, &used, &plan.entry.allocation, r);
        }
    } else {
        for ((layer, u), trained) in elder.layers.iter_mut().zip(&used).zip(&work.layers) {
            layer.scatter(r, u, trained);
        }
    }
    let t_iter = t2.elapsed();
    let t3 = std::time::Instant::now();
    elder.add_keys(model, plans.iter().map(|p| p.key_texts.as_slice()))?;
    report.times = EditTimes {
        prepare: (t_seq + t_prep).as_secs_f64(),
        iterations: t_iter.as_secs_f64(),
        keys: t3.elapsed().as_secs_f64(),
    };
    elder.memory.extend(plans.iter().map(|p| p.entry.clone()));
    elder.refresh_scope_calibration();
    Ok(report)
}

/// Writes the trained values of one edit's experts (`allocation`, global indices per layer) from
/// the batch's gathered pool `work` (whose experts are `used`, per layer) back into `elder`.
fn write_experts(
    elder: &mut Elder,
    work: &Elder,
    used: &[Vec<u32>],
    allocation: &[Vec<u32>],
    r: usize,
) {
    for (((layer, trained), u), experts) in elder
        .layers
        .iter_mut()
        .zip(&work.layers)
        .zip(used)
        .zip(allocation)
    {
        let local: Vec<u32> = experts
            .iter()
            .map(|e| u.binary_search(e).expect("every used expert is gathered") as u32)
            .collect();
        layer.scatter(r, experts, &trained.gather(r, &local));
    }
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
    for (e, p) in plans.iter().enumerate() {
        let knowledge_id = p.entry.knowledge_id.clone();
        let positive = |prompt: &KeyText| Sequence {
            edit: Some(e),
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
                edit: Some(e),
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
        edit: None,
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
