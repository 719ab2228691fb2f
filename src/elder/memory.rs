//! What an edit state remembers of each applied edit: its training fields and the experts it was
//! given. Never a record's rephrasings or locality probes: those are the test set.
//!
//! The trainer reads this memory to reuse an edit's allocation at inference, to replay earlier
//! edits that share experts with a new one, and to make negatives from other edits' prompts.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One applied edit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EditEntry {
    pub id: String,
    pub knowledge_id: String,
    pub prompt: String,
    pub target: String,
    /// The subject the key was read at (the record's, or the one found in the prompt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The experts this edit was trained on, `top_k` per MoLoRA layer (empty under the paper's
    /// routing, where the routers choose at inference).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allocation: Vec<Vec<u32>>,
    /// The first tokens of `target` as the model's tokenizer writes it after the prompt, up to
    /// and including its first token that is not only whitespace (a tokenizer that splits digits
    /// writes " 44" as " ", "4", "4"): what `answer_gate` asks the experts for. Derived from
    /// `target` (by the session, when an edit is made and when a state is opened), never stored.
    #[serde(skip)]
    pub answer: Vec<u32>,
    /// The prompt's words outside its subject (`relation_words`; [`crate::elder::words`]).
    /// Derived from `prompt` by the session, like `answer`; never stored.
    #[serde(skip)]
    pub words: Vec<u32>,
}

/// The memory as JSON lines (one entry per line, in the order the edits were applied).
pub fn to_jsonl(entries: &[EditEntry]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for e in entries {
        serde_json::to_writer(&mut out, e)?;
        out.push(b'\n');
    }
    Ok(out)
}

pub fn from_jsonl(bytes: &[u8]) -> Result<Vec<EditEntry>> {
    let text = std::str::from_utf8(bytes).context("edit memory is not UTF-8")?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("edit memory line {}", i + 1))
        })
        .collect()
}

/// How many applied edits use each expert of each layer: `[layer][expert]`.
pub fn expert_usage(entries: &[EditEntry], layers: usize, experts: usize) -> Vec<Vec<usize>> {
    let mut usage = vec![vec![0usize; experts]; layers];
    for e in entries {
        for (l, chosen) in e.allocation.iter().enumerate().take(layers) {
            for &x in chosen {
                if let Some(u) = usage[l].get_mut(x as usize) {
                    *u += 1;
                }
            }
        }
    }
    usage
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_round_trips_and_counts_usage() {
        let entries = vec![
            EditEntry {
                id: "a".into(),
                knowledge_id: "k".into(),
                prompt: "The capital of X is".into(),
                target: "Y".into(),
                subject: Some("X".into()),
                allocation: vec![vec![0, 2], vec![1, 3]],
                answer: Vec::new(),
                words: Vec::new(),
            },
            EditEntry {
                id: "b".into(),
                knowledge_id: "b".into(),
                prompt: "Z is in".into(),
                target: "W".into(),
                subject: None,
                allocation: vec![vec![2, 3], vec![1, 0]],
                answer: Vec::new(),
                words: Vec::new(),
            },
        ];
        let bytes = to_jsonl(&entries).unwrap();
        assert_eq!(from_jsonl(&bytes).unwrap(), entries);
        assert_eq!(
            expert_usage(&entries, 2, 4),
            vec![vec![1, 0, 2, 1], vec![1, 2, 0, 1]]
        );
        assert!(from_jsonl(b"{\"id\": 3}\n").is_err());
    }
}
