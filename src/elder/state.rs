//! Durable edit state: everything `elder edit` has learned, in one directory.
//!
//! ```text
//! state/
//!   manifest.json                 the commit point: config, base-model fingerprint, applied ids,
//!                                 and the names + SHA-256 of the current generation's files
//!   experts-000042.safetensors    caller-named f32 tensors (experts' A/B, routers' W_r/b_r,
//!                                 the key store's keys): whole, or (format 4) a segment with
//!                                 what generation 42 changed on the earlier files of its chain
//!                                 (`files.earlier_experts`, kept while a kept generation reads
//!                                 them; see `elder::segments`)
//!   codebook-000042.bin           the deferral codebook (see `Codebook::to_bytes`)
//!   memory-000042.jsonl           the caller's record of the applied edits (opaque bytes here;
//!                                 `elder::memory`: training fields and allocations)
//!
//!   manifest-000042.json          a copy of generation 42's manifest (to roll back to)
//!   experts-000041.safetensors    ... and the previous generation, kept whole
//!   manifest-000041.json
//! ```
//!
//! Format 2 added the memory file; a format-1 state (no memory) is read as one whose memory is
//! empty, and its next commit writes format 2. Format 3 added the manifest's own checksum
//! (`manifest_sha256`, over the manifest's bytes with that value blank) and the kept previous
//! generation; older formats open unchanged and are upgraded by their next commit. Format 4 writes
//! a generation's tensors as a segment on the files before it (`segments`): a commit of a few
//! edits writes their rows, not the whole state; its manifest lists the chain. An older build
//! refuses a format-4 state by its version instead of reading part of its tensors.
//!
//! A commit writes generation N+1's files under new names (each atomically, fsynced), then
//! atomically replaces `manifest.json` to point at them, then deletes the files that neither
//! generation N+1 nor N reads.
//! A crash before the manifest rename leaves the old manifest pointing at intact old files; a
//! crash after it leaves the new state plus some garbage that the next commit removes. Readers
//! therefore see the old or the new state, never a mix. A commit that fails (a full disk)
//! removes what it wrote and leaves generation N as it was. The SHA-256 sums catch files damaged
//! later (disk errors, manual edits), the manifest included: [`verify`] checks every kept
//! generation without a model, and [`rollback`] makes an intact older generation current.
//!
//! Optimiser state is not stored: ELDER uses a fresh Adam per edit batch.
//! One writer at a time: two processes committing to the same directory are not coordinated.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::codebook::Codebook;
use super::segments;
use crate::util::atomic::{is_atomic_temp_file, sync_dir, write_atomic};

/// Bumped whenever the layout of the directory or the manifest changes incompatibly.
pub const STATE_FORMAT_VERSION: u32 = 4;
/// Older formats this build still reads (and upgrades on the next commit).
const READABLE_FORMATS: &[u32] = &[1, 2, 3, 4];
pub const MANIFEST_FILE: &str = "manifest.json";
/// Per-generation copies of the manifest: `manifest-000042.json`.
const MANIFEST_PREFIX: &str = "manifest-";
const MANIFEST_SUFFIX: &str = ".json";
/// How the manifest's own checksum appears in its text, and the blank it is computed over.
const CHECKSUM_KEY: &str = "\"manifest_sha256\": \"";
const CHECKSUM_BLANK: &str = "\"manifest_sha256\": \"\"";
const EXPERTS_PREFIX: &str = "experts-";
const EXPERTS_SUFFIX: &str = ".safetensors";
const CODEBOOK_PREFIX: &str = "codebook-";
const CODEBOOK_SUFFIX: &str = ".bin";
const MEMORY_PREFIX: &str = "memory-";
const MEMORY_SUFFIX: &str = ".jsonl";

pub use crate::model::checkpoint::NamedTensor;

/// The contents of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// 0 for a freshly created state with no commit yet; +1 per commit.
    pub generation: u64,
    /// The method's configuration, opaque here; `open` refuses a different one.
    pub method_config: Value,
    /// Identifies the frozen base model; `open` refuses a different one.
    pub base_model_fingerprint: String,
    /// Ids of the applied edits, in the order they were applied.
    pub applied_edit_ids: Vec<String>,
    pub codebook_entries: usize,
    /// `None` until the first commit fixes it.
    pub codebook_bits_per_code: Option<usize>,
    /// `None` until the first commit.
    pub files: Option<GenerationFiles>,
    pub created_unix_s: u64,
    pub updated_unix_s: u64,
    /// SHA-256 of the manifest's own text with this value blank (format 3; absent before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_sha256: Option<String>,
}

/// The data files of one generation, relative to the state directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationFiles {
    /// The generation's own tensors file: whole, or (format 4) a segment on top of
    /// `earlier_experts` (see [`segments`]).
    pub experts: String,
    pub experts_sha256: String,
    /// Format 4: the chain's earlier files, oldest (the whole one) first; empty when `experts`
    /// is whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier_experts: Vec<FileSum>,
    pub codebook: String,
    pub codebook_sha256: String,
    /// Absent in format 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_sha256: Option<String>,
}

/// A file of the state and its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSum {
    pub name: String,
    pub sha256: String,
}

/// An open edit-state directory and the last committed state, loaded in memory.
#[derive(Debug)]
pub struct EditState {
    dir: PathBuf,
    manifest: Manifest,
    /// Sorted by name.
    tensors: Vec<NamedTensor>,
    codebook: Option<Codebook>,
    /// The committed memory bytes (empty before the first commit and in format 1).
    memory: Vec<u8>,
}

