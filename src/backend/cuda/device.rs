//! One CUDA device: its context, the stream every launcher uses, the embedded kernel modules
//! (loaded once) and a lazily created cuBLAS handle for dense GEMMs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtrMut,
    LaunchConfig, PushKernelArg,
};

use super::{cuda_available, embedded, KernelFamily, BUILT_WITH_KERNELS, NO_KERNELS_MSG};

/// A scalar or pointer kernel argument. Device pointers travel as `u64` (`CUdeviceptr`).
#[derive(Debug, Clone, Copy)]
pub enum KArg {
    Ptr(u64),
    I32(i32),
    U64(u64),
    F32(f32),
}

pub struct GpuDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Kernel file stem -> loaded module.
    modules: HashMap<&'static str, Arc<CudaModule>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    /// The cuBLAS handle and the workspace it is bound to.
    blas: OnceLock<(CudaBlas, CudaSlice<u8>)>,
    sm_count: u32,
}

/// cuBLAS workspace, given explicitly so that GEMMs recorded into a CUDA graph never make cuBLAS
/// allocate during the capture (NVIDIA's advice for graph capture).
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

impl std::fmt::Debug for GpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuDevice")
            .field("ordinal", &self.ctx.ordinal())
            .field("sm_count", &self.sm_count)
            .finish()
    }
}

impl GpuDevice {
    /// Opens device `ordinal` and loads every embedded kernel module.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        if !BUILT_WITH_KERNELS {
            bail!(NO_KERNELS_MSG);
        }
        if !cuda_available() {
            bail!("the CUDA driver library (libcuda) could not be loaded");
        }
        let ctx = CudaContext::new(ordinal)
            .with_context(|| format!("creating a CUDA context on device {ordinal}"))?;
        // SAFETY: called before any buffer exists. Everything runs on the one stream below, so
        // cudarc's cross-stream event tracking would only record events nobody waits for.
        unsafe { ctx.disable_event_tracking() };
        // A created stream rather than the legacy default stream, on which CUDA graphs cannot be
        // captured.
        let stream = ctx.new_stream().context("creating the CUDA stream")?;
        let mut modules = HashMap::new();
        for (stem, fatbin) in embedded::KERNEL_FATBINS {
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(fatbin.to_vec()))
                .with_context(|| {
                    format!(
                        "loading the kernels of kernels/{stem}.cu (sm_90 cubin / compute_80 PTX)"
                    )
                })?;
            modules.insert(*stem, module);
        }
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .context("querying the SM count")? as u32;
        Ok(Arc::new(Self {
            ctx,
            stream,
            modules,
            functions: Mutex::new(HashMap::new()),
            blas: OnceLock::new(),
            sm_count,
        }))
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// Waits for all work queued on the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .context("synchronizing the CUDA stream")
    }

    /// The cuBLAS handle bound to this device's stream (created on first use).
    pub fn blas(&self) -> Result<&CudaBlas> {
        if let Some((b, _)) = self.blas.get() {
            return Ok(b);
        }
        let b = CudaBlas::new(self.stream.clone())
            .map_err(|e| anyhow!("creating the cuBLAS handle: {e:?}"))?;
        let mut workspace = self
            .stream
            .alloc_zeros::<u8>(BLAS_WORKSPACE_BYTES)
            .context("allocating the cuBLAS workspace")?;
        {
            let (ptr, _record) = workspace.device_ptr_mut(&self.stream);
            // SAFETY: the workspace outlives the handle (both live in `self.blas`) and is used by
            // nothing else.
            let status = unsafe {
                cudarc::cublas::sys::cublasSetWorkspace_v2(
                    *b.handle(),
                    ptr as *mut std::ffi::c_void,
                    BLAS_WORKSPACE_BYTES,
                )
            };
            if status != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                bail!("setting the cuBLAS workspace: {status:?}");
            }
        }
        Ok(&self.blas.get_or_init(|| (b, workspace)).0)
    }

    /// Kernel `name` from `kernels/{family}.cu`, looked up once and cached.
    pub fn function(&self, family: KernelFamily, name: &str) -> Result<CudaFunction> {
        let mut cache = self
            .functions
            .lock()
            .map_err(|_| anyhow!("kernel cache lock poisoned"))?;
        if let Some(f) = cache.get(name) {
            return Ok(f.clone());
        }
        let stem = family.stem();
        let module = self
            .modules
            .get(stem)
            .ok_or_else(|| anyhow!("no embedded kernel module kernels/{stem}.cu"))?;
        let f = module
            .load_function(name)
            .with_context(|| format!("kernel {name} not found in kernels/{stem}.cu"))?;
        cache.insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// Records the device work `record` queues on the stream into a CUDA graph (not run: launch
    /// the graph for that). Thread-local capture mode: other threads using the device (tests, a
    /// server's other requests) may still allocate and synchronise meanwhile. `record` must queue
    /// work only: no allocation, no synchronisation, no copy to the host.
    pub fn capture_graph(&self, record: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .context("starting a CUDA graph capture")?;
        let recorded = record();
        // End the capture even when recording failed, so the stream is usable again.
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
        recorded.context("recording a CUDA graph")?;
        graph
            .context("instantiating a captured CUDA graph")?
            .context("the capture recorded no work")
    }

    /// Grid size for grid-stride kernels: enough blocks to fill the GPU a few times over.
    pub fn grid_for(&self, n: usize, block: u32) -> u32 {
        let needed = n.div_ceil(block as usize).max(1);
        needed.min(self.sm_count as usize * 16) as u32
    }

    /// Launches `family::name` on the device stream.
    ///
    /// # Safety
    /// `args` must match the kernel's parameter list in count, order and type, and every pointer must
    /// reference live device memory large enough for what the kernel touches with these arguments
    /// (each launcher checks the buffer lengths before calling this).
    pub(crate) unsafe fn launch(
        &self,
        family: KernelFamily,
        name: &str,
        cfg: LaunchConfig,
        args: &[KArg],
    ) -> Result<()> {
        let f = self.function(family, name)?;
        let mut builder = self.stream.launch_builder(&f);
        for a in args {
            match a {
                KArg::Ptr(p) | KArg::U64(p) => builder.arg(p),
                KArg::I32(v) => builder.arg(v),
                KArg::F32(v) => builder.arg(v),
            };
        }
        // SAFETY: forwarded from this function's contract.
        unsafe { builder.launch(cfg) }.with_context(|| format!("launching {name} with {cfg:?}"))?;
        Ok(())
    }
}
