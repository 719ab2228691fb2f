//! Converting ELDER's trainable state to and from the durable edit state's tensors.

use anyhow::{bail, Context, Result};

use crate::model::ModelConfig;

use super::codebook::Codebook;
use super::config::ElderConfig;
use super::molora::{Elder, MoloraLayer};
use super::state::{EditState, NamedTensor};

/// Name of the calibrated mean query in the state.
const QUERY_MEAN: &str = "query_mean";

fn tensor_name(layer: usize, block: usize, part: &str) -> String {
    format!("molora.{layer}.block{block}.{part}")
}

impl Elder {
    /// Every trainable tensor, named `molora.{layer}.block{block}.{lora_a|lora_b|router_w|router_b}`.
    pub fn named_tensors(&self) -> Vec<NamedTensor> {
        let mut out = Vec::new();
        for (i, (layer, &block)) in self.layers.iter().zip(&self.cfg.molora_blocks).enumerate() {
            for (part, shape, data) in layer.tensors(&self.cfg) {
                out.push(NamedTensor {
                    name: tensor_name(i, block, part),
                    shape,
                    data: data.clone(),
                });
            }
        }
        if let Some(mean) = &self.query_mean {
            out.push(NamedTensor {
                name: QUERY_MEAN.into(),
                shape: vec![mean.len()],
                data: mean.clone(),
            });
        }
        out
    }

    /// Rebuilds ELDER from a committed state (fresh initialisation when nothing was committed yet).
    pub fn from_state(cfg: ElderConfig, model: &ModelConfig, state: &EditState) -> Result<Self> {
        let mut elder = Elder::new(cfg, model)?;
        let Some(codebook) = state.codebook() else {
            return Ok(elder);
        };
        if codebook.bits_per_code() != elder.cfg.code_bits() {
            bail!(
                "edit state {} has {}-bit codes, the config needs {}",
                state.dir().display(),
                codebook.bits_per_code(),
                elder.cfg.code_bits()
            );
        }
        let cfg = elder.cfg.clone();
        for (i, layer) in elder.layers.iter_mut().enumerate() {
            let block = cfg.molora_blocks[i];
            let fresh: MoloraLayer = layer.clone();
            for ((part, shape, _), dst) in fresh.tensors(&cfg).into_iter().zip(layer.tensors_mut())
            {
                let name = tensor_name(i, block, part);
                let t = state.tensor(&name).with_context(|| {
                    format!("edit state {} has no tensor {name}", state.dir().display())
                })?;
                if t.shape != shape {
                    bail!(
                        "edit state tensor {name} has shape {:?}, expected {shape:?}",
                        t.shape
                    );
                }
                dst.clone_from(&t.data);
            }
        }
        elder.query_mean = state.tensor(QUERY_MEAN).map(|t| t.data.clone());
        elder.codebook =
            Codebook::from_words(codebook.bits_per_code(), codebook.entries().to_vec())?;
        Ok(elder)
    }
}
