//! Register-tiled few-row kernels, written once over [`Simd`].
//!
//! - **Dot form** (B's columns contiguous): a tile of R rows x C columns keeps R*C vector
//!   accumulators of partial dot products; each step loads C column chunks of B and R row chunks of
//!   A. The R*C independent accumulators hide the FMA latency that a single running dot product
//!   waits on.
//! - **Axpy form** (B's rows contiguous): a tile of R rows x C vectors of columns keeps the outputs
//!   themselves in registers; each step loads one row chunk of B and broadcasts R entries of A.
//!
//! Every output is summed in an order that depends only on k and the vector width, never on the
//! tile it falls in or the thread that computes it, so results are reproducible bit for bit.

#![allow(clippy::needless_range_loop)] // index loops over const-sized tiles unroll into registers

use std::ops::Range;

use super::simd::Simd;

/// A few-row product `C[m, n] (+)= A[m, k] B[k, n]` on raw pointers: `A[i, kk]` at
/// `a + i * lda + kk`, `C[i, j]` at `c + i * ldc + j`, and B as described by `b_stride` for the form
/// in use (dot: column j at `b + j * b_stride`; axpy: row kk at `b + kk * b_stride`).
/// The caller ([`super`]) checks that every index it will touch lies inside the buffers.
#[derive(Clone, Copy)]
pub(super) struct Product {
    pub m: usize,
    pub k: usize,
    pub a: *const f32,
    pub lda: usize,
    pub b: *const f32,
    pub b_stride: usize,
    pub c: *mut f32,
    pub ldc: usize,
    pub accumulate: bool,
}

// SAFETY: a `Product` is only shared between tasks that write disjoint column ranges of C, and
// A and B are only read.
unsafe impl Send for Product {}
unsafe impl Sync for Product {}

/// Rows per dot tile.
const DOT_ROWS: usize = 4;
/// Rows per axpy tile.
const AXPY_ROWS: usize = 6;
/// How many rows of B ahead the axpy tile prefetches. Its rows lie a whole weight row apart, often
/// on different pages, where the hardware prefetchers do not follow.
const AXPY_PREFETCH_ROWS: usize = 24;

/// Dot form over the columns `cols`, in groups of C columns.
#[inline(always)]
pub(super) unsafe fn dot_cols<S: Simd, const C: usize>(p: &Product, cols: Range<usize>) {
    let mut j = cols.start;
    unsafe {
        while j + C <= cols.end {
            dot_col_group::<S, C>(p, j);
            j += C;
        }
        while j < cols.end {
            dot_col_group::<S, 1>(p, j);
            j += 1;
        }
    }
}

#[inline(always)]
unsafe fn dot_col_group<S: Simd, const C: usize>(p: &Product, j0: usize) {
    let mut i = 0;
    unsafe {
        while i + DOT_ROWS <= p.m {
            dot_tile::<S, DOT_ROWS, C>(p, i, j0);
            i += DOT_ROWS;
        }
        match p.m - i {
            1 => dot_tile::<S, 1, C>(p, i, j0),
            2 => dot_tile::<S, 2, C>(p, i, j0),
            3 => dot_tile::<S, 3, C>(p, i, j0),
            _ => {}
        }
    }
}

