//! Cross-entropy through the lm_head in one pass over the vocabulary.
//!
//! The head is the largest matrix an edit step touches (gpt2: 154 MB, SmolLM2: 113 MB), and for the
//! few target rows of an edit reading it is the whole cost. Unfused, it is read twice per step:
//! once for the logits, once for the input gradient `dx = (softmax - onehot) W^T`. Here each chunk
//! of vocabulary rows is read from memory once: its logits go through an online softmax (running
//! maximum and sum per row, rescaled when the maximum grows) and, while the chunk is still in the
//! cache, the probability-weighted sum of its rows goes into a running `acc = sum_v p_v W_v`. At
//! the end `dx = weight * (acc / sum - W_target)` and the loss is `max + ln sum - logit_target`.
//!
//! The vocabulary is split into a fixed number of groups of chunks, each handled by one rayon task
//! in order, and the groups are merged in order, so the result does not depend on the thread count.

use rayon::prelude::*;

use super::ops::{self, Layout, MatRef};
use super::skinny::{self, BOrder};

/// Bytes of head rows per chunk: small enough to stay in L2 between the logits and the
/// weighted sum.
const CHUNK_BYTES: usize = 1 << 20;
/// Groups of chunks the vocabulary is split into (the unit of threading).
const GROUPS: usize = 16;

/// `sum_r CE(x_r W, targets[r])` for the rows of `x` (`[m, w.in_dim]`), with
/// `dx = weight * d(sum)/dx` written into `dx` (the same convention as [`ops::cross_entropy`]:
/// the returned loss is not weighted, the gradient is). `w` maps the hidden size to the vocabulary.
pub fn linear_cross_entropy(
    x: &[f32],
    w: MatRef,
    targets: &[u32],
    weight: f32,
    dx: &mut [f32],
) -> f32 {
    let weights = vec![weight; targets.len()];
    let mut loss = 0.0;
    for_row_chunks(x, w, targets, &weights, dx, |rows| {
        loss += rows.loss.iter().fold(0.0, |a, b| a + b);
    });
    loss
}

/// What [`linear_cross_entropy_rows`] returns for each row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowLosses {
    /// `CE(x_r W, targets[r])`, unweighted.
    pub loss: Vec<f32>,
    /// The row's most likely token (the first of equal logits).
    pub argmax: Vec<u32>,
}

/// [`linear_cross_entropy`] with a weight per row, returning each row's loss and argmax (the
/// trainer's early stop asks whether every target is already the argmax).
pub fn linear_cross_entropy_rows(
    x: &[f32],
    w: MatRef,
    targets: &[u32],
    weights: &[f32],
    dx: &mut [f32],
) -> RowLosses {
    assert_eq!(weights.len(), targets.len(), "one weight per row");
    let mut out = RowLosses::default();
    for_row_chunks(x, w, targets, weights, dx, |rows| {
        out.loss.extend_from_slice(&rows.loss);
        out.argmax.extend_from_slice(&rows.argmax);
    });
    out
}

/// Runs the fused pass (or the reference) on chunks of rows, handing each chunk's rows to `sink`
/// in order.
fn for_row_chunks(
    x: &[f32],
    w: MatRef,
    targets: &[u32],
    weights: &[f32],
    dx: &mut [f32],
    mut sink: impl FnMut(RowLosses),
) {
    let (d, vocab, m) = (w.in_dim, w.out_dim, targets.len());
    assert_eq!(x.len(), m * d, "linear_cross_entropy: x is not [{m}, {d}]");
    assert_eq!(
        dx.len(),
        m * d,
        "linear_cross_entropy: dx is not [{m}, {d}]"
    );
    if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
        panic!("linear_cross_entropy: target {t} is outside the vocabulary of {vocab}");
    }
    // The fused pass needs whole vocabulary rows contiguous (`[vocab, d]`: embedding tables and
    // nn.Linear heads) and the few-row kernels.
    if w.layout != Layout::OutIn || !skinny::enabled() {
        return sink(unfused(x, w, targets, weights, dx));
    }
    for rows in fused(x, w, targets, weights, dx) {
        sink(rows);
    }
}

