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

use super::buckets::{length_buckets, BUCKET_OVERHEAD_ROWS};
use super::capture::{CpuSites, SiteReader};
use super::codebook::Codebook;
use super::config::{AllocationMode, ExpertRows};
use super::keystore::Derived;
use super::molora::Elder;
use super::molora::MoloraLayer;
use super::plan::{EditPlan, KeyText, Replay};
use super::trainer::{
    learning_rate, Adam, EditExample, EditReport, EditTimes, PreparedBatch, RowOptions,
};
use crate::backend::cpu::flops::Meter;
use crate::backend::cpu::in_pool;
use crate::backend::cpu::linear_ce::RowLosses;
use crate::backend::cpu::ops::Routing;

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

/// One stored-allocation batch as the iterations see it: its sequences (in order), each target
/// row's loss weight, and per sequence its experts (indices into the batch's gathered pool, per
/// layer), its subject row and whether its targets are the edit's (`false`: a negative).
pub struct StoredBatch {
    pub examples: Vec<EditExample>,
    pub weights: Vec<f32>,
    pub allocations: Vec<Vec<Vec<u32>>>,
    pub subject_rows: Vec<usize>,
    pub positive: Vec<bool>,
}

impl StoredBatch {
    /// Per layer, each sequence's own experts with gate 1: how every device routes the batch.
    pub fn routing(&self, work: &Elder) -> Vec<Routing> {
        own_routing(work, &self.allocations)
    }
}

/// Per layer, each sequence's experts (`allocations`, one per sequence) with gate 1.
fn own_routing(work: &Elder, allocations: &[Vec<Vec<u32>>]) -> Vec<Routing> {
    let allocations: Vec<_> = allocations.iter().map(|a| Some(a.as_slice())).collect();
    work.fixed_routing(&allocations)
}

/// Where a stored-allocation batch's iterations run: the CPU reference ([`CpuSteps`]) or the
/// CUDA trainer. Everything around them (the sequences, each edit's loss group and early stop,
/// which experts go back when) is [`apply_stored_batch_on`]'s, one for both devices.
pub trait StoredSteps {
    /// The base model's greedy continuation of each prompt, `tokens` long (a negative's target).
    fn greedy(&mut self, prompts: &[Vec<u32>], tokens: usize) -> anyhow::Result<Vec<Vec<u32>>>;
    /// Readies `batch` to train `work`'s experts (the pool of only what it trains) from fresh
    /// Adam moments.
    fn prepare(&mut self, work: Elder, batch: &StoredBatch) -> anyhow::Result<()>;
    /// Forward and backward at the current parameters: each kept target row's loss and argmax.
    fn losses(&mut self) -> anyhow::Result<RowLosses>;
    /// Keeps only the kept sequences with `keep[i]` (in order): what is dropped no longer moves
    /// any gradient from the next [`Self::losses`] on. Returns the kept target rows' indices
    /// among the previously kept rows.
    fn retain(&mut self, keep: &[bool]) -> anyhow::Result<Vec<usize>>;
    /// Adam step `it` (0-based) with the gradients of the last [`Self::losses`].
    fn step(&mut self, it: usize) -> anyhow::Result<()>;
    /// The trained pool now (its experts in the order of the prepared `work`).
    fn trained(&mut self) -> anyhow::Result<Vec<MoloraLayer>>;
    /// Optimiser steps skipped for overflow in this batch and the loss scale after it (devices
    /// that scale their loss; the CPU never does).
    fn scaling(&mut self) -> anyhow::Result<(usize, f32)> {
        Ok((0, 1.0))
    }
}

/// The CPU reference of [`StoredSteps`]: `PreparedBatch` and `Adam` on `model`'s weights.
pub struct CpuSteps<'m> {
    model: &'m Model,
    batch: Option<CpuBatch>,
    /// See [`BUCKET_OVERHEAD_ROWS`].
    bucket_overhead: usize,
}

