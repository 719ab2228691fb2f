//! Few-row products of the edit loop, side by side: the few-rows kernels (`gemm_strided`'s
//! choice) against the `gemm` crate (`gemm_general`) on the same inputs.
//! Shapes: gpt2-124m `c_fc` ([in, out], 768 -> 3072) forward (B rows contiguous) and input gradient
//! (B columns contiguous), SmolLM2 `down_proj` ([out, in], 1536 -> 576) forward (columns) and input
//! gradient (rows), a tied lm_head ([vocab, d]) on 3 and 32 rows; 12 rows (a SmolLM2 edit), 20 (the
//! `cpu_edit` bench) and 32 (the few-row limit).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use elder::backend::cpu::linear_ce::linear_cross_entropy_rows;
use elder::backend::cpu::ops::{gemm_general, gemm_strided, Layout, MatRef};

struct Case {
    name: &'static str,
    m: usize,
    n: usize,
    k: usize,
    /// Strides of the logical `[k, n]` B.
    b_strides: (isize, isize),
}

fn bench_gemm(c: &mut Criterion) {
    let cases = [
        Case {
            name: "gpt2 c_fc fwd",
            m: 12,
            n: 3072,
            k: 768,
            b_strides: (3072, 1),
        },
        Case {
            name: "gpt2 c_fc dx",
            m: 12,
            n: 768,
            k: 3072,
            b_strides: (1, 3072),
        },
        Case {
            name: "smollm2 down_proj fwd",
            m: 12,
            n: 576,
            k: 1536,
            b_strides: (1, 1536),
        },
        Case {
            name: "smollm2 down_proj dx",
            m: 12,
            n: 1536,
            k: 576,
            b_strides: (1536, 1),
        },
        Case {
            name: "gpt2 c_fc fwd 20 rows",
            m: 20,
            n: 3072,
            k: 768,
            b_strides: (3072, 1),
        },
        Case {
            name: "gpt2 c_fc dx 20 rows",
            m: 20,
            n: 768,
            k: 3072,
            b_strides: (1, 3072),
        },
        Case {
            name: "gpt2 c_fc fwd 32 rows",
            m: 32,
            n: 3072,
            k: 768,
            b_strides: (3072, 1),
        },
        Case {
            name: "gpt2 c_attn fwd 32 rows",
            m: 32,
            n: 2304,
            k: 768,
            b_strides: (2304, 1),
        },
        Case {
            name: "gpt2 attn c_proj fwd 32 rows",
            m: 32,
            n: 768,
            k: 768,
            b_strides: (768, 1),
        },
        Case {
            name: "gpt2 mlp c_proj fwd 32 rows",
            m: 32,
            n: 768,
            k: 3072,
            b_strides: (768, 1),
        },
        Case {
            name: "smollm2 up_proj fwd 32 rows",
            m: 32,
            n: 1536,
            k: 576,
            b_strides: (1, 576),
        },
        Case {
            name: "gpt2 c_fc fwd 64 rows",
            m: 64,
            n: 3072,
            k: 768,
            b_strides: (3072, 1),
        },
        Case {
            name: "gpt2 c_fc fwd 128 rows",
            m: 128,
            n: 3072,
            k: 768,
            b_strides: (3072, 1),
        },
        Case {
            name: "gpt2 lm_head 32 rows",
            m: 32,
            n: 50257,
            k: 768,
            b_strides: (1, 768),
        },
        Case {
            name: "gpt2 c_fc dx 32 rows",
            m: 32,
            n: 768,
            k: 3072,
            b_strides: (1, 3072),
        },
        Case {
            name: "gpt2 lm_head 3 rows",
            m: 3,
            n: 50257,
            k: 768,
            b_strides: (1, 768),
        },
    ];
    let mut group = c.benchmark_group("cpu_gemm_few_rows");
    group.sample_size(30);
    for case in &cases {
        let a: Vec<f32> = (0..case.m * case.k)
            .map(|i| (i % 97) as f32 * 0.01)
            .collect();
        let b: Vec<f32> = (0..case.n * case.k)
            .map(|i| (i % 89) as f32 * 0.01)
            .collect();
        let mut out = vec![0.0f32; case.m * case.n];
        let a_strides = (case.k as isize, 1);
        group.bench_function(BenchmarkId::new("few_rows", case.name), |bch| {
            bch.iter(|| {
                gemm_strided(
                    case.m,
                    case.n,
                    case.k,
                    &a,
                    a_strides,
                    &b,
                    case.b_strides,
                    &mut out,
                    false,
                )
            })
        });
        group.bench_function(BenchmarkId::new("gemm_crate", case.name), |bch| {
            bch.iter(|| {
                gemm_general(
                    case.m,
                    case.n,
                    case.k,
                    &a,
                    a_strides,
                    &b,
                    case.b_strides,
                    &mut out,
                    false,
                )
            })
        });
    }
    group.finish();
}

