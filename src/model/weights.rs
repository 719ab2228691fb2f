//! Read-only access to a model's tensors in the Hugging Face safetensors layout.
//!
//! A model directory holds either one `model.safetensors` or shards listed by
//! `model.safetensors.index.json`. Every file is memory-mapped and only its JSON header is parsed
//! up front; tensor bytes are touched when a caller asks for them, so opening a 7B checkpoint is
//! instant and loading converts straight from the page cache into the caller's buffer (f32 for the
//! CPU model; f16, bf16 or f32 on the way to a GPU, copied unchanged when already stored so).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};

use super::names::TensorSpec;
use crate::backend::dtype::Element;

pub use safetensors::Dtype;

/// Single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Below this many elements a conversion runs on the calling thread: spawning rayon work for a
/// bias vector costs more than converting it.
const PARALLEL_MIN_ELEMS: usize = 1 << 16;
const PARALLEL_CHUNK_ELEMS: usize = 1 << 15;

/// Bytes hashed at each end of every file by [`Weights::fingerprint`].
const FINGERPRINT_SAMPLE: usize = 4096;

/// Where one tensor lives and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// The safetensors file that holds it.
    pub file: PathBuf,
}

struct Entry {
    info: TensorInfo,
    /// Index into `Weights::files`.
    file_idx: usize,
    /// Absolute byte range inside the mapped file (header already skipped).
    bytes: Range<usize>,
}

struct MappedFile {
    path: PathBuf,
    map: Mmap,
}

/// The tensors of one model directory, memory-mapped.
pub struct Weights {
    dir: PathBuf,
    files: Vec<MappedFile>,
    /// Sorted by name so iteration and fingerprints are deterministic.
    entries: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("dir", &self.dir)
            .field("files", &self.files.len())
            .field("tensors", &self.entries.len())
            .finish()
    }
}

impl Weights {
    /// Opens `dir/model.safetensors`, or the shards named by `dir/model.safetensors.index.json`.
    /// A path to a single `.safetensors` file is accepted too.
    pub fn open(dir: &Path) -> Result<Weights> {
        if dir.is_file() {
            return Self::open_file(dir);
        }
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        let mut weights = Weights {
            dir: dir.to_path_buf(),
            files: Vec::new(),
            entries: BTreeMap::new(),
        };
        if single.is_file() {
            weights.add_file(&single, None)?;
        } else if index.is_file() {
            weights.open_sharded(&index)?;
        } else {
            bail!(
                "no weights in {}: expected {SINGLE_FILE} or {INDEX_FILE}",
                dir.display()
            );
        }
        Ok(weights)
    }

    /// Opens one safetensors file directly (any file name).
    pub fn open_file(path: &Path) -> Result<Weights> {
        let mut weights = Weights {
            dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            files: Vec::new(),
            entries: BTreeMap::new(),
        };
        weights.add_file(path, None)?;
        Ok(weights)
    }

