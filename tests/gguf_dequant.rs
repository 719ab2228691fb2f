//! Dequantizers: hand-computed blocks, and round trips through simple quantizers written here
//! (on random data the reconstruction error must stay within half a quantization step).

use elder::model::gguf::dequant::{dequantize, GgmlType};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};

fn random_blocks(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    // Vary the scale per block so small and large scales are both exercised.
    (0..n)
        .map(|i| rng.gen_range(-1.0f32..1.0) * (0.01 + (i / 32 % 7) as f32))
        .collect()
}

fn f16_bytes(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

/// Symmetric quantizer for Q4_0 / Q5_0 / Q8_0: code = round(x / d) + offset, d from the block max.
fn quantize_symmetric(x: &[f32], levels: f32, offset: i32, bits: u32) -> (Vec<u8>, Vec<f32>) {
    let mut out = Vec::new();
    let mut steps = Vec::new();
    for b in x.chunks(32) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = f16::from_f32(amax / levels).to_f32();
        let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
        let codes: Vec<i32> = b
            .iter()
            .map(|v| (v * inv).round() as i32 + offset)
            .collect();
        out.extend(f16_bytes(d));
        match bits {
            8 => out.extend(codes.iter().map(|&c| c as i8 as u8)),
            4 => out.extend((0..16).map(|j| (codes[j] as u8) | ((codes[j + 16] as u8) << 4))),
            5 => {
                let qh: u32 = (0..32).map(|j| (((codes[j] >> 4) & 1) as u32) << j).sum();
                out.extend(qh.to_le_bytes());
                out.extend(
                    (0..16).map(|j| (codes[j] as u8 & 15) | ((codes[j + 16] as u8 & 15) << 4)),
                );
            }
            _ => unreachable!(),
        }
        steps.push(d);
    }
    (out, steps)
}

/// Affine quantizer for Q4_1 / Q5_1: code = round((x - m) / d), m = block min.
fn quantize_affine(x: &[f32], max_code: f32, bits: u32) -> (Vec<u8>, Vec<f32>) {
    let mut out = Vec::new();
    let mut steps = Vec::new();
    for b in x.chunks(32) {
        let lo = b.iter().cloned().fold(f32::INFINITY, f32::min);
        let hi = b.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let m = f16::from_f32(lo).to_f32();
        let d = f16::from_f32((hi - lo) / max_code).to_f32();
        let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
        let codes: Vec<u32> = b
            .iter()
            .map(|v| ((v - m) * inv).round().clamp(0.0, max_code) as u32)
            .collect();
        out.extend(f16_bytes(d));
        out.extend(f16_bytes(m));
        if bits == 5 {
            let qh: u32 = (0..32).map(|j| ((codes[j] >> 4) & 1) << j).sum();
            out.extend(qh.to_le_bytes());
        }
        out.extend((0..16).map(|j| (codes[j] as u8 & 15) | ((codes[j + 16] as u8 & 15) << 4)));
        steps.push(d);
    }
    (out, steps)
}

fn assert_within_half_step(ty: GgmlType, x: &[f32], raw: &[u8], steps: &[f32], extra: f32) {
    let y = dequantize(ty, raw, x.len()).unwrap();
    for (i, (a, b)) in x.iter().zip(&y).enumerate() {
        let d = steps[i / 32];
        // Half a step, plus rounding slack for f16 scales/mins (`extra` steps).
        let tol = d * (0.5 + extra) + 1e-6;
        assert!(
            (a - b).abs() <= tol,
            "{ty:?} element {i}: {a} vs {b}, step {d}"
        );
    }
}

#[test]
fn q8_0_round_trip() {
    let x = random_blocks(1, 32 * 40);
    let (raw, steps) = quantize_symmetric(&x, 127.0, 0, 8);
    assert_within_half_step(GgmlType::Q8_0, &x, &raw, &steps, 0.01);
}

#[test]
fn q4_0_round_trip() {
    let x = random_blocks(2, 32 * 40);
    let (raw, steps) = quantize_symmetric(&x, 7.0, 8, 4);
    assert_within_half_step(GgmlType::Q4_0, &x, &raw, &steps, 0.01);
}

#[test]
fn q5_0_round_trip() {
    let x = random_blocks(3, 32 * 40);
    let (raw, steps) = quantize_symmetric(&x, 15.0, 16, 5);
    assert_within_half_step(GgmlType::Q5_0, &x, &raw, &steps, 0.01);
}

#[test]
fn q4_1_round_trip() {
    let x = random_blocks(4, 32 * 40);
    let (raw, steps) = quantize_affine(&x, 15.0, 4);
    // The f16-rounded min may sit above the true min, costing up to one more f16 ulp.
    assert_within_half_step(GgmlType::Q4_1, &x, &raw, &steps, 0.05);
}

#[test]
fn q5_1_round_trip() {
    let x = random_blocks(5, 32 * 40);
    let (raw, steps) = quantize_affine(&x, 31.0, 5);
    assert_within_half_step(GgmlType::Q5_1, &x, &raw, &steps, 0.1);
}

