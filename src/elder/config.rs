//! The method's hyperparameters, with the defaults of docs/elder-method.md and per-family placements.
//! Every choice the method leaves open is an option here, never a constant in the code.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::model::layers::{MlpProj, Site};
use crate::model::names::site_dims;
use crate::model::{Arch, ModelConfig};

/// Which prompt rows of the query site's input make a sequence's query vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryPooling {
    /// The last prompt token (the paper).
    LastToken,
    /// The mean over every prompt token (choice: not in the paper; the last token of a template
    /// prompt mostly encodes the template, the mean also carries the subject).
    PromptMean,
}

/// How an edit's preset expert allocation (the target of the guided loss) is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AllocationMode {
    /// k distinct experts per layer drawn from a seed derived from the knowledge id.
    KnowledgeSeed,
    /// The router's own top-k for the edit prompt at the first iteration.
    RouterFirstIteration,
    /// The k experts per layer that the fewest earlier edits use (ties: the lowest index), so a
    /// fixed pool is shared as evenly as it can be (choice: not in the paper).
    LeastUsed,
    /// k new experts per layer for every edit: the pool grows with the stream and no two edits
    /// share an expert, so no edit can overwrite another (choice: not in the paper). Needs the
    /// key store and the stored allocation.
    Fresh,
}

/// Named starting points for the method settings; a TOML config overrides either. The serde
/// default is `Paper` on purpose: a format-1 state's config has no `preset` field and was the
/// paper's method (the commands' default preset is `Default`, chosen in `main.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// The published method, exactly: routers on the last prompt token, the allocation-code
    /// codebook for deferral, a shared pool of 4 experts per layer.
    #[default]
    Paper,
    /// What keeps 1000 sequential edits (BENCHMARKS.md): a key store of subject keys decides scope
    /// and which edit a prompt is about, each edit trains experts of its own, with a prefixed
    /// copy, question framings, negatives and early stopping.
    Default,
}

impl Preset {
    pub fn as_str(self) -> &'static str {
        match self {
            Preset::Paper => "paper",
            Preset::Default => "default",
        }
    }
}

/// What decides whether a sequence is in scope of the edits (and so whether the MoLoRA layers
/// apply to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Deferral {
    /// The paper: Hamming distance of the routers' allocation code to the nearest codebook entry.
    Codebook,
    /// A key per edit read from the frozen model (`key`), matched by cosine similarity against the
    /// prompt's own keys; in scope when the best match reaches `scope_threshold`. The matched edit
    /// is known, so its own allocation can be reused (`inference_allocation = "stored"`).
    KeyStore,
}

/// Which rows of the key site's input make the key-store key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    /// The last prompt token (the paper's query position).
    LastToken,
    /// The mean over the prompt's tokens.
    PromptMean,
    /// The prompt mean minus the mean of the shipped background text (fixed once).
    MeanDecentered,
    /// Stored at the last token of the edit's subject (the record's `subject`, or found in the
    /// prompt without it), centred on the background; a prompt is matched at every position.
    Subject,
}

/// Which rows of a prompt make the relation key of the key store's tie-break (several edits can
/// share a subject; the relation key tells which of them a prompt asks about).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelationKey {
    /// The last prompt token (the first key store's): it encodes the template's ending, so "What
    /// is the symbol for Sulfur? The answer is" picked "Is Sulfur radioactive? The answer is".
    LastToken,
    /// The mean of the prompt's rows outside its subject (and position 0, the attention sink):
    /// the words that ask the question, without the subject every candidate shares. A query's
    /// subject rows are where its best subject key matched, as many as the matched edit's subject
    /// has tokens.
    Context,
    /// The context rows (as `Context`) each as a unit vector, weighted by how little it resembles
    /// generic text: weight `1 - ceiling`, the ceiling being the row's best cosine to any row of
    /// the shipped background text at the relation site. Why: a question's framing ("? The
    /// answer is") matches generic text and drowned the words that name the relation ("symbol",
    /// "atomic number"); weighting picked a rephrasing's own edit among its subject's edits for
    /// 96% of geo's and 82% of science's rephrasings, against 93% and 79% for `Context`
    /// (tools/relation_geometry.py data, BENCHMARKS.md).
    WeightedContext,
}

/// Which rows of an in-scope sequence the MoLoRA layers change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpertRows {
    /// Every row (the paper: routing is per sequence, every token uses the same experts).
    All,
    /// Only the row of the edit's subject: its last token in a training prompt, the best-matching
    /// position of the key store at inference. The model's own layers then read the changed
    /// subject, the way ROME edits a fact at the subject's last token.
    Subject,
    /// From the last prompt token on: the prompt's own tokens keep the base model's activations,
    /// only the position that predicts the answer and the tokens after it change, so a prompt that
    /// mentions the subject but asks something else is left nearly as it was.
    Answer,
}

