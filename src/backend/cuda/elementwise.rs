//! Launchers for `kernels/elementwise.cu`: embedding gather and gradient, bias + GELU, SiLU gate,
//! residual add, bias add, rotary embedding, KV-cache append, f32 -> T conversion.
//! CPU twins: `backend::cpu::ops` (and `Element::from_f32` for the conversion).

use anyhow::{bail, Result};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};

use super::buffers::{as_i32, input, opt_input, opt_output, output, KernelDtype};
use super::device::{GpuDevice, KArg};
use super::KernelFamily;

const FAMILY: KernelFamily = KernelFamily::Elementwise;

const BLOCK: u32 = 256;

fn grid_stride(dev: &GpuDevice, n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (dev.grid_for(n, BLOCK), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `out[i, :] = table[ids[i], :]` for `n = ids.len()` rows of width `d`; ids outside the table give NaN rows.
pub fn embedding<T: KernelDtype>(
    dev: &GpuDevice,
    ids: &impl DevicePtr<u32>,
    n: usize,
    table: &impl DevicePtr<T>,
    vocab: usize,
    d: usize,
    out: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    let s = dev.stream();
    let (pi, _gi) = input(s, "embedding ids", ids, n)?;
    let (pt, _gt) = input(s, "embedding table [vocab, d]", table, vocab * d)?;
    let (po, _go) = output(s, "embedding out [n, d]", out, n * d)?;
    let args = [
        pi,
        pt,
        po,
        KArg::I32(as_i32("n", n)?),
        KArg::I32(as_i32("d", d)?),
        KArg::I32(as_i32("vocab", vocab)?),
    ];
    // SAFETY: buffer lengths checked above; argument list matches embedding_{T}.
    unsafe {
        dev.launch(
            FAMILY,
            &format!("embedding_{}", T::SUFFIX),
            grid_stride(dev, n * d),
            &args,
        )
    }
}

/// `dtable[ids[i], :] += dout[i, :]` (f32 atomics; ids may repeat).
pub fn embedding_grad<T: KernelDtype>(
    dev: &GpuDevice,
    ids: &impl DevicePtr<u32>,
    n: usize,
    dout: &impl DevicePtr<T>,
    vocab: usize,
    d: usize,
    dtable: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    let s = dev.stream();
    let (pi, _gi) = input(s, "embedding ids", ids, n)?;
    let (pd, _gd) = input(s, "embedding dout [n, d]", dout, n * d)?;
    let (pt, _gt) = output(s, "embedding dtable [vocab, d]", dtable, vocab * d)?;
    let args = [
        pi,
        pd,
        pt,
        KArg::I32(as_i32("n", n)?),
        KArg::I32(as_i32("d", d)?),
        KArg::I32(as_i32("vocab", vocab)?),
    ];
    // SAFETY: buffer lengths checked above; argument list matches embedding_grad_{T}.
    unsafe {
        dev.launch(
            FAMILY,
            &format!("embedding_grad_{}", T::SUFFIX),
            grid_stride(dev, n * d),
            &args,
        )
    }
}

/// `pre = x + bias` (saved when `pre` is given), `out = gelu_new(pre)`, rows `[n, d]`.
#[allow(clippy::too_many_arguments)]
pub fn bias_gelu<T: KernelDtype, X: DevicePtr<T>, P: DevicePtrMut<T>>(
    dev: &GpuDevice,
    x: &X,
    bias: Option<&X>,
    pre: Option<&mut P>,
    out: &mut impl DevicePtrMut<T>,
    n: usize,
    d: usize,
) -> Result<()> {
    let s = dev.stream();
    let (px, _gx) = input(s, "bias_gelu x [n, d]", x, n * d)?;
    let (pb, _gb) = opt_input(s, "bias_gelu bias [d]", bias, d)?;
    let (pp, _gp) = opt_output(s, "bias_gelu pre [n, d]", pre, n * d)?;
    let (po, _go) = output(s, "bias_gelu out [n, d]", out, n * d)?;
    let args = [
        px,
        pb,
        pp,
        po,
        KArg::I32(as_i32("n", n)?),
        KArg::I32(as_i32("d", d)?),
    ];
    // SAFETY: buffer lengths checked above; argument list matches bias_gelu_{T}.
    unsafe {
        dev.launch(
            FAMILY,
            &format!("bias_gelu_{}", T::SUFFIX),
            grid_stride(dev, n * d),
            &args,
        )
    }
}

/// `dx = dout * gelu_new'(pre)` over `count` elements.
pub fn gelu_backward<T: KernelDtype>(
    dev: &GpuDevice,
    pre: &impl DevicePtr<T>,
    dout: &impl DevicePtr<T>,
    dx: &mut impl DevicePtrMut<T>,
    count: usize,
) -> Result<()> {
    let s = dev.stream();
    let (pp, _gp) = input(s, "gelu_backward pre", pre, count)?;
    let (pd, _gd) = input(s, "gelu_backward dout", dout, count)?;
    let (px, _gx) = output(s, "gelu_backward dx", dx, count)?;
    let args = [pp, pd, px, KArg::U64(count as u64)];
    // SAFETY: buffer lengths checked above; argument list matches gelu_backward_{T}.
    unsafe {
        dev.launch(
            FAMILY,
            &format!("gelu_backward_{}", T::SUFFIX),
            grid_stride(dev, count),
            &args,
        )
    }
}

/// `out = silu(gate) * up` over `count` elements.
pub fn silu_mul<T: KernelDtype>(
    dev: &GpuDevice,
    gate: &impl DevicePtr<T>,
    up: &impl DevicePtr<T>,
    out: &mut impl DevicePtrMut<T>,
    count: usize,
) -> Result<()> {
    let s = dev.stream();
    let (pg, _gg) = input(s, "silu_mul gate", gate, count)?;
    let (pu, _gu) = input(s, "silu_mul up", up, count)?;
    let (po, _go) = output(s, "silu_mul out", out, count)?;
    let args = [pg, pu, po, KArg::U64(count as u64)];
    // SAFETY: buffer lengths checked above; argument list matches silu_mul_{T}.
    unsafe {
        dev.launch(
            FAMILY,
            &format!("silu_mul_{}", T::SUFFIX),
            grid_stride(dev, count),
            &args,
        )
    }
}

/// Gradients of `silu(gate) * up` with respect to gate and up.
pub fn silu_mul_backward<T: KernelDtype, G: DevicePtrMut<T>>(
    dev: &GpuDevice,
    gate: &impl DevicePtr<T>,
    up: &impl DevicePtr<T>,
    dout: &impl DevicePtr<T>,
    dgate: &mut G,
    dup: &mut G,
    count: usize,
) -> Result<()> {
    let s = dev.stream();
    let (pg, _gg) = input(s, "silu_mul_backward gate", gate, count)?;
    let (pu, _gu) = input(s, "silu_mul_backward up", up, count)?;
    let (pd, _gd) = input(s, "silu_mul_backward dout", dout, count)?;
    let (pdg, _gdg) = output(s, "silu_mul_backward dgate", dgate, count)?;
    let (pdu, _gdu) = output(s, "silu_mul_backward dup", dup, count)?;
    let args = [pg, pu, pd, pdg, pdu, KArg::U64(count as u64)];
    // SAFETY: buffer lengths checked above; argument list matches silu_mul_backward_{T}.
    unsafe {
        dev.launch(
            FAMILY,
            &format!("silu_mul_backward_{}", T::SUFFIX),
            grid_stride(dev, count),
            &args,
        )
    }
}

/// `acc += x` over `count` elements.
pub fn residual_add<T: KernelDtype>(
    dev: &GpuDevice,
    acc: &mut impl DevicePtrMut<T>,
    x: &impl DevicePtr<T>,
    count: usize,
) -> Result<()> {
    let s = dev.stream();
    let (pa, _ga) = output(s, "residual_add acc", acc, count)?;
    let (px, _gx) = input(s, "residual_add x", x, count)?;
    let args = [pa, px, KArg::U64(count as u64)];
    // SAFETY: buffer lengths checked above; argument list matches residual_add_{T}.
    unsafe {
        dev.launch(
            FAMILY,
            &format!("residual_add_{}", T::SUFFIX),
            grid_stride(dev, count),
            &args,
        )
    }
}

/// Rotary embedding in place on `n` rows of `[n_heads * head_dim]` (HF rotate_half); `inverse`
/// rotates back (the backward pass).
#[allow(clippy::too_many_arguments)]
pub fn rope<T: KernelDtype>(
    dev: &GpuDevice,
    x: &mut impl DevicePtrMut<T>,
    positions: &impl DevicePtr<u32>,
    n: usize,
    n_heads: usize,
    head_dim: usize,
    theta: f32,
    inverse: bool,
) -> Result<()> {
    if !head_dim.is_multiple_of(2) {
        bail!("rope: head_dim must be even, found {head_dim}");
    }
    let s = dev.stream();
    let (px, _gx) = output(s, "rope x [n, heads * head_dim]", x, n * n_heads * head_dim)?;
    let (pp, _gp) = input(s, "rope positions [n]", positions, n)?;
    let args = [
        px,
        pp,
        KArg::I32(as_i32("n", n)?),
        KArg::I32(as_i32("n_heads", n_heads)?),
        KArg::I32(as_i32("head_dim", head_dim)?),
        KArg::F32(theta),
        KArg::I32(inverse as i32),
    ];
    let cfg = grid_stride(dev, n * n_heads * head_dim / 2);
    // SAFETY: buffer lengths checked above; argument list matches rope_{T}.
    unsafe { dev.launch(FAMILY, &format!("rope_{}", T::SUFFIX), cfg, &args) }
}

/// `x[i, :] += bias` over `n` rows of width `d` (the bias of a cuBLAS product).
pub fn bias_add<T: KernelDtype>(
    dev: &GpuDevice,
    x: &mut impl DevicePtrMut<T>,
    bias: &impl DevicePtr<T>,
    n: usize,
    d: usize,
) -> Result<()> {
    let s = dev.stream();
    let (px, _gx) = output(s, "bias_add x [n, d]", x, n * d)?;
    let (pb, _gb) = input(s, "bias_add bias [d]", bias, d)?;
    let args = [
        px,
        pb,
        KArg::I32(as_i32("n", n)?),
        KArg::I32(as_i32("d", d)?),
    ];
    // SAFETY: buffer lengths checked above; argument list matches bias_add_{T}.
    unsafe {
        dev.launch(
            FAMILY,
            &format!("bias_add_{}", T::SUFFIX),
            grid_stride(dev, n * d),
            &args,
        )
    }
}

/// Where a padded batch lands in a KV cache: `[batch, seq]` new rows of `width`, stored per
/// sequence from its `start` (device i32 `[batch]`, with `valid`) into a `[batch, cap, width]` cache.
#[derive(Debug, Clone, Copy)]
pub struct KvAppend {
    pub batch: usize,
    pub seq: usize,
    pub cap: usize,
    pub width: usize,
}

/// `cache[b, start[b] + i, :] = src[b, i, :]` for `i < valid[b]`. CPU twin: `ops::kv_append`.
/// The caller guarantees `start[b] + valid[b] <= cap` (the kernel drops rows past it).
pub fn kv_append<T: KernelDtype>(
    dev: &GpuDevice,
    shape: KvAppend,
    src: &impl DevicePtr<T>,
    start: &impl DevicePtr<i32>,
    valid: &impl DevicePtr<i32>,
    cache: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    let KvAppend {
        batch,
        seq,
        cap,
        width,
    } = shape;
    if seq > cap {
        bail!("kv_append: {seq} new rows per sequence exceed the cache capacity {cap}");
    }
    let s = dev.stream();
    let (ps, _g1) = input(s, "kv_append src [B, T, w]", src, batch * seq * width)?;
    let (pst, _g2) = input(s, "kv_append start [B]", start, batch)?;
    let (pv, _g3) = input(s, "kv_append valid [B]", valid, batch)?;
    let (pc, _g4) = output(s, "kv_append cache [B, cap, w]", cache, batch * cap * width)?;
    let args = [
        ps,
        pc,
        pst,
        pv,
        KArg::I32(as_i32("batch", batch)?),
        KArg::I32(as_i32("seq", seq)?),
        KArg::I32(as_i32("cap", cap)?),
        KArg::I32(as_i32("width", width)?),
    ];
    // SAFETY: buffer lengths checked above; argument list matches kv_append_{T}.
    unsafe {
        dev.launch(
            FAMILY,
            &format!("kv_append_{}", T::SUFFIX),
            grid_stride(dev, batch * seq * width),
            &args,
        )
    }
}

/// `dst[i] = T::from_f32(src[i])` over `count` elements: gradients accumulated in f32 (the attention
/// backward's atomics) entering the `T` GEMMs of the frozen projections.
pub fn cast_f32<T: KernelDtype>(
    dev: &GpuDevice,
    src: &impl DevicePtr<f32>,
    dst: &mut impl DevicePtrMut<T>,
    count: usize,
) -> Result<()> {
    let s = dev.stream();
    let (ps, _gs) = input(s, "cast_f32 src", src, count)?;
    let (pd, _gd) = output(s, "cast_f32 dst", dst, count)?;
    let args = [ps, pd, KArg::U64(count as u64)];
    // SAFETY: buffer lengths checked above; argument list matches cast_f32_{T}.
    unsafe {
        dev.launch(
            FAMILY,
            &format!("cast_f32_{}", T::SUFFIX),
            grid_stride(dev, count),
            &args,
        )
    }
}
