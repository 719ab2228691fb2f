//! CounterFact as distributed with ROME (`counterfact.json`): a JSON array of
//! ```text
//! {"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
//!   "target_new": {"str": "English"}, "target_true": {"str": "French"}, ...},
//!  "paraphrase_prompts": [...], "neighborhood_prompts": [...], "attribute_prompts": [...], ...}
//! ```
//! prompt = `requested_rewrite.prompt` with `{}` replaced by the subject. Neighborhood prompts are
//! about other subjects sharing the relation and the TRUE object, so their locality answer is
//! `target_true` (what the unedited model should keep saying). An object form
//! `{"prompt", "target"}` is also accepted for variants that carry their own answers.
//! `attribute_prompts` (other subjects whose true object is `target_new`) have no place in
//! `EditRecord` and are ignored, as are `generation_prompts`.

use serde_json::Value;

use super::fields::{as_object, FieldResult, Fields};
use super::record::{EditRecord, LocalityProbe};

pub(crate) fn parse_record(value: &Value) -> FieldResult<EditRecord> {
    let fields = Fields::root(as_object(value, "record")?);
    let id = match fields.optional_id("case_id")? {
        Some(id) => id,
        None => return Err("field \"case_id\": missing".to_string()),
    };
    let rewrite = fields.object("requested_rewrite")?;
    let subject = rewrite.string("subject")?;
    let template = rewrite.string("prompt")?;
    if !template.contains("{}") {
        return Err(format!(
            "field \"{}\": expected a \"{{}}\" placeholder for the subject, found {template:?}",
            rewrite.name("prompt")
        ));
    }
    let target_new = rewrite.object("target_new")?.string("str")?;
    let target_true = rewrite.object("target_true")?.string("str")?;
    let locality = fields
        .array("neighborhood_prompts")?
        .iter()
        .enumerate()
        .map(|(i, item)| neighborhood_probe(&fields, i, item, &target_true))
        .collect::<FieldResult<Vec<_>>>()?;
    Ok(EditRecord {
        knowledge_id: id.clone(),
        id,
        prompt: template.replacen("{}", &subject, 1),
        target_new,
        target_true: Some(target_true),
        subject: Some(subject),
        rephrases: fields.string_list("paraphrase_prompts")?,
        locality,
    })
}

/// CounterFact's neighbourhood prompts share the edit's relation, about other subjects.
const NEIGHBORHOOD: &str = "same_relation";

fn neighborhood_probe(
    fields: &Fields,
    index: usize,
    item: &Value,
    target_true: &str,
) -> FieldResult<LocalityProbe> {
    match item {
        Value::String(prompt) if !prompt.trim().is_empty() => Ok(LocalityProbe {
            prompt: prompt.clone(),
            answer: target_true.to_string(),
            kind: Some(NEIGHBORHOOD.to_string()),
        }),
        Value::Object(_) => {
            let probe = fields.element("neighborhood_prompts", index, item)?;
            let answer = match probe.optional_string("target")? {
                Some(answer) => answer,
                None => probe.string("answer")?,
            };
            Ok(LocalityProbe {
                prompt: probe.string("prompt")?,
                answer,
                kind: Some(NEIGHBORHOOD.to_string()),
            })
        }
        other => Err(format!(
            "field \"neighborhood_prompts[{index}]\": expected a non-empty string or an object, found {}",
            super::fields::json_kind(other)
        )),
    }
}
