//! The trainable part of ELDER: per MoLoRA layer, E LoRA experts and a router, and the adapter that
//! plugs them into the frozen model's forward (routing, deferral, mixture) and backward.

use std::ops::Range;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::cpu::ops::{self, MixShape, Routing};
use crate::model::layers::Site;
use crate::model::names::site_dims;
use crate::model::runner::pad_batch;
use crate::model::{Adapter, BatchShape, KvCache, Model, ModelConfig};

use super::capture::SiteCapture;
use super::codebook::Codebook;
use super::config::{
    AllocationMode, Deferral, ElderConfig, ExpertRows, InferenceAllocation, QueryPooling,
};
use super::keystore::{Derived, KeyMatch, KeyStore};
use super::memory::EditEntry;
use super::words::WordMap;

/// The parameters of one MoLoRA layer (all f32, all trainable).
#[derive(Debug, Clone, PartialEq)]
pub struct MoloraLayer {
    /// Experts' down projections `[E, d_in, r]`.
    pub a: Vec<f32>,
    /// Experts' up projections `[E, r, d_out]`.
    pub b: Vec<f32>,
    /// Router weight `[E, d_in]`.
    pub w_r: Vec<f32>,
    /// Router bias `[E]`.
    pub b_r: Vec<f32>,
    pub d_in: usize,
    pub d_out: usize,
}

impl MoloraLayer {
    /// The released code's initialisation: `B = 0` (every expert starts as a zero update),
    /// `A ~ U(-1/sqrt(r), 1/sqrt(r))`, router `~ U(-1/sqrt(d_in), 1/sqrt(d_in))`. With
    /// `allocation = "fresh"` the pool starts empty (experts are made per edit) and has no router.
    pub fn init(cfg: &ElderConfig, d_in: usize, d_out: usize, rng: &mut ChaCha8Rng) -> Self {
        if cfg.allocation == AllocationMode::Fresh {
            return MoloraLayer {
                a: Vec::new(),
                b: Vec::new(),
                w_r: Vec::new(),
                b_r: Vec::new(),
                d_in,
                d_out,
            };
        }
        let (e, r) = (cfg.num_experts, cfg.rank);
        let ba = 1.0 / (r as f32).sqrt();
        let br = 1.0 / (d_in as f32).sqrt();
        MoloraLayer {
            a: (0..e * d_in * r).map(|_| rng.gen_range(-ba..ba)).collect(),
            b: vec![0.0; e * r * d_out],
            w_r: (0..e * d_in).map(|_| rng.gen_range(-br..br)).collect(),
            b_r: (0..e).map(|_| rng.gen_range(-br..br)).collect(),
            d_in,
            d_out,
        }
    }

    /// Experts in the pool (rank `r`).
    pub fn experts(&self, r: usize) -> usize {
        self.a.len() / (self.d_in * r).max(1)
    }

    /// Appends `n` new experts initialised as [`MoloraLayer::init`]'s (`B = 0`, `A` uniform).
    pub fn push_experts(&mut self, r: usize, n: usize, rng: &mut ChaCha8Rng) {
        let ba = 1.0 / (r as f32).sqrt();
        self.a
            .extend((0..n * self.d_in * r).map(|_| rng.gen_range(-ba..ba)));
        self.b.extend(std::iter::repeat_n(0.0, n * r * self.d_out));
    }

    /// A pool of only `experts` (in that order, routers left out): what one batch trains.
    pub fn gather(&self, r: usize, experts: &[u32]) -> MoloraLayer {
        let (sa, sb) = (self.d_in * r, r * self.d_out);
        let mut out = MoloraLayer {
            a: Vec::with_capacity(experts.len() * sa),
            b: Vec::with_capacity(experts.len() * sb),
            w_r: Vec::new(),
            b_r: Vec::new(),
            d_in: self.d_in,
            d_out: self.d_out,
        };
        for &e in experts {
            let e = e as usize;
            out.a.extend_from_slice(&self.a[e * sa..(e + 1) * sa]);
            out.b.extend_from_slice(&self.b[e * sb..(e + 1) * sb]);
        }
        out
    }

    /// Writes a gathered pool back over the experts it was gathered from.
    pub fn scatter(&mut self, r: usize, experts: &[u32], gathered: &MoloraLayer) {
        let (sa, sb) = (self.d_in * r, r * self.d_out);
        for (i, &e) in experts.iter().enumerate() {
            let e = e as usize;
            self.a[e * sa..(e + 1) * sa].copy_from_slice(&gathered.a[i * sa..(i + 1) * sa]);
            self.b[e * sb..(e + 1) * sb].copy_from_slice(&gathered.b[i * sb..(i + 1) * sb]);
        }
    }

    /// The four parameter tensors with their names and shapes, in a fixed order.
    pub fn tensors(&self, cfg: &ElderConfig) -> [(&'static str, Vec<usize>, &Vec<f32>); 4] {
        let r = cfg.rank;
        let (e, routed) = (self.experts(r), self.b_r.len());
        [
            ("lora_a", vec![e, self.d_in, r], &self.a),
            ("lora_b", vec![e, r, self.d_out], &self.b),
            ("router_w", vec![routed, self.d_in], &self.w_r),
            ("router_b", vec![routed], &self.b_r),
        ]
    }

    pub fn tensors_mut(&mut self) -> [&mut Vec<f32>; 4] {
        [&mut self.a, &mut self.b, &mut self.w_r, &mut self.b_r]
    }

    /// Makes expert `e` a zero update (both projections zero): the base model wherever it is used.
    pub fn zero_expert(&mut self, e: usize, rank: usize) {
        let (a, b) = (self.d_in * rank, rank * self.d_out);
        if let Some(x) = self.a.get_mut(e * a..(e + 1) * a) {
            x.fill(0.0);
        }
        if let Some(x) = self.b.get_mut(e * b..(e + 1) * b) {
            x.fill(0.0);
        }
    }

    pub fn zeros_like(&self) -> Self {
        MoloraLayer {
            a: vec![0.0; self.a.len()],
            b: vec![0.0; self.b.len()],
            w_r: vec![0.0; self.w_r.len()],
            b_r: vec![0.0; self.b_r.len()],
            d_in: self.d_in,
            d_out: self.d_out,
        }
    }
}

/// The next step of `answer_gate_candidates` for one sequence ([`Elder::candidate_step`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CandidateStep {
    /// Ask this candidate next (the sequence moves to it).
    Ask(KeyMatch),
    /// Every candidate was asked: the best answer's log-probability, and what answers: `None`,
    /// the base model (the gate turned the best away); `Some(None)`, the candidate asked last;
    /// `Some(Some(m))`, candidate `m`.
    Settle {
        best_logp: f32,
        answer: Option<Option<KeyMatch>>,
    },
}

