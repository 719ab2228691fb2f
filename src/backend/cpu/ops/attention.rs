//! Causal attention over a padded batch with a KV cache, and its backward (twins of
//! `kernels/attention.cu`).

use rayon::prelude::*;

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

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

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
}
