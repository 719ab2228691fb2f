//! ggml storage types and their dequantization to f32.
//!
//! Block layouts follow ggml (`ggml-common.h`); every scale is an IEEE f16 unless noted:
//!   Q4_0 (32 weights, 18 B): d, 16 B nibbles;       w = (q - 8) * d
//!   Q4_1 (32 weights, 20 B): d, m, 16 B nibbles;    w = q * d + m
//!   Q5_0 (32 weights, 22 B): d, qh u32, 16 B;       w = (q5 - 16) * d
//!   Q5_1 (32 weights, 24 B): d, m, qh u32, 16 B;    w = q5 * d + m
//!   Q8_0 (32 weights, 34 B): d, 32 x i8;            w = q * d
//! In the nibble formats byte j holds element j in its low nibble and element j + 16 in its high
//! nibble; for the 5-bit formats bit j of qh is the fifth bit of element j (j in 0..32).
//!
//! k-quants use super-blocks of 256 weights (see each `dequant_q*_k_block` for the layout):
//!   Q4_K (144 B), Q5_K (176 B): d, dmin, 12 B of packed 6-bit scales/mins, [qh 32 B,] qs 128 B
//!   Q6_K (210 B): ql 128 B, qh 64 B, 16 x i8 scales, d
//!   Q8_K (292 B): d as f32, 256 x i8, 16 x i16 block sums (unused here)

use anyhow::{bail, ensure, Result};
use half::{bf16, f16};

/// Tensor storage types of ggml, with their on-disk ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Bf16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    /// A type this importer recognises by id but cannot dequantize (k-quants, i-quants ...).
    Unsupported(u32),
}

impl GgmlType {
    pub fn from_id(id: u32) -> Result<Self> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            15 => GgmlType::Q8K,
            30 => GgmlType::Bf16,
            // 4, 5 were Q4_2/Q4_3 (removed); the rest are Q8_1, Q2_K, Q3_K, i-quants, integer and
            // newer types.
            9..=11 | 16..=29 | 31..=40 => GgmlType::Unsupported(id),
            other => bail!("unknown ggml tensor type id {other}"),
        })
    }

    pub fn name(self) -> String {
        match self {
            GgmlType::F32 => "F32".into(),
            GgmlType::F16 => "F16".into(),
            GgmlType::Bf16 => "BF16".into(),
            GgmlType::Q4_0 => "Q4_0".into(),
            GgmlType::Q4_1 => "Q4_1".into(),
            GgmlType::Q5_0 => "Q5_0".into(),
            GgmlType::Q5_1 => "Q5_1".into(),
            GgmlType::Q8_0 => "Q8_0".into(),
            GgmlType::Q4K => "Q4_K".into(),
            GgmlType::Q5K => "Q5_K".into(),
            GgmlType::Q6K => "Q6_K".into(),
            GgmlType::Q8K => "Q8_K".into(),
            GgmlType::Unsupported(id) => format!("ggml type {id}"),
        }
    }

    /// (weights per block, bytes per block), or None for types we cannot decode.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        Some(match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::Bf16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
            GgmlType::Q8K => (256, 292),
            GgmlType::Unsupported(_) => return None,
        })
    }

    /// Bytes needed for `n` elements; errors for unsupported types or partial blocks.
    pub fn byte_size(self, n: u64) -> Result<u64> {
        let Some((block, bytes)) = self.block_layout() else {
            bail!(
                "{} is not supported (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, \
                 Q4_K, Q5_K, Q6_K, Q8_K)",
                self.name()
            );
        };
        ensure!(
            n.is_multiple_of(block as u64),
            "{n} elements is not a whole number of {} blocks of {block}",
            self.name()
        );
        (n / block as u64)
            .checked_mul(bytes as u64)
            .ok_or_else(|| anyhow::anyhow!("byte size of {n} elements overflows"))
    }
}

