//! Elementwise and gather ops (twins of `kernels/elementwise.cu`): bias and residual adds, the
//! KV-cache append, embedding gathers, GELU and SiLU with their backwards, RoPE.

use rayon::prelude::*;

use super::rows_per_task;

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

#[cfg(test)]
mod tests {
    use super::super::testing::*;
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
}
