//! Metrics of the method (docs/elder-method.md section 5): reliability, generalization, locality and the
//! in-scope rates, scored with teacher forcing on token ids.

use std::collections::BTreeMap;
use std::ops::Range;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::backend::cpu::ops;
use crate::elder::keystore::KeyMatch;
use crate::elder::molora::{Elder, ElderAdapter};
use crate::model::runner::{pad_batch, target_rows, CpuForward, Forward, PromptAdapter};
use crate::model::{Adapter, Model, NoAdapter};

/// An edit record, tokenized.
#[derive(Debug, Clone)]
pub struct TokenizedEdit {
    pub id: String,
    pub knowledge_id: String,
    pub prompt: Vec<u32>,
    pub target: Vec<u32>,
    pub rephrases: Vec<Vec<u32>>,
    /// Unrelated prompts with their answers.
    pub locality: Vec<(Vec<u32>, Vec<u32>)>,
    /// Each locality probe's kind (`same_relation`, `general`, ...), when the data names it.
    pub locality_kinds: Vec<Option<String>>,
}

/// When the metrics are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// On the final model, after all edits (the paper's protocol).
    Final,
    /// Each edit scored right after it was applied.
    Each,
}

/// Teacher-forced result of one (prompt, continuation) pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// The model's argmax at each continuation position.
    pub argmax: Vec<u32>,
    /// log p of each continuation token (teacher forcing).
    pub logprobs: Vec<f32>,
    /// Whether the deferral codebook put the sequence in scope.
    pub in_scope: bool,
    /// Hamming distance of its code to the nearest codebook entry.
    pub distance: Option<u32>,
    /// The key store's best similarity (deferral by key store).
    pub similarity: Option<f32>,
    /// The id of the edit the key store matched (in scope or not).
    pub matched_edit: Option<String>,
    /// The matched edit's relation-key similarity (key store with a relation check).
    pub relation_similarity: Option<f32>,
    /// Matched in scope, but the matched edit's experts did not give its answer
    /// (`answer_gate`): answered by the base model.
    pub gated: bool,
    /// The edits the answer gate asked, in order, with log P(its answer) under its experts.
    pub asked: Vec<(String, f32)>,
}

/// Sequences scored per forward pass (by every backend, so their padding is the same).
pub const EVAL_BATCH: usize = 16;

/// Something that scores `(prompt, continuation)` pairs with teacher forcing, on the edited model
/// (`edited`) or the base model: the CPU forward here, or the CUDA one.
pub trait PairScorer {
    fn score_pairs(
        &mut self,
        edited: bool,
        pairs: &[(&[u32], &[u32])],
    ) -> anyhow::Result<Vec<Scored>>;
}

/// The CPU reference forward with an ELDER state.
pub struct CpuScorer<'a> {
    pub model: &'a Model,
    pub elder: &'a Elder,
}

impl PairScorer for CpuScorer<'_> {
    fn score_pairs(
        &mut self,
        edited: bool,
        pairs: &[(&[u32], &[u32])],
    ) -> anyhow::Result<Vec<Scored>> {
        score_pairs(self.model, edited.then_some(self.elder), pairs)
    }
}

/// Scores `(prompt, continuation)` pairs on the CPU in batches, with ELDER (`Some`) or the base
/// model.
pub fn score_pairs(
    model: &Model,
    elder: Option<&Elder>,
    pairs: &[(&[u32], &[u32])],
) -> Result<Vec<Scored>> {
    score_pairs_on(&mut CpuForward::new(model, ElderRequest::new(elder)), pairs)
}

/// Scores `(prompt, continuation)` pairs on any forward, one request per batch of
/// [`EVAL_BATCH`] (so every backend pads them alike): the logits of the continuation rows and
/// the routing the forward reports become [`Scored`] items in [`scored_chunk`].
pub fn score_pairs_on<F: Forward<Report = Routed> + ?Sized>(
    fwd: &mut F,
    pairs: &[(&[u32], &[u32])],
) -> Result<Vec<Scored>> {
    let vocab = fwd.config().vocab_size;
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(EVAL_BATCH) {
        if let Some((_, c)) = chunk.iter().find(|(p, _)| p.is_empty()) {
            bail!(
                "a scored pair has an empty prompt ({} continuation tokens)",
                c.len()
            );
        }
        let seqs: Vec<Vec<u32>> = chunk.iter().map(|(p, c)| [*p, *c].concat()).collect();
        let (ids, shape) = pad_batch(&seqs, &vec![0; seqs.len()]);
        fwd.begin(shape.batch, shape.seq)?;
        let prompt_lens: Vec<usize> = chunk.iter().map(|(p, _)| p.len()).collect();
        fwd.prompt(&ids, &shape, &prompt_lens)?;
        let routed = fwd.report()?;
        let rows = target_rows(shape.seq, chunk.iter().map(|(p, c)| (p.len(), c.len())));
        let logits = fwd.head(&rows)?;
        out.extend(scored_chunk(chunk, &logits, vocab, routed));
    }
    Ok(out)
}

