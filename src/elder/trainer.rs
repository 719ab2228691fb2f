//! Editing: trains the experts and routers on a batch of edits (target-only cross-entropy plus the
//! guided loss, a fresh Adam per batch), then appends each edit's allocation code to the codebook.
//!
//! Nothing below the first MoLoRA block changes while editing, so the residual stream entering the
//! first MoLoRA block's MLP (and the query) is computed once per batch and reused by every iteration.

use std::ops::Range;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::cpu::flops::Meter;
use crate::backend::cpu::in_pool;
use crate::backend::cpu::linear_ce::RowLosses;
use crate::backend::cpu::ops::Routing;
use crate::backend::cpu::ops::{self, AdamStep};
use crate::model::runner::{pad_batch, prompt_rows, target_rows};
use crate::model::transformer::{AttnTape, MlpTape};
use crate::model::{BatchShape, KvCache, Model, ModelConfig, NoAdapter};

use super::buckets::{length_buckets, BUCKET_OVERHEAD_ROWS};
use super::config::{AllocationMode, ElderConfig};
use super::last_block::LastBlockRows;
use super::molora::{Elder, ElderAdapter, MoloraLayer};
use crate::util::stable_hash;

/// One edit, tokenized: the model should continue `prompt` with `target`.
#[derive(Debug, Clone)]
pub struct EditExample {
    pub prompt: Vec<u32>,
    pub target: Vec<u32>,
    /// An edit and its rephrasings share one knowledge id, and so one preset allocation.
    pub knowledge_id: String,
}

/// What one edit batch did.
#[derive(Debug, Clone, PartialEq)]
pub struct EditReport {
    /// Mean target cross-entropy at the first and at the last iteration.
    pub first_loss: f32,
    pub last_loss: f32,
    /// Guided loss (summed over layers, unweighted) at the last iteration.
    pub guide_loss: f32,
    pub iterations: usize,
    /// Iterations whose gradients overflowed and whose Adam step was skipped (f16 loss scaling on
    /// the GPU; always 0 on the CPU).
    pub skipped_steps: usize,
    /// The loss scale at the end of the batch (1 on the CPU and outside f16).
    pub loss_scale: f32,
    /// Where the batch's time went (zero where a trainer does not measure a part).
    pub times: EditTimes,
}

/// Seconds one edit batch spent in each part of its training.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct EditTimes {
    /// Building the batch's sequences (negatives' base answers included) and running the frozen
    /// prefix (and, for answer windows, the frozen rows of every block).
    pub prepare: f64,
    /// The optimisation steps.
    pub iterations: f64,
    /// Reading the new edits' keys into the key store.
    pub keys: f64,
    /// The CPU's matrix products in each part, in GFLOP (`backend::cpu::flops`; 0 for the work
    /// a GPU did).
    pub prepare_gflop: f64,
    pub iterations_gflop: f64,
    pub keys_gflop: f64,
}

impl EditTimes {
    pub fn add(&mut self, other: &EditTimes) {
        self.prepare += other.prepare;
        self.iterations += other.iterations;
        self.keys += other.keys;
        self.prepare_gflop += other.prepare_gflop;
        self.iterations_gflop += other.iterations_gflop;
        self.keys_gflop += other.keys_gflop;
    }
}

/// The preset allocation of a knowledge id: `k` distinct experts for every MoLoRA layer, drawn from a
/// seed derived from the id.
pub fn preset_allocation(cfg: &ElderConfig, knowledge_id: &str) -> Vec<Vec<u32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ stable_hash(knowledge_id));
    (0..cfg.molora_blocks.len())
        .map(|_| {
            let mut pool: Vec<u32> = (0..cfg.num_experts as u32).collect();
            for i in 0..cfg.top_k {
                let j = rng.gen_range(i..pool.len());
                pool.swap(i, j);
            }
            pool.truncate(cfg.top_k);
            pool
        })
        .collect()
}

/// Adam state for every MoLoRA parameter, created fresh for each edit batch.
pub(crate) struct Adam {
    m: Vec<MoloraLayer>,
    v: Vec<MoloraLayer>,
    t: u32,
}

impl Adam {
    pub(crate) fn new(layers: &[MoloraLayer]) -> Self {
        Adam {
            m: layers.iter().map(MoloraLayer::zeros_like).collect(),
            v: layers.iter().map(MoloraLayer::zeros_like).collect(),
            t: 0,
        }
    }