impl EditState {
    /// Makes a new, empty state in `dir` (created if missing). Fails if `dir` already holds one.
    pub fn create(dir: &Path, method_config: Value, base_model_fingerprint: &str) -> Result<Self> {
        let manifest_path = dir.join(MANIFEST_FILE);
        ensure!(
            !manifest_path.exists(),
            "edit state {} already exists ({} present); open it instead of creating it",
            dir.display(),
            MANIFEST_FILE
        );
        fs::create_dir_all(dir)
            .with_context(|| format!("creating edit state directory {}", dir.display()))?;
        let now = unix_now();
        let manifest = Manifest {
            format_version: STATE_FORMAT_VERSION,
            generation: 0,
            method_config,
            base_model_fingerprint: base_model_fingerprint.to_string(),
            applied_edit_ids: Vec::new(),
            codebook_entries: 0,
            codebook_bits_per_code: None,
            files: None,
            created_unix_s: now,
            updated_unix_s: now,
            manifest_sha256: None,
        };
        let manifest = write_manifest(dir, &manifest)?;
        // The directory itself may be new: make its entry in the parent durable too.
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(EditState {
            dir: dir.to_path_buf(),
            manifest,
            tensors: Vec::new(),
            codebook: None,
            memory: Vec::new(),
        })
    }

    /// Opens the last committed state in `dir`, refusing one made for another base model or with
    /// a different method config.
    pub fn open(dir: &Path, expected_config: &Value, expected_fingerprint: &str) -> Result<Self> {
        let manifest = read_manifest(dir)?;
        if manifest.base_model_fingerprint != expected_fingerprint {
            bail!(
                "edit state {} was made for another base model: its fingerprint is {:?}, \
                 the loaded model's is {:?}",
                dir.display(),
                manifest.base_model_fingerprint,
                expected_fingerprint
            );
        }
        if &manifest.method_config != expected_config {
            let mut differences = Vec::new();
            config_differences(
                "",
                &manifest.method_config,
                expected_config,
                &mut differences,
            );
            bail!(
                "edit state {} was made with an incompatible method config:\n  {}",
                dir.display(),
                differences.join("\n  ")
            );
        }
        let (tensors, codebook, memory) = match &manifest.files {
            None => (Vec::new(), None, Vec::new()),
            Some(files) => load_generation(dir, &manifest, files).with_context(|| {
                format!(
                    "edit state {} at generation {}: `elder state verify {}` lists the intact \
                     generations and `elder state rollback` makes one current",
                    dir.display(),
                    manifest.generation,
                    dir.display()
                )
            })?,
        };
        Ok(EditState {
            dir: dir.to_path_buf(),
            manifest,
            tensors,
            codebook,
            memory,
        })
    }

    /// The method config a state in `dir` was made with, or `None` when `dir` holds no state yet.
    pub fn stored_config(dir: &Path) -> Result<Option<Value>> {
        if !dir.join(MANIFEST_FILE).exists() {
            return Ok(None);
        }
        Ok(Some(read_manifest(dir)?.method_config))
    }

    /// `open` if `dir` holds a state, `create` otherwise.
    pub fn open_or_create(dir: &Path, config: &Value, fingerprint: &str) -> Result<Self> {
        if dir.join(MANIFEST_FILE).exists() {
            EditState::open(dir, config, fingerprint)
        } else {
            EditState::create(dir, config.clone(), fingerprint)
        }
    }

    /// Makes `tensors`, `codebook` and `memory` the new state, with `new_edit_ids` appended to
    /// the applied ids, durably and atomically (see the module docs). `codebook` must extend the
    /// current one: entries are never rewritten.
    pub fn commit(
        &mut self,
        tensors: &[NamedTensor],
        codebook: &Codebook,
        memory: &[u8],
        new_edit_ids: &[String],
    ) -> Result<()> {
        self.check_commit(tensors, codebook, new_edit_ids)?;
        let mut applied = self.manifest.applied_edit_ids.clone();
        applied.extend_from_slice(new_edit_ids);
        self.commit_generation(tensors, codebook, memory, applied)
    }

    /// Like [`EditState::commit`], for a state from which the applied edit `removed_id` was
    /// rolled back (`Elder::forget`): the new generation's applied ids leave it out.
    pub fn commit_removal(
        &mut self,
        tensors: &[NamedTensor],
        codebook: &Codebook,
        memory: &[u8],
        removed_id: &str,
    ) -> Result<()> {
        self.check_commit(tensors, codebook, &[])?;
        let applied = self.manifest.applied_edit_ids.clone();
        ensure!(
            applied.iter().any(|id| id == removed_id),
            "commit: edit id {removed_id:?} is not applied"
        );
        let applied = applied.into_iter().filter(|id| id != removed_id).collect();
        self.commit_generation(tensors, codebook, memory, applied)
    }

    /// Writes a new generation whose applied ids are `applied` (see the module docs).
    fn commit_generation(
        &mut self,
        tensors: &[NamedTensor],
        codebook: &Codebook,
        memory: &[u8],
        applied: Vec<String>,
    ) -> Result<()> {
        let generation = self.manifest.generation + 1;
        let written = self
            .experts_file(tensors, generation)
            .and_then(|(experts, earlier)| {
                write_generation_files(&self.dir, generation, &experts, earlier, codebook, memory)
            })
            .and_then(|files| {
                let mut manifest = self.manifest.clone();
                manifest.format_version = STATE_FORMAT_VERSION;
                manifest.generation = generation;
                manifest.applied_edit_ids = applied;
                manifest.codebook_entries = codebook.len();
                manifest.codebook_bits_per_code = Some(codebook.bits_per_code());
                manifest.files = Some(files);
                manifest.updated_unix_s = unix_now();
                write_manifest(&self.dir, &manifest) // the commit point
            });
        let manifest = match written {
            Ok(m) => m,
            Err(e) => {
                // Unless the manifest rename itself went through (and only its directory sync
                // failed), nothing points at the new files: they go, and the next commit starts
                // clean (best effort: the error is the news).
                let committed = read_manifest(&self.dir).is_ok_and(|m| m.generation == generation);
                if !committed {
                    let _ = remove_stale_files(&self.dir, &self.manifest);
                }
                return Err(e.context(format!(
                    "commit of generation {generation} to {} failed; the state stays at \
                     generation {}",
                    self.dir.display(),
                    self.manifest.generation
                )));
            }
        };

        let mut sorted = tensors.to_vec();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        self.manifest = manifest;
        self.tensors = sorted;
        self.codebook = Some(codebook.clone());
        self.memory = memory.to_vec();
        // The new state is already durable; leftovers only waste disk, so a failed cleanup is
        // not an error (the next commit retries).
        let _ = remove_stale_files(&self.dir, &self.manifest);
        Ok(())
    }

