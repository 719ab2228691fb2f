//! INTERIM (replaced at merge by the data branch's codebook).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Codebook {
    pub bits_per_code: usize,
    pub words_per_code: usize,
    pub entries: Vec<u64>,
}
impl Codebook {
    pub fn new(bits_per_code: usize) -> Self {
        Codebook {
            bits_per_code,
            words_per_code: bits_per_code.div_ceil(64),
            entries: Vec::new(),
        }
    }
    pub fn len(&self) -> usize {
        self.entries.len() / self.words_per_code.max(1)
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn push(&mut self, code: &[u64]) {
        self.entries.extend_from_slice(code);
    }
    pub fn min_distance(&self, code: &[u64]) -> Option<u32> {
        self.entries
            .chunks(self.words_per_code)
            .map(|e| e.iter().zip(code).map(|(a, b)| (a ^ b).count_ones()).sum())
            .min()
    }
}