    pub(crate) fn step(
        &mut self,
        cfg: &ElderConfig,
        lr: f32,
        params: &mut [MoloraLayer],
        grads: &mut [MoloraLayer],
    ) {
        self.t += 1;
        let rates = tensor_rates(cfg, lr);
        for (((p, g), m), v) in params
            .iter_mut()
            .zip(grads.iter_mut())
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            for ((((p, g), m), v), rate) in p
                .tensors_mut()
                .into_iter()
                .zip(g.tensors_mut())
                .zip(m.tensors_mut())
                .zip(v.tensors_mut())
                .zip(rates)
            {
                ops::adam(p, g, m, v, adam_step(cfg, rate, self.t));
            }
        }
    }
}

/// The learning rate of every tensor of a MoLoRA layer, in the order of
/// `MoloraLayer::tensors_mut` (A, B, router weight, router bias): the experts train at `lr`, the
/// routers at `lr * router_lr_scale`. Shared with the CUDA trainer.
pub(crate) fn tensor_rates(cfg: &ElderConfig, lr: f32) -> [f32; 4] {
    let router = lr * cfg.router_lr_scale;
    [lr, lr, router, router]
}

/// Adam's hyperparameters for step `t` (1-based) of a tensor trained at `lr`.
pub(crate) fn adam_step(cfg: &ElderConfig, lr: f32, t: u32) -> AdamStep {
    AdamStep {
        lr,
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_eps,
        t,
    }
}

/// The schedule: `learning_rate`, multiplied by `lr_decay_factor` every `lr_decay_every` iterations.
pub(crate) fn learning_rate(cfg: &ElderConfig, iteration: usize) -> f32 {
    if cfg.lr_decay_every == 0 {
        return cfg.learning_rate;
    }
    cfg.learning_rate
        * cfg
            .lr_decay_factor
            .powi((iteration / cfg.lr_decay_every) as i32)
}

/// An edit batch laid out as the padded batch every trainer runs (`prompt + target` per sequence,
/// right-padded): the token ids, the rows whose logits are supervised with their targets (teacher
/// forcing), and each sequence's prompt rows (where its query is read).
#[derive(Debug, Clone, PartialEq)]
pub struct EditRows {
    pub ids: Vec<u32>,
    pub shape: BatchShape,
    pub target_rows: Vec<usize>,
    pub targets: Vec<u32>,
    pub prompt_rows: Vec<Range<usize>>,
}

impl EditRows {
    /// Checks the edits against the model (non-empty, within its positions) and lays them out.
    pub fn new(cfg: &ModelConfig, batch: &[EditExample]) -> anyhow::Result<Self> {
        Self::laid_out(cfg, batch, false)
    }

    /// [`EditRows::new`] with each sequence ending at its last supervised row: without its last
    /// target token, which predicts nothing the loss reads and which no earlier row attends to.
    pub fn supervised(cfg: &ModelConfig, batch: &[EditExample]) -> anyhow::Result<Self> {
        Self::laid_out(cfg, batch, true)
    }

    fn laid_out(
        cfg: &ModelConfig,
        batch: &[EditExample],
        supervised: bool,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!batch.is_empty(), "empty edit batch");
        for (i, ex) in batch.iter().enumerate() {
            anyhow::ensure!(
                !ex.prompt.is_empty() && !ex.target.is_empty(),
                "edit {i} has an empty prompt or target"
            );
            let len = ex.prompt.len() + ex.target.len();
            anyhow::ensure!(
                len <= cfg.max_positions,
                "edit {i} is {len} tokens, longer than the model's {} positions",
                cfg.max_positions
            );
        }
        let seqs: Vec<Vec<u32>> = batch
            .iter()
            .map(|ex| {
                let fed = ex.target.len() - usize::from(supervised);
                [ex.prompt.as_slice(), &ex.target[..fed]].concat()
            })
            .collect();
        let (ids, shape) = pad_batch(&seqs, &vec![0; batch.len()]);
        let target_rows = target_rows(
            shape.seq,
            batch.iter().map(|ex| (ex.prompt.len(), ex.target.len())),
        );
        let targets = batch.iter().flat_map(|ex| ex.target.clone()).collect();
        let prompt_rows = prompt_rows(shape.seq, batch.iter().map(|ex| ex.prompt.len()));
        Ok(EditRows {
            ids,
            shape,
            target_rows,
            targets,
            prompt_rows,
        })
    }
}