/// Everything ELDER adds to a frozen model: the config, the MoLoRA layers and the deferral codebook.
#[derive(Debug, Clone, PartialEq)]
pub struct Elder {
    pub cfg: ElderConfig,
    pub layers: Vec<MoloraLayer>,
    pub codebook: Codebook,
    /// Mean query of the calibration prompts, subtracted before routing when
    /// `cfg.query_centering` is on. Fixed once computed, so stored codes stay valid.
    pub query_mean: Option<Vec<f32>>,
    /// The keys of every applied edit (`deferral = "key_store"`); `None` until its background
    /// is calibrated, before the first edit.
    pub key_store: Option<KeyStore>,
    /// Every applied edit's training fields and allocation, in the order they were applied.
    pub memory: Vec<EditEntry>,
    /// The tokenizer's words (`relation_words`): what a query's tokens are matched by. Set by the
    /// session from the tokenizer; derived, never stored.
    pub word_map: Derived<Option<Arc<WordMap>>>,
}

impl Elder {
    /// Fresh experts and routers for the model of config `model` (validated against it), seeded by
    /// `cfg.seed`. Only the model's shape matters, so no weights are needed.
    pub fn new(cfg: ElderConfig, model: &ModelConfig) -> anyhow::Result<Self> {
        cfg.validate(model)?;
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let (d_in, d_out) = site_dims(model, cfg.molora_proj).unwrap_or((0, 0));
        let layers = (0..cfg.molora_blocks.len())
            .map(|_| MoloraLayer::init(&cfg, d_in, d_out, &mut rng))
            .collect();
        let codebook = Codebook::new(cfg.code_bits())?;
        Ok(Elder {
            cfg,
            layers,
            codebook,
            query_mean: None,
            key_store: None,
            memory: Vec::new(),
            word_map: Derived(None),
        })
    }

    /// Sites whose inputs the key store reads (the key, then the relation key).
    pub fn key_sites(&self) -> Vec<Site> {
        if self.cfg.deferral != Deferral::KeyStore {
            return Vec::new();
        }
        let mut sites = vec![Site {
            block: self.cfg.key_block,
            proj: self.cfg.key_proj,
        }];
        if self.cfg.relation_check {
            sites.push(Site {
                block: self.cfg.relation_block,
                proj: self.cfg.relation_proj,
            });
        }
        sites
    }

    /// The routing of sequences answered with stored allocations: each sequence's edit's
    /// experts (`None`: out of scope).
    pub fn stored_routing(&self, edits: &[Option<usize>]) -> Vec<Routing> {
        let allocations: Vec<Option<&[Vec<u32>]>> = edits
            .iter()
            .map(|e| e.map(|i| self.memory[i].allocation.as_slice()))
            .collect();
        self.fixed_routing(&allocations)
    }

    /// Per layer, the given experts of each sequence with gate 1 each (`None`: gates 0, the
    /// sequence is out of scope anyway).
    pub fn fixed_routing(&self, allocations: &[Option<&[Vec<u32>]>]) -> Vec<Routing> {
        let k = self.cfg.top_k;
        (0..self.layers.len())
            .map(|l| {
                let mut experts = Vec::with_capacity(allocations.len() * k);
                let mut gates = Vec::with_capacity(allocations.len() * k);
                for a in allocations {
                    match a.and_then(|a| a.get(l)) {
                        Some(chosen) => {
                            experts.extend_from_slice(chosen);
                            gates.extend(std::iter::repeat_n(1.0, chosen.len()));
                        }
                        None => {
                            experts.extend(std::iter::repeat_n(0, k));
                            gates.extend(std::iter::repeat_n(0.0, k));
                        }
                    }
                }
                Routing {
                    probs: Vec::new(),
                    experts,
                    gates,
                    num_experts: self.layers[l].experts(self.cfg.rank),
                    k,
                }
            })
            .collect()
    }

    /// The key-store candidates for each sequence of a batch whose key-site inputs were
    /// captured, best first ([`KeyStore::rank`]); empty where nothing matched. The first is the
    /// sequence's match ([`KeyMatch::first_of`]), in scope by [`Elder::matches_in_scope`].
    pub fn rank_keys(
        &self,
        capture: &SiteCapture,
        prompt_rows: &[Range<usize>],
        tokens: Option<&[u32]>,
    ) -> Vec<Vec<KeyMatch>> {
        let Some(store) = self.key_store.as_ref().filter(|s| !s.is_empty()) else {
            return vec![Vec::new(); prompt_rows.len()];
        };
        let sites = self.key_sites();
        let Some(key_input) = capture.inputs.get(&sites[0]) else {
            return vec![Vec::new(); prompt_rows.len()];
        };
        let w = store.space.width;
        let scores = prompt_rows
            .iter()
            .map(|rows| {
                store.scores_at(&store.query_keys(&key_input[rows.start * w..rows.end * w]))
            })
            .collect();
        let relation_input = sites.get(1).and_then(|s| capture.inputs.get(s)).map(|x| {
            let rw = x.len() / (key_input.len() / w);
            (x.as_slice(), rw)
        });
        self.rank_matches(scores, relation_input, prompt_rows, tokens)
    }

