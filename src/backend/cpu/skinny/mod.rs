//! Products with few rows, `C[m, n] (+)= A[m, k] B[k, n]` for `m` up to [`MAX_ROWS`], where B is a
//! frozen weight read straight from where it lies.
//!
//! Editing runs a dozen tokens through frozen layers fifty times per edit, so most products have
//! m ~ 10 and a weight matrix of megabytes: the time is in reading B. A general GEMM first packs B
//! into panels, which for such m costs as much as the product itself. These kernels read B once,
//! in place, in either storage order:
//! - [`BOrder::Columns`]: B's columns contiguous (`[out, in]` weights used as `x W^T`: Llama's
//!   projections and the lm_head; `[in, out]` weights in the backward pass: GPT-2's input
//!   gradients). Each output is a dot product.
//! - [`BOrder::Rows`]: B's rows contiguous (`[in, out]` weights forward: GPT-2; `[out, in]` weights
//!   backward: Llama's input gradients). Each output row is a sum of scaled rows of B.
//!
//! The tiles ([`tiles`]) are compiled for AVX-512, AVX2+FMA and portable code ([`simd`]); the
//! widest the CPU has is picked once at run time. Columns are split into blocks across rayon tasks;
//! each output's summation order depends only on k and the vector width, so a product gives the
//! same bits on every run on a machine (the AVX variants fuse multiply-adds, the portable one does
//! not, so they differ from each other in the last bits).

mod simd;
mod tiles;

use std::ops::Range;

use rayon::prelude::*;

use tiles::Product;

/// Whether the kernels are in use: `ELDER_FEW_ROW_KERNEL=0` turns them off, so that whole-edit
/// benchmarks can compare them with the `gemm` crate in the same build.
pub fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("ELDER_FEW_ROW_KERNEL").map_or(true, |v| v != "0"))
}

/// Largest row count the dot form takes (the axpy form: [`AXPY_MAX_ROWS`]).
pub const MAX_ROWS: usize = 32;

/// Largest row count the axpy form takes: its packed path beats the `gemm` crate by 2.2x at 64
/// rows of gpt2's `c_fc` forward and ties it at 128 (`cargo bench --bench cpu_gemm`).
pub const AXPY_MAX_ROWS: usize = 64;

/// How B's entries `B[kk, j]` are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BOrder {
    /// `B[kk, j]` at `j * stride + kk`.
    Columns { stride: usize },
    /// `B[kk, j]` at `kk * stride + j`.
    Rows { stride: usize },
}

impl BOrder {
    /// Largest row count worth sending to this form; above it the general GEMM's packing pays for
    /// itself (measured with `cargo bench --bench cpu_gemm`: the dot form wins by 4x at 32 rows of
    /// gpt2's `c_fc` input gradient; the axpy form, which copies blocks of B from 13 rows on,
    /// wins by 2x at 32 and 64 rows of its forward).
    pub fn max_rows(self) -> usize {
        match self {
            BOrder::Columns { .. } => MAX_ROWS,
            BOrder::Rows { .. } => AXPY_MAX_ROWS,
        }
    }
}

/// The instruction set the kernels run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Isa {
    fn best() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f") {
                    return Isa::Avx512;
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    return Isa::Avx2;
                }
            }
            Isa::Portable
        })
    }

    /// Every instruction set this CPU can run (for tests).
    #[cfg(test)]
    fn available() -> Vec<Isa> {
        let mut all = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                all.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                all.push(Isa::Avx512);
            }
        }
        all
    }

    /// Columns a task's block is a multiple of (one full tile group), per form.
    fn column_unit(self, order: BOrder) -> usize {
        match (self, order) {
            (_, BOrder::Columns { .. }) => 4,
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, BOrder::Rows { .. }) => 4 * 16,
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, BOrder::Rows { .. }) => 2 * 8,
            (Isa::Portable, BOrder::Rows { .. }) => 2 * 8,
        }
    }

    /// Runs the product on the columns `cols` on this thread.
    ///
    /// # Safety
    /// The CPU has this instruction set, and `p` is valid for every index of these columns.
    unsafe fn run(self, p: &Product, order: BOrder, cols: Range<usize>) {
        let dot = matches!(order, BOrder::Columns { .. });
        unsafe {
            match self {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 if dot => dot_avx512(p, cols),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => axpy_avx512(p, cols),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 if dot => dot_avx2(p, cols),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => axpy_avx2(p, cols),
                Isa::Portable if dot => tiles::dot_cols::<simd::Portable, 2>(p, cols),
                Isa::Portable => tiles::axpy_cols::<simd::Portable, 2>(p, cols),
            }
        }
    }
}