/// An edit batch made ready for training: padded tokens, supervised rows, and the frozen prefix.
pub struct PreparedBatch {
    shape: crate::model::BatchShape,
    target_rows: Vec<usize>,
    targets: Vec<u32>,
    /// The loss weight of each target row; `None`: the mean over the rows (the paper).
    weights: Option<Vec<f32>>,
    /// Residual stream after the first MoLoRA block's attention `[rows, d]`.
    prefix: Vec<f32>,
    /// Query vectors `[B, d_in]`.
    pub query: Vec<f32>,
    cache: KvCache,
    attn_tapes: Vec<AttnTape>,
    mlp_tapes: Vec<MlpTape>,
    /// The first MoLoRA block's MLP output projection before the experts: its input is the
    /// frozen prefix, so with experts at that projection only it is computed once
    /// ([`Model::mlp_half_fixed_input`]); emptied when sequences leave the batch.
    first_mlp_out: Option<Vec<f32>>,
    /// Run the last block only on the rows the head reads ([`LastBlockRows`]): set for weighted
    /// batches (the stored trainer). The paper's trainer keeps the whole block, so that its
    /// numbers stay bit for bit those it always had (a product's rounding depends on its rows).
    split_last_block: bool,
    /// Built by [`PreparedBatch::answer_window`]: the rows are each sequence's answer window.
    windowed: bool,
}

/// What a routed training pass does beyond the cross-entropy (see the `expert_rows` and
/// `delta_penalty` settings).
#[derive(Debug, Clone, Default)]
pub struct RowOptions<'a> {
    /// The one row of each sequence the experts change (`expert_rows = "subject"`).
    pub rows: Option<&'a [Option<usize>]>,
    /// Each sequence's first row the experts change (`expert_rows = "answer"`).
    pub answer_from: Option<&'a [usize]>,
    /// The penalty's weight and the sequences it applies to.
    pub delta_penalty: Option<(f32, Vec<bool>)>,
}

/// Loss and gradients of one forward/backward pass.
pub struct LossAndGrads {
    /// Mean target cross-entropy.
    pub ce: f32,
    /// Guided loss summed over layers (unweighted).
    pub guide: f32,
    pub grads: Vec<MoloraLayer>,
    /// The routers' top-k experts per layer `[L][B * k]` in this pass.
    pub chosen: Vec<Vec<u32>>,
    /// Each target row's cross-entropy and argmax (weighted batches only).
    pub rows: Option<RowLosses>,
}

impl LossAndGrads {
    /// The objective the gradients belong to.
    pub fn total(&self, cfg: &ElderConfig) -> f32 {
        self.ce + cfg.guide_weight * self.guide
    }
}

impl PreparedBatch {
    /// [`PreparedBatch::new`] with a loss weight for every target row (in batch order), laid out
    /// for speed: each sequence ends at its last supervised row (the last target token is an
    /// input no loss reads, and causal attention lets no earlier row read it) unless a delta
    /// penalty counts every row, and the last block runs only on the rows the head reads
    /// ([`LastBlockRows`]). The losses and gradients are those of every row run in full
    /// ([`PreparedBatch::weighted_in_full`]) up to rounding.
    pub fn weighted(
        model: &Model,
        elder: &Elder,
        batch: &[EditExample],
        weights: Vec<f32>,
    ) -> anyhow::Result<Self> {
        let rows = if elder.cfg.delta_penalty > 0.0 {
            EditRows::new(&model.cfg, batch)?
        } else {
            EditRows::supervised(&model.cfg, batch)?
        };
        let mut p = Self::from_rows(model, elder, rows)?.with_weights(weights)?;
        p.split_last_block = true;
        Ok(p)
    }

    /// [`PreparedBatch::weighted`] with every row of every sequence run through every block, as
    /// the paper's trainer runs them: the reference the fast layout is tested against.
    pub fn weighted_in_full(
        model: &Model,
        elder: &Elder,
        batch: &[EditExample],
        weights: Vec<f32>,
    ) -> anyhow::Result<Self> {
        Self::new(model, elder, batch)?.with_weights(weights)
    }

