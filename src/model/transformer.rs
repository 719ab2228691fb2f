//! The one description of a decoder-only transformer (GPT-2 and Llama), on the CPU reference ops:
//! the forward pass over a padded batch with a KV cache, and the backward pass the ELDER trainer runs
//! from the loss down to its first adapted layer.
//!
//! Rows are tokens: a batch of `B` sequences padded to `T` is `B*T` rows, row `b*T + i` is token `i`
//! of sequence `b`. Padding rows are computed (it is simpler than compacting) but masked out of
//! attention and never read.

use crate::backend::cpu::linear_ce::{linear_cross_entropy, linear_cross_entropy_rows, RowLosses};
use crate::backend::cpu::ops::{self, AttnShape};

use super::config::{Arch, ModelConfig};
use super::layers::{Linear, Mlp, MlpProj, Norm, NormSaved, Site};

/// Q/K/V projections: GPT-2 fuses them into one `c_attn`, Llama keeps three.
#[derive(Debug, Clone)]
pub enum QkvProj<W = Vec<f32>> {
    Fused(Linear<W>),
    Split {
        q: Linear<W>,
        k: Linear<W>,
        v: Linear<W>,
    },
}

#[derive(Debug, Clone)]
pub struct Block<W = Vec<f32>> {
    pub norm1: Norm<W>,
    pub qkv: QkvProj<W>,
    pub o_proj: Linear<W>,
    pub norm2: Norm<W>,
    pub mlp: Mlp<W>,
}

/// A loaded base model. Frozen: nothing here changes after loading.
///
/// `W` holds one tensor. The CPU model holds f32 values (the default); the same structure holding
/// each tensor's name and shape is the model description every loader walks
/// ([`super::names::describe`]), and [`super::structure`] maps one into the other.
#[derive(Debug, Clone)]
pub struct Model<W = Vec<f32>> {
    pub cfg: ModelConfig,
    /// Token embeddings `[vocab, d]`.
    pub embed: W,
    /// Learned positions `[max_positions, d]` (GPT-2 only).
    pub pos_embed: Option<W>,
    pub blocks: Vec<Block<W>>,
    pub final_norm: Norm<W>,
    /// `None` when the head is tied to the embeddings.
    pub lm_head: Option<Linear<W>>,
}

/// Layout of the rows of one forward call: a padded batch continuing from a KV cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchShape {
    pub batch: usize,
    /// Padded length `T` of this call's new tokens.
    pub seq: usize,
    /// Real (non-padding) new tokens per sequence.
    pub valid: Vec<usize>,
    /// Absolute position of each sequence's first new token (= its cache length before the call).
    pub start: Vec<usize>,
}

impl BatchShape {
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }

    /// Absolute position of every row; padding rows repeat the last valid position so they stay in
    /// range of learned position tables.
    pub fn positions(&self) -> Vec<u32> {
        let mut pos = Vec::with_capacity(self.rows());
        for b in 0..self.batch {
            for i in 0..self.seq {
                let i = i.min(self.valid[b].saturating_sub(1));
                pos.push((self.start[b] + i) as u32);
            }
        }
        pos
    }
}

/// Keys and values of every layer for a batch of sequences, `[B, capacity, kv_dim]` per layer.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
    pub batch: usize,
    pub capacity: usize,
    pub kv_dim: usize,
    /// Tokens stored per sequence.
    pub lens: Vec<usize>,
}

impl KvCache {
    /// A cache of `capacity` positions holding the first `lens[b]` positions of each sequence of
    /// this one (what a side computation continues from without touching this cache).
    pub fn prefix_copy(&self, lens: &[usize], capacity: usize) -> Self {
        let w = self.kv_dim;
        let copy = |layers: &[Vec<f32>]| -> Vec<Vec<f32>> {
            layers
                .iter()
                .map(|old| {
                    let mut new = vec![0.0f32; self.batch * capacity * w];
                    for (b, &len) in lens.iter().enumerate() {
                        let (from, to) = (b * self.capacity * w, b * capacity * w);
                        new[to..to + len * w].copy_from_slice(&old[from..from + len * w]);
                    }
                    new
                })
                .collect()
        };
        KvCache {
            k: copy(&self.k),
            v: copy(&self.v),
            batch: self.batch,
            capacity,
            kv_dim: w,
            lens: lens.to_vec(),
        }
    }

