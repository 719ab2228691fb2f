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

/// One cache line of f32: the unit that panels and aligned copies are allocated in, so that their
/// vectors start on a line.
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
pub(super) struct Line(pub [f32; FLOATS_PER_LINE]);

/// Rows per dot tile.
const DOT_ROWS: usize = 4;
/// f32 values per 64-byte cache line.
pub(super) const FLOATS_PER_LINE: usize = 16;
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
        // While the row tiles compute on this group's columns, they bring the next group's
        // towards L2, a share before each tile: a forward reads each weight once, and without
        // this the first tile of every group waited on memory that the last tiles of the group
        // before could have asked for (SmolLM2's 32-token forward, all of its products in this
        // form, 1.09-1.20x faster; BENCHMARKS.md, issue 19).
        let ahead = p.b.wrapping_add((j0 + C) * p.b_stride);
        let lines = (C * p.b_stride).div_ceil(FLOATS_PER_LINE);
        let share = lines.div_ceil((p.m / DOT_ROWS).max(1));
        let mut tile = 0;
        while i + DOT_ROWS <= p.m {
            for line in tile * share..((tile + 1) * share).min(lines) {
                S::prefetch(ahead.wrapping_add(line * FLOATS_PER_LINE));
            }
            tile += 1;
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
/// time, the very last one masked. From [`AXPY_PACK_ROWS`] rows on, the full groups go through
/// [`axpy_packed`].
#[inline(always)]
pub(super) unsafe fn axpy_cols<S: Simd, const C: usize>(p: &Product, cols: Range<usize>) {
    let width = C * S::LANES;
    let full_end = cols.start + cols.len() / width * width;
    let mut j = cols.start;
    unsafe {
        if p.m >= AXPY_PACK_ROWS && full_end > j {
            axpy_packed::<S, C>(p, j..full_end);
            j = full_end;
        }
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

/// Rows of B one pass over the row tiles reads (AVX-512: 128 rows of a 64-column group, 32 KB).
const AXPY_K_BLOCK: usize = 128;

/// Column groups one copy of B takes at once (AVX-512: 512 columns, a 256 KB panel in L2).
const AXPY_PANEL_GROUPS: usize = 8;

/// From this many rows of A on (three row tiles), blocks of B are copied before the row tiles
/// read them; fewer read B in place, in one pass (`cargo bench --bench cpu_gemm`, gpt2 `c_fc`
/// forward: 12 rows 0.58 ms in place against 0.78 copied; 20 rows 0.97 in place, 0.70 copied).
const AXPY_PACK_ROWS: usize = 2 * AXPY_ROWS + 1;

std::thread_local! {
    /// Each thread's panel for [`axpy_packed`], kept between products.
    static PANEL: std::cell::RefCell<Vec<Line>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Full column groups with many rows of A, k in blocks of [`AXPY_K_BLOCK`] rows: each block of
/// up to [`AXPY_PANEL_GROUPS`] groups is copied into a panel (each group's rows back to back),
/// then every row tile of each group reads it there.
///
/// Why the copy: the row tiles of a group read the same rows of B, which in place lie a weight
/// row apart (12 KB for gpt2's `c_fc`), a multiple of 4 KB: every row of a block falls in the
/// same few L1 sets, so a block never stayed in L1 and each tile read it from L2 again (the
/// 32-row `c_fc` forward ran at about a third of the cores' multiply-add peak).
/// Why several groups per copy: a forward reads each weight once, from L3 or memory, and the
/// copy is where it is read. Copying one group's 256 bytes per row, a weight row apart, left the
/// hardware prefetchers nothing to follow (gpt2's four block products took 1.5x as long
/// streaming over the 12 blocks as repeating one block's); copying eight groups reads each row
/// in one 2 KB run, and the streamed products got 1.16-1.19x faster (`cargo bench --bench
/// cpu_gemm -- cpu_gemm_streamed`; BENCHMARKS.md, issue 19).
/// Each output's accumulator goes through C between blocks, which changes no bit: the
/// multiply-adds stay in the order of k.
#[inline(always)]
unsafe fn axpy_packed<S: Simd, const C: usize>(p: &Product, cols: Range<usize>) {
    let width = C * S::LANES;
    let chunk = AXPY_PANEL_GROUPS * width;
    // Taken out of the thread's slot and put back, not borrowed in a closure: a closure would
    // not inherit the caller's `target_feature`s, and every vector operation in it would become
    // a call (40x slower).
    let mut lines = PANEL.take();
    let panel_len = AXPY_K_BLOCK * chunk;
    if lines.len() * FLOATS_PER_LINE < panel_len {
        lines.resize(panel_len.div_ceil(FLOATS_PER_LINE), Line::default());
    }
    // In whole cache lines, so that every group's rows start on a line (a vector load that
    // straddles two lines costs two: the streamed block products 5-8% slower).
    let panel: &mut [f32] = bytemuck::cast_slice_mut(&mut lines);
    for c0 in cols.clone().step_by(chunk) {
        let groups = (cols.end.min(c0 + chunk) - c0) / width;
        let mut k0 = 0;
        // At least one pass, so that an empty k still writes C (zeros without accumulation).
        loop {
            let ks = k0..(k0 + AXPY_K_BLOCK).min(p.k);
            unsafe { pack_rows::<S>(p, c0, width, groups, ks.clone(), panel) };
            let from_c = p.accumulate || k0 > 0;
            for g in 0..groups {
                let b = BRows {
                    at: panel.as_ptr().wrapping_add(g * AXPY_K_BLOCK * width),
                    stride: width,
                    ahead: panel.as_ptr(),
                    ahead_rows: 0,
                    ahead_stride: 0,
                };
                let j0 = c0 + g * width;
                unsafe { axpy_row_tiles::<S, C>(p, j0, S::LANES, &b, ks.clone(), from_c) };
            }
            k0 = ks.end;
            if k0 >= p.k {
                break;
            }
        }
    }
    PANEL.set(lines);
}

/// Copies the rows `ks` of B's columns `c0 .. c0 + groups * width` into `panel`: group `g`'s
/// rows back to back from `g * AXPY_K_BLOCK * width`. Each row of B is read in one run.
#[inline(always)]
unsafe fn pack_rows<S: Simd>(
    p: &Product,
    c0: usize,
    width: usize,
    groups: usize,
    ks: Range<usize>,
    panel: &mut [f32],
) {
    assert!(ks.len() <= AXPY_K_BLOCK && panel.len() >= AXPY_K_BLOCK * width * groups);
    unsafe {
        for (t, kk) in ks.enumerate() {
            let row = p.b.add(kk * p.b_stride + c0);
            for g in 0..groups {
                let dst = panel.as_mut_ptr().add((g * AXPY_K_BLOCK + t) * width);
                let src = row.add(g * width);
                for v in (0..width).step_by(S::LANES) {
                    S::store(dst.add(v), S::load(src.add(v)));
                }
            }
        }
    }
}

/// One group of columns in place, every row of A, k in one pass (the first row tile prefetches
/// B's rows ahead).
#[inline(always)]
unsafe fn axpy_col_group<S: Simd, const C: usize>(p: &Product, j0: usize, last: usize) {
    let b = BRows {
        at: p.b.wrapping_add(j0),
        stride: p.b_stride,
        ahead: p.b.wrapping_add(j0 + AXPY_PREFETCH_ROWS * p.b_stride),
        ahead_rows: p.k.saturating_sub(AXPY_PREFETCH_ROWS),
        ahead_stride: p.b_stride,
    };
    unsafe { axpy_row_tiles::<S, C>(p, j0, last, &b, 0..p.k, p.accumulate) }
}

/// Every row tile of A over one group's rows `ks` of B.
#[inline(always)]
unsafe fn axpy_row_tiles<S: Simd, const C: usize>(
    p: &Product,
    j0: usize,
    last: usize,
    b: &BRows,
    ks: Range<usize>,
    from_c: bool,
) {
    let mut i = 0;
    unsafe {
        while i + AXPY_ROWS <= p.m {
            axpy_tile::<S, AXPY_ROWS, C>(p, i, j0, last, b, ks.clone(), from_c);
            i += AXPY_ROWS;
        }
        match p.m - i {
            1 => axpy_tile::<S, 1, C>(p, i, j0, last, b, ks, from_c),
            2 => axpy_tile::<S, 2, C>(p, i, j0, last, b, ks, from_c),
            3 => axpy_tile::<S, 3, C>(p, i, j0, last, b, ks, from_c),
            4 => axpy_tile::<S, 4, C>(p, i, j0, last, b, ks, from_c),
            5 => axpy_tile::<S, 5, C>(p, i, j0, last, b, ks, from_c),
            _ => {}
        }
    }
}

/// Rows of B as a tile reads them: row `t` of the block at `at + t * stride`. While reading row
/// `t`, the first row tile prefetches the row at `ahead + t * ahead_stride` in B, for `t` below
/// `ahead_rows`: in place, B's row `AXPY_PREFETCH_ROWS` further on; from a panel, nothing (a
/// prefetch of the next block there measured 5% slower: the copy's runs are what the hardware
/// prefetchers follow). (`ahead` is only a hint address, never read unless `ahead_rows > 0`.)
struct BRows {
    at: *const f32,
    stride: usize,
    ahead: *const f32,
    ahead_rows: usize,
    ahead_stride: usize,
}

/// `last`: how many lanes of the final vector are columns of C (`LANES` for a full group); `b`:
/// the rows `ks` of B's group; `from_c`: start from C's values (accumulation, or a later block
/// of k) instead of zero.
#[inline(always)]
unsafe fn axpy_tile<S: Simd, const R: usize, const C: usize>(
    p: &Product,
    i0: usize,
    j0: usize,
    last: usize,
    b: &BRows,
    ks: Range<usize>,
    from_c: bool,
) {
    let partial = last < S::LANES;
    unsafe {
        let mut a = [p.a; R];
        let mut out = [p.c; R];
        for r in 0..R {
            a[r] = p.a.add((i0 + r) * p.lda + ks.start);
            out[r] = p.c.add((i0 + r) * p.ldc + j0);
        }
        let mut acc = [[S::zero(); C]; R];
        if from_c {
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
        let prefetch = i0 == 0;
        for t in 0..ks.len() {
            let row = b.at.add(t * b.stride);
            if prefetch && t < b.ahead_rows {
                let ahead = b.ahead.add(t * b.ahead_stride);
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
                let av = S::splat(*a[r].add(t));
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
