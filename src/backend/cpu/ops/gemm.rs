//! Matrix products (twin of the cuBLAS calls in `backend/cuda/gemm.rs`): `x W` and its input and
//! weight gradients over a [`MatRef`] that knows the weight's layout, on the `gemm` crate or the
//! few-row kernels of `backend/cpu/skinny` when one side has few rows.

use super::super::skinny;
use super::Layout;

/// A borrowed weight matrix with its logical shape `in_dim x out_dim`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub in_dim: usize,
    pub out_dim: usize,
    pub layout: Layout,
}

impl MatRef<'_> {
    /// (row stride, column stride) of the logical `[in, out]` view.
    fn strides(&self) -> (isize, isize) {
        match self.layout {
            Layout::InOut => (self.out_dim as isize, 1),
            Layout::OutIn => (1, self.in_dim as isize),
        }
    }
}

/// Which product over a frozen weight: the forward `x W` or the input gradient `dy W^T`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forward,
    InputGrad,
}

impl Direction {
    /// The layout in which this product's B is row-major (what the `gemm` crate packs fastest).
    pub fn row_major_layout(self) -> Layout {
        match self {
            Direction::Forward => Layout::InOut,
            Direction::InputGrad => Layout::OutIn,
        }
    }

    /// `(n, k)` of the product and B's strides, for `w`.
    fn product(self, w: &MatRef) -> (usize, usize, (isize, isize)) {
        let (rs, cs) = w.strides();
        match self {
            Direction::Forward => (w.out_dim, w.in_dim, (rs, cs)),
            Direction::InputGrad => (w.in_dim, w.out_dim, (cs, rs)),
        }
    }
}

/// Whether a product of `m` rows over `w` in `dir` runs on the `gemm` crate (not the few-row
/// kernels).
pub fn on_gemm_crate(m: usize, w: &MatRef, dir: Direction) -> bool {
    let (n, k, b_strides) = dir.product(w);
    skinny_order(m, n, k, (k as isize, 1), b_strides).is_none()
}

fn gemm_parallelism(flops: usize) -> gemm::Parallelism {
    // Threading a tiny product costs more than it saves.
    if flops < 1 << 18 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(0)
    }
}

/// How B is laid out when a product goes to the few-rows kernels: A dense row-major, few rows, B
/// with contiguous columns or rows, and a B large enough that reading it is the cost.
fn skinny_order(
    m: usize,
    n: usize,
    k: usize,
    a_strides: (isize, isize),
    b_strides: (isize, isize),
) -> Option<skinny::BOrder> {
    let dense_a = a_strides == (k as isize, 1);
    if !skinny::enabled() || !dense_a || n * k < 1 << 16 {
        return None;
    }
    let order = match b_strides {
        (1, cs) if cs >= k as isize => skinny::BOrder::Columns {
            stride: cs as usize,
        },
        (rs, 1) if rs >= n as isize => skinny::BOrder::Rows {
            stride: rs as usize,
        },
        _ => return None,
    };
    (m <= order.max_rows()).then_some(order)
}

/// Checks a product's shapes against its slices; returns false when there is nothing to multiply
/// (after zeroing C for an empty inner dimension).
#[allow(clippy::too_many_arguments)]
fn check_product(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_strides: (isize, isize),
    b: &[f32],
    b_strides: (isize, isize),
    c: &mut [f32],
    accumulate: bool,
) -> bool {
    assert_eq!(
        c.len(),
        m * n,
        "gemm: output has {} elements, expected {m}x{n}",
        c.len()
    );
    if m == 0 || n == 0 {
        return false;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return false;
    }
    let max_index = |rows: usize, cols: usize, (rs, cs): (isize, isize)| {
        (rows as isize - 1) * rs + (cols as isize - 1) * cs
    };
    assert!(
        max_index(m, k, a_strides) < a.len() as isize,
        "gemm: A too small"
    );
    assert!(
        max_index(k, n, b_strides) < b.len() as isize,
        "gemm: B too small"
    );
    true
}