    /// The new generation's tensors file and the earlier files of its chain: a segment of what
    /// changed since the committed tensors while [`segments::extend_chain`] allows one, else a
    /// whole file (and no earlier files).
    fn experts_file(
        &self,
        tensors: &[NamedTensor],
        generation: u64,
    ) -> Result<(Vec<u8>, Vec<FileSum>)> {
        if let Some(files) = &self.manifest.files {
            let chain = experts_chain(files);
            // A file that cannot be measured (removed by hand) ends the chain: the next whole
            // file does not need it.
            let sizes: Option<Vec<u64>> = chain
                .iter()
                .map(|f| fs::metadata(self.dir.join(&f.name)).ok().map(|m| m.len()))
                .collect();
            if let (Some(sizes), Some(pieces)) = (sizes, segments::changes(&self.tensors, tensors))
            {
                let segment = segments::serialize(&pieces, generation)?;
                let earlier_segments = sizes[1..].iter().sum();
                if segments::extend_chain(
                    chain.len(),
                    sizes[0],
                    earlier_segments,
                    segment.len() as u64,
                ) {
                    return Ok((segment, chain));
                }
            }
        }
        let whole = segments::serialize(&segments::whole(tensors), generation)?;
        Ok((whole, Vec::new()))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn generation(&self) -> u64 {
        self.manifest.generation
    }

    /// Ids of the edits already applied, in order; an interrupted `elder edit` resumes after them.
    pub fn applied_ids(&self) -> &[String] {
        &self.manifest.applied_edit_ids
    }

    /// The committed tensors, sorted by name (empty before the first commit).
    pub fn tensors(&self) -> &[NamedTensor] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&NamedTensor> {
        self.tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.tensors[i])
    }

    /// The committed codebook; `None` before the first commit.
    pub fn codebook(&self) -> Option<&Codebook> {
        self.codebook.as_ref()
    }

    /// The committed memory bytes (empty before the first commit and in format-1 states).
    pub fn memory(&self) -> &[u8] {
        &self.memory
    }

    fn check_commit(
        &self,
        tensors: &[NamedTensor],
        codebook: &Codebook,
        new_edit_ids: &[String],
    ) -> Result<()> {
        let mut names = HashSet::new();
        for tensor in tensors {
            ensure!(
                !tensor.name.is_empty(),
                "commit: a tensor has an empty name"
            );
            ensure!(
                names.insert(tensor.name.as_str()),
                "commit: tensor {:?} given twice",
                tensor.name
            );
            ensure!(
                !tensor.name.contains(segments::ROWS_MARK),
                "commit: tensor name {:?} contains {:?}, which marks appended rows in a state's \
                 files",
                tensor.name,
                segments::ROWS_MARK
            );
            let elements: usize = tensor.shape.iter().product();
            ensure!(
                elements == tensor.data.len(),
                "commit: tensor {:?} has shape {:?} ({} elements) but {} values",
                tensor.name,
                tensor.shape,
                elements,
                tensor.data.len()
            );
        }
        if let Some(current) = &self.codebook {
            ensure!(
                codebook.extends(current),
                "commit: the new codebook ({} codes of {} bits) does not extend the committed one \
                 ({} codes of {} bits); codebook entries are append-only",
                codebook.len(),
                codebook.bits_per_code(),
                current.len(),
                current.bits_per_code()
            );
        }
        let mut seen: HashSet<&str> = self.applied_ids().iter().map(String::as_str).collect();
        for id in new_edit_ids {
            ensure!(
                seen.insert(id.as_str()),
                "commit: edit id {id:?} is already applied (or repeated in this commit)"
            );
        }
        Ok(())
    }
}

/// The data files of a generation and its manifest copy.
fn generation_file_names(generation: u64) -> [String; 4] {
    [
        format!("{EXPERTS_PREFIX}{generation:06}{EXPERTS_SUFFIX}"),
        format!("{CODEBOOK_PREFIX}{generation:06}{CODEBOOK_SUFFIX}"),
        format!("{MEMORY_PREFIX}{generation:06}{MEMORY_SUFFIX}"),
        manifest_copy_name(generation),
    ]
}

fn manifest_copy_name(generation: u64) -> String {
    format!("{MANIFEST_PREFIX}{generation:06}{MANIFEST_SUFFIX}")
}

/// The generation a state file belongs to (`experts-000042.safetensors` -> 42), if it is one.
fn generation_of(name: &str) -> Option<u64> {
    [
        (EXPERTS_PREFIX, EXPERTS_SUFFIX),
        (CODEBOOK_PREFIX, CODEBOOK_SUFFIX),
        (MEMORY_PREFIX, MEMORY_SUFFIX),
        (MANIFEST_PREFIX, MANIFEST_SUFFIX),
    ]
    .iter()
    .find_map(|(p, s)| name.strip_prefix(p)?.strip_suffix(s)?.parse().ok())
}

