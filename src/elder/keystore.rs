//! The key store (`deferral = "key_store"`): every applied edit leaves keys read from the frozen
//! model, and a prompt is in scope when one of its own keys is close enough to an edit's.
//!
//! Why: the paper's query (the last prompt token) encodes the prompt's template far more than its
//! subject, so a probe with an edit's template about another subject routes like the edit, and
//! the edit's rephrasings (other templates) do not (BENCHMARKS.md). A key read at the subject's
//! last token of an early block separates them; the key store keeps one per edit and compares.
//!
//! - A *key space* turns raw inputs of one MLP projection (`[width]` per token) into unit vectors:
//!   minus the mean of the shipped background text (position 0, the attention sink whose rows
//!   share one huge direction, has a mean of its own), optionally through a fixed random
//!   projection to `key_dim` dimensions, scaled to unit length. Similarity is the dot product.
//! - An edit stores `variants` keys: its prompt as given and, with `key_variants`, the prompt
//!   after a background sentence and (subject keys) the bare subject at the start of a text, so
//!   that a prompt whose subject is tokenized another way (a leading space or not) finds it.
//! - A prompt is matched at every position (subject keys) or by its one pooled key; an edit's
//!   score is its best key's best similarity. With a relation check, the edits within
//!   `relation_margin` of the best score are told apart by a second key read at
//!   `relation_block` (several edits can be about one subject): the last prompt token, or the
//!   mean of the prompt's rows outside its subject (`relation_key`); ties go to the newest edit.

use std::ops::Range;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use anyhow::{Context, Result};

use crate::backend::cpu::ops::gemm_strided;
use crate::model::layers::Site;
use crate::model::names::site_dims;

use super::capture::{SiteInputs, SiteReader};
use super::config::{Deferral, ElderConfig, KeyKind, RelationKey};
use super::molora::Elder;
use super::plan::KeyText;
use super::words::{RelationWords, WordMap};

/// Mean inputs of a key site over the background sentences, by position.
///
/// Why by position: the first rows of a text share large components of their own (position 0
/// is the attention sink; position 1 still carries much of it), so centring them on the mean of
/// later rows leaves a direction every early row shares, and an edit whose subject key sits at
/// position 1 then matches position 1 of any prompt ("In which country ..." matched the edit of
/// "Jinan is a city in" at " which" with 0.93). `key_position_means` gives the leading positions
/// their own means.
#[derive(Debug, Clone, PartialEq)]
pub struct Background {
    /// Mean of the first token's row.
    pub first: Vec<f32>,
    /// Means of positions 1, 2, ... (as many as `key_position_means - 1`).
    pub leading: Vec<Vec<f32>>,
    /// Mean of every later row.
    pub rest: Vec<f32>,
}

impl Background {
    /// From the inputs of a site for several texts, each `[len, width]`; the first `positions`
    /// positions (at least the first) get means of their own.
    pub fn from_rows(texts: &[Vec<f32>], width: usize, positions: usize) -> Self {
        let own = positions.max(1);
        // Accumulators: one per leading position, then the rest.
        let mut acc = vec![vec![0.0f64; width]; own + 1];
        let mut n = vec![0usize; own + 1];
        for rows in texts {
            for (pos, row) in rows.chunks(width).enumerate() {
                let slot = pos.min(own);
                for (a, &v) in acc[slot].iter_mut().zip(row) {
                    *a += v as f64;
                }
                n[slot] += 1;
            }
        }
        let mean =
            |acc: &[f64], n: usize| acc.iter().map(|a| (a / n.max(1) as f64) as f32).collect();
        let rest: Vec<f32> = mean(&acc[own], n[own]);
        // A leading position no background text reached is centred like the rest.
        let leading = (1..own)
            .map(|p| {
                if n[p] == 0 {
                    rest.clone()
                } else {
                    mean(&acc[p], n[p])
                }
            })
            .collect();
        Background {
            first: mean(&acc[0], n[0]),
            leading,
            rest,
        }
    }

    /// The means stacked `[M, width]` as [`Background::centre`] picks them (position 0, each
    /// leading position, then every later one: row `min(pos, M - 1)`), and `M`; the GPU's
    /// `key_embed` reads them so.
    pub fn stacked(&self) -> (Vec<f32>, usize) {
        let mut m = self.first.clone();
        for l in &self.leading {
            m.extend_from_slice(l);
        }
        m.extend_from_slice(&self.rest);
        (m, 2 + self.leading.len())
    }

    /// The mean a row at `pos` is centred on.
    pub fn centre(&self, pos: usize) -> &[f32] {
        match pos {
            0 => &self.first,
            p => self.leading.get(p - 1).unwrap_or(&self.rest),
        }
    }
}

/// How the raw inputs of one site become unit key vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct KeySpace {
    pub site: Site,
    pub width: usize,
    /// Subtract the background mean first (every kind but `last_token` and `prompt_mean`).
    pub centred: bool,
    pub background: Background,
    /// `[width, dim]` fixed random projection, or empty for none.
    projection: Vec<f32>,
    pub dim: usize,
}

impl KeySpace {
    /// A space for `site`'s inputs of `width`, projected to `key_dim` when it is not 0 (the
    /// projection is drawn from `seed`, so a state rebuilds the same one).
    pub fn new(
        site: Site,
        width: usize,
        centred: bool,
        background: Background,
        key_dim: usize,
        seed: u64,
    ) -> Self {
        let (projection, dim) = if key_dim == 0 || key_dim >= width {
            (Vec::new(), width)
        } else {
            // Entries uniform with variance 1/dim: dot products are kept on average.
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6b65_7973_7061_6365);
            let bound = (3.0 / key_dim as f32).sqrt();
            let p = (0..width * key_dim)
                .map(|_| rng.gen_range(-bound..bound))
                .collect();
            (p, key_dim)
        };
        KeySpace {
            site,
            width,
            centred,
            background,
            projection,
            dim,
        }
    }

    /// One raw row (at position `pos` of its text) as a unit key of `dim` values.
    pub fn embed(&self, row: &[f32], pos: usize) -> Vec<f32> {
        let centre = self.background.centre(pos);
        let c: Vec<f32> = if self.centred {
            row.iter().zip(centre).map(|(x, m)| x - m).collect()
        } else {
            row.to_vec()
        };
        let mut v = if self.projection.is_empty() {
            c
        } else {
            let mut out = vec![0.0f32; self.dim];
            gemm_strided(
                1,
                self.dim,
                self.width,
                &c,
                (self.width as isize, 1),
                &self.projection,
                (self.dim as isize, 1),
                &mut out,
                false,
            );
            out
        };
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 1e-12 {
            v.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }

    /// The unit keys `[len - from, dim]` of a text's rows `[len, width]` from position `from`
    /// on, each centred for its own position.
    pub fn embed_rows(&self, rows: &[f32], from: usize) -> Vec<f32> {
        rows.chunks(self.width)
            .enumerate()
            .skip(from)
            .flat_map(|(pos, row)| self.embed(row, pos))
            .collect()
    }
}

/// The one key of a text under the pooled kinds (the last token, or the mean of its rows).
pub fn pooled_key(space: &KeySpace, kind: KeyKind, rows: &[f32]) -> Vec<f32> {
    let w = space.width;
    let len = rows.len() / w;
    match kind {
        KeyKind::LastToken => space.embed(&rows[(len - 1) * w..], len - 1),
        // (A subject key of a whole text, if one were asked for, is its mean too.)
        KeyKind::PromptMean | KeyKind::MeanDecentered | KeyKind::Subject => {
            // The mean of a text is compared with the background's later rows.
            space.embed(&mean_of_rows(rows, w, 0..len), len.min(1))
        }
    }
}

/// The mean of the rows at `positions` of `rows` (`[len, width]`; at least one position).
fn mean_of_rows(
    rows: &[f32],
    width: usize,
    positions: impl ExactSizeIterator<Item = usize>,
) -> Vec<f32> {
    let n = positions.len() as f32;
    let mut mean = vec![0.0f32; width];
    for p in positions {
        mean.iter_mut()
            .zip(&rows[p * width..(p + 1) * width])
            .for_each(|(m, v)| *m += v / n);
    }
    mean
}

/// The least weight a context row keeps in a `weighted_context` key (a row that is generic text
/// still says a little; and a prompt made only of such rows still gets a key).
const MIN_ROW_WEIGHT: f32 = 0.02;

/// The relation keys of the edits (with `relation_check`): which of several edits about one
/// subject a prompt asks about.
#[derive(Debug, Clone, PartialEq)]
pub struct RelationKeys {
    pub kind: RelationKey,
    pub space: KeySpace,
    /// `[entries, dim]` unit rows.
    pub rows: Vec<f32>,
    /// Each edit's subject length in tokens (`context` keys: how many rows before a query's
    /// matched subject position are its subject too).
    pub subject_tokens: Vec<u32>,
    /// The background text's rows (positions 1 on) as unit vectors `[rows, dim]`, which
    /// `weighted_context` keys measure each row's ceiling against (empty for the other kinds).
    pub background: Derived<Vec<f32>>,
}

