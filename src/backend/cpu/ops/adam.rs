//! The Adam update (twin of `kernels/adam.cu`).

use rayon::prelude::*;

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
    use super::*;

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
}