/// A prepared batch of [`CpuSteps`]: its kept sequences in [`LengthBucket`]s.
struct CpuBatch {
    work: Elder,
    buckets: Vec<LengthBucket>,
    /// Each kept sequence's number of target rows, in batch order.
    target_lens: Vec<usize>,
    adam: Adam,
    grads: Vec<MoloraLayer>,
}

/// Sequences of similar length padded and run together ([`length_buckets`]). Answer windows
/// (one to three rows a sequence, nothing to pad) run as one bucket; their frozen pass is
/// bucketed inside [`PreparedBatch::answer_window_in_buckets`].
struct LengthBucket {
    prepared: PreparedBatch,
    /// Its sequences' indices among the batch's kept sequences, ascending.
    members: Vec<usize>,
    /// Per member: its experts, subject row and kind.
    allocations: Vec<Vec<Vec<u32>>>,
    subject_rows: Vec<usize>,
    positive: Vec<bool>,
    routing: Vec<Routing>,
}

/// Where each sequence's target rows start among the batch's (and, last, their total), from
/// each sequence's number of target rows.
fn row_starts(target_lens: &[usize]) -> Vec<usize> {
    let mut starts = Vec::with_capacity(target_lens.len() + 1);
    starts.push(0);
    for t in target_lens {
        starts.push(starts.last().expect("starts at 0") + t);
    }
    starts
}

/// Adds gradients `g` into `acc` (the same pool's).
fn add_grads(acc: &mut [MoloraLayer], g: &[MoloraLayer]) {
    for (acc, g) in acc.iter_mut().zip(g) {
        for (x, y) in [
            (&mut acc.a, &g.a),
            (&mut acc.b, &g.b),
            (&mut acc.w_r, &g.w_r),
            (&mut acc.b_r, &g.b_r),
        ] {
            assert_eq!(x.len(), y.len(), "gradients of different pools");
            x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
        }
    }
}

impl<'m> CpuSteps<'m> {
    pub fn new(model: &'m Model) -> Self {
        CpuSteps {
            model,
            batch: None,
            bucket_overhead: BUCKET_OVERHEAD_ROWS,
        }
    }

    /// With another price of a bucket in padded rows (0: every length runs apart; a price
    /// above any batch's padding: one padded batch).
    pub fn with_bucket_overhead(mut self, rows: usize) -> Self {
        self.bucket_overhead = rows;
        self
    }

    /// How many length buckets the prepared batch runs now.
    pub fn buckets(&self) -> usize {
        self.batch.as_ref().map_or(0, |b| b.buckets.len())
    }

    /// The gradients of the last [`StoredSteps::losses`] (every bucket's summed).
    pub fn last_grads(&self) -> &[MoloraLayer] {
        self.batch.as_ref().map_or(&[], |b| b.grads.as_slice())
    }

    fn batch(&mut self) -> anyhow::Result<&mut CpuBatch> {
        self.batch
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("no stored batch prepared"))
    }
}