    fn open_sharded(&mut self, index: &Path) -> Result<()> {
        let text = std::fs::read_to_string(index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{} has no \"weight_map\" object", index.display()))?;
        // shard file -> tensors the index says it holds
        let mut by_shard: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (tensor, shard) in map {
            let shard = shard.as_str().with_context(|| {
                format!(
                    "{}: weight_map entry for tensor {tensor:?} is not a file name",
                    index.display()
                )
            })?;
            // A shard name must stay inside the model directory.
            if shard.contains('/') || shard.contains('\\') || shard == ".." {
                bail!(
                    "{}: shard name {shard:?} for tensor {tensor:?} is not a plain file name",
                    index.display()
                );
            }
            by_shard
                .entry(shard.to_string())
                .or_default()
                .push(tensor.clone());
        }
        if by_shard.is_empty() {
            bail!("{}: weight_map is empty", index.display());
        }
        for (shard, expected) in &by_shard {
            let path = self.dir.join(shard);
            if !path.is_file() {
                bail!(
                    "{} names shard {shard:?} (e.g. for tensor {:?}) but {} does not exist",
                    index.display(),
                    expected[0],
                    path.display()
                );
            }
            self.add_file(&path, Some(expected))?;
        }
        Ok(())
    }

    /// Maps one file, parses its header and registers its tensors. When `expected` is given (from
    /// an index), every listed tensor must be present in this file.
    fn add_file(&mut self, path: &Path, expected: Option<&[String]>) -> Result<()> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only; a checkpoint modified while the engine runs is outside
        // what any safetensors reader can defend against (transformers and candle map the same way).
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map {}", path.display()))?;
        let file_idx = self.files.len();
        for entry in read_table(path, &map)? {
            let SafetensorsEntry {
                name,
                dtype,
                shape,
                bytes,
            } = entry;
            if let Some(prev) = self.entries.get(&name) {
                bail!(
                    "tensor {name:?} appears in both {} and {}",
                    prev.info.file.display(),
                    path.display()
                );
            }
            let entry = Entry {
                info: TensorInfo {
                    dtype,
                    shape,
                    file: path.to_path_buf(),
                },
                file_idx,
                bytes,
            };
            self.entries.insert(name, entry);
        }
        if let Some(expected) = expected {
            for name in expected {
                match self.entries.get(name) {
                    Some(e) if e.file_idx == file_idx => {}
                    _ => bail!(
                        "index says tensor {name:?} is in {}, but that file does not hold it",
                        path.display()
                    ),
                }
            }
        }
        self.files.push(MappedFile {
            path: path.to_path_buf(),
            map,
        });
        Ok(())
    }

    /// The model directory this was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.entries.get(name).map(|e| &e.info)
    }

    /// The first of `names` that exists, if any (GPT-2 keys come with or without `transformer.`).
    pub fn find_any<'a>(&self, names: &[&'a str]) -> Option<&'a str> {
        names.iter().copied().find(|n| self.contains(n))
    }

    /// The raw little-endian bytes of a tensor in its stored dtype, for uploading f16/bf16
    /// weights to a device without a round trip through f32.
    pub fn raw_bytes(&self, name: &str) -> Result<(&[u8], &TensorInfo)> {
        let entry = self.entry(name)?;
        let map = &self.files[entry.file_idx].map;
        Ok((&map[entry.bytes.clone()], &entry.info))
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).with_context(|| {
            format!(
                "tensor {name:?} not found in the checkpoint at {} ({} tensors)",
                self.dir.display(),
                self.entries.len()
            )
        })
    }

    /// Loads a tensor as f32, checking its shape. F32, F16 and BF16 are supported.
    pub fn load_f32(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>> {
        self.load_as(name, expected_shape)
    }

    /// Like [`Weights::load_f32`], trying each name in turn; the error lists every name tried.
    pub fn load_f32_any(&self, names: &[&str], expected_shape: &[usize]) -> Result<Vec<f32>> {
        self.load_as_any(names, expected_shape)
    }

    /// Loads a tensor as `T`, checking its shape: a copy when it is stored as `T`, a conversion
    /// straight from the stored dtype otherwise (never a whole-tensor f32 intermediate).
    pub fn load_as<T: Element>(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<T>> {
        let entry = self.entry_of_shape(name, expected_shape)?;
        let bytes = &self.files[entry.file_idx].map[entry.bytes.clone()];
        convert_to::<T>(bytes, entry.info.dtype).with_context(|| {
            format!(
                "{}: cannot load tensor {name:?} as {:?}",
                entry.info.file.display(),
                T::STORED
            )
        })
    }

    /// Like [`Weights::load_as`], trying each name in turn; the error lists every name tried.
    pub fn load_as_any<T: Element>(
        &self,
        names: &[&str],
        expected_shape: &[usize],
    ) -> Result<Vec<T>> {
        self.load_as(self.present_name(names, expected_shape)?, expected_shape)
    }

    /// The tensor of a model description (under its name or an alias) as `T`.
    pub fn load_spec<T: Element>(&self, spec: &TensorSpec) -> Result<Vec<T>> {
        self.load_as_any(&spec.candidates(), &spec.shape)
    }

    /// Checks from the headers alone what loading `spec` would check (present under its name or
    /// an alias, with its shape, in a dtype the loader reads), so a broken checkpoint is refused
    /// before anything is read or allocated.
    pub fn check_spec(&self, spec: &TensorSpec) -> Result<()> {
        let name = self.present_name(&spec.candidates(), &spec.shape)?;
        let info = &self.entry_of_shape(name, &spec.shape)?.info;
        if dtype_size(info.dtype).is_none() {
            bail!(
                "{}: tensor {name:?} has dtype {:?}, which is not supported (expected F32, F16 or BF16)",
                info.file.display(),
                info.dtype
            );
        }
        Ok(())
    }

    /// The first of `names` in the checkpoint, or an error listing them all.
    fn present_name<'a>(&self, names: &[&'a str], expected_shape: &[usize]) -> Result<&'a str> {
        self.find_any(names).with_context(|| {
            format!(
                "none of the tensors {names:?} is in the checkpoint at {} (expected shape {:?})",
                self.dir.display(),
                expected_shape
            )
        })
    }

    /// The entry of `name`, which must have `expected_shape`.
    fn entry_of_shape(&self, name: &str, expected_shape: &[usize]) -> Result<&Entry> {
        let entry = self.entry(name)?;
        if entry.info.shape != expected_shape {
            bail!(
                "{}: tensor {name:?} has shape {:?}, expected {:?}",
                entry.info.file.display(),
                entry.info.shape,
                expected_shape
            );
        }
        Ok(entry)
    }

    /// A stable identifier of the base model: SHA-256 over `config.json` (when present), every
    /// tensor's name, dtype and shape, and the first and last 4 KiB of every weights file.
    /// Cheap (no full read), yet changes when the config, the layout or the bytes at either end
    /// of any shard change.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"elder-weights-fingerprint-v1\0");
        match std::fs::read(self.dir.join("config.json")) {
            Ok(cfg) => {
                h.update((cfg.len() as u64).to_le_bytes());
                h.update(&cfg);
            }
            Err(_) => h.update(u64::MAX.to_le_bytes()),
        }
        for (name, e) in &self.entries {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update(format!("{:?}", e.info.dtype).as_bytes());
            h.update((e.info.shape.len() as u64).to_le_bytes());
            for d in &e.info.shape {
                h.update((*d as u64).to_le_bytes());
            }
        }
        // Files are hashed by name (not full path) so a moved model keeps its fingerprint.
        let mut files: Vec<&MappedFile> = self.files.iter().collect();
        files.sort_by(|a, b| a.path.file_name().cmp(&b.path.file_name()));
        for f in files {
            let name = f.path.file_name().map(|n| n.to_string_lossy().into_owned());
            h.update(name.unwrap_or_default().as_bytes());
            let len = f.map.len();
            h.update((len as u64).to_le_bytes());
            let head = &f.map[..len.min(FINGERPRINT_SAMPLE)];
            let tail = &f.map[len.saturating_sub(FINGERPRINT_SAMPLE)..];
            h.update(head);
            h.update(tail);
        }
        h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    }
}

