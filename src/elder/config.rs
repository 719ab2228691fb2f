//! The method's hyperparameters, with the defaults of elder-method.md and per-family placements.
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
    /// Records of the edit stream whose prompts (edit, rephrasings, locality) calibrate the mean.
    pub calibration_records: usize,
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
        }
    }
}

/// Number of MoLoRA layers the defaults use.
const DEFAULT_LAYERS: usize = 6;

impl ElderConfig {
    /// The preset for a base model: six consecutive MoLoRA layers starting three quarters deep (GPT2-XL:
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

    /// Reads a TOML file of overrides on top of the model's preset.
    pub fn from_toml_file(path: &Path, cfg: &ModelConfig) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read ELDER config {}", path.display()))?;
        Self::from_toml_str(&text, cfg)
            .with_context(|| format!("in ELDER config {}", path.display()))
    }

    pub fn from_toml_str(text: &str, cfg: &ModelConfig) -> Result<Self> {
        // Start from the preset, then apply whatever keys the file sets.
        let mut base = toml::Value::try_from(Self::preset_for(cfg))?;
        let overrides: toml::Value = toml::from_str(text)?;
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
        if self.query_block >= self.molora_blocks[0] {
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
        if q_in != m_in {
            bail!(
                "the query projection's input width ({q_in}) must equal the MoLoRA projections' input width ({m_in})"
            );
        }
        if self.num_experts < 2 || self.top_k == 0 || self.top_k > self.num_experts {
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
        Ok(())
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

    #[test]
    fn gpt2_xl_placement_matches_the_code_lineage() {
        let c = ElderConfig::preset_for(&cfg(Arch::Gpt2, 48));
        assert_eq!(c.query_block, 35);
        assert_eq!(c.molora_blocks, (36..42).collect::<Vec<_>>());
        assert_eq!(c.code_bits(), 24);
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
        let c =
            ElderConfig::from_toml_str("num_experts = 8\nrenormalize = true", &cfg(Arch::Gpt2, 12))
                .unwrap();
        assert_eq!(c.num_experts, 8);
        assert!(c.renormalize);
        assert_eq!(c.query_block, 5);
        let err = ElderConfig::from_toml_str("num_expert = 8", &cfg(Arch::Gpt2, 12)).unwrap_err();
        assert!(format!("{err:#}").contains("num_expert"), "{err:#}");
    }
}