/// Decodes `n` elements stored as `ty` in `raw` (which must be exactly their size).
pub fn dequantize(ty: GgmlType, raw: &[u8], n: usize) -> Result<Vec<f32>> {
    let size = ty.byte_size(n as u64)?;
    ensure!(
        raw.len() as u64 == size,
        "expected {size} bytes for {n} {} elements, found {}",
        ty.name(),
        raw.len()
    );
    let mut out = vec![0f32; n];
    match ty {
        GgmlType::F32 => {
            for (o, b) in out.iter_mut().zip(raw.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, b) in out.iter_mut().zip(raw.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::Bf16 => {
            for (o, b) in out.iter_mut().zip(raw.chunks_exact(2)) {
                *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => for_blocks(ty, raw, &mut out, dequant_q4_0_block),
        GgmlType::Q4_1 => for_blocks(ty, raw, &mut out, dequant_q4_1_block),
        GgmlType::Q5_0 => for_blocks(ty, raw, &mut out, dequant_q5_0_block),
        GgmlType::Q5_1 => for_blocks(ty, raw, &mut out, dequant_q5_1_block),
        GgmlType::Q8_0 => for_blocks(ty, raw, &mut out, dequant_q8_0_block),
        GgmlType::Q4K => for_blocks(ty, raw, &mut out, dequant_q4_k_block),
        GgmlType::Q5K => for_blocks(ty, raw, &mut out, dequant_q5_k_block),
        GgmlType::Q6K => for_blocks(ty, raw, &mut out, dequant_q6_k_block),
        GgmlType::Q8K => for_blocks(ty, raw, &mut out, dequant_q8_k_block),
        GgmlType::Unsupported(_) => unreachable!("byte_size rejected it above"),
    }
    Ok(out)
}

fn for_blocks(ty: GgmlType, raw: &[u8], out: &mut [f32], f: fn(&[u8], &mut [f32])) {
    let Some((weights, bytes)) = ty.block_layout() else {
        return;
    };
    for (b, o) in raw.chunks_exact(bytes).zip(out.chunks_exact_mut(weights)) {
        f(b, o);
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn dequant_q4_0_block(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        out[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        out[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

fn dequant_q4_1_block(b: &[u8], out: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        out[j] = (q & 0x0f) as f32 * d + m;
        out[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// The 5-bit codes of one Q5 block: low nibbles from `qs`, fifth bits from `qh`.
fn q5_codes(qh: u32, qs: &[u8]) -> [u8; 32] {
    let mut codes = [0u8; 32];
    for (j, &q) in qs.iter().enumerate() {
        codes[j] = (q & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
        codes[j + 16] = (q >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
    codes
}

fn dequant_q5_0_block(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (o, c) in out.iter_mut().zip(q5_codes(qh, &b[6..22])) {
        *o = (c as i32 - 16) as f32 * d;
    }
}

fn dequant_q5_1_block(b: &[u8], out: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (o, c) in out.iter_mut().zip(q5_codes(qh, &b[8..24])) {
        *o = c as f32 * d + m;
    }
}

fn dequant_q8_0_block(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = (q as i8) as f32 * d;
    }
}

/// Scale and min of sub-block `j` (0..8) from the 12 packed bytes of Q4_K/Q5_K: six bits each;
/// sub-blocks 0..4 use the low six bits of bytes j and j+4, sub-blocks 4..8 combine a nibble of
/// byte j+4 with the top two bits of bytes j-4 (scale) and j (min).
fn k_scale_min(j: usize, s: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    };
    (sc as f32, m as f32)
}

/// Q4_K: 8 sub-blocks of 32; every 32 bytes of qs hold two sub-blocks (low, then high nibbles).
/// w = d * scale_j * q - dmin * min_j.
fn dequant_q4_k_block(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for (chunk, (q, o)) in qs
        .chunks_exact(32)
        .zip(out.chunks_exact_mut(64))
        .enumerate()
    {
        let (s1, m1) = k_scale_min(2 * chunk, scales);
        let (s2, m2) = k_scale_min(2 * chunk + 1, scales);
        for l in 0..32 {
            o[l] = d * s1 * (q[l] & 0x0f) as f32 - dmin * m1;
            o[l + 32] = d * s2 * (q[l] >> 4) as f32 - dmin * m2;
        }
    }
}

/// Q5_K: as Q4_K, plus a fifth bit per weight: bit 2c (low nibbles) and 2c+1 (high nibbles) of
/// qh[l] for chunk c.
fn dequant_q5_k_block(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for (chunk, (q, o)) in qs
        .chunks_exact(32)
        .zip(out.chunks_exact_mut(64))
        .enumerate()
    {
        let (s1, m1) = k_scale_min(2 * chunk, scales);
        let (s2, m2) = k_scale_min(2 * chunk + 1, scales);
        for l in 0..32 {
            let hi1 = ((qh[l] >> (2 * chunk)) & 1) << 4;
            let hi2 = ((qh[l] >> (2 * chunk + 1)) & 1) << 4;
            o[l] = d * s1 * ((q[l] & 0x0f) | hi1) as f32 - dmin * m1;
            o[l + 32] = d * s2 * ((q[l] >> 4) | hi2) as f32 - dmin * m2;
        }
    }
}

/// Q6_K: two halves of 128 weights; in each, ql (64 B) gives low nibbles of four 32-weight rows,
/// qh (32 B) their top two bits, and every 16 weights have their own i8 scale. w = d * sc * (q - 32).
fn dequant_q6_k_block(b: &[u8], out: &mut [f32]) {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for half in 0..2 {
        let (ql, qh) = (
            &ql[64 * half..64 * half + 64],
            &qh[32 * half..32 * half + 32],
        );
        let sc = &sc[8 * half..8 * half + 8];
        let o = &mut out[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            o[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            o[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            o[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            o[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

fn dequant_q8_k_block(b: &[u8], out: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (o, &q) in out.iter_mut().zip(&b[4..260]) {
        *o = (q as i8) as f32 * d;
    }
}
