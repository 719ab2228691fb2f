//! The generic text the engine ships (data/generic_text.txt, embedded in the binary): background
//! sentences that are never evaluation data. The key store centres its keys on their mean, the
//! trainer puts them before edit prompts (augmentation) and trains edits to keep their answers
//! (negatives).

use crate::util::stable_hash;

const GENERIC_TEXT: &str = include_str!("../../data/generic_text.txt");

/// The shipped background sentences, in file order (comments and blank lines skipped).
pub fn background_sentences() -> Vec<&'static str> {
    GENERIC_TEXT
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// The background sentence number `n` after the one `key` hashes to (wrapping): a fixed choice
/// per edit and purpose.
pub fn background_sentence(key: &str, n: usize) -> &'static str {
    let all = background_sentences();
    all[(stable_hash(key) as usize).wrapping_add(n) % all.len()]
}

/// A short unrelated prefix for an edit prompt: the first few words (3 to 7, by `key` and `n`)
/// of [`background_sentence`], closed with a period. Short, because every training sequence of a
/// batch is padded to the longest.
pub fn background_prefix(key: &str, n: usize) -> String {
    let words: Vec<&str> = background_sentence(key, n).split_whitespace().collect();
    let len = 3 + (stable_hash(key) as usize).wrapping_add(7 * n) % 5;
    let mut text = words[..len.min(words.len())].join(" ");
    let text_end = text.trim_end_matches(|c: char| !c.is_alphanumeric()).len();
    text.truncate(text_end);
    text.push('.');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_corpus_is_there_and_has_no_comments() {
        let s = background_sentences();
        assert!(s.len() > 150, "{}", s.len());
        assert!(s.iter().all(|l| !l.starts_with('#') && l.ends_with('.')));
        assert_eq!(
            background_sentence("a", 0),
            background_sentence("a", s.len())
        );
        for n in 0..20 {
            let p = background_prefix("edit-7", n);
            let words = p.split_whitespace().count();
            assert!((3..=7).contains(&words) && p.ends_with('.'), "{p:?}");
        }
    }
}