    /// Every candidate edit of each prompt, best first, from its edits' `(score, position)`
    /// ([`KeyStore::scores_at`]'s, or the GPU's key match) and, with a relation check, the
    /// relation site's rows of the whole batch (`[rows, width]` and the width). `tokens`: the
    /// call's token ids (`[rows]`, each prompt at its `prompt_rows`), for the relation words.
    pub fn rank_matches(
        &self,
        scores: Vec<Vec<(f32, usize)>>,
        relation_input: Option<(&[f32], usize)>,
        prompt_rows: &[Range<usize>],
        tokens: Option<&[u32]>,
    ) -> Vec<Vec<KeyMatch>> {
        let Some(store) = self.key_store.as_ref().filter(|s| !s.is_empty()) else {
            return vec![Vec::new(); prompt_rows.len()];
        };
        prompt_rows
            .iter()
            .zip(scores)
            .map(|(rows, at)| {
                let relation_rows =
                    relation_input.map(|(x, rw)| &x[rows.start * rw..rows.end * rw]);
                // The prompt's own tokens: positions count from its first row, as the key's do.
                let words = self
                    .word_map
                    .0
                    .as_deref()
                    .zip(tokens.and_then(|t| t.get(rows.clone())));
                store.rank_scores_with(at, relation_rows, words, self.cfg.relation_margin)
            })
            .collect()
    }

    /// The answer gate's question about a sequence matched to `m`: the matched edit's answer
    /// tokens, when the gate is on, the sequence is in scope and there is something to ask.
    pub fn gate_question(
        &self,
        m: Option<&KeyMatch>,
        in_scope: bool,
        prompt_len: usize,
    ) -> Option<&[u32]> {
        if self.cfg.answer_gate <= 0.0 || !in_scope || prompt_len == 0 {
            return None;
        }
        let answer = self.memory.get(m?.entry)?.answer.as_slice();
        (!answer.is_empty()).then_some(answer)
    }

    /// Whether the answer gate keeps a sequence whose experts give its matched edit's answer
    /// log-probability `logp`.
    pub fn gate_keeps(&self, logp: f32) -> bool {
        logp >= self.cfg.answer_gate.ln()
    }

    /// `answer_gate_candidates`: what a sequence does after its candidates (best first, from
    /// [`Elder::rank_matches`]) were asked in turn, `asked` being their answers'
    /// log-probabilities so far: ask the next candidate (in scope by `threshold`, with an answer
    /// to ask), or, once every one was asked, settle on the one whose experts gave their own
    /// answer the highest log-probability (the ranking's order among equals). One rule for the
    /// CPU's revisions and the GPU's gate rounds.
    pub fn candidate_step(
        &self,
        candidates: &[KeyMatch],
        asked: &[f32],
        prompt_len: usize,
        threshold: f32,
    ) -> CandidateStep {
        let pool: Vec<KeyMatch> = candidates
            .iter()
            .filter(|m| m.score >= threshold)
            .filter(|m| self.gate_question(Some(m), true, prompt_len).is_some())
            .take(self.cfg.answer_gate_candidates)
            .copied()
            .collect();
        if let Some(&next) = pool.get(asked.len()) {
            return CandidateStep::Ask(next);
        }
        let mut best = 0;
        for (i, &lp) in asked.iter().enumerate() {
            if lp > asked[best] {
                best = i;
            }
        }
        let (best_logp, last) = (asked[best], asked.len() - 1);
        let answer = self
            .gate_keeps(best_logp)
            .then(|| pool.get(best).filter(|_| best != last).copied());
        CandidateStep::Settle { best_logp, answer }
    }

    /// Whether each matched prompt is in scope: its match reaches the scope threshold.
    pub fn matches_in_scope(&self, matches: &[Option<KeyMatch>]) -> Vec<bool> {
        let threshold = self.scope_threshold();
        matches
            .iter()
            .map(|m| m.is_some_and(|m| m.score >= threshold))
            .collect()
    }

    /// Index of the MoLoRA layer at `site`, if there is one.
    pub fn layer_at(&self, site: Site) -> Option<usize> {
        self.cfg.layer_at(site)
    }

    pub fn is_query_site(&self, site: Site) -> bool {
        self.cfg.is_query_site(site)
    }

    /// The query vectors `[B, d_in]` of a batch, read from the query site's input `x` `[rows, d_in]`
    /// at each sequence's prompt rows (the last one, or their mean, as the config says).
    pub fn pool_query(&self, x: &[f32], d_in: usize, prompt_rows: &[Range<usize>]) -> Vec<f32> {
        let mut q = Vec::with_capacity(prompt_rows.len() * d_in);
        for rows in prompt_rows {
            assert!(!rows.is_empty(), "a sequence has no prompt rows");
            match self.cfg.query_pooling {
                QueryPooling::LastToken => {
                    let r = rows.end - 1;
                    q.extend_from_slice(&x[r * d_in..(r + 1) * d_in]);
                }
                QueryPooling::PromptMean => {
                    let mut mean = vec![0.0f32; d_in];
                    for r in rows.clone() {
                        for (m, v) in mean.iter_mut().zip(&x[r * d_in..(r + 1) * d_in]) {
                            *m += v;
                        }
                    }
                    let n = rows.len() as f32;
                    q.extend(mean.iter().map(|m| m / n));
                }
            }
        }
        q
    }