impl RelationKeys {
    pub fn new(kind: RelationKey, space: KeySpace) -> Self {
        RelationKeys {
            kind,
            space,
            rows: Vec::new(),
            subject_tokens: Vec::new(),
            background: Derived(Vec::new()),
        }
    }

    /// Whether this kind of key needs the background rows (see [`RelationKeys::background`]).
    pub fn needs_background(&self) -> bool {
        self.kind == RelationKey::WeightedContext
    }

    /// Keeps the background text's rows at the relation site (`[len, width]` per text) for the
    /// kinds that need them.
    pub fn set_background(&mut self, texts: &[&[f32]]) {
        if !self.needs_background() {
            return;
        }
        // Position 0, the attention sink, is never a context row.
        self.background = Derived(
            texts
                .iter()
                .flat_map(|rows| self.space.embed_rows(rows, 1))
                .collect(),
        );
    }

    /// The relation key of a text from its rows at the relation site `[len, width]`, its subject
    /// at `subject` (empty: none).
    pub fn key(&self, rows: &[f32], subject: Range<usize>) -> Vec<f32> {
        let w = self.space.width;
        let len = rows.len() / w;
        let last = len - 1;
        match self.kind {
            RelationKey::LastToken => self.space.embed(&rows[last * w..], last),
            RelationKey::Context => {
                // Position 0 is the attention sink, shared by every text; with nothing else left
                // (a bare subject), the last row stands in.
                let kept: Vec<usize> = (1..len).filter(|p| !subject.contains(p)).collect();
                if kept.is_empty() {
                    return self.space.embed(&rows[last * w..], last);
                }
                // A mean of later rows is centred like them.
                self.space
                    .embed(&mean_of_rows(rows, w, kept.into_iter()), 1)
            }
            RelationKey::WeightedContext => {
                let kept: Vec<usize> = (1..len).filter(|p| !subject.contains(p)).collect();
                if kept.is_empty() {
                    return self.space.embed(&rows[last * w..], last);
                }
                self.weighted_context(rows, &kept)
            }
        }
    }

    /// The `weighted_context` key of the rows at `kept`: their unit vectors weighted by one
    /// minus their ceiling on the background text (at least [`MIN_ROW_WEIGHT`]), summed, unit.
    fn weighted_context(&self, rows: &[f32], kept: &[usize]) -> Vec<f32> {
        let (w, d) = (self.space.width, self.space.dim);
        let units: Vec<f32> = kept
            .iter()
            .flat_map(|&p| self.space.embed(&rows[p * w..(p + 1) * w], p))
            .collect();
        let bg = &self.background.0;
        assert!(
            !bg.is_empty(),
            "weighted_context relation keys need the background rows (ensure_key_store first)"
        );
        let n_bg = bg.len() / d;
        // sims [kept, n_bg] = units . background^T
        let mut sims = vec![0.0f32; kept.len() * n_bg];
        gemm_strided(
            kept.len(),
            n_bg,
            d,
            &units,
            (d as isize, 1),
            bg,
            (1, d as isize),
            &mut sims,
            false,
        );
        let mut key = vec![0.0f32; d];
        for (unit, row_sims) in units.chunks(d).zip(sims.chunks(n_bg)) {
            let ceiling = row_sims.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let weight = (1.0 - ceiling).max(MIN_ROW_WEIGHT);
            key.iter_mut().zip(unit).for_each(|(k, u)| *k += weight * u);
        }
        let norm = key.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 1e-12 {
            key.iter_mut().for_each(|x| *x /= norm);
        }
        key
    }

    /// The subject rows of a query whose subject key of `entry` matched at `position`: as many
    /// rows, ending there, as that edit's subject has tokens.
    pub fn query_subject(&self, entry: usize, position: usize) -> Range<usize> {
        let n = self.subject_tokens.get(entry).copied().unwrap_or(1).max(1) as usize;
        (position + 1).saturating_sub(n)..position + 1
    }

    fn push(&mut self, key: &[f32], subject_tokens: usize) {
        self.rows.extend_from_slice(key);
        self.subject_tokens.push(subject_tokens as u32);
    }

    /// Edit `entry`'s relation similarity to a query's relation key.
    pub fn similarity(&self, entry: usize, query: &[f32]) -> f32 {
        let d = self.space.dim;
        self.rows[entry * d..(entry + 1) * d]
            .iter()
            .zip(query)
            .map(|(a, b)| a * b)
            .sum()
    }
}

/// The best edit for one prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeyMatch {
    pub entry: usize,
    /// The entry's key similarity (cosine); with subject groups, an edit of the best-scoring
    /// edit's subject has that edit's similarity (the subject matched that well).
    pub score: f32,
    /// The prompt's key (its position, for subject keys) that matched best.
    pub position: usize,
    /// The entry's relation-key similarity to the prompt's (with a relation check).
    pub relation: Option<f32>,
    /// The runner-up, when the relation key chose among several candidates: the one it ranked
    /// next, as a match of its own (with no runner-up).
    pub next: Option<RunnerUp>,
}

/// The candidate a relation key ranked second (see [`KeyMatch::next`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunnerUp {
    pub entry: usize,
    pub score: f32,
    pub position: usize,
    pub relation: f32,
}

impl KeyMatch {
    /// The first of a ranking ([`KeyStore::rank`]) with the second as its runner-up.
    pub fn first_of(ranked: &[KeyMatch]) -> Option<KeyMatch> {
        let mut best = *ranked.first()?;
        best.next = ranked.get(1).and_then(|r| {
            Some(RunnerUp {
                entry: r.entry,
                score: r.score,
                position: r.position,
                relation: r.relation?,
            })
        });
        Some(best)
    }

    /// The runner-up as a match of its own.
    pub fn runner_up(&self) -> Option<KeyMatch> {
        self.next.map(|r| KeyMatch {
            entry: r.entry,
            score: r.score,
            position: r.position,
            relation: Some(r.relation),
            next: None,
        })
    }
}

/// The keys of every applied edit, in the order the edits were applied.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyStore {
    pub kind: KeyKind,
    /// Keys per edit.
    pub variants: usize,
    /// Rows per key (`key_span`): a subject key is read at its subject's last `span` tokens
    /// and a query matches it where as many consecutive rows line up.
    pub span: usize,
    pub space: KeySpace,
    /// `[entries * variants * span, dim]` unit rows: each key's rows, its subject's last token
    /// first, then the tokens before it; rows before the start of a shorter subject are zero.
    pub keys: Vec<f32>,
    /// How many of each key's rows are read (`[entries * variants]`, derived from the keys: the
    /// rows that are not zero).
    pub key_rows: Vec<u8>,
    /// The relation keys (with `relation_check`).
    pub relation: Option<RelationKeys>,
    /// Each edit's impostor score: its best key similarity to an edit of another subject
    /// (`-inf` while there is none). Derived from the keys and the subjects, never stored;
    /// see [`KeyStore::update_impostors`].
    pub impostor: Vec<f32>,
    /// With `relation_by_subject`, each edit's subject group (the index of the first edit about
    /// its subject; empty when off): the relation key then chooses among every edit of the best
    /// edit's subject, not only those within `relation_margin` of its score. Derived from the
    /// subjects, never stored; see [`Elder::refresh_scope_calibration`].
    pub subject_group: Vec<u32>,
    /// With `relation_words`, every edit's prompt words and their weight in the relation choice
    /// (derived from the memory; see [`Elder::refresh_relation_words`]).
    pub words: Derived<Option<RelationWords>>,
    pub ceilings: KeyCeilings,
}

/// Keys that also match generic text (`key_ceiling_margin`): each key's *ceiling* is its best
/// similarity to any position of the shipped background text, and a key only counts where it
/// beats its ceiling by the margin.
///
/// Why: a subject read at the first positions of a text ("J|in|[an] is a city in") is mostly
/// the position, not the subject; such a key matched position 1 of every "In which country
/// is ...?" question (0.93) and drew 213 of the 377 rephrasings that went to a wrong edit at
/// T = 1000. Its ceiling on background text (0.70, against about 0.2 for a key in context)
/// gives it away without any evaluation prompt, and its own prompt still matches it (1.0).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyCeilings {
    /// How far above its ceiling a similarity must be (`None`: off, every key always counts).
    pub margin: Option<f32>,
    /// Each key's ceiling (empty when off).
    pub of_keys: Vec<f32>,
    /// The background text's rows as unit keys `[rows, dim]`, to measure new keys against.
    pub background: Derived<Vec<f32>>,
}

/// A similarity every key reaches on its own text (the same rows give 1 up to rounding).
const OWN_TEXT: f32 = 0.99;

impl KeyCeilings {
    pub fn off() -> Self {
        KeyCeilings::default()
    }

    pub fn is_on(&self) -> bool {
        self.margin.is_some()
    }

    /// Whether similarity `s` of key `key` counts.
    fn counts(&self, key: usize, s: f32) -> bool {
        match (self.margin, self.of_keys.get(key)) {
            // Never above OWN_TEXT: a key always matches the text it was read from.
            (Some(m), Some(&c)) => s >= (c + m).min(OWN_TEXT),
            _ => true,
        }
    }

