//! A generation's tensors as a chain of safetensors files (state format 4).
//!
//! A commit of edits mostly appends: each edit adds rows to the experts' and the key store's
//! tensors and leaves the earlier rows as they were. Writing every tensor at every commit costs
//! the whole state per commit (160 MB after 1000 geo edits of SmolLM2 with the default preset,
//! about 0.9 s per commit, 56 s of a 430 s stream), so a stream costs O(edits^2) bytes. A chain
//! writes what changed:
//!
//! - its first file is whole: every tensor under its own name;
//! - each later file (a segment) holds one commit's changes: a new tensor, or one whose earlier
//!   values changed, whole under its own name; a tensor that only grew along its first
//!   dimension, its new rows as `NAME@FIRST_ROW`; an unchanged tensor not at all.
//!
//! Reading applies the files in order. A commit starts a new chain (a whole file) when a tensor
//! was removed, when the chain's segments would outgrow its first file, or when the chain holds
//! [`MAX_CHAIN_FILES`] files. The first rule doubles the whole file's size from one chain to the
//! next, so a stream writes at most about three times its final state in all, and opening reads
//! at most twice the state.

use std::collections::{BTreeMap, HashMap};

use anyhow::{bail, ensure, Context, Result};
use safetensors::{Dtype, SafeTensors};

use crate::model::checkpoint::NamedTensor;

/// The most files in one chain (the first included); the next commit writes a whole file.
pub const MAX_CHAIN_FILES: usize = 128;

/// Separates a tensor's name from the first row of an appended piece (`NAME@FIRST_ROW`); tensor
/// names may not contain it.
pub const ROWS_MARK: char = '@';

/// One entry of a chain file.
#[derive(Debug, Clone, Copy)]
pub enum Piece<'a> {
    /// The tensor, whole.
    Whole(&'a NamedTensor),
    /// The tensor's rows from `first_row` on (the ones before are in the earlier files).
    Rows {
        tensor: &'a NamedTensor,
        first_row: usize,
    },
}

/// Every tensor whole: a chain's first file.
pub fn whole(tensors: &[NamedTensor]) -> Vec<Piece<'_>> {
    tensors.iter().map(Piece::Whole).collect()
}

/// What a segment on top of `committed` must hold to make `new`; `None` when a committed tensor
/// is missing from `new` (a segment cannot remove one). Values are compared bit for bit.
pub fn changes<'a>(committed: &[NamedTensor], new: &'a [NamedTensor]) -> Option<Vec<Piece<'a>>> {
    let before: HashMap<&str, &NamedTensor> =
        committed.iter().map(|t| (t.name.as_str(), t)).collect();
    if committed
        .iter()
        .any(|c| !new.iter().any(|t| t.name == c.name))
    {
        return None;
    }
    let mut pieces = Vec::new();
    for tensor in new {
        let Some(old) = before.get(tensor.name.as_str()) else {
            pieces.push(Piece::Whole(tensor));
            continue;
        };
        if old.shape == tensor.shape && same_bits(&old.data, &tensor.data) {
            continue;
        }
        let grew = !tensor.shape.is_empty()
            && old.shape.len() == tensor.shape.len()
            && old.shape[1..] == tensor.shape[1..]
            && old.shape[0] < tensor.shape[0]
            && same_bits(&old.data, &tensor.data[..old.data.len()]);
        pieces.push(if grew {
            Piece::Rows {
                tensor,
                first_row: old.shape[0],
            }
        } else {
            Piece::Whole(tensor)
        });
    }
    Some(pieces)
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    bytemuck::cast_slice::<f32, u32>(a) == bytemuck::cast_slice::<f32, u32>(b)
}

/// A chain file's bytes: the pieces as little-endian f32 tensors, with one metadata entry that
/// names the generation. Identical pieces give identical bytes (a state's files are
/// byte-deterministic: their SHA-256 sums sit in the manifest).
pub fn serialize(pieces: &[Piece<'_>], generation: u64) -> Result<Vec<u8>> {
    let entries: Vec<(String, Vec<u8>, Vec<usize>)> = pieces
        .iter()
        .map(|piece| {
            let (name, shape, data) = match *piece {
                Piece::Whole(t) => (t.name.clone(), t.shape.clone(), t.data.as_slice()),
                Piece::Rows { tensor, first_row } => {
                    let row = row_len(&tensor.shape);
                    let mut shape = tensor.shape.clone();
                    shape[0] -= first_row;
                    (
                        format!("{}{ROWS_MARK}{first_row}", tensor.name),
                        shape,
                        &tensor.data[first_row * row..],
                    )
                }
            };
            let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, raw, shape)
        })
        .collect();
    let mut views = Vec::with_capacity(entries.len());
    for (name, raw, shape) in &entries {
        let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), raw)
            .with_context(|| format!("tensor {name:?} with shape {shape:?}"))?;
        views.push((name.as_str(), view));
    }
    // One metadata entry only: safetensors writes its metadata map in HashMap order, which
    // changes from run to run. The generation travels inside the one value.
    let metadata = HashMap::from([(
        "format".to_string(),
        format!("elder-edit-state generation {generation}"),
    )]);
    safetensors::tensor::serialize(views, Some(metadata)).context("serialising expert tensors")
}

