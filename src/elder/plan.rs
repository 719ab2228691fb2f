//! What an edit batch trains on under the stored allocation (`inference_allocation = "stored"`),
//! made from the edit's own prompt, the prompts of the edits already in the state and the shipped
//! background text, never from a record's rephrasings or locality probes:
//!
//! - the allocation: the experts the edit trains and, at inference, is answered with;
//! - prefixed copies: the prompt after a background sentence (`augment_prefixes`), so the experts
//!   learn more than one surface form;
//! - negatives (`negatives`): the edit's subject in other edits' templates, other edits' subjects
//!   in its template, and the start of background sentences, each trained to keep the base
//!   model's answer, so the experts change this fact and nothing near it;
//! - replays (`replay`): earlier edits that share an expert with the batch, trained again;
//! - the texts its keys are read from (see [`super::keystore`]).

use std::ops::Range;

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::background::{background_prefix, background_sentences};
use crate::model::tokenizer::Tokenizer;
use crate::util::stable_hash;

use super::config::{AllocationMode, ElderConfig, KeyKind, QUESTION_FRAMES};
use super::memory::{expert_usage, EditEntry};
use super::trainer::preset_allocation;

/// One tokenized sequence with the position of its key row.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyText {
    pub tokens: Vec<u32>,
    pub key_row: usize,
    /// The rows of the subject it mentions (empty when it mentions none): left out of a
    /// `context` relation key.
    pub subject_rows: Range<usize>,
}

/// Everything one edit of a batch trains on. Every prompt carries the row of the subject it
/// mentions (its last token; the last prompt token when it has none), where experts apply under
/// `expert_rows = "subject"`.
#[derive(Debug, Clone, PartialEq)]
pub struct EditPlan {
    /// What the state will remember (its allocation filled in).
    pub entry: EditEntry,
    pub prompt: KeyText,
    pub target: Vec<u32>,
    /// Prompts of the prefixed copies (each continued with `target`).
    pub augmented: Vec<KeyText>,
    /// Prompts whose base answers must stay.
    pub negatives: Vec<KeyText>,
    /// The texts its keys are read from, `variants` of them.
    pub key_texts: Vec<KeyText>,
    /// Whether its experts are new (allocation `fresh`): they start from their initial values.
    pub fresh_experts: bool,
}

/// An earlier edit trained again with the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Replay {
    pub prompt: KeyText,
    pub target: Vec<u32>,
    pub allocation: Vec<Vec<u32>>,
}

/// Words that start a prompt without being its subject.
const LEADING_WORDS: &[&str] = &[
    "The", "A", "An", "What", "Which", "Who", "Whom", "Where", "When", "How", "In", "On", "At",
    "Is", "Are", "Was", "Does", "Do", "Did", "It", "This", "That", "Most",
];

/// The subject an edit's key is read at: `given` when the prompt contains it, else the last run of
/// capitalised words of the prompt (not counting a leading function word such as "The").
pub fn find_subject(prompt: &str, given: Option<&str>) -> Option<String> {
    if let Some(s) = given
        .map(str::trim)
        .filter(|s| !s.is_empty() && prompt.contains(*s))
    {
        return Some(s.to_string());
    }
    let words: Vec<&str> = prompt.split_whitespace().collect();
    let capital = |w: &str| w.chars().next().is_some_and(char::is_uppercase);
    let ends_clause = |w: &str| w.ends_with(['.', '?', '!', ',', ':', ';']);
    let sentence_start = |i: usize| i == 0 || words[i - 1].ends_with(['.', '?', '!']);
    let mut best: Option<(usize, usize)> = None;
    let mut i = 0;
    while i < words.len() {
        let function_word = sentence_start(i) && LEADING_WORDS.contains(&words[i]);
        if capital(words[i]) && !function_word {
            // A run of capitalised words, up to the end of its clause.
            let start = i;
            while i < words.len() && capital(words[i]) {
                i += 1;
                if ends_clause(words[i - 1]) {
                    break;
                }
            }
            best = Some((start, i));
        } else {
            i += 1;
        }
    }
    let (a, b) = best?;
    let run = words[a..b].join(" ");
    let run = run.trim_end_matches(|c: char| !c.is_alphanumeric());
    let run = run.strip_suffix("'s").unwrap_or(run).to_string();
    (!run.is_empty()).then_some(run)
}

