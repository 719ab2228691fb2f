//! Launchers for `kernels/keystore.cu`: a prompt's rows at the key site as unit keys, and every
//! stored key matched against every position of every prompt with each prompt's best entry, in
//! one launch with no host round trip.
//! CPU twins (`elder::keystore`): `KeySpace::embed_rows` (no projection), `KeyStore::scores_at`
//! and the best entry `KeyStore::best_match` starts from (before its relation tie-break).

use anyhow::{bail, ensure, Result};
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig};

use super::buffers::{as_i32, input, opt_input, output, KernelDtype};
use super::device::{GpuDevice, KArg};
use super::KernelFamily;

/// Must match EMBED_THREADS and MATCH_WARPS in keystore.cu.
const EMBED_THREADS: u32 = 128;
const MATCH_WARPS: usize = 8;

/// `rows [B * S, width]` (row `b * S + s` is position `s` of prompt `b`) as unit keys in
/// `keys [B * S, width]` f32, each centred on `means [M, width]` row `min(s, M - 1)` (the
/// background means of position 0, of the next positions one by one, then of every later one)
/// when means are given.
#[allow(clippy::too_many_arguments)]
pub fn key_embed<T: KernelDtype>(
    dev: &GpuDevice,
    rows_count: usize,
    seq: usize,
    width: usize,
    rows: &impl DevicePtr<T>,
    means: Option<(&CudaSlice<f32>, usize)>,
    keys: &mut CudaSlice<f32>,
) -> Result<()> {
    if rows_count == 0 || seq == 0 || width == 0 || !rows_count.is_multiple_of(seq) {
        bail!("key embed: {rows_count} rows of {seq} positions, {width} wide");
    }
    let n_means = means.map_or(0, |(_, m)| m);
    let st = dev.stream();
    let (pr, _g1) = input(st, "key-site rows [B * S, width]", rows, rows_count * width)?;
    let (pm, _g2) = opt_input(
        st,
        "background means [M, width]",
        means.map(|(m, _)| m),
        n_means * width,
    )?;
    let (pk, _g3) = output(st, "keys [B * S, width]", keys, rows_count * width)?;
    let args = [
        pr,
        pm,
        KArg::I32(as_i32("means", n_means)?),
        KArg::I32(as_i32("seq", seq)?),
        KArg::I32(as_i32("width", width)?),
        pk,
    ];
    let cfg = LaunchConfig {
        grid_dim: (u32::try_from(rows_count)?, 1, 1),
        block_dim: (EMBED_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: buffer lengths checked above; argument list matches key_embed_{T}.
    unsafe {
        dev.launch(
            KernelFamily::KeyStore,
            &format!("key_embed_{}", T::SUFFIX),
            cfg,
            &args,
        )
    }
}

/// Shapes of a key match: `batch` prompts of up to `seq` positions of `dim`-wide keys against
/// `entries * variants` stored keys of `span` rows each.
#[derive(Debug, Clone, Copy)]
pub struct KeyMatchShape {
    pub batch: usize,
    pub seq: usize,
    pub dim: usize,
    pub entries: usize,
    pub variants: usize,
    pub span: usize,
}

/// The stored side of a match: keys `[entries * variants * span, dim]` f32, how many rows of each
/// key are read (`[entries * variants]`, 1 ..= span), and the keys' ceilings with their margin
/// (`key_ceiling_margin`; `None`: every key always counts).
pub struct StoredKeys<'a> {
    pub keys: &'a CudaSlice<f32>,
    pub key_rows: &'a CudaSlice<u8>,
    pub ceilings: Option<(&'a CudaSlice<f32>, f32)>,
}

/// What a match writes (see keystore.cu): `best [B, entries]` and `top [B]`, packed.
pub struct KeyMatchOutputs {
    pub best: CudaSlice<u64>,
    pub top: CudaSlice<u64>,
}

impl KeyMatchOutputs {
    pub fn alloc(dev: &GpuDevice, batch: usize, entries: usize) -> Result<Self> {
        Ok(KeyMatchOutputs {
            best: dev.zeros(batch * entries.max(1))?,
            top: dev.zeros(batch.max(1))?,
        })
    }
}

/// A packed score back as `(score, low word)`; `None` for 0 (nothing counted).
pub fn unpack(packed: u64) -> Option<(f32, u32)> {
    (packed != 0).then(|| {
        let hi = (packed >> 32) as u32;
        let bits = if hi & 0x8000_0000 != 0 {
            hi & 0x7fff_ffff
        } else {
            !hi
        };
        (f32::from_bits(bits), packed as u32)
    })
}

/// Each entry's best `(score, position)` for each prompt, from a downloaded `best [B, entries]`.
pub fn unpack_best(best: &[u64], entries: usize) -> Vec<Vec<Option<(f32, usize)>>> {
    best.chunks(entries.max(1))
        .map(|row| {
            row.iter()
                .map(|&p| unpack(p).map(|(s, lo)| (s, (u32::MAX - lo) as usize)))
                .collect()
        })
        .collect()
}

/// Each prompt's best `(score, entry)`, from a downloaded `top [B]`.
pub fn unpack_top(top: &[u64]) -> Vec<Option<(f32, usize)>> {
    top.iter()
        .map(|&p| unpack(p).map(|(s, e)| (s, e as usize)))
        .collect()
}

/// Matches `queries [B, S, dim]` (unit keys, prompt `b`'s first `lens[b]` positions) against
/// `stored`: one launch (and a clear of `top` on the stream).
pub fn key_match(
    dev: &GpuDevice,
    s: &KeyMatchShape,
    queries: &impl DevicePtr<f32>,
    lens: &impl DevicePtr<i32>,
    stored: &StoredKeys,
    out: &mut KeyMatchOutputs,
) -> Result<()> {
    ensure!(
        s.batch > 0 && s.seq > 0 && s.dim > 0 && s.variants > 0 && s.span > 0,
        "key match: empty shape {s:?}"
    );
    if s.entries == 0 {
        // Nothing stored: nothing matches.
        return dev
            .stream()
            .memset_zeros(&mut out.top.slice_mut(0..s.batch))
            .map_err(Into::into);
    }
    let keys = s.entries * s.variants;
    let st = dev.stream();
    st.memset_zeros(&mut out.top.slice_mut(0..s.batch.min(out.top.len())))?;
    let (pq, _g1) = input(
        st,
        "query keys [B, S, dim]",
        queries,
        s.batch * s.seq * s.dim,
    )?;
    let (pl, _g2) = input(st, "prompt lengths [B]", lens, s.batch)?;
    let (pk, _g3) = input(
        st,
        "stored keys [K * span, dim]",
        stored.keys,
        keys * s.span * s.dim,
    )?;
    let (pr, _g4) = input(st, "rows per key [K]", stored.key_rows, keys)?;
    let (pc, _g5) = opt_input(
        st,
        "key ceilings [K]",
        stored.ceilings.map(|(c, _)| c),
        keys,
    )?;
    let (pb, _g6) = output(
        st,
        "best per entry [B, entries]",
        &mut out.best,
        s.batch * s.entries,
    )?;
    let (pt, _g7) = output(st, "best entry [B]", &mut out.top, s.batch)?;
    let args = [
        pq,
        pl,
        KArg::I32(as_i32("batch", s.batch)?),
        KArg::I32(as_i32("seq", s.seq)?),
        KArg::I32(as_i32("dim", s.dim)?),
        pk,
        pr,
        pc,
        KArg::F32(stored.ceilings.map_or(0.0, |(_, m)| m)),
        KArg::I32(as_i32("entries", s.entries)?),
        KArg::I32(as_i32("variants", s.variants)?),
        KArg::I32(as_i32("span", s.span)?),
        pb,
        pt,
    ];
    let cfg = LaunchConfig {
        grid_dim: (u32::try_from(s.entries.div_ceil(MATCH_WARPS))?, 1, 1),
        block_dim: ((MATCH_WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: shapes checked and buffer lengths checked above; argument list matches key_match_f32.
    unsafe { dev.launch(KernelFamily::KeyStore, "key_match_f32", cfg, &args) }
}
