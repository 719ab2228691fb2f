//! The stored allocation's iterations on the device (`elder::train_stored::StoredSteps`): the
//! batch logic (sequences, each edit's loss group and early stop, which experts go back when) is
//! the CPU's own `apply_stored_batch_on`; this runs what it asks for on the CUDA trainer's block
//! walk with a fixed pool (`Pool::Fixed`): every sequence's experts written once per batch, no
//! routers, a loss weight per row, each row's loss and argmax read back after every forward.
//!
//! The pool on the device holds the batch's gathered experts padded with zero experts up to the
//! largest pool so far, so batches of other sizes reuse the buffers. A padded expert is never
//! routed to: its gradient is zero and Adam leaves it at zero.
//!
//! Host synchronisation: one per iteration (the row losses and argmaxes, 8 bytes per target row),
//! because whether the next Adam step runs depends on them, as on the CPU. Iterations after the
//! first replay two captured CUDA graphs, the forward-backward and the Adam step.
//!
//! An edit that has learned leaves the batch on the CPU (its rows are dropped); here its rows'
//! weights become zero, so it moves no gradient, and its experts, written out when it stopped,
//! are not read again.

use anyhow::{Context, Result};
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaGraph;

use crate::backend::cpu::linear_ce::RowLosses;
use crate::backend::cuda::buffers::KernelDtype;
use crate::elder::config::ElderConfig;
use crate::elder::molora::{Elder, MoloraLayer};
use crate::elder::train_stored::{StoredBatch, StoredSteps};
use crate::runtime::cuda::activations::write;

use super::plan::{unstack_params, Pool};
use super::{replay_or_capture, GpuTrainer, Prepared};

/// A prepared fixed-pool batch: what [`StoredSteps`] keeps between calls.
pub(super) struct FixedBatch {
    cfg: ElderConfig,
    prep: Prepared,
    /// The work pool's layers, padded to the device pool (the host copy `trained` fills).
    padded: Vec<MoloraLayer>,
    /// Experts per layer of the work pool (the first `used` of the padded ones).
    used: usize,
    /// Each sequence's target rows (indices into the batch's target rows).
    seq_rows: Vec<std::ops::Range<usize>>,
    /// The sequences still trained, in order.
    kept: Vec<usize>,
    /// Each target row's loss weight as the device has it (zero once its edit has stopped).
    weights: Vec<f32>,
    /// Forward-backward passes run, and the graphs captured at the second one.
    passes: usize,
    forward_graph: Option<CudaGraph>,
    adam_graph: Option<CudaGraph>,
}

impl<T: KernelDtype> GpuTrainer<T>
where
    CudaBlas: Gemm<T>,
{
    fn fixed(&mut self) -> Result<&mut FixedBatch> {
        self.fixed.as_mut().context("no stored batch prepared")
    }

    /// The target rows of the kept sequences, in order.
    fn kept_rows(f: &FixedBatch) -> Vec<usize> {
        f.kept.iter().flat_map(|&s| f.seq_rows[s].clone()).collect()
    }
}

