//! Products with few rows whose B has contiguous columns: `C[m, n] (+)= A[m, k] B[k, n]` for `m` up
//! to [`MAX_ROWS`], `B[kk, j]` at `j * stride + kk`.
//!
//! Editing runs a dozen tokens through frozen layers fifty times per edit, so most products have
//! m ~ 10 and a weight matrix of megabytes. A general GEMM packs B into panels before using it,
//! which for such m costs as much as the product: the time is in reading B. When B's columns are
//! contiguous (`[out, in]` weights used as `x W^T`: Llama's projections and the lm_head; `[in, out]`
//! weights in the backward pass: GPT-2's input gradients) every output is a dot product of a row of
//! A (in L1/L2) with a column of B read once, straight from the weights. Measured side by side
//! (`cargo bench --bench cpu_gemm`, BENCHMARKS.md) this is 2.6-3x faster than the `gemm` crate for
//! those shapes; for B with contiguous rows a plain axpy loop was 2x slower than the crate, so
//! those products stay there.
//!
//! Columns are split into fixed blocks across rayon tasks and every output is summed in the same
//! order on every run, so results are reproducible bit for bit. The loop is written for the
//! compiler to vectorise, compiled three times (AVX-512, AVX2+FMA, baseline) and picked at run time.

use rayon::prelude::*;

/// Whether the kernel is in use: `ELDER_FEW_ROW_KERNEL=0` turns it off, so that whole-edit
/// benchmarks can compare it with the `gemm` crate in the same build.
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("ELDER_FEW_ROW_KERNEL").map_or(true, |v| v != "0"))
}

/// Largest row count these kernels take; above it the general GEMM is as fast.
pub const MAX_ROWS: usize = 16;

/// Columns per task in the dot kernel.
const DOT_BLOCK: usize = 64;
/// Lanes of the dot kernel's partial sums (a multiple of every SIMD width used).
const LANES: usize = 16;

/// `C[m, n] (+)= A[m, k] B[k, n]` with A and C dense row-major and `B[kk, j]` at
/// `j * b_col_stride + kk`. Bounds are checked by the caller (`ops::gemm_strided`); `m` must be at
/// most [`MAX_ROWS`].
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    b_col_stride: usize,
    c: &mut [f32],
    accumulate: bool,
) {
    assert!(m <= MAX_ROWS && a.len() >= m * k && c.len() == m * n);
    let block = DOT_BLOCK;
    let blocks: Vec<usize> = (0..n.div_ceil(block)).collect();
    // Each task computes one column block of every row into its own buffer; the copy back is
    // cheap next to reading B.
    let results: Vec<(usize, Vec<f32>)> = blocks
        .into_par_iter()
        .map(|blk| {
            let n0 = blk * block;
            let width = block.min(n - n0);
            let mut out = vec![0.0f32; m * width];
            let cols = Cols { n0, width };
            dispatch_dot(m, k, a, b, b_col_stride, cols, &mut out);
            (n0, out)
        })
        .collect();
    for (n0, out) in results {
        let width = out.len() / m.max(1);
        for (i, row) in out.chunks_exact(width).enumerate() {
            let dst = &mut c[i * n + n0..i * n + n0 + width];
            if accumulate {
                dst.iter_mut().zip(row).for_each(|(d, s)| *d += s);
            } else {
                dst.copy_from_slice(row);
            }
        }
    }
}

/// A block of output columns.
#[derive(Clone, Copy)]
struct Cols {
    n0: usize,
    width: usize,
}

fn dispatch_dot(
    m: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    stride: usize,
    cols: Cols,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { dot_avx512(m, k, a, b, stride, cols, out) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { dot_avx2(m, k, a, b, stride, cols, out) };
        }
    }
    dot_block(m, k, a, b, stride, cols, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot_avx512(m: usize, k: usize, a: &[f32], b: &[f32], s: usize, c: Cols, o: &mut [f32]) {
    dot_block(m, k, a, b, s, c, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(m: usize, k: usize, a: &[f32], b: &[f32], s: usize, c: Cols, o: &mut [f32]) {
    dot_block(m, k, a, b, s, c, o)
}

/// `out[i, j] = A[i, :] . B[:, n0 + j]`, B columns contiguous. Partial sums in `LANES` lanes,
/// reduced in a fixed order.
#[inline(always)]
fn dot_block(m: usize, k: usize, a: &[f32], b: &[f32], stride: usize, cols: Cols, out: &mut [f32]) {
    let w = cols.width;
    let main = k - k % LANES;
    for j in 0..w {
        let bcol = &b[(cols.n0 + j) * stride..(cols.n0 + j) * stride + k];
        for i in 0..m {
            let arow = &a[i * k..(i + 1) * k];
            let mut acc = [0.0f32; LANES];
            for (ac, bc) in arow[..main]
                .chunks_exact(LANES)
                .zip(bcol[..main].chunks_exact(LANES))
            {
                for l in 0..LANES {
                    acc[l] += ac[l] * bc[l];
                }
            }
            let mut sum = acc.iter().sum::<f32>();
            for kk in main..k {
                sum += arow[kk] * bcol[kk];
            }
            out[i * w + j] = sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn simd_variants_equal_the_baseline_bit_for_bit() {
        // The lanes and the summation order are explicit in the code, so vectorising must not
        // change a single bit; this also runs the baseline path on machines with AVX.
        let (m, k, w) = (7, 301, 70);
        let a = values(m * k, 1);
        let b = values(k * 80, 2);
        let (mut base, mut fast) = (vec![0.0; m * w], vec![0.0; m * w]);
        dot_block(m, k, &a, &b, 301, Cols { n0: 3, width: w }, &mut base);
        dispatch_dot(m, k, &a, &b, 301, Cols { n0: 3, width: w }, &mut fast);
        assert_eq!(base, fast, "dot");
    }
}