/// A chain file's entries as stored (appended pieces keep their `NAME@FIRST_ROW` names), sorted
/// by name.
pub fn read(bytes: &[u8]) -> Result<Vec<NamedTensor>> {
    let file = SafeTensors::deserialize(bytes).context("not a valid safetensors file")?;
    let mut tensors = Vec::new();
    for (name, view) in file.tensors() {
        ensure!(
            view.dtype() == Dtype::F32,
            "tensor {name:?}: expected dtype F32, found {:?}",
            view.dtype()
        );
        let data = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        tensors.push(NamedTensor {
            name,
            shape: view.shape().to_vec(),
            data,
        });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(tensors)
}

/// Builds the tensors a chain describes from its files' entries (as [`read`] gives them), in
/// chain order; the result is sorted by name. Errors name the file (`files[i].0`).
pub fn assemble(files: Vec<(String, Vec<NamedTensor>)>) -> Result<Vec<NamedTensor>> {
    let mut tensors: BTreeMap<String, NamedTensor> = BTreeMap::new();
    for (index, (file, entries)) in files.into_iter().enumerate() {
        for entry in entries {
            apply(&mut tensors, entry, index == 0)
                .with_context(|| format!("{file} does not extend the files before it"))?;
        }
    }
    Ok(tensors.into_values().collect())
}

fn apply(
    tensors: &mut BTreeMap<String, NamedTensor>,
    entry: NamedTensor,
    first_file: bool,
) -> Result<()> {
    let Some((name, first_row)) = entry.name.rsplit_once(ROWS_MARK) else {
        tensors.insert(entry.name.clone(), entry);
        return Ok(());
    };
    let first_row: usize = first_row
        .parse()
        .with_context(|| format!("entry {:?}: {first_row:?} is not a row number", entry.name))?;
    ensure!(
        !first_file,
        "entry {:?} appends rows, but the file starts a chain",
        entry.name
    );
    let Some(tensor) = tensors.get_mut(name) else {
        bail!(
            "entry {:?} appends rows to {name:?}, which no earlier file holds",
            entry.name
        );
    };
    ensure!(
        !tensor.shape.is_empty()
            && tensor.shape.len() == entry.shape.len()
            && tensor.shape[1..] == entry.shape[1..]
            && tensor.shape[0] == first_row,
        "entry {:?} (shape {:?}) does not continue {name:?} (shape {:?})",
        entry.name,
        entry.shape,
        tensor.shape
    );
    tensor.shape[0] = first_row
        .checked_add(entry.shape[0])
        .with_context(|| format!("entry {:?}: too many rows", entry.name))?;
    tensor.data.extend_from_slice(&entry.data);
    Ok(())
}

/// Values per row: the product of every dimension but the first.
fn row_len(shape: &[usize]) -> usize {
    shape[1..].iter().product()
}

/// Whether a chain of `files` files whose segments (every file but the first) hold
/// `segment_bytes` on top of a first file of `first_bytes` takes one more segment of
/// `new_bytes`, or the commit writes a whole file instead.
pub fn extend_chain(files: usize, first_bytes: u64, segment_bytes: u64, new_bytes: u64) -> bool {
    (1..MAX_CHAIN_FILES).contains(&files) && segment_bytes + new_bytes <= first_bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(rng: &mut ChaCha8Rng, name: &str, shape: &[usize]) -> NamedTensor {
        let n = shape.iter().product();
        NamedTensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            data: (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect(),
        }
    }

    /// Adds `rows` random rows to `t`.
    fn grow(rng: &mut ChaCha8Rng, t: &NamedTensor, rows: usize) -> NamedTensor {
        let mut out = t.clone();
        out.shape[0] += rows;
        out.data
            .extend((0..rows * row_len(&t.shape)).map(|_| rng.gen_range(-1.0f32..1.0)));
        out
    }

    fn sorted(mut v: Vec<NamedTensor>) -> Vec<NamedTensor> {
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// A random stream of commits (tensors grown, rewritten, added, left alone) rebuilt from its
    /// chain equals each commit's tensors, and each segment holds only what changed.
    #[test]
    fn a_chain_rebuilds_every_commit() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut current = vec![
            random(&mut rng, "keys", &[2, 3, 5]),
            random(&mut rng, "lora_a", &[2, 7]),
            random(&mut rng, "mean", &[5]),
            random(&mut rng, "router", &[0, 7]),
        ];
        let mut files = vec![(
            "f0".to_string(),
            read(&serialize(&whole(&current), 0).unwrap()).unwrap(),
        )];
        for generation in 1..40u64 {
            let mut next = Vec::new();
            for t in &current {
                next.push(match rng.gen_range(0..4) {
                    0 => t.clone(),
                    1 if t.name == "mean" => random(&mut rng, "mean", &[5]),
                    _ if t.name == "mean" => t.clone(),
                    3 => random(&mut rng, &t.name, &t.shape),
                    _ => {
                        let rows = rng.gen_range(1..3);
                        grow(&mut rng, t, rows)
                    }
                });
            }
            if generation == 20 {
                next.push(random(&mut rng, "late", &[1, 2]));
            }
            let pieces = changes(&current, &next).unwrap();
            for piece in &pieces {
                if let Piece::Rows { tensor, first_row } = piece {
                    let old = current.iter().find(|t| t.name == tensor.name).unwrap();
                    assert_eq!(*first_row, old.shape[0]);
                }
            }
            let unchanged = next.iter().filter(|t| current.contains(t)).count();
            assert_eq!(pieces.len(), next.len() - unchanged);
            let bytes = serialize(&pieces, generation).unwrap();
            files.push((format!("f{generation}"), read(&bytes).unwrap()));
            assert_eq!(assemble(files.clone()).unwrap(), sorted(next.clone()));
            current = next;
        }
    }

    #[test]
    fn a_removed_tensor_needs_a_whole_file() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let a = random(&mut rng, "a", &[2, 2]);
        let b = random(&mut rng, "b", &[2, 2]);
        assert!(changes(&[a.clone(), b], std::slice::from_ref(&a)).is_none());
        let same = std::slice::from_ref(&a);
        assert_eq!(changes(same, same).unwrap().len(), 0);
    }

    /// A changed earlier row, a shrunk tensor or a reshaped one is written whole, never as rows.
    #[test]
    fn only_pure_growth_is_written_as_rows() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let a = random(&mut rng, "a", &[3, 4]);
        let mut touched = grow(&mut rng, &a, 1);
        touched.data[0] += 1.0;
        let mut shrunk = a.clone();
        shrunk.shape[0] = 2;
        shrunk.data.truncate(8);
        let reshaped = NamedTensor {
            shape: vec![4, 3],
            ..a.clone()
        };
        for new in [touched, shrunk, reshaped] {
            let pieces = changes(std::slice::from_ref(&a), std::slice::from_ref(&new)).unwrap();
            assert!(matches!(pieces[..], [Piece::Whole(_)]), "{:?}", new.shape);
        }
        // -0.0 and 0.0 compare equal as floats but are different values to keep.
        let zero = NamedTensor {
            name: "z".into(),
            shape: vec![1],
            data: vec![0.0],
        };
        let negative = NamedTensor {
            data: vec![-0.0],
            ..zero.clone()
        };
        assert_eq!(changes(&[zero], &[negative]).unwrap().len(), 1);
    }

    #[test]
    fn broken_chains_are_refused_by_name() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let a = random(&mut rng, "a", &[2, 3]);
        let longer = grow(&mut rng, &a, 2);
        let rows = read(
            &serialize(
                &[Piece::Rows {
                    tensor: &longer,
                    first_row: 2,
                }],
                1,
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(rows[0].name, "a@2");
        assert_eq!(rows[0].shape, [2, 3]);
        let base = read(&serialize(&whole(std::slice::from_ref(&a)), 0).unwrap()).unwrap();
        let ok = assemble(vec![("x".into(), base.clone()), ("y".into(), rows.clone())]).unwrap();
        assert_eq!(ok, vec![longer]);

        let err =
            |files: Vec<(String, Vec<NamedTensor>)>| format!("{:#}", assemble(files).unwrap_err());
        let e = err(vec![("first".into(), rows.clone())]);
        assert!(
            e.contains("first does not extend") && e.contains("starts a chain"),
            "{e}"
        );
        let e = err(vec![
            ("x".into(), base.clone()),
            ("y".into(), rows.clone()),
            ("z".into(), rows.clone()),
        ]);
        assert!(
            e.contains("z does not extend") && e.contains("does not continue"),
            "{e}"
        );
        let e = err(vec![("x".into(), vec![]), ("y".into(), rows)]);
        assert!(e.contains("which no earlier file holds"), "{e}");
        let mut bad = base.clone();
        bad[0].name = "a@x".into();
        let e = err(vec![("x".into(), base), ("y".into(), bad)]);
        assert!(e.contains("is not a row number"), "{e}");
    }

    #[test]
    fn chains_stop_growing_at_their_limits() {
        assert!(extend_chain(1, 100, 0, 100));
        assert!(!extend_chain(1, 100, 0, 101));
        assert!(!extend_chain(5, 100, 90, 11));
        assert!(!extend_chain(MAX_CHAIN_FILES, 100, 0, 1));
        assert!(!extend_chain(0, 100, 0, 1));
    }
}
