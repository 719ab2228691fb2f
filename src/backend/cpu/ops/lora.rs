//! The mixture of LoRA experts (twins of `kernels/lora.cu`): the selected experts' update added to
//! a projection's output, and its backward.
//!
//! Shapes (one MoLoRA layer): experts `a [E, d_in, r]`, `b [E, r, d_out]` (both `[in, out]`
//! row-major); selection `experts [B, k]` and `gates [B, k]`; activations `x [B, T, d_in]`, output
//! `out [B, T, d_out]`.

use super::gemm_strided;

pub use crate::backend::shapes::MixShape;

/// `out[b] += in_scope[b] * sum_j gates[b,j] * scale * (x[b] A_e) B_e` over the k selected experts
/// `e = experts[b,j]`. Only the selected experts are computed. When `shrink` is given it receives
/// `x[b] A_e` as `[B, k, T, r]` for the backward pass.
#[allow(clippy::too_many_arguments)]
pub fn molora_forward(
    s: MixShape,
    x: &[f32],
    a: &[f32],
    b_mat: &[f32],
    experts: &[u32],
    gates: &[f32],
    in_scope: &[bool],
    out: &mut [f32],
    mut shrink: Option<&mut [f32]>,
) {
    let (t, r) = (s.seq, s.rank);
    let mut h = vec![0.0f32; t * r];
    for b in 0..s.batch {
        if !in_scope[b] {
            continue;
        }
        let xb = &x[b * t * s.d_in..][..t * s.d_in];
        let ob = &mut out[b * t * s.d_out..][..t * s.d_out];
        for j in 0..s.k {
            let e = experts[b * s.k + j] as usize;
            let ae = &a[e * s.d_in * r..][..s.d_in * r];
            let be = &b_mat[e * r * s.d_out..][..r * s.d_out];
            gemm_strided(
                t,
                r,
                s.d_in,
                xb,
                (s.d_in as isize, 1),
                ae,
                (r as isize, 1),
                &mut h,
                false,
            );
            if let Some(saved) = shrink.as_deref_mut() {
                saved[(b * s.k + j) * t * r..][..t * r].copy_from_slice(&h);
            }
            let g = gates[b * s.k + j] * s.scale;
            h.iter_mut().for_each(|v| *v *= g);
            gemm_strided(
                t,
                s.d_out,
                r,
                &h,
                (r as isize, 1),
                be,
                (s.d_out as isize, 1),
                ob,
                true,
            );
        }
    }
}

/// Gradients of [`molora_forward`]: accumulates into `da [E, d_in, r]`, `db [E, r, d_out]` and
/// `dx [B, T, d_in]`, and writes `dgates [B, k]`. `shrink` is what the forward saved.
#[allow(clippy::too_many_arguments)]
pub fn molora_backward(
    s: MixShape,
    x: &[f32],
    a: &[f32],
    b_mat: &[f32],
    experts: &[u32],
    gates: &[f32],
    in_scope: &[bool],
    shrink: &[f32],
    dout: &[f32],
    da: &mut [f32],
    db: &mut [f32],
    dgates: &mut [f32],
    mut dx: Option<&mut [f32]>,
) {
    let (t, r) = (s.seq, s.rank);
    let mut dh = vec![0.0f32; t * r];
    let mut h_scaled = vec![0.0f32; t * r];
    for b in 0..s.batch {
        if !in_scope[b] {
            dgates[b * s.k..][..s.k].fill(0.0);
            continue;
        }
        let xb = &x[b * t * s.d_in..][..t * s.d_in];
        let dob = &dout[b * t * s.d_out..][..t * s.d_out];
        for j in 0..s.k {
            let e = experts[b * s.k + j] as usize;
            let ae = &a[e * s.d_in * r..][..s.d_in * r];
            let be = &b_mat[e * r * s.d_out..][..r * s.d_out];
            let h = &shrink[(b * s.k + j) * t * r..][..t * r];
            let g = gates[b * s.k + j] * s.scale;
            // dh_raw[T, r] = dout_b [T, d_out] B_e^T
            gemm_strided(
                t,
                r,
                s.d_out,
                dob,
                (s.d_out as isize, 1),
                be,
                (1, s.d_out as isize),
                &mut dh,
                false,
            );
            dgates[b * s.k + j] = s.scale * h.iter().zip(&dh).map(|(a, b)| a * b).sum::<f32>();
            // dB_e[r, d_out] += (g h)^T dout_b
            for (hs, hv) in h_scaled.iter_mut().zip(h) {
                *hs = hv * g;
            }
            let dbe = &mut db[e * r * s.d_out..][..r * s.d_out];
            gemm_strided(
                r,
                s.d_out,
                t,
                &h_scaled,
                (1, r as isize),
                dob,
                (s.d_out as isize, 1),
                dbe,
                true,
            );
            // dh = g * dh_raw; dA_e[d_in, r] += x_b^T dh; dx_b += dh A_e^T
            dh.iter_mut().for_each(|v| *v *= g);
            let dae = &mut da[e * s.d_in * r..][..s.d_in * r];
            gemm_strided(
                s.d_in,
                r,
                t,
                xb,
                (1, s.d_in as isize),
                &dh,
                (r as isize, 1),
                dae,
                true,
            );
            if let Some(dx) = dx.as_deref_mut() {
                let dxb = &mut dx[b * t * s.d_in..][..t * s.d_in];
                gemm_strided(
                    t,
                    s.d_in,
                    r,
                    &dh,
                    (r as isize, 1),
                    ae,
                    (1, r as isize),
                    dxb,
                    true,
                );
            }
        }
    }
}