/// The reference: logits, softmax cross-entropy, input gradient.
fn unfused(x: &[f32], w: MatRef, targets: &[u32], weights: &[f32], dx: &mut [f32]) -> RowLosses {
    let (m, vocab) = (targets.len(), w.out_dim);
    let mut logits = vec![0.0f32; m * vocab];
    ops::matmul(x, m, w, &mut logits, false);
    let mut dlogits = vec![0.0f32; logits.len()];
    let mut out = RowLosses::default();
    // Row by row, so each row's loss and weight are its own.
    for (r, (&t, &weight)) in targets.iter().zip(weights).enumerate() {
        let row = &logits[r * vocab..(r + 1) * vocab];
        out.argmax.push(ops::argmax(row) as u32);
        out.loss.push(ops::cross_entropy(
            row,
            vocab,
            &[Some(t)],
            weight,
            &mut dlogits[r * vocab..(r + 1) * vocab],
        ));
    }
    ops::matmul_input_grad(&dlogits, m, w, dx, false);
    out
}

/// Online-softmax state of a run of vocabulary rows, per target row.
struct Partial {
    /// Largest logit seen.
    max: Vec<f32>,
    /// `sum_v exp(logit_v - max)`.
    sum: Vec<f32>,
    /// `sum_v exp(logit_v - max) W_v`, `[m, d]`.
    acc: Vec<f32>,
    /// The target's logit, once its vocabulary row has been seen.
    target_logit: Vec<Option<f32>>,
    /// The largest logit seen and its vocabulary row (the first of equals).
    best: Vec<(f32, u32)>,
}

impl Partial {
    fn new(m: usize, d: usize) -> Self {
        Partial {
            max: vec![f32::NEG_INFINITY; m],
            sum: vec![0.0; m],
            acc: vec![0.0; m * d],
            target_logit: vec![None; m],
            best: vec![(f32::NEG_INFINITY, 0); m],
        }
    }

    /// Moves row `r`'s reference point up to `new_max`, scaling what was summed so far.
    fn raise_max(&mut self, r: usize, d: usize, new_max: f32) {
        if new_max > self.max[r] {
            let scale = (self.max[r] - new_max).exp();
            self.sum[r] *= scale;
            self.acc[r * d..(r + 1) * d]
                .iter_mut()
                .for_each(|a| *a *= scale);
            self.max[r] = new_max;
        }
    }
}

/// The fused pass over tiles of at most [`skinny::MAX_ROWS`] rows (the few-row kernels' limit),
/// each tile's losses in order. Every chunk of vocabulary rows is read from memory once for all
/// the tiles, which take it in turn while it is in the cache: with one pass per tile the head
/// was streamed from memory once per 32 target rows. Each tile folds the same chunks in the same
/// order as alone, so its numbers do not depend on the other tiles.
fn fused(x: &[f32], w: MatRef, targets: &[u32], weights: &[f32], dx: &mut [f32]) -> Vec<RowLosses> {
    let (d, vocab, m) = (w.in_dim, w.out_dim, targets.len());
    let tiles: Vec<std::ops::Range<usize>> = (0..m)
        .step_by(skinny::MAX_ROWS)
        .map(|r0| r0..(r0 + skinny::MAX_ROWS).min(m))
        .collect();
    let chunk = (CHUNK_BYTES / (4 * d)).max(16).min(vocab);
    let chunks = vocab.div_ceil(chunk);
    let groups = GROUPS.min(chunks);
    // Per group, each tile's partial state.
    let partials: Vec<Vec<Partial>> = (0..groups)
        .into_par_iter()
        .map(|g| {
            let mut parts: Vec<Partial> = tiles.iter().map(|t| Partial::new(t.len(), d)).collect();
            let mut probs = vec![0.0f32; skinny::MAX_ROWS.min(m) * chunk];
            for c in g * chunks / groups..(g + 1) * chunks / groups {
                let v0 = c * chunk;
                let v1 = (v0 + chunk).min(vocab);
                for (part, t) in parts.iter_mut().zip(&tiles) {
                    let tile_x = &x[t.start * d..t.end * d];
                    add_chunk(part, tile_x, w, &targets[t.clone()], v0..v1, &mut probs);
                }
            }
            parts
        })
        .collect();
    tiles
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let parts = partials.iter().map(|group| &group[i]);
            let dx = &mut dx[t.start * d..t.end * d];
            finish_tile(parts, w, &targets[t.clone()], &weights[t.clone()], dx)
        })
        .collect()
}

