//! The CPU reference of every op: plain f32 loops (threaded with rayon over rows) and the `gemm`
//! crate for matrix products. Each function is the "CPU twin" that the CUDA kernels are checked
//! against, so each stays simple and obviously right.
//!
//! Conventions: row-major; a "row" is one token; `d` is the row width. Matrices of frozen linear
//! layers are described by [`MatRef`], which knows whether the weight is stored `[in, out]` (GPT-2
//! Conv1D) or `[out, in]` (nn.Linear), so no weight is ever transposed in memory.

use rayon::prelude::*;

use super::skinny;

pub use crate::backend::shapes::Layout;

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

/// Rows per rayon task: enough work per task that scheduling costs nothing.
fn rows_per_task(d: usize) -> usize {
    (16384 / d.max(1)).max(1)
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
    assert_eq!(x.len(), m * w.in_dim);
    gemm_strided(
        m,
        w.out_dim,
        w.in_dim,
        x,
        (w.in_dim as isize, 1),
        w.data,
        w.strides(),
        out,
        accumulate,
    );
}

/// Gradient through a frozen linear layer: `dx[m, in_dim] (+)= dy[m, out_dim] W^T`.
pub fn matmul_input_grad(dy: &[f32], m: usize, w: MatRef, dx: &mut [f32], accumulate: bool) {
    assert_eq!(dy.len(), m * w.out_dim);
    let (rs, cs) = w.strides();
    gemm_strided(
        m,
        w.in_dim,
        w.out_dim,
        dy,
        (w.out_dim as isize, 1),
        w.data,
        (cs, rs),
        dx,
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

/// `out[r, :] += bias` for every row.
pub fn add_bias(out: &mut [f32], bias: &[f32]) {
    let d = bias.len();
    out.par_chunks_mut(d * rows_per_task(d)).for_each(|chunk| {
        for row in chunk.chunks_mut(d) {
            for (o, b) in row.iter_mut().zip(bias) {
                *o += b;
            }
        }
    });
}

/// `acc += x`, elementwise.
pub fn add_inplace(acc: &mut [f32], x: &[f32]) {
    assert_eq!(acc.len(), x.len());
    acc.par_chunks_mut(16384)
        .zip(x.par_chunks(16384))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
}

/// Appends a padded batch's new rows to a KV cache: `src [B, seq, width]` row `i < valid[b]` of
/// sequence `b` goes to row `start[b] + i` of `cache [B, cap, width]`; padding rows are not stored.
pub fn kv_append(
    src: &[f32],
    cache: &mut [f32],
    start: &[usize],
    valid: &[usize],
    seq: usize,
    cap: usize,
    width: usize,
) {
    for (b, (&s0, &n)) in start.iter().zip(valid).enumerate() {
        for i in 0..n {
            let from = (b * seq + i) * width;
            let to = (b * cap + s0 + i) * width;
            cache[to..to + width].copy_from_slice(&src[from..from + width]);
        }
    }
}

/// Embedding gather: `out[i, :] = table[ids[i], :]` for a `[vocab, d]` table.
pub fn embedding(ids: &[u32], table: &[f32], d: usize, out: &mut [f32]) {
    assert_eq!(out.len(), ids.len() * d);
    out.par_chunks_mut(d)
        .zip(ids.par_iter())
        .for_each(|(row, &id)| {
            let start = id as usize * d;
            row.copy_from_slice(&table[start..start + d]);
        });
}

/// Embedding gradient: `dtable[ids[i], :] += dout[i, :]` (sequential: ids may repeat).
pub fn embedding_grad(ids: &[u32], dout: &[f32], d: usize, dtable: &mut [f32]) {
    for (row, &id) in dout.chunks(d).zip(ids) {
        let start = id as usize * d;
        for (t, g) in dtable[start..start + d].iter_mut().zip(row) {
            *t += g;
        }
    }
}

/// LayerNorm over rows of width `d`: `out = (x - mean) * rstd * w + b`.
/// Saves `mean` and `rstd` per row for the backward pass.
pub fn layernorm(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    eps: f32,
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    let d = w.len();
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .for_each(|((o, x), (mu, rs))| {
            let m = x.iter().sum::<f32>() / d as f32;
            let var = x.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / d as f32;
            let r = 1.0 / (var + eps).sqrt();
            for i in 0..d {
                o[i] = (x[i] - m) * r * w[i] + b[i];
            }
            *mu = m;
            *rs = r;
        });
}

/// Input gradient of LayerNorm (weights frozen): `dx (+)= rstd * (g - mean(g) - xhat * mean(g * xhat))`
/// with `g = dout * w`.
pub fn layernorm_backward(
    x: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dout: &[f32],
    dx: &mut [f32],
    accumulate: bool,
) {
    let d = w.len();
    dx.par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(dout.par_chunks(d)))
        .zip(mean.par_iter().zip(rstd.par_iter()))
        .for_each(|((dx, (x, dy)), (&m, &r))| {
            let mut sum_g = 0.0;
            let mut sum_gx = 0.0;
            for i in 0..d {
                let g = dy[i] * w[i];
                sum_g += g;
                sum_gx += g * (x[i] - m) * r;
            }
            let (mg, mgx) = (sum_g / d as f32, sum_gx / d as f32);
            for i in 0..d {
                let xhat = (x[i] - m) * r;
                let v = r * (dy[i] * w[i] - mg - xhat * mgx);
                dx[i] = if accumulate { dx[i] + v } else { v };
            }
        });
}

/// RMSNorm over rows of width `d`: `out = x * rstd * w`, `rstd = 1/sqrt(mean(x^2) + eps)`.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], rstd: &mut [f32]) {
    let d = w.len();
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(rstd.par_iter_mut())
        .for_each(|((o, x), rs)| {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ms + eps).sqrt();
            for i in 0..d {
                o[i] = x[i] * r * w[i];
            }
            *rs = r;
        });
}