/// One tensor of a safetensors file's table, as [`read_table`] checked it.
#[derive(Debug, Clone, PartialEq)]
pub struct SafetensorsEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range inside the file (header already skipped), within `bytes.len()`.
    pub bytes: Range<usize>,
}

/// Checks a safetensors file's header length and tensor table against its bytes (`path` only
/// names it in errors) and returns the table. Every entry's byte range lies inside `bytes`.
pub fn read_table(path: &Path, bytes: &[u8]) -> Result<Vec<SafetensorsEntry>> {
    check_header_length(path, bytes)?;
    let (header_len, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a valid safetensors file ({} bytes; truncated or corrupt?): {e}",
            path.display(),
            bytes.len()
        )
    })?;
    let data_start = 8 + header_len;
    let mut table = Vec::new();
    for (name, info) in metadata.tensors() {
        let (start, end) = info.data_offsets;
        // read_metadata already checks that offsets tile the data exactly; this guards the
        // callers' slicing against any future relaxation of that check.
        let range = data_start
            .checked_add(start)
            .zip(data_start.checked_add(end))
            .filter(|(s, e)| s <= e && *e <= bytes.len());
        let Some((start_abs, end_abs)) = range else {
            bail!(
                "{}: tensor {name:?} data offsets {start}..{end} run past the end of the file ({} bytes)",
                path.display(),
                bytes.len()
            );
        };
        table.push(SafetensorsEntry {
            name,
            dtype: info.dtype,
            shape: info.shape.clone(),
            bytes: start_abs..end_abs,
        });
    }
    Ok(table)
}