/// Merges one tile's partial states, group by group in order, into its losses, argmaxes and
/// input gradient.
fn finish_tile<'a>(
    partials: impl Iterator<Item = &'a Partial>,
    w: MatRef,
    targets: &[u32],
    weights: &[f32],
    dx: &mut [f32],
) -> RowLosses {
    let (d, m) = (w.in_dim, targets.len());
    let mut total = Partial::new(m, d);
    for part in partials {
        for r in 0..m {
            total.raise_max(r, d, part.max[r]);
            let scale = (part.max[r] - total.max[r]).exp();
            total.sum[r] += scale * part.sum[r];
            for (t, p) in total.acc[r * d..(r + 1) * d]
                .iter_mut()
                .zip(&part.acc[r * d..(r + 1) * d])
            {
                *t += scale * p;
            }
            if part.target_logit[r].is_some() {
                total.target_logit[r] = part.target_logit[r];
            }
            if part.best[r].0 > total.best[r].0 {
                total.best[r] = part.best[r];
            }
        }
    }

    let mut out = RowLosses::default();
    for (r, (&t, &weight)) in targets.iter().zip(weights).enumerate() {
        let target_logit = total.target_logit[r].expect("every vocabulary row was visited");
        out.loss
            .push(total.max[r] + total.sum[r].ln() - target_logit);
        out.argmax.push(total.best[r].1);
        let target_row = &w.data[t as usize * d..(t as usize + 1) * d];
        let inv_sum = 1.0 / total.sum[r];
        for ((g, a), wt) in dx[r * d..(r + 1) * d]
            .iter_mut()
            .zip(&total.acc[r * d..(r + 1) * d])
            .zip(target_row)
        {
            *g = weight * (a * inv_sum - wt);
        }
    }
    out
}

