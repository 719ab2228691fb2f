//! The server's write-ahead edit log: `edit-log.jsonl` in the state directory, one JSON object
//! per line, appended and fsynced before an edit is acknowledged.
//!
//! ```text
//! {"op":"add","seq":1,"id":"e1","record":{...}}      an accepted edit (the project's record shape)
//! {"op":"delete","seq":2,"id":"e1"}                   an accepted rollback
//! {"op":"committed","ids":["e1"],"generation":7}       the trainer's outcome (advisory)
//! {"op":"deleted","id":"e1","generation":8}
//! {"op":"failed","ids":["e2"],"error":"..."}
//! ```
//!
//! Only `add` and `delete` lines are promises; they are fsynced before the client hears 202.
//! The outcome lines say which generation made an edit visible; the state's manifest stays the
//! authority on what is applied (a crash between a commit and its outcome line loses only the
//! generation number). An append is one `write` of whole lines: a crash can leave only a torn
//! last line, never acknowledged (its fsync had not returned), which opening drops and truncates.
//! A damaged line before the end is an error naming it: the log is never silently shortened.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The log's file name inside the state directory.
pub const LOG_FILE: &str = "edit-log.jsonl";

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Entry {
    Add {
        seq: u64,
        id: String,
        record: Value,
    },
    Delete {
        seq: u64,
        id: String,
    },
    Committed {
        ids: Vec<String>,
        generation: u64,
    },
    Deleted {
        id: String,
        generation: u64,
    },
    Failed {
        ids: Vec<String>,
        error: String,
    },
    /// A leader took over a shared log (JetStream only): every writer before it is fenced.
    Leader {
        leader: String,
    },
}

impl Entry {
    /// The sequence number of a promise (`add`, `delete`).
    pub fn seq(&self) -> Option<u64> {
        match self {
            Entry::Add { seq, .. } | Entry::Delete { seq, .. } => Some(*seq),
            _ => None,
        }
    }
}

/// The open log, positioned at its end.
pub struct EditLog {
    path: PathBuf,
    file: File,
    /// Bytes of whole lines in the file (where a failed append is cut back to).
    len: u64,
    next_seq: u64,
}

impl EditLog {
    /// Opens (or creates) the log in `dir` and returns it with every entry it holds, in order. A
    /// torn last line is dropped and cut off the file.
    pub fn open(dir: &Path) -> Result<(EditLog, Vec<Entry>)> {
        let path = dir.join(LOG_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .with_context(|| format!("opening the edit log {}", path.display()))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .with_context(|| format!("reading the edit log {}", path.display()))?;
        let (entries, good_len) =
            parse(&bytes).with_context(|| format!("edit log {}", path.display()))?;
        if good_len < bytes.len() {
            // A torn append (never acknowledged): cut it so the next append starts a clean line.
            file.set_len(good_len as u64)
                .and_then(|()| file.sync_all())
                .with_context(|| format!("truncating the torn end of {}", path.display()))?;
            eprintln!(
                "note: dropped a torn last line of {} ({} bytes, never acknowledged)",
                path.display(),
                bytes.len() - good_len
            );
        }
        file.seek(SeekFrom::End(0))?;
        crate::util::atomic::sync_dir(dir)?;
        let next_seq = entries.iter().filter_map(Entry::seq).max().unwrap_or(0) + 1;
        Ok((
            EditLog {
                path,
                file,
                len: good_len as u64,
                next_seq,
            },
            entries,
        ))
    }

    /// The sequence number the next promise gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends `entries` as one write and makes them durable (fsync) before returning; promises
    /// must carry the sequence numbers [`EditLog::next_seq`] handed out, in order.
    pub fn append(&mut self, entries: &[Entry]) -> Result<()> {
        let mut bytes = Vec::new();
        let mut next = self.next_seq;
        for e in entries {
            if let Some(seq) = e.seq() {
                anyhow::ensure!(
                    seq == next,
                    "edit log: sequence {seq} out of order (expected {next})"
                );
                next += 1;
            }
            serde_json::to_writer(&mut bytes, e)?;
            bytes.push(b'\n');
        }
        let written = self
            .file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // A partial line (a full disk) would glue itself to the next append: cut it off.
            let _ = self.file.set_len(self.len);
            return Err(e)
                .with_context(|| format!("appending to the edit log {}", self.path.display()));
        }
        self.len += bytes.len() as u64;
        self.next_seq = next;
        Ok(())
    }
}