    /// Records the ceilings of one edit's keys (`[variants * span, dim]`, `rows` read of each).
    /// A key of several rows is lined up with every run of as many consecutive background rows
    /// (the background texts are concatenated: a run across two texts is one more position).
    fn push_edit(&mut self, keys: &[f32], dim: usize, span: usize, rows: &[u8]) {
        if !self.is_on() {
            return;
        }
        assert!(
            !self.background.0.is_empty(),
            "key ceilings need the background keys (ensure_key_store first)"
        );
        let bg: Vec<&[f32]> = self.background.0.chunks(dim).collect();
        for (key, &n) in keys.chunks(span * dim).zip(rows) {
            let key_rows: Vec<&[f32]> = key.chunks(dim).take(n as usize).collect();
            let c = (key_rows.len().saturating_sub(1)..bg.len())
                .map(|p| span_similarity(&key_rows, |j| bg[p - j]))
                .fold(f32::NEG_INFINITY, f32::max);
            self.of_keys.push(c);
        }
    }
}

/// The similarity of a key's rows (its subject's last token first) to the rows `at(j)` lined up
/// with them (`at(0)` the last): the mean of their dot products.
fn span_similarity<'a>(key: &[&[f32]], at: impl Fn(usize) -> &'a [f32]) -> f32 {
    let sum: f32 = key
        .iter()
        .enumerate()
        .map(|(j, k)| k.iter().zip(at(j)).map(|(a, b)| a * b).sum::<f32>())
        .sum();
    sum / key.len() as f32
}

/// Each edit's subject group: the index of the first edit with its subject (its own index when
/// it has none).
fn subject_groups(subjects: &[Option<String>]) -> Vec<u32> {
    let mut first = std::collections::HashMap::new();
    subjects
        .iter()
        .enumerate()
        .map(|(i, s)| match s {
            Some(s) => *first.entry(s.as_str()).or_insert(i as u32),
            None => i as u32,
        })
        .collect()
}

/// How many rows of each key (`[keys * span, dim]`) are read: up to the first zero row.
pub fn rows_of_keys(keys: &[f32], dim: usize, span: usize) -> Vec<u8> {
    keys.chunks(span * dim)
        .map(|key| {
            key.chunks(dim)
                .take_while(|r| r.iter().any(|&x| x != 0.0))
                .count()
                .max(1) as u8
        })
        .collect()
}

/// A value derived from others and kept only to save work: it takes no part in equality (a
/// reloaded store that has not needed it yet equals the one that computed it).
#[derive(Debug, Clone, Default)]
pub struct Derived<T>(pub T);

impl<T> PartialEq for Derived<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Fewest impostor scores a calibrated threshold is read from (below it, the fixed floor).
const MIN_CALIBRATION_EDITS: usize = 8;

impl KeyStore {
    /// Keys per edit under `cfg`: the prompt, plus with `key_variants` the prefixed prompt and
    /// (subject keys) the bare subject.
    pub fn variants_for(cfg: &ElderConfig) -> usize {
        match (cfg.key_variants, cfg.key) {
            (false, _) => 1,
            (true, KeyKind::Subject) => 3,
            (true, _) => 2,
        }
    }

    /// An empty store of `variants` keys of `span` rows per edit.
    pub fn new(
        kind: KeyKind,
        variants: usize,
        span: usize,
        space: KeySpace,
        relation: Option<RelationKeys>,
        ceilings: KeyCeilings,
    ) -> Self {
        KeyStore {
            kind,
            variants,
            span,
            space,
            keys: Vec::new(),
            key_rows: Vec::new(),
            relation,
            impostor: Vec::new(),
            subject_group: Vec::new(),
            words: Derived(None),
            ceilings,
        }
    }

    /// Replaces every key (`[entries * variants * span, dim]`), as read from a state.
    pub fn set_keys(&mut self, keys: Vec<f32>) {
        self.key_rows = rows_of_keys(&keys, self.space.dim, self.span);
        self.keys = keys;
        self.impostor.clear();
    }

    pub fn len(&self) -> usize {
        self.keys.len() / (self.variants * self.span * self.space.dim).max(1)
    }

