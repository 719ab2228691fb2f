//! Products with few rows: `C[m, n] (+)= A[m, k] B[k, n]` for `m` up to [`MAX_ROWS`].
//!
//! Editing runs a dozen tokens through frozen layers fifty times per edit, so most products have
//! m ~ 10 and a weight matrix B of megabytes. A general GEMM packs B into panels before using it,
//! which for such m costs as much as the product: the time is in reading B. These kernels read B
//! once, straight from the weights, and keep the few rows of A and C in L1:
//!
//! - B rows contiguous (`[in, out]` weights, or the transposed use of `[out, in]` ones): for each
//!   k, `C[i, cols] += A[i, k] * B[k, cols]` over a block of columns (axpy);
//! - B columns contiguous (`[out, in]` weights used as `x W^T`): `C[i, j] = A[i, :] . B[:, j]` (dot).
//!
//! Columns are split into fixed blocks across rayon tasks, and each output element is summed in
//! the same order on every run, so results are reproducible bit for bit. The loops are written for
//! the compiler to vectorise, compiled three times (AVX-512, AVX2+FMA, baseline) and picked at run
//! time.

use rayon::prelude::*;

/// Largest row count these kernels take; above it the general GEMM is as fast.
pub const MAX_ROWS: usize = 16;

/// Columns per task in the axpy kernel (the task's C block stays in L1).
const AXPY_BLOCK: usize = 256;
/// Columns per task in the dot kernel.
const DOT_BLOCK: usize = 64;
/// Lanes of the dot kernel's partial sums (a multiple of every SIMD width used).
const LANES: usize = 16;

/// How B is laid out in memory, as strides of its logical `[k, n]` view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BOrder {
    /// `B[kk, j]` at `kk * stride + j`.
    RowsContiguous { stride: usize },
    /// `B[kk, j]` at `j * stride + kk`.
    ColsContiguous { stride: usize },
}

impl BOrder {
    /// The order of a B with element strides `(row, col)`, if the kernels handle it.
    pub fn from_strides((rs, cs): (isize, isize)) -> Option<Self> {
        match (rs, cs) {
            (rs, 1) if rs >= 1 => Some(BOrder::RowsContiguous {
                stride: rs as usize,
            }),
            (1, cs) if cs >= 1 => Some(BOrder::ColsContiguous {
                stride: cs as usize,
            }),
            _ => None,
        }
    }
}