/// Step 1 of a commit: the new generation's data files, durable but not yet referenced.
fn write_generation_files(
    dir: &Path,
    generation: u64,
    experts_bytes: &[u8],
    earlier_experts: Vec<FileSum>,
    codebook: &Codebook,
    memory: &[u8],
) -> Result<GenerationFiles> {
    let [experts, codebook_name, memory_name, _] = generation_file_names(generation);
    write_atomic(&dir.join(&experts), experts_bytes)?;
    let codebook_bytes = codebook.to_bytes();
    write_atomic(&dir.join(&codebook_name), &codebook_bytes)?;
    write_atomic(&dir.join(&memory_name), memory)?;
    Ok(GenerationFiles {
        experts,
        experts_sha256: sha256_hex(experts_bytes),
        earlier_experts,
        codebook: codebook_name,
        codebook_sha256: sha256_hex(&codebook_bytes),
        memory: Some(memory_name),
        memory_sha256: Some(sha256_hex(memory)),
    })
}

fn load_generation(
    dir: &Path,
    manifest: &Manifest,
    files: &GenerationFiles,
) -> Result<(Vec<NamedTensor>, Option<Codebook>, Vec<u8>)> {
    let mut chain = Vec::new();
    for file in experts_chain(files) {
        let bytes = read_verified(dir, &file.name, &file.sha256)?;
        let entries = segments::read(&bytes)
            .with_context(|| format!("reading {}", dir.join(&file.name).display()))?;
        chain.push((dir.join(&file.name).display().to_string(), entries));
    }
    let tensors = segments::assemble(chain)?;
    let codebook_bytes = read_verified(dir, &files.codebook, &files.codebook_sha256)?;
    let codebook = Codebook::from_bytes(&codebook_bytes)
        .with_context(|| format!("reading {}", dir.join(&files.codebook).display()))?;
    ensure!(
        codebook.len() == manifest.codebook_entries
            && Some(codebook.bits_per_code()) == manifest.codebook_bits_per_code,
        "edit state {}: {} holds {} codes of {} bits but the manifest says {} codes of {:?} bits",
        dir.display(),
        files.codebook,
        codebook.len(),
        codebook.bits_per_code(),
        manifest.codebook_entries,
        manifest.codebook_bits_per_code
    );
    let memory = match (&files.memory, &files.memory_sha256) {
        (Some(name), Some(sha)) => read_verified(dir, name, sha)?,
        (None, None) => Vec::new(),
        _ => bail!(
            "edit state {}: {MANIFEST_FILE} names a memory file without its SHA-256 (or the reverse)",
            dir.display()
        ),
    };
    Ok((tensors, Some(codebook), memory))
}

/// A state file to ship to another machine: its name in the state directory, its SHA-256 (as
/// the manifest gives it, checked) and its bytes.
pub struct StateFile {
    pub name: String,
    pub sha256: String,
    pub bytes: Vec<u8>,
}

/// The current generation of the state in `dir` as files to ship elsewhere (a replica): the
/// manifest's text and each data file it names, by name. Every byte is checked against the
/// manifest's checksums first.
pub fn generation_files(dir: &Path) -> Result<(String, Vec<StateFile>)> {
    let text = fs::read_to_string(dir.join(MANIFEST_FILE))
        .with_context(|| format!("reading {}", dir.join(MANIFEST_FILE).display()))?;
    let manifest = parse_manifest(&dir.join(MANIFEST_FILE), &text)?;
    let mut out = Vec::new();
    if let Some(files) = &manifest.files {
        for (name, sum) in named_sums(files) {
            let bytes = fs::read(dir.join(name))
                .with_context(|| format!("reading {}", dir.join(name).display()))?;
            ensure!(
                sha256_hex(&bytes) == sum,
                "{} does not match its checksum in the manifest",
                dir.join(name).display()
            );
            out.push(StateFile {
                name: name.to_string(),
                sha256: sum.to_string(),
                bytes,
            });
        }
    }
    Ok((text, out))
}

/// Makes a shipped generation (the manifest's text and its files, as [`generation_files`] gave
/// them) the current state of `dir`, with a commit's protocol: every file checked against the
/// manifest's checksums, written atomically, then the manifest (the commit point), then older
/// generations removed. Files already in `dir` with the shipped bytes (the earlier files of a
/// tensors chain, usually) are not written again. Returns the installed generation.
pub fn install_generation(
    dir: &Path,
    manifest_text: &str,
    files: &[(String, Vec<u8>)],
) -> Result<u64> {
    let manifest = parse_manifest(Path::new(MANIFEST_FILE), manifest_text)?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut to_write = Vec::new();
    if let Some(names) = &manifest.files {
        for (name, sum) in named_sums(names) {
            let (_, bytes) = files.iter().find(|(n, _)| n == name).with_context(|| {
                format!("generation {}: {name} was not shipped", manifest.generation)
            })?;
            ensure!(
                sha256_hex(bytes) == sum,
                "generation {}: {name} does not match its checksum (sha256 {}, the manifest says {sum})",
                manifest.generation,
                sha256_hex(bytes)
            );
            if fs::read(dir.join(name)).ok().as_deref() != Some(bytes.as_slice()) {
                to_write.push((name, bytes));
            }
        }
    }
    // A chain may name an earlier generation's file that this folder holds with other bytes (a
    // local commit that was never published, then replaced by another leader's). If the local
    // current generation reads that file, it goes first: a crash mid-install then leaves no
    // current generation (the published one is installed again), never a manifest whose file
    // changed under it.
    if let Ok(local) = read_manifest(dir) {
        let local_names: HashSet<&str> = local
            .files
            .as_ref()
            .map(|f| named_sums(f).into_iter().map(|(n, _)| n).collect())
            .unwrap_or_default();
        if to_write.iter().any(|(n, _)| local_names.contains(n)) {
            fs::remove_file(dir.join(MANIFEST_FILE))
                .with_context(|| format!("removing {}", dir.join(MANIFEST_FILE).display()))?;
            sync_dir(dir)?;
        }
    }
    for (name, bytes) in to_write {
        write_atomic(&dir.join(name), bytes)?;
    }
    write_atomic(
        &dir.join(manifest_copy_name(manifest.generation)),
        manifest_text.as_bytes(),
    )?;
    write_atomic(&dir.join(MANIFEST_FILE), manifest_text.as_bytes())?;
    let _ = remove_stale_files(dir, &manifest);
    Ok(manifest.generation)
}

