//! Small helpers shared by several modules.
pub mod atomic;
pub mod fuzz_entry;

/// FNV-1a of a string: a seed that is the same on every machine and in every run.
pub fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}
