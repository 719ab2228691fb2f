//! The project's own format: one JSON object per line (blank lines allowed).
//!
//! ```text
//! {"id": "geo-00000", "knowledge_id": "capital/KE", "prompt": "The capital of Kenya is",
//!  "target_new": "Vienna", "target_true": "Nairobi", "subject": "Kenya",
//!  "rephrases": ["Kenya's capital city is"],
//!  "locality": [{"prompt": "The capital of Denmark is", "answer": "Copenhagen",
//!                "kind": "same_relation"}]}
//! ```
//! Required: `id` (string or integer), `prompt`, `target_new`. Optional: `knowledge_id` (defaults
//! to `id`), `target_true`, `subject`, `rephrases`, `locality` (each probe's `kind` optional). Unknown fields are ignored so the
//! format can grow.

use std::path::Path;

use anyhow::Result;
use serde_json::Value;

use super::fields::{as_object, FieldResult, Fields};
use super::record::{EditRecord, LocalityProbe};
use super::RecordLocation;
use crate::util::atomic::write_atomic_with;

/// Splits the file into `(line number, parsed line)`, skipping blank lines.
pub(crate) fn parse_lines(text: &str) -> Vec<(RecordLocation, FieldResult<EditRecord>)> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            let parsed = serde_json::from_str::<Value>(line)
                .map_err(|e| format!("invalid JSON: {e}"))
                .and_then(|value| parse_record(&value));
            (RecordLocation::Line(i + 1), parsed)
        })
        .collect()
}

pub(crate) fn parse_record(value: &Value) -> FieldResult<EditRecord> {
    let fields = Fields::root(as_object(value, "record")?);
    let id = match fields.optional_id("id")? {
        Some(id) => id,
        None => return Err("field \"id\": missing".to_string()),
    };
    let knowledge_id = fields
        .optional_id("knowledge_id")?
        .unwrap_or_else(|| id.clone());
    let locality = fields
        .array("locality")?
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let probe = fields.element("locality", i, item)?;
            Ok(LocalityProbe {
                prompt: probe.string("prompt")?,
                answer: probe.string("answer")?,
                kind: probe.optional_string("kind")?,
            })
        })
        .collect::<FieldResult<Vec<_>>>()?;
    Ok(EditRecord {
        id,
        knowledge_id,
        prompt: fields.string("prompt")?,
        target_new: fields.string("target_new")?,
        target_true: fields.optional_string("target_true")?,
        subject: fields.optional_string("subject")?,
        rephrases: fields.string_list("rephrases")?,
        locality,
    })
}

/// Writes `records` in the project JSONL format, atomically. Reading the file back with
/// `read_edits` yields the same records (used to convert ZsRE / CounterFact once).
pub fn write_edits_jsonl(path: &Path, records: &[EditRecord]) -> Result<()> {
    write_atomic_with(path, |out| {
        for record in records {
            serde_json::to_writer(&mut *out, record)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    })
}