    fn with_weights(mut self, weights: Vec<f32>) -> anyhow::Result<Self> {
        anyhow::ensure!(
            weights.len() == self.targets.len(),
            "{} weights for {} target rows",
            weights.len(),
            self.targets.len()
        );
        self.weights = Some(weights);
        Ok(self)
    }

    /// Tokenized edits -> padded batch; runs the frozen prefix once.
    pub fn new(model: &Model, elder: &Elder, batch: &[EditExample]) -> anyhow::Result<Self> {
        Self::from_rows(model, elder, EditRows::new(&model.cfg, batch)?)
    }

    fn from_rows(model: &Model, elder: &Elder, rows: EditRows) -> anyhow::Result<Self> {
        let EditRows {
            ids,
            shape,
            target_rows,
            targets,
            prompt_rows: query_rows,
        } = rows;

        let first = elder.cfg.molora_blocks[0];
        let mut cache = KvCache::new(&model.cfg, shape.batch, shape.seq);
        let mut prefix = model.embed(&ids, &shape);
        let mut capture = ElderAdapter::inference(elder, query_rows);
        for l in 0..first {
            model.attn_half(l, &mut prefix, &shape, &mut cache, None);
            model.mlp_half(l, &mut prefix, &shape, &mut capture, None);
        }
        // Only the routers read the query (the stored allocation needs none).
        let query = match capture.query.take() {
            Some(q) => q,
            None if !elder.cfg.uses_routers() => Vec::new(),
            None => anyhow::bail!("the query site was not reached below block {first}"),
        };
        model.attn_half(first, &mut prefix, &shape, &mut cache, None);
        let n = model.cfg.num_layers;
        Ok(PreparedBatch {
            shape,
            target_rows,
            targets,
            weights: None,
            prefix,
            query,
            cache,
            attn_tapes: vec![AttnTape::default(); n],
            mlp_tapes: vec![MlpTape::default(); n],
            first_mlp_out: None,
            split_last_block: false,
            windowed: false,
        })
    }

    /// [`PreparedBatch::weighted`] for `expert_rows = "answer"` under the stored allocation.
    ///
    /// The experts change only each sequence's rows from its last prompt token on, so every
    /// earlier row is the frozen model's in every block: their keys and values are computed once
    /// here, and each iteration runs only the *answer window* (the last prompt token and the
    /// target tokens but the last: exactly the rows whose logits are supervised) against that
    /// cache. The loss and gradients are those of the full pass with the same option; an
    /// iteration costs the window's rows instead of the whole sequence's.
    pub fn answer_window(
        model: &Model,
        elder: &Elder,
        batch: &[EditExample],
        weights: Vec<f32>,
    ) -> anyhow::Result<Self> {
        Self::answer_window_in_buckets(model, elder, batch, weights, BUCKET_OVERHEAD_ROWS)
    }