    /// What the routers see of a batch of queries `[B, d_in]`: the query itself, or (with
    /// `query_centering` and a calibrated mean) the query minus the mean, scaled to unit RMS.
    /// Hidden states share a large common component; without removing it every router learns
    /// mostly that component and sends all prompts to the latest edit's experts.
    pub fn router_input(&self, query: &[f32]) -> Vec<f32> {
        match (self.cfg.query_centering, &self.query_mean) {
            (true, Some(mean)) => center_queries(query, mean),
            _ => query.to_vec(),
        }
    }

    /// Routes a batch of queries `[B, d_in]` through every layer's router.
    pub fn route_all(&self, query: &[f32]) -> Vec<Routing> {
        let input = self.router_input(query);
        self.layers
            .iter()
            .map(|l| ops::route(&input, &l.w_r, &l.b_r, self.cfg.top_k, self.cfg.renormalize))
            .collect()
    }

    /// The allocation codes `[B, words]` of a routing: for each layer, the k-hot vector of its chosen
    /// experts, concatenated (bit `layer * E + expert`).
    pub fn codes(&self, routing: &[Routing]) -> Vec<Vec<u64>> {
        let e = self.cfg.num_experts;
        let words = self.cfg.code_bits().div_ceil(64);
        let batch = routing.first().map_or(0, |r| r.experts.len() / r.k);
        let mut codes = vec![vec![0u64; words]; batch];
        for (l, r) in routing.iter().enumerate() {
            for (b, chosen) in r.experts.chunks(r.k).enumerate() {
                for &x in chosen {
                    let bit = l * e + x as usize;
                    codes[b][bit / 64] |= 1 << (bit % 64);
                }
            }
        }
        codes
    }

    /// Hamming distance of each code to its nearest codebook entry (`None` with an empty codebook).
    pub fn distances(&self, codes: &[Vec<u64>]) -> Vec<Option<u32>> {
        codes
            .iter()
            .map(|c| self.codebook.min_distance(c))
            .collect()
    }

    /// Deferral: a sequence is in scope when its code is closer than the threshold to some entry.
    pub fn in_scope(&self, distances: &[Option<u32>]) -> Vec<bool> {
        distances
            .iter()
            .map(|d| d.is_some_and(|d| d < self.cfg.threshold))
            .collect()
    }
}

/// Each query `[B, d_in]` minus `mean`, scaled to unit RMS: the centred router input of
/// [`Elder::router_input`] (a free function so the CUDA runtime routes on exactly the same numbers).
pub fn center_queries(query: &[f32], mean: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(query.len());
    for q in query.chunks(mean.len()) {
        let centered: Vec<f32> = q.iter().zip(mean).map(|(a, m)| a - m).collect();
        let rms = (centered.iter().map(|v| v * v).sum::<f32>() / centered.len() as f32).sqrt();
        out.extend(centered.iter().map(|v| v / rms.max(1e-6)));
    }
    out
}

/// Whether the adapter decides scope from the codebook or treats every sequence as in scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Inference: the deferral (codebook or key store) decides.
    Deferral,
    /// Training: every sequence is in scope.
    All,
}

/// One forward (and, when training, backward) of ELDER over a batch.
///
/// The query is read at the query site from each sequence's prompt rows (`prompt_rows`), once: later calls (decode steps with a KV cache) keep the routing and the scope decided
/// from the prompt.
pub struct ElderAdapter<'a> {
    pub elder: &'a Elder,
    /// Rows of each sequence's prompt in the first forward call (see `prompt_rows`).
    pub prompt_rows: Vec<Range<usize>>,
    /// That call's token ids, when the caller gave them ([`ElderAdapter::inference_on`]).
    prompt_tokens: Option<Vec<u32>>,
    pub scope: Scope,
    /// `[B, d_in]`, captured at the query site or provided by the trainer.
    pub query: Option<Vec<f32>>,
    pub routing: Option<Vec<Routing>>,
    pub in_scope: Vec<bool>,
    /// Distance of each sequence's code to the nearest codebook entry (inference only).
    pub distances: Vec<Option<u32>>,
    /// The key store's best edit for each sequence and its similarity (inference only).
    pub key_matches: Vec<Option<KeyMatch>>,
    /// Sequences whose key matched in scope but whose matched edit's experts did not give its
    /// answer (`answer_gate`): answered by the base model.
    pub gated: Vec<bool>,
    /// For each sequence the gate asked: log P(its matched edit's answer) under the experts.
    pub answer_logprobs: Vec<Option<f32>>,
    /// `answer_gate_fallback` / `answer_gate_candidates`: the sequences the last revision moved
    /// to another candidate edit, whose experts the next revision asks in turn.
    switched: Vec<bool>,
    /// Every candidate edit of each sequence, best first (the key store's ranking; the first is
    /// `key_matches`'s before the gate moved it).
    candidates: Vec<Vec<KeyMatch>>,
    /// Every edit the gate asked for each sequence, in order, with log P(its answer) under its
    /// experts.
    pub asked: Vec<Vec<(usize, f32)>>,
    /// Inputs of the key store's sites, captured from the prompt.
    key_capture: SiteCapture,
    /// `expert_rows = "subject"`: the one row of each sequence (within it, in the prompt call)
    /// the experts change; `None`: every row.
    pub expert_rows: Option<Vec<Option<usize>>>,
    /// `expert_rows = "answer"`: each sequence's first row (within it, in the prompt call) the
    /// experts change; later calls (decode steps) change every row.
    pub answer_from: Option<Vec<usize>>,
    /// Training: a penalty of this weight on the squared output of the experts for the flagged
    /// sequences (negatives), so that what they must not change is not changed at all.
    pub delta_penalty: Option<(f32, Vec<bool>)>,
    /// The experts' output per layer for the penalised sequences (zero elsewhere), when training
    /// with a delta penalty.
    deltas: Vec<Vec<f32>>,
    /// Saved `x A_e` per layer, when training.
    pub shrink: Vec<Vec<f32>>,
    pub training: bool,
    /// Gradients of the gates per layer `[B, k]`, filled by the backward pass.
    pub dgates: Vec<Vec<f32>>,
    /// Parameter gradients (same shapes as the layers), when training.
    pub grads: Vec<MoloraLayer>,
}