/// General product `C[m,n] (+)= A[m,k] B[k,n]` on strided views.
/// `a_strides`/`b_strides` are (row stride, column stride) in elements; C is dense row-major.
/// Few-row products with a contiguous B go to [`skinny`], the rest to the `gemm` crate.
#[allow(clippy::too_many_arguments)]
pub fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_strides: (isize, isize),
    b: &[f32],
    b_strides: (isize, isize),
    c: &mut [f32],
    accumulate: bool,
) {
    if !check_product(m, n, k, a, a_strides, b, b_strides, c, accumulate) {
        return;
    }
    match skinny_order(m, n, k, a_strides, b_strides) {
        Some(order) => skinny::gemm(m, n, k, a, b, order, c, accumulate),
        None => gemm_crate(m, n, k, a, a_strides, b, b_strides, c, accumulate),
    }
}

/// `gemm_strided` always through the `gemm` crate (public so benchmarks can compare the paths).
#[allow(clippy::too_many_arguments)]
pub fn gemm_general(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_strides: (isize, isize),
    b: &[f32],
    b_strides: (isize, isize),
    c: &mut [f32],
    accumulate: bool,
) {
    if check_product(m, n, k, a, a_strides, b, b_strides, c, accumulate) {
        gemm_crate(m, n, k, a, a_strides, b, b_strides, c, accumulate);
    }
}

/// The `gemm` crate on a product `check_product` accepted.
#[allow(clippy::too_many_arguments)]
fn gemm_crate(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_strides: (isize, isize),
    b: &[f32],
    b_strides: (isize, isize),
    c: &mut [f32],
    accumulate: bool,
) {
    crate::backend::cpu::flops::count_product(m, n, k);
    // SAFETY: `check_product` keep every index of A, B and C inside their slices; C does not
    // alias A or B (it is a distinct &mut borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_strides.1,
            a_strides.0,
            b.as_ptr(),
            b_strides.1,
            b_strides.0,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm_parallelism(m * n * k),
        );
    }
}

/// `out[m, out_dim] (+)= x[m, in_dim] W`.
pub fn matmul(x: &[f32], m: usize, w: MatRef, out: &mut [f32], accumulate: bool) {
    frozen_product(Direction::Forward, x, m, w, out, accumulate);
}

/// Gradient through a frozen linear layer: `dx[m, in_dim] (+)= dy[m, out_dim] W^T`.
pub fn matmul_input_grad(dy: &[f32], m: usize, w: MatRef, dx: &mut [f32], accumulate: bool) {
    frozen_product(Direction::InputGrad, dy, m, w, dx, accumulate);
}

/// A product over a frozen weight in direction `dir` ([`matmul`], [`matmul_input_grad`]), on the
/// path [`gemm_strided`] picks for it.
pub fn frozen_product(
    dir: Direction,
    x: &[f32],
    m: usize,
    w: MatRef,
    out: &mut [f32],
    accumulate: bool,
) {
    frozen_product_through(gemm_strided, dir, x, m, w, out, accumulate);
}

/// [`frozen_product`] always on the `gemm` crate: for a weight's copy in its other layout
/// ([`crate::backend::cpu::layout_copy`]), which must give the bits the checkpoint's layout gives
/// there, never the few-row kernels' (another summation order).
pub fn matmul_on_gemm_crate(
    dir: Direction,
    x: &[f32],
    m: usize,
    w: MatRef,
    out: &mut [f32],
    accumulate: bool,
) {
    frozen_product_through(gemm_general, dir, x, m, w, out, accumulate);
}

/// `gemm_strided`'s signature: `(m, n, k, A, A's strides, B, B's strides, C, accumulate)`.
type ProductPath =
    fn(usize, usize, usize, &[f32], (isize, isize), &[f32], (isize, isize), &mut [f32], bool);

fn frozen_product_through(
    path: ProductPath,
    dir: Direction,
    x: &[f32],
    m: usize,
    w: MatRef,
    out: &mut [f32],
    accumulate: bool,
) {
    let (n, k, b_strides) = dir.product(&w);
    assert_eq!(x.len(), m * k);
    path(
        m,
        n,
        k,
        x,
        (k as isize, 1),
        w.data,
        b_strides,
        out,
        accumulate,
    );
}

