//! Builds a [`Model`] from any source of named tensors (a checkpoint on disk, or seeded random values)
//! following the model description of [`super::names::describe`].

use std::collections::HashMap;

use anyhow::{Context, Result};
use rand::Rng;
use rayon::prelude::*;

use super::config::ModelConfig;
use super::names::{describe, TensorSpec};
use super::presets::random_tensor;
use super::transformer::Model;
use super::weights::Weights;

/// Something that yields a model's tensors as f32, checked against the expected shape.
pub trait TensorSource: Sync {
    fn load(&self, spec: &TensorSpec) -> Result<Vec<f32>>;
}

/// Seeded random tensors, reproducible per (seed, tensor name) whatever the load order: the same
/// values `elder init-random` writes to disk.
pub struct RandomSource {
    pub seed: u64,
}

impl TensorSource for RandomSource {
    fn load(&self, spec: &TensorSpec) -> Result<Vec<f32>> {
        let n = spec.shape.iter().product();
        Ok(random_tensor(self.seed, &spec.name, n, spec.role))
    }
}

/// Box-Muller: one N(0,1) sample (for tests and initialisers that need single draws).
pub fn standard_normal(rng: &mut impl Rng) -> f32 {
    let u1: f32 = rng.gen_range(f32::MIN_POSITIVE..1.0);
    let u2: f32 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

impl TensorSource for Weights {
    /// Loads one tensor as f32, trying its aliases (GPT-2 keys without `transformer.`).
    fn load(&self, spec: &TensorSpec) -> Result<Vec<f32>> {
        self.load_spec(spec)
    }
}

/// Opens a model directory in the Hugging Face layout: `config.json` and the safetensors weights.
pub fn load_model_dir(dir: &std::path::Path) -> Result<Model> {
    let cfg = ModelConfig::from_dir(dir)?;
    let weights = Weights::open(dir)?;
    build_model(&cfg, &weights).with_context(|| format!("loading model from {}", dir.display()))
}

/// Loads every tensor of `cfg`'s family (in parallel) and assembles the model along
/// [`describe`]'s structure.
pub fn build_model(cfg: &ModelConfig, source: &dyn TensorSource) -> Result<Model> {
    cfg.validate()?;
    let desc = describe(cfg);
    let mut loaded: HashMap<&str, Vec<f32>> = desc
        .tensors()
        .par_iter()
        .map(|s| Ok((s.name.as_str(), source.load(s)?)))
        .collect::<Result<_>>()?;
    desc.try_map(|spec| {
        loaded
            .remove(spec.name.as_str())
            .with_context(|| format!("internal: tensor {} was not loaded", spec.name))
    })
}

/// Checks from the checkpoint's headers that every tensor of `cfg`'s family is there with its
/// shape and a readable dtype (nothing is read): a broken checkpoint is refused up front, before
/// a model is built or a byte is uploaded.
pub fn check_checkpoint(cfg: &ModelConfig, weights: &Weights) -> Result<()> {
    describe(cfg)
        .tensors()
        .into_iter()
        .try_for_each(|spec| weights.check_spec(spec))
}
