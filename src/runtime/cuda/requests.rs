//! Whole requests on the CUDA forward, with the semantics of the CPU runner (`model::runner`) and of
//! `eval::score_pairs`: padded-batch logits, teacher-forced scoring of a target, batched scoring of
//! (prompt, continuation) pairs for the metrics, greedy generation with the KV cache. Logits come
//! back to the host only for the rows a request needs; the log-softmax and argmax there are the CPU
//! runner's own functions.

use anyhow::{bail, Result};
use cudarc::cublas::{CudaBlas, Gemm};

use crate::eval::{self, EVAL_BATCH};
use crate::model::runner::{pad_batch, Decode, Sampling, Scored};
use crate::model::BatchShape;

use super::forward::{ElderStep, GpuModel};
use super::plan::{last_rows, prompt_query_rows, target_rows, Capacity};
use crate::backend::cuda::buffers::KernelDtype;

/// A prompt call: with query rows ELDER routes from them, without it stays off.
fn prompt_step(query_rows: Option<&[usize]>) -> ElderStep<'_> {
    match query_rows {
        Some(rows) => ElderStep::Prompt(rows),
        None => ElderStep::Off,
    }
}

impl<T: KernelDtype> GpuModel<T>
where
    CudaBlas: Gemm<T>,
{
    /// Logits `[B, T, vocab]` of every row of a padded batch (padding rows included), as
    /// `Model::logits`. With `query_rows`, ELDER edits the model reading each sequence's query at
    /// those rows (what `ElderAdapter::inference(elder, query_rows)` does on the CPU).
    pub fn logits(
        &mut self,
        seqs: &[Vec<u32>],
        query_rows: Option<&[usize]>,
    ) -> Result<(Vec<f32>, BatchShape)> {
        let (ids, shape) = pad_batch(seqs, &vec![0; seqs.len()]);
        self.reserve(Capacity {
            batch: shape.batch,
            seq: shape.seq,
        })?;
        self.forward(&ids, &shape, prompt_step(query_rows))?;
        let rows: Vec<usize> = (0..shape.rows()).collect();
        Ok((self.head(&rows)?, shape))
    }

    /// `Model::score` on the device: log p and argmax of each target token given the prompt, and the
    /// ELDER scope decision when `edited`.
    pub fn score(
        &mut self,
        prompt: &[u32],
        target: &[u32],
        edited: bool,
    ) -> Result<(Scored, Option<bool>)> {
        if prompt.is_empty() || target.is_empty() {
            bail!("scoring needs at least one prompt and one target token");
        }
        let seq = [prompt, target].concat();
        let (ids, shape) = pad_batch(&[seq], &[0]);
        self.reserve(Capacity {
            batch: 1,
            seq: shape.seq,
        })?;
        let query = [prompt.len() - 1];
        self.forward(&ids, &shape, prompt_step(edited.then_some(&query[..])))?;
        let logits = self.head(&target_rows(shape.seq, [(prompt.len(), target.len())]))?;
        let out = Scored::from_logits(&logits, self.cfg.vocab_size, target);
        let scope = if edited {
            self.elder_scope()?.0.first().copied()
        } else {
            None
        };
        Ok((out, scope))
    }

    /// `eval::score_pairs` on the device, in the same batches of [`EVAL_BATCH`].
    pub fn score_pairs(
        &mut self,
        edited: bool,
        pairs: &[(&[u32], &[u32])],
    ) -> Result<Vec<eval::Scored>> {
        let mut out = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(EVAL_BATCH) {
            if let Some((p, _)) = chunk.iter().find(|(p, _)| p.is_empty()) {
                bail!(
                    "a scored pair has an empty prompt ({} target tokens)",
                    p.len()
                );
            }
            let seqs: Vec<Vec<u32>> = chunk.iter().map(|(p, c)| [*p, *c].concat()).collect();
            let (ids, shape) = pad_batch(&seqs, &vec![0; seqs.len()]);
            self.reserve(Capacity {
                batch: shape.batch,
                seq: shape.seq,
            })?;
            let prompt_lens: Vec<usize> = chunk.iter().map(|(p, _)| p.len()).collect();
            let query_rows = prompt_query_rows(shape.seq, &prompt_lens);
            self.forward(&ids, &shape, prompt_step(edited.then_some(&query_rows[..])))?;
            let routed = if edited {
                // The GPU has the codebook only (ElderConfig::gpu_unsupported): no key matches.
                let (in_scope, distances) = self.elder_scope()?;
                Some(eval::Routed {
                    in_scope,
                    distances,
                    matches: Vec::new(),
                    gated: Vec::new(),
                })
            } else {
                None
            };
            let lens: Vec<(usize, usize)> = chunk.iter().map(|(p, c)| (p.len(), c.len())).collect();
            let logits = self.head(&target_rows(shape.seq, lens.iter().copied()))?;
            out.extend(eval::scored_chunk(
                chunk,
                &logits,
                self.cfg.vocab_size,
                routed,
            ));
        }
        Ok(out)
    }

    /// Greedy continuation of each prompt with the KV cache, as `Model::generate`; also returns
    /// the ELDER scope of each sequence when `edited` (decided once, from the prompt).
    pub fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        max_new_tokens: usize,
        eos: Option<u32>,
        edited: bool,
    ) -> Result<(Vec<Vec<u32>>, Vec<bool>)> {
        let decode =
            Decode::with_sampling(&vec![Sampling::greedy(max_new_tokens); prompts.len()], eos);
        self.generate_with(prompts, decode, edited)
    }

    /// The continuation of each prompt as `decode` picks it, as `Model::generate_with`.
    pub fn generate_with(
        &mut self,
        prompts: &[Vec<u32>],
        mut decode: Decode,
        edited: bool,
    ) -> Result<(Vec<Vec<u32>>, Vec<bool>)> {
        let max_new_tokens = decode.longest();
        let batch = prompts.len();
        if prompts.iter().any(Vec::is_empty) {
            bail!("every prompt needs at least one token");
        }
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        self.reserve(Capacity {
            batch,
            seq: longest + max_new_tokens,
        })?;
        let mut scope = Vec::new();
        let mut lens = vec![0usize; batch];
        let (mut ids, mut shape) = pad_batch(prompts, &lens);
        let prompt_rows = last_rows(&shape);
        for step in 0..max_new_tokens {
            let elder = match (edited, step) {
                (false, _) => ElderStep::Off,
                (true, 0) => ElderStep::Prompt(&prompt_rows),
                (true, _) => ElderStep::Continue,
            };
            // The prompt runs eagerly; every later step is one token per sequence, replayed from
            // a captured CUDA graph.
            let logits = if step == 0 {
                self.forward(&ids, &shape, elder)?;
                if edited {
                    scope = self.elder_scope()?.0;
                }
                self.head(&last_rows(&shape))?
            } else {
                self.decode_step(&ids, &shape, edited)?
            };
            for (len, (s, v)) in lens.iter_mut().zip(shape.start.iter().zip(&shape.valid)) {
                *len = s + v;
            }
            let next = decode.step(&logits, self.cfg.vocab_size);
            if decode.all_done() || lens.iter().any(|&l| l >= self.cfg.max_positions) {
                break;
            }
            (ids, shape) = pad_batch(&next, &lens);
        }
        Ok((decode.into_tokens(), scope))
    }
}
