//! The CPU reference of every op: plain f32 loops (threaded with rayon over rows) and the `gemm`
//! crate for matrix products. Each function is the "CPU twin" that the CUDA kernels are checked
//! against, so each stays simple and obviously right. One module per kernel family, named as
//! the family's `kernels/F.cu` and `backend/cuda/F.rs` are (`lora` holds the MoLoRA mixture);
//! everything is re-exported here, so callers write `ops::matmul`.
//!
//! Conventions: row-major; a "row" is one token; `d` is the row width. Matrices of frozen linear
//! layers are described by [`MatRef`], which knows whether the weight is stored `[in, out]` (GPT-2
//! Conv1D) or `[out, in]` (nn.Linear), so the ops never transpose a weight; a layer may keep a
//! transposed copy for the products it speeds up (`backend::cpu::layout_copy`).

pub mod adam;
pub mod attention;
pub mod elementwise;
pub mod gemm;
pub mod lora;
pub mod loss;
pub mod norm;
pub mod router;

pub use crate::backend::shapes::Layout;
pub use adam::*;
pub use attention::*;
pub use elementwise::*;
pub use gemm::*;
pub use lora::*;
pub use loss::*;
pub use norm::*;
pub use router::*;

/// Rows per rayon task: enough work per task that scheduling costs nothing.
pub(super) fn rows_per_task(d: usize) -> usize {
    (16384 / d.max(1)).max(1)
}

/// What the families' tests share: random inputs, finite differences, a naive product.
#[cfg(test)]
pub(super) mod testing {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    pub fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    /// Checks `grad` against finite differences of `f` at `x` on every coordinate.
    pub fn fd_check(name: &str, x: &[f32], grad: &[f32], f: impl Fn(&[f32]) -> f32) {
        let eps = 1e-3;
        let mut x = x.to_vec();
        for i in 0..x.len() {
            let orig = x[i];
            x[i] = orig + eps;
            let plus = f(&x) as f64;
            x[i] = orig - eps;
            let minus = f(&x) as f64;
            x[i] = orig;
            let fd = ((plus - minus) / (2.0 * eps as f64)) as f32;
            assert!(
                (fd - grad[i]).abs() <= 2e-3 + 1e-2 * grad[i].abs(),
                "{name}: d/dx[{i}] finite difference {fd} vs analytic {}",
                grad[i]
            );
        }
    }

    /// `x W` (and `dy W^T`) in f64 from the logical `[in, out]` view.
    pub fn naive_product(x: &[f32], m: usize, w: &MatRef, transpose: bool) -> Vec<f64> {
        let at = |i: usize, o: usize| -> f64 {
            match w.layout {
                Layout::InOut => w.data[i * w.out_dim + o] as f64,
                Layout::OutIn => w.data[o * w.in_dim + i] as f64,
            }
        };
        let (k, n) = if transpose {
            (w.out_dim, w.in_dim)
        } else {
            (w.in_dim, w.out_dim)
        };
        let mut out = vec![0.0f64; m * n];
        for r in 0..m {
            for j in 0..n {
                out[r * n + j] = (0..k)
                    .map(|kk| {
                        let wv = if transpose { at(j, kk) } else { at(kk, j) };
                        x[r * k + kk] as f64 * wv
                    })
                    .sum();
            }
        }
        out
    }

    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(a, b)| a * b).sum()
    }
}