#[test]
fn float_types_round_trip() {
    let x = random_blocks(6, 100);
    let f32_raw: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(dequantize(GgmlType::F32, &f32_raw, 100).unwrap(), x);
    let f16_raw: Vec<u8> = x.iter().flat_map(|&v| f16_bytes(v)).collect();
    let bf_raw: Vec<u8> = x
        .iter()
        .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
        .collect();
    let y16 = dequantize(GgmlType::F16, &f16_raw, 100).unwrap();
    let ybf = dequantize(GgmlType::Bf16, &bf_raw, 100).unwrap();
    for i in 0..100 {
        assert!((x[i] - y16[i]).abs() <= 1e-3 * x[i].abs() + 1e-7, "f16 {i}");
        assert!(
            (x[i] - ybf[i]).abs() <= 8e-3 * x[i].abs() + 1e-30,
            "bf16 {i}"
        );
    }
}

#[test]
fn hand_computed_q4_0_block() {
    let mut b = vec![0u8; 18];
    b[..2].copy_from_slice(&f16_bytes(0.5));
    b[2] = 0x1F; // element 0 low nibble 15, element 16 high nibble 1
    for q in &mut b[3..] {
        *q = 0x88; // zero
    }
    let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
    assert_eq!(y[0], 3.5);
    assert_eq!(y[16], -3.5);
    assert!(y
        .iter()
        .enumerate()
        .all(|(i, &v)| i == 0 || i == 16 || v == 0.0));
}

#[test]
fn hand_computed_q4_1_block() {
    let mut b = vec![0u8; 20];
    b[..2].copy_from_slice(&f16_bytes(1.0));
    b[2..4].copy_from_slice(&f16_bytes(-2.0));
    b[4 + 3] = 0xA2;
    let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
    assert_eq!(y[3], 0.0); // 2 * 1 - 2
    assert_eq!(y[19], 8.0); // 10 * 1 - 2
    assert_eq!(y[0], -2.0);
}

#[test]
fn hand_computed_q8_0_block() {
    let mut b = vec![0u8; 34];
    b[..2].copy_from_slice(&f16_bytes(0.25));
    b[2 + 5] = (-4i8) as u8;
    b[2 + 31] = 127;
    let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
    assert_eq!((y[5], y[31], y[0]), (-1.0, 31.75, 0.0));
}

#[test]
fn hand_computed_q5_0_block() {
    let mut b = vec![0u8; 22];
    b[..2].copy_from_slice(&f16_bytes(1.0));
    let qh: u32 = 1 | (1 << 17);
    b[2..6].copy_from_slice(&qh.to_le_bytes());
    b[6 + 1] = 0x30; // element 1 low nibble 0, element 17 high nibble 3
    let y = dequantize(GgmlType::Q5_0, &b, 32).unwrap();
    assert_eq!(y[0], 0.0); // 16 - 16
    assert_eq!(y[1], -16.0); // 0 - 16
    assert_eq!(y[16], -16.0);
    assert_eq!(y[17], 3.0); // (3 | 16) - 16
}

#[test]
fn wrong_sizes_and_unsupported_types_are_errors() {
    assert!(dequantize(GgmlType::Q4_0, &[0u8; 17], 32).is_err());
    assert!(dequantize(GgmlType::Q4_0, &[0u8; 18], 31).is_err());
    let err = dequantize(GgmlType::from_id(10).unwrap(), &[0u8; 84], 256).unwrap_err();
    assert!(format!("{err:#}").contains("not supported"), "{err:#}");
    assert!(GgmlType::from_id(999).is_err());
}

/// k-quant blocks of random bytes, dequantized by gguf-py (tools/make_kquant_fixtures.py).
#[test]
fn k_quants_match_the_gguf_py_reference() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    for (name, ty) in [
        ("q4_k", GgmlType::Q4K),
        ("q5_k", GgmlType::Q5K),
        ("q6_k", GgmlType::Q6K),
    ] {
        let raw = std::fs::read(dir.join(format!("{name}.raw"))).unwrap();
        let want: Vec<f32> = std::fs::read(dir.join(format!("{name}.f32")))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let got = dequantize(ty, &raw, want.len()).unwrap();
        let mut distinct = want.clone();
        distinct.sort_by(f32::total_cmp);
        distinct.dedup();
        assert!(
            distinct.len() > 100,
            "{name}: fixture too uniform to test anything"
        );
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs() + 1e-7,
                "{name} element {i}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn hand_computed_q6_k_and_q8_k() {
    // Q6_K: element 0 uses ql[0] low nibble, qh[0] bits 0-1, scale 0; element 200 is in the
    // second half (128 + 72): ql[64 + 8] high nibble, qh[32 + 8] bits 4-5, scale 8 + 4.
    let mut b = vec![0u8; 210];
    b[0] = 0x05;
    b[128] = 0b10; // q = 5 | (2 << 4) = 37 -> 37 - 32 = 5
    b[192] = 3; // scale 0
    b[64 + 8] = 0x70;
    b[128 + 32 + 8] = 0b01 << 4; // q = 7 | (1 << 4) = 23 -> -9
    b[192 + 12] = (-2i8) as u8;
    b[208..210].copy_from_slice(&f16_bytes(0.5));
    let y = dequantize(GgmlType::Q6K, &b, 256).unwrap();
    assert_eq!(y[0], 0.5 * 3.0 * 5.0);
    assert_eq!(y[200], 0.5 * -2.0 * -9.0);
    assert_eq!(y[1], 0.5 * 3.0 * -32.0);

    let mut b = vec![0u8; 292];
    b[..4].copy_from_slice(&0.125f32.to_le_bytes());
    b[4 + 255] = (-8i8) as u8;
    let y = dequantize(GgmlType::Q8K, &b, 256).unwrap();
    assert_eq!((y[255], y[0]), (-1.0, 0.0));
}