/// The files of a generation's tensors chain, oldest first (the generation's own last).
fn experts_chain(files: &GenerationFiles) -> Vec<FileSum> {
    let mut chain = files.earlier_experts.clone();
    chain.push(FileSum {
        name: files.experts.clone(),
        sha256: files.experts_sha256.clone(),
    });
    chain
}

/// Each data file a generation names, with its checksum (the tensors chain first).
fn named_sums(files: &GenerationFiles) -> Vec<(&str, &str)> {
    let mut out: Vec<(&str, &str)> = files
        .earlier_experts
        .iter()
        .map(|f| (f.name.as_str(), f.sha256.as_str()))
        .collect();
    out.push((files.experts.as_str(), files.experts_sha256.as_str()));
    out.push((files.codebook.as_str(), files.codebook_sha256.as_str()));
    if let (Some(m), Some(s)) = (&files.memory, &files.memory_sha256) {
        out.push((m.as_str(), s.as_str()));
    }
    out
}

/// Checks a manifest's text as opening a state does (JSON, a readable version, its shape and its
/// checksum), without a state directory: for tools and the fuzz targets.
pub fn parse_manifest_text(text: &str) -> Result<Manifest> {
    parse_manifest(Path::new(MANIFEST_FILE), text)
}

/// Reads an experts file's bytes (`experts-NNNNNN.safetensors`) as opening a state does: its
/// entries as stored (see [`segments`]), sorted by name.
pub fn parse_experts(bytes: &[u8]) -> Result<Vec<NamedTensor>> {
    segments::read(bytes)
}

fn read_verified(dir: &Path, name: &str, expected_sha256: &str) -> Result<Vec<u8>> {
    let path = dir.join(name);
    let bytes = fs::read(&path)
        .with_context(|| format!("reading {} (named by {MANIFEST_FILE})", path.display()))?;
    let found = sha256_hex(&bytes);
    ensure!(
        found == expected_sha256,
        "{} is damaged: SHA-256 {found}, the manifest expects {expected_sha256}",
        path.display()
    );
    Ok(bytes)
}

/// A kept generation's manifest copy (`manifest-NNNNNN.json`), checked.
fn read_manifest_copy(dir: &Path, generation: u64) -> Result<Manifest> {
    let path = dir.join(manifest_copy_name(generation));
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_manifest(&path, &text)
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let text = fs::read_to_string(&path).with_context(|| {
        format!(
            "no edit state in {}: cannot read {}",
            dir.display(),
            path.display()
        )
    })?;
    parse_manifest(&path, &text)
}

/// A manifest's text, checked: JSON, a readable version, its shape, and (format 3) its checksum.
fn parse_manifest(path: &Path, text: &str) -> Result<Manifest> {
    let value: Value = serde_json::from_str(text).with_context(|| {
        format!(
            "{} is damaged: invalid JSON (run `elder state verify` on its folder)",
            path.display()
        )
    })?;
    // Check the version before the shape, so a newer layout gets a clear message.
    let version = value.get("format_version").and_then(Value::as_u64);
    ensure!(
        version.is_some_and(|v| READABLE_FORMATS.iter().any(|&r| u64::from(r) == v)),
        "{}: format_version {:?}, this build reads versions {READABLE_FORMATS:?}",
        path.display(),
        version
    );
    let manifest: Manifest = serde_json::from_value(value)
        .with_context(|| format!("{}: malformed manifest", path.display()))?;
    match &manifest.manifest_sha256 {
        None => ensure!(
            manifest.format_version < 3,
            "{} is damaged: format {} needs its manifest_sha256",
            path.display(),
            manifest.format_version
        ),
        Some(expected) => {
            let found = manifest_checksum(text, expected);
            ensure!(
                found.as_deref() == Some(expected.as_str()),
                "{} is damaged: SHA-256 {}, the manifest expects {expected}",
                path.display(),
                found.as_deref().unwrap_or("(no checksum field)")
            );
        }
    }
    Ok(manifest)
}

/// The SHA-256 of a manifest's text with its checksum `value` blanked (the last occurrence of the
/// field: it is the manifest's last key, and JSON strings cannot contain it unescaped).
fn manifest_checksum(text: &str, value: &str) -> Option<String> {
    let field = format!("{CHECKSUM_KEY}{value}\"");
    let at = text.rfind(&field)?;
    let blank = format!(
        "{}{CHECKSUM_BLANK}{}",
        &text[..at],
        &text[at + field.len()..]
    );
    Some(sha256_hex(blank.as_bytes()))
}

