//! Reading the GGUF container (versions 2 and 3): header, metadata key/values, tensor infos and
//! the aligned data section. The file is memory-mapped; tensors are borrowed byte slices.
//!
//! Layout (all little-endian):
//!   magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
//!   kv_count x (key: string, value_type u32, value)
//!   tensor_count x (name: string, n_dims u32, ne[n_dims] u64, ggml_type u32, offset u64)
//!   padding to `general.alignment` (default 32) | data section (tensor offsets are relative to it)
//! A string is a u64 byte length followed by UTF-8 bytes (no terminator).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use super::dequant::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// One metadata value. Arrays hold values of a single type (possibly nested arrays).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// Any integer type that fits in u64 (GGUF writers are not consistent about u32 vs u64 etc.).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(x) => Some(x.into()),
            MetaValue::U16(x) => Some(x.into()),
            MetaValue::U32(x) => Some(x.into()),
            MetaValue::U64(x) => Some(x),
            MetaValue::I8(x) => u64::try_from(x).ok(),
            MetaValue::I16(x) => u64::try_from(x).ok(),
            MetaValue::I32(x) => u64::try_from(x).ok(),
            MetaValue::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(x) => Some(x.into()),
            MetaValue::F64(x) => Some(x),
            _ => self.as_u64().map(|x| x as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// Short type name for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F32(_) => "f32",
            MetaValue::F64(_) => "f64",
            MetaValue::Bool(_) => "bool",
            MetaValue::Str(_) => "string",
            MetaValue::Array(_) => "array",
        }
    }
}

impl fmt::Display for MetaValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaValue::Str(s) => write!(f, "{s:?}"),
            MetaValue::Array(a) => write!(f, "[{} items]", a.len()),
            other => write!(f, "{other:?}"),
        }
    }
}

/// Where one tensor lives in the file and how it is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `ne[0]` is the fastest-varying axis (the reverse of numpy/HF order).
    pub ne: Vec<u64>,
    pub dtype: GgmlType,
    /// Byte offset inside the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }

    /// The shape in numpy/HF order (slowest axis first).
    pub fn hf_shape(&self) -> Vec<usize> {
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    bytes: Bytes,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    data_start: u64,
}

