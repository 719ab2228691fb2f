//! The deferral codebook: one packed allocation code per applied edit batch.
//!
//! An allocation code is the concatenation over MoLoRA layers of each router's k-hot top-k vector
//! (L*E bits; 24 with the paper's defaults, but nothing here assumes <= 64). Bit `i` lives in word
//! `i / 64` at bit position `i % 64`; bits past `bits_per_code` in the last word are always zero,
//! so the Hamming distance is simply the popcount of the XOR over all words.

use anyhow::{bail, ensure, Context, Result};

/// Append-only set of packed codes, stored row-major as `[len, words_per_code]` u64 words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Codebook {
    bits_per_code: usize,
    words_per_code: usize,
    entries: Vec<u64>,
}

/// Start of a serialised codebook, so a truncated or foreign file is recognised as such.
const MAGIC: &[u8; 8] = b"ELDCODE1";
const HEADER_LEN: usize = 8 + 8 + 8;

impl Codebook {
    pub fn new(bits_per_code: usize) -> Result<Self> {
        ensure!(bits_per_code > 0, "codebook: bits_per_code must be > 0");
        Ok(Codebook {
            bits_per_code,
            words_per_code: bits_per_code.div_ceil(64),
            entries: Vec::new(),
        })
    }

    /// Builds a codebook from already-packed row-major words (as returned by [`Self::entries`]).
    pub fn from_words(bits_per_code: usize, entries: Vec<u64>) -> Result<Self> {
        let mut book = Codebook::new(bits_per_code)?;
        ensure!(
            entries.len().is_multiple_of(book.words_per_code),
            "codebook: {} words is not a whole number of {}-word codes",
            entries.len(),
            book.words_per_code
        );
        for (i, code) in entries.chunks_exact(book.words_per_code).enumerate() {
            book.check_padding(code)
                .with_context(|| format!("codebook entry {i}"))?;
        }
        book.entries = entries;
        Ok(book)
    }

    pub fn bits_per_code(&self) -> usize {
        self.bits_per_code
    }

    pub fn words_per_code(&self) -> usize {
        self.words_per_code
    }

    /// Number of codes.
    pub fn len(&self) -> usize {
        self.entries.len() / self.words_per_code
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// All codes, row-major `[len, words_per_code]`.
    pub fn entries(&self) -> &[u64] {
        &self.entries
    }

    pub fn entry(&self, index: usize) -> Option<&[u64]> {
        self.entries.chunks_exact(self.words_per_code).nth(index)
    }

    /// Packs a bool vector of exactly `bits_per_code` bits into words.
    pub fn pack(&self, bits: &[bool]) -> Result<Vec<u64>> {
        ensure!(
            bits.len() == self.bits_per_code,
            "codebook: code has {} bits, expected {}",
            bits.len(),
            self.bits_per_code
        );
        let mut words = vec![0u64; self.words_per_code];
        for (i, _) in bits.iter().enumerate().filter(|(_, &bit)| bit) {
            words[i / 64] |= 1u64 << (i % 64);
        }
        Ok(words)
    }

    pub fn push_bits(&mut self, bits: &[bool]) -> Result<()> {
        let words = self.pack(bits)?;
        self.entries.extend_from_slice(&words);
        Ok(())
    }

    pub fn push_words(&mut self, code: &[u64]) -> Result<()> {
        ensure!(
            code.len() == self.words_per_code,
            "codebook: code has {} words, expected {} for {} bits",
            code.len(),
            self.words_per_code,
            self.bits_per_code
        );
        self.check_padding(code)?;
        self.entries.extend_from_slice(code);
        Ok(())
    }

    /// Smallest Hamming distance from `code` to any entry; `None` when the codebook is empty
    /// (then nothing is in scope).
    ///
    /// # Panics
    /// If `code.len() != words_per_code()`: codes come from the engine's own routers, so a
    /// mismatch is a bug, not bad input.
    pub fn min_distance(&self, code: &[u64]) -> Option<u32> {
        assert_eq!(
            code.len(),
            self.words_per_code,
            "codebook: query code has the wrong number of words"
        );
        self.entries
            .chunks_exact(self.words_per_code)
            .map(|entry| {
                entry
                    .iter()
                    .zip(code)
                    .map(|(a, b)| (a ^ b).count_ones())
                    .sum::<u32>()
            })
            .min()
    }

    /// Whether `self` begins with every entry of `older`: codebook entries are never rewritten, so
    /// a newer codebook must extend an older one.
    pub fn extends(&self, older: &Codebook) -> bool {
        self.bits_per_code == older.bits_per_code && self.entries.starts_with(&older.entries)
    }

    /// Serialises as `MAGIC, bits_per_code: u64 LE, len: u64 LE, words: u64 LE...`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_LEN + 8 * self.entries.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(self.bits_per_code as u64).to_le_bytes());
        bytes.extend_from_slice(&(self.len() as u64).to_le_bytes());
        for word in &self.entries {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        bytes
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        ensure!(
            bytes.len() >= HEADER_LEN && &bytes[..8] == MAGIC,
            "not a codebook file (missing the {:?} header)",
            std::str::from_utf8(MAGIC).unwrap_or("?")
        );
        let read_u64 = |at: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(word)
        };
        let bits_per_code = usize::try_from(read_u64(8)).context("bits_per_code too large")?;
        let len = usize::try_from(read_u64(16)).context("entry count too large")?;
        let words_per_code = bits_per_code.div_ceil(64);
        let expected = len
            .checked_mul(words_per_code)
            .and_then(|w| w.checked_mul(8))
            .and_then(|b| b.checked_add(HEADER_LEN));
        if expected != Some(bytes.len()) {
            bail!(
                "codebook file is {} bytes, expected {:?} for {len} codes of {bits_per_code} bits",
                bytes.len(),
                expected
            );
        }
        let words = bytes[HEADER_LEN..]
            .chunks_exact(8)
            .map(|chunk| {
                let mut word = [0u8; 8];
                word.copy_from_slice(chunk);
                u64::from_le_bytes(word)
            })
            .collect();
        Codebook::from_words(bits_per_code, words)
    }