    /// Key `k`'s rows that are read (its subject's last token first).
    fn key(&self, k: usize) -> Vec<&[f32]> {
        let (d, span) = (self.space.dim, self.span);
        self.keys[k * span * d..(k + 1) * span * d]
            .chunks(d)
            .take(self.key_rows[k] as usize)
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A prompt's keys `[n, dim]` from its rows at the key site `[len, width]`: every position
    /// for subject keys, the pooled key otherwise.
    pub fn query_keys(&self, rows: &[f32]) -> Vec<f32> {
        match self.kind {
            KeyKind::Subject => self.space.embed_rows(rows, 0),
            kind => pooled_key(&self.space, kind, rows),
        }
    }

    /// Appends one edit's keys (`variants` unit rows of `dim`) and its relation key with its
    /// subject's length in tokens.
    pub fn push(&mut self, keys: &[f32], relation: Option<(&[f32], usize)>) {
        assert_eq!(
            keys.len(),
            self.variants * self.span * self.space.dim,
            "an edit needs {} keys of {} rows",
            self.variants,
            self.span
        );
        let rows = rows_of_keys(keys, self.space.dim, self.span);
        self.keys.extend_from_slice(keys);
        self.ceilings
            .push_edit(keys, self.space.dim, self.span, &rows);
        self.key_rows.extend(rows);
        if let (Some(keys), Some((key, subject_tokens))) = (&mut self.relation, relation) {
            keys.push(key, subject_tokens);
        }
    }

    /// Best similarity between any key of edit `a` and any key of edit `b`.
    /// Takes edit `entry` out of the store; the impostor scores are recomputed from scratch, so
    /// the store scores as if the edit had never joined it (`update_impostors` refills them).
    pub fn remove(&mut self, entry: usize) {
        let row = self.variants * self.span * self.space.dim;
        self.keys.drain(entry * row..(entry + 1) * row);
        self.key_rows
            .drain(entry * self.variants..(entry + 1) * self.variants);
        // Refilled with the impostor scores.
        self.subject_group.clear();
        if self.ceilings.is_on() {
            self.ceilings
                .of_keys
                .drain(entry * self.variants..(entry + 1) * self.variants);
        }
        if let Some(rel) = &mut self.relation {
            let d = rel.space.dim;
            if rel.rows.len() >= (entry + 1) * d {
                rel.rows.drain(entry * d..(entry + 1) * d);
            }
            if entry < rel.subject_tokens.len() {
                rel.subject_tokens.remove(entry);
            }
        }
        self.impostor.clear();
    }

    fn pair_score(&self, a: usize, b: usize) -> f32 {
        let v = self.variants;
        // A pair counts only where each key would count as a match of the other.
        let counts = |e: usize, v: usize, s: f32| self.ceilings.counts(e * self.variants + v, s);
        let mut best = f32::NEG_INFINITY;
        for i in 0..v {
            let x = self.key(a * v + i);
            for j in 0..v {
                let y = self.key(b * v + j);
                // Keys of different lengths are compared on the rows both have.
                let n = x.len().min(y.len());
                let s = span_similarity(&x[..n], |t| y[t]);
                if counts(a, i, s) && counts(b, j, s) {
                    best = best.max(s);
                }
            }
        }
        best
    }

    /// Takes `prefix`'s impostor scores when its keys and ceilings are this store's first ones
    /// (the caller checks that the edits' subjects agree too); [`KeyStore::update_impostors`]
    /// then scores only the edits after them. Anything else leaves the scores to be computed
    /// from scratch.
    pub fn adopt_impostors(&mut self, prefix: &KeyStore) {
        let n = prefix.impostor.len();
        let per_edit = self.variants * self.span * self.space.dim;
        let ceilings = if self.ceilings.is_on() {
            n * self.variants
        } else {
            0
        };
        let is_prefix = n == prefix.len()
            && n <= self.len()
            && self.impostor.is_empty()
            && prefix.variants == self.variants
            && prefix.span == self.span
            && prefix.space.dim == self.space.dim
            && prefix.keys[..] == self.keys[..n * per_edit]
            && prefix.ceilings.margin == self.ceilings.margin
            && prefix.ceilings.of_keys.len() == ceilings
            && self.ceilings.of_keys.len() >= ceilings
            && prefix.ceilings.of_keys[..] == self.ceilings.of_keys[..ceilings];
        if is_prefix {
            self.impostor.clone_from(&prefix.impostor);
        }
    }

    /// Brings the impostor scores up to date with the edits pushed since the last call, one
    /// edit at a time in order (so a reloaded store, replayed from its keys, gets the same
    /// scores bit for bit). `same_subject(a, b)`: edits `a` and `b` are about one subject.
    pub fn update_impostors(&mut self, same_subject: impl Fn(usize, usize) -> bool) {
        for n in self.impostor.len()..self.len() {
            self.impostor.push(f32::NEG_INFINITY);
            for f in 0..n {
                if same_subject(n, f) {
                    continue;
                }
                let s = self.pair_score(n, f);
                self.impostor[n] = self.impostor[n].max(s);
                self.impostor[f] = self.impostor[f].max(s);
            }
        }
    }

    /// The scope threshold: `floor`, or with `quantile > 0` (and enough edits with an
    /// impostor) the larger of `floor` and that quantile of the impostor scores.
    pub fn scope_threshold(&self, floor: f32, quantile: f32) -> f32 {
        if quantile <= 0.0 {
            return floor;
        }
        let mut scores: Vec<f32> = self
            .impostor
            .iter()
            .copied()
            .filter(|s| s.is_finite())
            .collect();
        if scores.len() < MIN_CALIBRATION_EDITS {
            return floor;
        }
        scores.sort_by(f32::total_cmp);
        let at = ((scores.len() - 1) as f32 * quantile).round() as usize;
        floor.max(scores[at])
    }

    /// Each edit's score for a prompt with keys `query` `[n, dim]`: its best key's best
    /// similarity to any of the prompt's keys.
    pub fn scores(&self, query: &[f32]) -> Vec<f32> {
        self.scores_at(query).into_iter().map(|(s, _)| s).collect()
    }

    /// [`KeyStore::scores`] with the index of the prompt's key that gave each score.
    pub fn scores_at(&self, query: &[f32]) -> Vec<(f32, usize)> {
        let dim = self.space.dim;
        let (n_query, n_rows) = (query.len() / dim, self.keys.len() / dim);
        if n_query == 0 || n_rows == 0 {
            return vec![(f32::NEG_INFINITY, 0); self.len()];
        }
        // sims [n_query, n_rows] = query [n_query, dim] . keys^T
        let mut sims = vec![0.0f32; n_query * n_rows];
        gemm_strided(
            n_query,
            n_rows,
            dim,
            query,
            (dim as isize, 1),
            &self.keys,
            (1, dim as isize),
            &mut sims,
            false,
        );
        let span = self.span;
        let mut best = vec![(f32::NEG_INFINITY, 0); self.len()];
        for pos in 0..n_query {
            for (k, &n) in self.key_rows.iter().enumerate() {
                let n = n as usize;
                // A key of n rows lines up with the query's rows pos - n + 1 ..= pos.
                if pos + 1 < n {
                    continue;
                }
                let sum: f32 = (0..n)
                    .map(|j| sims[(pos - j) * n_rows + k * span + j])
                    .sum();
                let s = sum / n as f32;
                let e = k / self.variants;
                if s > best[e].0 && self.ceilings.counts(k, s) {
                    best[e] = (s, pos);
                }
            }
        }
        best
    }

    /// The edit a prompt is most likely about (`None` with an empty store). With relation keys,
    /// the edits within `margin` of the best score are compared by relation similarity to the
    /// prompt's relation key, which `relation(entry, position)` reads given the best-scoring
    /// edit and the prompt position its key matched (`None`: no relation check).
    pub fn best_match(
        &self,
        query: &[f32],
        relation: impl FnOnce(&RelationKeys, usize, usize) -> Option<Vec<f32>>,
        margin: f32,
    ) -> Option<KeyMatch> {
        self.decide(self.scores_at(query), relation, margin)
    }

    /// [`KeyStore::best_match`] from each edit's `(score, position)` as [`KeyStore::scores_at`]
    /// gives them (`-inf`: nothing counted), computed here or by the GPU's key match: the first
    /// of [`KeyStore::rank`]'s candidates, with the second as its runner-up.
    pub fn decide(
        &self,
        at: Vec<(f32, usize)>,
        relation: impl FnOnce(&RelationKeys, usize, usize) -> Option<Vec<f32>>,
        margin: f32,
    ) -> Option<KeyMatch> {
        KeyMatch::first_of(&self.rank(at, relation, margin))
    }

    /// Every candidate edit for one prompt, best first (empty with an empty store): the edits
    /// within `margin` of the best score and, with subject groups, every edit of the best
    /// edit's subject that counts as a match at all, ranked by relation similarity when a
    /// relation key had something to decide (newest first among equals). Without a relation
    /// decision only the best edit is a candidate. No candidate has a runner-up of its own.
    pub fn rank(
        &self,
        at: Vec<(f32, usize)>,
        relation: impl FnOnce(&RelationKeys, usize, usize) -> Option<Vec<f32>>,
        margin: f32,
    ) -> Vec<KeyMatch> {
        self.rank_by(at, relation, |_| Vec::new(), margin)
    }

    /// [`KeyStore::rank`] with the relation words (`relation_words`) of the query outside the
    /// subject rows the best edit matched, as `query_words(rows)` gives them: each candidate's
    /// relation similarity gains the words' weight times their similarity to its prompt's words.
    pub fn rank_by(
        &self,
        at: Vec<(f32, usize)>,
        relation: impl FnOnce(&RelationKeys, usize, usize) -> Option<Vec<f32>>,
        query_words: impl FnOnce(Range<usize>) -> Vec<u32>,
        margin: f32,
    ) -> Vec<KeyMatch> {
        let scores: Vec<f32> = at.iter().map(|(s, _)| *s).collect();
        // The best edit (the newest among equals) and where its key matched.
        let mut top: Option<usize> = None;
        for (e, &s) in scores.iter().enumerate() {
            if s.is_finite() && top.is_none_or(|t| s >= scores[t]) {
                top = Some(e);
            }
        }
        let Some(top) = top else {
            return Vec::new();
        };
        let group = |e: usize| self.subject_group.get(e);
        let of_subject = |e: usize| group(top).is_some() && group(e) == group(top);
        let candidate =
            |e: usize, s: f32| s >= scores[top] - margin || (s.is_finite() && of_subject(e));
        // An edit of the best edit's subject is in scope as that subject is: by the best score.
        let scope_score = |e: usize| {
            if of_subject(e) {
                scores[top]
            } else {
                scores[e]
            }
        };
        // The relation key is read only where it has something to decide: when there is another
        // candidate (it costs a pass over the background rows for `weighted_context` keys).
        let contested = scores
            .iter()
            .enumerate()
            .any(|(e, &s)| e != top && candidate(e, s));
        let query_relation = self
            .relation
            .as_ref()
            .filter(|_| contested)
            .and_then(|keys| relation(keys, top, at[top].1).map(|q| (keys, q)));
        let words = match (&query_relation, &self.words.0) {
            (Some((keys, _)), Some(words)) => {
                Some((words, query_words(keys.query_subject(top, at[top].1))))
            }
            _ => None,
        };
        let relation_similarity = |keys: &RelationKeys, e: usize, q: &[f32]| {
            keys.similarity(e, q)
                + words
                    .as_ref()
                    .map_or(0.0, |(w, query)| w.weight * w.similarity(e, query))
        };
        let mut ranked: Vec<(usize, f32)> = scores
            .iter()
            .enumerate()
            .filter_map(|(e, &s)| match &query_relation {
                Some((keys, q)) if candidate(e, s) => Some((e, relation_similarity(keys, e, q))),
                None if s >= scores[top] => Some((e, s)),
                _ => None,
            })
            .collect();
        // Best first; among equals the newest edit (a later edit of the same fact replaces it).
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(b.0.cmp(&a.0)));
        if query_relation.is_none() {
            ranked.truncate(1);
        }
        ranked
            .into_iter()
            .map(|(entry, rank)| KeyMatch {
                entry,
                score: scope_score(entry),
                position: at[entry].1,
                relation: query_relation.as_ref().map(|_| rank),
                next: None,
            })
            .collect()
    }

    /// The best edit for a prompt from its rows at the key site `[len, width]` and, with relation
    /// keys, at the relation site: its keys are matched, then its relation key is read around
    /// the subject the best edit matched (see [`KeyStore::best_match`]).
    pub fn match_prompt(
        &self,
        key_rows: &[f32],
        relation_rows: Option<&[f32]>,
        margin: f32,
    ) -> Option<KeyMatch> {
        let scores = self.scores_at(&self.query_keys(key_rows));
        self.match_scores(scores, relation_rows, margin)
    }

    /// [`KeyStore::match_prompt`] from the prompt's scores (`scores_at`'s, or the GPU's).
    pub fn match_scores(
        &self,
        at: Vec<(f32, usize)>,
        relation_rows: Option<&[f32]>,
        margin: f32,
    ) -> Option<KeyMatch> {
        KeyMatch::first_of(&self.rank_scores(at, relation_rows, margin))
    }

    /// Every candidate for a prompt from its scores, best first ([`KeyStore::rank`] with the
    /// relation key read from the prompt's relation-site rows).
    pub fn rank_scores(
        &self,
        at: Vec<(f32, usize)>,
        relation_rows: Option<&[f32]>,
        margin: f32,
    ) -> Vec<KeyMatch> {
        self.rank_scores_with(at, relation_rows, None, margin)
    }

    /// [`KeyStore::rank_scores`] with the prompt's tokens and the map of their words, for the
    /// relation words (without them, or without `relation_words`, the key alone ranks).
    pub fn rank_scores_with(
        &self,
        at: Vec<(f32, usize)>,
        relation_rows: Option<&[f32]>,
        tokens: Option<(&WordMap, &[u32])>,
        margin: f32,
    ) -> Vec<KeyMatch> {
        self.rank_by(
            at,
            |keys, entry, position| {
                relation_rows.map(|rows| keys.key(rows, keys.query_subject(entry, position)))
            },
            |subject| tokens.map_or_else(Vec::new, |(map, t)| map.words(t, subject)),
            margin,
        )
    }
}

