//! ZsRE as distributed with MEND / ROME (`zsre_mend_eval.json`): a JSON array of
//! `{"subject", "src", "rephrase", "alt", "answers", "loc", "loc_ans", ...}`.
//!
//! Mapping (the EasyEdit / MELO lineage, which ELDER follows):
//! `src` → prompt, `alt` → target_new, `answers[0]` → target_true (a string is accepted too),
//! `rephrase` → the one rephrase, `loc` + `loc_ans` → one locality probe, `subject` if present,
//! id = `case_id` if present, else the record's index in the array.
//!
//! The locality prompt: ROME (`dsets/zsre.py`) keeps the `nq question: ` prefix and appends `?`
//! (`record["loc"] + "?"`); it does NOT strip the prefix. We do the same, so locality numbers are
//! comparable with that lineage (the `?` is not doubled if `loc` already ends with one).
//! Note ROME itself trains on `answers[0]`, not `alt`; we follow the brief and EasyEdit.

use serde_json::Value;

use super::fields::{as_object, FieldResult, Fields};
use super::record::{EditRecord, LocalityProbe};

pub(crate) fn parse_record(value: &Value, index: usize) -> FieldResult<EditRecord> {
    let fields = Fields::root(as_object(value, "record")?);
    let id = fields
        .optional_id("case_id")?
        .unwrap_or_else(|| index.to_string());
    let target_true = match fields.get("answers") {
        Some(Value::String(_)) => fields.optional_string("answers")?,
        Some(_) => fields.string_list("answers")?.into_iter().next(),
        None => None,
    };
    let rephrases = fields.optional_string("rephrase")?.into_iter().collect();
    let locality = match fields.optional_string("loc")? {
        Some(loc) => vec![LocalityProbe {
            prompt: rome_locality_prompt(&loc),
            answer: fields.string("loc_ans")?,
            // ZsRE's locality questions are Natural Questions: unrelated to the edits.
            kind: Some("nq".to_string()),
        }],
        None => Vec::new(),
    };
    Ok(EditRecord {
        knowledge_id: id.clone(),
        id,
        prompt: fields.string("src")?,
        target_new: fields.string("alt")?,
        target_true,
        subject: fields.optional_string("subject")?,
        rephrases,
        locality,
    })
}

fn rome_locality_prompt(loc: &str) -> String {
    let loc = loc.trim_end();
    if loc.ends_with('?') {
        loc.to_string()
    } else {
        format!("{loc}?")
    }
}