    fn check_padding(&self, code: &[u64]) -> Result<()> {
        let used_in_last = self.bits_per_code % 64;
        if used_in_last != 0 {
            let last = code[self.words_per_code - 1];
            ensure!(
                last >> used_in_last == 0,
                "codebook: bits set past bit {} of a {}-bit code",
                self.bits_per_code - 1,
                self.bits_per_code
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_code(rng: &mut ChaCha8Rng, bits: usize) -> Vec<bool> {
        (0..bits).map(|_| rng.gen_bool(0.3)).collect()
    }

    fn naive_min_distance(codes: &[Vec<bool>], query: &[bool]) -> Option<u32> {
        codes
            .iter()
            .map(|code| code.iter().zip(query).filter(|(a, b)| a != b).count() as u32)
            .min()
    }

    #[test]
    fn min_distance_matches_bool_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for bits in [24usize, 64, 100, 130] {
            let mut book = Codebook::new(bits).unwrap();
            let mut reference: Vec<Vec<bool>> = Vec::new();
            let query = random_code(&mut rng, bits);
            assert_eq!(book.min_distance(&book.pack(&query).unwrap()), None);
            for _ in 0..40 {
                let code = random_code(&mut rng, bits);
                book.push_bits(&code).unwrap();
                reference.push(code);
                let query = random_code(&mut rng, bits);
                let packed = book.pack(&query).unwrap();
                assert_eq!(
                    book.min_distance(&packed),
                    naive_min_distance(&reference, &query),
                    "bits={bits}"
                );
            }
            // A stored code is at distance 0 from itself.
            let stored = book.pack(&reference[17]).unwrap();
            assert_eq!(book.min_distance(&stored), Some(0));
            assert_eq!(book.len(), 40);
            assert_eq!(book.entry(17).unwrap(), stored.as_slice());
        }
    }

    #[test]
    fn bytes_round_trip_and_reject_corruption() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut book = Codebook::new(130).unwrap();
        for _ in 0..5 {
            book.push_bits(&random_code(&mut rng, 130)).unwrap();
        }
        let bytes = book.to_bytes();
        assert_eq!(Codebook::from_bytes(&bytes).unwrap(), book);
        assert!(Codebook::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        assert!(Codebook::from_bytes(b"garbage").is_err());
        let mut padded = bytes.clone();
        let last = padded.len() - 1;
        padded[last] |= 0x80; // a bit past bit 129 of the last code
        assert!(Codebook::from_bytes(&padded).is_err());
    }

    #[test]
    fn rejects_wrong_sizes() {
        let mut book = Codebook::new(24).unwrap();
        assert!(book.push_bits(&[true; 23]).is_err());
        assert!(book.push_words(&[0, 0]).is_err());
        assert!(book.push_words(&[1 << 24]).is_err());
        assert!(Codebook::new(0).is_err());
        assert!(Codebook::from_words(100, vec![0; 3]).is_err());
    }

    #[test]
    fn extends_checks_prefix() {
        let mut old = Codebook::new(8).unwrap();
        old.push_words(&[3]).unwrap();
        let mut new = old.clone();
        new.push_words(&[5]).unwrap();
        assert!(new.extends(&old));
        assert!(!old.extends(&new));
        let mut rewritten = Codebook::new(8).unwrap();
        rewritten.push_words(&[4]).unwrap();
        rewritten.push_words(&[5]).unwrap();
        assert!(!rewritten.extends(&old));
    }
}