    /// Writes the sequences of `part` (a cache of the same capacity) into this one, its `i`th
    /// as this one's `members[i]`th (a batch whose sequences were run in groups).
    pub fn place(&mut self, part: &KvCache, members: &[usize]) {
        assert_eq!(
            part.capacity, self.capacity,
            "caches of different capacities"
        );
        assert_eq!(
            part.batch,
            members.len(),
            "one member per sequence of the part"
        );
        let n = self.capacity * self.kv_dim;
        for (mine, theirs) in self
            .k
            .iter_mut()
            .zip(&part.k)
            .chain(self.v.iter_mut().zip(&part.v))
        {
            for (i, &b) in members.iter().enumerate() {
                mine[b * n..(b + 1) * n].copy_from_slice(&theirs[i * n..(i + 1) * n]);
            }
        }
        for (i, &b) in members.iter().enumerate() {
            self.lens[b] = part.lens[i];
        }
    }

    pub fn new(cfg: &ModelConfig, batch: usize, capacity: usize) -> Self {
        let size = batch * capacity * cfg.kv_dim();
        KvCache {
            k: vec![vec![0.0; size]; cfg.num_layers],
            v: vec![vec![0.0; size]; cfg.num_layers],
            batch,
            capacity,
            kv_dim: cfg.kv_dim(),
            lens: vec![0; batch],
        }
    }

    /// Copies the valid rows of this call's `k`/`v` ([B*T, kv_dim]) into the cache of layer `layer`.
    fn store(&mut self, layer: usize, shape: &BatchShape, k: &[f32], v: &[f32]) {
        let (seq, cap, w) = (shape.seq, self.capacity, self.kv_dim);
        let (start, valid) = (&shape.start, &shape.valid);
        ops::kv_append(k, &mut self.k[layer], start, valid, seq, cap, w);
        ops::kv_append(v, &mut self.v[layer], start, valid, seq, cap, w);
    }
}

/// A hook on the MLP projections: ELDER's mixture of LoRA experts plugs in here. `Send`, so that
/// a forward can run inside the CPU thread pool (`backend::cpu::in_pool`).
pub trait Adapter: Send {
    /// Called right after the frozen projection at `site`; `x` is its input `[rows, in]` and `out` its
    /// output `[rows, out]`, which the adapter may add to.
    fn after_linear(&mut self, site: Site, shape: &BatchShape, x: &[f32], out: &mut [f32]);

    /// Backward of what `after_linear` added at `site`, given the gradient of the projection's output:
    /// accumulate the adapter's own gradients and, when `dx` is given, add the gradient of `x` to it.
    fn backward_linear(
        &mut self,
        site: Site,
        shape: &BatchShape,
        x: &[f32],
        dout: &[f32],
        dx: Option<&mut [f32]>,
    );

    /// Whether `after_linear` at `site` may change the output or read its input (true unless
    /// the adapter says otherwise): a walk may skip the call, and work only it needs, where not.
    fn adapts(&self, _site: Site) -> bool {
        true
    }

    /// The first block whose output this forward's [`Adapter::revise`] may want computed again
    /// (`None`, the default: it never revises). The walk keeps the hidden states entering that
    /// block, so a revision costs only the blocks from there on.
    fn revisable_from(&self) -> Option<usize> {
        None
    }

    /// Called once a walk has reached the last block, with its hidden states `[rows, d]`
    /// (before the final norm) and the cache it wrote: returns true when the adapter changed
    /// what it adds for some sequence, and the blocks from [`Adapter::revisable_from`] then run
    /// again. A decision that depends on the output, such as ELDER's gate on the matched edit's
    /// own answer.
    fn revise(
        &mut self,
        _model: &Model,
        _h: &[f32],
        _shape: &BatchShape,
        _cache: &KvCache,
    ) -> bool {
        false
    }
}

/// The unedited model.
pub struct NoAdapter;