/// Writes `manifest` with its checksum, first as the generation's copy, then (the commit point)
/// as `manifest.json`; returns it as written.
fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<Manifest> {
    let mut blank = manifest.clone();
    blank.manifest_sha256 = Some(String::new());
    let mut text = serde_json::to_string_pretty(&blank).context("serialising manifest")?;
    text.push('\n');
    let sum = sha256_hex(text.as_bytes());
    let at = text
        .rfind(CHECKSUM_BLANK)
        .context("the manifest lost its checksum field")?;
    text.replace_range(
        at..at + CHECKSUM_BLANK.len(),
        &format!("{CHECKSUM_KEY}{sum}\""),
    );
    write_atomic(
        &dir.join(manifest_copy_name(manifest.generation)),
        text.as_bytes(),
    )?;
    write_atomic(&dir.join(MANIFEST_FILE), text.as_bytes())?;
    blank.manifest_sha256 = Some(sum);
    Ok(blank)
}

/// Deletes what neither the `current` generation nor the one before it (kept whole, to roll
/// back to) needs, and temp files of interrupted writes. Their own files stay, and so do the
/// earlier files their tensors chains extend (named by their manifests).
fn remove_stale_files(dir: &Path, current: &Manifest) -> Result<()> {
    let generation = current.generation;
    let mut needed: HashSet<String> = HashSet::new();
    let previous = generation
        .checked_sub(1)
        .and_then(|g| read_manifest_copy(dir, g).ok());
    for manifest in std::iter::once(current).chain(previous.as_ref()) {
        if let Some(files) = &manifest.files {
            needed.extend(named_sums(files).into_iter().map(|(n, _)| n.to_string()));
        }
    }
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let stale = match generation_of(&name) {
            Some(g) => g != generation && g + 1 != generation && !needed.contains(&name),
            None => is_atomic_temp_file(&name),
        };
        if stale {
            fs::remove_file(dir.join(&name))?;
        }
    }
    sync_dir(dir)
}

/// What [`verify`] found in one kept generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerationReport {
    pub generation: u64,
    /// The manifest it was read from (its copy, or `manifest.json` for an old format).
    pub manifest: String,
    pub applied_edits: usize,
    /// Whether `manifest.json` names this generation.
    pub current: bool,
    /// Empty when every byte checks out.
    pub problems: Vec<String>,
}

/// What [`verify`] found in a state directory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StateReport {
    /// The generation `manifest.json` names, when it is readable.
    pub current: Option<u64>,
    /// What is wrong with `manifest.json` itself (None: nothing).
    pub manifest_problem: Option<String>,
    /// What is wrong with the files `manifest.json` names (what opening the state reads).
    pub current_problems: Vec<String>,
    /// Every generation whose manifest is kept, newest first.
    pub generations: Vec<GenerationReport>,
    /// Temp files of interrupted writes (harmless; the next commit removes them).
    pub leftovers: Vec<String>,
}

impl StateReport {
    /// Whether the current generation opens: its manifest and every file it names check out.
    pub fn current_intact(&self) -> bool {
        self.manifest_problem.is_none() && self.current_problems.is_empty()
    }

    /// The newest generation that is intact, to roll back to.
    pub fn newest_intact(&self) -> Option<u64> {
        self.generations
            .iter()
            .find(|g| g.problems.is_empty())
            .map(|g| g.generation)
    }
}

/// Checks every byte of a state without a model: `manifest.json` and each kept generation's
/// manifest copy (JSON, version, checksum) and the files each names (SHA-256, then their
/// structure: safetensors tensors, codebook counts).
pub fn verify(dir: &Path) -> Result<StateReport> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("reading edit state directory {}", dir.display()))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    names.sort();
    let copies: Vec<u64> = names
        .iter()
        .filter(|n| n.starts_with(MANIFEST_PREFIX))
        .filter_map(|n| generation_of(n))
        .collect();
    ensure!(
        names.iter().any(|n| n == MANIFEST_FILE) || !copies.is_empty(),
        "{} holds no edit state (no {MANIFEST_FILE})",
        dir.display()
    );
    let current = read_manifest(dir);
    let current_generation = current.as_ref().ok().map(|m| m.generation);
    // The current generation's files are read once, for manifest.json and its identical copy.
    let current_report = current
        .as_ref()
        .ok()
        .map(|m| generation_report(dir, m, MANIFEST_FILE.to_string(), current_generation));
    let mut report = StateReport {
        current: current_generation,
        manifest_problem: current.as_ref().err().map(|e| format!("{e:#}")),
        current_problems: current_report
            .as_ref()
            .map(|g| g.problems.clone())
            .unwrap_or_default(),
        generations: Vec::new(),
        leftovers: names
            .iter()
            .filter(|n| is_atomic_temp_file(n))
            .cloned()
            .collect(),
    };
    for &generation in copies.iter().rev() {
        let name = manifest_copy_name(generation);
        let checked = fs::read_to_string(dir.join(&name))
            .with_context(|| format!("reading {}", dir.join(&name).display()))
            .and_then(|text| parse_manifest(&dir.join(&name), &text));
        report.generations.push(match checked {
            Ok(m) if Some(&m) == current.as_ref().ok() => GenerationReport {
                manifest: name,
                ..current_report
                    .clone()
                    .expect("a readable manifest has a report")
            },
            Ok(m) => generation_report(dir, &m, name, report.current),
            Err(e) => GenerationReport {
                generation,
                manifest: name,
                applied_edits: 0,
                current: report.current == Some(generation),
                problems: vec![format!("{e:#}")],
            },
        });
    }
    // An old-format state keeps no copies: its one generation is read from manifest.json.
    if let (Ok(m), Some(g)) = (&current, current_report) {
        if !copies.contains(&m.generation) {
            report.generations.insert(0, g);
        }
    }
    Ok(report)
}