/// `scorer.score_pairs` with the pairs sent shortest first, so that each padded batch holds
/// pairs of about one length (a short probe padded to a long rephrasing costs every row it
/// pads), and the scores returned in the pairs' own order.
fn score_by_length(
    scorer: &mut dyn PairScorer,
    edited: bool,
    pairs: &[(&[u32], &[u32])],
) -> Result<Vec<Scored>> {
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    order.sort_by_key(|&i| (pairs[i].0.len() + pairs[i].1.len(), i));
    let sorted: Vec<(&[u32], &[u32])> = order.iter().map(|&i| pairs[i]).collect();
    let scored = scorer.score_pairs(edited, &sorted)?;
    anyhow::ensure!(
        scored.len() == pairs.len(),
        "{} scores for {} pairs",
        scored.len(),
        pairs.len()
    );
    let mut out: Vec<Option<Scored>> = (0..pairs.len()).map(|_| None).collect();
    for (s, &i) in scored.into_iter().zip(&order) {
        out[i] = Some(s);
    }
    Ok(out
        .into_iter()
        .map(|s| s.expect("every pair scored"))
        .collect())
}

/// ELDER on the CPU forward, one prompt call at a time: each call gets an inference adapter over
/// its prompt rows, which reports what it decided ([`Routed`]). `None`: the base model.
pub struct ElderRequest<'a> {
    elder: Option<&'a Elder>,
    adapter: Option<ElderAdapter<'a>>,
    base: NoAdapter,
}

impl<'a> ElderRequest<'a> {
    pub fn new(elder: Option<&'a Elder>) -> Self {
        ElderRequest {
            elder,
            adapter: None,
            base: NoAdapter,
        }
    }
}

impl PromptAdapter for ElderRequest<'_> {
    type Report = Routed;

    fn start(&mut self, rows: Vec<Range<usize>>, ids: &[u32]) {
        self.adapter = self.elder.map(|e| ElderAdapter::inference_on(e, rows, ids));
    }

    fn adapter(&mut self) -> &mut dyn Adapter {
        match &mut self.adapter {
            Some(a) => a,
            None => &mut self.base,
        }
    }

    /// A copy (decode steps keep using the adapter's decisions).
    fn report(&mut self) -> Option<Routed> {
        let (elder, a) = (self.elder?, self.adapter.as_ref()?);
        Some(Routed {
            in_scope: a.in_scope.clone(),
            distances: a.distances.clone(),
            matches: reported_matches(elder, &a.key_matches),
            gated: a.gated.clone(),
            asked: reported_asked(elder, &a.asked),
        })
    }
}

/// The key store's matches as a report gives them: similarity, the edit's id, relation similarity.
pub fn reported_matches(
    elder: &Elder,
    matches: &[Option<KeyMatch>],
) -> Vec<Option<(f32, String, Option<f32>)>> {
    matches
        .iter()
        .map(|m| m.map(|m| (m.score, elder.memory[m.entry].id.clone(), m.relation)))
        .collect()
}

/// The edits the answer gate asked, as a report gives them: the edit's id and log P(its answer).
pub fn reported_asked(elder: &Elder, asked: &[Vec<(usize, f32)>]) -> Vec<Vec<(String, f32)>> {
    asked
        .iter()
        .map(|asked| {
            asked
                .iter()
                .map(|&(e, lp)| (elder.memory[e].id.clone(), lp))
                .collect()
        })
        .collect()
}

