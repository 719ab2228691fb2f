//! A frozen weight's copy in its other layout, made where it lets the `gemm` crate run a product
//! faster with the same bits.
//!
//! The `gemm` crate packs B into panels before every product. When B is row-major (a forward
//! over an `[in, out]` weight, an input gradient over an `[out, in]` one) the packing copies
//! contiguous rows; when B is column-major (a Llama forward, a GPT-2 input gradient) it gathers
//! one element per row, and with a few hundred rows that gather is most of the product: on a
//! Zen 5 core pair SmolLM2's `down_proj` forward ran at 91 GFLOP/s with 80 rows and 259 with
//! 312, against 390 and 360 over the same weight stored transposed (BENCHMARKS.md, issue 19).
//! The panels hold the same numbers in the same order either way, so the product gives the
//! same bits (the tests below); products the few-row kernels take keep the checkpoint's
//! layout (their summation order depends on it).
//!
//! Memory: one more copy of each layer that runs such products, made on its first one, within a
//! process-wide budget (`ELDER_CPU_LAYOUT_COPY_MB`, default 2048 MB; 0 turns the copies off).
//! Past the budget a layer keeps its one layout and its products run as before.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use super::ops::{self, Direction, Layout, MatRef};

/// Bytes of weight copies a process may still make.
pub struct CopyBudget {
    left: AtomicUsize,
}

impl CopyBudget {
    pub const fn new(bytes: usize) -> Self {
        CopyBudget {
            left: AtomicUsize::new(bytes),
        }
    }

    /// Takes `bytes` from the budget; false (and nothing taken) when fewer are left.
    fn take(&self, bytes: usize) -> bool {
        self.left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(bytes)
            })
            .is_ok()
    }

    pub fn left(&self) -> usize {
        self.left.load(Ordering::Acquire)
    }
}

/// The process's budget, read once from `ELDER_CPU_LAYOUT_COPY_MB`.
pub fn process_budget() -> &'static CopyBudget {
    static BUDGET: OnceLock<CopyBudget> = OnceLock::new();
    BUDGET.get_or_init(|| {
        let mb = std::env::var("ELDER_CPU_LAYOUT_COPY_MB")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(2048);
        CopyBudget::new(mb << 20)
    })
}

/// A layer's weight in the layout other than its checkpoint's, made on first use. A clone starts
/// empty (a cloned layer's weight may be changed before it is used).
#[derive(Default)]
pub struct LayoutCopy(OnceLock<Option<Vec<f32>>>);

impl Clone for LayoutCopy {
    fn clone(&self) -> Self {
        LayoutCopy::default()
    }
}

impl std::fmt::Debug for LayoutCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.0.get() {
            None => "not made",
            Some(None) => "over budget",
            Some(Some(_)) => "made",
        };
        write!(f, "LayoutCopy({state})")
    }
}

impl LayoutCopy {
    /// The weight `w` in its other layout, when a product of `rows` rows in `dir` would run on
    /// the `gemm` crate with B column-major; made (within the process's budget) on first need.
    pub fn for_product(&self, rows: usize, w: &MatRef, dir: Direction) -> Option<MatRef<'_>> {
        self.for_product_within(rows, w, dir, process_budget())
    }

    /// [`LayoutCopy::for_product`] against a given budget.
    pub fn for_product_within(
        &self,
        rows: usize,
        w: &MatRef,
        dir: Direction,
        budget: &CopyBudget,
    ) -> Option<MatRef<'_>> {
        if w.layout == dir.row_major_layout() || !ops::on_gemm_crate(rows, w, dir) {
            return None;
        }
        let copy = self
            .0
            .get_or_init(|| {
                budget
                    .take(std::mem::size_of_val(w.data))
                    .then(|| transposed(w))
            })
            .as_ref()?;
        Some(MatRef {
            data: copy,
            in_dim: w.in_dim,
            out_dim: w.out_dim,
            layout: dir.row_major_layout(),
        })
    }

    /// The product `x W` or `dy W^T` (`dir`) over `w`: on the copy where it helps (made on first
    /// need), else on the checkpoint's layout. The same bits either way.
    pub fn run(
        &self,
        dir: Direction,
        x: &[f32],
        rows: usize,
        w: MatRef,
        out: &mut [f32],
        accumulate: bool,
    ) {
        match self.for_product(rows, &w, dir) {
            Some(copy) => ops::matmul_on_gemm_crate(dir, x, rows, copy, out, accumulate),
            None => ops::frozen_product(dir, x, rows, w, out, accumulate),
        }
    }

    /// Whether the copy was made.
    pub fn is_made(&self) -> bool {
        matches!(self.0.get(), Some(Some(_)))
    }
}