fn generation_report(
    dir: &Path,
    manifest: &Manifest,
    name: String,
    current: Option<u64>,
) -> GenerationReport {
    let mut problems = Vec::new();
    if manifest.generation != 0 && manifest.files.is_none() {
        problems.push(format!("{name} names no files for a committed generation"));
    }
    if let Some(files) = &manifest.files {
        // The memory's bytes are the caller's (opaque here): their checksum is what is checked.
        if let Err(e) = load_generation(dir, manifest, files) {
            problems.push(format!("{e:#}"));
        }
    }
    GenerationReport {
        generation: manifest.generation,
        manifest: name,
        applied_edits: manifest.applied_edit_ids.len(),
        current: current == Some(manifest.generation),
        problems,
    }
}

/// Makes a kept, intact generation the current one (for a state whose newest generation is
/// damaged): its manifest copy, checked with every file it names, replaces `manifest.json`
/// atomically. The next commit continues from it.
pub fn rollback(dir: &Path, generation: u64) -> Result<Manifest> {
    let name = manifest_copy_name(generation);
    let path = dir.join(&name);
    let text = fs::read_to_string(&path).with_context(|| {
        let kept: Vec<u64> = verify(dir)
            .map(|r| r.generations.iter().map(|g| g.generation).collect())
            .unwrap_or_default();
        format!(
            "edit state {} keeps no generation {generation} (no {name}); kept: {kept:?}",
            dir.display()
        )
    })?;
    let manifest = parse_manifest(&path, &text)?;
    if let Some(files) = &manifest.files {
        load_generation(dir, &manifest, files)
            .with_context(|| format!("generation {generation} is damaged too"))?;
    }
    write_atomic(&dir.join(MANIFEST_FILE), text.as_bytes())?;
    Ok(manifest)
}

/// Writes the current generation's tensors of the state in `dir` whole, as one safetensors file
/// at `out` (atomically), every file they are read from checked first. Returns the generation
/// and the number of tensors.
pub fn export(dir: &Path, out: &Path) -> Result<(u64, usize)> {
    let manifest = read_manifest(dir)?;
    let files = manifest.files.as_ref().with_context(|| {
        format!(
            "edit state {} has no committed generation to export",
            dir.display()
        )
    })?;
    let (tensors, _, _) = load_generation(dir, &manifest, files)?;
    let bytes = segments::serialize(&segments::whole(&tensors), manifest.generation)?;
    write_atomic(out, &bytes)?;
    Ok((manifest.generation, tensors.len()))
}

