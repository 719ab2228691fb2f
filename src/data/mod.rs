//! Edit datasets: the internal record and readers for the project JSONL, ZsRE and CounterFact.
//!
//! Two entry points:
//! - [`read_edits`]: all or nothing. The first bad record (or a duplicate id) is an error naming
//!   the file, the line (JSONL) or record index (JSON arrays, 0-based) and the field.
//! - [`read_edits_lenient`]: returns the good records and a list of [`RecordError`]s, so the CLI
//!   can report bad lines and still edit with the rest. A record whose id repeats an earlier one is
//!   reported and dropped (the first wins). Errors that make the whole file unreadable (I/O, a JSON
//!   array with a syntax error, an unknown format) are still returned as `Err`: a JSON array cannot
//!   be resynchronised after a syntax error, unlike JSONL where every line stands alone.

pub mod background;
mod counterfact;
mod fields;
mod jsonl;
mod record;
mod zsre;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

pub use jsonl::write_edits_jsonl;
pub use record::{EditRecord, LocalityProbe};

use fields::FieldResult;

/// Which reader to use. `Auto`: a `.jsonl` extension means the project JSONL; otherwise a JSON
/// array is ZsRE if its first object has `src` and `alt`, CounterFact if it has
/// `requested_rewrite`; a file that starts with `{` is read as JSONL whatever its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataFormat {
    #[default]
    Auto,
    Jsonl,
    Zsre,
    CounterFact,
}

impl FromStr for DataFormat {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        match text.to_ascii_lowercase().as_str() {
            "auto" => Ok(DataFormat::Auto),
            "jsonl" => Ok(DataFormat::Jsonl),
            "zsre" => Ok(DataFormat::Zsre),
            "counterfact" | "cf" => Ok(DataFormat::CounterFact),
            _ => bail!("unknown data format {text:?}: expected auto, jsonl, zsre or counterfact"),
        }
    }
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataFormat::Auto => "auto",
            DataFormat::Jsonl => "jsonl",
            DataFormat::Zsre => "zsre",
            DataFormat::CounterFact => "counterfact",
        })
    }
}

/// Where a record sits in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordLocation {
    /// 1-based line number (JSONL).
    Line(usize),
    /// 0-based index into a JSON array (ZsRE, CounterFact).
    Record(usize),
}

impl fmt::Display for RecordLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordLocation::Line(n) => write!(f, "line {n}"),
            RecordLocation::Record(i) => write!(f, "record {i}"),
        }
    }
}

/// One bad record: where it is and what is wrong ("field \"target_new\": expected a string,
/// found number"). Displays as "line 17: field ...".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    pub location: RecordLocation,
    pub message: String,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// The result of a lenient read: every good record, in file order, and every bad one.
#[derive(Debug, Clone, Default)]
pub struct LenientRead {
    pub format: DataFormat,
    pub records: Vec<EditRecord>,
    pub errors: Vec<RecordError>,
}

/// One record in the project's JSONL shape from a parsed JSON value (a server's request body):
/// the same fields and checks as a line of a `.jsonl` file; the error names the field.
pub fn record_from_json(value: &serde_json::Value) -> std::result::Result<EditRecord, String> {
    jsonl::parse_record(value)
}

/// Reads every record of `path`, failing on the first bad one (see the module docs).
pub fn read_edits(path: &Path, format: DataFormat) -> Result<Vec<EditRecord>> {
    let read = read_edits_lenient(path, format)?;
    if let Some(first) = read.errors.first() {
        let more = match read.errors.len() - 1 {
            0 => String::new(),
            n => format!(" (and {n} more bad record(s))"),
        };
        bail!("{}: {first}{more}", path.display());
    }
    Ok(read.records)
}

/// Reads the good records of `path` and lists the bad ones (see the module docs).
pub fn read_edits_lenient(path: &Path, format: DataFormat) -> Result<LenientRead> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading edit dataset {}", path.display()))?;
    parse_edits_lenient(path, &text, format)
}

/// [`read_edits_lenient`] on a dataset's text already in memory; `path` names it in errors and,
/// with `DataFormat::Auto`, its extension takes part in detecting the format.
pub fn parse_edits_lenient(path: &Path, text: &str, format: DataFormat) -> Result<LenientRead> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let format = resolve_format(path, text, format)?;
    let parsed = match format {
        DataFormat::Jsonl => jsonl::parse_lines(text),
        DataFormat::Zsre => parse_array(path, text, zsre::parse_record)?,
        DataFormat::CounterFact => {
            parse_array(path, text, |value, _| counterfact::parse_record(value))?
        }
        DataFormat::Auto => unreachable!("resolve_format never returns Auto"),
    };
    let (records, errors) = drop_duplicate_ids(parsed);
    Ok(LenientRead {
        format,
        records,
        errors,
    })
}

fn resolve_format(path: &Path, text: &str, requested: DataFormat) -> Result<DataFormat> {
    if requested != DataFormat::Auto {
        return Ok(requested);
    }
    let is_jsonl_extension = path
        .extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("jsonl"));
    let first_char = text.trim_start().chars().next();
    if is_jsonl_extension || first_char == Some('{') {
        return Ok(DataFormat::Jsonl);
    }
    if first_char != Some('[') {
        bail!(
            "{}: cannot detect the dataset format: expected a .jsonl file or a JSON array; \
             pass the format explicitly (jsonl, zsre, counterfact)",
            path.display()
        );
    }
    let array: Vec<Value> = serde_json::from_str(text)
        .with_context(|| format!("{}: invalid JSON array", path.display()))?;
    let Some(first) = array.first() else {
        // An empty array holds no edits in any format.
        return Ok(DataFormat::Zsre);
    };
    let keys: Vec<&str> = first
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    if keys.contains(&"requested_rewrite") {
        Ok(DataFormat::CounterFact)
    } else if keys.contains(&"src") && keys.contains(&"alt") {
        Ok(DataFormat::Zsre)
    } else {
        Err(anyhow!(
            "{}: cannot detect the dataset format from record 0 (keys: {keys:?}): \
             ZsRE needs \"src\" and \"alt\", CounterFact needs \"requested_rewrite\"",
            path.display()
        ))
    }
}

fn parse_array<F>(
    path: &Path,
    text: &str,
    parse: F,
) -> Result<Vec<(RecordLocation, FieldResult<EditRecord>)>>
where
    F: Fn(&Value, usize) -> FieldResult<EditRecord>,
{
    let array: Vec<Value> = serde_json::from_str(text)
        .with_context(|| format!("{}: expected a JSON array of records", path.display()))?;
    Ok(array
        .iter()
        .enumerate()
        .map(|(i, value)| (RecordLocation::Record(i), parse(value, i)))
        .collect())
}

fn drop_duplicate_ids(
    parsed: Vec<(RecordLocation, FieldResult<EditRecord>)>,
) -> (Vec<EditRecord>, Vec<RecordError>) {
    let mut first_seen: HashMap<String, RecordLocation> = HashMap::new();
    let mut records = Vec::new();
    let mut errors = Vec::new();
    for (location, result) in parsed {
        match result {
            Err(message) => errors.push(RecordError { location, message }),
            Ok(record) => {
                if let Some(first) = first_seen.get(&record.id) {
                    errors.push(RecordError {
                        location,
                        message: format!("duplicate id {:?} (first at {first})", record.id),
                    });
                } else {
                    first_seen.insert(record.id.clone(), location);
                    records.push(record);
                }
            }
        }
    }
    (records, errors)
}
