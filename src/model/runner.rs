//! Running the model: padded batches, scoring a continuation, greedy generation with a KV cache.

use std::ops::Range;

use crate::backend::cpu::ops;

use super::transformer::{Adapter, BatchShape, KvCache, Model};

/// The most revisions one forward runs (an adapter that keeps asking is a bug, not a plan).
const MAX_REVISIONS: usize = 4;

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
        let (ids, shape) = pad_batch(seqs, &vec![0; seqs.len()]);
        let mut cache = KvCache::new(&self.cfg, shape.batch, shape.seq);
        let h = self.forward_hidden(&ids, &shape, &mut cache, adapter);
        let rows: Vec<usize> = (0..shape.rows()).collect();
        (self.head(&h, &rows).0, shape)
    }

    /// Log-probability and argmax of each target token given the prompt and the targets before it
    /// (teacher forcing), in one forward pass over `prompt + target`.
    pub fn score(&self, prompt: &[u32], target: &[u32], adapter: &mut dyn Adapter) -> Scored {
        let mut seq = prompt.to_vec();
        seq.extend_from_slice(target);
        let (ids, shape) = pad_batch(&[seq], &[0]);
        let mut cache = KvCache::new(&self.cfg, 1, shape.seq);
        let h = self.forward_hidden(&ids, &shape, &mut cache, adapter);
        let rows = target_rows(shape.seq, [(prompt.len(), target.len())]);
        let (logits, _) = self.head(&h, &rows);
        Scored::from_logits(&logits, self.cfg.vocab_size, target)
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
        mut decode: Decode,
        adapter: &mut dyn Adapter,
    ) -> Vec<Vec<u32>> {
        let batch = prompts.len();
        let max_new_tokens = decode.longest();
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut cache = KvCache::new(&self.cfg, batch, longest + max_new_tokens);
        let (mut ids, mut shape) = pad_batch(prompts, &vec![0; batch]);
        for _ in 0..max_new_tokens {
            let h = self.forward_hidden(&ids, &shape, &mut cache, adapter);
            let (logits, _) = self.head(&h, &last_rows(&shape));
            let next = decode.step(&logits, self.cfg.vocab_size);
            if decode.all_done() || cache.lens.iter().any(|&l| l >= self.cfg.max_positions) {
                break;
            }
            (ids, shape) = pad_batch(&next, &cache.lens);
        }
        decode.into_tokens()
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