/// What the method decided for each sequence of a scored batch, as a forward reports it (a
/// forward that never reached its query site reports nothing).
#[derive(Debug, Default)]
pub struct Routed {
    pub in_scope: Vec<bool>,
    /// Hamming distance to the nearest codebook entry (codebook deferral).
    pub distances: Vec<Option<u32>>,
    /// The key store's best match: similarity, edit id, relation similarity.
    pub matches: Vec<Option<(f32, String, Option<f32>)>>,
    /// Sequences the answer gate turned away (empty: none).
    pub gated: Vec<bool>,
    /// The edits the answer gate asked for each sequence, in order: id and log P(its answer)
    /// under its experts (empty: none reported).
    pub asked: Vec<Vec<(String, f32)>>,
}

/// The [`Scored`] items of one batch of pairs from the logits of their continuation rows
/// (`[sum of continuation lengths, vocab]`, in order) and the routing the forward reported
/// (`None`: the base model). The one place both forwards' results become scores: a routing
/// that does not cover every sequence counts as nothing in scope.
pub fn scored_chunk(
    chunk: &[(&[u32], &[u32])],
    logits: &[f32],
    vocab: usize,
    routed: Option<Routed>,
) -> Vec<Scored> {
    let n = chunk.len();
    let routed = routed.unwrap_or_default();
    let full = |len: usize| len == n;
    let in_scope = if full(routed.in_scope.len()) {
        routed.in_scope
    } else {
        vec![false; n]
    };
    let distances = if full(routed.distances.len()) {
        routed.distances
    } else {
        vec![None; n]
    };
    let matches = if full(routed.matches.len()) {
        routed.matches
    } else {
        vec![None; n]
    };
    let gated = if full(routed.gated.len()) {
        routed.gated
    } else {
        vec![false; n]
    };
    let asked = if full(routed.asked.len()) {
        routed.asked
    } else {
        vec![Vec::new(); n]
    };
    let mut rows = logits.chunks(vocab);
    chunk
        .iter()
        .zip(in_scope)
        .zip(distances)
        .zip(matches)
        .zip(gated)
        .zip(asked)
        .map(
            |((((((_, c), in_scope), distance), matched), gated), asked)| {
                let (similarity, matched_edit, relation_similarity) = match matched {
                    Some((s, id, r)) => (Some(s), Some(id), r),
                    None => (None, None, None),
                };
                // One logits row per continuation token, in order.
                let (argmax, logprobs) = c
                    .iter()
                    .map_while(|&t| {
                        let r = rows.next()?;
                        Some((ops::argmax(r) as u32, r[t as usize] - ops::logsumexp(r)))
                    })
                    .unzip();
                Scored {
                    argmax,
                    logprobs,
                    in_scope,
                    distance,
                    similarity,
                    matched_edit,
                    relation_similarity,
                    gated,
                    asked,
                }
            },
        )
        .collect()
}

fn token_accuracy(argmax: &[u32], target: &[u32]) -> f64 {
    if target.is_empty() {
        return 1.0;
    }
    argmax.iter().zip(target).filter(|(a, b)| a == b).count() as f64 / target.len() as f64
}

/// Running sums of one metric.
#[derive(Debug, Clone, Copy, Default)]
struct Mean {
    sum: f64,
    exact: f64,
    in_scope: f64,
    /// Items the answer gate turned away.
    gated: f64,
    distance: f64,
    similarity: f64,
    /// Items with a key similarity: with key ceilings a prompt can match no key at all.
    with_similarity: usize,
    n: usize,
}

impl Mean {
    fn add(&mut self, accuracy: f64, s: &Scored) {
        let in_scope = s.in_scope;
        self.distance += s.distance.map_or(f64::NAN, f64::from);
        if let Some(sim) = s.similarity {
            self.similarity += f64::from(sim);
            self.with_similarity += 1;
        }
        self.sum += accuracy;
        self.exact += (accuracy == 1.0) as u8 as f64;
        self.in_scope += in_scope as u8 as f64;
        self.gated += s.gated as u8 as f64;
        self.n += 1;
    }
    fn value(&self) -> f64 {
        if self.n == 0 {
            f64::NAN
        } else {
            self.sum / self.n as f64
        }
    }
    fn exact(&self) -> f64 {
        if self.n == 0 {
            f64::NAN
        } else {
            self.exact / self.n as f64
        }
    }
    fn distance(&self) -> f64 {
        if self.n == 0 {
            f64::NAN
        } else {
            self.distance / self.n as f64
        }
    }
    fn similarity(&self) -> f64 {
        if self.with_similarity == 0 {
            f64::NAN
        } else {
            self.similarity / self.with_similarity as f64
        }
    }
    fn kind(&self) -> KindMetrics {
        KindMetrics {
            probes: self.n,
            locality: self.value(),
            locality_exact: self.exact(),
            in_scope: self.scope(),
            gated: self.gated(),
        }
    }
    fn scope(&self) -> f64 {
        if self.n == 0 {
            f64::NAN
        } else {
            self.in_scope / self.n as f64
        }
    }
    fn gated(&self) -> f64 {
        if self.n == 0 {
            f64::NAN
        } else {
            self.gated / self.n as f64
        }
    }
}

