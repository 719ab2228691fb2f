//! Running the model: padded batches, and the request layer: logits, scoring a continuation and
//! generation with a KV cache, written once ([`logits`], [`score`], [`generate`]) over the
//! [`Forward`] trait that the CPU forward ([`CpuForward`]) and the CUDA runtime implement.

use std::ops::Range;

use anyhow::{bail, Result};

use crate::backend::cpu::{in_pool, ops};

use super::config::ModelConfig;
use super::transformer::{Adapter, BatchShape, KvCache, Model};

/// The most revisions one forward runs (an adapter that keeps asking is a bug, not a plan;
/// ELDER's gate asks at most 8 candidate edits, one revision each, and settles in one more).
const MAX_REVISIONS: usize = 16;

/// Right-pads sequences to one length. Padding rows use token 0 and are masked everywhere.
pub fn pad_batch(seqs: &[Vec<u32>], start: &[usize]) -> (Vec<u32>, BatchShape) {
    let seq = seqs.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(seqs.len() * seq);
    for s in seqs {
        ids.extend_from_slice(s);
        ids.extend(std::iter::repeat_n(0, seq - s.len()));
    }
    let shape = BatchShape {
        batch: seqs.len(),
        seq,
        valid: seqs.iter().map(Vec::len).collect(),
        start: start.to_vec(),
    };
    (ids, shape)
}

/// Rows `[b*seq, b*seq + len)` of each sequence's prompt in a right-padded batch whose rows are
/// `seq` apart: where an adapter reads a sequence's query.
pub fn prompt_rows(seq: usize, prompt_lens: impl IntoIterator<Item = usize>) -> Vec<Range<usize>> {
    prompt_lens
        .into_iter()
        .enumerate()
        .map(|(b, len)| b * seq..b * seq + len)
        .collect()
}

/// Row of each sequence's last real token, `b * seq + valid[b] - 1`: where greedy decoding reads
/// the next token.
pub fn last_rows(shape: &BatchShape) -> Vec<usize> {
    (0..shape.batch)
        .map(|b| b * shape.seq + shape.valid[b].saturating_sub(1))
        .collect()
}

/// How one sequence picks its next tokens: at most `max_new` of them, the argmax at temperature
/// 0, else a sample from the softmax at that temperature (seeded, so a request with a seed gets
/// the same text again).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub max_new: usize,
    pub temperature: f32,
    pub seed: u64,
}

impl Sampling {
    pub fn greedy(max_new: usize) -> Self {
        Sampling {
            max_new,
            temperature: 0.0,
            seed: 0,
        }
    }
}

/// Called with `(sequence, token)` for every token a sequence keeps, as it is decoded (a server
/// streams them).
pub type TokenListener = Box<dyn FnMut(usize, u32) + Send>;

/// Decoding's bookkeeping, shared by the CPU and GPU backends: each sequence's tokens so far and
/// whether it is done (its `eos`, or its own `max_new` tokens).
pub struct Decode {
    tokens: Vec<Vec<u32>>,
    done: Vec<bool>,
    eos: Option<u32>,
    sampling: Vec<(Sampling, Option<rand_chacha::ChaCha8Rng>)>,
    listener: Option<TokenListener>,
}

/// Greedy decoding of every sequence (the command line's `generate`).
pub type GreedyDecode = Decode;

impl Decode {
    /// Greedy decoding of `batch` sequences (their length is bounded by the caller's loop).
    pub fn new(batch: usize, eos: Option<u32>) -> Self {
        Self::with_sampling(&vec![Sampling::greedy(usize::MAX); batch], eos)
    }

    /// One sequence per entry of `sampling`.
    pub fn with_sampling(sampling: &[Sampling], eos: Option<u32>) -> Self {
        use rand::SeedableRng;
        let batch = sampling.len();
        Decode {
            tokens: vec![Vec::new(); batch],
            done: sampling.iter().map(|s| s.max_new == 0).collect(),
            eos,
            sampling: sampling
                .iter()
                .map(|s| {
                    let rng = (s.temperature > 0.0)
                        .then(|| rand_chacha::ChaCha8Rng::seed_from_u64(s.seed));
                    (*s, rng)
                })
                .collect(),
            listener: None,
        }
    }

    /// Reports every kept token to `listener` as it is decoded.
    pub fn listen(mut self, listener: TokenListener) -> Self {
        self.listener = Some(listener);
        self
    }

    /// The most tokens any sequence may still need (the decode loop's bound).
    pub fn longest(&self) -> usize {
        self.sampling
            .iter()
            .map(|(s, _)| s.max_new)
            .max()
            .unwrap_or(0)
    }

