//! Relation words (`relation_words`): which of an edited subject's edits a prompt asks about, from
//! the words it shares with each edit's prompt outside the subject, each word weighted by how rare
//! it is among the stream's edit prompts.
//!
//! Why: the frozen relation key picks a rephrasing's own edit among its subject's edits for about
//! 70% of science's rephrasings at T = 1000 ("Zinc has the atomic number" against Zinc's symbol,
//! block, discoverer ... edits), and every signal of the frozen model measured stayed near that
//! (BENCHMARKS.md). A paraphrase usually keeps the words that name the relation ("atomic number",
//! "crystal", "discovered"), which no representation of a 135M model weighs as sharply as a word
//! match does. Only edit prompts and the query itself are read: no rephrasing or probe.

use std::collections::HashMap;
use std::ops::Range;

/// A token that is no word (punctuation, whitespace, special tokens).
pub const NO_WORD: u32 = u32::MAX;

/// A word in at least one in this many of the generic sentences is a common English word ("the",
/// "of", "was", "in"): it names no relation, and counts for nothing.
const COMMON_IN_ONE_OF: usize = 40;

/// Characters a word keeps: a cut-off stem, so "crystal" / "crystals" / "crystallizes" and
/// "discovered" / "discovery" are one word (the tokenizer already splits most inflections off).
const STEM_CHARS: usize = 5;

/// Each token's word: its text's letters and digits, lowercased and cut to [`STEM_CHARS`], as a
/// small integer (equal words, equal integers). Derived from a tokenizer's vocabulary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WordMap {
    of_token: Vec<u32>,
}

impl WordMap {
    /// The map of a vocabulary of `size` tokens whose texts `text` gives (`None`: no text).
    pub fn from_vocab(size: usize, text: impl Fn(u32) -> Option<String>) -> Self {
        let mut ids: HashMap<String, u32> = HashMap::new();
        let of_token = (0..size as u32)
            .map(|t| {
                let stem: String = text(t)
                    .unwrap_or_default()
                    .chars()
                    .filter(|c| c.is_alphanumeric())
                    .flat_map(char::to_lowercase)
                    .take(STEM_CHARS)
                    .collect();
                if stem.is_empty() {
                    return NO_WORD;
                }
                let next = ids.len() as u32;
                *ids.entry(stem).or_insert(next)
            })
            .collect();
        WordMap { of_token }
    }

    /// The map with the words of `framing` (the engine's own question framings: they name no
    /// relation) and the common words of `generic` (in at least one in [`COMMON_IN_ONE_OF`] of
    /// its texts) made no words.
    pub fn without_common(mut self, generic: &[Vec<u32>], framing: &[Vec<u32>]) -> Self {
        let mut texts_with: HashMap<u32, usize> = HashMap::new();
        for text in generic {
            for w in self.words(text, 0..0) {
                *texts_with.entry(w).or_insert(0) += 1;
            }
        }
        let mut dropped: std::collections::HashSet<u32> = texts_with
            .into_iter()
            .filter(|&(_, n)| n * COMMON_IN_ONE_OF >= generic.len())
            .map(|(w, _)| w)
            .collect();
        for text in framing {
            dropped.extend(self.words(text, 0..0));
        }
        for w in &mut self.of_token {
            if dropped.contains(w) {
                *w = NO_WORD;
            }
        }
        self
    }

    /// The distinct words of `tokens` outside `skip` (the subject's rows), sorted. Tokens past
    /// the vocabulary are no words.
    pub fn words(&self, tokens: &[u32], skip: Range<usize>) -> Vec<u32> {
        let mut words: Vec<u32> = tokens
            .iter()
            .enumerate()
            .filter(|(p, _)| !skip.contains(p))
            .filter_map(|(_, &t)| self.of_token.get(t as usize).copied())
            .filter(|&w| w != NO_WORD)
            .collect();
        words.sort_unstable();
        words.dedup();
        words
    }
}

/// The words of every applied edit's prompt (outside its subject) and how rare each word is
/// among them: derived from the edit memory, never stored.
#[derive(Debug, Clone, Default)]
pub struct RelationWords {
    /// The weight of a word similarity against the relation key's (`relation_words`).
    pub weight: f32,
    /// Each edit's words, sorted.
    of_edit: Vec<Vec<u32>>,
    /// How many edits' prompts hold each word.
    prompts_with: HashMap<u32, u32>,
}

impl RelationWords {
    pub fn new(weight: f32, of_edit: Vec<Vec<u32>>) -> Self {
        let mut prompts_with = HashMap::new();
        for words in &of_edit {
            for &w in words {
                *prompts_with.entry(w).or_insert(0) += 1;
            }
        }
        RelationWords {
            weight,
            of_edit,
            prompts_with,
        }
    }

