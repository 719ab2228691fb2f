//! A running count of the arithmetic the CPU's matrix products did, so that a stream can say how
//! much work an edit is and at what rate it ran (`elder edit`'s summary line), against the rate
//! the products reach on the machine (`cargo bench --bench cpu_gemm`, the "peak" case).
//!
//! Every product of the CPU backend adds `2 m n k` (a multiply and an add per term) once, where it
//! is dispatched: the `gemm` crate, the few-row kernels and the fused head loss's tiles. The
//! element-wise work (norms, activations, softmax) is not counted: next to the products it is a
//! few percent of the operations. The count is process-wide: in a process that also answers
//! queries while it trains (`elder serve`), their products count too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

static MULTIPLY_ADDS: AtomicU64 = AtomicU64::new(0);

/// Records a product `C[m, n] (+)= A[m, k] B[k, n]`.
pub fn count_product(m: usize, n: usize, k: usize) {
    // One relaxed add per product: products take microseconds, the add nanoseconds.
    MULTIPLY_ADDS.fetch_add((m * n * k) as u64, Ordering::Relaxed);
}

/// Floating-point operations of every product counted so far in this process.
pub fn flops_so_far() -> u64 {
    2 * MULTIPLY_ADDS.load(Ordering::Relaxed)
}

/// The products' operations since `since` (a [`flops_so_far`] reading), in GFLOP.
fn gflop_since(since: u64) -> f64 {
    flops_so_far().saturating_sub(since) as f64 * 1e-9
}

/// A clock and the product count read together at the start of a part of the work: its seconds
/// and its products' GFLOP so far.
pub struct Meter {
    started: Instant,
    flops: u64,
}

impl Meter {
    pub fn start() -> Self {
        Meter {
            started: Instant::now(),
            flops: flops_so_far(),
        }
    }

    pub fn seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn gflop(&self) -> f64 {
        gflop_since(self.flops)
    }
}
