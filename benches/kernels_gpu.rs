//! Achieved bandwidth of each CUDA kernel family at the shapes that matter (GPT2-XL widths).
//! Criterion reports bytes/s from the minimum bytes each kernel must move (see the kernel headers);
//! the first group measures the ceiling they are compared with: a device-to-device copy of 512 MiB
//! (bytes read plus written; docs/gpu.md quotes about 3.0 TB/s on an H100, 4.3 TB/s on an H200).
//! Then the key store's match against 10^5 stored edits (issue 15's scale).
//! Then the whole edit step: seconds per edit (time) and edits per second (thrpt, "elem/s") of one
//! 20-token edit with the preset config (6 MoLoRA layers, 50 iterations) on random GPT-2 124M and
//! GPT2-XL checkpoints in bf16, each edit continuing the state of the previous ones.
//! Then one decode step (batch 1, 128 tokens of context, KV cache) of a random GPT2-XL checkpoint
//! in bf16, replayed from its CUDA graph and run eagerly, side by side: milliseconds per token
//! against the floor of reading the weights once (about 3.1 GB in bf16): the bench prints that
//! byte count on a `FLOOR` line, and tools/bench_table.py divides it by the measured copy rate.
//! Without a GPU (or without compiled kernels) it prints one SKIP line and exits successfully.
//!
//! Timing: launches queued back to back, one stream synchronisation per batch of iterations (an
//! edit synchronises by itself when its trained state comes back).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use cudarc::driver::CudaSlice;
use elder::backend::cuda::{
    adam, attention, elementwise, gpu_or_skip, keystore, lora, loss, norm, router, GpuDevice,
    KernelDtype,
};
use elder::backend::shapes::MixShape;
use elder::elder::config::ElderConfig;
use elder::elder::molora::Elder;
use elder::elder::trainer::EditExample;
use elder::model::presets::{param_count, preset};
use elder::model::runner::pad_batch;
use elder::model::Arch;
use elder::runtime::cuda::{Capacity, ElderStep, GpuModel, GpuTrainer, WeightSource};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random<T: KernelDtype>(
    dev: &GpuDevice,
    rng: &mut ChaCha8Rng,
    n: usize,
    scale: f32,
) -> CudaSlice<T> {
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-scale..scale)).collect();
    dev.upload_as::<T>(&v).expect("upload")
}

/// Times `iters` launches of `f` with one synchronisation at the end.
fn timed(dev: &GpuDevice, iters: u64, mut f: impl FnMut()) -> Duration {
    dev.synchronize().expect("sync");
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    dev.synchronize().expect("sync");
    start.elapsed()
}

/// The bandwidth ceiling: one device-to-device copy of 512 MiB (over 4x the L2 of either GPU).
fn bench_copy(c: &mut Criterion, dev: &GpuDevice, rng: &mut ChaCha8Rng) {
    let n = 256 << 20; // bf16 elements
    let src = random::<bf16>(dev, rng, n, 1.0);
    let mut dst = dev.zeros::<bf16>(n).unwrap();
    let mut g = c.benchmark_group("copy");
    g.throughput(Throughput::Bytes((2 * n * 2) as u64));
    g.bench_function("memcpy_dtod 512 MiB (read + write)", |bch| {
        bch.iter_custom(|iters| {
            timed(dev, iters, || {
                dev.stream().memcpy_dtod(&src, &mut dst).expect("copy")
            })
        })
    });
    g.finish();
}

