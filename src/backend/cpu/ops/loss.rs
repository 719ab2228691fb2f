//! Row reductions of logits (twins of `kernels/loss.cu` and of the router's softmax and top-k in
//! `kernels/router.cu`): log-sum-exp, argmax, softmax cross-entropy, softmax, top-k.

use rayon::prelude::*;

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

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

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
}