/// Input gradient of RMSNorm: `dx (+)= rstd * (g - x * rstd^2 * mean(g * x))` with `g = dout * w`.
pub fn rmsnorm_backward(
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    dout: &[f32],
    dx: &mut [f32],
    accumulate: bool,
) {
    let d = w.len();
    dx.par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(dout.par_chunks(d)))
        .zip(rstd.par_iter())
        .for_each(|((dx, (x, dy)), &r)| {
            let dot = (0..d).map(|i| dy[i] * w[i] * x[i]).sum::<f32>() / d as f32;
            for i in 0..d {
                let v = r * (dy[i] * w[i] - x[i] * r * r * dot);
                dx[i] = if accumulate { dx[i] + v } else { v };
            }
        });
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// `tanh(u)` as `1 - 2 / (exp(2u) + 1)`: one `expf` instead of libm's `tanhf` (which goes through
/// `expm1f` and was a tenth of a gpt2 edit step). Near 0 the cancellation costs relative accuracy
/// but the absolute error stays below 1.5e-7, and GELU only ever uses `1 + tanh`.
fn tanh_via_exp(u: f32) -> f32 {
    1.0 - 2.0 / ((2.0 * u).exp() + 1.0)
}

/// GPT-2's tanh approximation of GELU (`gelu_new`), in place.
pub fn gelu_new(x: &mut [f32]) {
    x.par_chunks_mut(16384).for_each(|c| {
        for v in c {
            let u = SQRT_2_OVER_PI * (*v + GELU_C * *v * *v * *v);
            *v = 0.5 * *v * (1.0 + tanh_via_exp(u));
        }
    });
}