/// `w`'s data in the other layout (`[in, out]` <-> `[out, in]`).
fn transposed(w: &MatRef) -> Vec<f32> {
    let (rows, cols) = match w.layout {
        Layout::InOut => (w.in_dim, w.out_dim),
        Layout::OutIn => (w.out_dim, w.in_dim),
    };
    let mut t = vec![0.0f32; rows * cols];
    // In tiles, so that both sides are read and written a cache line at a time.
    const TILE: usize = 32;
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    t[c * rows + r] = w.data[r * cols + c];
                }
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::Linear;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2654435761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
            .collect()
    }

    fn layer(layout: Layout, in_dim: usize, out_dim: usize, seed: u32) -> Linear {
        Linear {
            weight: values(in_dim * out_dim, seed),
            bias: None,
            in_dim,
            out_dim,
            layout,
            layout_copy: LayoutCopy::default(),
        }
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// Row counts on both sides of the few-row kernels' limits (32 for a column-major B, 64
    /// for a row-major one) and well past them.
    const ROWS: [usize; 9] = [1, 7, 32, 33, 47, 64, 65, 130, 301];

    #[test]
    fn products_over_the_copy_give_the_checkpoint_layouts_bits() {
        // Wide enough that the few-row kernels take the small row counts (n k >= 2^16).
        let (d_in, d_out) = (192, 416);
        for layout in [Layout::InOut, Layout::OutIn] {
            let lin = layer(layout, d_in, d_out, 11);
            let budget = CopyBudget::new(usize::MAX);
            for rows in ROWS {
                for dir in [Direction::Forward, Direction::InputGrad] {
                    let (k, n) = match dir {
                        Direction::Forward => (d_in, d_out),
                        Direction::InputGrad => (d_out, d_in),
                    };
                    let x = values(rows * k, rows as u32);
                    let mat = lin.mat();
                    let mut reference = vec![0.0f32; rows * n];
                    match dir {
                        Direction::Forward => ops::matmul(&x, rows, mat, &mut reference, false),
                        Direction::InputGrad => {
                            ops::matmul_input_grad(&x, rows, mat, &mut reference, false)
                        }
                    }
                    let copy = lin.layout_copy.for_product_within(rows, &mat, dir, &budget);
                    // A copy exactly where the checkpoint's layout sends the product to the
                    // `gemm` crate with a column-major B.
                    let wanted =
                        layout != dir.row_major_layout() && ops::on_gemm_crate(rows, &mat, dir);
                    assert_eq!(copy.is_some(), wanted, "{layout:?} {dir:?} {rows} rows");
                    if let Some(copy) = copy {
                        assert_eq!(copy.layout, dir.row_major_layout());
                        let mut fast = vec![f32::NAN; rows * n];
                        ops::matmul_on_gemm_crate(dir, &x, rows, copy, &mut fast, false);
                        assert!(
                            same_bits(&fast, &reference),
                            "{layout:?} {dir:?} {rows} rows"
                        );
                        // Accumulating too.
                        let mut acc_ref = values(rows * n, 5);
                        let mut acc_fast = acc_ref.clone();
                        match dir {
                            Direction::Forward => ops::matmul(&x, rows, mat, &mut acc_ref, true),
                            Direction::InputGrad => {
                                ops::matmul_input_grad(&x, rows, mat, &mut acc_ref, true)
                            }
                        }
                        ops::matmul_on_gemm_crate(dir, &x, rows, copy, &mut acc_fast, true);
                        assert!(
                            same_bits(&acc_fast, &acc_ref),
                            "{layout:?} {dir:?} {rows} rows, accumulating"
                        );
                    }
                    // The layer's own products (the process's budget) give the same bits.
                    let mut out = vec![0.0f32; rows * n];
                    match dir {
                        Direction::Forward => out = lin.forward(&x, rows),
                        Direction::InputGrad => lin.backward_input(&x, rows, &mut out, false),
                    }
                    assert!(
                        same_bits(&out, &reference),
                        "Linear {layout:?} {dir:?} {rows} rows"
                    );
                }
            }
        }
    }

    #[test]
    fn the_copy_is_the_transpose_and_is_made_once() {
        let (d_in, d_out) = (70, 33);
        for layout in [Layout::InOut, Layout::OutIn] {
            let lin = layer(layout, d_in, d_out, 3);
            let t = transposed(&lin.mat());
            let (rows, cols) = match layout {
                Layout::InOut => (d_in, d_out),
                Layout::OutIn => (d_out, d_in),
            };
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], lin.weight[r * cols + c]);
                }
            }
            // A product the copy helps makes it, once: the budget pays for it once.
            let dir = match layout {
                Layout::InOut => Direction::InputGrad,
                Layout::OutIn => Direction::Forward,
            };
            let bytes = 4 * d_in * d_out;
            let budget = CopyBudget::new(bytes + 10);
            assert!(!lin.layout_copy.is_made());
            assert!(lin
                .layout_copy
                .for_product_within(500, &lin.mat(), dir, &budget)
                .is_some());
            assert!(lin
                .layout_copy
                .for_product_within(600, &lin.mat(), dir, &budget)
                .is_some());
            assert!(lin.layout_copy.is_made());
            assert_eq!(budget.left(), 10);
            // A clone starts without it (its weight may change before use).
            assert!(!lin.clone().layout_copy.is_made());
        }
    }

    #[test]
    fn past_the_budget_a_layer_keeps_one_layout() {
        let lin = layer(Layout::OutIn, 96, 800, 9);
        let budget = CopyBudget::new(4 * 96 * 800 - 1);
        let rows = 200;
        assert!(ops::on_gemm_crate(rows, &lin.mat(), Direction::Forward));
        assert!(lin
            .layout_copy
            .for_product_within(rows, &lin.mat(), Direction::Forward, &budget)
            .is_none());
        assert!(!lin.layout_copy.is_made());
        assert_eq!(budget.left(), 4 * 96 * 800 - 1, "nothing taken");
        // Decided once: a later product does not try again.
        let roomy = CopyBudget::new(usize::MAX);
        assert!(lin
            .layout_copy
            .for_product_within(rows, &lin.mat(), Direction::Forward, &roomy)
            .is_none());
    }
}