fn bench_norm(c: &mut Criterion, dev: &GpuDevice, rng: &mut ChaCha8Rng) {
    let (n, d) = (8192, 1600);
    let rows = norm::NormRows { n, d, eps: 1e-5 };
    let x = random::<bf16>(dev, rng, n * d, 2.0);
    let r = random::<bf16>(dev, rng, n * d, 2.0);
    let w = random::<bf16>(dev, rng, d, 1.0);
    let b = random::<bf16>(dev, rng, d, 1.0);
    let mut sum = dev.zeros::<bf16>(n * d).unwrap();
    let mut out = dev.zeros::<bf16>(n * d).unwrap();
    let mut mean = dev.zeros::<f32>(n).unwrap();
    let mut rstd = dev.zeros::<f32>(n).unwrap();
    let mut g = c.benchmark_group("norm");
    g.throughput(Throughput::Bytes((4 * n * d * 2 + 8 * n) as u64));
    g.bench_function("residual_layernorm_bf16 8192x1600", |bch| {
        bch.iter_custom(|iters| {
            timed(dev, iters, || {
                norm::residual_layernorm::<bf16, _, _>(
                    dev,
                    rows,
                    &x,
                    Some(&r),
                    Some(&mut sum),
                    &w,
                    Some(&b),
                    &mut out,
                    &mut mean,
                    &mut rstd,
                )
                .expect("launch")
            })
        })
    });
    g.finish();
}

fn bench_elementwise(c: &mut Criterion, dev: &GpuDevice, rng: &mut ChaCha8Rng) {
    let (n, d) = (8192, 6400);
    let x = random::<bf16>(dev, rng, n * d, 3.0);
    let b = random::<bf16>(dev, rng, d, 1.0);
    let mut out = dev.zeros::<bf16>(n * d).unwrap();
    let mut g = c.benchmark_group("elementwise");
    g.throughput(Throughput::Bytes((2 * n * d * 2) as u64));
    g.bench_function("bias_gelu_bf16 8192x6400", |bch| {
        bch.iter_custom(|iters| {
            timed(dev, iters, || {
                elementwise::bias_gelu::<bf16, _, CudaSlice<bf16>>(
                    dev,
                    &x,
                    Some(&b),
                    None,
                    &mut out,
                    n,
                    d,
                )
                .expect("launch")
            })
        })
    });
    g.finish();
}

fn bench_lora(c: &mut Criterion, dev: &GpuDevice, rng: &mut ChaCha8Rng) {
    // Decode-shaped site: 64 sequences x 1 token, GPT2-XL c_fc (1600 -> 6400), E = 64, k = 2, r = 8.
    let (batch, seq, d_in, d_out, rank, k, n_experts) = (64, 1, 1600, 6400, 8, 2, 64);
    let site = lora::LoraSite {
        shape: MixShape {
            batch,
            seq,
            d_in,
            d_out,
            rank,
            k,
            scale: 1.0,
        },
        n_experts,
    };
    let x = random::<bf16>(dev, rng, batch * seq * d_in, 1.0);
    let a = random::<f32>(dev, rng, n_experts * d_in * rank, 0.3);
    let bm = random::<f32>(dev, rng, n_experts * rank * d_out, 0.3);
    let experts: Vec<u32> = (0..batch * k)
        .map(|i| ((i * 7 + i / k) % n_experts) as u32)
        .collect();
    let experts = dev.upload(&experts).unwrap();
    let gates = random::<f32>(dev, rng, batch * k, 1.0);
    let scope: Vec<u8> = (0..batch).map(|b| (b % 2) as u8).collect();
    let scope = dev.upload(&scope).unwrap();
    let mut out = random::<bf16>(dev, rng, batch * seq * d_out, 1.0);
    let bytes = batch * seq * (d_in + 2 * d_out) * 2 + batch * k * rank * (d_in + d_out) * 4;
    let mut g = c.benchmark_group("lora");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("lora_forward_bf16 B64 T1 E64 k2 r8", |bch| {
        bch.iter_custom(|iters| {
            timed(dev, iters, || {
                // Inference: one launch, no shrink kept for a backward.
                lora::lora_forward::<bf16, CudaSlice<f32>>(
                    dev,
                    site,
                    &x,
                    &a,
                    &bm,
                    &experts,
                    &gates,
                    Some(&scope),
                    None::<&CudaSlice<u32>>,
                    None,
                    &mut out,
                )
                .expect("launch")
            })
        })
    });
    g.finish();
}