/// Checks the 8-byte header length against the file size, so a truncated file gets a message
/// that says what is wrong in numbers rather than a bare "invalid header length".
fn check_header_length(path: &Path, map: &[u8]) -> Result<()> {
    let Some(prefix) = map.get(..8) else {
        bail!(
            "{} is {} bytes long, too short for a safetensors file (truncated?)",
            path.display(),
            map.len()
        );
    };
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(prefix);
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > (map.len() as u64).saturating_sub(8) {
        bail!(
            "{}: header length {header_len} runs past the end of the file ({} bytes; truncated or not a safetensors file)",
            path.display(),
            map.len()
        );
    }
    Ok(())
}

/// Bytes per element of the dtypes the loader converts.
pub fn dtype_size(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 => Some(4),
        Dtype::F16 | Dtype::BF16 => Some(2),
        _ => None,
    }
}

/// Converts little-endian stored values to f32, in parallel for big tensors.
pub fn convert_to_f32(bytes: &[u8], dtype: Dtype) -> Result<Vec<f32>> {
    convert_to::<f32>(bytes, dtype)
}

/// Converts little-endian stored values to `T`, in parallel for big tensors. Values already
/// stored as `T` are copied bit for bit; others go element by element through f32 (exact for
/// every f16 and bf16 value), so the result is what `T::from_f32` gives for the f32 value.
pub fn convert_to<T: Element>(bytes: &[u8], dtype: Dtype) -> Result<Vec<T>> {
    let size = dtype_size(dtype)
        .with_context(|| format!("dtype {dtype:?} is not supported (expected F32, F16 or BF16)"))?;
    if !bytes.len().is_multiple_of(size) {
        bail!(
            "{} bytes is not a whole number of {dtype:?} elements",
            bytes.len()
        );
    }
    let n = bytes.len() / size;
    let mut out = vec![T::from_f32(0.0); n];
    // One loop per source dtype, chosen outside the loop so each stays a plain streaming pass.
    fn each<T>(src: &[u8], dst: &mut [T], size: usize, f: impl Fn(&[u8]) -> T) {
        for (d, s) in dst.iter_mut().zip(src.chunks_exact(size)) {
            *d = f(s);
        }
    }
    let convert = |src: &[u8], dst: &mut [T]| match dtype {
        d if d == T::STORED => each(src, dst, size, T::from_le_slice),
        Dtype::F32 => each(src, dst, size, |s| T::from_f32(f32::from_le_slice(s))),
        Dtype::F16 => each(src, dst, size, |s| {
            T::from_f32(half::f16::from_le_slice(s).to_f32())
        }),
        _ => each(src, dst, size, |s| {
            T::from_f32(half::bf16::from_le_slice(s).to_f32())
        }),
    };
    if n < PARALLEL_MIN_ELEMS {
        convert(bytes, &mut out);
    } else {
        out.par_chunks_mut(PARALLEL_CHUNK_ELEMS)
            .zip(bytes.par_chunks(PARALLEL_CHUNK_ELEMS * size))
            .for_each(|(dst, src)| convert(src, dst));
    }
    Ok(out)
}