impl<'a> ElderAdapter<'a> {
    pub fn inference(elder: &'a Elder, prompt_rows: Vec<Range<usize>>) -> Self {
        Self::build(elder, prompt_rows, Scope::Deferral, false)
    }

    /// Inference that also knows the call's token ids (`[rows]`): what the relation words
    /// (`relation_words`) read of each prompt.
    pub fn inference_on(elder: &'a Elder, prompt_rows: Vec<Range<usize>>, ids: &[u32]) -> Self {
        let mut a = Self::inference(elder, prompt_rows);
        a.prompt_tokens = Some(ids.to_vec());
        a
    }

    /// Inference on one sequence whose first `prompt_len` tokens are the prompt.
    pub fn single(elder: &'a Elder, prompt_len: usize) -> Self {
        Self::inference(elder, std::iter::once(0..prompt_len).collect())
    }

    pub fn training(elder: &'a Elder, query: Vec<f32>) -> Self {
        let mut a = Self::build(elder, Vec::new(), Scope::All, true);
        a.query = Some(query);
        a
    }

    /// Training with a routing given for every sequence (the stored allocations): every sequence
    /// is in scope, and no router is involved.
    pub fn training_routed(elder: &'a Elder, routing: Vec<Routing>) -> Self {
        let mut a = Self::build(elder, Vec::new(), Scope::All, true);
        let batch = routing.first().map_or(0, |r| r.experts.len() / r.k.max(1));
        a.in_scope = vec![true; batch];
        a.routing = Some(routing);
        a
    }

    fn build(
        elder: &'a Elder,
        prompt_rows: Vec<Range<usize>>,
        scope: Scope,
        training: bool,
    ) -> Self {
        let n = elder.layers.len();
        ElderAdapter {
            elder,
            prompt_rows,
            prompt_tokens: None,
            scope,
            query: None,
            routing: None,
            in_scope: Vec::new(),
            distances: Vec::new(),
            key_matches: Vec::new(),
            gated: Vec::new(),
            answer_logprobs: Vec::new(),
            switched: Vec::new(),
            candidates: Vec::new(),
            asked: Vec::new(),
            key_capture: SiteCapture::new(&elder.key_sites()),
            expert_rows: None,
            answer_from: None,
            delta_penalty: None,
            deltas: vec![Vec::new(); n],
            shrink: vec![Vec::new(); n],
            training,
            dgates: vec![Vec::new(); n],
            grads: if training {
                elder.layers.iter().map(MoloraLayer::zeros_like).collect()
            } else {
                Vec::new()
            },
        }
    }

    fn batch(&self) -> usize {
        self.in_scope.len()
    }

    /// Every candidate edit of each sequence, best first, as the key store ranked them (empty
    /// before the prompt call, or without a key store).
    pub fn candidates(&self) -> &[Vec<KeyMatch>] {
        &self.candidates
    }

    /// The stored allocation of each sequence's matched edit, for those in scope.
    fn routing_of_matches(&self) -> Vec<Routing> {
        let edits: Vec<Option<usize>> = self
            .key_matches
            .iter()
            .zip(&self.in_scope)
            .map(|(m, &inside)| m.filter(|_| inside).map(|m| m.entry))
            .collect();
        self.elder.stored_routing(&edits)
    }

    /// Decides routing and scope once per sequence, from the query (and the key store).
    fn ensure_routing(&mut self) {
        if self.routing.is_some() {
            return;
        }
        let cfg = &self.elder.cfg;
        if self.scope == Scope::Deferral && cfg.deferral == Deferral::KeyStore {
            self.candidates = self.elder.rank_keys(
                &self.key_capture,
                &self.prompt_rows,
                self.prompt_tokens.as_deref(),
            );
            self.key_matches = self
                .candidates
                .iter()
                .map(|ranked| KeyMatch::first_of(ranked))
                .collect();
            self.in_scope = self.elder.matches_in_scope(&self.key_matches);
            match cfg.expert_rows {
                ExpertRows::Subject => {
                    self.expert_rows = Some(
                        self.key_matches
                            .iter()
                            .map(|m| m.map(|m| m.position))
                            .collect(),
                    );
                }
                ExpertRows::Answer => {
                    self.answer_from = Some(
                        self.prompt_rows
                            .iter()
                            .map(|r| r.len().saturating_sub(1))
                            .collect(),
                    );
                }
                ExpertRows::All => {}
            }
            if cfg.inference_allocation == InferenceAllocation::Stored {
                self.routing = Some(self.routing_of_matches());
                return;
            }
            if let Some(q) = &self.query {
                self.routing = Some(self.elder.route_all(q));
            }
            return;
        }
        let Some(q) = &self.query else { return };
        let routing = self.elder.route_all(q);
        let batch = q.len() / self.elder.layers[0].d_in.max(1);
        self.in_scope = match self.scope {
            Scope::All => vec![true; batch],
            Scope::Deferral => {
                self.distances = self.elder.distances(&self.elder.codes(&routing));
                self.elder.in_scope(&self.distances)
            }
        };
        self.routing = Some(routing);
    }