/// The forward's 32-row products as a forward meets them: each weight read from memory, not from
/// the 36 MB L3 that holds one repeated weight (a gpt2 forward streams 494 MB of weights). Each
/// iteration takes the next of eight copies of B (more than twice the L3).
fn bench_gemm_cold(c: &mut Criterion) {
    let cases = [
        ("gpt2 c_fc fwd 32 rows", 32, 3072, 768, (3072isize, 1isize)),
        ("gpt2 mlp c_proj fwd 32 rows", 32, 768, 3072, (768, 1)),
        ("smollm2 up_proj fwd 32 rows", 32, 1536, 576, (1, 576)),
    ];
    let mut group = c.benchmark_group("cpu_gemm_cold_weights");
    group.sample_size(30);
    for (name, m, n, k, b_strides) in cases {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 97) as f32 * 0.01).collect();
        let copies: Vec<Vec<f32>> = (0..8)
            .map(|s| (0..n * k).map(|i| ((i + s) % 89) as f32 * 0.01).collect())
            .collect();
        let mut out = vec![0.0f32; m * n];
        let mut next = 0;
        group.bench_function(BenchmarkId::new("few_rows", name), |bch| {
            bch.iter(|| {
                next = (next + 1) % copies.len();
                let b = &copies[next];
                gemm_strided(m, n, k, &a, (k as isize, 1), b, b_strides, &mut out, false)
            })
        });
        group.bench_function(BenchmarkId::new("gemm_crate", name), |bch| {
            bch.iter(|| {
                next = (next + 1) % copies.len();
                let b = &copies[next];
                gemm_general(m, n, k, &a, (k as isize, 1), b, b_strides, &mut out, false)
            })
        });
    }
    group.finish();
}

/// gpt2's four block products at 32 rows over 12 blocks of distinct weights (340 MB), one pass
/// per iteration, as a 32-token forward reads them: each weight comes from L3 or memory, which
/// the repeated single products above (weights kept in cache) do not show. With one group of B
/// copied per run (2026-12-06) the streamed products took 1.5x their cached time.
fn bench_gemm_streamed(c: &mut Criterion) {
    // (n, k) of c_attn, attn c_proj, c_fc, mlp c_proj; B is `[k, n]` with rows contiguous.
    let shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)];
    let m = 32;
    let blocks: Vec<Vec<Vec<f32>>> = (0..12)
        .map(|l| {
            shapes
                .iter()
                .map(|&(n, k)| (0..n * k).map(|i| ((i + l) % 89) as f32 * 0.01).collect())
                .collect()
        })
        .collect();
    let a: Vec<f32> = (0..m * 3072).map(|i| (i % 97) as f32 * 0.01).collect();
    let mut out = vec![0.0f32; m * 3072];
    let mut group = c.benchmark_group("cpu_gemm_streamed");
    group.sample_size(20);
    type Product =
        fn(usize, usize, usize, &[f32], (isize, isize), &[f32], (isize, isize), &mut [f32], bool);
    let kernels: [(&str, Product); 2] = [("few_rows", gemm_strided), ("gemm_crate", gemm_general)];
    for (name, product) in kernels {
        group.bench_function(
            BenchmarkId::new(name, "gpt2 12 blocks x 4 products, 32 rows"),
            |bch| {
                bch.iter(|| {
                    for block in &blocks {
                        for (&(n, k), b) in shapes.iter().zip(block) {
                            let c = &mut out[..m * n];
                            product(
                                m,
                                n,
                                k,
                                &a[..m * k],
                                (k as isize, 1),
                                b,
                                (n as isize, 1),
                                c,
                                false,
                            );
                        }
                    }
                })
            },
        );
    }
    group.finish();
}

