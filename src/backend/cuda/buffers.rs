//! Typed device buffers: the activation dtypes the kernels accept, host<->device copies with f32
//! conversion, shape checks shared by the launchers, and a grow-only workspace.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, SyncOnDrop, ValidAsZeroBits,
};
use half::{bf16, f16};

use crate::backend::dtype::Element;

use super::device::{GpuDevice, KArg};

/// An element type with kernels instantiated for it (`{op}_{SUFFIX}`). Math is always f32; the
/// conversions to and from f32 are the host's ([`Element`]), so what the host stages for an
/// upload and what the kernels compute in are the same type.
pub trait KernelDtype:
    Element + DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + 'static
{
    const SUFFIX: &'static str;
}

impl KernelDtype for f32 {
    const SUFFIX: &'static str = "f32";
}

impl KernelDtype for f16 {
    const SUFFIX: &'static str = "f16";
}

impl KernelDtype for bf16 {
    const SUFFIX: &'static str = "bf16";
}

impl GpuDevice {
    /// Copies `host` to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream()
            .clone_htod(host)
            .with_context(|| format!("uploading {} elements", host.len()))
    }

    /// Converts f32 host data to `T` and uploads it.
    pub fn upload_as<T: KernelDtype>(&self, host: &[f32]) -> Result<CudaSlice<T>> {
        let converted: Vec<T> = host.iter().map(|&v| T::from_f32(v)).collect();
        self.upload(&converted)
    }

    /// A device buffer of `len` copies of `value` (NaN poisoning in tests, constant fills).
    pub fn filled<T: KernelDtype>(&self, len: usize, value: f32) -> Result<CudaSlice<T>> {
        // At least one element: cuMemAlloc rejects 0 bytes.
        self.upload(&vec![T::from_f32(value); len.max(1)])
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        // cuMemAlloc rejects 0 bytes; a 1-element buffer stands in for an empty one.
        self.stream()
            .alloc_zeros(len.max(1))
            .with_context(|| format!("allocating {len} zeroed elements"))
    }

    /// Copies a device buffer back (waits for the stream).
    pub fn download<T: DeviceRepr + Default + Clone, S: DevicePtr<T>>(
        &self,
        dev: &S,
    ) -> Result<Vec<T>> {
        self.stream()
            .clone_dtoh(dev)
            .context("downloading a device buffer")
    }

    /// Copies a device buffer back as f32.
    pub fn download_f32<T: KernelDtype, S: DevicePtr<T>>(&self, dev: &S) -> Result<Vec<f32>> {
        Ok(self.download(dev)?.into_iter().map(T::to_f32).collect())
    }
}

/// Fails unless `len >= needed`, naming the tensor and both sizes.
pub(crate) fn check_len(what: &str, len: usize, needed: usize) -> Result<()> {
    if len < needed {
        bail!("{what}: device buffer holds {len} elements, the shape needs {needed}");
    }
    Ok(())
}

/// Fails unless a value fits the kernels' `int` parameters.
pub(crate) fn as_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).with_context(|| format!("{what} = {v} does not fit the kernel's 32-bit int"))
}

/// Read pointer of a buffer after checking its length; keep the guard alive until after the launch.
pub(crate) fn input<'a, T, S: DevicePtr<T>>(
    stream: &'a CudaStream,
    what: &str,
    buf: &'a S,
    needed: usize,
) -> Result<(KArg, SyncOnDrop<'a>)> {
    check_len(what, buf.len(), needed)?;
    let (p, guard) = buf.device_ptr(stream);
    Ok((KArg::Ptr(p), guard))
}

/// Write pointer of a buffer after checking its length.
pub(crate) fn output<'a, T, S: DevicePtrMut<T>>(
    stream: &'a CudaStream,
    what: &str,
    buf: &'a mut S,
    needed: usize,
) -> Result<(KArg, SyncOnDrop<'a>)> {
    check_len(what, buf.len(), needed)?;
    let (p, guard) = buf.device_ptr_mut(stream);
    Ok((KArg::Ptr(p), guard))
}

/// Like [`input`] for an optional buffer: `None` passes a null pointer.
pub(crate) fn opt_input<'a, T, S: DevicePtr<T>>(
    stream: &'a CudaStream,
    what: &str,
    buf: Option<&'a S>,
    needed: usize,
) -> Result<(KArg, Option<SyncOnDrop<'a>>)> {
    match buf {
        Some(b) => input(stream, what, b, needed).map(|(a, g)| (a, Some(g))),
        None => Ok((KArg::Ptr(0), None)),
    }
}

/// Like [`output`] for an optional buffer: `None` passes a null pointer.
pub(crate) fn opt_output<'a, T, S: DevicePtrMut<T>>(
    stream: &'a CudaStream,
    what: &str,
    buf: Option<&'a mut S>,
    needed: usize,
) -> Result<(KArg, Option<SyncOnDrop<'a>>)> {
    match buf {
        Some(b) => output(stream, what, b, needed).map(|(a, g)| (a, Some(g))),
        None => Ok((KArg::Ptr(0), None)),
    }
}

/// Grow-only scratch space: named f32 buffers reused across calls (e.g. the LoRA backward's
/// `dh_raw`), so a training loop allocates once and then never again.
#[derive(Default)]
pub struct Workspace {
    f32_buffers: HashMap<&'static str, CudaSlice<f32>>,
}

impl Workspace {
    pub fn new() -> Self {
        Self::default()
    }

    /// A buffer of at least `len` f32 under `name` (contents unspecified).
    pub fn f32(
        &mut self,
        dev: &GpuDevice,
        name: &'static str,
        len: usize,
    ) -> Result<&mut CudaSlice<f32>> {
        let too_small = self.f32_buffers.get(name).is_none_or(|b| b.len() < len);
        if too_small {
            // Grow by 1.5x so a slowly growing shape does not reallocate every call.
            let cap = (len + len / 2).max(1);
            self.f32_buffers.insert(name, dev.zeros::<f32>(cap)?);
        }
        self.f32_buffers
            .get_mut(name)
            .context("workspace buffer vanished")
    }
}
