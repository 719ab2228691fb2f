//! Launcher for `kernels/adam.cu`. CPU twin: `ops::adam` (same bias-correction arithmetic).

use anyhow::{bail, Result};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};

use super::buffers::{input, output};
use super::device::{GpuDevice, KArg};
use crate::backend::cpu::ops::AdamStep;

/// One Adam step on `n` f32 parameters, in place on `param`, `m`, `v`.
pub fn adam<P: DevicePtrMut<f32>>(
    dev: &GpuDevice,
    param: &mut P,
    grad: &impl DevicePtr<f32>,
    m: &mut P,
    v: &mut P,
    n: usize,
    step: AdamStep,
) -> Result<()> {
    if step.t == 0 {
        bail!("adam: step count t is 1-based, found 0");
    }
    // Host-side bias corrections, computed exactly as the CPU twin computes them.
    let bc1 = 1.0 - step.beta1.powi(step.t as i32);
    let bc2 = 1.0 - step.beta2.powi(step.t as i32);
    let s = dev.stream();
    let (pp, _g1) = output(s, "adam param", param, n)?;
    let (pg, _g2) = input(s, "adam grad", grad, n)?;
    let (pm, _g3) = output(s, "adam m", m, n)?;
    let (pv, _g4) = output(s, "adam v", v, n)?;
    let args = [
        pp,
        pg,
        pm,
        pv,
        KArg::U64(n as u64),
        KArg::F32(step.beta1),
        KArg::F32(step.beta2),
        KArg::F32(step.eps),
        KArg::F32(step.lr / bc1),
        KArg::F32(bc2.sqrt()),
    ];
    let cfg = LaunchConfig {
        grid_dim: (dev.grid_for(n, 256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: buffer lengths checked above; argument list matches adam_f32.
    unsafe { dev.launch("adam", "adam_f32", cfg, &args) }
}
