//! Content-defined chunks: how a state file is shipped so that a generation costs what it
//! changed, not what it holds.
//!
//! A file is cut where its content says (FastCDC's gear hash), not at fixed offsets. Bytes
//! inserted inside a file (a new edit's experts land inside every layer's tensor of the experts
//! file) change only the chunks around each insertion; every other chunk keeps its bytes and so
//! its name, the SHA-256 of those bytes. A leader uploads the chunks the object store lacks; a
//! replica rebuilds a file from the chunks of the files it already has and fetches the rest.
//!
//! A file's chunk list (the 32-byte digests of its chunks, in order) grows with the file (about
//! 0.05% of it), so it is shipped as chunks too, and a commit record names only the list's
//! chunks: a record stays small at any state size.
//!
//! Host-only and synchronous: the object store's side is in [`super::replication`].

use std::collections::HashMap;
use std::ops::Range;

use anyhow::{bail, ensure, Context, Result};
use sha2::Digest as _;

/// Chunk sizes: 64 KiB on average, cut between 16 and 256 KiB. Small enough that an edit batch's
/// insertions (a few per tensor) rewrite little around them, large enough that a 150 MB state
/// is a few thousand objects.
pub const MIN_CHUNK: usize = 16 * 1024;
pub const AVG_CHUNK: usize = 64 * 1024;
pub const MAX_CHUNK: usize = 256 * 1024;

/// A chunk's name: the SHA-256 of its bytes.
pub type Digest = [u8; 32];

/// Where a file is cut: each chunk's digest and byte range, in order.
pub type Cut = Vec<(Digest, Range<usize>)>;

pub fn digest(bytes: &[u8]) -> Digest {
    sha2::Sha256::digest(bytes).into()
}

pub fn to_hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn from_hex(s: &str) -> Result<Digest> {
    ensure!(
        s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()),
        "{s:?} is not a SHA-256 digest (64 hex digits)"
    );
    let mut d = [0u8; 32];
    for (i, byte) in d.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("checked hex");
    }
    Ok(d)
}