/// `dx = dout * gelu_new'(x)` where `x` is the pre-activation.
pub fn gelu_new_backward(x: &[f32], dout: &[f32], dx: &mut [f32]) {
    dx.par_iter_mut()
        .zip(x.par_iter().zip(dout.par_iter()))
        .for_each(|(dx, (&x, &dy))| {
            let u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
            let t = tanh_via_exp(u);
            let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x);
            *dx = dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du);
        });
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Llama's gated MLP activation: `out = silu(gate) * up`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    out.par_iter_mut()
        .zip(gate.par_iter().zip(up.par_iter()))
        .for_each(|(o, (&g, &u))| *o = silu(g) * u);
}

/// Gradients of `silu(gate) * up` with respect to gate and up.
pub fn silu_mul_backward(
    gate: &[f32],
    up: &[f32],
    dout: &[f32],
    dgate: &mut [f32],
    dup: &mut [f32],
) {
    dgate
        .par_iter_mut()
        .zip(dup.par_iter_mut())
        .enumerate()
        .for_each(|(i, (dg, du))| {
            let g = gate[i];
            let s = 1.0 / (1.0 + (-g).exp());
            *du = dout[i] * g * s;
            *dg = dout[i] * up[i] * s * (1.0 + g * (1.0 - s));
        });
}

/// Rotary embedding exactly as transformers' Llama applies it (`rotate_half`: the pair of element `i`
/// is element `i + head_dim/2`), in place on rows `[n_heads * head_dim]`, row `r` at `positions[r]`.
/// `inverse` rotates by the negative angle, which is the backward pass (rotation is orthogonal).
pub fn rope(
    x: &mut [f32],
    positions: &[u32],
    n_heads: usize,
    head_dim: usize,
    theta: f32,
    inverse: bool,
) {
    let half = head_dim / 2;
    // Frequencies computed as transformers does: theta^(-2i/d) in f32 (inv_freq), angle = pos * inv_freq.
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let width = n_heads * head_dim;
    x.par_chunks_mut(width)
        .zip(positions.par_iter())
        .for_each(|(row, &pos)| {
            for (i, &f) in inv_freq.iter().enumerate() {
                let angle = pos as f32 * f;
                let (sin, cos) = angle.sin_cos();
                let sin = if inverse { -sin } else { sin };
                for h in 0..n_heads {
                    let base = h * head_dim;
                    let a = row[base + i];
                    let b = row[base + i + half];
                    row[base + i] = a * cos - b * sin;
                    row[base + i + half] = b * cos + a * sin;
                }
            }
        });
}

/// Shape of a causal attention call over a padded batch with a key/value cache.
///
/// Queries: `[batch, q_len, n_heads * head_dim]`; keys/values: `[batch, kv_capacity, n_kv_heads * head_dim]`.
/// Query `i` of sequence `b` sits at absolute position `q_start[b] + i` and sees keys `0..=q_start[b] + i`.
/// Queries at `i >= q_valid[b]` are padding: their output is zero.
#[derive(Debug, Clone)]
pub struct AttnShape<'a> {
    pub batch: usize,
    pub q_len: usize,
    pub kv_capacity: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub q_start: &'a [usize],
    pub q_valid: &'a [usize],
}

impl AttnShape<'_> {
    fn q_width(&self) -> usize {
        self.n_heads * self.head_dim
    }
    fn kv_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    /// Number of keys query `i` of sequence `b` attends to.
    fn keys_seen(&self, b: usize, i: usize) -> usize {
        self.q_start[b] + i + 1
    }
}

