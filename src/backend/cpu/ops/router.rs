//! ELDER's routers (twins of `kernels/router.cu`): per-sequence routing of one MoLoRA layer
//! (softmax, top-k, optional renormalisation), its backward, the routers' parameter gradients and
//! the guided loss.
//!
//! Shapes (one MoLoRA layer): query `q [B, d_in]`, router `w_r [E, d_in]`, `b_r [E]`; selection
//! `experts [B, k]` (expert indices) and `gates [B, k]` (mixture weights).

use super::{gemm_strided, softmax_inplace, topk};

/// The routing decision of one layer for a batch of sequences.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Router probabilities `[B, E]`.
    pub probs: Vec<f32>,
    /// Selected experts `[B, k]`, highest probability first.
    pub experts: Vec<u32>,
    /// Mixture weight of each selected expert `[B, k]`.
    pub gates: Vec<f32>,
    pub num_experts: usize,
    pub k: usize,
}

/// Router of one layer: `p = softmax(q W_r^T + b_r)`, top-k, gates = p of the chosen experts
/// (renormalised over the chosen ones when `renormalize`).
pub fn route(q: &[f32], w_r: &[f32], b_r: &[f32], k: usize, renormalize: bool) -> Routing {
    let e = b_r.len();
    let d_in = w_r.len() / e;
    let batch = q.len() / d_in;
    let mut probs = vec![0.0f32; batch * e];
    // logits[B, E] = q [B, d_in] . W_r^T, W_r stored [E, d_in]
    gemm_strided(
        batch,
        e,
        d_in,
        q,
        (d_in as isize, 1),
        w_r,
        (1, d_in as isize),
        &mut probs,
        false,
    );
    let mut experts = Vec::with_capacity(batch * k);
    let mut gates = Vec::with_capacity(batch * k);
    for row in probs.chunks_mut(e) {
        for (p, b) in row.iter_mut().zip(b_r) {
            *p += b;
        }
        softmax_inplace(row);
        let chosen = topk(row, k);
        let total: f32 = chosen.iter().map(|&i| row[i]).sum();
        for &i in &chosen {
            experts.push(i as u32);
            gates.push(if renormalize { row[i] / total } else { row[i] });
        }
    }
    Routing {
        probs,
        experts,
        gates,
        num_experts: e,
        k,
    }
}

/// Gradient of the router logits of one layer, from the gradient of the gates and the guided loss.
///
/// `dgates [B, k]` is dL/dgate of each selected expert. `guide` lists, per sequence, the preset experts
/// whose log-probability is pushed up with weight `guide_weight` (the guided loss
/// `-(w/B) sum_b sum_{i in preset} log p[b, i]`). Returns dL/dlogits `[B, E]`.
pub fn route_backward(
    r: &Routing,
    dgates: &[f32],
    renormalize: bool,
    guide: Option<(&[u32], f32)>,
) -> Vec<f32> {
    let (e, k) = (r.num_experts, r.k);
    let batch = r.probs.len() / e;
    let mut dlogits = vec![0.0f32; batch * e];
    for b in 0..batch {
        let p = &r.probs[b * e..][..e];
        let mut dp = vec![0.0f32; e];
        let sel = &r.experts[b * k..][..k];
        let dg = &dgates[b * k..][..k];
        if renormalize {
            // gate_j = p_j / S, S = sum_sel p  =>  dp_i = (dg_i - sum_j dg_j gate_j) / S
            let total: f32 = sel.iter().map(|&i| p[i as usize]).sum();
            let g = &r.gates[b * k..][..k];
            let mix: f32 = dg.iter().zip(g).map(|(a, b)| a * b).sum();
            for (j, &i) in sel.iter().enumerate() {
                dp[i as usize] += (dg[j] - mix) / total;
            }
        } else {
            for (j, &i) in sel.iter().enumerate() {
                dp[i as usize] += dg[j];
            }
        }
        if let Some((preset, weight)) = guide {
            let per_seq = preset.len() / batch;
            for &i in &preset[b * per_seq..][..per_seq] {
                dp[i as usize] -= weight / batch as f32 / p[i as usize];
            }
        }
        let dot: f32 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
        for i in 0..e {
            dlogits[b * e + i] = p[i] * (dp[i] - dot);
        }
    }
    dlogits
}

/// The router's parameter gradients from its logit gradient `dlogits [B, E]` and its input
/// `q [B, d_in]`: `dW_r [E, d_in] += dlogits^T q`, `db_r [E] += column sums of dlogits`
/// (summed over the batch in order).
pub fn router_param_grad(
    dlogits: &[f32],
    q: &[f32],
    experts: usize,
    dw_r: &mut [f32],
    db_r: &mut [f32],
) {
    let batch = dlogits.len() / experts;
    let d_in = dw_r.len() / experts;
    for b in 0..batch {
        for e in 0..experts {
            let dl = dlogits[b * experts + e];
            db_r[e] += dl;
            for (w, qv) in dw_r[e * d_in..(e + 1) * d_in]
                .iter_mut()
                .zip(&q[b * d_in..(b + 1) * d_in])
            {
                *w += dl * qv;
            }
        }
    }
}

/// Guided loss of one layer: `-(1/B) sum_b sum_{i in preset(b)} log p[b, i]`.
pub fn guided_loss(r: &Routing, preset: &[u32]) -> f32 {
    let e = r.num_experts;
    let batch = r.probs.len() / e;
    let per_seq = preset.len() / batch;
    let mut loss = 0.0;
    for b in 0..batch {
        for &i in &preset[b * per_seq..][..per_seq] {
            loss -= r.probs[b * e + i as usize].max(f32::MIN_POSITIVE).ln();
        }
    }
    loss / batch as f32
}