    /// Inverse document frequency: a word in every edit prompt ("The", "of", "is") weighs little,
    /// one that names a single relation much; a word no edit prompt holds weighs most (it only
    /// scales a query's norm, the same for every candidate).
    fn weight(&self, word: u32) -> f32 {
        let n = self.of_edit.len() as f32;
        let with = self.prompts_with.get(&word).copied().unwrap_or(0) as f32;
        ((n + 1.0) / (with + 0.5)).ln()
    }

    /// How much of the query's words (sorted, as [`WordMap::words`] gives them) edit `entry`'s
    /// prompt shares: the cosine of the two word sets, each word weighted by its [`Self::weight`]
    /// (0 when either has no word, or the edit is unknown).
    pub fn similarity(&self, entry: usize, query: &[u32]) -> f32 {
        let Some(edit) = self.of_edit.get(entry) else {
            return 0.0;
        };
        let norm = |words: &[u32]| -> f32 {
            words
                .iter()
                .map(|&w| self.weight(w).powi(2))
                .sum::<f32>()
                .sqrt()
        };
        let shared: f32 = query
            .iter()
            .filter(|w| edit.binary_search(w).is_ok())
            .map(|&w| self.weight(w).powi(2))
            .sum();
        let denominator = norm(query) * norm(edit);
        if denominator > 0.0 {
            shared / denominator
        } else {
            0.0
        }
    }

    pub fn len(&self) -> usize {
        self.of_edit.len()
    }

    pub fn is_empty(&self) -> bool {
        self.of_edit.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy vocabulary: token i's text is VOCAB[i].
    const VOCAB: [&str; 12] = [
        "<s>",
        " The",
        " atomic",
        " number",
        " of",
        " Zinc",
        " is",
        " crystal",
        " crystals",
        " has",
        "?",
        " symbol",
    ];

    fn map() -> WordMap {
        WordMap::from_vocab(VOCAB.len(), |t| {
            (t != 0).then(|| VOCAB[t as usize].to_string())
        })
    }

    #[test]
    fn words_are_lowercase_stems_outside_the_subject() {
        let m = map();
        // "The atomic number of Zinc is": the subject (row 5) and "?" are no words.
        let w = m.words(&[1, 2, 3, 4, 5, 6, 10], 4..5);
        assert_eq!(w.len(), 5);
        assert!(!w.contains(&m.of_token[5]));
        assert_eq!(m.of_token[10], NO_WORD);
        assert_eq!(m.of_token[0], NO_WORD);
        // "crystal" and "crystals" share a stem; "symbol" differs from both.
        assert_eq!(m.of_token[7], m.of_token[8]);
        assert_ne!(m.of_token[7], m.of_token[11]);
        // Tokens past the vocabulary are skipped, not a panic.
        assert!(m.words(&[1000], 0..0).is_empty());
    }

    #[test]
    fn common_and_framing_words_are_no_words() {
        // " The" and " of" are in every generic text, " is" in one of 80 (not common); " has"
        // frames a question.
        let mut generic = vec![vec![1, 4, 6]];
        generic.extend(std::iter::repeat_n(vec![1, 4], 79));
        let m = map().without_common(&generic, &[vec![9, 10]]);
        assert_eq!(m.words(&[1, 4, 9, 10], 0..0), Vec::<u32>::new());
        assert_eq!(
            m.words(&[1, 2, 6], 0..0).len(),
            2,
            "atomic and is stay words"
        );
        // A second generic text with " is" makes it common (2 in 80 is 1 in 40).
        generic[1] = vec![1, 4, 6];
        let m = map().without_common(&generic, &[]);
        assert_eq!(m.words(&[1, 2, 6], 0..0).len(), 1);
    }

    #[test]
    fn a_rare_shared_word_outweighs_common_ones() {
        let m = map();
        let w = |tokens: &[u32]| m.words(tokens, 0..0);
        // Three edit prompts: "The atomic number of is", "The crystal of is", "The symbol of is".
        let words = RelationWords::new(
            1.0,
            vec![w(&[1, 2, 3, 4, 6]), w(&[1, 7, 4, 6]), w(&[1, 11, 4, 6])],
        );
        // "has the atomic number": shares the rare "atomic" and "number" with edit 0 only.
        let q = w(&[9, 1, 2, 3]);
        let s: Vec<f32> = (0..3).map(|e| words.similarity(e, &q)).collect();
        assert!(s[0] > s[1] && s[0] > s[2], "{s:?}");
        assert!((s[1] - s[2]).abs() < 1e-6, "{s:?}");
        // "crystals": edit 1, through the stem.
        let q = w(&[8, 6]);
        let s: Vec<f32> = (0..3).map(|e| words.similarity(e, &q)).collect();
        assert!(s[1] > s[0] && s[1] > s[2], "{s:?}");
        // Identical word sets score 1; nothing shared or an unknown edit scores 0.
        assert!((words.similarity(0, &w(&[1, 2, 3, 4, 6])) - 1.0).abs() < 1e-6);
        assert_eq!(words.similarity(0, &w(&[9])), 0.0);
        assert_eq!(words.similarity(7, &q), 0.0);
    }
}