/// Causal softmax attention. `probs` (if given) receives the attention weights,
/// `[batch, n_heads, q_len, kv_capacity]`, for the backward pass.
pub fn attention(
    s: &AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    mut probs: Option<&mut [f32]>,
) {
    let (qw, kvw, dh) = (s.q_width(), s.kv_width(), s.head_dim);
    let group = s.n_heads / s.n_kv_heads;
    let scale = 1.0 / (dh as f32).sqrt();
    let probs_stride = s.n_heads * s.q_len * s.kv_capacity;
    if let Some(p) = probs.as_deref_mut() {
        p.fill(0.0);
    }
    // One task per (sequence, query row): each writes its own output row.
    let rows: Vec<(usize, usize)> = (0..s.batch)
        .flat_map(|b| (0..s.q_len).map(move |i| (b, i)))
        .collect();
    // Attention weights are kept only when the caller wants them (training), not while decoding.
    let keep_probs = probs.is_some();
    let prob_rows: Vec<Vec<f32>> = rows
        .par_iter()
        .zip(out.par_chunks_mut(qw))
        .map(|(&(b, i), o)| {
            o.fill(0.0);
            let mut saved = if keep_probs {
                vec![0.0f32; s.n_heads * s.kv_capacity]
            } else {
                Vec::new()
            };
            if i >= s.q_valid[b] {
                return saved;
            }
            let n_keys = s.keys_seen(b, i);
            let qrow = &q[(b * s.q_len + i) * qw..][..qw];
            let mut scores = vec![0.0f32; n_keys];
            for h in 0..s.n_heads {
                let kvh = h / group;
                let qh = &qrow[h * dh..][..dh];
                let mut max = f32::NEG_INFINITY;
                for (j, sc) in scores.iter_mut().enumerate() {
                    let kj = &k[(b * s.kv_capacity + j) * kvw + kvh * dh..][..dh];
                    *sc = qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
                    max = max.max(*sc);
                }
                let mut sum = 0.0;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                let oh = &mut o[h * dh..][..dh];
                for (j, sc) in scores.iter_mut().enumerate() {
                    *sc /= sum;
                    let vj = &v[(b * s.kv_capacity + j) * kvw + kvh * dh..][..dh];
                    for (ov, vv) in oh.iter_mut().zip(vj) {
                        *ov += *sc * vv;
                    }
                }
                if keep_probs {
                    saved[h * s.kv_capacity..][..n_keys].copy_from_slice(&scores);
                }
            }
            saved
        })
        .collect();
    if let Some(p) = probs {
        for (&(b, i), saved) in rows.iter().zip(prob_rows) {
            for h in 0..s.n_heads {
                let dst = b * probs_stride + (h * s.q_len + i) * s.kv_capacity;
                p[dst..dst + s.kv_capacity]
                    .copy_from_slice(&saved[h * s.kv_capacity..][..s.kv_capacity]);
            }
        }
    }
}

/// Backward of [`attention`] given the saved `probs`: accumulates into `dq`, `dk`, `dv`
/// (which must be zeroed by the caller when not accumulating across calls).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    s: &AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (qw, kvw, dh) = (s.q_width(), s.kv_width(), s.head_dim);
    let group = s.n_heads / s.n_kv_heads;
    let scale = 1.0 / (dh as f32).sqrt();
    let probs_stride = s.n_heads * s.q_len * s.kv_capacity;
    // Parallel over sequences: each sequence owns its slices of dq, dk, dv.
    dq.par_chunks_mut(s.q_len * qw)
        .zip(dk.par_chunks_mut(s.kv_capacity * kvw))
        .zip(dv.par_chunks_mut(s.kv_capacity * kvw))
        .enumerate()
        .for_each(|(b, ((dq, dk), dv))| {
            let mut dp = vec![0.0f32; s.kv_capacity];
            for i in 0..s.q_valid[b] {
                let n_keys = s.keys_seen(b, i);
                let qrow = &q[(b * s.q_len + i) * qw..][..qw];
                let dorow = &dout[(b * s.q_len + i) * qw..][..qw];
                for h in 0..s.n_heads {
                    let kvh = h / group;
                    let p =
                        &probs[b * probs_stride + (h * s.q_len + i) * s.kv_capacity..][..n_keys];
                    let doh = &dorow[h * dh..][..dh];
                    // dP = dO V^T ; dV += P^T dO
                    let mut dot_pdp = 0.0;
                    for j in 0..n_keys {
                        let off = j * kvw + kvh * dh;
                        let vj = &v[b * s.kv_capacity * kvw + off..][..dh];
                        dp[j] = doh.iter().zip(vj).map(|(a, b)| a * b).sum();
                        dot_pdp += p[j] * dp[j];
                        for (dvv, g) in dv[off..off + dh].iter_mut().zip(doh) {
                            *dvv += p[j] * g;
                        }
                    }
                    // dS = P * (dP - sum(P dP)); dQ += dS K * scale; dK += dS^T Q * scale
                    let qh = &qrow[h * dh..][..dh];
                    let dqh = &mut dq[i * qw + h * dh..][..dh];
                    for j in 0..n_keys {
                        let ds = p[j] * (dp[j] - dot_pdp) * scale;
                        let off = j * kvw + kvh * dh;
                        let kj = &k[b * s.kv_capacity * kvw + off..][..dh];
                        for t in 0..dh {
                            dqh[t] += ds * kj[t];
                        }
                        for (dkv, qv) in dk[off..off + dh].iter_mut().zip(qh) {
                            *dkv += ds * qv;
                        }
                    }
                }
            }
        });
}

