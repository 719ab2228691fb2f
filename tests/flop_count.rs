//! The CPU products' operation count (`backend::cpu::flops`): every product path adds its
//! `2 m n k` exactly once. One test in its own process, so no other test's products run while
//! it reads the process-wide count.

use elder::backend::cpu::flops::flops_so_far;
use elder::backend::cpu::linear_ce::linear_cross_entropy;
use elder::backend::cpu::ops::{gemm_strided, matmul, matmul_input_grad, Layout, MatRef};

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2654435761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
        .collect()
}

/// The operations `work` added to the count.
fn counted(work: impl FnOnce()) -> u64 {
    let before = flops_so_far();
    work();
    flops_so_far() - before
}

#[test]
fn every_product_path_counts_its_operations_once() {
    let (d, out) = (96, 1200);
    let w_data = values(d * out, 7);
    for layout in [Layout::InOut, Layout::OutIn] {
        let w = MatRef {
            data: &w_data,
            in_dim: d,
            out_dim: out,
            layout,
        };
        // Few rows (the few-row kernels) and many rows (the `gemm` crate), both directions.
        for m in [1, 5, 31, 200] {
            let x = values(m * d, m as u32);
            let mut y = vec![0.0f32; m * out];
            assert_eq!(
                counted(|| matmul(&x, m, w, &mut y, false)),
                (2 * m * d * out) as u64,
                "forward, {m} rows, {layout:?}"
            );
            let mut dx = vec![0.0f32; m * d];
            assert_eq!(
                counted(|| matmul_input_grad(&y, m, w, &mut dx, true)),
                (2 * m * d * out) as u64,
                "input gradient, {m} rows, {layout:?}"
            );
        }
    }
    // A strided product that no special kernel takes.
    let (m, n, k) = (17, 40, 23);
    let (a, b) = (values(m * k * 2, 1), values(k * n, 2));
    let mut c = vec![0.0f32; m * n];
    assert_eq!(
        counted(|| gemm_strided(
            m,
            n,
            k,
            &a,
            (2 * k as isize, 2),
            &b,
            (1, k as isize),
            &mut c,
            false
        )),
        (2 * m * n * k) as u64
    );
    // The fused head loss: the logits and the input gradient, each a product over the vocabulary.
    let (vocab, rows) = (5000, 37);
    let head = values(vocab * d, 3);
    let w = MatRef {
        data: &head,
        in_dim: d,
        out_dim: vocab,
        layout: Layout::OutIn,
    };
    let x = values(rows * d, 4);
    let targets: Vec<u32> = (0..rows as u32).map(|r| r * 131 % vocab as u32).collect();
    let mut dx = vec![0.0f32; rows * d];
    assert_eq!(
        counted(|| {
            linear_cross_entropy(&x, w, &targets, 1.0, &mut dx);
        }),
        (4 * rows * d * vocab) as u64
    );
}
