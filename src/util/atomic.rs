//! Crash-safe file replacement.
//!
//! A reader of `path` must see either the old file or the complete new one, never a torn write,
//! even if the process or the machine dies halfway. The recipe: write a temp file in the SAME
//! directory (a rename is only atomic within one filesystem), fsync it so its bytes are on disk
//! before its name is, rename it over `path`, then fsync the directory so the rename itself is
//! durable.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};

/// Prefix of every temp file this module creates; `is_atomic_temp_file` recognises leftovers
/// of a crash by it so a cleaner can delete them.
const TEMP_PREFIX: &str = ".tmp-";

/// Writes `bytes` to `path` atomically (see the module docs).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |writer| {
        writer.write_all(bytes)?;
        Ok(())
    })
}

/// Streams the new contents of `path` through `fill`, then replaces `path` atomically.
/// If `fill` fails, `path` is untouched and the temp file is removed.
pub fn write_atomic_with<F>(path: &Path, fill: F) -> Result<()>
where
    F: FnOnce(&mut dyn Write) -> Result<()>,
{
    let dir = parent_dir(path);
    let file_name = path
        .file_name()
        .with_context(|| format!("atomic write: {} has no file name", path.display()))?;
    let temp_path = dir.join(temp_name(&file_name.to_string_lossy()));

    let result = write_then_rename(&temp_path, path, fill);
    if result.is_err() {
        // Best effort: a leftover temp file is harmless (it never shadows `path`) but untidy.
        let _ = fs::remove_file(&temp_path);
    }
    result?;
    sync_dir(&dir)
}

/// Whether `name` looks like a temp file left behind by an interrupted atomic write.
pub fn is_atomic_temp_file(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX)
}

/// Fsyncs a directory so that renames and removals inside it survive a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let handle = File::open(dir)
            .with_context(|| format!("opening directory {} to fsync it", dir.display()))?;
        handle
            .sync_all()
            .with_context(|| format!("fsync of directory {}", dir.display()))?;
    }
    #[cfg(not(unix))]
    let _ = dir; // Directories cannot be opened for fsync here; rename durability is the OS's.
    Ok(())
}

fn write_then_rename<F>(temp_path: &Path, path: &Path, fill: F) -> Result<()>
where
    F: FnOnce(&mut dyn Write) -> Result<()>,
{
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(temp_path)
        .with_context(|| format!("creating temp file {}", temp_path.display()))?;
    let mut writer = BufWriter::new(file);
    fill(&mut writer).with_context(|| format!("writing {}", path.display()))?;
    let file = writer
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("flushing {}", temp_path.display()))?;
    file.sync_all()
        .with_context(|| format!("fsync of {}", temp_path.display()))?;
    drop(file);
    fs::rename(temp_path, path)
        .with_context(|| format!("renaming {} to {}", temp_path.display(), path.display()))
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A name unique within this process (pid + counter) so concurrent writers of the same target
/// never share a temp file.
fn temp_name(target: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{TEMP_PREFIX}{}-{n}-{target}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn writes_new_file_and_replaces_existing_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        write_atomic(&path, b"first").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"first");
        write_atomic(&path, b"second, longer").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second, longer");
        assert_eq!(names_in(dir.path()), vec!["out.bin".to_string()]);
    }

    #[test]
    fn streaming_writer_produces_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stream.txt");
        write_atomic_with(&path, |w| {
            for i in 0..1000 {
                writeln!(w, "line {i}")?;
            }
            Ok(())
        })
        .unwrap();
        let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(fs::read_to_string(&path).unwrap(), expected);
    }

    #[test]
    fn failing_writer_leaves_old_file_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keep.txt");
        write_atomic(&path, b"old").unwrap();
        let err = write_atomic_with(&path, |w| {
            w.write_all(b"partial new contents")?;
            anyhow::bail!("simulated failure mid-write")
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("simulated failure"), "{err:#}");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(names_in(dir.path()), vec!["keep.txt".to_string()]);
    }

    #[test]
    fn missing_directory_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("x.bin");
        let err = write_atomic(&path, b"x").unwrap_err();
        assert!(format!("{err:#}").contains("no-such-dir"), "{err:#}");
    }

    #[test]
    fn temp_names_are_recognised_and_unique() {
        let a = temp_name("m.json");
        let b = temp_name("m.json");
        assert_ne!(a, b);
        assert!(is_atomic_temp_file(&a));
        assert!(!is_atomic_temp_file("m.json"));
    }
}
