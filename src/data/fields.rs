//! Typed access to the fields of one JSON object, with messages that name the field and say what
//! was expected and what was found (`field "target_new": expected a string, found number`).
//!
//! Errors are plain strings without a location; the reader driver prefixes the file and the line
//! or record index.

use serde_json::{Map, Value};

pub(crate) type FieldResult<T> = Result<T, String>;

/// The JSON type of `value` in words, for "found ..." messages.
pub(crate) fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

pub(crate) fn as_object<'a>(value: &'a Value, what: &str) -> FieldResult<&'a Map<String, Value>> {
    value
        .as_object()
        .ok_or_else(|| format!("{what}: expected an object, found {}", json_kind(value)))
}

/// A view of one JSON object; `path` prefixes nested field names ("requested_rewrite.subject").
pub(crate) struct Fields<'a> {
    object: &'a Map<String, Value>,
    path: String,
}

impl<'a> Fields<'a> {
    pub(crate) fn root(object: &'a Map<String, Value>) -> Self {
        Fields {
            object,
            path: String::new(),
        }
    }

    pub(crate) fn name(&self, field: &str) -> String {
        format!("{}{field}", self.path)
    }

    fn fail<T>(&self, field: &str, problem: impl std::fmt::Display) -> FieldResult<T> {
        Err(format!("field \"{}\": {problem}", self.name(field)))
    }

    /// Absent and `null` both count as missing.
    pub(crate) fn get(&self, field: &str) -> Option<&'a Value> {
        self.object.get(field).filter(|v| !v.is_null())
    }

    pub(crate) fn object(&self, field: &str) -> FieldResult<Fields<'a>> {
        match self.get(field) {
            None => self.fail(field, "missing"),
            Some(Value::Object(object)) => Ok(Fields {
                object,
                path: format!("{}{field}.", self.path),
            }),
            Some(other) => self.fail(
                field,
                format!("expected an object, found {}", json_kind(other)),
            ),
        }
    }

    /// A required, non-empty string.
    pub(crate) fn string(&self, field: &str) -> FieldResult<String> {
        match self.optional_string(field)? {
            Some(text) => Ok(text),
            None => self.fail(field, "missing"),
        }
    }

    /// An optional string; present but empty is an error (an empty prompt or answer is a typo,
    /// never intended).
    pub(crate) fn optional_string(&self, field: &str) -> FieldResult<Option<String>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(text)) if text.trim().is_empty() => self.fail(field, "is empty"),
            Some(Value::String(text)) => Ok(Some(text.clone())),
            Some(other) => self.fail(
                field,
                format!("expected a string, found {}", json_kind(other)),
            ),
        }
    }

    /// An identifier: a string, or a non-negative integer written as one.
    pub(crate) fn optional_id(&self, field: &str) -> FieldResult<Option<String>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Number(n)) if n.is_u64() => Ok(Some(n.to_string())),
            Some(Value::String(_)) => self.optional_string(field),
            Some(other) => self.fail(
                field,
                format!(
                    "expected a string or a non-negative integer, found {}",
                    describe(other)
                ),
            ),
        }
    }

    /// An optional list of non-empty strings (absent → empty).
    pub(crate) fn string_list(&self, field: &str) -> FieldResult<Vec<String>> {
        let items = self.array(field)?;
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(text) if !text.trim().is_empty() => Ok(text.clone()),
                Value::String(_) => self.fail(&format!("{field}[{i}]"), "is empty"),
                other => self.fail(
                    &format!("{field}[{i}]"),
                    format!("expected a string, found {}", json_kind(other)),
                ),
            })
            .collect()
    }

    /// An optional array (absent → empty).
    pub(crate) fn array(&self, field: &str) -> FieldResult<&'a [Value]> {
        match self.get(field) {
            None => Ok(&[]),
            Some(Value::Array(items)) => Ok(items),
            Some(other) => self.fail(
                field,
                format!("expected an array, found {}", json_kind(other)),
            ),
        }
    }

    /// Element `index` of array `field` viewed as an object.
    pub(crate) fn element(
        &self,
        field: &str,
        index: usize,
        item: &'a Value,
    ) -> FieldResult<Fields<'a>> {
        match item {
            Value::Object(object) => Ok(Fields {
                object,
                path: format!("{}{field}[{index}].", self.path),
            }),
            other => self.fail(
                &format!("{field}[{index}]"),
                format!("expected an object, found {}", json_kind(other)),
            ),
        }
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Number(n) => format!("number {n}"),
        other => json_kind(other).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_name_field_expected_and_found() {
        let value = json!({"a": 3, "b": "", "c": ["x", 1], "d": {"e": true}, "f": -1});
        let fields = Fields::root(value.as_object().unwrap());
        assert_eq!(
            fields.string("a").unwrap_err(),
            "field \"a\": expected a string, found number"
        );
        assert_eq!(fields.string("b").unwrap_err(), "field \"b\": is empty");
        assert_eq!(fields.string("zz").unwrap_err(), "field \"zz\": missing");
        assert_eq!(
            fields.string_list("c").unwrap_err(),
            "field \"c[1]\": expected a string, found number"
        );
        let nested = fields.object("d").unwrap();
        assert_eq!(
            nested.string("e").unwrap_err(),
            "field \"d.e\": expected a string, found boolean"
        );
        assert!(fields.optional_id("f").unwrap_err().contains("number -1"));
        assert_eq!(fields.optional_id("a").unwrap(), Some("3".to_string()));
    }
}