/// The prompt split around the last occurrence of its subject: `(before, after)`.
fn template(prompt: &str, subject: &str) -> Option<(String, String)> {
    let at = prompt.rfind(subject)?;
    Some((
        prompt[..at].to_string(),
        prompt[at + subject.len()..].to_string(),
    ))
}

/// The allocation of a new edit under `cfg.allocation`: `top_k` experts per layer out of a pool of
/// `pool` per layer (`fresh`: the next `top_k` indices, which the trainer creates).
pub fn allocate(
    cfg: &ElderConfig,
    knowledge_id: &str,
    memory: &[EditEntry],
    pool: usize,
) -> Vec<Vec<u32>> {
    let (layers, k) = (cfg.molora_blocks.len(), cfg.top_k);
    match cfg.allocation {
        AllocationMode::Fresh => (0..layers)
            .map(|_| (pool as u32..(pool + k) as u32).collect())
            .collect(),
        AllocationMode::LeastUsed => expert_usage(memory, layers, pool)
            .into_iter()
            .map(|usage| {
                let mut order: Vec<u32> = (0..pool as u32).collect();
                order.sort_by_key(|&e| (usage[e as usize], e));
                order.truncate(k);
                order
            })
            .collect(),
        AllocationMode::KnowledgeSeed | AllocationMode::RouterFirstIteration => {
            preset_allocation(cfg, knowledge_id)
        }
    }
}

/// Up to `n` earlier edits (most recent first) that share an expert with `allocations`.
pub fn replays<'a>(
    memory: &'a [EditEntry],
    allocations: &[&[Vec<u32>]],
    n: usize,
) -> Vec<&'a EditEntry> {
    let shares = |e: &EditEntry| {
        allocations.iter().any(|a| {
            a.iter()
                .zip(&e.allocation)
                .any(|(x, y)| x.iter().any(|v| y.contains(v)))
        })
    };
    memory.iter().rev().filter(|e| shares(e)).take(n).collect()
}

/// Deterministic picks of up to `n` distinct items of `pool`, seeded by `seed`.
fn pick<T: Clone>(pool: &[T], n: usize, seed: u64) -> Vec<T> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut idx: Vec<usize> = (0..pool.len()).collect();
    let take = n.min(pool.len());
    for i in 0..take {
        let j = rng.gen_range(i..idx.len());
        idx.swap(i, j);
    }
    idx[..take].iter().map(|&i| pool[i].clone()).collect()
}

/// Whether `text` is the prompt of `edit` or of one of `others` (a negative must not be: that
/// prompt has an answer of its own now).
fn is_edit_prompt(text: &str, edit: &EditEntry, others: &[&EditEntry]) -> bool {
    text == edit.prompt || others.iter().any(|o| o.prompt == text)
}

/// Texts an edit is trained to leave alone, each with the subject it mentions: round robin over
/// (1) its subject in the templates of other edits, (2) other edits' subjects in its own template,
/// (3) the first words of background sentences (no subject). Texts that are some edit's prompt are
/// skipped (they have answers of their own now).
pub fn negative_texts(
    edit: &EditEntry,
    others: &[&EditEntry],
    n: usize,
) -> Vec<(String, Option<String>)> {
    if n == 0 {
        return Vec::new();
    }
    let seed = stable_hash(&edit.id);
    let is_prompt = |t: &str| is_edit_prompt(t, edit, others);
    let mut sources: Vec<Vec<(String, Option<String>)>> = Vec::new();
    let own = edit
        .subject
        .as_deref()
        .and_then(|s| template(&edit.prompt, s).map(|t| (s, t)));
    if let Some((subject, (before, after))) = &own {
        sources.push(pick(&subject_in_other_templates(edit, others), n, seed ^ 1));
        let mut subjects: Vec<&str> = others
            .iter()
            .filter_map(|o| o.subject.as_deref())
            .filter(|s| s != subject)
            .collect();
        subjects.sort();
        subjects.dedup();
        let moved: Vec<(String, Option<String>)> = subjects
            .iter()
            .map(|s| (format!("{before}{s}{after}"), Some(s.to_string())))
            .filter(|(t, _)| !is_prompt(t))
            .collect();
        sources.push(pick(&moved, n, seed ^ 2));
    }
    let sentences = background_sentences();
    let starts: Vec<(String, Option<String>)> = pick(&sentences, n, seed ^ 3)
        .iter()
        .map(|s| {
            let words: Vec<&str> = s.split_whitespace().collect();
            (
                words[..words.len().clamp(1, 3 + (seed as usize % 4))].join(" "),
                None,
            )
        })
        .collect();
    sources.push(starts);
    let mut out = Vec::with_capacity(n);
    let mut cursor = vec![0usize; sources.len()];
    while out.len() < n && cursor.iter().zip(&sources).any(|(c, s)| *c < s.len()) {
        for (c, s) in cursor.iter_mut().zip(&sources) {
            if out.len() < n && *c < s.len() {
                out.push(s[*c].clone());
                *c += 1;
            }
        }
    }
    out
}