    /// [`PreparedBatch::answer_window`] whose frozen pass runs the prompts in length buckets
    /// ([`length_buckets`] with a bucket's price `overhead` in padded rows), each padded on its
    /// own: the frozen rows are the same, the padding computed is less.
    pub fn answer_window_in_buckets(
        model: &Model,
        elder: &Elder,
        batch: &[EditExample],
        weights: Vec<f32>,
        overhead: usize,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !elder.cfg.uses_routers(),
            "the answer window needs the stored allocation (no router reads the prompt)"
        );
        let EditRows { targets, .. } = EditRows::new(&model.cfg, batch)?;
        anyhow::ensure!(
            weights.len() == targets.len(),
            "{} weights for {} target rows",
            weights.len(),
            targets.len()
        );
        let n_layers = model.cfg.num_layers;
        let first = elder.cfg.molora_blocks[0];
        // Frozen rows: the prompt but its last token. Window: that token, then the target's.
        let frozen: Vec<Vec<u32>> = batch
            .iter()
            .map(|ex| ex.prompt[..ex.prompt.len() - 1].to_vec())
            .collect();
        let window: Vec<Vec<u32>> = batch
            .iter()
            .map(|ex| {
                let mut w = ex.prompt[ex.prompt.len() - 1..].to_vec();
                w.extend_from_slice(&ex.target[..ex.target.len() - 1]);
                w
            })
            .collect();
        let starts: Vec<usize> = frozen.iter().map(Vec::len).collect();
        let capacity = batch
            .iter()
            .map(|ex| ex.prompt.len() + ex.target.len() - 1)
            .max()
            .unwrap_or(1);
        let mut cache = KvCache::new(&model.cfg, batch.len(), capacity);
        for members in length_buckets(&starts, overhead) {
            if members.iter().all(|&i| starts[i] == 0) {
                continue;
            }
            let rows: Vec<Vec<u32>> = members.iter().map(|&i| frozen[i].clone()).collect();
            let mut part = KvCache::new(&model.cfg, members.len(), capacity);
            let (ids, shape) = pad_batch(&rows, &vec![0; members.len()]);
            let mut h = model.embed(&ids, &shape);
            for l in 0..n_layers {
                model.attn_half(l, &mut h, &shape, &mut part, None);
                // The last block's MLP output is read by no key or value.
                if l + 1 < n_layers {
                    model.mlp_half(l, &mut h, &shape, &mut NoAdapter, None);
                }
            }
            cache.place(&part, &members);
        }
        let (ids, shape) = pad_batch(&window, &starts);
        let target_rows = target_rows(shape.seq, batch.iter().map(|ex| (1, ex.target.len())));
        let mut prefix = model.embed(&ids, &shape);
        for l in 0..first {
            model.attn_half(l, &mut prefix, &shape, &mut cache, None);
            model.mlp_half(l, &mut prefix, &shape, &mut NoAdapter, None);
        }
        model.attn_half(first, &mut prefix, &shape, &mut cache, None);
        Ok(PreparedBatch {
            shape,
            target_rows,
            targets,
            weights: Some(weights),
            prefix,
            query: Vec::new(),
            cache,
            attn_tapes: vec![AttnTape::default(); n_layers],
            mlp_tapes: vec![MlpTape::default(); n_layers],
            first_mlp_out: None,
            split_last_block: false,
            windowed: true,
        })
    }

    /// Keeps only the sequences with `keep[b]` (in order), as if the batch had been prepared
    /// without the others: each sequence's rows, cache and targets are its own, so what is kept
    /// trains exactly as before, and an iteration no longer pays for what was dropped (a batch of
    /// edits drops an edit's sequences once it has learned). Returns the kept target rows'
    /// indices among the old ones.
    pub fn retain(&mut self, keep: &[bool]) -> Vec<usize> {
        let old = &self.shape;
        assert_eq!(keep.len(), old.batch, "one flag per sequence");
        let kept: Vec<usize> = (0..old.batch).filter(|&b| keep[b]).collect();
        let seq = kept.iter().map(|&b| old.valid[b]).max().unwrap_or(1).max(1);
        let d = self.prefix.len() / old.rows().max(1);
        let mut prefix = Vec::with_capacity(kept.len() * seq * d);
        for &b in &kept {
            prefix.extend_from_slice(&self.prefix[b * old.seq * d..][..seq * d]);
        }
        // Each old sequence's index in the kept batch.
        let mut new_index = vec![None; old.batch];
        for (new_b, &b) in kept.iter().enumerate() {
            new_index[b] = Some(new_b);
        }
        let mut kept_rows = Vec::new();
        let mut target_rows = Vec::new();
        for (j, &row) in self.target_rows.iter().enumerate() {
            let (b, offset) = (row / old.seq, row % old.seq);
            if let Some(new_b) = new_index[b] {
                kept_rows.push(j);
                target_rows.push(new_b * seq + offset);
            }
        }
        let cap = self.cache.capacity;
        let w = self.cache.kv_dim;
        let gather_cache = |layer: &[f32]| -> Vec<f32> {
            kept.iter()
                .flat_map(|&b| layer[b * cap * w..(b + 1) * cap * w].iter().copied())
                .collect()
        };
        for l in 0..self.cache.k.len() {
            self.cache.k[l] = gather_cache(&self.cache.k[l]);
            self.cache.v[l] = gather_cache(&self.cache.v[l]);
        }
        self.cache.lens = kept.iter().map(|&b| self.cache.lens[b]).collect();
        self.cache.batch = kept.len();
        if !self.query.is_empty() {
            let q = self.query.len() / old.batch;
            self.query = kept
                .iter()
                .flat_map(|&b| self.query[b * q..(b + 1) * q].iter().copied())
                .collect();
        }
        self.targets = kept_rows.iter().map(|&j| self.targets[j]).collect();
        if let Some(w) = &mut self.weights {
            *w = kept_rows.iter().map(|&j| w[j]).collect();
        }
        self.shape = BatchShape {
            batch: kept.len(),
            seq,
            valid: kept.iter().map(|&b| old.valid[b]).collect(),
            start: kept.iter().map(|&b| old.start[b]).collect(),
        };
        self.prefix = prefix;
        self.target_rows = target_rows;
        self.first_mlp_out = None;
        kept_rows
    }

    /// Whether the rows are answer windows ([`PreparedBatch::answer_window`]): every row is one
    /// the experts change, so no `answer_from` applies.
    pub fn is_windowed(&self) -> bool {
        self.windowed
    }

    /// Whether an iteration runs the last block only on the rows the head reads (see
    /// [`LastBlockRows`]).
    pub fn splits_last_block(&self, model: &Model, elder: &Elder) -> bool {
        self.last_block_split(elder, model.cfg.num_layers).is_some()
    }

    /// The last block's split: for weighted batches of whole sequences, when the last block
    /// holds no experts (their rows would all change) and is not the first MoLoRA block.
    fn last_block_split(&self, elder: &Elder, n_layers: usize) -> Option<LastBlockRows> {
        let last = n_layers - 1;
        let blocks = &elder.cfg.molora_blocks;
        if !self.split_last_block || blocks[0] >= last || blocks.contains(&last) {
            return None;
        }
        LastBlockRows::new(&self.shape, &self.target_rows)
    }

    /// One forward and backward pass from the first MoLoRA block up. `presets` (`[L][B * k]`) are the
    /// guided loss's targets; `None` uses the routers' own choice of this pass.
    pub fn loss_and_grads(
        &mut self,
        model: &Model,
        elder: &Elder,
        presets: Option<&[Vec<u32>]>,
    ) -> LossAndGrads {
        let mut adapter = ElderAdapter::training(elder, self.query.clone());
        let (ce, rows) = self.forward_backward(model, elder, &mut adapter);
        let chosen: Vec<Vec<u32>> = adapter
            .routing
            .as_ref()
            .map(|r| r.iter().map(|r| r.experts.clone()).collect())
            .unwrap_or_default();
        let guide = adapter.router_backward(presets.unwrap_or(&chosen));
        LossAndGrads {
            ce,
            guide,
            grads: std::mem::take(&mut adapter.grads),
            chosen,
            rows,
        }
    }

    /// [`PreparedBatch::loss_and_grads`] with every sequence's experts given (`routing`, one per
    /// MoLoRA layer): no router, no guided loss; `options` say which rows the experts change
    /// and what else the loss holds.
    pub fn loss_and_grads_routed(
        &mut self,
        model: &Model,
        elder: &Elder,
        routing: &[Routing],
        options: RowOptions,
    ) -> LossAndGrads {
        let mut adapter = ElderAdapter::training_routed(elder, routing.to_vec());
        adapter.expert_rows = options.rows.map(<[_]>::to_vec);
        adapter.answer_from = options.answer_from.map(<[_]>::to_vec);
        adapter.delta_penalty = options.delta_penalty;
        let (ce, rows) = self.forward_backward(model, elder, &mut adapter);
        LossAndGrads {
            ce,
            guide: 0.0,
            grads: std::mem::take(&mut adapter.grads),
            chosen: routing.iter().map(|r| r.experts.clone()).collect(),
            rows,
        }
    }

    /// The forward from the first MoLoRA block, the loss and the backward down to that block:
    /// the (weighted) cross-entropy, and each row's with weights.
    fn forward_backward(
        &mut self,
        model: &Model,
        elder: &Elder,
        adapter: &mut ElderAdapter,
    ) -> (f32, Option<RowLosses>) {
        let first = elder.cfg.molora_blocks[0];
        let n_layers = model.cfg.num_layers;
        let shape = &self.shape;
        let mut h = self.prefix.clone();
        model.mlp_half_fixed_input(
            first,
            &mut h,
            shape,
            adapter,
            &mut self.mlp_tapes[first],
            &mut self.first_mlp_out,
        );
        let last = n_layers - 1;
        let split = self.last_block_split(elder, n_layers);
        let top = if split.is_some() { last } else { n_layers };
        for l in first + 1..top {
            model.attn_half(
                l,
                &mut h,
                shape,
                &mut self.cache,
                Some(&mut self.attn_tapes[l]),
            );
            model.mlp_half(l, &mut h, shape, adapter, Some(&mut self.mlp_tapes[l]));
        }
        // The last block on the target rows, the rows before them for keys and values only.
        let d = model.cfg.hidden_size;
        let (context_kv, h, loss_rows) = match &split {
            Some(split) => {
                let kv = model.kv_half(
                    last,
                    &split.gather_context(&h, d),
                    &split.context,
                    &mut self.cache,
                );
                let mut answer = split.gather_answer(&h, d);
                model.attn_half(
                    last,
                    &mut answer,
                    &split.answer,
                    &mut self.cache,
                    Some(&mut self.attn_tapes[last]),
                );
                model.mlp_half(
                    last,
                    &mut answer,
                    &split.answer,
                    adapter,
                    Some(&mut self.mlp_tapes[last]),
                );
                (Some(kv), answer, &split.target_rows)
            }
            None => (None, h, &self.target_rows),
        };
        let mut dh = vec![0.0f32; h.len()];
        let (ce, rows) = match &self.weights {
            None => {
                let weight = 1.0 / self.targets.len() as f32;
                let ce = model.head_loss(&h, loss_rows, &self.targets, weight, &mut dh) * weight;
                (ce, None)
            }
            Some(w) => {
                let rows = model.head_loss_rows(&h, loss_rows, &self.targets, w, &mut dh);
                let ce = rows.loss.iter().zip(w).map(|(l, w)| l * w).sum();
                (ce, Some(rows))
            }
        };
        if let (Some(split), Some(kv)) = (&split, context_kv) {
            let answer = &split.answer;
            model.mlp_backward(last, &self.mlp_tapes[last], answer, adapter, &mut dh, true);
            let (dk, dv) = model.attn_backward_with_earlier(
                last,
                &self.attn_tapes[last],
                answer,
                &split.context,
                &mut dh,
            );
            let mut dh_context = vec![0.0f32; split.context.rows() * d];
            model.kv_backward(last, &kv, &split.context, dk, &dv, &mut dh_context);
            dh = split.scatter(&dh_context, &dh, d);
        }
        for l in (first + 1..top).rev() {
            model.mlp_backward(l, &self.mlp_tapes[l], shape, adapter, &mut dh, true);
            model.attn_backward(l, &self.attn_tapes[l], shape, &mut dh);
        }
        model.mlp_backward(
            first,
            &self.mlp_tapes[first],
            shape,
            adapter,
            &mut dh,
            false,
        );
        (ce, rows)
    }
}