/// The report of one evaluation. Fractions in [0, 1]; NaN (null in JSON) when nothing was scored.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Metrics {
    pub protocol: Protocol,
    pub edits: usize,
    pub rephrases: usize,
    pub locality_probes: usize,
    /// Mean over edits of the fraction of target tokens predicted (argmax, teacher forcing).
    pub reliability: f64,
    pub reliability_exact: f64,
    /// The same over every rephrased prompt.
    pub generalization: f64,
    pub generalization_exact: f64,
    /// Mean over locality probes of the fraction of positions whose argmax is unchanged by editing.
    pub locality: f64,
    pub locality_exact: f64,
    pub in_scope_edits: f64,
    pub in_scope_rephrases: f64,
    pub in_scope_locality: f64,
    /// Matched in scope by their key but turned away by the answer gate (`answer_gate`): the
    /// matched edit's experts did not give its answer, so the base model answered.
    pub gated_edits: f64,
    pub gated_rephrases: f64,
    pub gated_locality: f64,
    /// Mean Hamming distance to the nearest codebook entry (diagnostic for the threshold).
    pub mean_distance_edits: f64,
    pub mean_distance_rephrases: f64,
    pub mean_distance_locality: f64,
    /// Mean best key similarity over the prompts some key matched (the key store's diagnostic for
    /// its threshold).
    pub mean_similarity_edits: f64,
    pub mean_similarity_rephrases: f64,
    pub mean_similarity_locality: f64,
    /// Locality of each kind of probe the data names.
    pub locality_by_kind: BTreeMap<String, KindMetrics>,
}

/// Locality of one kind of probe.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KindMetrics {
    pub probes: usize,
    pub locality: f64,
    pub locality_exact: f64,
    pub in_scope: f64,
    /// Turned away by the answer gate.
    pub gated: f64,
}

/// Accumulates scores of edits, possibly across several calls (the `each` protocol).
#[derive(Debug, Default)]
pub struct Evaluator {
    rel: Mean,
    generalization: Mean,
    loc: Mean,
    loc_by_kind: BTreeMap<String, Mean>,
    /// Every scored item, when asked for ([`Evaluator::keep_details`]).
    details: Option<Vec<ItemScore>>,
}

/// One scored prompt, for `elder eval --details`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ItemScore {
    /// The record it belongs to.
    pub id: String,
    /// `edit`, `rephrase`, or `locality` (with the probe's kind).
    pub role: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Its index among the record's rephrasings or probes.
    pub index: usize,
    /// Token accuracy (locality: agreement with the base model).
    pub accuracy: f64,
    pub in_scope: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distance: Option<u32>,
    /// The edit the key store matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched_edit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relation_similarity: Option<f32>,
    /// Turned away by the answer gate (see [`Scored::gated`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub gated: bool,
    /// The edits the answer gate asked (see [`Scored::asked`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gate_asked: Vec<(String, f32)>,
    /// The edited model's argmax tokens (and the base model's, for locality).
    pub argmax: Vec<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_argmax: Option<Vec<u32>>,
}

impl Evaluator {
    /// Keeps every scored item (see [`Evaluator::details`]).
    pub fn keep_details(mut self) -> Self {
        self.details = Some(Vec::new());
        self
    }

    /// Every scored item so far (empty unless [`Evaluator::keep_details`]).
    pub fn details(&self) -> &[ItemScore] {
        self.details.as_deref().unwrap_or(&[])
    }

    fn detail(&mut self, item: impl FnOnce() -> ItemScore) {
        if let Some(d) = &mut self.details {
            d.push(item());
        }
    }