/// The edit's subject in every other edit's template (each template once, in a fixed order),
/// leaving out texts that are some edit's prompt.
fn subject_in_other_templates(
    edit: &EditEntry,
    others: &[&EditEntry],
) -> Vec<(String, Option<String>)> {
    let Some(subject) = edit.subject.as_deref() else {
        return Vec::new();
    };
    let Some((before, after)) = template(&edit.prompt, subject) else {
        return Vec::new();
    };
    let mut templates: Vec<(String, String)> = others
        .iter()
        .filter_map(|o| template(&o.prompt, o.subject.as_deref()?))
        .filter(|(b, a)| !(*b == before && *a == after))
        .collect();
    templates.sort();
    templates.dedup();
    templates
        .iter()
        .map(|(b, a)| (format!("{b}{subject}{a}"), Some(subject.to_string())))
        .filter(|(t, _)| !is_edit_prompt(t, edit, others))
        .collect()
}

/// Up to `n` more texts of the edit's subject in other edits' templates, none of them already
/// in `taken` (the edit's other negatives): `subject_negatives`.
pub fn subject_negative_texts(
    edit: &EditEntry,
    others: &[&EditEntry],
    n: usize,
    taken: &[(String, Option<String>)],
) -> Vec<(String, Option<String>)> {
    if n == 0 {
        return Vec::new();
    }
    let fresh: Vec<(String, Option<String>)> = subject_in_other_templates(edit, others)
        .into_iter()
        .filter(|(t, _)| !taken.iter().any(|(u, _)| u == t))
        .collect();
    pick(&fresh, n, stable_hash(&edit.id) ^ 6)
}