/// The entries of a log's bytes and the length of the part that holds whole, valid lines.
fn parse(bytes: &[u8]) -> Result<(Vec<Entry>, usize)> {
    let mut entries = Vec::new();
    let mut at = 0;
    let mut line_no = 0;
    while at < bytes.len() {
        line_no += 1;
        let Some(end) = bytes[at..].iter().position(|&b| b == b'\n').map(|p| at + p) else {
            return Ok((entries, at)); // no newline: a torn append
        };
        let line = &bytes[at..end];
        let is_last = end + 1 == bytes.len();
        if !line.iter().all(u8::is_ascii_whitespace) {
            match serde_json::from_slice::<Entry>(line) {
                Ok(e) => entries.push(e),
                // A last line that does not parse was cut by a crash before its fsync returned.
                Err(_) if is_last => return Ok((entries, at)),
                Err(e) => bail!("line {line_no} is damaged ({e}); the log needs repair by hand"),
            }
        }
        at = end + 1;
    }
    Ok((entries, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(seq: u64, id: &str) -> Entry {
        Entry::Add {
            seq,
            id: id.into(),
            record: serde_json::json!({"id": id, "prompt": "p", "target_new": "t"}),
        }
    }

    #[test]
    fn appended_entries_come_back_in_order_and_sequences_continue() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, entries) = EditLog::open(dir.path()).unwrap();
        assert!(entries.is_empty());
        assert_eq!(log.next_seq(), 1);
        let written = vec![
            add(1, "a"),
            add(2, "b"),
            Entry::Committed {
                ids: vec!["a".into(), "b".into()],
                generation: 1,
            },
            Entry::Delete {
                seq: 3,
                id: "a".into(),
            },
        ];
        log.append(&written).unwrap();
        assert!(
            log.append(&[add(9, "c")]).is_err(),
            "out-of-order sequence accepted"
        );
        drop(log);
        let (log, entries) = EditLog::open(dir.path()).unwrap();
        assert_eq!(entries, written);
        assert_eq!(log.next_seq(), 4);
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_cut_but_damage_before_it_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = EditLog::open(dir.path()).unwrap();
        log.append(&[add(1, "a")]).unwrap();
        drop(log);
        let path = dir.path().join(LOG_FILE);
        let whole = std::fs::read(&path).unwrap();
        for torn in [
            &b"{\"op\":\"add\",\"se"[..],
            b"{\"op\":\"add\"\n",
            b"\0\0\0\0",
        ] {
            let mut bytes = whole.clone();
            bytes.extend_from_slice(torn);
            std::fs::write(&path, &bytes).unwrap();
            let (mut log, entries) = EditLog::open(dir.path()).unwrap();
            assert_eq!(entries, vec![add(1, "a")], "torn tail {torn:?}");
            assert_eq!(std::fs::read(&path).unwrap(), whole, "torn tail not cut");
            log.append(&[add(2, "b")]).unwrap();
            drop(log);
            let (_, entries) = EditLog::open(dir.path()).unwrap();
            assert_eq!(entries, vec![add(1, "a"), add(2, "b")]);
            std::fs::write(&path, &whole).unwrap();
        }
        let mut bytes = b"{\"op\":\"add\"\n".to_vec();
        bytes.extend_from_slice(&whole);
        std::fs::write(&path, &bytes).unwrap();
        let err = EditLog::open(dir.path())
            .err()
            .expect("damaged first line accepted");
        assert!(format!("{err:#}").contains("line 1 is damaged"), "{err:#}");
    }
}