impl Adapter for NoAdapter {
    fn after_linear(&mut self, _: Site, _: &BatchShape, _: &[f32], _: &mut [f32]) {}
    fn adapts(&self, _: Site) -> bool {
        false
    }
    fn backward_linear(
        &mut self,
        _: Site,
        _: &BatchShape,
        _: &[f32],
        _: &[f32],
        _: Option<&mut [f32]>,
    ) {
    }
}

/// What the attention half of a block saves for the backward pass (weights are frozen, so only
/// what the input gradient needs).
#[derive(Debug, Clone, Default)]
pub struct AttnTape {
    x: Vec<f32>,
    norm: NormSaved,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
}

/// What [`Model::kv_half`] saves for the backward pass.
#[derive(Debug, Clone, Default)]
pub struct KvTape {
    x: Vec<f32>,
    norm: NormSaved,
}

/// What the MLP half of a block saves for the backward pass.
#[derive(Debug, Clone, Default)]
pub struct MlpTape {
    x: Vec<f32>,
    normed: Vec<f32>,
    norm: NormSaved,
    /// GPT-2: pre-activation of gelu; Llama: gate projection output.
    pre: Vec<f32>,
    /// Llama: up projection output.
    up: Vec<f32>,
    /// Input of the output projection (gelu(pre) or silu(gate)*up).
    act: Vec<f32>,
}

impl Model {
    pub fn arch(&self) -> Arch {
        self.cfg.arch
    }

    /// Token (and, for GPT-2, position) embeddings of every row: `[rows, d]`.
    pub fn embed(&self, ids: &[u32], shape: &BatchShape) -> Vec<f32> {
        let d = self.cfg.hidden_size;
        let mut h = vec![0.0f32; ids.len() * d];
        ops::embedding(ids, &self.embed, d, &mut h);
        if let Some(pos) = &self.pos_embed {
            let mut p = vec![0.0f32; ids.len() * d];
            ops::embedding(&shape.positions(), pos, d, &mut p);
            ops::add_inplace(&mut h, &p);
        }
        h
    }

    /// `h += attention(norm1(h))` for block `l`, storing this call's keys and values in `cache`.
    pub fn attn_half(
        &self,
        l: usize,
        h: &mut [f32],
        shape: &BatchShape,
        cache: &mut KvCache,
        tape: Option<&mut AttnTape>,
    ) {
        let cfg = &self.cfg;
        let blk = &self.blocks[l];
        let rows = shape.rows();
        let (normed, norm_saved) = blk.norm1.forward(h);
        let (mut q, mut k, v) = match &blk.qkv {
            QkvProj::Fused(lin) => split_fused_qkv(&lin.forward(&normed, rows), cfg.hidden_size),
            QkvProj::Split { q, k, v } => (
                q.forward(&normed, rows),
                k.forward(&normed, rows),
                v.forward(&normed, rows),
            ),
        };
        self.rope(&mut q, cfg.num_heads, shape, false);
        self.rope(&mut k, cfg.num_kv_heads, shape, false);
        cache.store(l, shape, &k, &v);
        let attn_shape = AttnShape {
            batch: shape.batch,
            q_len: shape.seq,
            kv_capacity: cache.capacity,
            n_heads: cfg.num_heads,
            n_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            q_start: &shape.start,
            q_valid: &shape.valid,
        };
        let mut att = vec![0.0f32; rows * cfg.q_dim()];
        let mut probs = tape
            .as_ref()
            .map(|_| vec![0.0f32; shape.batch * cfg.num_heads * shape.seq * cache.capacity]);
        ops::attention(
            &attn_shape,
            &q,
            &cache.k[l],
            &cache.v[l],
            &mut att,
            probs.as_deref_mut(),
        );
        let out = blk.o_proj.forward(&att, rows);
        if let Some(t) = tape {
            *t = AttnTape {
                x: h.to_vec(),
                norm: norm_saved,
                q,
                k: cache.k[l].clone(),
                v: cache.v[l].clone(),
                probs: probs.unwrap_or_default(),
            };
        }
        ops::add_inplace(h, &out);
    }

