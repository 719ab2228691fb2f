//! Whole requests on the CUDA forward: [`GpuRequest`] is the runtime's [`Forward`], so logits,
//! scoring, evaluation scoring and generation are the request layer's own functions
//! (`model::runner::{logits, score, generate}`, `eval::score_pairs_on`), the ones the CPU runs.
//! Logits come back to the host only for the rows a request needs; decode steps after the prompt
//! replay a captured CUDA graph ([`GpuModel::decode_step`]).

use anyhow::Result;
use cudarc::cublas::{CudaBlas, Gemm};

use crate::backend::cpu::ops;
use crate::eval::{self, Routed};
use crate::model::runner::{self, pad_batch, Decode, Forward, Sampling, Scored};
use crate::model::{BatchShape, ModelConfig};

use super::forward::{ElderStep, GpuModel};
use super::plan::{prompt_query_rows, Capacity};
use crate::backend::cuda::buffers::KernelDtype;

/// One request on a [`GpuModel`]: edited by its uploaded ELDER state (`edited`), or the base
/// model. The router reads each sequence's query at its last prompt row.
pub struct GpuRequest<'g, T: KernelDtype> {
    pub model: &'g mut GpuModel<T>,
    pub edited: bool,
}

impl<T: KernelDtype> Forward for GpuRequest<'_, T>
where
    CudaBlas: Gemm<T>,
{
    type Report = Routed;

    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn begin(&mut self, batch: usize, capacity: usize) -> Result<()> {
        self.model.reserve(Capacity {
            batch,
            seq: capacity,
        })
    }

    fn prompt(&mut self, ids: &[u32], shape: &BatchShape, prompt_lens: &[usize]) -> Result<()> {
        if !self.edited {
            return self.model.forward(ids, shape, ElderStep::Off);
        }
        let query_rows = prompt_query_rows(shape.seq, prompt_lens);
        self.model
            .forward(ids, shape, ElderStep::Prompt(&query_rows, ids))?;
        self.model.answer_gate(ids, shape, prompt_lens)
    }

    fn head(&mut self, rows: &[usize]) -> Result<Vec<f32>> {
        self.model.head(rows)
    }

    fn decode_step(&mut self, ids: &[u32], shape: &BatchShape) -> Result<Vec<f32>> {
        self.model.decode_step(ids, shape, self.edited)
    }

    fn report(&mut self) -> Result<Option<Routed>> {
        if !self.edited {
            return Ok(None);
        }
        self.model.elder_report().map(Some)
    }
}