#[inline(always)]
unsafe fn dot_tile<S: Simd, const R: usize, const C: usize>(p: &Product, i0: usize, j0: usize) {
    unsafe {
        let mut a = [p.a; R];
        for r in 0..R {
            a[r] = p.a.add((i0 + r) * p.lda);
        }
        let mut b = [p.b; C];
        for c in 0..C {
            b[c] = p.b.add((j0 + c) * p.b_stride);
        }
        let mut acc = [[S::zero(); C]; R];
        let full = p.k - p.k % S::LANES;
        let mut kk = 0;
        while kk < full {
            let mut bv = [S::zero(); C];
            for c in 0..C {
                bv[c] = S::load(b[c].add(kk));
            }
            for r in 0..R {
                let av = S::load(a[r].add(kk));
                for c in 0..C {
                    acc[r][c] = S::mul_add(av, bv[c], acc[r][c]);
                }
            }
            kk += S::LANES;
        }
        if kk < p.k {
            let n = p.k - kk;
            let mut bv = [S::zero(); C];
            for c in 0..C {
                bv[c] = S::load_first(b[c].add(kk), n);
            }
            for r in 0..R {
                let av = S::load_first(a[r].add(kk), n);
                for c in 0..C {
                    acc[r][c] = S::mul_add(av, bv[c], acc[r][c]);
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                let out = p.c.add((i0 + r) * p.ldc + j0 + c);
                let dot = S::sum(acc[r][c]);
                *out = if p.accumulate { *out + dot } else { dot };
            }
        }
    }
}

/// Axpy form over the columns `cols`, in groups of C vectors; the last columns go one vector at a
/// time, the very last one masked.
#[inline(always)]
pub(super) unsafe fn axpy_cols<S: Simd, const C: usize>(p: &Product, cols: Range<usize>) {
    let width = C * S::LANES;
    let mut j = cols.start;
    unsafe {
        while j + width <= cols.end {
            axpy_col_group::<S, C>(p, j, S::LANES);
            j += width;
        }
        while j < cols.end {
            let lanes = (cols.end - j).min(S::LANES);
            axpy_col_group::<S, 1>(p, j, lanes);
            j += lanes;
        }
    }
}

#[inline(always)]
unsafe fn axpy_col_group<S: Simd, const C: usize>(p: &Product, j0: usize, last: usize) {
    let mut i = 0;
    unsafe {
        while i + AXPY_ROWS <= p.m {
            axpy_tile::<S, AXPY_ROWS, C>(p, i, j0, last);
            i += AXPY_ROWS;
        }
        match p.m - i {
            1 => axpy_tile::<S, 1, C>(p, i, j0, last),
            2 => axpy_tile::<S, 2, C>(p, i, j0, last),
            3 => axpy_tile::<S, 3, C>(p, i, j0, last),
            4 => axpy_tile::<S, 4, C>(p, i, j0, last),
            5 => axpy_tile::<S, 5, C>(p, i, j0, last),
            _ => {}
        }
    }
}

/// `last`: how many lanes of the final vector are columns of C (`LANES` for a full group).
#[inline(always)]
unsafe fn axpy_tile<S: Simd, const R: usize, const C: usize>(
    p: &Product,
    i0: usize,
    j0: usize,
    last: usize,
) {
    let partial = last < S::LANES;
    unsafe {
        let mut a = [p.a; R];
        let mut out = [p.c; R];
        for r in 0..R {
            a[r] = p.a.add((i0 + r) * p.lda);
            out[r] = p.c.add((i0 + r) * p.ldc + j0);
        }
        let mut acc = [[S::zero(); C]; R];
        if p.accumulate {
            for r in 0..R {
                for c in 0..C {
                    let at = out[r].add(c * S::LANES);
                    acc[r][c] = if partial && c == C - 1 {
                        S::load_first(at, last)
                    } else {
                        S::load(at)
                    };
                }
            }
        }
        for kk in 0..p.k {
            let row = p.b.add(kk * p.b_stride + j0);
            if kk + AXPY_PREFETCH_ROWS < p.k {
                let ahead = row.add(AXPY_PREFETCH_ROWS * p.b_stride);
                for c in 0..C {
                    S::prefetch(ahead.add(c * S::LANES));
                }
            }
            let mut bv = [S::zero(); C];
            for c in 0..C {
                bv[c] = if partial && c == C - 1 {
                    S::load_first(row.add(c * S::LANES), last)
                } else {
                    S::load(row.add(c * S::LANES))
                };
            }
            for r in 0..R {
                let av = S::splat(*a[r].add(kk));
                for c in 0..C {
                    acc[r][c] = S::mul_add(av, bv[c], acc[r][c]);
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                let at = out[r].add(c * S::LANES);
                if partial && c == C - 1 {
                    S::store_first(at, acc[r][c], last);
                } else {
                    S::store(at, acc[r][c]);
                }
            }
        }
    }
}