// The tile shapes per instruction set: accumulators plus operands fit the register file
// (AVX-512: 32 registers, dot 4x4 and axpy 6x4; AVX2: 16 registers, dot 4x2 and axpy 6x2).

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot_avx512(p: &Product, cols: Range<usize>) {
    unsafe { tiles::dot_cols::<simd::Avx512, 4>(p, cols) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn axpy_avx512(p: &Product, cols: Range<usize>) {
    unsafe { tiles::axpy_cols::<simd::Avx512, 4>(p, cols) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(p: &Product, cols: Range<usize>) {
    unsafe { tiles::dot_cols::<simd::Avx2, 2>(p, cols) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(p: &Product, cols: Range<usize>) {
    unsafe { tiles::axpy_cols::<simd::Avx2, 2>(p, cols) }
}

/// Checks every buffer against the shapes and builds the raw product.
#[allow(clippy::too_many_arguments)]
fn product(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    order: BOrder,
    c: &mut [f32],
    accumulate: bool,
) -> Product {
    assert!(
        m <= order.max_rows(),
        "few-row product with {m} rows ({order:?} takes at most {})",
        order.max_rows()
    );
    assert!(lda >= k, "A's row stride {lda} is shorter than k = {k}");
    assert!(
        m == 0 || a.len() >= (m - 1) * lda + k,
        "A has {} elements, too few for {m} rows of stride {lda}",
        a.len()
    );
    assert_eq!(
        c.len(),
        m * n,
        "C has {} elements, expected {m}x{n}",
        c.len()
    );
    let (b_stride, b_needed) = match order {
        BOrder::Columns { stride } => (stride, n.saturating_sub(1) * stride + k),
        BOrder::Rows { stride } => (stride, k.saturating_sub(1) * stride + n),
    };
    let contiguous_len = match order {
        BOrder::Columns { .. } => k,
        BOrder::Rows { .. } => n,
    };
    assert!(b_stride >= contiguous_len, "B's stride {b_stride} overlaps");
    assert!(
        n == 0 || k == 0 || b.len() >= b_needed,
        "B has {} elements, needs {b_needed}",
        b.len()
    );
    Product {
        m,
        k,
        a: a.as_ptr(),
        lda,
        b: b.as_ptr(),
        b_stride,
        c: c.as_mut_ptr(),
        ldc: n,
        accumulate,
    }
}

/// A's rows copied so that each starts on a cache line.
struct AlignedRows {
    lines: Vec<tiles::Line>,
    lda: usize,
}

impl AlignedRows {
    fn view(&self) -> (&[f32], usize) {
        (bytemuck::cast_slice(&self.lines), self.lda)
    }
}

/// For the dot form, a copy of A whose rows start on cache lines, unless they already do. Its
/// tiles load a vector of every row of A per step, and a load that straddles two lines costs
/// two: with A at the allocator's usual 16-byte offset, the 32-row gpt2 lm_head took 1.2x as
/// long (BENCHMARKS.md, issue 19). A is a few rows, so the copy is small next to the product; B
/// (the weight) is read once per tile column and mattered less. The values and their summation
/// order are the same, so the product's bits are too. A too short for its shape is left to
/// [`product`] to refuse.
fn aligned_rows_for(
    order: BOrder,
    a: &[f32],
    m: usize,
    k: usize,
    lda: usize,
) -> Option<AlignedRows> {
    let line = tiles::FLOATS_PER_LINE;
    let on_lines = (a.as_ptr() as usize).is_multiple_of(std::mem::align_of::<tiles::Line>())
        && (m <= 1 || lda.is_multiple_of(line));
    let fits = a.len() >= (m.max(1) - 1) * lda + k;
    if !matches!(order, BOrder::Columns { .. }) || on_lines || m == 0 || k == 0 || !fits {
        return None;
    }
    let stride = k.next_multiple_of(line);
    let mut lines = vec![tiles::Line::default(); m * stride / line];
    let copy: &mut [f32] = bytemuck::cast_slice_mut(&mut lines);
    for (row, dst) in copy.chunks_exact_mut(stride).enumerate() {
        dst[..k].copy_from_slice(&a[row * lda..row * lda + k]);
    }
    Some(AlignedRows { lines, lda: stride })
}

/// `C[m, n] (+)= A[m, k] B[k, n]` with A (row stride `k`) and C dense row-major, threaded over
/// column blocks with rayon. `m` must be at most [`MAX_ROWS`].
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
    gemm_on(Isa::best(), m, n, k, a, b, order, c, accumulate, true)
}

/// [`gemm`] on the calling thread only, with A's row stride `lda` (for callers that are already
/// one task of a parallel loop).
#[allow(clippy::too_many_arguments)]
pub fn gemm_serial(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    order: BOrder,
    c: &mut [f32],
    accumulate: bool,
) {
    let aligned = aligned_rows_for(order, a, m, k, lda);
    let (a, lda) = aligned.as_ref().map_or((a, lda), AlignedRows::view);
    let p = product(m, n, k, a, lda, b, order, c, accumulate);
    super::flops::count_product(m, n, k);
    if m > 0 && n > 0 {
        // SAFETY: `product` checked the buffers for all n columns; the ISA is the CPU's.
        unsafe { Isa::best().run(&p, order, 0..n) }
    }
}

#[allow(clippy::too_many_arguments)]
fn gemm_on(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    order: BOrder,
    c: &mut [f32],
    accumulate: bool,
    threaded: bool,
) {
    let aligned = aligned_rows_for(order, a, m, k, k);
    let (a, lda) = aligned.as_ref().map_or((a, k), AlignedRows::view);
    let p = product(m, n, k, a, lda, b, order, c, accumulate);
    super::flops::count_product(m, n, k);
    if m == 0 || n == 0 {
        return;
    }
    // Blocks of whole tile groups, about four per thread so that uneven progress evens out.
    let unit = isa.column_unit(order);
    let tasks = if threaded {
        4 * rayon::current_num_threads()
    } else {
        1
    };
    let block = n.div_ceil(tasks).div_ceil(unit).max(1) * unit;
    let blocks = n.div_ceil(block);
    // SAFETY (both branches): `product` checked A, B and C for all n columns; tasks write
    // disjoint column ranges of C; `isa` is one this CPU has (`best` or a test's `available`).
    if blocks == 1 {
        unsafe { isa.run(&p, order, 0..n) }
    } else {
        (0..blocks).into_par_iter().for_each(|blk| {
            let cols = blk * block..((blk + 1) * block).min(n);
            unsafe { isa.run(&p, order, cols) }
        });
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

    /// `B[kk, j]` for either order.
    fn b_at(b: &[f32], order: BOrder, kk: usize, j: usize) -> f32 {
        match order {
            BOrder::Columns { stride } => b[j * stride + kk],
            BOrder::Rows { stride } => b[kk * stride + j],
        }
    }

    /// Checks C against the product in f64, within the rounding of a k-term f32 sum.
    #[allow(clippy::too_many_arguments)]
    fn assert_matches_naive(
        what: &str,
        (m, n, k): (usize, usize, usize),
        a: &[f32],
        b: &[f32],
        order: BOrder,
        start: &[f32],
        accumulate: bool,
        c: &[f32],
    ) {
        for i in 0..m {
            for j in 0..n {
                let (mut want, mut scale) = if accumulate {
                    (start[i * n + j] as f64, start[i * n + j].abs() as f64)
                } else {
                    (0.0, 0.0)
                };
                for kk in 0..k {
                    let t = a[i * k + kk] as f64 * b_at(b, order, kk, j) as f64;
                    want += t;
                    scale += t.abs();
                }
                let got = c[i * n + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-6 * scale + 1e-7,
                    "{what} acc={accumulate} m{m} n{n} k{k} [{i},{j}]: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn every_instruction_set_matches_a_naive_product() {
        // Shapes hit every tile size and tail: rows 1..=13 (dot tiles of 4, axpy tiles of 6),
        // k off the vector width, columns off the groups, padded strides, accumulation.
        for isa in Isa::available() {
            // 45 rows only in the axpy form (the dot form stops at 32), with k in three blocks.
            for &(m, n, k) in &[
                (1, 5, 3),
                (5, 70, 37),
                (13, 131, 301),
                (32, 100, 64),
                (45, 150, 301),
            ] {
                for order in [
                    BOrder::Columns { stride: k + 3 },
                    BOrder::Rows { stride: n + 5 },
                ] {
                    if m > order.max_rows() {
                        continue;
                    }
                    for accumulate in [false, true] {
                        let a = values(m * k, 1);
                        let b = values((n + 5) * (k + 3), 2);
                        let start = values(m * n, 3);
                        let mut c = start.clone();
                        gemm_on(isa, m, n, k, &a, &b, order, &mut c, accumulate, true);
                        let what = format!("{isa:?} {order:?}");
                        assert_matches_naive(
                            &what,
                            (m, n, k),
                            &a,
                            &b,
                            order,
                            &start,
                            accumulate,
                            &c,
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_column_split() {
        // Threaded (blocks of columns), single task and the serial entry give the same bits.
        let (m, n, k) = (11, 517, 203);
        let a = values(m * k, 4);
        let b = values(n * k, 5);
        for isa in Isa::available() {
            for order in [BOrder::Columns { stride: k }, BOrder::Rows { stride: n }] {
                let mut threaded = vec![0.0; m * n];
                let mut single = vec![0.0; m * n];
                gemm_on(isa, m, n, k, &a, &b, order, &mut threaded, false, true);
                gemm_on(isa, m, n, k, &a, &b, order, &mut single, false, false);
                assert_eq!(threaded, single, "{isa:?} {order:?}");
            }
        }
    }

    #[test]
    fn panels_of_several_column_groups_match_a_naive_product() {
        // From 13 rows on the axpy form copies B in panels of up to eight column groups; one task
        // over 1100 columns takes two full panels, a panel of one group and a masked tail, with
        // k in three blocks. The threaded split (other panels) gives the same bits.
        let (m, n, k) = (20, 1100, 301);
        let a = values(m * k, 8);
        let b = values(k * (n + 7), 9);
        let order = BOrder::Rows { stride: n + 7 };
        for isa in Isa::available() {
            for accumulate in [false, true] {
                let start = values(m * n, 10);
                let (mut single, mut threaded) = (start.clone(), start.clone());
                gemm_on(isa, m, n, k, &a, &b, order, &mut single, accumulate, false);
                gemm_on(isa, m, n, k, &a, &b, order, &mut threaded, accumulate, true);
                assert_eq!(single, threaded, "{isa:?} acc={accumulate}");
                let what = format!("{isa:?}");
                let shape = (m, n, k);
                assert_matches_naive(&what, shape, &a, &b, order, &start, accumulate, &single);
            }
        }
    }

    #[test]
    fn serial_entry_honours_the_row_stride_of_a() {
        let (m, n, k, lda) = (3, 40, 20, 29);
        let a = values(m * lda, 6);
        let dense: Vec<f32> = (0..m)
            .flat_map(|i| a[i * lda..i * lda + k].to_vec())
            .collect();
        let b = values(n * k, 7);
        let order = BOrder::Columns { stride: k };
        let (mut strided, mut packed) = (vec![0.0; m * n], vec![0.0; m * n]);
        gemm_serial(m, n, k, &a, lda, &b, order, &mut strided, false);
        gemm(m, n, k, &dense, &b, order, &mut packed, false);
        assert_eq!(strided, packed);
    }

    #[test]
    fn the_dot_form_gives_the_same_bits_wherever_a_lies() {
        // A at every float offset within a cache line (aligned rows read in place, the others
        // copied onto lines first), through both entries, with a row stride off the line length
        // in the serial one: every result is the naive product and the same bits as A on a line.
        let (m, n, k) = (7, 36, 45);
        let b = values(n * k, 9);
        let order = BOrder::Columns { stride: k };
        let dense = values(m * k, 8);
        let mut first: Option<Vec<f32>> = None;
        let widest = tiles::FLOATS_PER_LINE + (m - 1) * (k + 3) + k;
        let mut buffer = vec![tiles::Line::default(); widest.div_ceil(tiles::FLOATS_PER_LINE)];
        let flat: &mut [f32] = bytemuck::cast_slice_mut(&mut buffer);
        for offset in 0..tiles::FLOATS_PER_LINE {
            for lda in [k, k + 3] {
                for i in 0..m {
                    let row = offset + i * lda;
                    flat[row..row + k].copy_from_slice(&dense[i * k..(i + 1) * k]);
                }
                let a = &flat[offset..offset + (m - 1) * lda + k];
                let mut c = vec![0.0; m * n];
                if lda == k {
                    gemm(m, n, k, a, &b, order, &mut c, false);
                } else {
                    gemm_serial(m, n, k, a, lda, &b, order, &mut c, false);
                }
                let what = format!("A at float {offset} of a line, row stride {lda}");
                assert_matches_naive(&what, (m, n, k), &dense, &b, order, &[], false, &c);
                match &first {
                    None => first = Some(c),
                    Some(want) => assert_eq!(&c, want, "{what}"),
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "B has")]
    fn a_short_b_is_refused() {
        let (m, n, k) = (2, 8, 8);
        let mut c = vec![0.0; m * n];
        gemm(
            m,
            n,
            k,
            &values(m * k, 1),
            &values(n * k - 1, 2),
            BOrder::Rows { stride: n },
            &mut c,
            false,
        );
    }
}