    /// log P(answer | prompt) under the experts for each `(sequence, answer)`: the first token
    /// from the last prompt row of `h`, the rest (an answer that starts with whitespace tokens)
    /// from a side step over the answer's tokens that continues a copy of the prompt's cache.
    fn answer_logprob(
        &mut self,
        model: &Model,
        h: &[f32],
        shape: &BatchShape,
        cache: &KvCache,
        asked: &[(usize, &[u32])],
    ) -> Vec<f32> {
        let vocab = model.cfg.vocab_size;
        let prompt_len = |b: usize| self.prompt_rows[b].len();
        let rows: Vec<usize> = asked
            .iter()
            .map(|&(b, _)| b * shape.seq + prompt_len(b) - 1)
            .collect();
        let (logits, _) = model.head(h, &rows);
        let mut logp: Vec<f32> = asked
            .iter()
            .zip(logits.chunks(vocab))
            .map(|(&(_, a), row)| row[a[0] as usize] - ops::logsumexp(row))
            .collect();
        if asked.iter().all(|(_, a)| a.len() == 1) {
            return logp;
        }
        // Every sequence takes the side step (one padding token where it has nothing to ask).
        let mut tokens = vec![vec![0u32]; shape.batch];
        for &(b, a) in asked.iter().filter(|(_, a)| a.len() > 1) {
            tokens[b] = a[..a.len() - 1].to_vec();
        }
        let starts: Vec<usize> = (0..shape.batch).map(prompt_len).collect();
        let (ids, side) = pad_batch(&tokens, &starts);
        let capacity = starts.iter().max().copied().unwrap_or(0) + side.seq;
        let mut side_cache = cache.prefix_copy(&starts, capacity);
        let hs = model.forward_hidden(&ids, &side, &mut side_cache, self);
        let rows: Vec<usize> = asked
            .iter()
            .flat_map(|&(b, a)| (0..a.len() - 1).map(move |i| b * side.seq + i))
            .collect();
        let (logits, _) = model.head(&hs, &rows);
        let mut next = logits.chunks(vocab);
        for (lp, &(_, a)) in logp.iter_mut().zip(asked) {
            for &t in &a[1..] {
                let row = next.next().expect("one row per answer token");
                *lp += row[t as usize] - ops::logsumexp(row);
            }
        }
        logp
    }

    /// `answer_gate_candidates`: after sequence `b`'s candidate was asked (its answer's
    /// log-probability is the last of `asked[b]`), moves on to its next candidate (in scope by
    /// `threshold`, with an answer to ask), or, when every one was asked, settles on the one
    /// whose experts gave their own answer the highest log-probability (the relation key's
    /// order among equals): it answers when the gate keeps it, else the base model does.
    /// Returns (the sequence moved to another edit, the blocks must run again).
    fn choose_candidate(&mut self, b: usize, threshold: f32) -> (bool, bool) {
        let prompt_len = self.prompt_rows.get(b).map_or(0, |r| r.len());
        let asked: Vec<f32> = self.asked[b].iter().map(|&(_, lp)| lp).collect();
        let candidates = self.candidates.get(b).map_or(&[][..], Vec::as_slice);
        match self
            .elder
            .candidate_step(candidates, &asked, prompt_len, threshold)
        {
            CandidateStep::Ask(next) => {
                self.move_to(b, next);
                self.switched[b] = true;
                (true, true)
            }
            CandidateStep::Settle { best_logp, answer } => {
                self.answer_logprobs[b] = Some(best_logp);
                match answer {
                    None => {
                        self.turn_away(b);
                        (false, true)
                    }
                    Some(Some(m)) => {
                        self.move_to(b, m);
                        (true, true)
                    }
                    Some(None) => (false, false),
                }
            }
        }
    }

    /// Sequence `b` is answered by edit `m`'s experts from now on.
    fn move_to(&mut self, b: usize, m: KeyMatch) {
        self.key_matches[b] = Some(m);
        if let Some(rows) = &mut self.expert_rows {
            rows[b] = Some(m.position);
        }
    }

    /// The gate turned sequence `b` away: the base model answers it.
    fn turn_away(&mut self, b: usize) {
        self.in_scope[b] = false;
        self.gated[b] = true;
    }

    fn mix_shape(&self, shape: &BatchShape, layer: usize) -> MixShape {
        let l = &self.elder.layers[layer];
        MixShape {
            batch: shape.batch,
            seq: shape.seq,
            d_in: l.d_in,
            d_out: l.d_out,
            rank: self.elder.cfg.rank,
            k: self.elder.cfg.top_k,
            scale: self.elder.cfg.scale(),
        }
    }
}