fn bench_router(c: &mut Criterion, dev: &GpuDevice, rng: &mut ChaCha8Rng) {
    let shape = router::RouterShape {
        batch: 64,
        layers: 6,
        experts: 4,
        d_in: 6400,
        k: 2,
        renormalize: false,
        threshold: 12,
    };
    let n_codes = 100_000;
    let q = random::<bf16>(dev, rng, shape.batch * shape.d_in, 1.0);
    let w = random::<f32>(dev, rng, shape.layers * shape.experts * shape.d_in, 0.1);
    let b = random::<f32>(dev, rng, shape.layers * shape.experts, 0.1);
    let codes: Vec<u64> = (0..n_codes * shape.words()).map(|_| rng.gen()).collect();
    let codebook = dev.upload(&codes).unwrap();
    let mut out = router::RouterOutputs::alloc(dev, &shape).unwrap();
    let bytes = shape.batch * (shape.d_in * 2 + n_codes * shape.words() * 8)
        + shape.layers * shape.experts * shape.d_in * 4;
    let mut g = c.benchmark_group("router");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("router_fused_bf16 B64 L6 E4 1e5 codes", |bch| {
        bch.iter_custom(|iters| {
            timed(dev, iters, || {
                router::router_fused::<bf16>(
                    dev, &shape, &q, None, &w, &b, &codebook, n_codes, &mut out,
                )
                .expect("launch")
            })
        })
    });
    g.finish();
}

/// The key store's match at the scale of issue 15: 10^5 stored edits (three keys each, three
/// rows per key, SmolLM2's width 576: 2.1 GB of f32 keys) against one 16-token prompt and a
/// batch of 8, each one launch; bytes: the stored keys, read once per launch.
fn bench_key_match(c: &mut Criterion, dev: &GpuDevice, rng: &mut ChaCha8Rng) {
    let (entries, variants, span, dim, seq) = (100_000, 3, 3, 576, 16);
    let keys = random::<f32>(dev, rng, entries * variants * span * dim, 0.05);
    let rows: Vec<u8> = (0..entries * variants)
        .map(|_| rng.gen_range(1..=span as u8))
        .collect();
    let key_rows = dev.upload(&rows).unwrap();
    let ceilings = random::<f32>(dev, rng, entries * variants, 0.5);
    let stored = keystore::StoredKeys {
        keys: &keys,
        key_rows: &key_rows,
        ceilings: Some((&ceilings, 0.25)),
    };
    let mut g = c.benchmark_group("key_match");
    g.throughput(Throughput::Bytes(
        (entries * variants * span * dim * 4) as u64,
    ));
    for batch in [1usize, 8] {
        let s = keystore::KeyMatchShape {
            batch,
            seq,
            dim,
            entries,
            variants,
            span,
        };
        let queries = random::<f32>(dev, rng, batch * seq * dim, 0.05);
        let lens = dev.upload(&vec![seq as i32; batch]).unwrap();
        let mut out = keystore::KeyMatchOutputs::alloc(dev, batch, entries).unwrap();
        g.bench_function(
            format!("key_match_f32 1e5 edits x3 keys x3 rows d576 B{batch} S{seq}"),
            |bch| {
                bch.iter_custom(|iters| {
                    timed(dev, iters, || {
                        keystore::key_match(dev, &s, &queries, &lens, &stored, &mut out)
                            .expect("launch")
                    })
                })
            },
        );
    }
    g.finish();
}

fn bench_attention_decode(c: &mut Criterion, dev: &GpuDevice, rng: &mut ChaCha8Rng) {
    let (batch, cap, heads, hd) = (16, 1024, 25, 64);
    let dims = attention::AttnDims {
        batch,
        q_len: 1,
        kv_capacity: cap,
        n_heads: heads,
        n_kv_heads: heads,
        head_dim: hd,
    };
    let starts = dev.upload(&vec![(cap - 1) as i32; batch]).unwrap();
    let valid = dev.upload(&vec![1i32; batch]).unwrap();
    let q = random::<bf16>(dev, rng, batch * heads * hd, 1.0);
    let k = random::<bf16>(dev, rng, batch * cap * heads * hd, 1.0);
    let v = random::<bf16>(dev, rng, batch * cap * heads * hd, 1.0);
    let mut out = dev.zeros::<bf16>(batch * heads * hd).unwrap();
    let mut g = c.benchmark_group("attention");
    g.throughput(Throughput::Bytes((2 * batch * cap * heads * hd * 2) as u64));
    g.bench_function("attention_decode_bf16 B16 L1024 H25 D64", |bch| {
        bch.iter_custom(|iters| {
            timed(dev, iters, || {
                attention::attention_decode::<bf16>(
                    dev, dims, &starts, &valid, &q, &k, &v, &mut out,
                )
                .expect("launch")
            })
        })
    });
    g.finish();
}