/// Lists where two configs differ as "path: state has X, requested Y" (objects are compared key
/// by key; anything else as a whole).
pub fn config_differences(path: &str, stored: &Value, requested: &Value, out: &mut Vec<String>) {
    match (stored, requested) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => config_differences(&child, x, y, out),
                    (Some(x), None) => {
                        out.push(format!("{child}: state has {x}, requested has none"))
                    }
                    (None, Some(y)) => out.push(format!("{child}: state has none, requested {y}")),
                    (None, None) => {}
                }
            }
        }
        _ if stored != requested => {
            let shown = if path.is_empty() { "config" } else { path };
            out.push(format!(
                "{shown}: state has {stored}, requested {requested}"
            ));
        }
        _ => {}
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tensor(name: &str, shape: &[usize], seed: f32) -> NamedTensor {
        let n = shape.iter().product();
        NamedTensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            data: (0..n).map(|i| seed + i as f32 * 0.25).collect(),
        }
    }

    fn codebook(codes: &[u64]) -> Codebook {
        Codebook::from_words(24, codes.to_vec()).unwrap()
    }

    /// Identical tensors serialise to identical bytes, every time: each HashMap gets its own
    /// random seed, so a metadata map of two or more entries would differ between some of these.
    #[test]
    fn expert_files_are_byte_deterministic() {
        let tensors = [tensor("b", &[3], 2.0), tensor("a", &[2, 2], 1.0)];
        let serialize =
            |generation| segments::serialize(&segments::whole(&tensors), generation).unwrap();
        let first = serialize(7);
        for _ in 0..16 {
            assert_eq!(serialize(7), first);
        }
        let back = segments::read(&first).unwrap();
        assert_eq!(back.len(), 2);
        assert_ne!(serialize(8), first);
    }

    /// A crash after step 1 (new data files written, manifest not yet replaced) must leave the
    /// old state visible, and the next commit must succeed over the leftovers.
    #[test]
    fn crash_before_manifest_keeps_old_state() {
        let dir = tempfile::tempdir().unwrap();
        let config = json!({"experts": 4});
        let mut state = EditState::create(dir.path(), config.clone(), "fp").unwrap();
        let old = vec![tensor("a", &[2, 3], 1.0)];
        state
            .commit(&old, &codebook(&[5]), b"m1", &["e1".into()])
            .unwrap();

        let tensors = [tensor("a", &[2, 3], 9.0)];
        let experts = segments::serialize(&segments::whole(&tensors), 2).unwrap();
        write_generation_files(
            dir.path(),
            2,
            &experts,
            Vec::new(),
            &codebook(&[5, 6]),
            b"m2",
        )
        .unwrap();

        let reopened = EditState::open(dir.path(), &config, "fp").unwrap();
        assert_eq!(reopened.generation(), 1);
        assert_eq!(reopened.tensors(), old.as_slice());
        assert_eq!(reopened.codebook().unwrap().len(), 1);
        assert_eq!(reopened.applied_ids(), ["e1".to_string()]);
        assert_eq!(reopened.memory(), b"m1");

        let mut resumed = reopened;
        let new = vec![tensor("a", &[2, 3], 7.0)];
        resumed
            .commit(&new, &codebook(&[5, 7]), b"m3", &["e2".into()])
            .unwrap();
        let again = EditState::open(dir.path(), &config, "fp").unwrap();
        assert_eq!(again.tensors(), new.as_slice());
        assert_eq!(again.codebook().unwrap().entries(), &[5, 7]);
    }

    /// A state written by the first format (no memory file) still opens, with an empty memory,
    /// and its next commit upgrades it.
    #[test]
    fn format_1_states_open_and_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let config = json!({"experts": 4});
        let mut state = EditState::create(dir.path(), config.clone(), "fp").unwrap();
        let t = vec![tensor("a", &[2], 1.0)];
        state
            .commit(&t, &codebook(&[5]), b"m", &["e1".into()])
            .unwrap();
        let path = dir.path().join(MANIFEST_FILE);
        let mut v: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        v["format_version"] = json!(1);
        v.as_object_mut().unwrap().remove("manifest_sha256");
        let files = v["files"].as_object_mut().unwrap();
        files.remove("memory");
        files.remove("memory_sha256");
        fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();

        let mut old = EditState::open(dir.path(), &config, "fp").unwrap();
        assert_eq!(old.memory(), b"");
        assert_eq!(old.tensors(), t.as_slice());
        old.commit(&t, &codebook(&[5, 6]), b"m2", &["e2".into()])
            .unwrap();
        let upgraded = EditState::open(dir.path(), &config, "fp").unwrap();
        assert_eq!(upgraded.manifest().format_version, STATE_FORMAT_VERSION);
        assert_eq!(upgraded.memory(), b"m2");
        v["format_version"] = json!(9);
        fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
        let e = EditState::open(dir.path(), &config, "fp").unwrap_err();
        assert!(format!("{e:#}").contains("format_version Some(9)"), "{e:#}");
    }

    /// The generation `state` has committed, shipped as a replica receives it.
    fn shipped(dir: &Path) -> (String, Vec<(String, Vec<u8>)>) {
        let (text, files) = generation_files(dir).unwrap();
        (text, files.into_iter().map(|f| (f.name, f.bytes)).collect())
    }

    fn inode(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(path).unwrap().ino()
    }

    /// Installing a chain writes only the files a folder lacks; where a folder's own unpublished
    /// generation used a name with other bytes, its manifest goes before the file changes, so a
    /// failed install leaves no current generation rather than one whose file changed under it.
    #[test]
    fn installs_write_what_is_missing_and_never_change_a_current_file() {
        let config = json!({"experts": 4});
        let leader = tempfile::tempdir().unwrap();
        let mut state = EditState::create(leader.path(), config.clone(), "fp").unwrap();
        let grown = |rows: usize, seed: f32| vec![tensor("a", &[rows, 64], seed)];
        let commit = |state: &mut EditState, rows, id: &str| {
            let book = codebook(&(0..rows as u64).collect::<Vec<_>>());
            state
                .commit(&grown(rows, 1.0), &book, id.as_bytes(), &[id.into()])
                .unwrap();
        };
        commit(&mut state, 4, "e1");
        commit(&mut state, 5, "e2");
        let replica = tempfile::tempdir().unwrap();
        let (text, files) = shipped(leader.path());
        assert_eq!(
            files.len(),
            4,
            "a chain of two, the codebook and the memory"
        );
        assert_eq!(
            install_generation(replica.path(), &text, &files).unwrap(),
            2
        );
        let first = replica.path().join("experts-000001.safetensors");
        let before = inode(&first);
        commit(&mut state, 6, "e3");
        let (text, files) = shipped(leader.path());
        install_generation(replica.path(), &text, &files).unwrap();
        assert_eq!(
            inode(&first),
            before,
            "an unchanged chain file was written again"
        );
        let opened = EditState::open(replica.path(), &config, "fp").unwrap();
        assert_eq!(opened.tensors(), grown(6, 1.0).as_slice());

        // A folder whose own generation 2 differs (never published): installing generation 3
        // must replace its experts-000002; the write of experts-000003 fails here (a folder sits
        // at its name), and the folder is left with no current generation.
        let diverged = tempfile::tempdir().unwrap();
        let mut own = EditState::create(diverged.path(), config.clone(), "fp").unwrap();
        commit(&mut own, 4, "e1");
        own.commit(
            &grown(5, 3.0),
            &codebook(&[0, 1, 2, 3, 4]),
            b"x",
            &["e2".into()],
        )
        .unwrap();
        let own_experts = &own.manifest().files.as_ref().unwrap().experts;
        assert_eq!(own_experts, "experts-000002.safetensors");
        fs::create_dir(diverged.path().join("experts-000003.safetensors")).unwrap();
        assert!(install_generation(diverged.path(), &text, &files).is_err());
        assert!(!diverged.path().join(MANIFEST_FILE).exists());
        fs::remove_dir(diverged.path().join("experts-000003.safetensors")).unwrap();
        install_generation(diverged.path(), &text, &files).unwrap();
        let opened = EditState::open(diverged.path(), &config, "fp").unwrap();
        assert_eq!(opened.tensors(), grown(6, 1.0).as_slice());
        assert_eq!(opened.applied_ids(), ["e1", "e2", "e3"]);
    }

    #[test]
    fn config_differences_name_the_keys() {
        let mut out = Vec::new();
        config_differences(
            "",
            &json!({"a": 1, "b": {"c": 2, "d": 3}, "e": 1}),
            &json!({"a": 1, "b": {"c": 4, "d": 3}, "f": 1}),
            &mut out,
        );
        assert_eq!(
            out,
            vec![
                "b.c: state has 2, requested 4".to_string(),
                "e: state has 1, requested has none".to_string(),
                "f: state has none, requested 1".to_string(),
            ]
        );
    }
}
