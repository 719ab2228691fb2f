//! The head of the training step on the device: final norm and lm_head on the supervised rows
//! only, the cross-entropy, and their backward into the residual stream's gradient.

use anyhow::Result;
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaSlice;

use crate::backend::cuda::buffers::KernelDtype;
use crate::backend::cuda::{elementwise, gemm, loss};
use crate::runtime::cuda::weights::{input_grad, NormIo};

use super::buffers::{HeadBuffers, Scratch};
use super::plan::Pool;
use super::step::Step;

impl<T: KernelDtype> Step<'_, T>
where
    CudaBlas: Gemm<T>,
{
    /// Final norm and lm_head on the supervised rows of `h` (as `Model::head`), then the
    /// cross-entropy with weight `1 / n` (as the CPU trainer; a fixed pool's batch: each row's own
    /// weight, and its argmax into `hb.argmax`) into `hb.ce_now`; its gradient is multiplied by
    /// the device-side `loss_scale` (see `adam::LossScale`).
    pub(super) fn head_forward(
        &self,
        hb: &mut HeadBuffers<T>,
        h: &CudaSlice<T>,
        loss_scale: &CudaSlice<f32>,
    ) -> Result<()> {
        let (dev, cfg, n) = (self.dev, self.cfg, self.n_targets);
        let (d, vocab) = (cfg.hidden_size, cfg.vocab_size);
        elementwise::embedding(dev, &hb.rows, n, h, self.rows(), d, &mut hb.x)?;
        self.w.final_norm.forward(
            dev,
            NormIo {
                rows: n,
                d,
                x: &hb.x,
                residual: None,
                sum_out: None,
                out: &mut hb.normed,
                mean: &mut hb.mean,
                rstd: &mut hb.rstd,
            },
        )?;
        let (head_w, layout) = self.w.head_weight();
        gemm::matmul(
            dev,
            &hb.normed,
            n,
            head_w,
            d,
            vocab,
            layout,
            &mut hb.logits,
            false,
        )?;
        // A fixed pool's batch weighs every row on its own (each edit's loss is its own group)
        // and reads each row's argmax for its early stop.
        let per_row = match self.pool {
            Pool::Routed => loss::PerRow::default(),
            Pool::Fixed(_) => loss::PerRow {
                weights: Some(&hb.weights),
                argmax: Some(&mut hb.argmax),
            },
        };
        let weight = match self.pool {
            Pool::Routed => 1.0 / n as f32,
            Pool::Fixed(_) => 1.0,
        };
        loss::cross_entropy_rows(
            dev,
            &hb.logits,
            &hb.targets,
            (n, vocab),
            weight,
            Some(loss_scale),
            &mut hb.dlogits,
            &mut hb.ce_now,
            per_row,
        )
    }

    /// Gradient of the head into `sc.dh` (as `Model::head_backward`): every supervised row gets its
    /// row of the final norm's input gradient, every other row zero (one gather, see
    /// `plan::head_scatter_ids`).
    pub(super) fn head_backward(&self, hb: &mut HeadBuffers<T>, sc: &mut Scratch<T>) -> Result<()> {
        let (dev, cfg, n) = (self.dev, self.cfg, self.n_targets);
        let (d, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let (head_w, layout) = self.w.head_weight();
        input_grad(
            dev,
            &hb.dlogits,
            n,
            head_w,
            d,
            vocab,
            layout,
            &mut hb.dnormed,
            false,
        )?;
        self.w.final_norm.backward(
            dev,
            (n, d),
            &hb.x,
            &hb.mean,
            &hb.rstd,
            &hb.dnormed,
            &mut hb.dx,
            false,
        )?;
        elementwise::embedding(dev, &hb.scatter, self.rows(), &hb.dx, n + 1, d, &mut sc.dh)
    }
}