fn bench_loss_and_adam(c: &mut Criterion, dev: &GpuDevice, rng: &mut ChaCha8Rng) {
    let (n, vocab) = (64, 50257);
    let logits = random::<bf16>(dev, rng, n * vocab, 8.0);
    let targets: Vec<i32> = (0..n).map(|_| rng.gen_range(0..vocab as i32)).collect();
    let targets = dev.upload(&targets).unwrap();
    let mut dl = dev.zeros::<bf16>(n * vocab).unwrap();
    let mut rl = dev.zeros::<f32>(n).unwrap();
    let mut g = c.benchmark_group("loss");
    g.throughput(Throughput::Bytes((2 * n * vocab * 2) as u64));
    g.bench_function("cross_entropy_bf16 64x50257", |bch| {
        bch.iter_custom(|iters| {
            timed(dev, iters, || {
                loss::cross_entropy::<bf16>(
                    dev, &logits, &targets, n, vocab, 1.0, None, &mut dl, &mut rl,
                )
                .expect("launch")
            })
        })
    });
    g.finish();

    let p = 6 * 64 * 8 * (1600 + 6400);
    let mut param = random::<f32>(dev, rng, p, 1.0);
    let grad = random::<f32>(dev, rng, p, 1.0);
    let mut m = random::<f32>(dev, rng, p, 0.1);
    let mut v = dev.filled::<f32>(p, 0.01).unwrap();
    let step = elder::backend::cpu::ops::AdamStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        t: 1,
    };
    let mut g = c.benchmark_group("adam");
    g.throughput(Throughput::Bytes((7 * 4 * p) as u64));
    g.bench_function("adam_f32 ELDER trainables (24.6M)", |bch| {
        bch.iter_custom(|iters| {
            timed(dev, iters, || {
                adam::adam(
                    dev,
                    &mut param,
                    &grad,
                    &mut m,
                    &mut v,
                    p,
                    adam::Schedule::fixed(step),
                    None,
                )
                .expect("launch")
            })
        })
    });
    g.finish();
}

/// A 20-token edit: a 17-token prompt and a 3-token target, like a short ZsRE question (the CPU
/// edit bench's shape).
fn edit_of_20_tokens(vocab: usize) -> EditExample {
    EditExample {
        prompt: (0..17).map(|i| ((i * 7919 + 13) % vocab) as u32).collect(),
        target: (0..3).map(|i| ((i * 104_729 + 5) % vocab) as u32).collect(),
        knowledge_id: "bench".into(),
    }
}

fn bench_edit(c: &mut Criterion, dev: &Arc<GpuDevice>) {
    let mut g = c.benchmark_group("edit");
    g.sample_size(10);
    g.throughput(Throughput::Elements(1));
    for name in ["gpt2", "gpt2-xl"] {
        let cfg = preset(Arch::Gpt2, name).expect("preset");
        let mut elder = Elder::new(ElderConfig::preset_for(&cfg), &cfg).expect("ELDER state");
        let cap = Capacity { batch: 1, seq: 20 };
        // Random weights made and uploaded tensor by tensor (no f32 host model).
        let weights = WeightSource::Random { cfg: &cfg, seed: 0 };
        let mut trainer = GpuTrainer::<bf16>::new(dev.clone(), weights, cap).expect("upload");
        let batch = [edit_of_20_tokens(cfg.vocab_size)];
        // Sizes the training buffers (outside the timing).
        trainer
            .edit_batch(&mut elder, &batch, |_, _| {})
            .expect("edit");
        let id = format!("bf16 {name} 50 iterations 20 tokens");
        g.bench_function(id, |bch| {
            bch.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    trainer
                        .edit_batch(&mut elder, &batch, |_, _| {})
                        .expect("edit");
                }
                start.elapsed()
            })
        });
    }
    g.finish();
}