/// Log-softmax of one row, returned as (max, log-sum-exp) so callers can form log-probs cheaply.
pub fn logsumexp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
    max + sum.ln()
}

/// Index of the largest element (the first one on ties, as torch.argmax does).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Softmax cross-entropy over rows of `logits [n, vocab]` against `targets`; rows whose target is
/// `None` are ignored. Returns the summed loss; writes `dlogits = (softmax - onehot) * weight`
/// (zero for ignored rows).
pub fn cross_entropy(
    logits: &[f32],
    vocab: usize,
    targets: &[Option<u32>],
    weight: f32,
    dlogits: &mut [f32],
) -> f32 {
    dlogits
        .par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter())
        .map(|((dl, row), t)| match t {
            None => {
                dl.fill(0.0);
                0.0
            }
            Some(t) => {
                let lse = logsumexp(row);
                for (d, &x) in dl.iter_mut().zip(row) {
                    *d = (x - lse).exp() * weight;
                }
                dl[*t as usize] -= weight;
                lse - row[*t as usize]
            }
        })
        .sum()
}

/// Softmax of a short vector, in place (router probabilities).
pub fn softmax_inplace(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Indices of the `k` largest entries, largest first; ties go to the lower index (as torch.topk on CPU).
pub fn topk(x: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Adam hyperparameters for one step.
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// 1-based step count, for bias correction.
    pub t: u32,
}

/// One Adam update (torch.optim.Adam semantics, no weight decay).
pub fn adam(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], s: AdamStep) {
    let bc1 = 1.0 - s.beta1.powi(s.t as i32);
    let bc2 = 1.0 - s.beta2.powi(s.t as i32);
    let step = s.lr / bc1;
    let bc2_sqrt = bc2.sqrt();
    param
        .par_iter_mut()
        .zip(grad.par_iter())
        .zip(m.par_iter_mut().zip(v.par_iter_mut()))
        .for_each(|((p, &g), (m, v))| {
            *m = s.beta1 * *m + (1.0 - s.beta1) * g;
            *v = s.beta2 * *v + (1.0 - s.beta2) * g * g;
            *p -= step * *m / ((*v).sqrt() / bc2_sqrt + s.eps);
        });
}

#[cfg(test)]
mod tests {
    //! Every backward op against central finite differences of `sum(forward(x) * w)`.
    use super::*;

