//! The forward's preallocated device memory: activation buffers and the KV cache, sized by a
//! [`BufferPlan`] for a maximum batch x sequence. Launchers accept buffers longer than a call needs,
//! so one allocation serves every smaller call; only a larger [`Capacity`] reallocates.

use anyhow::{Context, Result};
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use crate::model::ModelConfig;

use super::plan::{BufferPlan, Capacity};
use crate::backend::cuda::buffers::{check_len, KernelDtype};
use crate::backend::cuda::device::GpuDevice;

pub struct Activations<T: KernelDtype> {
    pub cap: Capacity,
    /// Token ids and absolute positions of every row `[rows]`.
    pub ids: CudaSlice<u32>,
    pub positions: CudaSlice<u32>,
    /// Rows the head is asked for `[rows]`.
    pub head_rows: CudaSlice<u32>,
    /// Per sequence: cache length before the call and real tokens in it `[batch]`.
    pub q_start: CudaSlice<i32>,
    pub q_valid: CudaSlice<i32>,
    /// Residual stream and its next value (the fused add + norm cannot write in place: it re-reads
    /// its inputs on every pass).
    pub h: CudaSlice<T>,
    pub h_next: CudaSlice<T>,
    /// Output of the last sublayer, not yet added to `h` (the next norm adds it).
    pub delta: CudaSlice<T>,
    pub normed: CudaSlice<T>,
    pub head_in: CudaSlice<T>,
    pub q: CudaSlice<T>,
    pub att: CudaSlice<T>,
    pub k_new: CudaSlice<T>,
    pub v_new: CudaSlice<T>,
    /// GPT-2: c_fc output; Llama: gate output.
    pub ffn_a: CudaSlice<T>,
    /// Llama: up output.
    pub ffn_b: CudaSlice<T>,
    /// Input of the MLP's output projection.
    pub act: CudaSlice<T>,
    pub logits: CudaSlice<T>,
    /// Norm statistics (written by the kernels, unused by inference).
    pub mean: CudaSlice<f32>,
    pub rstd: CudaSlice<f32>,
    /// `[batch, cap.seq, kv_dim]` per layer.
    pub cache_k: Vec<CudaSlice<T>>,
    pub cache_v: Vec<CudaSlice<T>>,
    /// How many times buffers were (re)allocated: steady-state calls must leave it unchanged.
    pub allocations: usize,
}

fn alloc<T: DeviceRepr + ValidAsZeroBits>(
    dev: &GpuDevice,
    n: usize,
    what: &str,
) -> Result<CudaSlice<T>> {
    dev.zeros::<T>(n)
        .with_context(|| format!("allocating the {what} buffer ({n} elements)"))
}

impl<T: KernelDtype> Activations<T> {
    pub fn new(dev: &GpuDevice, cfg: &ModelConfig, cap: Capacity) -> Result<Self> {
        let p = BufferPlan::new(cfg, cap);
        let cache = |what| -> Result<Vec<CudaSlice<T>>> {
            (0..p.layers)
                .map(|_| alloc(dev, p.cache_per_layer, what))
                .collect()
        };
        Ok(Activations {
            cap,
            ids: alloc(dev, p.rows, "ids")?,
            positions: alloc(dev, p.rows, "positions")?,
            head_rows: alloc(dev, p.rows, "head rows")?,
            q_start: alloc(dev, cap.batch, "q_start")?,
            q_valid: alloc(dev, cap.batch, "q_valid")?,
            h: alloc(dev, p.hidden, "residual")?,
            h_next: alloc(dev, p.hidden, "residual")?,
            delta: alloc(dev, p.hidden, "sublayer output")?,
            normed: alloc(dev, p.hidden, "norm output")?,
            head_in: alloc(dev, p.hidden, "head input")?,
            q: alloc(dev, p.q, "query")?,
            att: alloc(dev, p.q, "attention output")?,
            k_new: alloc(dev, p.kv_new, "new keys")?,
            v_new: alloc(dev, p.kv_new, "new values")?,
            ffn_a: alloc(dev, p.ffn, "MLP")?,
            ffn_b: alloc(dev, p.ffn, "MLP")?,
            act: alloc(dev, p.ffn, "MLP activation")?,
            logits: alloc(dev, p.logits, "logits")?,
            mean: alloc(dev, p.rows, "norm mean")?,
            rstd: alloc(dev, p.rows, "norm rstd")?,
            cache_k: cache("key cache")?,
            cache_v: cache("value cache")?,
            allocations: 1,
        })
    }

    /// Makes room for `cap` (reallocating everything, and dropping the cache, only when it grows).
    pub fn reserve(&mut self, dev: &GpuDevice, cfg: &ModelConfig, cap: Capacity) -> Result<()> {
        if self.cap.covers(cap) {
            return Ok(());
        }
        let (allocations, grown) = (self.allocations, self.cap.union(cap));
        // Free the old buffers first so peak memory is one set, not two.
        *self = Self::new(dev, cfg, Capacity { batch: 1, seq: 1 })?;
        *self = Self::new(dev, cfg, grown)?;
        self.allocations = allocations + 1;
        Ok(())
    }
}

/// Copies `host` into the front of a preallocated device buffer (no allocation).
pub fn write<T: DeviceRepr>(
    dev: &GpuDevice,
    dst: &mut CudaSlice<T>,
    host: &[T],
    what: &str,
) -> Result<()> {
    check_len(what, dst.len(), host.len())?;
    if host.is_empty() {
        return Ok(());
    }
    let mut view = dst.slice_mut(0..host.len());
    dev.stream()
        .memcpy_htod(host, &mut view)
        .with_context(|| format!("copying {} elements of {what} to the device", host.len()))
}
