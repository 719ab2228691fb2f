//! The element types a weight is held in on the host: f32 for the CPU reference, and f16 or bf16
//! (or f32) on the way to a device. Each knows the safetensors dtype that stores exactly its bits,
//! so a checkpoint already in the wanted type is copied, never rounded through f32 and back.

use half::{bf16, f16};
use safetensors::Dtype;

/// A host element type that weights convert to. Math never happens in it: values go through f32.
pub trait Element: Copy + Send + Sync + 'static {
    /// The safetensors dtype whose little-endian bytes are this type's bits.
    const STORED: Dtype;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    /// One element from its little-endian bytes (exactly `size_of::<Self>()` of them).
    fn from_le_slice(bytes: &[u8]) -> Self;
}

impl Element for f32 {
    const STORED: Dtype = Dtype::F32;
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn from_le_slice(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl Element for f16 {
    const STORED: Dtype = Dtype::F16;
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_le_slice(b: &[u8]) -> Self {
        f16::from_le_bytes([b[0], b[1]])
    }
}

impl Element for bf16 {
    const STORED: Dtype = Dtype::BF16;
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_le_slice(b: &[u8]) -> Self {
        bf16::from_le_bytes([b[0], b[1]])
    }
}