/// Weight gradient of `y = x W` with W stored `[in, out]`: `dw[in, out] (+)= x^T dy`.
pub fn matmul_weight_grad(
    x: &[f32],
    dy: &[f32],
    m: usize,
    in_dim: usize,
    out_dim: usize,
    dw: &mut [f32],
    accumulate: bool,
) {
    assert_eq!(x.len(), m * in_dim);
    assert_eq!(dy.len(), m * out_dim);
    gemm_strided(
        in_dim,
        out_dim,
        m,
        x,
        (1, in_dim as isize),
        dy,
        (out_dim as isize, 1),
        dw,
        accumulate,
    );
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::*;
    use super::*;

    #[test]
    fn few_row_products_match_a_naive_product_in_both_layouts_and_directions() {
        // Shapes off every block and lane multiple, large enough for the few-rows kernels; m = 17
        // and a tiny product take the general GEMM, checked the same way.
        let shapes = [
            (1, 300, 517),
            (5, 1029, 130),
            (16, 77, 1100),
            (17, 260, 300),
            (3, 9, 7),
        ];
        for (seed, &(m, in_dim, out_dim)) in shapes.iter().enumerate() {
            let data = random(in_dim * out_dim, 100 + seed as u64);
            for layout in [Layout::InOut, Layout::OutIn] {
                let w = MatRef {
                    data: &data,
                    in_dim,
                    out_dim,
                    layout,
                };
                for transpose in [false, true] {
                    let (k, n) = if transpose {
                        (out_dim, in_dim)
                    } else {
                        (in_dim, out_dim)
                    };
                    let x = random(m * k, 200 + seed as u64);
                    let want = naive_product(&x, m, &w, transpose);
                    for accumulate in [false, true] {
                        let start = random(m * n, 300 + seed as u64);
                        let mut out = if accumulate {
                            start.clone()
                        } else {
                            vec![f32::NAN; m * n]
                        };
                        if transpose {
                            matmul_input_grad(&x, m, w, &mut out, accumulate);
                        } else {
                            matmul(&x, m, w, &mut out, accumulate);
                        }
                        for (idx, (&got, &exp)) in out.iter().zip(&want).enumerate() {
                            let exp = exp + if accumulate { start[idx] as f64 } else { 0.0 };
                            assert!(
                                (got as f64 - exp).abs() <= 1e-4 * (1.0 + exp.abs()),
                                "m={m} {layout:?} transpose={transpose} acc={accumulate} [{idx}]: {got} vs {exp}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_layouts_agree_with_a_naive_product() {
        let (m, k, n) = (5, 7, 3);
        let x = random(m * k, 18);
        let w_in_out = random(k * n, 19);
        // The same matrix stored [out, in].
        let mut w_out_in = vec![0.0; k * n];
        for i in 0..k {
            for j in 0..n {
                w_out_in[j * k + i] = w_in_out[i * n + j];
            }
        }
        let naive: Vec<f32> = (0..m)
            .flat_map(|r| (0..n).map(move |c| (r, c)))
            .map(|(r, c)| (0..k).map(|i| x[r * k + i] * w_in_out[i * n + c]).sum())
            .collect();
        for (data, layout) in [(&w_in_out, Layout::InOut), (&w_out_in, Layout::OutIn)] {
            let w = MatRef {
                data,
                in_dim: k,
                out_dim: n,
                layout,
            };
            let mut out = vec![f32::NAN; m * n];
            matmul(&x, m, w, &mut out, false);
            for (a, b) in out.iter().zip(&naive) {
                assert!((a - b).abs() < 1e-5);
            }
            let dy = random(m * n, 20);
            let mut dx = vec![f32::NAN; m * k];
            matmul_input_grad(&dy, m, w, &mut dx, false);
            fd_check("matmul", &x, &dx, |x| {
                let mut o = vec![0.0; m * n];
                matmul(x, m, w, &mut o, false);
                dot(&o, &dy)
            });
        }
    }
}