    /// Llama's rotary embedding of `x` (`[rows, heads * head_dim]`) at the rows' positions, or
    /// its inverse (for gradients); GPT-2 has none.
    fn rope(&self, x: &mut [f32], heads: usize, shape: &BatchShape, inverse: bool) {
        let cfg = &self.cfg;
        if cfg.arch == Arch::Llama {
            let pos = shape.positions();
            ops::rope(x, &pos, heads, cfg.head_dim, cfg.rope_theta, inverse);
        }
    }

    /// Only the keys and values of block `l`'s attention for the rows of `h`, stored in `cache`:
    /// for rows whose own output of the block nothing reads but whose keys and values later rows
    /// attend to (the trainer's last block, below the rows the head reads). `h` is not changed.
    pub fn kv_half(&self, l: usize, h: &[f32], shape: &BatchShape, cache: &mut KvCache) -> KvTape {
        let cfg = &self.cfg;
        let blk = &self.blocks[l];
        let rows = shape.rows();
        let (normed, norm) = blk.norm1.forward(h);
        let (mut k, v) = match &blk.qkv {
            QkvProj::Fused(lin) => {
                let (_, k, v) = split_fused_qkv(&lin.forward(&normed, rows), cfg.hidden_size);
                (k, v)
            }
            QkvProj::Split { k, v, .. } => (k.forward(&normed, rows), v.forward(&normed, rows)),
        };
        self.rope(&mut k, cfg.num_kv_heads, shape, false);
        cache.store(l, shape, &k, &v);
        KvTape {
            x: h.to_vec(),
            norm,
        }
    }

    /// Backward of [`Model::kv_half`]: `dk` and `dv` (`[rows, kv_dim]`, the gradients of the
    /// stored keys and values) go back through the projections and the norm into `dh`.
    pub fn kv_backward(
        &self,
        l: usize,
        tape: &KvTape,
        shape: &BatchShape,
        mut dk: Vec<f32>,
        dv: &[f32],
        dh: &mut [f32],
    ) {
        let cfg = &self.cfg;
        let blk = &self.blocks[l];
        let rows = shape.rows();
        self.rope(&mut dk, cfg.num_kv_heads, shape, true);
        let dnormed = self.qkv_input_grad(l, rows, None, &dk, dv);
        blk.norm1
            .backward_accumulate(&tape.x, &tape.norm, &dnormed, dh);
    }

    /// The gradient of block `l`'s normed attention input from those of its queries (`None`:
    /// the queries were not computed, [`Model::kv_half`]), keys and values, each `[rows, width]`
    /// and already through the inverse rotary embedding.
    fn qkv_input_grad(
        &self,
        l: usize,
        rows: usize,
        dq: Option<&[f32]>,
        dk: &[f32],
        dv: &[f32],
    ) -> Vec<f32> {
        let d = self.cfg.hidden_size;
        let mut dnormed = vec![0.0f32; rows * d];
        match &self.blocks[l].qkv {
            QkvProj::Fused(lin) => {
                // GPT-2: one [q | k | v] projection, each part d wide.
                let mut dqkv = vec![0.0f32; rows * 3 * d];
                for (r, out) in dqkv.chunks_mut(3 * d).enumerate() {
                    if let Some(dq) = dq {
                        out[..d].copy_from_slice(&dq[r * d..(r + 1) * d]);
                    }
                    out[d..2 * d].copy_from_slice(&dk[r * d..(r + 1) * d]);
                    out[2 * d..].copy_from_slice(&dv[r * d..(r + 1) * d]);
                }
                lin.backward_input(&dqkv, rows, &mut dnormed, false);
            }
            QkvProj::Split { q, k, v } => {
                if let Some(dq) = dq {
                    q.backward_input(dq, rows, &mut dnormed, false);
                }
                k.backward_input(dk, rows, &mut dnormed, dq.is_some());
                v.backward_input(dv, rows, &mut dnormed, true);
            }
        }
        dnormed
    }