/// One decode step on GPT2-XL shapes, graph replay against eager launches.
fn bench_decode_step(c: &mut Criterion, dev: &Arc<GpuDevice>) {
    let cfg = preset(Arch::Gpt2, "gpt2-xl").expect("preset");
    let context = 128;
    let mut gpu = GpuModel::<bf16>::new(
        dev.clone(),
        WeightSource::Random { cfg: &cfg, seed: 0 },
        Capacity {
            batch: 1,
            seq: cfg.max_positions,
        },
    )
    .expect("upload");
    let prompt: Vec<u32> = (0..context as u32).map(|i| (i * 31 + 7) % 50000).collect();
    // The floor: every weight read once (bf16), plus the K and V cache of the context.
    let kv = 2 * cfg.num_layers * context * cfg.hidden_size * 2;
    let floor_bytes = param_count(&cfg) * 2 + kv;
    println!("FLOOR decode_step/gpt2-xl bf16 B1 ctx{context} bytes={floor_bytes}");
    let mut g = c.benchmark_group("decode_step");
    g.sample_size(20).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(1));
    for graphs in [true, false] {
        gpu.set_decode_graphs(graphs);
        let (ids, shape) = pad_batch(std::slice::from_ref(&prompt), &[0]);
        gpu.forward(&ids, &shape, ElderStep::Off).expect("prefill");
        let mut len = context;
        let id = format!(
            "gpt2-xl bf16 B1 ctx{context} {}",
            if graphs { "graph" } else { "eager" }
        );
        g.bench_function(id, |bch| {
            bch.iter(|| {
                // The same token at a growing position; rewinds before the cache is full.
                if len + 1 >= cfg.max_positions {
                    len = context;
                }
                let (ids, shape) = pad_batch(&[vec![11u32]], &[len]);
                let logits = gpu.decode_step(&ids, &shape, false).expect("decode step");
                len += 1;
                black_box(logits)
            })
        });
    }
    g.finish();
}

/// Whether a group's set-up should run: criterion filters benchmarks only after their set-up
/// (here, uploading GPT2-XL), so a filter given on the command line (`--bench copy|norm`) also
/// skips the set-up of groups none of its `|` alternatives names.
fn group_filter() -> impl Fn(&str) -> bool {
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-') && a.parse::<f64>().is_err());
    move |group: &str| {
        filter.as_deref().is_none_or(|f| {
            // "decode" names decode_step; "edit/bf16 gpt2" names edit.
            f.split('|')
                .any(|alt| group.contains(alt) || alt.contains(group))
        })
    }
}

fn main() {
    let Some(dev) = gpu_or_skip("kernels_gpu benches") else {
        return;
    };
    let mut c = Criterion::default().configure_from_args();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let want = group_filter();
    // Each set-up with the criterion group names it serves.
    type Setup<'a> = Box<dyn Fn(&mut Criterion, &mut ChaCha8Rng) + 'a>;
    let groups: Vec<(&[&str], Setup)> = vec![
        (&["copy"], Box::new(|c, r| bench_copy(c, &dev, r))),
        (&["norm"], Box::new(|c, r| bench_norm(c, &dev, r))),
        (
            &["elementwise"],
            Box::new(|c, r| bench_elementwise(c, &dev, r)),
        ),
        (&["lora"], Box::new(|c, r| bench_lora(c, &dev, r))),
        (&["router"], Box::new(|c, r| bench_router(c, &dev, r))),
        (&["key_match"], Box::new(|c, r| bench_key_match(c, &dev, r))),
        (
            &["attention"],
            Box::new(|c, r| bench_attention_decode(c, &dev, r)),
        ),
        (
            &["loss", "adam"],
            Box::new(|c, r| bench_loss_and_adam(c, &dev, r)),
        ),
        (&["edit"], Box::new(|c, _| bench_edit(c, &dev))),
        (
            &["decode_step"],
            Box::new(|c, _| bench_decode_step(c, &dev)),
        ),
    ];
    for (names, setup) in &groups {
        if names.iter().any(|n| want(n)) {
            setup(&mut c, &mut rng);
        }
    }
    black_box(&dev);
    c.final_summary();
}