/// The guided loss's targets `[L][B * k]` for a batch under the configured allocation mode; `None`
/// when they come from the routers at the first iteration.
pub fn batch_presets(cfg: &ElderConfig, batch: &[EditExample]) -> Option<Vec<Vec<u32>>> {
    match cfg.allocation {
        AllocationMode::KnowledgeSeed => {
            let per_edit: Vec<Vec<Vec<u32>>> = batch
                .iter()
                .map(|ex| preset_allocation(cfg, &ex.knowledge_id))
                .collect();
            Some(
                (0..cfg.molora_blocks.len())
                    .map(|l| per_edit.iter().flat_map(|p| p[l].iter().copied()).collect())
                    .collect(),
            )
        }
        AllocationMode::RouterFirstIteration => None,
        // A validated config never routes these (they need the stored allocation, see
        // `ElderConfig::validate`); the knowledge seed keeps this total.
        AllocationMode::LeastUsed | AllocationMode::Fresh => batch_presets(
            &ElderConfig {
                allocation: AllocationMode::KnowledgeSeed,
                ..cfg.clone()
            },
            batch,
        ),
    }
}

/// Trains `elder` on one batch of edits and appends their codes to the codebook.
/// `on_iteration(i, loss)` is called after every iteration (for progress display).
///
/// Runs inside the CPU pool ([`in_pool`]): an edit is thousands of small parallel steps.
pub fn apply_edit_batch(
    model: &Model,
    elder: &mut Elder,
    batch: &[EditExample],
    on_iteration: impl FnMut(usize, f32) + Send,
) -> anyhow::Result<EditReport> {
    in_pool(|| train_edit_batch(model, elder, batch, on_iteration))
}