/// The edit's prompt with one word of its template replaced, `n` times (each time another word,
/// while there are others): the words that can go are the template's words of at least four
/// letters (the subject never), the words that come in are the background text's, lower case,
/// capitalised like the word they replace. Texts that are some edit's prompt are skipped.
pub fn reworded_texts(
    edit: &EditEntry,
    others: &[&EditEntry],
    n: usize,
) -> Vec<(String, Option<String>)> {
    let Some(subject) = edit.subject.as_deref() else {
        return Vec::new();
    };
    let Some((before, after)) = template(&edit.prompt, subject) else {
        return Vec::new();
    };
    if n == 0 {
        return Vec::new();
    }
    let letters = |w: &str| w.trim_matches(|c: char| !c.is_alphabetic()).to_string();
    let is_content = |w: &str| {
        let core = letters(w);
        core.chars().count() >= 4 && core.chars().all(char::is_alphabetic)
    };
    let in_prompt: Vec<String> = edit
        .prompt
        .split_whitespace()
        .map(|w| letters(w).to_lowercase())
        .collect();
    let mut vocabulary: Vec<String> = background_sentences()
        .iter()
        .flat_map(|s| s.split_whitespace())
        .filter(|w| is_content(w))
        .map(|w| letters(w).to_lowercase())
        .filter(|w| !in_prompt.contains(w))
        .collect();
    vocabulary.sort();
    vocabulary.dedup();
    // (part, word index) of every word that may be replaced: part 0 before the subject, 1 after.
    let parts = [before.as_str(), after.as_str()];
    let slots: Vec<(usize, usize)> = parts
        .iter()
        .enumerate()
        .flat_map(|(p, text)| {
            text.split(' ')
                .enumerate()
                .filter(|(_, w)| is_content(w))
                .map(move |(i, _)| (p, i))
        })
        .collect();
    if slots.is_empty() || vocabulary.is_empty() {
        return Vec::new();
    }
    let seed = stable_hash(&edit.id) ^ 4;
    let order = pick(&slots, slots.len(), seed);
    let words = pick(&vocabulary, n, seed ^ 5);
    let is_prompt = |t: &str| is_edit_prompt(t, edit, others);
    let mut out = Vec::with_capacity(n);
    for (k, word) in words.iter().enumerate() {
        let (part, index) = order[k % order.len()];
        let mut pieces: Vec<Vec<String>> = parts
            .iter()
            .map(|t| t.split(' ').map(str::to_string).collect())
            .collect();
        let old = &pieces[part][index];
        let core = letters(old);
        let mut new = word.clone();
        if core.chars().next().is_some_and(char::is_uppercase) {
            new = new[..1].to_uppercase() + &new[1..];
        }
        pieces[part][index] = old.replacen(&core, &new, 1);
        let text = format!("{}{subject}{}", pieces[0].join(" "), pieces[1].join(" "));
        if !is_prompt(&text) {
            out.push((text, Some(subject.to_string())));
        }
    }
    out
}