/// The file's bytes: memory-mapped from disk, or owned (tests, in-memory buffers).
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`. Tensor data is not read until asked for.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open GGUF file {}", path.display()))?;
        // SAFETY: the map is read-only; we accept that another process truncating the file while
        // we read it is undefined behaviour, as every mmap-based model loader does.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map {}", path.display()))?;
        Self::parse(path, Bytes::Mapped(map))
    }

    /// Parses an in-memory GGUF image; `name` is used in error messages.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(Path::new(name), Bytes::Owned(bytes))
    }

    fn parse(path: &Path, bytes: Bytes) -> Result<Self> {
        let header = parse_header(&bytes)
            .with_context(|| format!("{} is not a valid GGUF file", path.display()))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            bytes,
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            alignment: header.alignment,
            data_start: header.data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// A required integer key; the error names the file, the key and what was found.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_u64().with_context(|| {
            format!(
                "{}: metadata {key:?} should be an unsigned integer, found {} {v}",
                self.path.display(),
                v.type_name()
            )
        })
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.require(key)?;
        v.as_f64().with_context(|| {
            format!(
                "{}: metadata {key:?} should be a number, found {} {v}",
                self.path.display(),
                v.type_name()
            )
        })
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.require(key)?;
        v.as_str().with_context(|| {
            format!(
                "{}: metadata {key:?} should be a string, found {} {v}",
                self.path.display(),
                v.type_name()
            )
        })
    }

    pub fn get_array(&self, key: &str) -> Result<&[MetaValue]> {
        let v = self.require(key)?;
        v.as_array().with_context(|| {
            format!(
                "{}: metadata {key:?} should be an array, found {} {v}",
                self.path.display(),
                v.type_name()
            )
        })
    }

    fn require(&self, key: &str) -> Result<&MetaValue> {
        self.metadata
            .get(key)
            .with_context(|| format!("{}: missing metadata key {key:?}", self.path.display()))
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw (possibly quantized) bytes of a tensor, bounds-checked against the file.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> Result<&[u8]> {
        let what = || format!("{}: tensor {:?}", self.path.display(), info.name);
        let n = info.n_elements();
        let size = info.dtype.byte_size(n).with_context(what)?;
        let start = self
            .data_start
            .checked_add(info.offset)
            .with_context(|| format!("{}: offset {} overflows", what(), info.offset))?;
        let end = start
            .checked_add(size)
            .with_context(|| format!("{}: size {size} overflows", what()))?;
        ensure!(
            end <= self.bytes.len() as u64,
            "{}: data [{start}, {end}) runs past the end of the file ({} bytes); truncated file?",
            what(),
            self.bytes.len()
        );
        Ok(&self.bytes[start as usize..end as usize])
    }

    /// Dequantizes a tensor to f32 (ggml element order, i.e. row-major in `hf_shape()`).
    pub fn tensor_f32(&self, info: &TensorInfo) -> Result<Vec<f32>> {
        let raw = self.tensor_bytes(info)?;
        super::dequant::dequantize(info.dtype, raw, info.n_elements() as usize).with_context(|| {
            format!(
                "{}: cannot dequantize tensor {:?} ({:?}, ne {:?})",
                self.path.display(),
                info.name,
                info.dtype,
                info.ne
            )
        })
    }
}

struct Header {
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_start: u64,
}

fn parse_header(bytes: &[u8]) -> Result<Header> {
    let mut r = Reader { bytes, pos: 0 };
    let magic = r.take(4).context("reading the magic number")?;
    ensure!(
        magic == MAGIC,
        "bad magic: expected \"GGUF\", found {magic:?}"
    );
    let version = r.u32().context("reading the version")?;
    ensure!(
        version == 2 || version == 3,
        "unsupported GGUF version {version} (supported: 2 and 3)"
    );
    let tensor_count = r.u64().context("reading the tensor count")?;
    let kv_count = r.u64().context("reading the metadata count")?;

    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key = r
            .string()
            .with_context(|| format!("reading the key of metadata entry {i} of {kv_count}"))?;
        let value = r
            .value_of_type_tag(0)
            .with_context(|| format!("reading the value of metadata key {key:?}"))?;
        metadata.insert(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => {
            let a = v.as_u64().with_context(|| {
                format!(
                    "general.alignment should be an integer, found {}",
                    v.type_name()
                )
            })?;
            ensure!(
                a > 0 && a.is_power_of_two(),
                "general.alignment should be a positive power of two, found {a}"
            );
            a
        }
    };

    let mut tensors = Vec::new();
    for i in 0..tensor_count {
        let info = r
            .tensor_info()
            .with_context(|| format!("reading tensor info {i} of {tensor_count}"))?;
        ensure!(
            info.offset % alignment == 0,
            "tensor {:?}: offset {} is not a multiple of the alignment {alignment}",
            info.name,
            info.offset
        );
        tensors.push(info);
    }

    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}

/// A bounds-checked little-endian cursor. Every read fails cleanly at the end of the buffer.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

/// Nesting bound for arrays of arrays, so a crafted file cannot blow the stack.
const MAX_ARRAY_DEPTH: u32 = 8;

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            bail!(
                "unexpected end of file at byte {}: needed {n} more bytes, {} left",
                self.pos,
                self.bytes.len() - self.pos
            );
        };
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// A declared length, refused if it cannot fit in what is left of the file (at `min_item`
    /// bytes per item), so corrupt counts never trigger huge allocations.
    fn count(&mut self, min_item: usize, what: &str) -> Result<usize> {
        let n = self.u64()?;
        let fits = usize::try_from(n)
            .ok()
            .filter(|&n| n.saturating_mul(min_item.max(1)) <= self.remaining());
        fits.with_context(|| {
            format!(
                "{what} length {n} at byte {} exceeds the {} bytes left in the file",
                self.pos - 8,
                self.remaining()
            )
        })
    }

    fn string(&mut self) -> Result<String> {
        let n = self.count(1, "string")?;
        let start = self.pos;
        let raw = self.take(n)?;
        String::from_utf8(raw.to_vec())
            .map_err(|e| anyhow::anyhow!("string at byte {start} is not valid UTF-8: {e}"))
    }

    fn value_of_type_tag(&mut self, depth: u32) -> Result<MetaValue> {
        let tag = self.u32()?;
        self.value(tag, depth)
    }

    fn value(&mut self, tag: u32, depth: u32) -> Result<MetaValue> {
        Ok(match tag {
            0 => MetaValue::U8(self.array::<1>()?[0]),
            1 => MetaValue::I8(self.array::<1>()?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => bail!("bool value must be 0 or 1, found {b}"),
            },
            8 => MetaValue::Str(self.string()?),
            9 => {
                ensure!(
                    depth < MAX_ARRAY_DEPTH,
                    "arrays nested deeper than {MAX_ARRAY_DEPTH}"
                );
                let elem = self.u32()?;
                let n = self.count(min_value_size(elem), "array")?;
                let mut items = Vec::with_capacity(n);
                for i in 0..n {
                    let v = self
                        .value(elem, depth + 1)
                        .with_context(|| format!("array element {i} of {n}"))?;
                    items.push(v);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            other => bail!("unknown metadata value type {other} (known: 0..=12)"),
        })
    }

    fn tensor_info(&mut self) -> Result<TensorInfo> {
        let name = self.string().context("tensor name")?;
        let with_name = |e: anyhow::Error| e.context(format!("tensor {name:?}"));
        let n_dims = self.u32().map_err(with_name)?;
        ensure!(
            (1..=4).contains(&n_dims),
            "tensor {name:?}: n_dims should be 1..=4, found {n_dims}"
        );
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            ne.push(self.u64().map_err(with_name)?);
        }
        let n = ne.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        ensure!(
            n.is_some(),
            "tensor {name:?}: element count of ne {ne:?} overflows"
        );
        let type_id = self.u32().map_err(with_name)?;
        let dtype = GgmlType::from_id(type_id).with_context(|| format!("tensor {name:?}"))?;
        let offset = self.u64().map_err(with_name)?;
        Ok(TensorInfo {
            name,
            ne,
            dtype,
            offset,
        })
    }
}

/// The fewest bytes one value of this type occupies (used to bound array counts).
fn min_value_size(tag: u32) -> usize {
    match tag {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => 1,
    }
}