impl<T: KernelDtype> GpuModel<T>
where
    CudaBlas: Gemm<T>,
{
    /// The answer gate after an edited prompt call (`answer_gate`, the CPU's
    /// `ElderAdapter::revise`): each sequence in scope whose matched edit's experts give that
    /// edit's answer less than the gate's probability is answered by the base model. The answers'
    /// log-probabilities come from the prompt call's last rows when every answer is one token;
    /// else from one teacher-forced pass over each prompt and its answer but the last token, under
    /// the same decision. The prompt runs again when the gate turned a sequence away (or the
    /// longer pass replaced its activations and cache).
    fn answer_gate(
        &mut self,
        ids: &[u32],
        shape: &BatchShape,
        prompt_lens: &[usize],
    ) -> Result<()> {
        // In rounds, as the CPU's revisions: each asks what the gate still asks (every sequence in
        // scope, then those `answer_gate_fallback` moved to a runner-up edit) on the pass of the
        // current decision, and runs the prompt again when the decision changed.
        loop {
            let questions = match &self.elder {
                Some(e) => e.gate_questions(),
                None => return Ok(()),
            };
            if questions.is_empty() {
                return Ok(());
            }
            if !self.gate_round(ids, shape, prompt_lens, &questions)? {
                return Ok(());
            }
        }
    }

    /// One round of [`Self::answer_gate`]: the experts' log-probability of each asked answer,
    /// handed to the decision; the prompt runs again when the decision changed (or a longer pass
    /// replaced its activations). Returns whether the decision changed.
    fn gate_round(
        &mut self,
        ids: &[u32],
        shape: &BatchShape,
        prompt_lens: &[usize],
        questions: &[(usize, Vec<u32>)],
    ) -> Result<bool> {
        let vocab = self.config().vocab_size;
        let one_token = questions.iter().all(|(_, a)| a.len() == 1);
        let (rows, logits) = if one_token {
            let rows: Vec<usize> = questions
                .iter()
                .map(|&(b, _)| b * shape.seq + prompt_lens[b] - 1)
                .collect();
            (rows.len(), self.head(&rows)?)
        } else {
            let seqs: Vec<Vec<u32>> = (0..shape.batch)
                .map(|b| {
                    let mut s = ids[b * shape.seq..][..prompt_lens[b]].to_vec();
                    if let Some((_, a)) = questions.iter().find(|(q, _)| *q == b) {
                        s.extend_from_slice(&a[..a.len() - 1]);
                    }
                    s
                })
                .collect();
            let (longer_ids, longer) = pad_batch(&seqs, &vec![0; seqs.len()]);
            self.reserve(Capacity {
                batch: longer.batch,
                seq: longer.seq,
            })?;
            self.forward(&longer_ids, &longer, ElderStep::Continue)?;
            let rows: Vec<usize> = questions
                .iter()
                .flat_map(|(b, a)| {
                    (0..a.len()).map(move |i| b * longer.seq + prompt_lens[*b] - 1 + i)
                })
                .collect();
            (rows.len(), self.head(&rows)?)
        };
        debug_assert_eq!(logits.len(), rows * vocab);
        let mut next = logits.chunks(vocab);
        let logps: Vec<(usize, f32)> = questions
            .iter()
            .map(|(b, answer)| {
                let logp = answer
                    .iter()
                    .map(|&t| {
                        let row = next.next().expect("one row per answer token");
                        row[t as usize] - ops::logsumexp(row)
                    })
                    .sum();
                (*b, logp)
            })
            .collect();
        let dev = self.dev.clone();
        let turned_away = self
            .elder
            .as_mut()
            .expect("asked above")
            .gate_answers(&dev, &logps)?;
        if turned_away || !one_token {
            self.forward(ids, shape, ElderStep::Continue)?;
        }
        Ok(turned_away)
    }

    /// This model as a request's [`Forward`].
    pub fn request(&mut self, edited: bool) -> GpuRequest<'_, T> {
        GpuRequest {
            model: self,
            edited,
        }
    }

    /// Logits `[B, T, vocab]` of every row of a padded batch (padding rows included), as
    /// `Model::logits`; `edited`: the uploaded ELDER state routes each sequence from its last row.
    pub fn logits(&mut self, seqs: &[Vec<u32>], edited: bool) -> Result<(Vec<f32>, BatchShape)> {
        runner::logits(&mut self.request(edited), seqs)
    }

    /// `Model::score` on the device: log p and argmax of each target token given the prompt, and the
    /// ELDER scope decision when `edited`.
    pub fn score(
        &mut self,
        prompt: &[u32],
        target: &[u32],
        edited: bool,
    ) -> Result<(Scored, Option<bool>)> {
        let (scored, report) = runner::score(&mut self.request(edited), prompt, target)?;
        Ok((scored, report.and_then(|r| r.in_scope.first().copied())))
    }

    /// `eval::score_pairs` on the device, in the same batches of [`eval::EVAL_BATCH`].
    pub fn score_pairs(
        &mut self,
        edited: bool,
        pairs: &[(&[u32], &[u32])],
    ) -> Result<Vec<eval::Scored>> {
        eval::score_pairs_on(&mut self.request(edited), pairs)
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
        decode: Decode,
        edited: bool,
    ) -> Result<(Vec<Vec<u32>>, Vec<bool>)> {
        let (tokens, report) = runner::generate(&mut self.request(edited), prompts, decode)?;
        Ok((tokens, report.map(|r| r.in_scope).unwrap_or_default()))
    }
}
