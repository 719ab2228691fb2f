//! Which backend a command runs on: `--device auto|cpu|cuda` weighed against what the command can
//! do on a GPU and what this binary and machine offer. A pure decision, unit-tested; opening the
//! device is the caller's job.
//!
//! `auto` picks CUDA only when the command has a CUDA path, the kernels were compiled in and the
//! driver library loads; on a machine without a driver it is exactly `cpu`.

use anyhow::{bail, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DeviceRequest {
    /// CUDA when the command supports it and a driver is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    Cuda,
}

/// What this binary and machine offer.
#[derive(Debug, Clone, Copy)]
pub struct Availability {
    /// The binary carries compiled kernels.
    pub kernels: bool,
    /// The CUDA driver library loads.
    pub driver: bool,
}

impl Availability {
    /// This process's binary and machine (loads nothing beyond trying to open the driver library).
    pub fn detect() -> Self {
        Availability {
            kernels: super::cuda::BUILT_WITH_KERNELS,
            driver: super::cuda::cuda_available(),
        }
    }
}

/// The backend for a command. `gpu_path` is `Err(reason)` when the command has no CUDA path.
pub fn choose(
    request: DeviceRequest,
    gpu_path: std::result::Result<(), &str>,
    avail: Availability,
) -> Result<Backend> {
    match request {
        DeviceRequest::Cpu => Ok(Backend::Cpu),
        DeviceRequest::Auto => Ok(if gpu_path.is_ok() && avail.kernels && avail.driver {
            Backend::Cuda
        } else {
            Backend::Cpu
        }),
        DeviceRequest::Cuda => {
            if let Err(reason) = gpu_path {
                bail!("--device cuda: {reason}; use --device cpu");
            }
            if !avail.kernels {
                bail!("--device cuda: {}", super::cuda::NO_KERNELS_MSG);
            }
            if !avail.driver {
                bail!(
                    "--device cuda: no CUDA driver found on this machine (libcuda could not be loaded)"
                );
            }
            Ok(Backend::Cuda)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Availability = Availability {
        kernels: true,
        driver: true,
    };
    const NO_DRIVER: Availability = Availability {
        kernels: true,
        driver: false,
    };
    const NO_KERNELS: Availability = Availability {
        kernels: false,
        driver: true,
    };
    const TRAINER: std::result::Result<(), &str> = Err("the edit trainer is not on the GPU yet");

    #[test]
    fn auto_is_the_cpu_wherever_cuda_cannot_run() {
        for avail in [NO_DRIVER, NO_KERNELS] {
            assert_eq!(
                choose(DeviceRequest::Auto, Ok(()), avail).unwrap(),
                Backend::Cpu
            );
        }
        assert_eq!(
            choose(DeviceRequest::Auto, TRAINER, ALL).unwrap(),
            Backend::Cpu
        );
        assert_eq!(
            choose(DeviceRequest::Auto, Ok(()), ALL).unwrap(),
            Backend::Cuda
        );
    }

    #[test]
    fn cpu_is_always_the_cpu() {
        for avail in [ALL, NO_DRIVER, NO_KERNELS] {
            assert_eq!(
                choose(DeviceRequest::Cpu, Ok(()), avail).unwrap(),
                Backend::Cpu
            );
            assert_eq!(
                choose(DeviceRequest::Cpu, TRAINER, avail).unwrap(),
                Backend::Cpu
            );
        }
    }

    #[test]
    fn explicit_cuda_names_what_is_missing() {
        assert_eq!(
            choose(DeviceRequest::Cuda, Ok(()), ALL).unwrap(),
            Backend::Cuda
        );
        let e = choose(DeviceRequest::Cuda, TRAINER, ALL)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--device cuda") && e.contains("trainer"), "{e}");
        let e = choose(DeviceRequest::Cuda, Ok(()), NO_DRIVER)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no CUDA driver"), "{e}");
        let e = choose(DeviceRequest::Cuda, Ok(()), NO_KERNELS)
            .unwrap_err()
            .to_string();
        assert!(e.contains("without CUDA kernels"), "{e}");
    }
}