impl<T: KernelDtype> StoredSteps for GpuTrainer<T>
where
    CudaBlas: Gemm<T>,
{
    fn greedy(&mut self, prompts: &[Vec<u32>], tokens: usize) -> Result<Vec<Vec<u32>>> {
        let (answers, _) = self.model.generate(prompts, tokens, None, false)?;
        Ok(answers)
    }

    fn prepare(&mut self, work: Elder, batch: &StoredBatch) -> Result<()> {
        let r = work.cfg.rank;
        let used = work.layers.first().map_or(0, |l| l.experts(r));
        // Each sequence's own experts, gate 1, as the CPU routes them; the device's `[L, B, k]`
        // layout needs exactly `top_k` of them per layer.
        let k = work.cfg.top_k;
        for (s, allocation) in batch.allocations.iter().enumerate() {
            anyhow::ensure!(
                allocation.len() == work.layers.len()
                    && allocation.iter().all(|chosen| chosen.len() == k),
                "sequence {s} needs {k} experts (top_k) in each of {} layers",
                work.layers.len()
            );
            anyhow::ensure!(
                allocation.iter().flatten().all(|&e| (e as usize) < used),
                "sequence {s} names an expert outside the batch's pool of {used}"
            );
        }
        let routing = batch.routing(&work);
        let experts: Vec<u32> = routing.iter().flat_map(|l| l.experts.clone()).collect();
        let gates: Vec<f32> = routing.iter().flat_map(|l| l.gates.clone()).collect();
        // Reuse the largest pool so far (padded), so smaller batches allocate nothing.
        let pool = match self.bufs.as_ref().map(|b| b.plan.pool) {
            Some(Pool::Fixed(e)) => e.max(used),
            _ => used,
        };
        let mut padded = work;
        for layer in &mut padded.layers {
            layer.a.resize(pool * layer.d_in * r, 0.0);
            layer.b.resize(pool * r * layer.d_out, 0.0);
        }
        self.fixed = None;
        let prep = self.prepare_batch(&padded, &batch.examples, Pool::Fixed(pool))?;
        let n_seq = batch.examples.len();
        let dev = self.model.dev.clone();
        let bufs = self.bufs.as_mut().context("training buffers missing")?;
        let ex = &mut bufs.experts;
        write(&dev, &mut ex.routed.experts, &experts, "fixed routing")?;
        write(&dev, &mut ex.routed.gates, &gates, "fixed gates")?;
        // `expert_rows = "answer"`: the experts change each sequence from its last prompt token
        // (the CPU trains the same rows as answer windows).
        let first_rows: Vec<u32> = batch
            .examples
            .iter()
            .map(|e| e.prompt.len().saturating_sub(1) as u32)
            .collect();
        write(&dev, &mut ex.first_rows, &first_rows, "first changed rows")?;
        anyhow::ensure!(
            batch.weights.len() == prep.rows.target_rows.len(),
            "{} weights for {} target rows",
            batch.weights.len(),
            prep.rows.target_rows.len()
        );
        write(&dev, &mut bufs.head.weights, &batch.weights, "row weights")?;
        let mut seq_rows = Vec::with_capacity(n_seq);
        let mut start = 0;
        for ex in &batch.examples {
            seq_rows.push(start..start + ex.target.len());
            start += ex.target.len();
        }
        self.fixed = Some(FixedBatch {
            cfg: padded.cfg,
            prep,
            padded: padded.layers,
            used,
            seq_rows,
            kept: (0..n_seq).collect(),
            weights: batch.weights.clone(),
            passes: 0,
            forward_graph: None,
            adam_graph: None,
        });
        Ok(())
    }

    fn losses(&mut self) -> Result<RowLosses> {
        let use_graphs = self.iteration_graphs;
        let mut fixed = self.fixed.take().context("no stored batch prepared")?;
        let result = (|| -> Result<RowLosses> {
            let (step, bufs) = self.parts(&fixed.cfg, &fixed.prep)?;
            let it = fixed.passes;
            replay_or_capture(
                step.dev,
                &mut fixed.forward_graph,
                use_graphs && it > 0,
                "forward-backward",
                || step.forward_backward(bufs, it),
            )?;
            fixed.passes += 1;
            let n = step.n_targets;
            let loss = step.dev.download(&bufs.head.ce_now.slice(0..n))?;
            let argmax = step.dev.download(&bufs.head.argmax.slice(0..n))?;
            let rows = Self::kept_rows(&fixed);
            Ok(RowLosses {
                loss: rows.iter().map(|&j| loss[j]).collect(),
                argmax: rows.iter().map(|&j| argmax[j]).collect(),
            })
        })();
        self.fixed = Some(fixed);
        result
    }

    fn retain(&mut self, keep: &[bool]) -> Result<Vec<usize>> {
        let dev = self.model.dev.clone();
        let f = self.fixed()?;
        anyhow::ensure!(
            keep.len() == f.kept.len(),
            "{} flags for {} kept sequences",
            keep.len(),
            f.kept.len()
        );
        let mut kept_rows = Vec::new();
        let mut position = 0;
        let mut kept = Vec::new();
        for (&s, &k) in f.kept.iter().zip(keep) {
            let rows = f.seq_rows[s].clone();
            let n = rows.len();
            if k {
                kept.push(s);
                kept_rows.extend(position..position + n);
            } else {
                f.weights[rows].fill(0.0);
            }
            position += n;
        }
        f.kept = kept;
        let weights = f.weights.clone();
        let bufs = self.bufs.as_mut().context("training buffers missing")?;
        write(&dev, &mut bufs.head.weights, &weights, "row weights")?;
        Ok(kept_rows)
    }

    fn step(&mut self, it: usize) -> Result<()> {
        let use_graphs = self.iteration_graphs;
        let mut fixed = self.fixed.take().context("no stored batch prepared")?;
        let result = (|| -> Result<()> {
            let (step, bufs) = self.parts(&fixed.cfg, &fixed.prep)?;
            step.write_schedule(&mut bufs.experts, it)?;
            replay_or_capture(
                step.dev,
                &mut fixed.adam_graph,
                use_graphs && it > 0,
                "Adam step",
                || step.adam(&mut bufs.experts),
            )
        })();
        self.fixed = Some(fixed);
        result
    }

    fn trained(&mut self) -> Result<Vec<MoloraLayer>> {
        let dev = self.model.dev.clone();
        let stacked = self
            .bufs
            .as_ref()
            .context("training buffers missing")?
            .experts
            .params
            .download(&dev)?;
        let f = self.fixed()?;
        let r = f.cfg.rank;
        unstack_params(&stacked, &mut f.padded)?;
        let used = f.used;
        Ok(f.padded
            .iter()
            .map(|l| {
                let mut l = l.clone();
                l.a.truncate(used * l.d_in * r);
                l.b.truncate(used * r * l.d_out);
                l
            })
            .collect())
    }

    fn scaling(&mut self) -> Result<(usize, f32)> {
        let dev = self.model.dev.clone();
        let skipped_before = self.fixed()?.prep.skipped_before;
        let status = self
            .bufs
            .as_ref()
            .context("training buffers missing")?
            .experts
            .loss_scale
            .status(&dev)?;
        Ok((
            (status.skipped_steps - skipped_before) as usize,
            status.scale,
        ))
    }
}