    /// Whether the adapter acts at one of block `l`'s MLP input projections (then the MLP's
    /// input gradient and its projections' results depend on it).
    fn adapts_mlp_input(&self, l: usize, adapter: &dyn Adapter) -> bool {
        let mlp = &self.blocks[l].mlp;
        mlp.input_projs()
            .iter()
            .any(|&proj| adapter.adapts(Site { block: l, proj }))
    }

    /// `h += mlp(norm2(h))` for block `l`, with the adapter applied after every projection.
    pub fn mlp_half(
        &self,
        l: usize,
        h: &mut [f32],
        shape: &BatchShape,
        adapter: &mut dyn Adapter,
        tape: Option<&mut MlpTape>,
    ) {
        let (saved, mut out) = self.mlp_projections(l, h, shape, adapter);
        let output = Site {
            block: l,
            proj: self.blocks[l].mlp.output_proj(),
        };
        adapter.after_linear(output, shape, &saved.act, &mut out);
        if let Some(t) = tape {
            *t = MlpTape {
                x: h.to_vec(),
                ..saved
            };
        }
        ops::add_inplace(h, &out);
    }

    /// [`Model::mlp_half`] of an input that is the same at every call: the first adapted block
    /// of a training batch, whose input the frozen blocks below computed once. When the adapter
    /// changes only the output projection, the frozen projections run at the first call and
    /// `frozen_out` keeps the output projection's frozen result (the tape keeps the rest); later
    /// calls run only the adapter. The same numbers as `mlp_half` (the same operations in the
    /// same order); `frozen_out` must be emptied whenever the input changes.
    pub fn mlp_half_fixed_input(
        &self,
        l: usize,
        h: &mut [f32],
        shape: &BatchShape,
        adapter: &mut dyn Adapter,
        tape: &mut MlpTape,
        frozen_out: &mut Option<Vec<f32>>,
    ) {
        let mlp = &self.blocks[l].mlp;
        let site = |proj| Site { block: l, proj };
        if self.adapts_mlp_input(l, adapter) {
            *frozen_out = None;
            return self.mlp_half(l, h, shape, adapter, Some(tape));
        }
        let frozen = match frozen_out {
            Some(out) => out,
            None => {
                let (saved, out) = self.mlp_projections(l, h, shape, adapter);
                *tape = MlpTape {
                    x: h.to_vec(),
                    ..saved
                };
                frozen_out.insert(out)
            }
        };
        let mut out = frozen.clone();
        adapter.after_linear(site(mlp.output_proj()), shape, &tape.act, &mut out);
        ops::add_inplace(h, &out);
    }

    /// Block `l`'s MLP up to its output projection: the norm, the input projections (with the
    /// adapter), the activation and the output projection's frozen result (without it). The tape
    /// holds all but `x`.
    fn mlp_projections(
        &self,
        l: usize,
        h: &[f32],
        shape: &BatchShape,
        adapter: &mut dyn Adapter,
    ) -> (MlpTape, Vec<f32>) {
        let blk = &self.blocks[l];
        let rows = shape.rows();
        let (normed, norm_saved) = blk.norm2.forward(h);
        let site = |proj| Site { block: l, proj };
        let (pre, up, act, out) = match &blk.mlp {
            Mlp::Gpt2 { c_fc, c_proj } => {
                let mut pre = c_fc.forward(&normed, rows);
                adapter.after_linear(site(MlpProj::CFc), shape, &normed, &mut pre);
                let mut act = pre.clone();
                ops::gelu_new(&mut act);
                let out = c_proj.forward(&act, rows);
                (pre, Vec::new(), act, out)
            }
            Mlp::Llama { gate, up, down } => {
                let mut g = gate.forward(&normed, rows);
                adapter.after_linear(site(MlpProj::GateProj), shape, &normed, &mut g);
                let mut u = up.forward(&normed, rows);
                adapter.after_linear(site(MlpProj::UpProj), shape, &normed, &mut u);
                let mut act = vec![0.0f32; g.len()];
                ops::silu_mul(&g, &u, &mut act);
                let out = down.forward(&act, rows);
                (g, u, act, out)
            }
        };
        let tape = MlpTape {
            x: Vec::new(),
            normed,
            norm: norm_saved,
            pre,
            up,
            act,
        };
        (tape, out)
    }

