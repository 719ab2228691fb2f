//! The one internal shape every dataset is read into.

use serde::{Deserialize, Serialize};

/// One requested edit plus the probes used to evaluate it.
///
/// The engine trains on and scores `prompt + " " + target_new` (the space is added by the engine,
/// so targets are stored without a leading space).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EditRecord {
    /// Unique within a dataset; `elder edit` records applied ids to resume after a crash.
    pub id: String,
    /// Names the fact being edited; several records may edit the same fact. Defaults to `id`.
    pub knowledge_id: String,
    pub prompt: String,
    pub target_new: String,
    /// What the unedited model is expected to say, when the dataset knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_true: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Paraphrases of `prompt` that should also yield `target_new` (generalisation).
    #[serde(default)]
    pub rephrases: Vec<String>,
    /// Unrelated prompts whose answers the edit must not change.
    #[serde(default)]
    pub locality: Vec<LocalityProbe>,
}

/// A prompt about something else, with the answer the unedited model gives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalityProbe {
    pub prompt: String,
    pub answer: String,
    /// What kind of probe this is (`same_relation`, `other_relation`, `same_subject`, `general`
    /// in the project's datasets; free text elsewhere): evaluation reports locality per kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}