/// Which experts an in-scope sequence is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InferenceAllocation {
    /// The routers' top-k on the query (the paper).
    Router,
    /// The matched edit's own allocation, exactly as it was trained (needs the key store).
    Stored,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ElderConfig {
    /// Block whose MLP projection `query_proj` provides the query (its input at the last prompt token).
    pub query_block: usize,
    pub query_proj: MlpProj,
    pub query_pooling: QueryPooling,
    /// Blocks whose `molora_proj` is wrapped by a mixture of LoRA experts (consecutive, after the query).
    pub molora_blocks: Vec<usize>,
    pub molora_proj: MlpProj,
    pub num_experts: usize,
    pub rank: usize,
    /// LoRA scaling is `alpha / rank`.
    pub alpha: f32,
    pub top_k: usize,
    /// Renormalise the top-k gates to sum to one (the paper does not).
    pub renormalize: bool,
    /// A sequence is in scope when its code is within this Hamming distance (exclusive) of a codebook entry.
    pub threshold: u32,
    /// Weight of the guided loss.
    pub guide_weight: f32,
    pub allocation: AllocationMode,
    /// Adam iterations per edit batch.
    pub iterations: usize,
    pub learning_rate: f32,
    /// The routers' learning rate as a multiple of `learning_rate` (choice: the paper trains them
    /// together at one rate; a smaller factor slows how fast later edits re-route earlier ones).
    pub router_lr_scale: f32,
    /// Multiply the learning rate by `lr_decay_factor` every `lr_decay_every` iterations (0: never).
    pub lr_decay_every: usize,
    pub lr_decay_factor: f32,
    pub adam_beta1: f32,
    pub adam_beta2: f32,
    pub adam_eps: f32,
    /// Edits per optimisation batch.
    pub batch_size: usize,
    /// Seeds expert initialisation and preset allocations.
    pub seed: u64,
    /// Route on the query minus the mean query of calibration prompts, at unit RMS (choice: not in
    /// the paper; see `Elder::router_input`).
    pub query_centering: bool,
    /// Edit prompts of the stream's first records that calibrate the mean (together with the
    /// shipped background text; never a record's rephrasings or locality probes).
    pub calibration_records: usize,

    // ---- Beyond the paper (each off in the `paper` preset; see docs/elder-method.md section 6) ----
    /// The preset these settings started from (recorded in the state; informational).
    pub preset: Preset,
    pub deferral: Deferral,
    /// Where the key store reads its keys: the input of `key_proj` in `key_block`.
    pub key: KeyKind,
    pub key_block: usize,
    pub key_proj: MlpProj,
    /// Also store keys of generated variants of the edit prompt (a background sentence before
    /// it, and for subject keys the bare subject at the start of a text), so that a prompt whose
    /// subject is tokenized differently still finds its edit.
    pub key_variants: bool,
    /// Project keys to this many dimensions with a fixed random matrix (0: keep the full width).
    pub key_dim: usize,
    /// Subject keys are read at the subject's last this-many tokens (fewer for a shorter
    /// subject) and a query matches where as many consecutive rows line up (the mean of their
    /// similarities). Why: names that end alike ("Praseodymium" / "Neodymium", "South Dakota" /
    /// "North Dakota") share their last token, and an early block's row there is mostly that
    /// token (cosine 0.86-0.95), so probes about one matched edits of the other. The default
    /// preset reads three (two left "Terbium" matching "Ytterbium"; BENCHMARKS.md).
    pub key_span: usize,
    /// The first this-many positions of a text are centred on background means of their own
    /// (1: position 0 only, the first states' behaviour); later positions share one mean.
    pub key_position_means: usize,
    /// A key counts only where its similarity beats its *ceiling* (its best cosine to any
    /// position of the shipped background text) by this margin: a key that matches generic text
    /// is about a position, not a subject, and must not match a prompt merely as well as that.
    /// None: off.
    pub key_ceiling_margin: Option<f32>,
    /// A prompt is in scope when its best key similarity (cosine) reaches this (with
    /// `scope_quantile`, the floor of the calibrated threshold).
    pub scope_threshold: f32,
    /// Calibrate the threshold from the stream itself (0: off, the fixed `scope_threshold`):
    /// each edit's impostor score is its best key similarity to an edit of another subject, and
    /// the threshold is this quantile of the impostor scores (never below `scope_threshold`).
    /// Only edit keys take part, so no evaluation prompt ever sets it.
    pub scope_quantile: f32,
    /// Among edits whose key similarity is within `relation_margin` of the best, pick the one
    /// whose relation key (`relation_key`, read at `relation_block`'s `relation_proj` input)
    /// is most similar: several edits can share a subject.
    pub relation_check: bool,
    pub relation_key: RelationKey,
    pub relation_block: usize,
    pub relation_proj: MlpProj,
    pub relation_margin: f32,
    /// The relation key chooses among every edit about the best-matching edit's subject (the
    /// record's `subject`, compared case-insensitively), not only among the edits whose key
    /// scores within `relation_margin` of the best. Why: a subject's key rows depend a little on
    /// the words before it, so a rephrasing can score one of its subject's edits well above the
    /// others and the relation key never got to choose.
    pub relation_by_subject: bool,
    /// Weight of the words a prompt shares with each candidate edit's prompt (outside the
    /// subject) in the relation choice, added to the relation key's similarity (0: off). Words
    /// are cut-off stems weighted by how rare they are among the stream's edit prompts; common
    /// English words (those in at least 1/40 of the shipped generic sentences) and the words of
    /// the question framings count for nothing. Why: a paraphrase keeps the words that name its
    /// relation ("Zinc has the atomic number"), and the frozen relation key picked a science
    /// rephrasing's own edit among its element's edits 71% of the time, words and key together
    /// 82% (geo unchanged at 94%; BENCHMARKS.md). See `elder::words`.
    pub relation_words: f32,
    pub inference_allocation: InferenceAllocation,
    pub expert_rows: ExpertRows,
    /// Earlier edits that share an expert with the batch, trained again alongside it (most
    /// recent first), so that later edits do not overwrite them.
    pub replay: usize,
    /// Copies of each edit prompt with a background sentence before it, trained alongside it.
    pub augment_prefixes: usize,
    /// Copies of each edit prompt inside generic question framings ("Fill in the blank: ...
    /// ___. The answer is"), trained alongside it (the first N of [`QUESTION_FRAMES`]).
    pub augment_questions: usize,
    /// Prompts trained to keep the base model's answers (the edit's subject in other edits'
    /// templates, other subjects in its own template, background sentences), per edit.
    pub negatives: usize,
    /// More negatives of the edit's subject in other edits' templates, per edit (beyond those
    /// among `negatives`), so that its experts learn to leave the subject's other relations
    /// alone. Why: with `negatives = 4` (the default until 2026-12-07) an edit's experts saw
    /// about two of its subject's other templates and gave their answer to most other questions
    /// about the subject (science at T = 1000: the chemical-symbol edit's experts answered "Ru"
    /// to "The atomic number of Zinc is" with probability 0.9999), so neither the answer gate nor its candidates could tell
    /// a subject's relations apart. Each costs one more sequence per training step. Off in both
    /// presets: twelve of them lifted science's same-subject locality at T = 300 from 0.52 to
    /// 0.83 and cost 12 points of generalization (the experts refuse paraphrases too;
    /// BENCHMARKS.md).
    pub subject_negatives: usize,
    /// More negatives, per edit: its prompt with one word of its template (not the subject)
    /// replaced by a word of the background text ("The atomic number of X is" -> "The atomic
    /// harbour of X is"), so the experts learn that the relation's words, not only the subject
    /// and the sentence's shape, ask for the new answer. Off in both presets: two of them per
    /// edit lifted science's same-subject locality at T = 100 from 0.59 to 0.68 but cost 8
    /// points of generalization (BENCHMARKS.md).
    pub reworded_negatives: usize,
    /// Weight of the negatives' loss relative to the edit's.
    pub negative_weight: f32,
    /// Weight of a penalty on the squared output of the experts for the negatives (0: none).
    pub delta_penalty: f32,
    /// Put negatives in the question framings too (cycling through the first
    /// `augment_questions` of them), as the edit's own copies are.
    pub frame_negatives: bool,
    /// Stop an edit batch early once every target token is the argmax and the edit loss is below
    /// this (0: always run `iterations`).
    pub stop_loss: f32,
    /// Answer only where the matched edit's own experts agree (0: off): a prompt in scope whose
    /// experts give the edit's answer (the first token of its target) less than this probability
    /// at the last prompt token is answered by the base model instead. The experts learned the
    /// edit from its prompt's variants (and, with `negatives`, to keep the base model's answers
    /// elsewhere), so they tell what frozen keys cannot: a question about an edited subject's
    /// *other* relation ("X has a population of about" after an edit of X's capital) matches X's
    /// key but does not move X's experts towards the new capital. Costs one head row per sequence
    /// in scope, and the blocks from the first MoLoRA layer again for a batch where a sequence is
    /// turned away.
    pub answer_gate: f32,
    /// When the gate turns a prompt's matched edit away, try the edit its relation key ranked
    /// next (another edit of the subject) before the base model answers: its experts answer if
    /// they give its answer at least `answer_gate`. Costs the blocks from the first MoLoRA
    /// layer once more for such a prompt.
    pub answer_gate_fallback: bool,
    /// How many of a prompt's candidate edits the answer gate asks (1: only the matched one).
    /// With more, the experts of each of the relation key's first `answer_gate_candidates`
    /// candidates (its subject's edits) are asked for their own edit's answer, and the one that
    /// gives it the highest probability answers, when that probability reaches `answer_gate`.
    /// Why: a frozen relation key does not tell which of a subject's edits a paraphrase asks
    /// about ("How many protons does an atom of Zinc have?" for its atomic number); the edits'
    /// experts learned exactly that from their own prompts and negatives. Costs the blocks from
    /// the first MoLoRA layer once per further candidate for such a prompt. 1 in both presets:
    /// experts trained with today's negatives answer most questions about their subject, so
    /// the most confident candidate was as often a wrong one (science at T = 1000: Rel 0.76
    /// with 8 candidates; BENCHMARKS.md).
    pub answer_gate_candidates: usize,
}