    /// Final norm and lm_head for the chosen rows only: `[rows.len(), vocab]`.
    pub fn head(&self, h: &[f32], rows: &[usize]) -> (Vec<f32>, HeadTape) {
        let tape = self.head_input(h, rows);
        let mut logits = vec![0.0f32; rows.len() * self.cfg.vocab_size];
        ops::matmul(
            &tape.normed,
            rows.len(),
            self.lm_head_mat(),
            &mut logits,
            false,
        );
        (logits, tape)
    }

    /// Gradient of `head` with respect to `h` (accumulated into `dh`, scattered back to the rows).
    pub fn head_backward(&self, tape: &HeadTape, dlogits: &[f32], dh: &mut [f32]) {
        let mut dnormed = vec![0.0f32; tape.normed.len()];
        ops::matmul_input_grad(
            dlogits,
            tape.rows.len(),
            self.lm_head_mat(),
            &mut dnormed,
            false,
        );
        self.head_input_backward(tape, &dnormed, dh);
    }

    /// `head` followed by the cross-entropy against `targets` (one per row), fused so that the
    /// lm_head is read once ([`linear_cross_entropy`]). Returns the summed cross-entropy and adds
    /// `weight` times its gradient into `dh`. The trainer's loss; equal to `head`,
    /// `ops::cross_entropy` and `head_backward` in turn up to rounding (tested).
    pub fn head_loss(
        &self,
        h: &[f32],
        rows: &[usize],
        targets: &[u32],
        weight: f32,
        dh: &mut [f32],
    ) -> f32 {
        assert_eq!(rows.len(), targets.len(), "one target per head row");
        let tape = self.head_input(h, rows);
        let mut dnormed = vec![0.0f32; tape.normed.len()];
        let loss = linear_cross_entropy(
            &tape.normed,
            self.lm_head_mat(),
            targets,
            weight,
            &mut dnormed,
        );
        self.head_input_backward(&tape, &dnormed, dh);
        loss
    }

    /// [`Model::head_loss`] with a weight per row (the gradient of `sum_r weights[r] * CE_r`
    /// goes into `dh`), returning each row's cross-entropy and argmax.
    pub fn head_loss_rows(
        &self,
        h: &[f32],
        rows: &[usize],
        targets: &[u32],
        weights: &[f32],
        dh: &mut [f32],
    ) -> RowLosses {
        assert_eq!(rows.len(), targets.len(), "one target per head row");
        let tape = self.head_input(h, rows);
        let mut dnormed = vec![0.0f32; tape.normed.len()];
        let out = linear_cross_entropy_rows(
            &tape.normed,
            self.lm_head_mat(),
            targets,
            weights,
            &mut dnormed,
        );
        self.head_input_backward(&tape, &dnormed, dh);
        out
    }

    /// The chosen rows of `h` through the final norm.
    fn head_input(&self, h: &[f32], rows: &[usize]) -> HeadTape {
        let d = self.cfg.hidden_size;
        let picked: Vec<f32> = rows
            .iter()
            .flat_map(|&r| h[r * d..(r + 1) * d].iter().copied())
            .collect();
        let (normed, norm) = self.final_norm.forward(&picked);
        HeadTape {
            rows: rows.to_vec(),
            x: picked,
            normed,
            norm,
        }
    }

    /// Through the final norm back to the chosen rows of `dh`.
    fn head_input_backward(&self, tape: &HeadTape, dnormed: &[f32], dh: &mut [f32]) {
        let d = self.cfg.hidden_size;
        let mut dx = vec![0.0f32; tape.x.len()];
        self.final_norm
            .backward_accumulate(&tape.x, &tape.norm, dnormed, &mut dx);
        for (i, &r) in tape.rows.iter().enumerate() {
            for (a, b) in dh[r * d..(r + 1) * d]
                .iter_mut()
                .zip(&dx[i * d..(i + 1) * d])
            {
                *a += b;
            }
        }
    }