/// Folds vocabulary rows `v0..v1` into `part`: logits, online softmax, weighted sum of the rows.
fn add_chunk(
    part: &mut Partial,
    x: &[f32],
    w: MatRef,
    targets: &[u32],
    vocab_rows: std::ops::Range<usize>,
    probs: &mut [f32],
) {
    let (d, m) = (w.in_dim, targets.len());
    let nv = vocab_rows.len();
    let rows = &w.data[vocab_rows.start * d..vocab_rows.end * d];
    let probs = &mut probs[..m * nv];
    skinny::gemm_serial(
        m,
        nv,
        d,
        x,
        d,
        rows,
        BOrder::Columns { stride: d },
        probs,
        false,
    );
    for (r, logits) in probs.chunks_exact_mut(nv).enumerate() {
        let t = targets[r] as usize;
        if vocab_rows.contains(&t) {
            part.target_logit[r] = Some(logits[t - vocab_rows.start]);
        }
        let chunk_max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if chunk_max > part.best[r].0 {
            let at = logits.iter().position(|&l| l == chunk_max).unwrap_or(0);
            part.best[r] = (chunk_max, (vocab_rows.start + at) as u32);
        }
        part.raise_max(r, d, chunk_max);
        let max = part.max[r];
        let mut sum = 0.0;
        for l in logits.iter_mut() {
            *l = (*l - max).exp();
            sum += *l;
        }
        part.sum[r] += sum;
    }
    // acc[m, d] += probs[m, nv] rows[nv, d], while `rows` is still in the cache.
    skinny::gemm_serial(
        m,
        d,
        nv,
        probs,
        nv,
        rows,
        BOrder::Rows { stride: d },
        &mut part.acc,
        true,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect()
    }

    #[test]
    fn fused_pass_matches_logits_then_cross_entropy() {
        // Vocabulary sizes that give one chunk, uneven chunks and more chunks than groups; row
        // counts below, at and above the few-row limit; logits large enough that the online
        // maximum moves between chunks.
        for &(m, d, vocab, scale) in &[
            (1, 8, 5, 1.0),
            (3, 64, 5000, 3.0),
            (7, 40, 70_001, 2.0),
            (skinny::MAX_ROWS + 3, 24, 3001, 4.0),
        ] {
            let x = values(m * d, 1, 1.0);
            let table = values(vocab * d, 2, scale);
            let w = MatRef {
                data: &table,
                in_dim: d,
                out_dim: vocab,
                layout: Layout::OutIn,
            };
            let targets: Vec<u32> = (0..m).map(|r| ((r * 7919 + 13) % vocab) as u32).collect();
            let weight = 0.25;
            let (want, want_dx) = reference_f64(&x, &table, d, &targets, weight);
            let mut unfused_dx = vec![0.0; m * d];
            let unfused_loss: f32 = unfused(&x, w, &targets, &vec![weight; m], &mut unfused_dx)
                .loss
                .iter()
                .sum();
            let mut got_dx = vec![f32::NAN; m * d];
            let got = linear_cross_entropy(&x, w, &targets, weight, &mut got_dx);
            // The fused pass must be at least about as close to the f64 truth as the unfused one.
            let loss_err = |l: f32| (l as f64 - want).abs();
            let dx_err = |dx: &[f32]| {
                dx.iter()
                    .zip(&want_dx)
                    .fold(0.0f64, |e, (g, w)| e.max((*g as f64 - w).abs()))
            };
            let grad_scale = want_dx.iter().fold(0.0f64, |a, g| a.max(g.abs()));
            let case = format!("m{m} d{d} V{vocab}");
            assert!(
                loss_err(got) <= 1e-5 * want.abs().max(1.0),
                "{case}: loss {got} vs {want}"
            );
            assert!(
                dx_err(&got_dx) <= 1e-5 * grad_scale,
                "{case}: dx off by {} (scale {grad_scale})",
                dx_err(&got_dx)
            );
            assert!(
                loss_err(got) <= 2.0 * loss_err(unfused_loss) + 1e-6 * want.abs(),
                "{case}: fused loss error {} vs unfused {}",
                loss_err(got),
                loss_err(unfused_loss)
            );
            assert!(
                dx_err(&got_dx) <= 2.0 * dx_err(&unfused_dx) + 1e-7 * grad_scale,
                "{case}: fused dx error {} vs unfused {}",
                dx_err(&got_dx),
                dx_err(&unfused_dx)
            );
        }
    }

    #[test]
    fn tiles_read_together_give_each_tiles_own_bits() {
        // The fused pass reads each vocabulary chunk once for every tile of rows; each tile
        // must come out as it does alone (as it did when tiles ran one after another).
        let (d, vocab) = (40, 5000);
        let m = 2 * skinny::MAX_ROWS + 5;
        let w_data = values(d * vocab, 3, 0.5);
        let w = MatRef {
            data: &w_data,
            in_dim: d,
            out_dim: vocab,
            layout: Layout::OutIn,
        };
        let x = values(m * d, 4, 1.0);
        let targets: Vec<u32> = (0..m as u32).map(|r| r * 37 % vocab as u32).collect();
        let weights: Vec<f32> = (0..m).map(|r| 0.5 + r as f32 / m as f32).collect();
        let mut dx = vec![f32::NAN; m * d];
        let all = linear_cross_entropy_rows(&x, w, &targets, &weights, &mut dx);
        let mut alone = RowLosses::default();
        let mut dx_alone = vec![f32::NAN; m * d];
        for r0 in (0..m).step_by(skinny::MAX_ROWS) {
            let r1 = (r0 + skinny::MAX_ROWS).min(m);
            let tile = linear_cross_entropy_rows(
                &x[r0 * d..r1 * d],
                w,
                &targets[r0..r1],
                &weights[r0..r1],
                &mut dx_alone[r0 * d..r1 * d],
            );
            alone.loss.extend(tile.loss);
            alone.argmax.extend(tile.argmax);
        }
        assert_eq!(all.argmax, alone.argmax);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&all.loss), bits(&alone.loss));
        assert_eq!(bits(&dx), bits(&dx_alone));
    }

    /// Per-row weights scale each row's gradient alone; per-row losses and argmaxes are each row's
    /// own (fused pass and reference alike).
    #[test]
    fn rows_have_their_own_weight_loss_and_argmax() {
        for &(m, d, vocab) in &[(5, 32, 7000), (skinny::MAX_ROWS + 2, 16, 900)] {
            let x = values(m * d, 3, 1.0);
            let table = values(vocab * d, 4, 3.0);
            let w = MatRef {
                data: &table,
                in_dim: d,
                out_dim: vocab,
                layout: Layout::OutIn,
            };
            let targets: Vec<u32> = (0..m).map(|r| ((r * 31 + 5) % vocab) as u32).collect();
            let weights: Vec<f32> = (0..m).map(|r| 0.5 + r as f32).collect();
            let mut dx = vec![f32::NAN; m * d];
            let rows = linear_cross_entropy_rows(&x, w, &targets, &weights, &mut dx);
            let mut ref_dx = vec![f32::NAN; m * d];
            let mut ref_rows = unfused(&x, w, &targets, &weights, &mut ref_dx);
            for r in 0..m {
                let (want, want_dx) = reference_f64(
                    &x[r * d..(r + 1) * d],
                    &table,
                    d,
                    &targets[r..=r],
                    weights[r],
                );
                assert!((rows.loss[r] as f64 - want).abs() <= 1e-4 * want.abs().max(1.0));
                assert!((ref_rows.loss[r] as f64 - want).abs() <= 1e-4 * want.abs().max(1.0));
                for (g, w) in dx[r * d..(r + 1) * d].iter().zip(&want_dx) {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-4 * (weights[r] as f64),
                        "row {r}"
                    );
                }
                let xr = &x[r * d..(r + 1) * d];
                let logits: Vec<f32> = (0..vocab)
                    .map(|v| (0..d).map(|i| xr[i] * table[v * d + i]).sum())
                    .collect();
                assert_eq!(rows.argmax[r], ops::argmax(&logits) as u32, "row {r}");
            }
            ref_rows
                .argmax
                .iter_mut()
                .zip(&rows.argmax)
                .for_each(|(a, b)| assert_eq!(a, b));
        }
    }

    /// Loss and `dx` in f64, straight from the definition.
    fn reference_f64(
        x: &[f32],
        table: &[f32],
        d: usize,
        targets: &[u32],
        weight: f32,
    ) -> (f64, Vec<f64>) {
        let vocab = table.len() / d;
        let mut loss = 0.0;
        let mut dx = vec![0.0f64; x.len()];
        for (r, &t) in targets.iter().enumerate() {
            let xr = &x[r * d..(r + 1) * d];
            let logits: Vec<f64> = (0..vocab)
                .map(|v| (0..d).map(|i| xr[i] as f64 * table[v * d + i] as f64).sum())
                .collect();
            let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = logits.iter().map(|l| (l - max).exp()).sum();
            loss += max + sum.ln() - logits[t as usize];
            for (v, l) in logits.iter().enumerate() {
                let p = (l - max).exp() / sum - if v == t as usize { 1.0 } else { 0.0 };
                for i in 0..d {
                    dx[r * d + i] += weight as f64 * p * table[v * d + i] as f64;
                }
            }
        }
        (loss, dx)
    }

    #[test]
    #[should_panic(expected = "outside the vocabulary")]
    fn a_target_outside_the_vocabulary_is_refused() {
        let table = values(10 * 4, 3, 1.0);
        let w = MatRef {
            data: &table,
            in_dim: 4,
            out_dim: 10,
            layout: Layout::OutIn,
        };
        linear_cross_entropy(&values(4, 4, 1.0), w, &[10], 1.0, &mut [0.0; 4]);
    }
}