    /// Picks each sequence's next token from `logits` `[batch, vocab]` (kept only until the
    /// sequence is done) and returns the next step's one-token inputs.
    pub fn step(&mut self, logits: &[f32], vocab: usize) -> Vec<Vec<u32>> {
        let mut next = Vec::with_capacity(self.done.len());
        for (b, row) in logits.chunks(vocab).enumerate() {
            let (sampling, rng) = &mut self.sampling[b];
            let tok = match rng {
                Some(rng) => sample(row, sampling.temperature, rng),
                None => ops::argmax(row) as u32,
            };
            if !self.done[b] {
                self.tokens[b].push(tok);
                self.done[b] = Some(tok) == self.eos || self.tokens[b].len() >= sampling.max_new;
                if let Some(listen) = &mut self.listener {
                    listen(b, tok);
                }
            }
            next.push(vec![tok]);
        }
        next
    }

    pub fn all_done(&self) -> bool {
        self.done.iter().all(|&d| d)
    }

    pub fn into_tokens(self) -> Vec<Vec<u32>> {
        self.tokens
    }
}

/// A token drawn from `softmax(row / temperature)`.
fn sample(row: &[f32], temperature: f32, rng: &mut rand_chacha::ChaCha8Rng) -> u32 {
    use rand::Rng;
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = row
        .iter()
        .map(|&x| (((x - max) / temperature) as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.gen::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    ops::argmax(row) as u32
}

/// Rows whose logits score each `(prompt_len, target_len)` pair of a right-padded batch whose rows
/// are `seq` apart: row `b * seq + prompt_len - 1 + i` predicts target token `i` (teacher forcing).
pub fn target_rows(seq: usize, pairs: impl IntoIterator<Item = (usize, usize)>) -> Vec<usize> {
    pairs
        .into_iter()
        .enumerate()
        .flat_map(|(b, (p, t))| (0..t).map(move |i| b * seq + p - 1 + i))
        .collect()
}

impl Model {
    /// Runs new tokens through every block, continuing `cache`; returns the last hidden states
    /// `[rows, d]` (before the final norm).
    pub fn forward_hidden(
        &self,
        ids: &[u32],
        shape: &BatchShape,
        cache: &mut KvCache,
        adapter: &mut dyn Adapter,
    ) -> Vec<f32> {
        let mut h = self.embed(ids, shape);
        let revisable = adapter
            .revisable_from()
            .filter(|&from| from < self.blocks.len());
        let mut entering = None;
        for l in 0..self.blocks.len() {
            if revisable == Some(l) {
                entering = Some(h.clone());
            }
            self.attn_half(l, &mut h, shape, cache, None);
            self.mlp_half(l, &mut h, shape, adapter, None);
        }
        if let (Some(from), Some(entering)) = (revisable, entering) {
            // Each revision may lead to another (a fallback decision asks again); the adapter
            // ends them, and the bound only guards against one that never does.
            for _ in 0..MAX_REVISIONS {
                if !adapter.revise(self, &h, shape, cache) {
                    break;
                }
                // The cache rows of these blocks are written again at the same positions.
                h.clone_from(&entering);
                for l in from..self.blocks.len() {
                    self.attn_half(l, &mut h, shape, cache, None);
                    self.mlp_half(l, &mut h, shape, adapter, None);
                }
            }
        }
        for (len, (start, valid)) in cache
            .lens
            .iter_mut()
            .zip(shape.start.iter().zip(&shape.valid))
        {
            *len = start + valid;
        }
        h
    }

    /// Logits `[B, T, vocab]` of every row of a padded batch (padding rows included) — what
    /// transformers returns for `model(input_ids, attention_mask)`.
    pub fn logits(&self, seqs: &[Vec<u32>], adapter: &mut dyn Adapter) -> (Vec<f32>, BatchShape) {
        cpu_never_fails(logits(&mut CpuForward::new(self, adapter), seqs))
    }

    /// Log-probability and argmax of each target token given the prompt and the targets before it
    /// (teacher forcing), in one forward pass over `prompt + target`.
    pub fn score(&self, prompt: &[u32], target: &[u32], adapter: &mut dyn Adapter) -> Scored {
        cpu_never_fails(score(&mut CpuForward::new(self, adapter), prompt, target)).0
    }

    /// Greedy continuation of each prompt (batched, with a KV cache). A sequence stops at `eos`.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        max_new_tokens: usize,
        eos: Option<u32>,
        adapter: &mut dyn Adapter,
    ) -> Vec<Vec<u32>> {
        let decode =
            Decode::with_sampling(&vec![Sampling::greedy(max_new_tokens); prompts.len()], eos);
        self.generate_with(prompts, decode, adapter)
    }

    /// The continuation of each prompt as `decode` picks it (batched, with a KV cache).
    pub fn generate_with(
        &self,
        prompts: &[Vec<u32>],
        decode: Decode,
        adapter: &mut dyn Adapter,
    ) -> Vec<Vec<u32>> {
        cpu_never_fails(generate(
            &mut CpuForward::new(self, adapter),
            prompts,
            decode,
        ))
        .0
    }
}

/// The CPU forward's requests fail only on input the wrappers above never build (an empty
/// prompt or target is refused by the engine before it gets here).
fn cpu_never_fails<T>(r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("the CPU forward failed: {e:#}"))
}