    #[test]
    fn tanh_via_exp_is_within_2e7_of_tanh_everywhere() {
        let mut worst = 0.0f64;
        for i in -200_000..=200_000 {
            let u = i as f32 * 1e-4; // -20 .. 20, through 0 and the saturation
            let err = (tanh_via_exp(u) as f64 - (u as f64).tanh()).abs();
            worst = worst.max(err);
        }
        for u in [f32::MAX, f32::MIN, 1e-30, -1e-30, 0.0] {
            assert!(
                (tanh_via_exp(u) as f64 - (u as f64).tanh()).abs() < 2e-7,
                "{u}"
            );
        }
        assert!(worst < 2e-7, "worst absolute error {worst}");
    }
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    /// Checks `grad` against finite differences of `f` at `x` on every coordinate.
    fn fd_check(name: &str, x: &[f32], grad: &[f32], f: impl Fn(&[f32]) -> f32) {
        let eps = 1e-3;
        let mut x = x.to_vec();
        for i in 0..x.len() {
            let orig = x[i];
            x[i] = orig + eps;
            let plus = f(&x) as f64;
            x[i] = orig - eps;
            let minus = f(&x) as f64;
            x[i] = orig;
            let fd = ((plus - minus) / (2.0 * eps as f64)) as f32;
            assert!(
                (fd - grad[i]).abs() <= 2e-3 + 1e-2 * grad[i].abs(),
                "{name}: d/dx[{i}] finite difference {fd} vs analytic {}",
                grad[i]
            );
        }
    }

