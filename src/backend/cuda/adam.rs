//! Launchers for `kernels/adam.cu`: the Adam step (CPU twin: `ops::adam`, same bias-correction
//! arithmetic) and dynamic loss scaling around it.
//!
//! Why loss scaling: the edit step's backward runs through the frozen model in the activation dtype.
//! In f16, whose smallest normal value is 6.1e-5, most of a 50k-vocabulary softmax gradient
//! (`p / n`, about 2e-5 per entry) is subnormal or zero. The backward therefore starts from the loss
//! times a power of two (exact in every dtype: it moves exponents only), and Adam divides it out in
//! f32. A step whose gradients overflowed is skipped and the scale halved; a run of clean steps
//! doubles it. All of it stays on the device: no host synchronisation inside an iteration.

use anyhow::{bail, Context, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};

use super::buffers::{input, opt_input, output, KernelDtype};
use super::device::{GpuDevice, KArg};
use super::KernelFamily;
use crate::backend::cpu::ops::AdamStep;

/// How the loss scale moves (the rule of torch's `GradScaler`, with a ceiling).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScalePolicy {
    pub init: f32,
    /// Factor after `growth_interval` clean steps in a row.
    pub growth: f32,
    /// Factor after a step whose gradients held inf or NaN (that step is skipped).
    pub backoff: f32,
    pub growth_interval: u32,
    /// Ceiling of the scale.
    pub max: f32,
}

impl LossScalePolicy {
    /// f16: start at 2^10 and grow by 2 every 50 clean steps up to 2^15, where the largest
    /// cross-entropy gradient (`(1 - p) * scale / n` for one supervised row) still fits below
    /// f16's maximum of 65504. The start is lower than torch's 2^16 because every overflow costs
    /// one of a batch's few iterations, and deeper activations overflow first (2^15 already
    /// overflows the backward of the tiny random Llama in tests/gpu_train.rs); 2^10 keeps most of
    /// the softmax tail that scale 1 flushes to zero. bf16 and f32 have f32's exponent range and
    /// need no scaling: scale 1, and non-finite steps are skipped.
    pub fn for_dtype<T: KernelDtype>() -> Self {
        match T::SUFFIX {
            "f16" => Self {
                init: 1024.0,
                growth: 2.0,
                backoff: 0.5,
                growth_interval: 50,
                max: 32768.0,
            },
            _ => Self::fixed(1.0),
        }
    }

    /// A scale that never changes (steps with non-finite gradients are still skipped).
    pub fn fixed(scale: f32) -> Self {
        Self {
            init: scale,
            growth: 1.0,
            backoff: 1.0,
            growth_interval: u32::MAX,
            max: scale,
        }
    }

    /// The scale and clean-step count after a step (CPU twin of `loss_scale_update`).
    pub fn next(&self, scale: f32, good: u32, overflowed: bool) -> (f32, u32) {
        if overflowed {
            (scale * self.backoff, 0)
        } else if good + 1 >= self.growth_interval {
            ((scale * self.growth).min(self.max), 0)
        } else {
            (scale, good + 1)
        }
    }

    fn validate(&self) -> Result<()> {
        let positive = |v: f32| v.is_finite() && v > 0.0;
        let valid = positive(self.init)
            && positive(self.max)
            && self.init <= self.max
            && positive(self.growth)
            && positive(self.backoff)
            && self.growth_interval > 0;
        if !valid {
            bail!("loss scale policy needs 0 < init <= max, positive factors and a non-zero interval, found {self:?}");
        }
        Ok(())
    }
}

/// The loss scale on the device: `scale [1]` and `state [3]` = (overflow in this iteration, clean
/// steps in a row, steps skipped so far), as `kernels/adam.cu` reads them.
pub struct LossScale {
    policy: LossScalePolicy,
    scale: CudaSlice<f32>,
    state: CudaSlice<i32>,
}

/// What the host reads back (once per edit batch).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScaleStatus {
    pub scale: f32,
    pub clean_steps: u32,
    pub skipped_steps: u32,
}

