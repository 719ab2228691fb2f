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
            30 => GgmlType::Bf16,
            // 4, 5 were Q4_2/Q4_3 (removed); 9..=29 are Q8_1, k-quants, i-quants and integer types.
            9..=29 | 31..=40 => GgmlType::Unsupported(id),
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
            GgmlType::Unsupported(_) => return None,
        })
    }

    /// Bytes needed for `n` elements; errors for unsupported types or partial blocks.
    pub fn byte_size(self, n: u64) -> Result<u64> {
        let Some((block, bytes)) = self.block_layout() else {
            bail!(
                "{} is not supported (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)",
                self.name()
            );
        };
        ensure!(
            n % block as u64 == 0,
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
        GgmlType::Q4_0 => for_blocks(raw, &mut out, 18, dequant_q4_0_block),
        GgmlType::Q4_1 => for_blocks(raw, &mut out, 20, dequant_q4_1_block),
        GgmlType::Q5_0 => for_blocks(raw, &mut out, 22, dequant_q5_0_block),
        GgmlType::Q5_1 => for_blocks(raw, &mut out, 24, dequant_q5_1_block),
        GgmlType::Q8_0 => for_blocks(raw, &mut out, 34, dequant_q8_0_block),
        GgmlType::Unsupported(_) => unreachable!("byte_size rejected it above"),
    }
    Ok(out)
}

fn for_blocks(raw: &[u8], out: &mut [f32], block_bytes: usize, f: fn(&[u8], &mut [f32])) {
    for (b, o) in raw.chunks_exact(block_bytes).zip(out.chunks_exact_mut(32)) {
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