    /// `x W` (and `dy W^T`) in f64 from the logical `[in, out]` view.
    fn naive_product(x: &[f32], m: usize, w: &MatRef, transpose: bool) -> Vec<f64> {
        let at = |i: usize, o: usize| -> f64 {
            match w.layout {
                Layout::InOut => w.data[i * w.out_dim + o] as f64,
                Layout::OutIn => w.data[o * w.in_dim + i] as f64,
            }
        };
        let (k, n) = if transpose {
            (w.out_dim, w.in_dim)
        } else {
            (w.in_dim, w.out_dim)
        };
        let mut out = vec![0.0f64; m * n];
        for r in 0..m {
            for j in 0..n {
                out[r * n + j] = (0..k)
                    .map(|kk| {
                        let wv = if transpose { at(j, kk) } else { at(kk, j) };
                        x[r * k + kk] as f64 * wv
                    })
                    .sum();
            }
        }
        out
    }

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

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(a, b)| a * b).sum()
    }

    #[test]
    fn layernorm_backward_matches_finite_differences() {
        let (rows, d) = (3, 8);
        let (x, w, b, dy) = (
            random(rows * d, 1),
            random(d, 2),
            random(d, 3),
            random(rows * d, 4),
        );
        let f = |x: &[f32]| {
            let (mut o, mut m, mut r) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
            layernorm(x, &w, &b, 1e-5, &mut o, &mut m, &mut r);
            dot(&o, &dy)
        };
        let (mut o, mut m, mut r) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
        layernorm(&x, &w, &b, 1e-5, &mut o, &mut m, &mut r);
        let mut dx = vec![0.0; rows * d];
        layernorm_backward(&x, &w, &m, &r, &dy, &mut dx, false);
        fd_check("layernorm", &x, &dx, f);
    }

    #[test]
    fn rmsnorm_backward_matches_finite_differences() {
        let (rows, d) = (3, 8);
        let (x, w, dy) = (random(rows * d, 5), random(d, 6), random(rows * d, 7));
        let f = |x: &[f32]| {
            let (mut o, mut r) = (vec![0.0; rows * d], vec![0.0; rows]);
            rmsnorm(x, &w, 1e-6, &mut o, &mut r);
            dot(&o, &dy)
        };
        let (mut o, mut r) = (vec![0.0; rows * d], vec![0.0; rows]);
        rmsnorm(&x, &w, 1e-6, &mut o, &mut r);
        let mut dx = vec![0.0; rows * d];
        rmsnorm_backward(&x, &w, &r, &dy, &mut dx, false);
        fd_check("rmsnorm", &x, &dx, f);
    }

    #[test]
    fn activation_backwards_match_finite_differences() {
        let n = 20;
        let (x, dy, up) = (random(n, 8), random(n, 9), random(n, 10));
        let mut dx = vec![0.0; n];
        gelu_new_backward(&x, &dy, &mut dx);
        fd_check("gelu_new", &x, &dx, |x| {
            let mut y = x.to_vec();
            gelu_new(&mut y);
            dot(&y, &dy)
        });
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        silu_mul_backward(&x, &up, &dy, &mut dg, &mut du);
        fd_check("silu_mul gate", &x, &dg, |g| {
            let mut y = vec![0.0; n];
            silu_mul(g, &up, &mut y);
            dot(&y, &dy)
        });
        fd_check("silu_mul up", &up, &du, |u| {
            let mut y = vec![0.0; n];
            silu_mul(&x, u, &mut y);
            dot(&y, &dy)
        });
    }

    #[test]
    fn rope_inverse_is_the_transpose() {
        let (heads, dh) = (2, 8);
        let pos = [0u32, 3, 17];
        let (x, dy) = (random(3 * heads * dh, 11), random(3 * heads * dh, 12));
        let mut dx = dy.clone();
        rope(&mut dx, &pos, heads, dh, 10000.0, true);
        fd_check("rope", &x, &dx, |x| {
            let mut y = x.to_vec();
            rope(&mut y, &pos, heads, dh, 10000.0, false);
            dot(&y, &dy)
        });
    }

    #[test]
    fn attention_backward_matches_finite_differences() {
        let (b, t, h, hkv, dh) = (2, 4, 4, 2, 3);
        let (start, valid) = ([0usize, 0], [4usize, 2]);
        let s = AttnShape {
            batch: b,
            q_len: t,
            kv_capacity: t,
            n_heads: h,
            n_kv_heads: hkv,
            head_dim: dh,
            q_start: &start,
            q_valid: &valid,
        };
        let q = random(b * t * h * dh, 13);
        let k = random(b * t * hkv * dh, 14);
        let v = random(b * t * hkv * dh, 15);
        let dy = random(b * t * h * dh, 16);
        let run = |q: &[f32], k: &[f32], v: &[f32]| {
            let mut o = vec![0.0; q.len()];
            attention(&s, q, k, v, &mut o, None);
            dot(&o, &dy)
        };
        let mut o = vec![0.0; q.len()];
        let mut p = vec![0.0; b * h * t * t];
        attention(&s, &q, &k, &v, &mut o, Some(&mut p));
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        attention_backward(&s, &q, &k, &v, &p, &dy, &mut dq, &mut dk, &mut dv);
        fd_check("attention dq", &q, &dq, |q| run(q, &k, &v));
        fd_check("attention dk", &k, &dk, |k| run(&q, k, &v));
        fd_check("attention dv", &v, &dv, |v| run(&q, &k, v));
    }

    #[test]
    fn cross_entropy_gradient_matches_finite_differences() {
        let vocab = 7;
        let logits = random(3 * vocab, 17);
        let targets = [Some(2), None, Some(6)];
        let mut dl = vec![0.0; logits.len()];
        let loss = cross_entropy(&logits, vocab, &targets, 0.5, &mut dl);
        assert!(loss > 0.0);
        assert!(
            dl[vocab..2 * vocab].iter().all(|&g| g == 0.0),
            "ignored row has a gradient"
        );
        fd_check("cross_entropy", &logits, &dl, |x| {
            0.5 * cross_entropy(x, vocab, &targets, 0.5, &mut vec![0.0; x.len()])
        });
    }

    #[test]
    fn adam_matches_torch_first_step() {
        // torch.optim.Adam's first step moves each parameter by lr * sign(grad) (up to eps).
        let (mut p, g) = (vec![1.0f32, -2.0, 0.5], vec![0.3f32, -4.0, 1e-3]);
        let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
        adam(
            &mut p,
            &g,
            &mut m,
            &mut v,
            AdamStep {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                t: 1,
            },
        );
        let expect = [0.9f32, -1.9, 0.4];
        for (a, b) in p.iter().zip(expect) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
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
