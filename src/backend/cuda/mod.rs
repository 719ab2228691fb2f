//! The CUDA backend: device/context/module management, typed buffers and one safe launcher module
//! per kernel family in `kernels/`. Every launcher validates shapes on the host and returns `Result`.
//!
//! The kernels are compiled by `build.rs` and embedded in the binary. A binary built without nvcc
//! still compiles this module; [`GpuDevice::new`] then fails with [`NO_KERNELS_MSG`].
//!
//! Nothing here has run on a GPU yet (developed on machines without one). The GPU tests run on the
//! CPU emulator of `tools/cuda-emu` where there is no driver, which verifies indexing,
//! synchronisation and results but not speed or the GPU memory model.

pub mod adam;
pub mod attention;
pub mod buffers;
pub mod device;
pub mod elementwise;
pub mod gemm;
pub mod keystore;
pub mod lora;
pub mod loss;
pub mod norm;
pub mod router;

use std::sync::Arc;

pub use buffers::{KernelDtype, Workspace};
pub use device::GpuDevice;

/// A kernel family: one `kernels/{stem}.cu` file, its launcher module here and its CPU twin.
/// Launchers name their module by this type, so a misspelt family fails to compile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelFamily {
    Adam,
    Attention,
    Elementwise,
    KeyStore,
    Lora,
    Loss,
    Norm,
    Router,
}

impl KernelFamily {
    pub const ALL: [KernelFamily; 8] = [
        KernelFamily::Adam,
        KernelFamily::Attention,
        KernelFamily::Elementwise,
        KernelFamily::KeyStore,
        KernelFamily::Lora,
        KernelFamily::Loss,
        KernelFamily::Norm,
        KernelFamily::Router,
    ];

    /// The stem of its kernel file, `kernels/{stem}.cu`.
    pub fn stem(self) -> &'static str {
        match self {
            KernelFamily::Adam => "adam",
            KernelFamily::Attention => "attention",
            KernelFamily::Elementwise => "elementwise",
            KernelFamily::KeyStore => "keystore",
            KernelFamily::Lora => "lora",
            KernelFamily::Loss => "loss",
            KernelFamily::Norm => "norm",
            KernelFamily::Router => "router",
        }
    }
}

/// The fatbins `build.rs` produced, one per `kernels/*.cu` file (empty without nvcc).
pub(crate) mod embedded {
    include!(concat!(env!("OUT_DIR"), "/cuda_kernels.rs"));
}

/// True when this binary carries compiled CUDA kernels.
pub const BUILT_WITH_KERNELS: bool = cfg!(elder_cuda_kernels);

/// The error a kernel-less build gives for any GPU request.
pub const NO_KERNELS_MSG: &str =
    "this elder binary was built without CUDA kernels (nvcc not found at build time)";

/// True when the CUDA driver library can be loaded. Checked before any context is created, because
/// cudarc panics (instead of returning an error) when the library is missing.
pub fn cuda_available() -> bool {
    // SAFETY: only tries to dlopen the driver library; no CUDA call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The device for a GPU test, or `None` after printing a visible SKIP line on stdout and stderr
/// (so a skipped test never reads as a passing one).
pub fn gpu_or_skip(test_name: &str) -> Option<Arc<GpuDevice>> {
    let reason = if !BUILT_WITH_KERNELS {
        NO_KERNELS_MSG.to_string()
    } else if !cuda_available() {
        "no CUDA driver".to_string()
    } else {
        match GpuDevice::new(0) {
            Ok(dev) => return Some(dev),
            Err(e) => format!("no usable CUDA device: {e:#}"),
        }
    };
    announce(&format!("SKIP {test_name}: {reason}"));
    None
}

/// Prints a line on stdout and straight to the stderr handle: the test harness captures
/// print!/eprint!, but not a direct write, so the line shows in a plain `cargo test` run too (a
/// skipped or emulated GPU test never reads as a plain pass).
pub fn announce(line: &str) {
    println!("{line}");
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

#[cfg(test)]
mod tests {
    use super::KernelFamily;

    /// Every `kernels/*.cu` file is a family and every family has its file (the build embeds
    /// one module per file; a launcher names its module by family).
    #[test]
    fn kernel_families_match_the_kernel_files() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                name.strip_suffix(".cu").map(str::to_string)
            })
            .collect();
        files.sort();
        let mut families: Vec<&str> = KernelFamily::ALL.iter().map(|f| f.stem()).collect();
        families.sort();
        assert_eq!(files, families);
        if super::BUILT_WITH_KERNELS {
            let mut embedded: Vec<&str> = super::embedded::KERNEL_FATBINS
                .iter()
                .map(|(stem, _)| *stem)
                .collect();
            embedded.sort();
            assert_eq!(embedded, families);
        }
    }
}