/// The plan of one edit. `entry` carries the edit's fields (its allocation is decided here);
/// `memory` holds the edits already applied and `batch` the other edits of this batch.
pub fn plan_edit(
    cfg: &ElderConfig,
    tokenizer: &Tokenizer,
    max_positions: usize,
    mut entry: EditEntry,
    memory: &[EditEntry],
    batch: &[EditEntry],
    pool: usize,
) -> Result<EditPlan> {
    entry.subject = find_subject(&entry.prompt, entry.subject.as_deref());
    entry.allocation = allocate(cfg, &entry.knowledge_id, memory, pool);
    let target = tokenizer.encode_continuation(&format!(" {}", entry.target))?;
    let fits = |p: &KeyText| p.tokens.len() + target.len() <= max_positions;
    let subject = entry.subject.clone();
    let prompt = subject_text(tokenizer, &entry.prompt, subject.as_deref())?;
    let augmented = (0..cfg.augment_prefixes)
        .map(|n| {
            let text = format!("{} {}", background_prefix(&entry.id, n), entry.prompt);
            subject_text(tokenizer, &text, subject.as_deref())
        })
        .chain(
            QUESTION_FRAMES
                .iter()
                .take(cfg.augment_questions)
                .map(|frame| {
                    subject_text(
                        tokenizer,
                        &frame.replace("{}", &entry.prompt),
                        subject.as_deref(),
                    )
                }),
        )
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(fits)
        .collect();
    let others: Vec<&EditEntry> = memory
        .iter()
        .chain(batch.iter().filter(|b| b.id != entry.id))
        .collect();
    let frames = if cfg.frame_negatives {
        cfg.augment_questions
    } else {
        0
    };
    let mut negatives = negative_texts(&entry, &others, cfg.negatives);
    let more = subject_negative_texts(&entry, &others, cfg.subject_negatives, &negatives);
    negatives.extend(more);
    let negatives = negatives
        .into_iter()
        .chain(reworded_texts(&entry, &others, cfg.reworded_negatives))
        .enumerate()
        .map(|(i, (t, s))| {
            // Cycle: plain, then each framing in turn, like the edit's own copies.
            let framed = match i % (frames + 1) {
                0 => t,
                f => QUESTION_FRAMES[f - 1].replace("{}", &t),
            };
            subject_text(tokenizer, &framed, s.as_deref())
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|p| !p.tokens.is_empty() && p.tokens.len() + 2 <= max_positions)
        .collect();
    let key_texts = key_texts(cfg, tokenizer, &entry, max_positions)?;
    Ok(EditPlan {
        fresh_experts: cfg.allocation == AllocationMode::Fresh,
        entry,
        prompt,
        target,
        augmented,
        negatives,
        key_texts,
    })
}

/// `text` tokenized, with the row of `subject`'s last token in it (the last token when it has no
/// subject or does not contain it).
pub fn subject_text(tokenizer: &Tokenizer, text: &str, subject: Option<&str>) -> Result<KeyText> {
    let (tokens, span) = tokenizer
        .encode_with_subject_span(text, subject.unwrap_or(""))
        .with_context(|| format!("tokenizing {text:?}"))?;
    let key_row = span
        .as_ref()
        .map_or(tokens.len().saturating_sub(1), |s| s.end - 1);
    Ok(KeyText {
        tokens,
        key_row,
        subject_rows: span.unwrap_or(0..0),
    })
}

/// The texts an edit's keys are read from: the prompt, then with `key_variants` the prompt after a
/// background sentence and (subject keys) the bare subject.
pub fn key_texts(
    cfg: &ElderConfig,
    tokenizer: &Tokenizer,
    entry: &EditEntry,
    max_positions: usize,
) -> Result<Vec<KeyText>> {
    let subject = entry.subject.as_deref().unwrap_or("");
    let at_subject = |text: &str| -> Result<KeyText> {
        let (tokens, span) = tokenizer.encode_with_subject_span(text, subject)?;
        let last = tokens.len().saturating_sub(1);
        let key_row = match (cfg.key, &span) {
            (KeyKind::Subject, Some(s)) => s.end - 1,
            _ => last,
        };
        Ok(KeyText {
            tokens,
            key_row,
            subject_rows: span.unwrap_or(0..0),
        })
    };
    let mut out = vec![at_subject(&entry.prompt)?];
    if cfg.key_variants {
        // A sentence the augmentation does not use, so the key is not the trained copy's.
        let prefix = background_prefix(&entry.id, 97);
        out.push(at_subject(&format!("{prefix} {}", entry.prompt))?);
        if cfg.key == KeyKind::Subject {
            let bare = if subject.is_empty() {
                &entry.prompt
            } else {
                subject
            };
            let tokens = tokenizer.encode(bare)?;
            let key_row = tokens.len().saturating_sub(1);
            out.push(KeyText {
                subject_rows: 0..tokens.len(),
                tokens,
                key_row,
            });
        }
    }
    // The edit prompt itself was checked against the positions with its target; a variant
    // with a sentence before it can still be too long for a short-context model. It becomes a
    // copy of the prompt's key text instead (every edit keeps the store's number of keys).
    for k in 1..out.len() {
        if out[k].tokens.len() > max_positions {
            out[k] = out[0].clone();
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, prompt: &str, subject: Option<&str>) -> EditEntry {
        EditEntry {
            id: id.into(),
            knowledge_id: id.into(),
            prompt: prompt.into(),
            target: "x".into(),
            subject: subject.map(Into::into),
            allocation: Vec::new(),
            answer: Vec::new(),
            words: Vec::new(),
        }
    }

    #[test]
    fn subjects_are_found_with_or_without_the_field() {
        assert_eq!(
            find_subject("The capital of Ecuador is", Some("Ecuador")).as_deref(),
            Some("Ecuador")
        );
        assert_eq!(
            find_subject("The capital of New Zealand is", None).as_deref(),
            Some("New Zealand")
        );
        assert_eq!(
            find_subject("Bhopal is a city in", None).as_deref(),
            Some("Bhopal")
        );
        assert_eq!(
            find_subject("What is the capital of Peru? It is", None).as_deref(),
            Some("Peru")
        );
        assert_eq!(find_subject("the opposite of hot is", None), None);
        assert_eq!(
            find_subject("Belgium's capital city is", None).as_deref(),
            Some("Belgium")
        );
        // A given subject the prompt does not contain is not trusted.
        assert_eq!(
            find_subject("The capital of Chile is", Some("Peru")).as_deref(),
            Some("Chile")
        );
    }

    /// `subject_negatives`: the subject in further templates of other edits, none already
    /// among the negatives, none an edit's prompt, as many as there are templates left.
    #[test]
    fn subject_negatives_put_the_subject_in_the_templates_left() {
        let e = entry("e", "The capital of Peru is", Some("Peru"));
        let others = [
            entry("a", "Chile is a country in", Some("Chile")),
            entry("b", "The currency of Chile is the", Some("Chile")),
            entry("c", "The language of Chile is", Some("Chile")),
            entry("d", "Chile borders", Some("Chile")),
            entry("f", "Peru borders", Some("Peru")),
        ];
        let refs: Vec<&EditEntry> = others.iter().collect();
        let taken = negative_texts(&e, &refs, 2);
        let more = subject_negative_texts(&e, &refs, 10, &taken);
        let mut texts: Vec<&str> = more.iter().map(|(t, _)| t.as_str()).collect();
        texts.sort();
        let all = [
            "Peru is a country in",
            "The currency of Peru is the",
            "The language of Peru is",
        ];
        let taken_texts: Vec<&str> = taken.iter().map(|(t, _)| t.as_str()).collect();
        let mut want: Vec<&str> = all
            .iter()
            .copied()
            .filter(|t| !taken_texts.contains(t))
            .collect();
        want.sort();
        assert_eq!(texts, want, "taken: {taken_texts:?}");
        assert!(more.iter().all(|(_, s)| s.as_deref() == Some("Peru")));
        // "Peru borders" is an edit's prompt: never a negative.
        assert!(!texts.contains(&"Peru borders"));
        assert_eq!(
            more.len(),
            3 - taken_texts.iter().filter(|t| all.contains(t)).count()
        );
        assert_eq!(subject_negative_texts(&e, &refs, 1, &taken).len(), 1);
        assert!(subject_negative_texts(&e, &refs, 0, &taken).is_empty());
        assert_eq!(
            more,
            subject_negative_texts(&e, &refs, 10, &taken),
            "deterministic"
        );
    }

    #[test]
    fn negatives_swap_subjects_and_templates_and_skip_edited_prompts() {
        let e = entry("e", "The capital of Peru is", Some("Peru"));
        let a = entry("a", "Chile is a country in", Some("Chile"));
        let b = entry("b", "The capital of Chile is", Some("Chile"));
        let c = entry("c", "Peru is a country in", Some("Peru"));
        let texts = |negs: Vec<(String, Option<String>)>| -> Vec<String> {
            negs.into_iter().map(|(t, _)| t).collect()
        };
        let negs = texts(negative_texts(&e, &[&a, &b, &c], 6));
        // "Peru is a country in" is edit c's prompt and "The capital of Chile is" edit b's.
        assert!(
            !negs
                .iter()
                .any(|t| t == "Peru is a country in" || t == "The capital of Chile is"),
            "{negs:?}"
        );
        assert!(negs.len() >= 3, "{negs:?}");
        assert_eq!(
            negs,
            texts(negative_texts(&e, &[&a, &b, &c], 6)),
            "deterministic"
        );
        let d = entry("d", "Laos is a city in", Some("Laos"));
        let with_subjects = negative_texts(&e, &[&d], 3);
        assert!(
            with_subjects.contains(&("Peru is a city in".to_string(), Some("Peru".to_string())))
        );
        assert!(with_subjects.contains(&(
            "The capital of Laos is".to_string(),
            Some("Laos".to_string())
        )));
    }

    /// A reworded negative keeps the subject and every word but one of the template: a word of
    /// four letters or more becomes a background word (capitalised like it), never an edit's
    /// prompt.
    #[test]
    fn reworded_negatives_change_one_template_word_and_keep_the_subject() {
        let e = entry("e", "The atomic number of Zinc is", Some("Zinc"));
        let texts = reworded_texts(&e, &[], 4);
        assert_eq!(texts.len(), 4, "{texts:?}");
        let words: Vec<&str> = e.prompt.split(' ').collect();
        let mut replaced = std::collections::BTreeSet::new();
        for (text, subject) in &texts {
            assert_eq!(subject.as_deref(), Some("Zinc"));
            let new: Vec<&str> = text.split(' ').collect();
            assert_eq!(new.len(), words.len(), "{text}");
            let changed: Vec<usize> = (0..words.len()).filter(|&i| new[i] != words[i]).collect();
            assert_eq!(changed.len(), 1, "{text}");
            // Only "atomic" and "number" are long enough; the subject stays.
            assert!(changed[0] == 1 || changed[0] == 2, "{text}");
            assert!(new[changed[0]].chars().all(|c| c.is_lowercase()), "{text}");
            replaced.insert(changed[0]);
        }
        assert_eq!(replaced.len(), 2, "both words take turns: {texts:?}");
        assert_eq!(texts, reworded_texts(&e, &[], 4), "deterministic");
        let capital = entry("c", "Geochemists classify Zinc as", Some("Zinc"));
        for (text, _) in reworded_texts(&capital, &[], 6) {
            let first = text.split(' ').next().unwrap();
            assert!(first == "Geochemists" || first.chars().next().unwrap().is_uppercase());
            assert!(
                text.contains(" Zinc as") || text.ends_with("Zinc as"),
                "{text}"
            );
        }
        // Nothing to reword: no template word of four letters, or no subject.
        assert!(reworded_texts(&entry("s", "Zinc is", Some("Zinc")), &[], 3).is_empty());
        assert!(reworded_texts(&entry("n", "The capital of Peru is", None), &[], 3).is_empty());
        assert!(reworded_texts(&e, &[], 0).is_empty());
    }

    #[test]
    fn allocations_follow_the_mode_and_replays_share_experts() {
        use crate::model::{Arch, ModelConfig};
        let m = ModelConfig {
            arch: Arch::Llama,
            vocab_size: 10,
            hidden_size: 8,
            num_layers: 8,
            num_heads: 2,
            num_kv_heads: 2,
            head_dim: 4,
            intermediate_size: 16,
            max_positions: 16,
            norm_eps: 1e-5,
            rope_theta: 1e4,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_id: None,
        };
        let mut cfg = ElderConfig::preset_for(&m);
        cfg.molora_blocks = vec![6, 7];
        cfg.allocation = AllocationMode::Fresh;
        cfg.top_k = 1;
        assert_eq!(allocate(&cfg, "k", &[], 5), vec![vec![5], vec![5]]);
        cfg.allocation = AllocationMode::LeastUsed;
        cfg.top_k = 2;
        let mut used = entry("u", "p", None);
        used.allocation = vec![vec![0, 1], vec![0, 2]];
        assert_eq!(
            allocate(&cfg, "k", std::slice::from_ref(&used), 4),
            vec![vec![2, 3], vec![1, 3]]
        );
        let memory = vec![
            used.clone(),
            EditEntry {
                allocation: vec![vec![3, 2], vec![3, 1]],
                answer: Vec::new(),
                words: Vec::new(),
                ..used.clone()
            },
        ];
        let alloc = vec![vec![1, 3], vec![2, 1]];
        assert_eq!(replays(&memory, &[&alloc], 5).len(), 2);
        let alloc = vec![vec![2, 3], vec![3, 1]];
        assert_eq!(replays(&memory, &[&alloc], 5).len(), 1);
    }
    /// A key variant longer than the context (a background sentence before a long prompt) is
    /// replaced by the prompt's own key text: the store keeps its number of keys per edit.
    #[test]
    fn key_variants_beyond_the_context_fall_back_to_the_prompt() {
        use crate::model::tokenizer::Tokenizer;
        let tok = Tokenizer::gpt2().unwrap();
        let cfg = ElderConfig {
            key_variants: true,
            key: KeyKind::Subject,
            ..ElderConfig::default()
        };
        let e = entry("x", "The capital of Chile is", Some("Chile"));
        let roomy = key_texts(&cfg, &tok, &e, 1024).unwrap();
        assert_eq!(roomy.len(), 3);
        assert!(roomy[1].tokens.len() > roomy[0].tokens.len());
        let tight = key_texts(&cfg, &tok, &e, roomy[0].tokens.len()).unwrap();
        assert_eq!(tight.len(), 3);
        assert_eq!(tight[0], roomy[0]);
        assert_eq!(tight[1], roomy[0], "the prefixed prompt does not fit");
        assert_eq!(tight[2], roomy[2], "the bare subject fits");
    }
}