    /// Scores `edits` on the edited model (`elder`) and, for locality, against the base model.
    pub fn add(&mut self, model: &Model, elder: &Elder, edits: &[TokenizedEdit]) {
        self.add_with(&mut CpuScorer { model, elder }, edits)
            .expect("the CPU scorer does not fail");
    }

    /// [`Self::add`] with any backend's scorer.
    pub fn add_with(
        &mut self,
        scorer: &mut dyn PairScorer,
        edits: &[TokenizedEdit],
    ) -> anyhow::Result<()> {
        let edit_pairs: Vec<(&[u32], &[u32])> = edits
            .iter()
            .map(|e| (&e.prompt[..], &e.target[..]))
            .collect();
        let item = |id: &str, role, kind: Option<String>, index, accuracy, s: &Scored| ItemScore {
            id: id.to_string(),
            role,
            kind,
            index,
            accuracy,
            in_scope: s.in_scope,
            similarity: s.similarity,
            distance: s.distance,
            matched_edit: s.matched_edit.clone(),
            relation_similarity: s.relation_similarity,
            gated: s.gated,
            gate_asked: s.asked.clone(),
            argmax: s.argmax.clone(),
            base_argmax: None,
        };
        for (s, e) in score_by_length(scorer, true, &edit_pairs)?
            .iter()
            .zip(edits)
        {
            let accuracy = token_accuracy(&s.argmax, &e.target);
            self.rel.add(accuracy, s);
            self.detail(|| item(&e.id, "edit", None, 0, accuracy, s));
        }
        // (record, index within the record) of every rephrasing and probe, in scoring order.
        let owners = |count: fn(&TokenizedEdit) -> usize| -> Vec<(&TokenizedEdit, usize)> {
            edits
                .iter()
                .flat_map(|e| (0..count(e)).map(move |i| (e, i)))
                .collect()
        };
        let reph_owners = owners(|e| e.rephrases.len());
        let reph_pairs: Vec<(&[u32], &[u32])> = reph_owners
            .iter()
            .map(|(e, i)| (&e.rephrases[*i][..], &e.target[..]))
            .collect();
        for (s, (e, i)) in score_by_length(scorer, true, &reph_pairs)?
            .iter()
            .zip(&reph_owners)
        {
            let accuracy = token_accuracy(&s.argmax, &e.target);
            self.generalization.add(accuracy, s);
            self.detail(|| item(&e.id, "rephrase", None, *i, accuracy, s));
        }
        let loc_owners = owners(|e| e.locality.len());
        let loc_pairs: Vec<(&[u32], &[u32])> = loc_owners
            .iter()
            .map(|(e, i)| (&e.locality[*i].0[..], &e.locality[*i].1[..]))
            .collect();
        let edited = score_by_length(scorer, true, &loc_pairs)?;
        let base = score_by_length(scorer, false, &loc_pairs)?;
        for ((e, b), (owner, i)) in edited.iter().zip(&base).zip(&loc_owners) {
            let accuracy = token_accuracy(&e.argmax, &b.argmax);
            self.loc.add(accuracy, e);
            let kind = owner.locality_kinds.get(*i).cloned().flatten();
            if let Some(kind) = &kind {
                self.loc_by_kind
                    .entry(kind.clone())
                    .or_default()
                    .add(accuracy, e);
            }
            self.detail(|| ItemScore {
                base_argmax: Some(b.argmax.clone()),
                ..item(&owner.id, "locality", kind, *i, accuracy, e)
            });
        }
        Ok(())
    }

    pub fn metrics(&self, protocol: Protocol) -> Metrics {
        Metrics {
            protocol,
            edits: self.rel.n,
            rephrases: self.generalization.n,
            locality_probes: self.loc.n,
            reliability: self.rel.value(),
            reliability_exact: self.rel.exact(),
            generalization: self.generalization.value(),
            generalization_exact: self.generalization.exact(),
            locality: self.loc.value(),
            locality_exact: self.loc.exact(),
            in_scope_edits: self.rel.scope(),
            in_scope_rephrases: self.generalization.scope(),
            in_scope_locality: self.loc.scope(),
            gated_edits: self.rel.gated(),
            gated_rephrases: self.generalization.gated(),
            gated_locality: self.loc.gated(),
            mean_distance_edits: self.rel.distance(),
            mean_distance_rephrases: self.generalization.distance(),
            mean_distance_locality: self.loc.distance(),
            mean_similarity_edits: self.rel.similarity(),
            mean_similarity_rephrases: self.generalization.similarity(),
            mean_similarity_locality: self.loc.similarity(),
            locality_by_kind: self
                .loc_by_kind
                .iter()
                .map(|(k, m)| (k.clone(), m.kind()))
                .collect(),
        }
    }
}

