//! A CPU emulator of the CUDA driver API and cuBLAS, built from elder's own `kernels/*.cu`, so the
//! GPU tests run — slowly, but for real — on machines without a GPU (CI, development boxes).
//!
//! [`install`] loads the emulator's `libcuda.so` and `libcublas.so` by absolute path. cudarc then
//! finds them when it opens `libcuda.so` / `libcublas.so` by name, because the dynamic loader
//! matches a requested name against the sonames of libraries already loaded. Call it only where no
//! real driver exists (the tests check first); once installed it serves the whole process.
//!
//! What it checks: each kernel's indexing, its barriers and shuffles (the threads of a block are
//! fibers that switch only at barriers, in a shuffled order, and a barrier some thread can never
//! reach is reported as a deadlock), writes past the end of a device allocation (a guard page
//! faults and names the kernel, block and thread), reads of memory nobody wrote (fresh
//! allocations hold NaN bytes), and the host-side runtime around the kernels (buffer sizes,
//! launch arguments, stream capture and graph replay).
//!
//! What it cannot check: anything about speed; races between blocks (blocks run one after
//! another); the GPU memory model; and device code generation (nvcc compiles the same files for
//! the real fatbin — CI builds both). Numerics differ from the GPU only by FMA contraction and
//! `expf`/`rsqrtf` accuracy.

use std::sync::OnceLock;

/// Where `build.rs` put the libraries, when it could build them.
pub const LIBRARY_DIR: Option<&str> = option_env!("ELDER_CUDA_EMU_DIR");

/// Loads the emulator for the rest of the process (idempotent). Errors say why it is unavailable.
pub fn install() -> Result<(), String> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED.get_or_init(load).clone()
}

fn load() -> Result<(), String> {
    let dir = LIBRARY_DIR.ok_or_else(|| {
        format!(
            "the CUDA emulator was not built: {}",
            option_env!("ELDER_CUDA_EMU_SKIPPED").unwrap_or("unknown reason")
        )
    })?;
    for lib in ["libcuda.so", "libcublas.so"] {
        let path = std::path::Path::new(dir).join(lib);
        // SAFETY: the libraries are this crate's own build products; their initialisers only
        // register kernels in a process-local table.
        let handle = unsafe {
            libloading::os::unix::Library::open(
                Some(&path),
                libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
            )
        }
        .map_err(|e| format!("loading {}: {e}", path.display()))?;
        // Kept loaded for the life of the process: cudarc holds function pointers into it.
        std::mem::forget(handle);
    }
    Ok(())
}

/// A record of what this thread asked of the emulated device, in order: kernel launches by name,
/// cuBLAS GEMMs, copies with their direction and size, memsets, allocations, frees,
/// synchronisations and graph replays. Tests use it to check the shape of a step (one launch per
/// MoLoRA site, no synchronisation inside an iteration, a decode step that is one graph replay),
/// which results alone cannot show.
///
/// Events read like `launch rope_f32`, `gemm`, `htod 64`, `dtoh 4096`, `dtod 32`, `memset 128`,
/// `alloc 4096`, `free`, `sync stream`, `graph_launch 37`; operations recorded into a graph while
/// the stream is captured start with `capture `.
pub mod trace {
    use std::ffi::{c_char, CStr};
    use std::sync::OnceLock;

    /// The driver's trace entry points (csrc/emu_driver.cpp), resolved once.
    struct Api {
        start: unsafe extern "C" fn(),
        stop: unsafe extern "C" fn() -> usize,
        event: unsafe extern "C" fn(usize) -> *const c_char,
    }

    fn api() -> Result<&'static Api, String> {
        static API: OnceLock<Result<Api, String>> = OnceLock::new();
        API.get_or_init(|| {
            super::install()?;
            let dir = super::LIBRARY_DIR.ok_or("the CUDA emulator was not built")?;
            let path = std::path::Path::new(dir).join("libcuda.so");
            // SAFETY: already loaded by `install` (opening it again only takes a reference, kept
            // for the life of the process); the symbols have these signatures in emu_driver.cpp.
            unsafe {
                let lib = libloading::os::unix::Library::open(
                    Some(&path),
                    libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
                )
                .map_err(|e| format!("opening {}: {e}", path.display()))?;
                let err = |e: libloading::Error| e.to_string();
                let api = Api {
                    start: *lib.get(b"cudaEmuTraceStart\0").map_err(err)?,
                    stop: *lib.get(b"cudaEmuTraceStop\0").map_err(err)?,
                    event: *lib.get(b"cudaEmuTraceEvent\0").map_err(err)?,
                };
                std::mem::forget(lib);
                Ok(api)
            }
        })
        .as_ref()
        .map_err(Clone::clone)
    }

    /// Starts recording this thread's calls (dropping an earlier record). Installs the emulator.
    pub fn start() -> Result<(), String> {
        // SAFETY: takes no arguments; only touches this thread's record.
        unsafe { (api()?.start)() };
        Ok(())
    }

    /// Stops recording and returns what this thread did since [`start`].
    pub fn stop() -> Result<Vec<String>, String> {
        let api = api()?;
        // SAFETY: each event string lives until the next `start` on this thread, and is copied
        // out here.
        unsafe {
            Ok((0..(api.stop)())
                .map(|i| {
                    CStr::from_ptr((api.event)(i))
                        .to_string_lossy()
                        .into_owned()
                })
                .collect())
        }
    }
}