/// Edits whose key reads walk the blocks together in [`Elder::add_keys`]: a batch of the default
/// preset (8) and more, with what the walk keeps (each pass's activations and caches) small.
const EDITS_PER_WALK: usize = 16;

impl Elder {
    /// The key store's scope threshold under this config (see `scope_quantile`).
    pub fn scope_threshold(&self) -> f32 {
        match &self.key_store {
            Some(store) => store.scope_threshold(self.cfg.scope_threshold, self.cfg.scope_quantile),
            None => self.cfg.scope_threshold,
        }
    }

    /// Updates the key store's impostor scores after edits joined the key store and memory
    /// (a subject is compared case-insensitively; an edit without one differs from every other).
    pub fn refresh_scope_calibration(&mut self) {
        let subjects: Vec<Option<String>> = self
            .memory
            .iter()
            .map(|e| e.subject.as_ref().map(|s| s.to_lowercase()))
            .collect();
        let by_subject = self.cfg.relation_check && self.cfg.relation_by_subject;
        if let Some(store) = &mut self.key_store {
            store.subject_group = if by_subject {
                subject_groups(&subjects)
            } else {
                Vec::new()
            };
            store.update_impostors(|a, b| {
                matches!((subjects.get(a), subjects.get(b)), (Some(Some(x)), Some(Some(y))) if x == y)
            });
        }
        self.refresh_relation_words();
    }

    /// Rebuilds the key store's relation words from the memory's (`relation_words`; each
    /// entry's `words`, which the session derives): after edits join or leave, and once the
    /// session has derived the words of a reopened state.
    pub fn refresh_relation_words(&mut self) {
        let weight = self.cfg.relation_words;
        let Some(store) = &mut self.key_store else {
            return;
        };
        store.words = Derived((weight > 0.0).then(|| {
            RelationWords::new(
                weight,
                self.memory.iter().map(|e| e.words.clone()).collect(),
            )
        }));
    }

    /// Whether [`Elder::ensure_key_store`] has work to do: no key store yet, or key ceilings
    /// without the background keys (a store reloaded from a state).
    pub fn key_store_needs_background(&self) -> bool {
        self.cfg.deferral == Deferral::KeyStore
            && match &self.key_store {
                None => true,
                Some(s) => {
                    (s.ceilings.is_on() && s.ceilings.background.0.is_empty())
                        || s.relation
                            .as_ref()
                            .is_some_and(|r| r.needs_background() && r.background.0.is_empty())
                }
            }
    }

    /// Takes what `other`'s key store derived from the background text (the relation keys'
    /// background rows, the key ceilings' background keys) when this store lacks it and both
    /// stores were made with the same config: they depend only on the model and the shipped text.
    pub fn adopt_derived(&mut self, other: &Elder) {
        if self.cfg != other.cfg {
            return;
        }
        let (Some(mine), Some(theirs)) = (&mut self.key_store, &other.key_store) else {
            return;
        };
        if mine.ceilings.background.0.is_empty() {
            mine.ceilings
                .background
                .0
                .clone_from(&theirs.ceilings.background.0);
        }
        if let (Some(a), Some(b)) = (&mut mine.relation, &theirs.relation) {
            if a.background.0.is_empty() {
                a.background.0.clone_from(&b.background.0);
            }
        }
    }

    /// Whether matching a query needs what [`Elder::ensure_key_store`] derives from the background
    /// text (`weighted_context` relation keys of a reloaded store); key ceilings need it only to
    /// add keys.
    pub fn queries_need_background(&self) -> bool {
        self.key_store
            .as_ref()
            .and_then(|s| s.relation.as_ref())
            .is_some_and(|r| r.needs_background() && r.background.0.is_empty())
    }

    /// Creates the key store (`deferral = "key_store"`, once): its spaces are centred on the
    /// inputs of `background` (the shipped background sentences, tokenized). With key ceilings
    /// the background rows are also kept as keys (recomputed here for a reloaded store).
    pub fn ensure_key_store(
        &mut self,
        reader: &mut dyn SiteReader,
        background: &[Vec<u32>],
    ) -> Result<()> {
        if !self.key_store_needs_background() {
            return Ok(());
        }
        let sites = self.key_sites();
        let inputs = reader.site_inputs(background, &sites)?;
        let cfg = &self.cfg;
        let background_keys = |space: &KeySpace| -> Vec<f32> {
            inputs
                .iter()
                .flat_map(|m| space.embed_rows(&m[&sites[0]], 0))
                .collect()
        };
        let relation_rows = |site: Option<&Site>| -> Vec<&[f32]> {
            site.map(|s| inputs.iter().map(|m| m[s].as_slice()).collect())
                .unwrap_or_default()
        };
        if let Some(store) = &mut self.key_store {
            if store.ceilings.is_on() {
                store.ceilings.background = Derived(background_keys(&store.space));
            }
            if let Some(relation) = &mut store.relation {
                relation.set_background(&relation_rows(sites.get(1)));
            }
            return Ok(());
        }
        let space = |site: Site, key_dim: usize, centred: bool| -> Result<KeySpace> {
            let (width, _) = site_dims(reader.model_config(), site.proj)
                .with_context(|| format!("{:?} does not exist in this model", site.proj))?;
            let rows: Vec<Vec<f32>> = inputs.iter().map(|m| m[&site].clone()).collect();
            let bg = Background::from_rows(&rows, width, cfg.key_position_means);
            Ok(KeySpace::new(site, width, centred, bg, key_dim, cfg.seed))
        };
        let centred = !matches!(cfg.key, KeyKind::LastToken | KeyKind::PromptMean);
        let key_space = space(sites[0], cfg.key_dim, centred)?;
        let relation = match sites.get(1) {
            Some(&s) => {
                let mut keys = RelationKeys::new(cfg.relation_key, space(s, 0, true)?);
                keys.set_background(&relation_rows(Some(&s)));
                Some(keys)
            }
            None => None,
        };
        let ceilings = match cfg.key_ceiling_margin {
            Some(margin) => KeyCeilings {
                margin: Some(margin),
                background: Derived(background_keys(&key_space)),
                ..Default::default()
            },
            None => KeyCeilings::off(),
        };
        self.key_store = Some(KeyStore::new(
            cfg.key,
            KeyStore::variants_for(cfg),
            cfg.key_span,
            key_space,
            relation,
            ceilings,
        ));
        Ok(())
    }

    /// Rebuilds the key store from the memory of applied edits under the current config (the
    /// key options may have changed since the state was written). The experts do not depend on
    /// the keys, so this is what a stream run with these key options would have stored.
    pub fn rebuild_key_store(
        &mut self,
        reader: &mut dyn SiteReader,
        tokenizer: &crate::model::tokenizer::Tokenizer,
        background: &[Vec<u32>],
    ) -> Result<()> {
        self.key_store = None;
        self.ensure_key_store(reader, background)?;
        let max_positions = reader.model_config().max_positions;
        let texts = self
            .memory
            .iter()
            .map(|e| super::plan::key_texts(&self.cfg, tokenizer, e, max_positions))
            .collect::<Result<Vec<_>>>()?;
        self.add_keys(reader, texts.iter().map(Vec::as_slice))?;
        self.refresh_scope_calibration();
        Ok(())
    }