impl Default for ElderConfig {
    /// The paper's reported defaults, placed for a GPT2-XL-sized model (48 blocks).
    fn default() -> Self {
        ElderConfig {
            query_block: 35,
            query_proj: MlpProj::CFc,
            query_pooling: QueryPooling::LastToken,
            molora_blocks: (36..42).collect(),
            molora_proj: MlpProj::CFc,
            num_experts: 4,
            rank: 8,
            alpha: 8.0,
            top_k: 2,
            renormalize: false,
            threshold: 12,
            guide_weight: 1e-2,
            allocation: AllocationMode::KnowledgeSeed,
            iterations: 50,
            learning_rate: 1e-3,
            router_lr_scale: 1.0,
            lr_decay_every: 30,
            lr_decay_factor: 0.5,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            batch_size: 1,
            seed: 0,
            query_centering: false,
            calibration_records: 64,
            preset: Preset::Paper,
            deferral: Deferral::Codebook,
            key: KeyKind::Subject,
            key_block: 2,
            key_proj: MlpProj::CFc,
            key_variants: false,
            key_dim: 0,
            key_span: 1,
            key_position_means: 1,
            key_ceiling_margin: None,
            scope_threshold: 0.8,
            scope_quantile: 0.0,
            relation_check: false,
            relation_key: RelationKey::LastToken,
            relation_block: 35,
            relation_proj: MlpProj::CFc,
            relation_margin: 0.05,
            relation_by_subject: false,
            relation_words: 0.0,
            inference_allocation: InferenceAllocation::Router,
            expert_rows: ExpertRows::All,
            replay: 0,
            augment_prefixes: 0,
            augment_questions: 0,
            negatives: 0,
            reworded_negatives: 0,
            subject_negatives: 0,
            negative_weight: 1.0,
            delta_penalty: 0.0,
            frame_negatives: false,
            stop_loss: 0.0,
            answer_gate: 0.0,
            answer_gate_fallback: false,
            answer_gate_candidates: 1,
        }
    }
}

/// Generic question framings of an edit prompt (`{}` is the prompt), for `augment_questions`:
/// they name no relation, so they fit every edit; they teach the experts to answer when the
/// prompt is asked as a question rather than left as a sentence to complete.
pub const QUESTION_FRAMES: &[&str] = &[
    "Fill in the blank: {} ___. The answer is",
    "Question: {} what? Answer:",
    "Complete the sentence. {}",
    "{} what? It is",
];

/// The most experts per MoLoRA layer a config may ask for (the paper uses 4).
pub const MAX_EXPERTS: usize = 1 << 16;

/// Number of MoLoRA layers the defaults use.
const DEFAULT_LAYERS: usize = 6;

/// The most candidate edits the answer gate asks per prompt (`answer_gate_candidates`): each
/// costs the blocks from the first MoLoRA layer once more.
pub const MAX_GATE_CANDIDATES: usize = 8;

impl ElderConfig {
    /// The named preset for a base model (see [`Preset`]).
    pub fn preset(preset: Preset, cfg: &ModelConfig) -> Self {
        match preset {
            Preset::Paper => Self::preset_for(cfg),
            Preset::Default => Self::default_preset_for(cfg),
        }
    }