fn train_edit_batch(
    model: &Model,
    elder: &mut Elder,
    batch: &[EditExample],
    mut on_iteration: impl FnMut(usize, f32),
) -> anyhow::Result<EditReport> {
    let cfg = elder.cfg.clone();
    let preparing = Meter::start();
    let mut prepared = PreparedBatch::new(model, elder, batch)?;
    let (prepare, prepare_gflop) = (preparing.seconds(), preparing.gflop());
    let iterating = Meter::start();
    let mut presets = batch_presets(&cfg, batch);
    let mut adam = Adam::new(&elder.layers);
    let mut report = EditReport {
        first_loss: 0.0,
        last_loss: 0.0,
        guide_loss: 0.0,
        iterations: cfg.iterations,
        skipped_steps: 0,
        loss_scale: 1.0,
        times: EditTimes::default(),
    };
    for it in 0..cfg.iterations {
        let mut step = prepared.loss_and_grads(model, elder, presets.as_deref());
        if presets.is_none() {
            presets = Some(step.chosen.clone());
        }
        adam.step(
            &cfg,
            learning_rate(&cfg, it),
            &mut elder.layers,
            &mut step.grads,
        );
        if it == 0 {
            report.first_loss = step.ce;
        }
        report.last_loss = step.ce;
        report.guide_loss = step.guide;
        on_iteration(it, step.ce);
    }
    report.times = EditTimes {
        prepare,
        iterations: iterating.seconds(),
        prepare_gflop,
        iterations_gflop: iterating.gflop(),
        ..EditTimes::default()
    };
    push_codes(elder, &prepared.query)?;
    Ok(report)
}