    /// Appends the keys of edits to the key store, each edit's from its key texts (its variants;
    /// the first also gives the relation key). Nothing to do without a key store.
    ///
    /// Only the prompt runs up to the relation site; the other variants (a prefixed prompt, the
    /// bare subject) stop at the key site, which is where most of a read's blocks went. Each
    /// edit is read on its own padded passes, so its keys are the same bits whichever edits share
    /// its batch (a product's rounding depends on its row count): a rebuild gives back a
    /// stream's keys. The passes of [`EDITS_PER_WALK`] edits walk the blocks together
    /// ([`SiteReader::site_inputs_grouped`]): on the CPU a block's weights are then read from
    /// memory once for all of them, not once per edit.
    pub fn add_keys<'a>(
        &mut self,
        reader: &mut dyn SiteReader,
        edits: impl Iterator<Item = &'a [KeyText]>,
    ) -> Result<()> {
        if self.cfg.deferral != Deferral::KeyStore {
            return Ok(());
        }
        let sites = self.key_sites();
        let store = self
            .key_store
            .as_mut()
            .context("the key store has no background yet (ensure_key_store first)")?;
        let edits: Vec<&[KeyText]> = edits.collect();
        for texts in &edits {
            anyhow::ensure!(
                texts.len() == store.variants,
                "an edit needs {} key texts, got {}",
                store.variants,
                texts.len()
            );
        }
        // Per edit two reads: its prompt up to the relation site, its other variants up to the
        // key site. The reads of up to EDITS_PER_WALK edits walk the blocks together.
        let tokens = |texts: &[KeyText]| -> Vec<Vec<u32>> {
            texts.iter().map(|t| t.tokens.clone()).collect()
        };
        let mut reads: Vec<Vec<SiteInputs>> = Vec::with_capacity(edits.len());
        for walk in edits.chunks(EDITS_PER_WALK) {
            // Per edit: its prompt, then its other variants.
            let texts: Vec<Vec<Vec<u32>>> = walk
                .iter()
                .flat_map(|texts| [tokens(&texts[..1]), tokens(&texts[1..])])
                .collect();
            let groups: Vec<(&[Vec<u32>], &[Site])> = texts
                .chunks(2)
                .flat_map(|edit| {
                    [
                        (edit[0].as_slice(), &sites[..]),
                        (edit[1].as_slice(), &sites[..1]),
                    ]
                })
                .collect();
            let mut read = reader.site_inputs_grouped(&groups)?.into_iter();
            while let (Some(mut inputs), Some(variants)) = (read.next(), read.next()) {
                inputs.extend(variants);
                reads.push(inputs);
            }
        }
        anyhow::ensure!(
            reads.len() == edits.len(),
            "{} key reads for {} edits",
            reads.len(),
            edits.len()
        );
        for (texts, inputs) in edits.into_iter().zip(reads) {
            let (w, dim, span) = (store.space.width, store.space.dim, store.span);
            let mut keys = Vec::with_capacity(store.variants * span * dim);
            for (text, input) in texts.iter().zip(&inputs) {
                let rows = &input[&sites[0]];
                match store.kind {
                    KeyKind::Subject => {
                        // The key row, then the subject's rows before it (zero past its start).
                        for j in 0..span {
                            let row = text.key_row.checked_sub(j);
                            match row.filter(|&r| j == 0 || text.subject_rows.contains(&r)) {
                                Some(r) => {
                                    keys.extend(store.space.embed(&rows[r * w..(r + 1) * w], r))
                                }
                                None => keys.extend(std::iter::repeat_n(0.0, dim)),
                            }
                        }
                    }
                    kind => keys.extend(pooled_key(&store.space, kind, rows)),
                }
            }
            // The relation key is the prompt's (the first text).
            let relation = match (sites.get(1), &store.relation) {
                (Some(site), Some(keys)) => {
                    let prompt = &texts[0];
                    let subject = &prompt.subject_rows;
                    Some((keys.key(&inputs[0][site], subject.clone()), subject.len()))
                }
                _ => None,
            };
            store.push(&keys, relation.as_ref().map(|(k, n)| (k.as_slice(), *n)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::MlpProj;

    /// A unit vector of the plane at `degrees`.
    fn unit(degrees: f32) -> [f32; 2] {
        [degrees.to_radians().cos(), degrees.to_radians().sin()]
    }

    /// A store of one-row subject keys in the plane with last-token relation keys: one edit per
    /// `(key angle, relation angle)`, in degrees.
    fn plane_store(edits: &[(f32, f32)]) -> KeyStore {
        let mut store = KeyStore::new(
            KeyKind::Subject,
            1,
            1,
            space(2, 0),
            Some(RelationKeys::new(RelationKey::LastToken, space(2, 0))),
            KeyCeilings::off(),
        );
        for &(key, relation) in edits {
            store.push(&unit(key), Some((&unit(relation), 1)));
        }
        store
    }

    fn space(width: usize, key_dim: usize) -> KeySpace {
        let site = Site {
            block: 0,
            proj: MlpProj::UpProj,
        };
        let bg = Background {
            first: vec![10.0; width],
            leading: Vec::new(),
            rest: vec![1.0; width],
        };
        KeySpace::new(site, width, true, bg, key_dim, 7)
    }

    #[test]
    fn keys_are_centred_per_position_and_unit() {
        let s = space(4, 0);
        let k = s.embed(&[2.0, 1.0, 1.0, 1.0], 1);
        assert_eq!(k, vec![1.0, 0.0, 0.0, 0.0]);
        let k0 = s.embed(&[10.0, 13.0, 10.0, 10.0], 0);
        assert_eq!(k0, vec![0.0, 1.0, 0.0, 0.0]);
        let p = space(64, 16);
        let v = p.embed(&(0..64).map(|i| (i as f32).sin()).collect::<Vec<_>>(), 3);
        assert_eq!(v.len(), 16);
        assert!((v.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-5);
    }

    /// Leading positions get means of their own; with one position the means are the first states' (position 0, then the rest).
    #[test]
    fn background_means_by_position() {
        // Two texts of width 2: rows are (pos, text) so every mean is easy to read.
        let texts = vec![
            vec![0.0, 0.0, 1.0, 10.0, 2.0, 20.0, 3.0, 30.0],
            vec![0.0, 2.0, 1.0, 12.0, 2.0, 22.0],
        ];
        let one = Background::from_rows(&texts, 2, 1);
        assert_eq!(one.first, vec![0.0, 1.0]);
        assert!(one.leading.is_empty());
        assert_eq!(one.rest, vec![1.8, 18.8]);
        let three = Background::from_rows(&texts, 2, 3);
        assert_eq!(three.leading, vec![vec![1.0, 11.0], vec![2.0, 21.0]]);
        assert_eq!(three.rest, vec![3.0, 30.0]);
        assert_eq!(three.centre(0), &[0.0, 1.0]);
        assert_eq!(three.centre(2), &[2.0, 21.0]);
        assert_eq!(three.centre(9), &[3.0, 30.0]);
    }

    #[test]
    fn the_best_position_and_variant_decide_and_the_relation_breaks_ties() {
        let s = space(3, 0);
        let rel = space(3, 0);
        let mut store = KeyStore::new(
            KeyKind::Subject,
            2,
            1,
            s.clone(),
            Some(RelationKeys::new(RelationKey::LastToken, rel.clone())),
            KeyCeilings::off(),
        );
        // Edit 0: key along x (variant 2 along y); edit 1: along x too (same subject), other relation.
        store.push(&[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], Some((&[1.0, 0.0, 0.0], 1)));
        store.push(&[1.0, 0.0, 0.0, 0.0, 0.0, 1.0], Some((&[0.0, 1.0, 0.0], 1)));
        assert_eq!(store.len(), 2);
        // A prompt whose second position lies along y matches edit 0's second variant exactly.
        let q = [0.0, 0.0, 1.0, 0.0, 1.0, 0.0];
        let scores = store.scores(&q);
        assert!((scores[0] - 1.0).abs() < 1e-6 && (scores[1] - 1.0).abs() < 1e-6);
        // Both match as well on the subject: the relation key picks.
        let along = |r: [f32; 3]| move |_: &RelationKeys, _, _| Some(r.to_vec());
        let m = store.best_match(&q, along([0.0, 1.0, 0.0]), 0.05).unwrap();
        assert_eq!(m.entry, 1);
        let m = store.best_match(&q, along([1.0, 0.0, 0.0]), 0.05).unwrap();
        assert_eq!(m.entry, 0);
        // The relation key is read given the best edit (the newest of equals) and its position.
        let mut seen = None;
        store.best_match(
            &q,
            |_, entry, position| {
                seen = Some((entry, position));
                None
            },
            0.05,
        );
        // (Edit 1's second variant, along z, matched the prompt's first position.)
        assert_eq!(seen, Some((1, 0)));
        // With no other edit within the margin the relation key is never read.
        let mut read = false;
        let q = [0.0, 1.0, 0.0];
        let m = store
            .best_match(
                &q,
                |_, _, _| {
                    read = true;
                    None
                },
                0.05,
            )
            .unwrap();
        assert_eq!((m.entry, m.relation, read), (0, None, false));
        // Without a relation key an exact tie goes to the newest edit.
        let plain = KeyStore {
            relation: None,
            ..store.clone()
        };
        assert_eq!(
            plain
                .best_match(&[1.0, 0.0, 0.0], |_, _, _| None, 0.05)
                .unwrap()
                .entry,
            1
        );
        let mut empty = plain;
        empty.set_keys(Vec::new());
        assert_eq!(
            empty.best_match(&[1.0, 0.0, 0.0], |_, _, _| None, 0.05),
            None
        );
    }

    /// With subject groups the relation key chooses among every matching edit of the best
    /// edit's subject, however far below the best its key scored; without them only the edits
    /// within the margin are candidates.
    #[test]
    fn subject_groups_give_the_relation_key_every_edit_of_the_subject() {
        // Edits 0 and 2 are about one subject; edit 2's key was read in another context (30
        // degrees off); edit 1 (another subject) is far off. Relation keys: edit 2's is the query's
        // (edit 1's is the one `away` asks for).
        let mut store = plane_store(&[(0.0, 90.0), (80.0, -90.0), (30.0, 0.0)]);
        let query = unit(0.0);
        let relation = |_: &RelationKeys, _, _| Some(unit(0.0).to_vec());
        assert_eq!(store.best_match(&query, relation, 0.05).unwrap().entry, 0);
        store.subject_group = subject_groups(&[
            Some("zinc".into()),
            Some("iron".into()),
            Some("zinc".into()),
        ]);
        assert_eq!(store.subject_group, vec![0, 1, 0]);
        let m = store.best_match(&query, relation, 0.05).unwrap();
        assert_eq!(m.entry, 2);
        // In scope as its subject is (the best score), with the subject's other edit runner-up.
        assert!((m.score - 1.0).abs() < 1e-6);
        let next = m.runner_up().unwrap();
        assert_eq!(next.entry, 0);
        assert!(next.relation.is_some_and(|r| r.abs() < 1e-6), "{next:?}");
        assert!((next.score - 1.0).abs() < 1e-6 && next.runner_up().is_none());
        // Edit 1 is not of the subject and not within the margin: never a candidate.
        let away = |_: &RelationKeys, _, _| Some(unit(-90.0).to_vec());
        assert_eq!(store.best_match(&query, away, 0.05).unwrap().entry, 2);
        assert_eq!(
            subject_groups(&[None, None, Some("a".into())]),
            vec![0, 1, 2]
        );
    }

    /// Relation words (`relation_words`) weigh in the relation choice: a query that shares a
    /// rare word with one edit's prompt picks it over the edit the relation key prefers, the
    /// words are read outside the subject rows the best key matched, and without words (no
    /// tokens, or weight 0) the key alone ranks as before.
    #[test]
    fn relation_words_outweigh_the_relation_key_where_they_are_shared() {
        // Three edits of one subject; the relation key prefers edit 2 (0 degrees), then edit 0.
        let mut store = plane_store(&[(0.0, 40.0), (20.0, 90.0), (10.0, 0.0)]);
        store.subject_group = subject_groups(&vec![Some("zinc".into()); 3]);
        // Token t's word is t (tokens 0..8); prompts: edit 0 "5 6", edit 1 "6 7", edit 2 "6".
        let map = crate::elder::words::WordMap::from_vocab(8, |t| Some(format!("w{t}")));
        let at = |w: &[u32]| map.words(w, 0..0);
        let words = |weight: f32| {
            Derived(Some(RelationWords::new(
                weight,
                vec![at(&[5, 6]), at(&[6, 7]), at(&[6])],
            )))
        };
        let query = unit(0.0);
        let relation = |_: &RelationKeys, _: usize, _: usize| Some(unit(0.0).to_vec());
        let order = |store: &KeyStore, tokens: Option<&[u32]>| -> Vec<usize> {
            store
                .rank_by(
                    store.scores_at(&query),
                    relation,
                    |subject| tokens.map_or_else(Vec::new, |t| map.words(t, subject)),
                    0.05,
                )
                .iter()
                .map(|m| m.entry)
                .collect()
        };
        assert_eq!(order(&store, Some(&[5, 3])), vec![2, 0, 1], "no words yet");
        store.words = words(2.0);
        // The query "5 3" (its key matched at row 0, a one-token subject: "5" is the subject).
        assert_eq!(order(&store, Some(&[5, 3])), vec![2, 0, 1]);
        // "3 5": "5" is outside the subject row (row 0) and only edit 0's prompt has it.
        assert_eq!(order(&store, Some(&[3, 5])), vec![0, 2, 1]);
        // "3 7": edit 1's word, enough at weight 2 to pass both relation keys.
        assert_eq!(order(&store, Some(&[3, 7])), vec![1, 2, 0]);
        // Without tokens, or at weight 0, the relation key alone.
        assert_eq!(order(&store, None), vec![2, 0, 1]);
        store.words = words(0.0);
        assert_eq!(order(&store, Some(&[3, 7])), vec![2, 0, 1]);
    }

    /// The ranking behind a match lists every candidate once, best relation first: the
    /// subject's edits however far below the best they scored, not another subject's edit
    /// outside the margin; its first, with the second as runner-up, is the match itself.
    #[test]
    fn the_ranking_lists_every_candidate_best_relation_first() {
        // Edits 0, 2 and 3 are about one subject (keys 0, 30 and 60 degrees off the query's);
        // edit 1, another subject, is 80 degrees off. Relation keys at 60, -90, 0 and 20 degrees.
        let mut store = plane_store(&[(0.0, 60.0), (80.0, -90.0), (30.0, 0.0), (60.0, 20.0)]);
        store.subject_group = subject_groups(&[
            Some("zinc".into()),
            Some("iron".into()),
            Some("zinc".into()),
            Some("zinc".into()),
        ]);
        let query = unit(0.0);
        let relation = |_: &RelationKeys, _, _| Some(unit(0.0).to_vec());
        let ranked = store.rank(store.scores_at(&query), relation, 0.05);
        let order: Vec<usize> = ranked.iter().map(|m| m.entry).collect();
        assert_eq!(order, vec![2, 3, 0]);
        for m in &ranked {
            // In scope as the subject is, each with its own relation similarity.
            assert!((m.score - 1.0).abs() < 1e-6, "{m:?}");
            assert!(m.next.is_none());
        }
        let rel: Vec<f32> = ranked.iter().map(|m| m.relation.unwrap()).collect();
        assert!(rel.windows(2).all(|w| w[0] > w[1]), "{rel:?}");
        let first = KeyMatch::first_of(&ranked).unwrap();
        assert_eq!(first, store.best_match(&query, relation, 0.05).unwrap());
        assert_eq!(first.runner_up().unwrap().entry, 3);
        // Uncontested (no subject groups, nothing within the margin): the best edit alone.
        store.subject_group.clear();
        let alone = store.rank(store.scores_at(&query), relation, 0.05);
        assert_eq!(alone.len(), 1);
        assert_eq!((alone[0].entry, alone[0].relation), (0, None));
        assert!(KeyMatch::first_of(&[]).is_none());
    }

    /// A context relation key is the centred mean of the rows outside position 0 and the subject
    /// (the last row when nothing else is left); a query's subject rows end where its key
    /// matched and are as many as the matched edit's subject has tokens.
    #[test]
    fn context_relation_keys_leave_out_the_subject_and_the_first_row() {
        let keys = RelationKeys::new(RelationKey::Context, space(3, 0));
        // Five rows of width 3; the background mean of later rows is 1 everywhere.
        let rows = [
            [100.0, 100.0, 100.0], // position 0: the sink, never read
            [3.0, 1.0, 1.0],
            [50.0, -50.0, 9.0], // the subject
            [51.0, 7.0, -3.0],  // the subject
            [1.0, 1.0, 5.0],
        ]
        .concat();
        // Kept: rows 1 and 4, mean (2, 1, 3), centred (1, 0, 2).
        let k = keys.key(&rows, 2..4);
        let n = 5f32.sqrt();
        assert!(
            (k[0] - 1.0 / n).abs() < 1e-6 && k[1].abs() < 1e-6 && (k[2] - 2.0 / n).abs() < 1e-6
        );
        // Without a subject every row but the first counts; a bare subject falls back to the last row.
        assert_ne!(keys.key(&rows, 0..0), k);
        let bare = keys.key(&rows[..6], 1..2);
        assert_eq!(bare, keys.space.embed(&rows[3..6], 1));
        let last = RelationKeys::new(RelationKey::LastToken, space(3, 0));
        assert_eq!(last.key(&rows, 2..4), last.space.embed(&rows[12..], 4));
        // Query subject rows from the matched edit's subject length.
        let mut keys = keys;
        keys.push(&[1.0, 0.0, 0.0], 3);
        keys.push(&[0.0, 1.0, 0.0], 1);
        assert_eq!(keys.query_subject(0, 5), 3..6);
        assert_eq!(keys.query_subject(0, 1), 0..2);
        assert_eq!(keys.query_subject(1, 4), 4..5);
        assert!((keys.similarity(1, &[0.0, 0.5, 0.0]) - 0.5).abs() < 1e-6);
    }

    /// A weighted context key keeps the rows unlike the background text and nearly drops the
    /// rows the background text already has (a question's generic framing).
    #[test]
    fn weighted_context_keys_drop_rows_like_the_background() {
        let mut keys = RelationKeys::new(RelationKey::WeightedContext, space(3, 0));
        assert!(keys.needs_background());
        // Background rows (centred on 1) along x; position 0 is never kept.
        let background = [[9.0, 9.0, 9.0], [4.0, 1.0, 1.0], [3.0, 1.0, 1.0]].concat();
        keys.set_background(&[&background]);
        assert_eq!(keys.background.0, vec![1.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
        // Rows 1 (x: generic), 2 (the subject) and 3 (y: the relation's own word).
        let rows = [
            [100.0, 100.0, 100.0],
            [5.0, 1.0, 1.0],
            [1.0, 1.0, 9.0],
            [1.0, 3.0, 1.0],
        ]
        .concat();
        let k = keys.key(&rows, 2..3);
        // x weighs MIN_ROW_WEIGHT, y weighs 1 (its ceiling is 0).
        let n = (1.0 + MIN_ROW_WEIGHT * MIN_ROW_WEIGHT).sqrt();
        assert!((k[0] - MIN_ROW_WEIGHT / n).abs() < 1e-6, "{k:?}");
        assert!((k[1] - 1.0 / n).abs() < 1e-6 && k[2].abs() < 1e-6, "{k:?}");
        // The plain context key (the centred mean of the raw rows, (2, 1, 0)) is mostly x.
        let plain = RelationKeys::new(RelationKey::Context, space(3, 0)).key(&rows, 2..3);
        assert!(plain[0] > 0.85 && plain[1] < 0.5, "{plain:?}");
        // The other kinds keep no background.
        let mut last = RelationKeys::new(RelationKey::LastToken, space(3, 0));
        last.set_background(&[&background]);
        assert!(last.background.0.is_empty());
    }

    /// A key counts only where it beats its ceiling (its best match on background text) by the
    /// margin: a hub key still matches its own text, not a weaker look-alike; impostor pairs
    /// follow the same rule.
    #[test]
    fn keys_count_only_above_their_ceiling() {
        let mut store = KeyStore::new(
            KeyKind::Subject,
            1,
            1,
            space(2, 0),
            None,
            KeyCeilings {
                margin: Some(0.1),
                // One background row, along x.
                background: Derived(vec![1.0, 0.0]),
                ..Default::default()
            },
        );
        let unit = |a: f32| [a.to_radians().cos(), a.to_radians().sin()];
        // Edit 0 near the background (ceiling cos 30 = 0.866), edit 1 far from it (cos 80).
        store.push(&unit(30.0), None);
        store.push(&unit(80.0), None);
        let c = &store.ceilings.of_keys;
        assert!(
            (c[0] - 0.866).abs() < 1e-3 && (c[1] - 0.174).abs() < 1e-3,
            "{c:?}"
        );
        // Its own text: both count. At 20 degrees (cos 0.94 < 0.866 + 0.1) edit 0 does not.
        let own = store.scores(&unit(30.0));
        assert!((own[0] - 1.0).abs() < 1e-6);
        let near = store.scores(&[unit(50.0), unit(60.0)].concat());
        assert_eq!(near[0], f32::NEG_INFINITY);
        assert!((near[1] - 20f32.to_radians().cos()).abs() < 1e-6);
        // The pair (cos 50 = 0.64) is below edit 0's bar: no impostor score for either.
        store.update_impostors(|a, b| a == b);
        assert_eq!(store.impostor, vec![f32::NEG_INFINITY; 2]);
        let off = KeyStore {
            ceilings: KeyCeilings::off(),
            ..store.clone()
        };
        assert!((off.scores(&unit(50.0))[0] - 20f32.to_radians().cos()).abs() < 1e-6);
    }

    /// A key of two rows (a subject's last two tokens) scores the mean of both rows' matches on
    /// two consecutive query rows: a name that only ends like the edit's scores half its
    /// match; a one-token subject's key keeps one row and scores as before; ceilings and
    /// impostor pairs line rows up the same way.
    #[test]
    fn span_keys_match_consecutive_rows() {
        let (x, y, z) = ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]);
        let mut store = KeyStore::new(
            KeyKind::Subject,
            1,
            2,
            space(3, 0),
            None,
            KeyCeilings::off(),
        );
        // Edit 0: "...y x" (last row x, the one before y); edit 1: a one-token subject z.
        store.push(&[x, y].concat(), None);
        store.push(&[z, [0.0; 3]].concat(), None);
        assert_eq!(store.key_rows, vec![2, 1]);
        assert_eq!(rows_of_keys(&store.keys, 3, 2), store.key_rows);
        // The edit's own rows in order: 1 at position 2.
        let own = store.scores_at(&[z, y, x].concat());
        assert!((own[0].0 - 1.0).abs() < 1e-6 && own[0].1 == 2, "{own:?}");
        // Another name that ends in x: (1 + 0) / 2.
        let alike = store.scores_at(&[y, z, x].concat());
        assert!((alike[0].0 - 0.5).abs() < 1e-6, "{alike:?}");
        // The one-row key matches any single row, position 0 included.
        assert!((alike[1].0 - 1.0).abs() < 1e-6 && alike[1].1 == 1);
        assert!((store.scores(&z)[1] - 1.0).abs() < 1e-6);
        // A two-row key needs two rows.
        assert_eq!(store.scores(&x)[0], f32::NEG_INFINITY);
        // Impostors compare the rows both keys have: edit 2 (x after z) shares edit 0's last row.
        store.push(&[x, z].concat(), None);
        store.update_impostors(|a, b| a == b);
        assert!(
            (store.impostor[0] - 0.5).abs() < 1e-6,
            "{:?}",
            store.impostor
        );
        assert!(
            (store.impostor[1] - 0.0).abs() < 1e-6,
            "{:?}",
            store.impostor
        );
        // Removing an edit keeps the others' rows lined up.
        store.remove(0);
        assert_eq!(store.key_rows, vec![1, 2]);
        assert!((store.scores(&[z, x].concat())[1] - 1.0).abs() < 1e-6);
        // Ceilings: the background "y x" holds edit 0's two rows in a row.
        let mut ceiled = KeyStore::new(
            KeyKind::Subject,
            1,
            2,
            space(3, 0),
            None,
            KeyCeilings {
                margin: Some(0.1),
                background: Derived([y, x, z].concat()),
                ..Default::default()
            },
        );
        ceiled.push(&[x, y].concat(), None);
        ceiled.push(&[x, z].concat(), None);
        let c = &ceiled.ceilings.of_keys;
        assert!(
            (c[0] - 1.0).abs() < 1e-6 && (c[1] - 0.5).abs() < 1e-6,
            "{c:?}"
        );
    }

    #[test]
    fn impostor_scores_skip_the_same_subject_and_set_the_calibrated_threshold() {
        let mut store = KeyStore::new(
            KeyKind::Subject,
            1,
            1,
            space(2, 0),
            None,
            KeyCeilings::off(),
        );
        let unit = |a: f32| [a.cos(), a.sin()];
        // Edits 0 and 1 share a subject (identical keys); edit 2 is another subject at 60 degrees.
        for a in [0.0f32, 0.0, 60f32.to_radians()] {
            store.push(&unit(a), None);
        }
        let subject = [0, 0, 1];
        store.update_impostors(|a, b| subject[a] == subject[b]);
        let cos60 = 60f32.to_radians().cos();
        for (i, &s) in store.impostor.iter().enumerate() {
            assert!((s - cos60).abs() < 1e-6, "edit {i}: {s}");
        }
        // Incremental updates give what one pass over everything gives.
        let mut whole = store.clone();
        for k in 3..12 {
            store.push(&unit(k as f32 * 0.1), None);
            store.update_impostors(|a, b| a == b);
        }
        whole.set_keys(store.keys.clone());
        whole.update_impostors(|a, b| a == b || (a < 3 && b < 3 && subject[a] == subject[b]));
        assert_eq!(whole.impostor, store.impostor);
        // Too few edits, or quantile 0: the floor; else the quantile, never below the floor.
        assert_eq!(store.scope_threshold(0.5, 0.0), 0.5);
        let mut sorted = store.impostor.clone();
        sorted.sort_by(f32::total_cmp);
        assert_eq!(
            store.scope_threshold(-1.0, 0.5),
            sorted[(11.0f32 * 0.5).round() as usize]
        );
        assert_eq!(store.scope_threshold(0.9999, 0.5), 0.9999);
        let few = KeyStore {
            impostor: store.impostor[..MIN_CALIBRATION_EDITS - 1].to_vec(),
            ..store.clone()
        };
        assert_eq!(few.scope_threshold(0.3, 0.9), 0.3);
    }

    /// A store that grew from another takes its impostor scores and scores only the new edits,
    /// bit for bit what scoring everything from scratch gives; a store whose first keys differ
    /// (an edit rolled back) takes nothing.
    #[test]
    fn a_grown_store_adopts_the_impostor_scores_of_its_prefix() {
        let ceiled = || {
            KeyStore::new(
                KeyKind::Subject,
                2,
                1,
                space(3, 0),
                None,
                KeyCeilings {
                    margin: Some(0.05),
                    background: Derived(vec![1.0, 0.0, 0.0]),
                    ..Default::default()
                },
            )
        };
        let key = |a: f32, b: f32| {
            let v = [a.cos() * b.cos(), a.sin() * b.cos(), b.sin()];
            let w = [b.cos(), 0.0, b.sin()];
            [v, w].concat()
        };
        let same = |a: usize, b: usize| a == b;
        let (mut prefix, mut whole) = (ceiled(), ceiled());
        for i in 0..10 {
            let k = key(0.3 * i as f32, 0.05 * (i % 4) as f32);
            if i < 6 {
                prefix.push(&k, None);
            }
            whole.push(&k, None);
        }
        prefix.update_impostors(same);
        let mut grown = whole.clone();
        whole.update_impostors(same);
        grown.adopt_impostors(&prefix);
        assert_eq!(grown.impostor.len(), 6, "took the prefix's scores");
        grown.update_impostors(same);
        assert_eq!(
            grown
                .impostor
                .iter()
                .map(|s| s.to_bits())
                .collect::<Vec<_>>(),
            whole
                .impostor
                .iter()
                .map(|s| s.to_bits())
                .collect::<Vec<_>>()
        );
        // The first edit gone: the keys are no longer a prefix.
        let mut shifted = whole.clone();
        shifted.remove(0);
        shifted.adopt_impostors(&prefix);
        assert!(shifted.impostor.is_empty());
    }
}