impl Metrics {
    /// A plain-text table for terminals.
    pub fn table(&self) -> String {
        let pct = |v: f64| {
            if v.is_nan() {
                "    -".to_string()
            } else {
                format!("{:5.1}", 100.0 * v)
            }
        };
        let mut s = String::new();
        s.push_str(&format!(
            "protocol: {:?}   edits: {}   rephrases: {}   locality probes: {}\n",
            self.protocol, self.edits, self.rephrases, self.locality_probes
        ));
        // The deferral's own diagnostic: code distance (codebook) or key similarity (key store).
        let (what, diag): (&str, [f64; 3]) = if self.mean_similarity_edits.is_nan() {
            (
                "mean distance",
                [
                    self.mean_distance_edits,
                    self.mean_distance_rephrases,
                    self.mean_distance_locality,
                ],
            )
        } else {
            (
                "key similarity",
                [
                    self.mean_similarity_edits,
                    self.mean_similarity_rephrases,
                    self.mean_similarity_locality,
                ],
            )
        };
        s.push_str(&format!(
            "metric             token %  exact %  in scope %  {what}\n"
        ));
        let rows = [
            (
                "reliability",
                self.reliability,
                self.reliability_exact,
                self.in_scope_edits,
                diag[0],
            ),
            (
                "generalization",
                self.generalization,
                self.generalization_exact,
                self.in_scope_rephrases,
                diag[1],
            ),
            (
                "locality",
                self.locality,
                self.locality_exact,
                self.in_scope_locality,
                diag[2],
            ),
        ];
        for (name, v, exact, scope, d) in rows {
            s.push_str(&format!(
                "{name:<18} {}    {}      {}      {d:6.2}\n",
                pct(v),
                pct(exact),
                pct(scope)
            ));
        }
        for (kind, m) in &self.locality_by_kind {
            s.push_str(&format!(
                "  {:<16} {}    {}      {}      ({} probes)\n",
                kind,
                pct(m.locality),
                pct(m.locality_exact),
                pct(m.in_scope),
                m.probes
            ));
        }
        let gated = [self.gated_edits, self.gated_rephrases, self.gated_locality];
        if gated.iter().any(|&g| g > 0.0) {
            s.push_str(&format!(
                "answer gate turned away: edits {}%, rephrasings {}%, locality probes {}%\n",
                pct(gated[0]).trim(),
                pct(gated[1]).trim(),
                pct(gated[2]).trim()
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scores each pair with its prompt as the argmax, and notes the lengths it was sent.
    struct Echo {
        sent: Vec<usize>,
    }

    impl PairScorer for Echo {
        fn score_pairs(&mut self, _: bool, pairs: &[(&[u32], &[u32])]) -> Result<Vec<Scored>> {
            self.sent
                .extend(pairs.iter().map(|(p, c)| p.len() + c.len()));
            Ok(pairs
                .iter()
                .map(|(p, _)| Scored {
                    argmax: p.to_vec(),
                    logprobs: Vec::new(),
                    in_scope: false,
                    distance: None,
                    similarity: None,
                    matched_edit: None,
                    relation_similarity: None,
                    gated: false,
                    asked: Vec::new(),
                })
                .collect())
        }
    }

    #[test]
    fn pairs_are_sent_shortest_first_and_scored_in_their_own_order() {
        let prompts: Vec<Vec<u32>> = vec![vec![1; 9], vec![2; 3], vec![3; 12], vec![4; 3], vec![5]];
        let pairs: Vec<(&[u32], &[u32])> = prompts.iter().map(|p| (&p[..], &[7u32][..])).collect();
        let mut echo = Echo { sent: Vec::new() };
        let scored = score_by_length(&mut echo, true, &pairs).unwrap();
        assert_eq!(echo.sent, [2, 4, 4, 10, 13]);
        let got: Vec<&[u32]> = scored.iter().map(|s| &s.argmax[..]).collect();
        let want: Vec<&[u32]> = prompts.iter().map(|p| &p[..]).collect();
        assert_eq!(got, want);
    }
}