/// Appends the codebook entries of the edits just learned, from their queries `[B, d_in]` and the
/// routers as they are now. Shared with the CUDA trainer, so both backends store the same codes.
pub(crate) fn push_codes(elder: &mut Elder, query: &[f32]) -> anyhow::Result<()> {
    let routing = elder.route_all(query);
    for code in elder.codes(&routing) {
        elder.codebook.push_words(&code)?;
    }
    Ok(())
}

/// Query vectors `[n, d_in]` of prompts (the query layer's input at each prompt's last token),
/// computed in batches through the frozen blocks up to the query block.
pub fn queries(model: &Model, elder: &Elder, prompts: &[Vec<u32>]) -> Vec<f32> {
    let mut out = Vec::new();
    for chunk in prompts.chunks(16) {
        let (ids, shape) = pad_batch(chunk, &vec![0; chunk.len()]);
        let query_rows = prompt_rows(shape.seq, chunk.iter().map(Vec::len));
        let mut cache = KvCache::new(&model.cfg, shape.batch, shape.seq);
        let mut h = model.embed(&ids, &shape);
        let mut capture = ElderAdapter::inference(elder, query_rows);
        for l in 0..=elder.cfg.query_block {
            model.attn_half(l, &mut h, &shape, &mut cache, None);
            model.mlp_half(l, &mut h, &shape, &mut capture, None);
        }
        out.extend(capture.query.take().unwrap_or_default());
    }
    out
}

/// Sets the mean query used by `query_centering` from calibration prompts (once: the mean never
/// changes afterwards, so codes already in the codebook stay comparable).
pub fn calibrate_query_mean(model: &Model, elder: &mut Elder, prompts: &[Vec<u32>]) {
    if elder.query_mean.is_some() || prompts.is_empty() {
        return;
    }
    elder.query_mean = Some(mean_query(&queries(model, elder, prompts), prompts.len()));
}

/// The mean of `n` query rows `[n, d]` (shared with the CUDA calibration, so both backends
/// average the same way).
pub fn mean_query(queries: &[f32], n: usize) -> Vec<f32> {
    let d = queries.len() / n.max(1);
    let mut mean = vec![0.0f32; d];
    for row in queries.chunks(d.max(1)) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += v / n as f32;
        }
    }
    mean
}