    /// The output projection; a tied head reads the embedding table as an `[out, in]` matrix.
    fn lm_head_mat(&self) -> ops::MatRef<'_> {
        let (data, layout) = self.head_weight();
        ops::MatRef {
            data,
            in_dim: self.cfg.hidden_size,
            out_dim: self.cfg.vocab_size,
            layout,
        }
    }
}

/// Saved state of [`Model::head`].
#[derive(Debug, Clone, Default)]
pub struct HeadTape {
    rows: Vec<usize>,
    x: Vec<f32>,
    /// `x` through the final norm: the lm_head's input.
    normed: Vec<f32>,
    norm: NormSaved,
}

/// Splits GPT-2's fused `c_attn` output `[rows, 3d]` into q, k, v `[rows, d]` each.
fn split_fused_qkv(qkv: &[f32], d: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = qkv.len() / (3 * d);
    let mut q = Vec::with_capacity(rows * d);
    let mut k = Vec::with_capacity(rows * d);
    let mut v = Vec::with_capacity(rows * d);
    for r in qkv.chunks(3 * d) {
        q.extend_from_slice(&r[..d]);
        k.extend_from_slice(&r[d..2 * d]);
        v.extend_from_slice(&r[2 * d..]);
    }
    (q, k, v)
}

impl Model {
    /// Backward of [`Model::mlp_half`]: `dh` holds dL/d(block output) and becomes dL/d(mlp input
    /// residual). With `need_input_grad == false` only the adapter gradients are produced (the trainer
    /// stops there at its first adapted block).
    pub fn mlp_backward(
        &self,
        l: usize,
        tape: &MlpTape,
        shape: &BatchShape,
        adapter: &mut dyn Adapter,
        dh: &mut [f32],
        need_input_grad: bool,
    ) {
        let blk = &self.blocks[l];
        let rows = shape.rows();
        let site = |proj| Site { block: l, proj };
        let d = self.cfg.hidden_size;
        let mut dnormed = vec![0.0f32; rows * d];
        // The trainer's first adapted block: with the adapter at the output projection only,
        // nothing below needs the activation's gradient.
        if !need_input_grad && !self.adapts_mlp_input(l, adapter) {
            let output = site(blk.mlp.output_proj());
            adapter.backward_linear(output, shape, &tape.act, dh, None);
            return;
        }
        match &blk.mlp {
            Mlp::Gpt2 { c_fc, c_proj } => {
                let mut dact = vec![0.0f32; tape.act.len()];
                c_proj.backward_input(dh, rows, &mut dact, false);
                adapter.backward_linear(
                    site(MlpProj::CProj),
                    shape,
                    &tape.act,
                    dh,
                    Some(&mut dact),
                );
                let mut dpre = vec![0.0f32; tape.pre.len()];
                ops::gelu_new_backward(&tape.pre, &dact, &mut dpre);
                let dx = need_input_grad.then_some(&mut dnormed[..]);
                adapter.backward_linear(site(MlpProj::CFc), shape, &tape.normed, &dpre, dx);
                if need_input_grad {
                    c_fc.backward_input(&dpre, rows, &mut dnormed, true);
                }
            }
            Mlp::Llama { gate, up, down } => {
                let mut dact = vec![0.0f32; tape.act.len()];
                down.backward_input(dh, rows, &mut dact, false);
                adapter.backward_linear(
                    site(MlpProj::DownProj),
                    shape,
                    &tape.act,
                    dh,
                    Some(&mut dact),
                );
                let mut dgate = vec![0.0f32; dact.len()];
                let mut dup = vec![0.0f32; dact.len()];
                ops::silu_mul_backward(&tape.pre, &tape.up, &dact, &mut dgate, &mut dup);
                let dx = need_input_grad.then_some(&mut dnormed[..]);
                adapter.backward_linear(site(MlpProj::UpProj), shape, &tape.normed, &dup, dx);
                let dx = need_input_grad.then_some(&mut dnormed[..]);
                adapter.backward_linear(site(MlpProj::GateProj), shape, &tape.normed, &dgate, dx);
                if need_input_grad {
                    up.backward_input(&dup, rows, &mut dnormed, true);
                    gate.backward_input(&dgate, rows, &mut dnormed, true);
                }
            }
        }
        if need_input_grad {
            blk.norm2
                .backward_accumulate(&tape.x, &tape.norm, &dnormed, dh);
        }
    }