// ------------------------------------------------------------------ the request layer

/// A forward that whole requests run on: one request at a time, a padded prompt call that fills
/// a KV cache, then decode steps continuing it. [`CpuForward`] is the CPU model with an adapter;
/// the CUDA runtime's `GpuRequest` is the same on the device with its uploaded edit state.
pub trait Forward {
    /// What the edit method decided for each sequence of the prompt call (ELDER's routing:
    /// `eval::Routed`; `()` for a forward that reports nothing).
    type Report;

    fn config(&self) -> &ModelConfig;

    /// Starts a request of `batch` sequences of at most `capacity` tokens each (an empty cache).
    fn begin(&mut self, batch: usize, capacity: usize) -> Result<()>;

    /// The request's first call: `ids` padded as `shape`, every sequence from position 0; the
    /// first `prompt_lens[b]` rows of sequence `b` are its prompt, where an edit method reads
    /// its query.
    fn prompt(&mut self, ids: &[u32], shape: &BatchShape, prompt_lens: &[usize]) -> Result<()>;

    /// Logits `[rows.len(), vocab]` (f32) of the chosen rows of the prompt call.
    fn head(&mut self, rows: &[usize]) -> Result<Vec<f32>>;

    /// One new token per sequence (`shape.seq == 1`), continuing the cache with the prompt's
    /// routing kept: the logits `[batch, vocab]` of those tokens.
    fn decode_step(&mut self, ids: &[u32], shape: &BatchShape) -> Result<Vec<f32>>;

    /// What the edit method decided in the prompt call (`None`: the base model ran).
    fn report(&mut self) -> Result<Option<Self::Report>>;
}

/// Logits `[B, T, vocab]` of every row of a padded batch (padding rows included); an edit method
/// reads each sequence's query over the whole sequence.
pub fn logits<F: Forward + ?Sized>(
    fwd: &mut F,
    seqs: &[Vec<u32>],
) -> Result<(Vec<f32>, BatchShape)> {
    let (ids, shape) = pad_batch(seqs, &vec![0; seqs.len()]);
    fwd.begin(shape.batch, shape.seq)?;
    let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
    fwd.prompt(&ids, &shape, &lens)?;
    let rows: Vec<usize> = (0..shape.rows()).collect();
    Ok((fwd.head(&rows)?, shape))
}

/// Log-probability and argmax of each target token given the prompt and the targets before it
/// (teacher forcing), in one call over `prompt + target`; and what the edit method decided.
pub fn score<F: Forward + ?Sized>(
    fwd: &mut F,
    prompt: &[u32],
    target: &[u32],
) -> Result<(Scored, Option<F::Report>)> {
    if prompt.is_empty() || target.is_empty() {
        bail!("scoring needs at least one prompt and one target token");
    }
    let (ids, shape) = pad_batch(&[[prompt, target].concat()], &[0]);
    fwd.begin(1, shape.seq)?;
    fwd.prompt(&ids, &shape, &[prompt.len()])?;
    let report = fwd.report()?;
    let logits = fwd.head(&target_rows(shape.seq, [(prompt.len(), target.len())]))?;
    let scored = Scored::from_logits(&logits, fwd.config().vocab_size, target);
    Ok((scored, report))
}

/// Each prompt's continuation, and what the edit method decided for the prompts.
pub type Continuations<R> = (Vec<Vec<u32>>, Option<R>);