    /// The `default` preset: the paper's placement, trained and answered the way that keeps long
    /// streams of edits (BENCHMARKS.md has each setting measured alone and combined):
    /// - scope from a key store of subject keys read early (block 4's MLP input: early enough to
    ///   name the subject, late enough to see the words before its last token, so "Equatorial
    ///   Guinea" no longer matches an edit of "Guinea"), with keys of generated variants of each
    ///   prompt, and a relation check just below the first MoLoRA layer (the prompt's rows outside
    ///   its subject at the MLP's hidden activation, each weighted by how unlike the background
    ///   text it is) to pick among edits of one subject; a key counts only 0.25 above its best match on background text (keys read at a
    ///   text's first tokens match any prompt's first tokens);
    /// - the matched edit's own allocation at inference; one fresh rank-4 expert per layer per edit,
    ///   so no edit overwrites another;
    /// - a scope threshold calibrated from the stream (the 0.9 quantile of the edits' impostor
    ///   scores, never below 0.8);
    /// - per edit while training: one prefixed copy and one generic question framing, no
    ///   negatives (the key store and the answer gate keep other prompts' answers; negatives
    ///   cost generalization and time and bought no locality: BENCHMARKS.md, "Three sequences
    ///   per edit"); learning rate 1e-2, stopped early once every target token is the argmax
    ///   and the loss is below 0.01;
    /// - experts on every row (`expert_rows = "all"`): answer rows (`"answer"`, the prompt's own
    ///   rows kept as the base model's) train about 2x faster on the CPU and keep geo's quality,
    ///   but the answer gate then turns away more of science's rephrasings (generalization
    ///   0.748 -> 0.722 on a third of its records at T = 1000: BENCHMARKS.md "Answer rows,
    ///   measured for the default");
    /// - edits trained 8 at a time: each edit keeps its own loss and stops on its own (its
    ///   sequences leave the batch), so a batch trains each edit as alone while the frozen
    ///   weights are read once for all of them (1.3x the edits per second, same quality,
    ///   BENCHMARKS.md "Edit throughput");
    /// - an answer gate of 0.05: a prompt in scope whose matched edit's experts give that edit's
    ///   answer less than 5% is answered by the base model (a question about an edited subject's
    ///   other relation: same-subject locality 0.79 -> 0.98 at T = 1000 on geo, BENCHMARKS.md
    ///   "The answer gate").
    pub fn default_preset_for(cfg: &ModelConfig) -> Self {
        let paper = Self::preset_for(cfg);
        let hidden_proj = match cfg.arch {
            Arch::Gpt2 => MlpProj::CFc,
            Arch::Llama => MlpProj::UpProj,
        };
        // The MLP's hidden activation (the down projection's input): the relation context read
        // there told a rephrasing's own relation from its subject's other edits best
        // (tools/relation_geometry.py, BENCHMARKS.md).
        let mlp_hidden = match cfg.arch {
            Arch::Gpt2 => MlpProj::CProj,
            Arch::Llama => MlpProj::DownProj,
        };
        let first = paper.molora_blocks[0];
        ElderConfig {
            preset: Preset::Default,
            molora_blocks: paper.molora_blocks.iter().copied().take(4).collect(),
            rank: 4,
            alpha: 4.0,
            top_k: 1,
            allocation: AllocationMode::Fresh,
            guide_weight: 0.0,
            router_lr_scale: 0.0,
            learning_rate: 1e-2,
            deferral: Deferral::KeyStore,
            key: KeyKind::Subject,
            key_block: 4.min(first.saturating_sub(1)),
            key_proj: hidden_proj,
            key_variants: true,
            key_dim: 0,
            key_span: 3,
            key_ceiling_margin: Some(0.25),
            scope_threshold: 0.8,
            scope_quantile: 0.9,
            relation_check: true,
            relation_key: RelationKey::WeightedContext,
            relation_block: first - 1,
            relation_proj: mlp_hidden,
            relation_margin: 0.05,
            relation_by_subject: true,
            relation_words: 10.0,
            inference_allocation: InferenceAllocation::Stored,
            augment_prefixes: 1,
            augment_questions: 1,
            negatives: 0,
            negative_weight: 1.0,
            stop_loss: 0.01,
            batch_size: 8,
            answer_gate: 0.05,
            ..paper
        }
    }

    /// The `paper` preset for a base model: six consecutive MoLoRA layers starting three quarters deep (GPT2-XL:
    /// blocks 36..41, query at block 35, as in the MELO/ELDER code lineage), on `mlp.c_fc` for GPT-2 and
    /// on `mlp.down_proj` for Llama (choice: the down projection's input is the widest, most
    /// fact-specific activation of a Llama block).
    pub fn preset_for(cfg: &ModelConfig) -> Self {
        let n = cfg.num_layers;
        let layers = DEFAULT_LAYERS.min(n.saturating_sub(1)).max(1);
        let first = ((n * 3) / 4).clamp(1, n - layers);
        let proj = match cfg.arch {
            Arch::Gpt2 => MlpProj::CFc,
            Arch::Llama => MlpProj::DownProj,
        };
        ElderConfig {
            query_block: first - 1,
            query_proj: proj,
            molora_blocks: (first..first + layers).collect(),
            molora_proj: proj,
            ..Self::default()
        }
    }

    /// The config a command asks for when it creates a state: a TOML file over a preset, a
    /// preset, or only a batch size over the default preset (`None`: nothing asked, the model's
    /// default preset applies).
    pub fn requested(
        path: Option<&Path>,
        preset: Option<Preset>,
        batch_size: Option<usize>,
        model: &ModelConfig,
    ) -> Result<Option<Self>> {
        let chosen = preset.unwrap_or(Preset::Default);
        let mut cfg = match path {
            Some(p) => Some(Self::from_toml_file(p, model, chosen)?),
            None => preset.map(|p| Self::preset(p, model)),
        };
        if let Some(b) = batch_size {
            cfg.get_or_insert_with(|| Self::preset(chosen, model))
                .batch_size = b;
        }
        Ok(cfg)
    }