/// The rate the products reach when arithmetic, not memory, is their cost: a square product and
/// SmolLM2's block products at the row count of a batch of eight default-preset edits (about 300
/// rows), weights in cache. Reported as GFLOP/s (criterion's elements per second are operations).
/// `elder edit`'s summary line gives the rate its iterations ran at: the two together say how far
/// an edit is from what these cores can compute (BENCHMARKS.md, issue 19).
fn bench_gemm_peak(c: &mut Criterion) {
    let cases = [
        ("square 1024", 1024, 1024, 1024, (1024isize, 1isize)),
        ("smollm2 up_proj fwd 312 rows", 312, 1536, 576, (1, 576)),
        ("smollm2 down_proj fwd 312 rows", 312, 576, 1536, (1, 1536)),
        ("smollm2 down_proj dx 312 rows", 312, 1536, 576, (1536, 1)),
        // The forward over the weight's transposed copy (`backend::cpu::layout_copy`, what a
        // layer uses from 33 rows on): B row-major, the same bits.
        (
            "smollm2 down_proj fwd 312 rows, transposed copy",
            312,
            576,
            1536,
            (576, 1),
        ),
        ("smollm2 down_proj fwd 80 rows", 80, 576, 1536, (1, 1536)),
        (
            "smollm2 down_proj fwd 80 rows, transposed copy",
            80,
            576,
            1536,
            (576, 1),
        ),
    ];
    let mut group = c.benchmark_group("cpu_gemm_peak");
    group.sample_size(20);
    for (name, m, n, k, b_strides) in cases {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 97) as f32 * 0.01).collect();
        let b: Vec<f32> = (0..n * k).map(|i| (i % 89) as f32 * 0.01).collect();
        let mut out = vec![0.0f32; m * n];
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        group.bench_function(BenchmarkId::new("gemm_strided", name), |bch| {
            bch.iter(|| gemm_strided(m, n, k, &a, (k as isize, 1), &b, b_strides, &mut out, false))
        });
    }
    group.finish();
}

/// The fused head loss (SmolLM2's tied head, 49152 x 576) on the target rows of a batch of
/// eight default edits (72 rows): every vocabulary chunk read once for all the row tiles, against
/// the tiles one after another (what it did before; each tile's numbers are the same either way),
/// which streamed the 113 MB head from memory once per tile of 32 rows.
fn bench_head_loss(c: &mut Criterion) {
    let (d, vocab, m) = (576usize, 49152usize, 72usize);
    let w: Vec<f32> = (0..d * vocab)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-4 - 0.05)
        .collect();
    let head = MatRef {
        data: &w,
        in_dim: d,
        out_dim: vocab,
        layout: Layout::OutIn,
    };
    let x: Vec<f32> = (0..m * d)
        .map(|i| ((i * 104729) % 997) as f32 * 1e-3 - 0.5)
        .collect();
    let targets: Vec<u32> = (0..m as u32).map(|r| r * 611 % vocab as u32).collect();
    let weights = vec![1.0f32; m];
    let mut dx = vec![0.0f32; m * d];
    let mut group = c.benchmark_group("cpu_head_loss");
    group.sample_size(20);
    group.throughput(Throughput::Elements((4 * m * d * vocab) as u64));
    group.bench_function("72 rows, chunks read once", |b| {
        b.iter(|| linear_cross_entropy_rows(&x, head, &targets, &weights, &mut dx))
    });
    group.bench_function("72 rows, tiles one after another", |b| {
        b.iter(|| {
            for r0 in (0..m).step_by(32) {
                let r1 = (r0 + 32).min(m);
                linear_cross_entropy_rows(
                    &x[r0 * d..r1 * d],
                    head,
                    &targets[r0..r1],
                    &weights[r0..r1],
                    &mut dx[r0 * d..r1 * d],
                );
            }
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_gemm,
    bench_gemm_cold,
    bench_gemm_streamed,
    bench_gemm_peak,
    bench_head_loss
);
criterion_main!(benches);