    /// Backward of [`Model::attn_half`]: `dh` holds dL/d(attention output residual) and becomes
    /// dL/d(block input). Cache rows written before this call (a frozen prefix) get no gradient:
    /// nothing trainable made them.
    pub fn attn_backward(&self, l: usize, tape: &AttnTape, shape: &BatchShape, dh: &mut [f32]) {
        self.attn_backward_rows(l, tape, shape, None, dh);
    }

    /// [`Model::attn_backward`] for a call whose cache rows before it were written by
    /// [`Model::kv_half`] with shape `earlier`: also returns those rows' key and value gradients
    /// (`[earlier.rows(), kv_dim]` each), for [`Model::kv_backward`].
    pub fn attn_backward_with_earlier(
        &self,
        l: usize,
        tape: &AttnTape,
        shape: &BatchShape,
        earlier: &BatchShape,
        dh: &mut [f32],
    ) -> (Vec<f32>, Vec<f32>) {
        self.attn_backward_rows(l, tape, shape, Some(earlier), dh)
            .expect("earlier rows asked for")
    }

    fn attn_backward_rows(
        &self,
        l: usize,
        tape: &AttnTape,
        shape: &BatchShape,
        earlier: Option<&BatchShape>,
        dh: &mut [f32],
    ) -> Option<(Vec<f32>, Vec<f32>)> {
        let cfg = &self.cfg;
        let blk = &self.blocks[l];
        let rows = shape.rows();
        let mut datt = vec![0.0f32; rows * cfg.q_dim()];
        blk.o_proj.backward_input(dh, rows, &mut datt, false);
        let capacity = tape.k.len() / (shape.batch * cfg.kv_dim());
        let attn_shape = AttnShape {
            batch: shape.batch,
            q_len: shape.seq,
            kv_capacity: capacity,
            n_heads: cfg.num_heads,
            n_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            q_start: &shape.start,
            q_valid: &shape.valid,
        };
        let mut dq = vec![0.0f32; tape.q.len()];
        let mut dk = vec![0.0f32; tape.k.len()];
        let mut dv = vec![0.0f32; tape.v.len()];
        ops::attention_backward(
            &attn_shape,
            &tape.q,
            &tape.k,
            &tape.v,
            &tape.probs,
            &datt,
            &mut dq,
            &mut dk,
            &mut dv,
        );
        let earlier_grads = earlier.map(|e| {
            (
                sequence_rows(&dk, e, capacity, cfg.kv_dim()),
                sequence_rows(&dv, e, capacity, cfg.kv_dim()),
            )
        });
        let (mut dk, dv) = if shape.start.iter().all(|&s| s == 0) && capacity == shape.seq {
            // The cache rows are exactly this call's rows.
            (dk, dv)
        } else {
            (
                sequence_rows(&dk, shape, capacity, cfg.kv_dim()),
                sequence_rows(&dv, shape, capacity, cfg.kv_dim()),
            )
        };
        self.rope(&mut dq, cfg.num_heads, shape, true);
        self.rope(&mut dk, cfg.num_kv_heads, shape, true);
        let dnormed = self.qkv_input_grad(l, rows, Some(&dq), &dk, &dv);
        blk.norm1
            .backward_accumulate(&tape.x, &tape.norm, &dnormed, dh);
        earlier_grads
    }
}

/// The rows `shape` describes (`[B * seq, width]`, padding rows zero) out of a longer layout
/// `[B, capacity, width]` (a cache-shaped gradient, or a batch's hidden states): each sequence's
/// `valid` rows from its `start` on.
pub fn sequence_rows(src: &[f32], shape: &BatchShape, capacity: usize, width: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; shape.rows() * width];
    for b in 0..shape.batch {
        let src = &src[(b * capacity + shape.start[b]) * width..];
        let n = shape.valid[b] * width;
        out[b * shape.seq * width..][..n].copy_from_slice(&src[..n]);
    }
    out
}