/// `C[m, n] (+)= A[m, k] B[k, n]` with A and C dense row-major. Bounds are checked by the caller
/// (`ops::gemm_strided`); `m` must be at most [`MAX_ROWS`].
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    order: BOrder,
    c: &mut [f32],
    accumulate: bool,
) {
    assert!(m <= MAX_ROWS && a.len() >= m * k && c.len() == m * n);
    let block = match order {
        BOrder::RowsContiguous { .. } => AXPY_BLOCK,
        BOrder::ColsContiguous { .. } => DOT_BLOCK,
    };
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
            match order {
                BOrder::RowsContiguous { stride } => {
                    dispatch_axpy(m, k, a, b, stride, cols, &mut out)
                }
                BOrder::ColsContiguous { stride } => {
                    dispatch_dot(m, k, a, b, stride, cols, &mut out)
                }
            }
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

fn dispatch_axpy(
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
            return unsafe { axpy_avx512(m, k, a, b, stride, cols, out) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { axpy_avx2(m, k, a, b, stride, cols, out) };
        }
    }
    axpy_block(m, k, a, b, stride, cols, out)
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
unsafe fn axpy_avx512(m: usize, k: usize, a: &[f32], b: &[f32], s: usize, c: Cols, o: &mut [f32]) {
    axpy_block(m, k, a, b, s, c, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(m: usize, k: usize, a: &[f32], b: &[f32], s: usize, c: Cols, o: &mut [f32]) {
    axpy_block(m, k, a, b, s, c, o)
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

/// `out[i, :] = sum_kk A[i, kk] * B[kk, n0..n0+width]`, B rows contiguous. Tiles of `TILE_ROWS`
/// rows by `TILE_COLS` columns keep their sums in registers for the whole k loop, so each B row
/// segment is loaded once per row tile instead of once per row.
#[inline(always)]
fn axpy_block(
    m: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    stride: usize,
    cols: Cols,
    out: &mut [f32],
) {
    let w = cols.width;
    let mut i0 = 0;
    while i0 < m {
        let rows = (m - i0).min(TILE_ROWS);
        let mut c0 = 0;
        while c0 + TILE_COLS <= w {
            match rows {
                4 => axpy_tile::<4>(i0, c0, k, a, b, stride, cols, out),
                3 => axpy_tile::<3>(i0, c0, k, a, b, stride, cols, out),
                2 => axpy_tile::<2>(i0, c0, k, a, b, stride, cols, out),
                _ => axpy_tile::<1>(i0, c0, k, a, b, stride, cols, out),
            }
            c0 += TILE_COLS;
        }
        // Columns left over at the block's edge.
        for i in i0..i0 + rows {
            for j in c0..w {
                let mut sum = 0.0f32;
                for kk in 0..k {
                    sum += a[i * k + kk] * b[kk * stride + cols.n0 + j];
                }
                out[i * w + j] = sum;
            }
        }
        i0 += rows;
    }
}

/// Rows per register tile of the axpy kernel.
const TILE_ROWS: usize = 4;
/// Columns per register tile (two AVX-512 registers per row).
const TILE_COLS: usize = 32;

/// One `R x TILE_COLS` tile of `axpy_block` starting at row `i0`, column `c0` of the block.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn axpy_tile<const R: usize>(
    i0: usize,
    c0: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    stride: usize,
    cols: Cols,
    out: &mut [f32],
) {
    let mut acc = [[0.0f32; TILE_COLS]; R];
    let col = cols.n0 + c0;
    for kk in 0..k {
        let brow: &[f32; TILE_COLS] = b[kk * stride + col..kk * stride + col + TILE_COLS]
            .try_into()
            .expect("tile width");
        for (r, acc_row) in acc.iter_mut().enumerate() {
            let x = a[(i0 + r) * k + kk];
            for (s, &bv) in acc_row.iter_mut().zip(brow) {
                *s += x * bv;
            }
        }
    }
    for (r, acc_row) in acc.iter().enumerate() {
        let start = (i0 + r) * cols.width + c0;
        out[start..start + TILE_COLS].copy_from_slice(acc_row);
    }
}

/// `out[i, j] = A[i, :] . B[:, n0 + j]`, B columns contiguous. Rows go in tiles of `TILE_ROWS`
/// that share each load of B; partial sums in `LANES` lanes, reduced in a fixed order.
#[inline(always)]
fn dot_block(m: usize, k: usize, a: &[f32], b: &[f32], stride: usize, cols: Cols, out: &mut [f32]) {
    let mut i0 = 0;
    while i0 < m {
        let rows = (m - i0).min(TILE_ROWS);
        match rows {
            4 => dot_tile::<4>(i0, k, a, b, stride, cols, out),
            3 => dot_tile::<3>(i0, k, a, b, stride, cols, out),
            2 => dot_tile::<2>(i0, k, a, b, stride, cols, out),
            _ => dot_tile::<1>(i0, k, a, b, stride, cols, out),
        }
        i0 += rows;
    }
}

/// Rows `i0..i0 + R` of `dot_block`, every column of the block.
#[inline(always)]
fn dot_tile<const R: usize>(
    i0: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    stride: usize,
    cols: Cols,
    out: &mut [f32],
) {
    let main = k - k % LANES;
    let arows: [&[f32]; R] = std::array::from_fn(|r| &a[(i0 + r) * k..(i0 + r + 1) * k]);
    for j in 0..cols.width {
        let bcol = &b[(cols.n0 + j) * stride..(cols.n0 + j) * stride + k];
        let mut acc = [[0.0f32; LANES]; R];
        for c in (0..main).step_by(LANES) {
            let bc: &[f32; LANES] = bcol[c..c + LANES].try_into().expect("lane width");
            for (acc_row, arow) in acc.iter_mut().zip(&arows) {
                let ac: &[f32; LANES] = arow[c..c + LANES].try_into().expect("lane width");
                for l in 0..LANES {
                    acc_row[l] += ac[l] * bc[l];
                }
            }
        }
        for (r, (acc_row, arow)) in acc.iter().zip(&arows).enumerate() {
            let mut sum = acc_row.iter().sum::<f32>();
            for kk in main..k {
                sum += arow[kk] * bcol[kk];
            }
            out[(i0 + r) * cols.width + j] = sum;
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
        let b = values(k * 300, 2);
        let cols = Cols { n0: 5, width: w };
        let (mut base, mut fast) = (vec![0.0; m * w], vec![0.0; m * w]);
        axpy_block(m, k, &a, &b, 300, cols, &mut base);
        dispatch_axpy(m, k, &a, &b, 300, cols, &mut fast);
        assert_eq!(base, fast, "axpy");
        let (mut base, mut fast) = (vec![0.0; m * w], vec![0.0; m * w]);
        dot_block(m, k, &a, &b, 301, Cols { n0: 3, width: w }, &mut base);
        dispatch_dot(m, k, &a, &b, 301, Cols { n0: 3, width: w }, &mut fast);
        assert_eq!(base, fast, "dot");
    }
}