impl Adapter for ElderAdapter<'_> {
    fn revisable_from(&self) -> Option<usize> {
        let gate = self.elder.cfg.answer_gate > 0.0
            && self.scope == Scope::Deferral
            && !self.training
            && self.routing.is_none();
        gate.then(|| self.elder.cfg.molora_blocks.iter().copied().min())
            .flatten()
    }

    /// `answer_gate`: each sequence in scope keeps its matched edit's experts only when they
    /// give that edit's answer at least the gate's probability after the prompt. The first
    /// revision asks every sequence in scope; with `answer_gate_fallback` a sequence turned away
    /// moves to its runner-up edit (once), which the next revision asks in turn; with
    /// `answer_gate_candidates` each revision asks the next candidate until all were asked,
    /// then the best answers (see [`ElderAdapter::choose_candidate`]).
    fn revise(&mut self, model: &Model, h: &[f32], shape: &BatchShape, cache: &KvCache) -> bool {
        let gate = self.elder.cfg.answer_gate;
        if gate <= 0.0 || self.batch() != shape.batch || self.key_matches.len() != shape.batch {
            return false;
        }
        let first = self.answer_logprobs.len() != shape.batch;
        if first {
            self.gated = vec![false; shape.batch];
            self.answer_logprobs = vec![None; shape.batch];
            self.switched = vec![false; shape.batch];
            self.asked = vec![Vec::new(); shape.batch];
        }
        let was_switched = std::mem::replace(&mut self.switched, vec![false; shape.batch]);
        let elder = self.elder;
        let mut asked: Vec<(usize, &[u32])> = Vec::new();
        for (b, m) in self.key_matches.iter().enumerate() {
            let asking = self.in_scope[b] && (first || was_switched[b]);
            let prompt_len = self.prompt_rows.get(b).map_or(0, |r| r.len());
            if let Some(answer) = elder.gate_question(m.as_ref(), asking, prompt_len) {
                asked.push((b, answer));
            }
        }
        if asked.is_empty() {
            return false;
        }
        let threshold = elder.scope_threshold();
        let mut changed = false;
        let mut rerouted = false;
        let logprobs = self.answer_logprob(model, h, shape, cache, &asked);
        for (&(b, _), logp) in asked.iter().zip(logprobs) {
            self.answer_logprobs[b] = Some(logp);
            if let Some(m) = self.key_matches[b] {
                self.asked[b].push((m.entry, logp));
            }
            if elder.cfg.answer_gate_candidates > 1 {
                let (moved, rerun) = self.choose_candidate(b, threshold);
                changed |= rerun;
                rerouted |= moved;
                continue;
            }
            if elder.gate_keeps(logp) {
                continue;
            }
            changed = true;
            let next = self.key_matches[b]
                .and_then(|m| m.runner_up())
                .filter(|m| elder.cfg.answer_gate_fallback && first && m.score >= threshold);
            match next {
                Some(m) => {
                    self.move_to(b, m);
                    self.switched[b] = true;
                    rerouted = true;
                }
                None => self.turn_away(b),
            }
        }
        if rerouted {
            self.routing = Some(self.routing_of_matches());
        }
        changed
    }

    fn after_linear(&mut self, site: Site, shape: &BatchShape, x: &[f32], out: &mut [f32]) {
        if self.routing.is_none() {
            self.key_capture.offer(site, x);
        }
        if self.query.is_none() && self.elder.is_query_site(site) {
            let d = x.len() / shape.rows();
            self.query = Some(self.elder.pool_query(x, d, &self.prompt_rows));
        }
        let Some(layer) = self.elder.layer_at(site) else {
            return;
        };
        self.ensure_routing();
        let Some(routing) = &self.routing else { return };
        let r = &routing[layer];
        if self.batch() != shape.batch || !self.in_scope.iter().any(|&s| s) {
            return;
        }
        let s = self.mix_shape(shape, layer);
        let p = &self.elder.layers[layer];
        if let Some(rows) = &self.expert_rows {
            // Only the prompt call has the subject's row; later tokens read it from the cache.
            if shape.start.iter().any(|&s| s > 0) {
                return;
            }
            let (one, mask) = one_row(s, rows, &self.in_scope, &shape.valid);
            let xg = gather_rows(x, s.seq, s.d_in, rows);
            let mut delta = vec![0.0f32; s.batch * s.d_out];
            let mut saved = self.training.then(|| vec![0.0f32; s.batch * s.k * s.rank]);
            ops::molora_forward(
                one,
                &xg,
                &p.a,
                &p.b,
                &r.experts,
                &r.gates,
                &mask,
                &mut delta,
                saved.as_deref_mut(),
            );
            scatter_add_rows(out, &delta, s.seq, s.d_out, rows);
            if let Some(saved) = saved {
                self.shrink[layer] = saved;
            }
            return;
        }
        let masked = self
            .answer_window(shape)
            .map(|from| mask_rows_before(x, s.seq, s.d_in, from));
        let x = masked.as_deref().unwrap_or(x);
        let mut saved = self
            .training
            .then(|| vec![0.0f32; s.batch * s.k * s.seq * s.rank]);
        let before = self.delta_penalty.as_ref().map(|_| out.to_vec());
        ops::molora_forward(
            s,
            x,
            &p.a,
            &p.b,
            &r.experts,
            &r.gates,
            &self.in_scope,
            out,
            saved.as_deref_mut(),
        );
        if let (Some(before), Some((_, flagged))) = (before, &self.delta_penalty) {
            let per_seq = s.seq * s.d_out;
            let mut delta = vec![0.0f32; out.len()];
            for (b, _) in flagged.iter().enumerate().filter(|(_, &f)| f) {
                let rows = b * per_seq..(b + 1) * per_seq;
                for ((d, o), w) in delta[rows.clone()]
                    .iter_mut()
                    .zip(&out[rows.clone()])
                    .zip(&before[rows])
                {
                    *d = o - w;
                }
            }
            self.deltas[layer] = delta;
        }
        if let Some(saved) = saved {
            self.shrink[layer] = saved;
        }
    }

    fn adapts(&self, site: Site) -> bool {
        // Before its routing is known the adapter may still capture keys or the query anywhere.
        self.routing.is_none()
            || self.elder.layer_at(site).is_some()
            || self.elder.is_query_site(site)
    }

    fn backward_linear(
        &mut self,
        site: Site,
        shape: &BatchShape,
        x: &[f32],
        dout: &[f32],
        dx: Option<&mut [f32]>,
    ) {
        let Some(layer) = self.elder.layer_at(site) else {
            return;
        };
        let (Some(routing), true) = (&self.routing, self.training) else {
            return;
        };
        let r = &routing[layer];
        let s = self.mix_shape(shape, layer);
        let p = &self.elder.layers[layer];
        let mut dgates = vec![0.0f32; s.batch * s.k];
        // Rows outside the answer window neither used the experts nor pass gradient through them.
        let window = self.answer_window(shape).map(<[usize]>::to_vec);
        if let Some(rows) = &self.expert_rows {
            let g = &mut self.grads[layer];
            let (one, mask) = one_row(s, rows, &self.in_scope, &shape.valid);
            let xg = gather_rows(x, s.seq, s.d_in, rows);
            let dg = gather_rows(dout, s.seq, s.d_out, rows);
            let mut dxg = dx.is_some().then(|| vec![0.0f32; s.batch * s.d_in]);
            ops::molora_backward(
                one,
                &xg,
                &p.a,
                &p.b,
                &r.experts,
                &r.gates,
                &mask,
                &self.shrink[layer],
                &dg,
                &mut g.a,
                &mut g.b,
                &mut dgates,
                dxg.as_deref_mut(),
            );
            if let (Some(dx), Some(dxg)) = (dx, dxg) {
                scatter_add_rows(dx, &dxg, s.seq, s.d_in, rows);
            }
            self.dgates[layer] = dgates;
            return;
        }
        let (x_m, dout_m) = match &window {
            Some(from) => (
                Some(mask_rows_before(x, s.seq, s.d_in, from)),
                Some(mask_rows_before(dout, s.seq, s.d_out, from)),
            ),
            None => (None, None),
        };
        let (x, dout) = (
            x_m.as_deref().unwrap_or(x),
            dout_m.as_deref().unwrap_or(dout),
        );
        // d(weight * |delta|^2) / d(delta) joins the gradient reaching the experts' output.
        let penalised = match &self.delta_penalty {
            Some((weight, _)) if !self.deltas[layer].is_empty() => Some(
                dout.iter()
                    .zip(&self.deltas[layer])
                    .map(|(g, d)| g + 2.0 * weight * d)
                    .collect::<Vec<f32>>(),
            ),
            _ => None,
        };
        let dout = penalised.as_deref().unwrap_or(dout);
        let g = &mut self.grads[layer];
        ops::molora_backward(
            s,
            x,
            &p.a,
            &p.b,
            &r.experts,
            &r.gates,
            &self.in_scope,
            &self.shrink[layer],
            dout,
            &mut g.a,
            &mut g.b,
            &mut dgates,
            dx,
        );
        self.dgates[layer] = dgates;
    }
}