impl StoredSteps for CpuSteps<'_> {
    fn greedy(&mut self, prompts: &[Vec<u32>], tokens: usize) -> anyhow::Result<Vec<Vec<u32>>> {
        Ok(self.model.generate(prompts, tokens, None, &mut NoAdapter))
    }

    fn prepare(&mut self, work: Elder, batch: &StoredBatch) -> anyhow::Result<()> {
        let target_lens: Vec<usize> = batch.examples.iter().map(|e| e.target.len()).collect();
        let first_row = row_starts(&target_lens);
        anyhow::ensure!(
            batch.weights.len() == first_row[target_lens.len()],
            "{} weights for {} target rows",
            batch.weights.len(),
            first_row[target_lens.len()]
        );
        let lens: Vec<usize> = batch
            .examples
            .iter()
            .map(|e| e.prompt.len() + e.target.len())
            .collect();
        let windowed = work.cfg.expert_rows == ExpertRows::Answer;
        let buckets = if windowed {
            vec![(0..lens.len()).collect()]
        } else {
            length_buckets(&lens, self.bucket_overhead)
        };
        let buckets = buckets
            .into_iter()
            .map(|members| {
                let pick = |i: &usize| batch.examples[*i].clone();
                let examples: Vec<EditExample> = members.iter().map(pick).collect();
                let weights: Vec<f32> = members
                    .iter()
                    .flat_map(|&i| {
                        batch.weights[first_row[i]..first_row[i + 1]]
                            .iter()
                            .copied()
                    })
                    .collect();
                // Under `expert_rows = "answer"` only the answer windows run each iteration.
                let prepared = if windowed {
                    PreparedBatch::answer_window_in_buckets(
                        self.model,
                        &work,
                        &examples,
                        weights,
                        self.bucket_overhead,
                    )?
                } else {
                    PreparedBatch::weighted(self.model, &work, &examples, weights)?
                };
                let allocations: Vec<_> = members
                    .iter()
                    .map(|&i| batch.allocations[i].clone())
                    .collect();
                Ok(LengthBucket {
                    prepared,
                    routing: own_routing(&work, &allocations),
                    allocations,
                    subject_rows: members.iter().map(|&i| batch.subject_rows[i]).collect(),
                    positive: members.iter().map(|&i| batch.positive[i]).collect(),
                    members,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        self.batch = Some(CpuBatch {
            adam: Adam::new(&work.layers),
            grads: Vec::new(),
            work,
            buckets,
            target_lens,
        });
        Ok(())
    }

    fn losses(&mut self) -> anyhow::Result<RowLosses> {
        let model = self.model;
        let b = self.batch()?;
        let cfg = &b.work.cfg;
        let first_row = row_starts(&b.target_lens);
        let total = first_row[b.target_lens.len()];
        let mut out = RowLosses {
            loss: vec![0.0; total],
            argmax: vec![0; total],
        };
        let mut grads: Option<Vec<MoloraLayer>> = None;
        for bucket in &mut b.buckets {
            let rows: Option<Vec<Option<usize>>> = (cfg.expert_rows == ExpertRows::Subject)
                .then(|| bucket.subject_rows.iter().map(|&r| Some(r)).collect());
            let penalty = (cfg.delta_penalty > 0.0).then(|| {
                (
                    cfg.delta_penalty,
                    bucket.positive.iter().map(|p| !p).collect(),
                )
            });
            let step = bucket.prepared.loss_and_grads_routed(
                model,
                &b.work,
                &bucket.routing,
                RowOptions {
                    rows: rows.as_deref(),
                    answer_from: None,
                    delta_penalty: penalty,
                },
            );
            let rows = step
                .rows
                .ok_or_else(|| anyhow::anyhow!("weighted batches report their rows"))?;
            // The bucket's rows are its members' targets in order: back to batch order.
            let mut at = 0;
            for &m in &bucket.members {
                let (start, end) = (first_row[m], first_row[m + 1]);
                out.loss[start..end].copy_from_slice(&rows.loss[at..at + end - start]);
                out.argmax[start..end].copy_from_slice(&rows.argmax[at..at + end - start]);
                at += end - start;
            }
            match &mut grads {
                None => grads = Some(step.grads),
                Some(acc) => add_grads(acc, &step.grads),
            }
        }
        b.grads = grads.unwrap_or_default();
        Ok(out)
    }

    fn retain(&mut self, keep: &[bool]) -> anyhow::Result<Vec<usize>> {
        let b = self.batch()?;
        anyhow::ensure!(
            keep.len() == b.target_lens.len(),
            "{} flags for {} sequences",
            keep.len(),
            b.target_lens.len()
        );
        // Each kept sequence's new index, and the kept target rows among the old ones.
        let mut new_index = vec![None; keep.len()];
        let (mut kept_rows, mut kept, mut row) = (Vec::new(), 0, 0);
        for (i, (&k, &t)) in keep.iter().zip(&b.target_lens).enumerate() {
            if k {
                new_index[i] = Some(kept);
                kept += 1;
                kept_rows.extend(row..row + t);
            }
            row += t;
        }
        for bucket in &mut b.buckets {
            let local: Vec<bool> = bucket.members.iter().map(|&m| keep[m]).collect();
            if local.iter().any(|&k| k) {
                bucket.prepared.retain(&local);
            }
            retain_flagged(&mut bucket.allocations, &local);
            retain_flagged(&mut bucket.subject_rows, &local);
            retain_flagged(&mut bucket.positive, &local);
            retain_flagged(&mut bucket.members, &local);
            for m in &mut bucket.members {
                *m = new_index[*m].expect("a kept member has a new index");
            }
            bucket.routing = own_routing(&b.work, &bucket.allocations);
        }
        b.buckets.retain(|bucket| !bucket.members.is_empty());
        retain_flagged(&mut b.target_lens, keep);
        Ok(kept_rows)
    }

    fn step(&mut self, it: usize) -> anyhow::Result<()> {
        let b = self.batch()?;
        let cfg = b.work.cfg.clone();
        b.adam.step(
            &cfg,
            learning_rate(&cfg, it),
            &mut b.work.layers,
            &mut b.grads,
        );
        Ok(())
    }

    fn trained(&mut self) -> anyhow::Result<Vec<MoloraLayer>> {
        Ok(self.batch()?.work.layers.clone())
    }
}

/// Keeps the items of `v` whose flag in `keep` is set.
fn retain_flagged<X>(v: &mut Vec<X>, keep: &[bool]) {
    let mut flags = keep.iter();
    v.retain(|_| *flags.next().expect("one flag per sequence"));
}

/// Trains `plans` (with `replays`) into `elder` on the CPU: [`apply_stored_batch_on`] with
/// [`CpuSteps`].
///
/// Runs inside the CPU pool ([`in_pool`]): an edit is thousands of small parallel steps.
pub fn apply_stored_batch(
    model: &Model,
    elder: &mut Elder,
    plans: &[EditPlan],
    replays: &[Replay],
    on_iteration: impl FnMut(usize, f32) + Send,
) -> anyhow::Result<EditReport> {
    in_pool(|| {
        let report = apply_stored_batch_on(
            &mut CpuSteps::new(model),
            elder,
            plans,
            replays,
            on_iteration,
        )?;
        finish_stored_batch(&mut CpuSites(model), elder, plans, report)
    })
}

/// Adds a trained batch's keys to the key store (read by `sites`, the device's forward) and its
/// entries to the memory, after [`apply_stored_batch_on`].
pub fn finish_stored_batch(
    sites: &mut dyn SiteReader,
    elder: &mut Elder,
    plans: &[EditPlan],
    mut report: EditReport,
) -> anyhow::Result<EditReport> {
    let keys = Meter::start();
    elder.add_keys(sites, plans.iter().map(|p| p.key_texts.as_slice()))?;
    report.times.keys = keys.seconds();
    report.times.keys_gflop = keys.gflop();
    elder.memory.extend(plans.iter().map(|p| p.entry.clone()));
    elder.refresh_scope_calibration();
    Ok(report)
}

/// Trains `plans` (with `replays`) into `elder`'s experts on `steps`. The plans' allocations must
/// name experts of the pool, except fresh ones, which are created here (in plan order, so they
/// get the indices the plans name). Keys and memory entries are [`finish_stored_batch`]'s.
pub fn apply_stored_batch_on(
    steps: &mut dyn StoredSteps,
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
    let building = Meter::start();
    let sequences = sequences(steps, plans, replays)?;
    let (sequences_seconds, sequences_gflop) = (building.seconds(), building.gflop());

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
    let work = Elder {
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
        word_map: Derived(None),
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
    let batch = StoredBatch {
        examples: sequences.iter().map(|s| s.example.clone()).collect(),
        weights,
        allocations: local,
        subject_rows: sequences.iter().map(|s| s.subject_row).collect(),
        positive: sequences.iter().map(|s| s.positive).collect(),
    };
    let mut targets: Vec<u32> = batch
        .examples
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
    // The sequences still trained (indices into `sequences`), and each group's latest mean
    // positive loss (an edit's stays at its value when it stopped).
    let mut alive: Vec<usize> = (0..sequences.len()).collect();
    let mut group_loss = vec![0.0f32; groups];
    let preparing = Meter::start();
    steps.prepare(work, &batch)?;
    let prepare_seconds = sequences_seconds + preparing.seconds();
    let prepare_gflop = sequences_gflop + preparing.gflop();
    let iterating = Meter::start();
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
        let row_losses = steps.losses()?;
        anyhow::ensure!(
            row_losses.loss.len() == row_group.len() && row_losses.argmax.len() == row_group.len(),
            "{} row losses for {} target rows",
            row_losses.loss.len(),
            row_group.len()
        );
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
            let newly: Vec<usize> = (0..plans.len())
                .filter(|&e| !done[e] && learned[e])
                .collect();
            if !newly.is_empty() {
                let trained = steps.trained()?;
                for &e in &newly {
                    done[e] = true;
                    write_experts(elder, &trained, &used, &plans[e].entry.allocation, r);
                }
                // Drop the stopped edits' sequences: later iterations cost only what trains.
                let keep: Vec<bool> = alive
                    .iter()
                    .map(|&i| sequences[i].edit.is_none_or(|e| !done[e]))
                    .collect();
                let kept_rows = steps.retain(&keep)?;
                alive = alive
                    .iter()
                    .zip(&keep)
                    .filter(|(_, &k)| k)
                    .map(|(&i, _)| i)
                    .collect();
                row_group = kept_rows.iter().map(|&j| row_group[j]).collect();
                targets = kept_rows.iter().map(|&j| targets[j]).collect();
            }
        }
        steps.step(it)?;
        report.iterations = it + 1;
    }
    let trained = steps.trained()?;
    if stop_per_edit {
        for (plan, _) in plans.iter().zip(&done).filter(|(_, &d)| !d) {
            write_experts(elder, &trained, &used, &plan.entry.allocation, r);
        }
    } else {
        for ((layer, u), trained) in elder.layers.iter_mut().zip(&used).zip(&trained) {
            layer.scatter(r, u, trained);
        }
    }
    (report.skipped_steps, report.loss_scale) = steps.scaling()?;
    report.times = EditTimes {
        prepare: prepare_seconds,
        iterations: iterating.seconds(),
        prepare_gflop,
        iterations_gflop: iterating.gflop(),
        ..EditTimes::default()
    };
    Ok(report)
}

/// Writes the trained values of one edit's experts (`allocation`, global indices per layer) from
/// the batch's gathered pool `work` (whose experts are `used`, per layer) back into `elder`.
fn write_experts(
    elder: &mut Elder,
    work: &[MoloraLayer],
    used: &[Vec<u32>],
    allocation: &[Vec<u32>],
    r: usize,
) {
    for (((layer, trained), u), experts) in
        elder.layers.iter_mut().zip(work).zip(used).zip(allocation)
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
fn sequences(
    steps: &mut dyn StoredSteps,
    plans: &[EditPlan],
    replays: &[Replay],
) -> anyhow::Result<Vec<Sequence>> {
    let negatives: Vec<Vec<u32>> = plans
        .iter()
        .flat_map(|p| p.negatives.iter().map(|n| n.tokens.clone()))
        .collect();
    let mut answers = if negatives.is_empty() {
        Vec::new()
    } else {
        steps.greedy(&negatives, NEGATIVE_ANSWER_TOKENS)?
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
    Ok(out)
}