/// Names of the shard files an index refers to, for tools that copy checkpoints.
pub fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(INDEX_FILE);
    let text = std::fs::read_to_string(&index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let json: HashMap<String, serde_json::Value> = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", index.display()))?;
    let names: BTreeSet<String> = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no \"weight_map\" object", index.display()))?
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversion_matches_half_reference_on_random_values() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // Big enough to take the parallel path, odd-sized so the last chunk is partial.
        let vals: Vec<f32> = (0..PARALLEL_MIN_ELEMS * 3 + 17)
            .map(|_| rng.gen_range(-4.0f32..4.0))
            .collect();
        let f32_bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(convert_to_f32(&f32_bytes, Dtype::F32).unwrap(), vals);
        let f16_bytes: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
        let got = convert_to_f32(&f16_bytes, Dtype::F16).unwrap();
        for (g, v) in got.iter().zip(&vals) {
            assert_eq!(*g, half::f16::from_f32(*v).to_f32());
        }
        let bf_bytes: Vec<u8> = vals
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
            .collect();
        let got = convert_to_f32(&bf_bytes, Dtype::BF16).unwrap();
        for (g, v) in got.iter().zip(&vals) {
            assert_eq!(*g, half::bf16::from_f32(*v).to_f32());
        }
    }

    /// Every (stored dtype, target type) pair gives `T::from_f32` of the stored value, and a
    /// tensor stored as the target type comes back bit for bit (NaN payloads and all).
    #[test]
    fn typed_conversion_is_the_f32_conversion_and_a_copy_when_types_agree() {
        use half::{bf16, f16};
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let n = PARALLEL_MIN_ELEMS + 333;
        let f32_bytes: Vec<u8> = (0..n)
            .flat_map(|_| rng.gen_range(-70000.0f32..70000.0).to_le_bytes())
            .collect();
        // Arbitrary 16-bit patterns: NaNs, infinities and subnormals included.
        let half_bytes: Vec<u8> = (0..n)
            .flat_map(|_| rng.gen::<u16>().to_le_bytes())
            .collect();
        fn check<T: Element + bytemuck::Pod + std::fmt::Debug>(bytes: &[u8], dtype: Dtype) {
            let got = convert_to::<T>(bytes, dtype).unwrap();
            let via_f32 = convert_to_f32(bytes, dtype).unwrap();
            if dtype == T::STORED {
                // The bytes of the result are the stored bytes (this is a little-endian host).
                assert!(
                    bytemuck::cast_slice::<T, u8>(&got) == bytes,
                    "{dtype:?} -> {:?} is not a copy",
                    T::STORED
                );
            } else {
                for (g, f) in got.iter().zip(&via_f32) {
                    let want = T::from_f32(*f);
                    assert!(
                        g.to_f32().to_bits() == want.to_f32().to_bits(),
                        "{dtype:?} -> {:?}: {g:?} vs {want:?}",
                        T::STORED
                    );
                }
            }
            assert_eq!(got.len(), via_f32.len());
        }
        for (bytes, dtype) in [
            (&f32_bytes, Dtype::F32),
            (&half_bytes, Dtype::F16),
            (&half_bytes, Dtype::BF16),
        ] {
            check::<f32>(bytes, dtype);
            check::<f16>(bytes, dtype);
            check::<bf16>(bytes, dtype);
        }
    }

    #[test]
    fn unsupported_dtype_is_named() {
        let err = convert_to_f32(&[0u8; 8], Dtype::I64).unwrap_err();
        assert!(format!("{err:#}").contains("I64"), "{err:#}");
    }
}
