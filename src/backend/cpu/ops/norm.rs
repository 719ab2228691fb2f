//! LayerNorm and RMSNorm with their backwards (twins of `kernels/norm.cu`).

use rayon::prelude::*;

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

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

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
}