    /// Reads a TOML file of overrides on top of a preset: `preset = "paper"` in the file picks
    /// the preset, else `preset` does.
    pub fn from_toml_file(path: &Path, cfg: &ModelConfig, preset: Preset) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read ELDER config {}", path.display()))?;
        Self::from_toml_str(&text, cfg, preset)
            .with_context(|| format!("in ELDER config {}", path.display()))
    }

    pub fn from_toml_str(text: &str, cfg: &ModelConfig, preset: Preset) -> Result<Self> {
        let overrides: toml::Value = toml::from_str(text)?;
        let preset = match overrides.get("preset") {
            Some(v) => v
                .clone()
                .try_into::<Preset>()
                .map_err(|_| anyhow::anyhow!("preset = {v}: expected \"default\" or \"paper\""))?,
            None => preset,
        };
        // Start from the preset, then apply whatever keys the file sets.
        let mut base = toml::Value::try_from(Self::preset(preset, cfg))?;
        let (Some(b), Some(o)) = (base.as_table_mut(), overrides.as_table()) else {
            bail!("expected a TOML table of settings");
        };
        for (k, v) in o {
            b.insert(k.clone(), v.clone());
        }
        let merged: ElderConfig = base.try_into()?;
        Ok(merged)
    }

    /// Index of the MoLoRA layer at `site`, if there is one.
    pub fn layer_at(&self, site: Site) -> Option<usize> {
        if site.proj != self.molora_proj {
            return None;
        }
        self.molora_blocks.iter().position(|&b| b == site.block)
    }

    /// Whether `site`'s input is the query every router reads.
    pub fn is_query_site(&self, site: Site) -> bool {
        site.block == self.query_block && site.proj == self.query_proj
    }

    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// Bits of an allocation code: one k-hot group of `num_experts` bits per MoLoRA layer.
    pub fn code_bits(&self) -> usize {
        self.molora_blocks.len() * self.num_experts
    }

    /// Checks the configuration against (the config of) the model it will edit.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        let n = model.num_layers;
        if self.molora_blocks.is_empty() {
            bail!("molora_blocks is empty: at least one MoLoRA layer is needed");
        }
        if let Some(&b) = self.molora_blocks.iter().find(|&&b| b >= n) {
            bail!(
                "molora_blocks contains block {b}, but the model has {n} blocks (0..{})",
                n - 1
            );
        }
        if self.molora_blocks.windows(2).any(|w| w[1] <= w[0]) {
            bail!(
                "molora_blocks must be strictly increasing, got {:?}",
                self.molora_blocks
            );
        }
        // Bounded so that the products formed from it (the code bits, an expert pool's size)
        // cannot overflow on a damaged config.
        if self.num_experts > MAX_EXPERTS {
            bail!(
                "num_experts {} is too large (at most {MAX_EXPERTS})",
                self.num_experts
            );
        }
        // The query only matters where the routers choose the experts.
        if self.uses_routers() && self.query_block >= self.molora_blocks[0] {
            bail!(
                "query_block ({}) must come before the first MoLoRA block ({}): the query may only depend on frozen layers",
                self.query_block,
                self.molora_blocks[0]
            );
        }
        let in_dim = |proj| site_dims(model, proj).map(|(i, _)| i);
        let q_in = in_dim(self.query_proj).with_context(|| {
            format!(
                "query_proj {:?} does not exist in a {} model",
                self.query_proj,
                model.arch.as_str()
            )
        })?;
        let m_in = in_dim(self.molora_proj).with_context(|| {
            format!(
                "molora_proj {:?} does not exist in a {} model",
                self.molora_proj,
                model.arch.as_str()
            )
        })?;
        if self.uses_routers() && q_in != m_in {
            bail!(
                "the query projection's input width ({q_in}) must equal the MoLoRA projections' input width ({m_in})"
            );
        }
        let fresh = self.allocation == AllocationMode::Fresh;
        if self.top_k == 0 || (!fresh && (self.num_experts < 2 || self.top_k > self.num_experts)) {
            bail!(
                "need 2 <= num_experts and 1 <= top_k <= num_experts (got E={}, k={})",
                self.num_experts,
                self.top_k
            );
        }
        if self.rank == 0 || self.iterations == 0 || self.batch_size == 0 {
            bail!("rank, iterations and batch_size must be positive");
        }
        let positive = |x: f32| x.is_finite() && x > 0.0;
        if !positive(self.learning_rate) || !positive(self.lr_decay_factor) {
            bail!("learning_rate and lr_decay_factor must be positive");
        }
        if !(self.router_lr_scale.is_finite() && self.router_lr_scale >= 0.0) {
            bail!(
                "router_lr_scale must be zero (frozen routers) or positive, got {}",
                self.router_lr_scale
            );
        }
        self.validate_beyond_paper(model, in_dim)
    }

    /// The checks of the settings that go beyond the paper.
    fn validate_beyond_paper(
        &self,
        model: &ModelConfig,
        in_dim: impl Fn(MlpProj) -> Option<usize>,
    ) -> Result<()> {
        let first = self.molora_blocks[0];
        let key_store = self.deferral == Deferral::KeyStore;
        if key_store {
            let mut sites = vec![("key", self.key_block, self.key_proj)];
            if self.relation_check {
                sites.push(("relation", self.relation_block, self.relation_proj));
            }
            for (what, block, proj) in sites {
                if block >= first {
                    bail!(
                        "{what}_block ({block}) must come before the first MoLoRA block ({first}): \
                         the key store decides scope before any MoLoRA layer runs"
                    );
                }
                let width = in_dim(proj).with_context(|| {
                    format!(
                        "{what}_proj {proj:?} does not exist in a {} model",
                        model.arch.as_str()
                    )
                })?;
                if what == "key" && self.key_dim > width {
                    bail!(
                        "key_dim ({}) is wider than the key itself ({width} at {proj:?})",
                        self.key_dim
                    );
                }
            }
            if !(self.scope_threshold.is_finite() && (-1.0..=1.0).contains(&self.scope_threshold)) {
                bail!(
                    "scope_threshold is a cosine similarity in [-1, 1], got {}",
                    self.scope_threshold
                );
            }
            if !(self.scope_quantile.is_finite() && (0.0..1.0).contains(&self.scope_quantile)) {
                bail!(
                    "scope_quantile is a quantile in [0, 1) (0: the fixed scope_threshold), got {}",
                    self.scope_quantile
                );
            }
            if let Some(m) = self.key_ceiling_margin {
                if !(m.is_finite() && (0.0..=2.0).contains(&m)) {
                    bail!("key_ceiling_margin is a cosine margin in [0, 2], got {m}");
                }
            }
            if !(1..=64).contains(&self.key_position_means) {
                bail!(
                    "key_position_means counts leading positions with a background mean of their \
                     own, 1 to 64 (1: position 0 only), got {}",
                    self.key_position_means
                );
            }
            if !(self.relation_words.is_finite() && self.relation_words >= 0.0) {
                bail!("relation_words must be >= 0, got {}", self.relation_words);
            }
            if self.relation_words > 0.0 && !self.relation_check {
                bail!(
                    "relation_words = {} needs relation_check = true: the words weigh in the \
                     relation key's choice among a subject's edits",
                    self.relation_words
                );
            }
            if !(self.relation_margin.is_finite() && self.relation_margin >= 0.0) {
                bail!("relation_margin must be >= 0, got {}", self.relation_margin);
            }
            if !(1..=8).contains(&self.key_span) {
                bail!(
                    "key_span counts the subject tokens a key is read at, 1 to 8, got {}",
                    self.key_span
                );
            }
            if self.key_span > 1 && self.key != KeyKind::Subject {
                bail!(
                    "key_span = {} needs key = \"subject\": only subject keys are read at \
                     tokens (the other kinds pool the prompt into one key)",
                    self.key_span
                );
            }
        }
        let stored = self.inference_allocation == InferenceAllocation::Stored;
        if stored && !key_store {
            bail!(
                "inference_allocation = \"stored\" needs deferral = \"key_store\": only the key \
                 store knows which edit a prompt is about"
            );
        }
        match (self.allocation, stored) {
            (AllocationMode::Fresh | AllocationMode::LeastUsed, false) => bail!(
                "allocation = {:?} needs inference_allocation = \"stored\": the routers would \
                 not answer with the experts it picks",
                self.allocation
            ),
            (AllocationMode::RouterFirstIteration, true) => bail!(
                "allocation = \"router_first_iteration\" needs the routers \
                 (inference_allocation = \"router\")"
            ),
            _ => {}
        }
        if self.expert_rows == ExpertRows::Answer && !stored {
            bail!("expert_rows = \"answer\" needs inference_allocation = \"stored\"");
        }
        if self.expert_rows == ExpertRows::Subject && !(stored && self.key == KeyKind::Subject) {
            bail!(
                "expert_rows = \"subject\" needs subject keys and the stored allocation \
                 (key = \"subject\", inference_allocation = \"stored\"): the key store finds the \
                 subject's row"
            );
        }
        if self.augment_questions > QUESTION_FRAMES.len() {
            bail!(
                "augment_questions is at most {} (the question framings there are)",
                QUESTION_FRAMES.len()
            );
        }
        if !stored
            && (self.replay > 0
                || self.augment_prefixes > 0
                || self.augment_questions > 0
                || self.negatives > 0
                || self.subject_negatives > 0
                || self.reworded_negatives > 0)
        {
            bail!(
                "replay, augment_prefixes and negatives train with each sequence's stored \
                 allocation: they need inference_allocation = \"stored\""
            );
        }
        if !(self.negative_weight.is_finite() && self.negative_weight >= 0.0) {
            bail!("negative_weight must be >= 0, got {}", self.negative_weight);
        }
        if !(self.delta_penalty.is_finite() && self.delta_penalty >= 0.0) {
            bail!("delta_penalty must be >= 0, got {}", self.delta_penalty);
        }
        if !(self.answer_gate.is_finite() && (0.0..1.0).contains(&self.answer_gate)) {
            bail!(
                "answer_gate is a probability in [0, 1) (0: off), got {}",
                self.answer_gate
            );
        }
        if self.answer_gate > 0.0 && !stored {
            bail!(
                "answer_gate needs inference_allocation = \"stored\": the gate asks the matched \
                 edit's own experts for that edit's answer"
            );
        }
        if self.answer_gate_fallback && !(self.answer_gate > 0.0 && self.relation_check) {
            bail!(
                "answer_gate_fallback needs answer_gate > 0 and relation_check = true: it tries \
                 the edit the relation key ranked next when the gate turns the first away"
            );
        }
        if !(1..=MAX_GATE_CANDIDATES).contains(&self.answer_gate_candidates) {
            bail!(
                "answer_gate_candidates is how many candidate edits the gate asks, 1 to \
                 {MAX_GATE_CANDIDATES}, got {}",
                self.answer_gate_candidates
            );
        }
        if self.answer_gate_candidates > 1 {
            if !(self.answer_gate > 0.0 && self.relation_check) {
                bail!(
                    "answer_gate_candidates > 1 needs answer_gate > 0 and relation_check = true: \
                     it asks the experts of the edits the relation key ranked"
                );
            }
            if self.answer_gate_fallback {
                bail!(
                    "answer_gate_candidates > 1 already asks the runner-up: set \
                     answer_gate_fallback = false"
                );
            }
        }
        if !(self.stop_loss.is_finite() && self.stop_loss >= 0.0) {
            bail!(
                "stop_loss must be >= 0 (0: no early stop), got {}",
                self.stop_loss
            );
        }
        Ok(())
    }

    /// The settings this configuration uses that the CUDA path does not have yet, by name
    /// (empty: it runs on the GPU): what editing lacks there and what answering lacks.
    pub fn gpu_unsupported(&self) -> Vec<&'static str> {
        let mut out = self.gpu_training_unsupported();
        for name in self.gpu_inference_unsupported() {
            if !out.contains(&name) {
                out.push(name);
            }
        }
        out
    }

    /// What the GPU's edit step lacks. Under the stored allocation the device trains each
    /// sequence's own experts (`runtime::cuda::train::stored`, driven by the CPU's batch logic:
    /// fresh experts, prefixed and reworded copies, negatives, replays, early stops), all but
    /// the options below; under routers it trains the paper's routers on a fixed pool.
    pub fn gpu_training_unsupported(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !self.uses_routers() {
            for (set, name) in [
                (self.delta_penalty > 0.0, "delta_penalty"),
                (
                    self.expert_rows == ExpertRows::Subject,
                    "expert_rows = \"subject\"",
                ),
            ] {
                if set {
                    out.push(name);
                }
            }
            return out;
        }
        if self.deferral != Deferral::Codebook {
            out.push("deferral = \"key_store\"");
        }
        match self.allocation {
            AllocationMode::LeastUsed => out.push("allocation = \"least_used\""),
            AllocationMode::Fresh => out.push("allocation = \"fresh\""),
            _ => {}
        }
        for (set, name) in [
            (self.replay > 0, "replay"),
            (self.augment_prefixes > 0, "augment_prefixes"),
            (self.augment_questions > 0, "augment_questions"),
            (self.negatives > 0, "negatives"),
            (self.reworded_negatives > 0, "reworded_negatives"),
            (self.subject_negatives > 0, "subject_negatives"),
            (self.delta_penalty > 0.0, "delta_penalty"),
            (self.stop_loss > 0.0, "stop_loss"),
        ] {
            if set {
                out.push(name);
            }
        }
        out
    }

    /// What answering on the GPU lacks: the key store, the stored allocation, the answer rows
    /// and the answer gate with its fallback and candidates are there
    /// (`runtime::cuda::elder_keys`); the subject's row and pooled queries not yet.
    pub fn gpu_inference_unsupported(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        let key_store = self.deferral == Deferral::KeyStore;
        for (set, name) in [
            (
                self.expert_rows == ExpertRows::Subject,
                "expert_rows = \"subject\"",
            ),
            (
                self.query_pooling != QueryPooling::LastToken,
                "query_pooling = \"prompt_mean\"",
            ),
            (
                key_store && self.key != KeyKind::Subject,
                "a key other than key = \"subject\"",
            ),
            (key_store && self.key_dim != 0, "key_dim"),
            (
                key_store && self.inference_allocation == InferenceAllocation::Router,
                "deferral = \"key_store\" with inference_allocation = \"router\"",
            ),
        ] {
            if set {
                out.push(name);
            }
        }
        out
    }

    /// Whether the routers choose the experts (the paper) rather than the key store.
    pub fn uses_routers(&self) -> bool {
        self.inference_allocation == InferenceAllocation::Router
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    fn cfg(arch: Arch, layers: usize) -> ModelConfig {
        ModelConfig {
            arch,
            vocab_size: 10,
            hidden_size: 8,
            num_layers: layers,
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
        }
    }

    /// A state written before `relation_key` existed keeps the last-token relation keys it was
    /// built with; the default preset reads the context around the subject.
    #[test]
    fn configs_without_a_relation_key_keep_last_token_keys() {
        let model = cfg(Arch::Llama, 30);
        let default = ElderConfig::preset(Preset::Default, &model);
        assert_eq!(default.relation_key, RelationKey::WeightedContext);
        assert_eq!(default.relation_proj, MlpProj::DownProj);
        let mut old = serde_json::to_value(&default).unwrap();
        old.as_object_mut().unwrap().remove("relation_key");
        let old: ElderConfig = serde_json::from_value(old).unwrap();
        assert_eq!(old.relation_key, RelationKey::LastToken);
        assert_eq!(
            ElderConfig::preset(Preset::Paper, &model).relation_key,
            RelationKey::LastToken
        );
    }

    #[test]
    fn gpt2_xl_placement_matches_the_code_lineage() {
        let c = ElderConfig::preset_for(&cfg(Arch::Gpt2, 48));
        assert_eq!(c.query_block, 35);
        assert_eq!(c.molora_blocks, (36..42).collect::<Vec<_>>());
        assert_eq!(c.code_bits(), 24);
    }

    /// The answer gate: on in the default preset, off in the paper's and in states written
    /// before it existed; a probability, only with the stored allocation; the GPU names it.
    #[test]
    fn the_answer_gate_is_a_probability_of_the_default_preset() {
        let model = cfg(Arch::Llama, 30);
        let default = ElderConfig::preset(Preset::Default, &model);
        assert_eq!(default.answer_gate, 0.05);
        assert_eq!(ElderConfig::preset(Preset::Paper, &model).answer_gate, 0.0);
        let mut old = serde_json::to_value(&default).unwrap();
        old.as_object_mut().unwrap().remove("answer_gate");
        let old: ElderConfig = serde_json::from_value(old).unwrap();
        assert_eq!(old.answer_gate, 0.0);
        assert!(!default.gpu_unsupported().contains(&"answer_gate"));
        let fallback = ElderConfig {
            answer_gate_fallback: true,
            ..default.clone()
        };
        assert!(fallback.gpu_unsupported().is_empty());
        for bad in [-0.1, 1.0, f32::NAN] {
            let c = ElderConfig {
                answer_gate: bad,
                ..default.clone()
            };
            let err = c.validate(&model).unwrap_err().to_string();
            assert!(err.contains("answer_gate"), "{bad}: {err}");
        }
        let routed = ElderConfig {
            answer_gate: 0.05,
            ..ElderConfig::preset(Preset::Paper, &model)
        };
        let err = routed.validate(&model).unwrap_err().to_string();
        assert!(err.contains("answer_gate needs"), "{err}");
    }

    /// How many candidates the gate asks: 1 (only the match) in states written before the
    /// option, 1 to 8, only with the gate and a relation check, not beside the fallback (which
    /// it covers); the GPU has it.
    #[test]
    fn the_gate_asks_one_to_eight_candidates() {
        let model = cfg(Arch::Llama, 30);
        let default = ElderConfig::preset(Preset::Default, &model);
        let mut old = serde_json::to_value(&default).unwrap();
        old.as_object_mut()
            .unwrap()
            .remove("answer_gate_candidates");
        let old: ElderConfig = serde_json::from_value(old).unwrap();
        assert_eq!(old.answer_gate_candidates, 1);
        let asking = |n: usize| ElderConfig {
            answer_gate_candidates: n,
            ..default.clone()
        };
        for n in [1, 2, MAX_GATE_CANDIDATES] {
            asking(n).validate(&model).unwrap();
        }
        for n in [0, MAX_GATE_CANDIDATES + 1] {
            let err = asking(n).validate(&model).unwrap_err().to_string();
            assert!(
                err.contains("answer_gate_candidates is how many"),
                "{n}: {err}"
            );
        }
        for (c, why) in [
            (
                ElderConfig {
                    answer_gate: 0.0,
                    ..asking(3)
                },
                "needs answer_gate > 0",
            ),
            (
                ElderConfig {
                    relation_check: false,
                    relation_words: 0.0,
                    ..asking(3)
                },
                "needs answer_gate > 0",
            ),
            (
                ElderConfig {
                    answer_gate_fallback: true,
                    ..asking(3)
                },
                "already asks the runner-up",
            ),
        ] {
            let err = c.validate(&model).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
        // The GPU asks the candidates as the CPU does.
        assert!(asking(3).gpu_unsupported().is_empty());
    }

    /// Relation words weigh in the relation key's choice: they need it, and a weight is >= 0.
    #[test]
    fn relation_words_need_the_relation_check() {
        let model = cfg(Arch::Llama, 30);
        let default = ElderConfig::preset(Preset::Default, &model);
        assert!(default.relation_words > 0.0 && default.validate(&model).is_ok());
        assert_eq!(
            ElderConfig::preset(Preset::Paper, &model).relation_words,
            0.0
        );
        for (c, why) in [
            (
                ElderConfig {
                    relation_check: false,
                    ..default.clone()
                },
                "needs relation_check = true",
            ),
            (
                ElderConfig {
                    relation_words: -1.0,
                    ..default.clone()
                },
                "must be >= 0",
            ),
        ] {
            let err = c.validate(&model).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
    }

    /// What the GPU lacks, by what a command does: the default preset lacks nothing (its queries
    /// answer there and its edits train there); the stored allocation's options the device does
    /// not train are named; the paper's method lacks nothing.
    #[test]
    fn the_gpu_runs_both_presets() {
        let model = cfg(Arch::Llama, 30);
        let default = ElderConfig::preset(Preset::Default, &model);
        assert!(default.gpu_inference_unsupported().is_empty());
        assert!(
            default.gpu_training_unsupported().is_empty(),
            "{:?}",
            default.gpu_training_unsupported()
        );
        let heavier = ElderConfig {
            replay: 2,
            subject_negatives: 3,
            reworded_negatives: 2,
            ..default.clone()
        };
        assert!(heavier.gpu_unsupported().is_empty());
        let answer_rows = ElderConfig {
            expert_rows: ExpertRows::Answer,
            ..default.clone()
        };
        assert!(answer_rows.gpu_unsupported().is_empty());
        let penalised = ElderConfig {
            delta_penalty: 0.1,
            expert_rows: ExpertRows::Subject,
            ..default.clone()
        };
        assert_eq!(
            penalised.gpu_training_unsupported(),
            vec!["delta_penalty", "expert_rows = \"subject\""]
        );
        let routed_keys = ElderConfig {
            inference_allocation: InferenceAllocation::Router,
            ..default.clone()
        };
        assert_eq!(routed_keys.gpu_inference_unsupported().len(), 1);
        for name in [
            "deferral = \"key_store\"",
            "allocation = \"fresh\"",
            "stop_loss",
        ] {
            assert!(
                routed_keys.gpu_training_unsupported().contains(&name),
                "{name}"
            );
        }
        assert!(ElderConfig::preset(Preset::Paper, &model)
            .gpu_unsupported()
            .is_empty());
    }

    #[test]
    fn small_models_get_a_valid_placement() {
        for n in [2, 3, 7, 12, 30] {
            let c = ElderConfig::preset_for(&cfg(Arch::Llama, n));
            assert!(c.query_block < c.molora_blocks[0]);
            assert!(*c.molora_blocks.last().unwrap() < n, "{n}: {c:?}");
        }
    }

    #[test]
    fn toml_overrides_apply_on_the_preset() {
        let c = ElderConfig::from_toml_str(
            "num_experts = 8\nrenormalize = true",
            &cfg(Arch::Gpt2, 12),
            Preset::Paper,
        )
        .unwrap();
        assert_eq!(c.num_experts, 8);
        assert!(c.renormalize);
        assert_eq!(c.query_block, 5);
        let err = ElderConfig::from_toml_str("num_expert = 8", &cfg(Arch::Gpt2, 12), Preset::Paper)
            .unwrap_err();
        assert!(format!("{err:#}").contains("num_expert"), "{err:#}");
    }

    #[test]
    fn both_presets_validate_and_the_file_can_pick_one() {
        for arch in [Arch::Gpt2, Arch::Llama] {
            let m = cfg(arch, 30);
            for p in [Preset::Paper, Preset::Default] {
                let c = ElderConfig::preset(p, &m);
                c.validate(&m)
                    .unwrap_or_else(|e| panic!("{p:?} {arch:?}: {e:#}"));
                assert_eq!(c.preset, p);
            }
            for p in [Preset::Paper, Preset::Default] {
                assert!(ElderConfig::preset(p, &m).gpu_unsupported().is_empty());
            }
        }
        let m = cfg(Arch::Llama, 30);
        let c = ElderConfig::from_toml_str("preset = \"paper\"\nrank = 2", &m, Preset::Default)
            .unwrap();
        assert_eq!(
            c,
            ElderConfig {
                rank: 2,
                ..ElderConfig::preset_for(&m)
            }
        );
        let err = ElderConfig::from_toml_str("preset = \"papr\"", &m, Preset::Default).unwrap_err();
        assert!(format!("{err:#}").contains("paper"), "{err:#}");
    }

    #[test]
    fn an_absurd_expert_count_is_refused() {
        let m = ModelConfig {
            max_positions: 16,
            ..crate::model::presets::preset(crate::model::Arch::Llama, "tiny").unwrap()
        };
        let cfg = ElderConfig {
            num_experts: usize::MAX / 2,
            ..ElderConfig::preset(Preset::Paper, &m)
        };
        let e = cfg.validate(&m).unwrap_err().to_string();
        assert!(e.contains("num_experts") && e.contains("too large"), "{e}");
    }

    #[test]
    fn settings_that_need_the_key_store_are_refused_without_it() {
        let m = cfg(Arch::Llama, 30);
        let paper = ElderConfig::preset_for(&m);
        let stored = ElderConfig {
            inference_allocation: InferenceAllocation::Stored,
            ..paper.clone()
        };
        let e = format!("{:#}", stored.validate(&m).unwrap_err());
        assert!(e.contains("key_store"), "{e}");
        let fresh = ElderConfig {
            allocation: AllocationMode::Fresh,
            ..paper.clone()
        };
        let e = format!("{:#}", fresh.validate(&m).unwrap_err());
        assert!(e.contains("stored"), "{e}");
        let late_key = ElderConfig {
            key_block: 29,
            ..ElderConfig::preset(Preset::Default, &m)
        };
        let e = format!("{:#}", late_key.validate(&m).unwrap_err());
        assert!(e.contains("key_block (29)"), "{e}");
    }
}