impl ElderAdapter<'_> {
    /// The first row of each sequence the experts change in this call, under
    /// `expert_rows = "answer"` (`None`: every row, as in decode steps).
    fn answer_window(&self, shape: &BatchShape) -> Option<&[usize]> {
        let from = self.answer_from.as_deref()?;
        shape.start.iter().all(|&s| s == 0).then_some(from)
    }
}

/// `x` (`[B, seq, width]`) with the rows of each sequence before `from[b]` zeroed.
fn mask_rows_before(x: &[f32], seq: usize, width: usize, from: &[usize]) -> Vec<f32> {
    let mut out = x.to_vec();
    for (b, &f) in from.iter().enumerate() {
        let start = b * seq * width;
        let end = (start + f.min(seq) * width).min(out.len());
        out[start..end].fill(0.0);
    }
    out
}

/// The mixture shape of one row per sequence, and which sequences have a row (in scope, and the
/// row inside the sequence).
fn one_row(
    s: MixShape,
    rows: &[Option<usize>],
    in_scope: &[bool],
    valid: &[usize],
) -> (MixShape, Vec<bool>) {
    let mask = (0..s.batch)
        .map(|b| in_scope[b] && rows.get(b).copied().flatten().is_some_and(|r| r < valid[b]))
        .collect();
    (MixShape { seq: 1, ..s }, mask)
}

/// Row `rows[b]` of each sequence of `x` (`[B, seq, width]`), as `[B, width]` (zeros without one).
fn gather_rows(x: &[f32], seq: usize, width: usize, rows: &[Option<usize>]) -> Vec<f32> {
    let batch = x.len() / (seq * width);
    let mut out = vec![0.0f32; batch * width];
    for (b, row) in rows.iter().enumerate().take(batch) {
        if let Some(r) = row.filter(|&r| r < seq) {
            let at = (b * seq + r) * width;
            out[b * width..(b + 1) * width].copy_from_slice(&x[at..at + width]);
        }
    }
    out
}

/// Adds `[B, width]` back into row `rows[b]` of each sequence of `x` (`[B, seq, width]`).
fn scatter_add_rows(x: &mut [f32], add: &[f32], seq: usize, width: usize, rows: &[Option<usize>]) {
    let batch = x.len() / (seq * width);
    for (b, row) in rows.iter().enumerate().take(batch) {
        if let Some(r) = row.filter(|&r| r < seq) {
            let at = (b * seq + r) * width;
            for (o, a) in x[at..at + width]
                .iter_mut()
                .zip(&add[b * width..(b + 1) * width])
            {
                *o += a;
            }
        }
    }
}

impl ElderAdapter<'_> {
    /// Completes the backward pass through the routers: adds the guided loss on `presets`
    /// (`[L][B * k]`) and returns the guided loss value (summed over layers, unweighted).
    pub fn router_backward(&mut self, presets: &[Vec<u32>]) -> f32 {
        let Some(routing) = &self.routing else {
            return 0.0;
        };
        let q = self
            .elder
            .router_input(self.query.as_deref().unwrap_or(&[]));
        let cfg = &self.elder.cfg;
        let mut guide_total = 0.0;
        for (layer, r) in routing.iter().enumerate() {
            let batch = r.probs.len() / r.num_experts;
            let dgates = if self.dgates[layer].is_empty() {
                vec![0.0; batch * r.k]
            } else {
                self.dgates[layer].clone()
            };
            let preset = presets.get(layer).map(Vec::as_slice);
            if let Some(p) = preset {
                guide_total += ops::guided_loss(r, p);
            }
            let dlogits = ops::route_backward(
                r,
                &dgates,
                cfg.renormalize,
                preset.map(|p| (p, cfg.guide_weight)),
            );
            let g = &mut self.grads[layer];
            ops::router_param_grad(&dlogits, &q, r.num_experts, &mut g.w_r, &mut g.b_r);
        }
        guide_total
    }
}