/// The continuation of each prompt as `decode` picks it (a batch: a padded prompt call, then one
/// decode step per token); and what the edit method decided for each prompt.
pub fn generate<F: Forward + ?Sized>(
    fwd: &mut F,
    prompts: &[Vec<u32>],
    mut decode: Decode,
) -> Result<Continuations<F::Report>> {
    if prompts.iter().any(Vec::is_empty) {
        bail!("every prompt needs at least one token");
    }
    let (vocab, max_positions) = (fwd.config().vocab_size, fwd.config().max_positions);
    let batch = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    fwd.begin(batch, longest + decode.longest())?;
    let mut report = None;
    let mut lens = vec![0usize; batch];
    let (mut ids, mut shape) = pad_batch(prompts, &lens);
    for step in 0..decode.longest() {
        let logits = if step == 0 {
            let prompt_lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
            fwd.prompt(&ids, &shape, &prompt_lens)?;
            report = fwd.report()?;
            fwd.head(&last_rows(&shape))?
        } else {
            fwd.decode_step(&ids, &shape)?
        };
        for (len, (s, v)) in lens.iter_mut().zip(shape.start.iter().zip(&shape.valid)) {
            *len = s + v;
        }
        let next = decode.step(&logits, vocab);
        if decode.all_done() || lens.iter().any(|&l| l >= max_positions) {
            break;
        }
        (ids, shape) = pad_batch(&next, &lens);
    }
    Ok((decode.into_tokens(), report))
}

/// What a [`CpuForward`] edits a request with: an adapter that learns each prompt call's prompt
/// rows and reports what it decided.
pub trait PromptAdapter {
    type Report;
    /// A new prompt call of token ids `ids` (`[batch * seq]`) whose sequences' prompts are
    /// `rows` (`prompt_rows`).
    fn start(&mut self, rows: Vec<Range<usize>>, ids: &[u32]);
    /// The adapter the walk calls.
    fn adapter(&mut self) -> &mut dyn Adapter;
    /// What it decided in the prompt call.
    fn report(&mut self) -> Option<Self::Report>;
}

/// Any adapter as it is: told nothing, reporting nothing (tests, forced experts, the base model).
impl PromptAdapter for &mut dyn Adapter {
    type Report = ();
    fn start(&mut self, _rows: Vec<Range<usize>>, _ids: &[u32]) {}
    fn adapter(&mut self) -> &mut dyn Adapter {
        &mut **self
    }
    fn report(&mut self) -> Option<()> {
        None
    }
}

/// The CPU reference forward of one request: the model, an adapter, the request's KV cache and
/// the last call's hidden states (what the head reads).
pub struct CpuForward<'m, A> {
    pub model: &'m Model,
    pub adapter: A,
    cache: Option<KvCache>,
    hidden: Vec<f32>,
}

impl<'m, A: PromptAdapter> CpuForward<'m, A> {
    pub fn new(model: &'m Model, adapter: A) -> Self {
        CpuForward {
            model,
            adapter,
            cache: None,
            hidden: Vec::new(),
        }
    }

    fn run(&mut self, ids: &[u32], shape: &BatchShape) -> Result<()> {
        let Some(cache) = self.cache.as_mut() else {
            bail!("a forward call before the request began");
        };
        let (model, adapter) = (self.model, self.adapter.adapter());
        self.hidden = in_pool(|| model.forward_hidden(ids, shape, cache, adapter));
        Ok(())
    }
}

impl<A: PromptAdapter> Forward for CpuForward<'_, A> {
    type Report = A::Report;

    fn config(&self) -> &ModelConfig {
        &self.model.cfg
    }

    fn begin(&mut self, batch: usize, capacity: usize) -> Result<()> {
        self.cache = Some(KvCache::new(&self.model.cfg, batch, capacity));
        Ok(())
    }

    fn prompt(&mut self, ids: &[u32], shape: &BatchShape, prompt_lens: &[usize]) -> Result<()> {
        self.adapter
            .start(prompt_rows(shape.seq, prompt_lens.iter().copied()), ids);
        self.run(ids, shape)
    }

    fn head(&mut self, rows: &[usize]) -> Result<Vec<f32>> {
        let (model, hidden) = (self.model, &self.hidden);
        Ok(in_pool(|| model.head(hidden, rows).0))
    }

    fn decode_step(&mut self, ids: &[u32], shape: &BatchShape) -> Result<Vec<f32>> {
        self.run(ids, shape)?;
        let rows: Vec<usize> = (0..shape.batch).collect();
        self.head(&rows)
    }

    fn report(&mut self) -> Result<Option<A::Report>> {
        Ok(self.adapter.report())
    }
}

/// Per-token results of [`Model::score`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Scored {
    /// log p(target_i | prompt, target_<i).
    pub logprobs: Vec<f32>,
    /// The model's most likely token at each of those positions.
    pub argmax: Vec<u32>,
}

impl Scored {
    /// From the logits `[target.len(), vocab]` of the rows that predict each target token.
    pub fn from_logits(logits: &[f32], vocab: usize, target: &[u32]) -> Self {
        let rows = logits.chunks(vocab).zip(target);
        let (logprobs, argmax) = rows
            .map(|(row, &t)| {
                (
                    row[t as usize] - ops::logsumexp(row),
                    ops::argmax(row) as u32,
                )
            })
            .unzip();
        Scored { logprobs, argmax }
    }
}