/// Where `bytes` is cut: each chunk's digest and byte range, in order (none for an empty file).
pub fn cut(bytes: &[u8]) -> Cut {
    fastcdc::v2020::FastCDC::new(bytes, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
        .map(|c| {
            let range = c.offset..c.offset + c.length;
            (digest(&bytes[range.clone()]), range)
        })
        .collect()
}

/// A chunk list's bytes: the digests, 32 bytes each, in order.
pub fn list_bytes(digests: impl IntoIterator<Item = Digest>) -> Vec<u8> {
    digests.into_iter().flatten().collect()
}

pub fn parse_list(bytes: &[u8]) -> Result<Vec<Digest>> {
    ensure!(
        bytes.len().is_multiple_of(32),
        "a chunk list of {} bytes is not a whole number of 32-byte digests",
        bytes.len()
    );
    Ok(bytes
        .chunks_exact(32)
        .map(|c| c.try_into().expect("32 bytes"))
        .collect())
}

/// Chunks at hand, by digest: those of the files a replica already has, and those it fetched.
#[derive(Default)]
pub struct ChunkIndex {
    files: Vec<Vec<u8>>,
    at: HashMap<Digest, (usize, Range<usize>)>,
    /// Bytes of the chunks added one by one (fetched).
    added: usize,
}

impl ChunkIndex {
    /// Makes the chunks of `bytes` available (the file is kept, its chunks point into it).
    pub fn add_file(&mut self, bytes: Vec<u8>) {
        let file = self.files.len();
        for (d, range) in cut(&bytes) {
            self.at.entry(d).or_insert((file, range));
        }
        self.files.push(bytes);
    }

    /// [`ChunkIndex::add_file`], and the chunks of the file's chunk list (a file unchanged in
    /// the next generation is shipped with the same list: a replica has that at hand too).
    pub fn add_file_with_list(&mut self, bytes: Vec<u8>) {
        let cut = cut(&bytes);
        self.add_list_of(&cut);
        self.add_cut_file(bytes, cut);
    }

    /// Adds the chunks of the chunk list of a file cut as `cut`.
    pub fn add_list_of(&mut self, cut: &Cut) {
        self.add_file(list_bytes(cut.iter().map(|(d, _)| *d)));
    }

    /// Adds one chunk fetched as `d`, refused unless its bytes have that digest.
    pub fn add_chunk(&mut self, d: Digest, bytes: Vec<u8>) -> Result<()> {
        if digest(&bytes) != d {
            bail!(
                "chunk {} does not match its name (its bytes hash to {})",
                to_hex(&d),
                to_hex(&digest(&bytes))
            );
        }
        let file = self.files.len();
        self.at.entry(d).or_insert((file, 0..bytes.len()));
        self.added += bytes.len();
        self.files.push(bytes);
        Ok(())
    }

    /// Bytes of the chunks [`ChunkIndex::add_chunk`] added.
    pub fn added_bytes(&self) -> usize {
        self.added
    }

    pub fn get(&self, d: &Digest) -> Option<&[u8]> {
        self.at.get(d).map(|(f, r)| &self.files[*f][r.clone()])
    }

    /// Which of `wanted` are not at hand (each once, in order).
    pub fn missing(&self, wanted: &[Digest]) -> Vec<Digest> {
        let mut seen = std::collections::HashSet::new();
        wanted
            .iter()
            .filter(|d| !self.at.contains_key(*d) && seen.insert(**d))
            .copied()
            .collect()
    }

    /// The bytes of the chunks `list`, in order (every one must be at hand).
    pub fn assemble(&self, list: &[Digest]) -> Result<Vec<u8>> {
        Ok(self.assemble_cut(list)?.0)
    }

    /// [`ChunkIndex::assemble`], with where each chunk lies in the result (the file's cut, for
    /// [`ChunkIndex::add_cut_file`]).
    pub fn assemble_cut(&self, list: &[Digest]) -> Result<(Vec<u8>, Cut)> {
        let mut out = Vec::new();
        let mut cut = Vec::with_capacity(list.len());
        for d in list {
            let bytes = self
                .get(d)
                .with_context(|| format!("chunk {} is not at hand", to_hex(d)))?;
            cut.push((*d, out.len()..out.len() + bytes.len()));
            out.extend_from_slice(bytes);
        }
        Ok((out, cut))
    }

    /// Makes the chunks of a file available whose cut is known (as [`ChunkIndex::assemble_cut`]
    /// gave it from chunks checked against their names), without cutting or hashing it again.
    pub fn add_cut_file(&mut self, bytes: Vec<u8>, cut: Cut) {
        let file = self.files.len();
        for (d, range) in cut {
            debug_assert!(range.end <= bytes.len());
            self.at.entry(d).or_insert((file, range));
        }
        self.files.push(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; n];
        ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    /// Bytes of `new`'s chunks that `old` does not have.
    fn new_bytes(old: &[u8], new: &[u8]) -> usize {
        let mut index = ChunkIndex::default();
        index.add_file(old.to_vec());
        cut(new)
            .into_iter()
            .filter(|(d, _)| index.get(d).is_none())
            .map(|(_, r)| r.len())
            .sum()
    }

    #[test]
    fn chunks_cover_the_file_in_order_within_their_bounds() {
        let bytes = random(3 << 20, 1);
        let chunks = cut(&bytes);
        assert!(chunks.len() > 10, "{} chunks", chunks.len());
        let mut at = 0;
        for (i, (d, r)) in chunks.iter().enumerate() {
            assert_eq!(r.start, at);
            assert!(r.len() <= MAX_CHUNK);
            assert!(r.len() >= MIN_CHUNK || i == chunks.len() - 1);
            assert_eq!(*d, digest(&bytes[r.clone()]));
            at = r.end;
        }
        assert_eq!(at, bytes.len());
        assert!(cut(&[]).is_empty());
    }

    /// What makes a generation cheap: bytes inserted at a few places inside a file leave every
    /// chunk away from the insertions as it was.
    #[test]
    fn insertions_inside_a_file_change_only_the_chunks_around_them() {
        let old = random(4 << 20, 2);
        let mut new = Vec::new();
        let cuts = [500_000, 1_700_000, 3_100_000];
        let mut from = 0;
        for (i, &at) in cuts.iter().enumerate() {
            new.extend_from_slice(&old[from..at]);
            new.extend_from_slice(&random(20_000, 10 + i as u64));
            from = at;
        }
        new.extend_from_slice(&old[from..]);
        let added = new_bytes(&old, &new);
        // The inserted 60 KB, and at most the two chunks around each insertion.
        assert!(added >= 60_000, "{added}");
        assert!(added <= 60_000 + cuts.len() * 2 * MAX_CHUNK, "{added}");
        assert!(added < new.len() / 4, "{added} of {}", new.len());
        // A file with nothing in common shares nothing.
        assert_eq!(new_bytes(&old, &random(1 << 20, 3)), 1 << 20);
    }

    #[test]
    fn a_file_is_rebuilt_from_its_chunk_list_and_a_bad_chunk_is_refused() {
        let old = random(1 << 20, 4);
        let mut new = old.clone();
        new.splice(300_000..300_000, random(5000, 5));
        let list = parse_list(&list_bytes(cut(&new).into_iter().map(|(d, _)| d))).unwrap();
        let mut index = ChunkIndex::default();
        index.add_file(old);
        let missing = index.missing(&list);
        assert!(!missing.is_empty() && missing.len() < list.len());
        assert!(index.assemble(&list).is_err(), "chunks are missing");
        let chunks: HashMap<Digest, Vec<u8>> = cut(&new)
            .into_iter()
            .map(|(d, r)| (d, new[r].to_vec()))
            .collect();
        let mut wrong = chunks[&missing[0]].clone();
        wrong[0] ^= 1;
        assert!(index.add_chunk(missing[0], wrong).is_err());
        for d in &missing {
            index.add_chunk(*d, chunks[d].clone()).unwrap();
        }
        assert_eq!(index.assemble(&list).unwrap(), new);
        // The assembled file's cut is the one cutting it again gives, so the next install can
        // take its chunks without hashing them.
        let (bytes, at) = index.assemble_cut(&list).unwrap();
        assert_eq!(at, cut(&new));
        let mut next = ChunkIndex::default();
        next.add_cut_file(bytes, at);
        assert!(next.missing(&list).is_empty());
        assert_eq!(next.assemble(&list).unwrap(), new);
        assert_eq!(next.added_bytes(), 0);
        // The file's chunk list is shipped as chunks too: an index of the files a replica has
        // holds those of their lists as well.
        let list_chunks: Vec<Digest> = cut(&list_bytes(list.iter().copied()))
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        assert!(!next.missing(&list_chunks).is_empty());
        let mut with_lists = ChunkIndex::default();
        with_lists.add_file_with_list(new.clone());
        assert!(with_lists.missing(&list_chunks).is_empty());
        assert!(with_lists.missing(&list).is_empty());
        next.add_list_of(&cut(&new));
        assert!(next.missing(&list_chunks).is_empty());
        assert!(parse_list(&[0u8; 33]).is_err());
        assert_eq!(from_hex(&to_hex(&list[0])).unwrap(), list[0]);
        assert!(from_hex("xy").is_err());
    }
}