impl LossScale {
    pub fn new(dev: &GpuDevice, policy: LossScalePolicy) -> Result<Self> {
        policy.validate()?;
        Ok(Self {
            policy,
            scale: dev.upload(&[policy.init])?,
            state: dev.upload(&[0i32; 3])?,
        })
    }

    pub fn policy(&self) -> LossScalePolicy {
        self.policy
    }

    /// The scale the backward multiplies the loss by (read on the device by the loss kernels).
    pub fn scale(&self) -> &CudaSlice<f32> {
        &self.scale
    }

    /// Marks this iteration as overflowed if `grad [n]` holds inf or NaN.
    pub fn check(&mut self, dev: &GpuDevice, grad: &impl DevicePtr<f32>, n: usize) -> Result<()> {
        let s = dev.stream();
        let (pg, _g1) = input(s, "loss scale grad", grad, n)?;
        let (ps, _g2) = output(s, "loss scale state", &mut self.state, 3)?;
        let args = [pg, KArg::U64(n as u64), ps];
        let cfg = LaunchConfig {
            grid_dim: (dev.grid_for(n, 256), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: buffer lengths checked above; argument list matches grads_nonfinite_f32.
        unsafe { dev.launch(KernelFamily::Adam, "grads_nonfinite_f32", cfg, &args) }
    }

    /// Moves the scale after this iteration's step and clears the overflow mark.
    pub fn update(&mut self, dev: &GpuDevice) -> Result<()> {
        let p = self.policy;
        let s = dev.stream();
        let (pscale, _g1) = output(s, "loss scale", &mut self.scale, 1)?;
        let (pstate, _g2) = output(s, "loss scale state", &mut self.state, 3)?;
        let interval = i32::try_from(p.growth_interval).unwrap_or(i32::MAX);
        let args = [
            pscale,
            pstate,
            KArg::I32(interval),
            KArg::F32(p.growth),
            KArg::F32(p.backoff),
            KArg::F32(p.max),
        ];
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one-element scale and three-element state; argument list matches loss_scale_update.
        unsafe { dev.launch(KernelFamily::Adam, "loss_scale_update", cfg, &args) }
    }

    /// Reads the scale and counters (waits for the stream).
    pub fn status(&self, dev: &GpuDevice) -> Result<LossScaleStatus> {
        let scale = dev
            .download(&self.scale)
            .context("reading the loss scale")?[0];
        let state = dev
            .download(&self.state)
            .context("reading the loss scale")?;
        Ok(LossScaleStatus {
            scale,
            clean_steps: state[1].max(0) as u32,
            skipped_steps: state[2].max(0) as u32,
        })
    }
}

/// `[step_size, bc2_sqrt]` of one Adam step: `lr / (1 - beta1^t)` and `sqrt(1 - beta2^t)`, computed
/// on the host in f32 exactly as the CPU twin computes its bias corrections.
pub fn step_schedule(step: AdamStep) -> [f32; 2] {
    let bc1 = 1.0 - step.beta1.powi(step.t as i32);
    let bc2 = 1.0 - step.beta2.powi(step.t as i32);
    [step.lr / bc1, bc2.sqrt()]
}

/// Where an Adam launch reads its step size and bias correction.
pub enum Schedule<'a, S> {
    /// From this step, as launch arguments.
    Fixed(AdamStep),
    /// From `[step_size, bc2_sqrt]` ([`step_schedule`]) in device memory, read when the kernel
    /// runs: a captured graph then replays with whatever step was written there. `betas` gives
    /// beta1, beta2 and eps (its `lr` and `t` are not read).
    Device { betas: AdamStep, schedule: &'a S },
}

impl Schedule<'static, CudaSlice<f32>> {
    /// [`Schedule::Fixed`] without naming the (unused) device buffer type.
    pub fn fixed(step: AdamStep) -> Self {
        Schedule::Fixed(step)
    }
}

/// One Adam step on `n` f32 parameters, in place on `param`, `m`, `v`. With `scaling`, the
/// gradient is divided by the current loss scale and the step is skipped if this iteration
/// overflowed ([`LossScale::check`] must have run on every tensor first).
#[allow(clippy::too_many_arguments)]
pub fn adam<P: DevicePtrMut<f32>, S: DevicePtr<f32>>(
    dev: &GpuDevice,
    param: &mut P,
    grad: &impl DevicePtr<f32>,
    m: &mut P,
    v: &mut P,
    n: usize,
    schedule: Schedule<'_, S>,
    scaling: Option<&LossScale>,
) -> Result<()> {
    let (step, device_schedule) = match schedule {
        Schedule::Fixed(step) => {
            if step.t == 0 {
                bail!("adam: step count t is 1-based, found 0");
            }
            (step, None)
        }
        Schedule::Device { betas, schedule } => (betas, Some(schedule)),
    };
    let [step_size, bc2_sqrt] = match device_schedule {
        Some(_) => [0.0, 1.0], // not read
        None => step_schedule(step),
    };
    let s = dev.stream();
    let (pp, _g1) = output(s, "adam param", param, n)?;
    let (pg, _g2) = input(s, "adam grad", grad, n)?;
    let (pm, _g3) = output(s, "adam m", m, n)?;
    let (pv, _g4) = output(s, "adam v", v, n)?;
    let (psched, _g5) = opt_input(s, "adam schedule [step_size, bc2_sqrt]", device_schedule, 2)?;
    let (pscale, _g6) = opt_input(s, "adam loss scale", scaling.map(|l| &l.scale), 1)?;
    let (pstate, _g7) = opt_input(s, "adam loss scale state", scaling.map(|l| &l.state), 3)?;
    let args = [
        pp,
        pg,
        pm,
        pv,
        KArg::U64(n as u64),
        KArg::F32(step.beta1),
        KArg::F32(step.beta2),
        KArg::F32(step.eps),
        KArg::F32(step_size),
        KArg::F32(bc2_sqrt),
        psched,
        pscale,
        pstate,
    ];
    let cfg = LaunchConfig {
        grid_dim: (dev.grid_for(n, 256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: buffer lengths checked above; argument list matches adam_f32.
    unsafe { dev.launch(KernelFamily::Adam, "adam_f32", cfg, &args) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_backs_off_on_overflow_and_grows_after_clean_runs() {
        let p = LossScalePolicy {
            init: 8.0,
            growth: 2.0,
            backoff: 0.5,
            growth_interval: 3,
            max: 16.0,
        };
        assert_eq!(p.next(8.0, 0, false), (8.0, 1));
        assert_eq!(p.next(8.0, 1, false), (8.0, 2));
        assert_eq!(p.next(8.0, 2, false), (16.0, 0));
        assert_eq!(p.next(16.0, 2, false), (16.0, 0), "capped at max");
        assert_eq!(p.next(16.0, 2, true), (8.0, 0));
        let f = LossScalePolicy::fixed(1.0);
        assert_eq!(f.next(1.0, 5, true), (1.0, 0));
        assert_eq!(f.next(1.0, u32::MAX - 1, false), (1.0, 0));
    }

    #[test]
    fn f16_scales_by_powers_of_two_below_its_maximum_and_the_rest_do_not_scale() {
        let h = LossScalePolicy::for_dtype::<half::f16>();
        assert_eq!(h.init, 1024.0);
        assert!(h.validate().is_ok());
        // Powers of two, so scaling and unscaling are exact.
        for v in [h.init, h.max, h.growth, h.backoff] {
            assert_eq!(v.log2().fract(), 0.0, "{v}");
        }
        // The largest cross-entropy gradient at the ceiling is representable in f16.
        assert!(half::f16::from_f32(h.max).is_finite());
        assert!(h.max <= half::f16::MAX.to_f32());
        assert_eq!(
            LossScalePolicy::for_dtype::<half::bf16>(),
            LossScalePolicy::fixed(1.0)
        );
        assert_eq!(
            LossScalePolicy::for_dtype::<f32>(),
            LossScalePolicy::fixed(1.0)
        );
        assert!(LossScalePolicy { init: 0.0, ..h }.validate().is_err());
        assert!(LossScalePolicy {
            init: 2.0 * h.max,
            ..h
        }
        .validate()
        .is_err());
        assert!(LossScalePolicy {
            growth_interval: 0,
            ..h
        }
        .validate()
        .is_err());
    }
}
