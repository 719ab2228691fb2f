//! Rolling one applied edit back: afterwards its prompt gets the base model's answer again and
//! every other edit keeps its own.
//!
//! Only where each edit is reached through its own key and its own stored allocation (the key
//! store with `inference_allocation = "stored"`, the default preset): the edit leaves the memory
//! and the key store, and the experts that no remaining edit uses are zeroed (a zero expert is
//! the base model; with `allocation = "fresh"` those are exactly the edit's own experts). Under
//! the paper's routing every edit shares the routers and experts with the others and its code is
//! in an append-only codebook, so one edit cannot be taken out without retraining; that is
//! refused by name.

use anyhow::{bail, Context, Result};

use super::config::{Deferral, InferenceAllocation};
use super::memory::expert_usage;
use super::molora::Elder;

impl Elder {
    /// Why this config cannot roll one edit back (`None`: it can).
    pub fn forget_unsupported(&self) -> Option<String> {
        if self.cfg.deferral != Deferral::KeyStore
            || self.cfg.inference_allocation != InferenceAllocation::Stored
        {
            return Some(format!(
                "the {} preset cannot roll one edit back: its edits share routers and experts, \
                 and its deferral codebook is append-only (the default preset can)",
                self.cfg.preset.as_str()
            ));
        }
        None
    }

    /// Takes the applied edit `id` out (see the module docs). The key store's scope calibration
    /// is recomputed as if the edit had never been applied.
    pub fn forget(&mut self, id: &str) -> Result<()> {
        if let Some(why) = self.forget_unsupported() {
            bail!("{why}");
        }
        let entry = self
            .memory
            .iter()
            .position(|e| e.id == id)
            .with_context(|| format!("edit {id:?} is not applied"))?;
        let removed = self.memory.remove(entry);
        let store = self
            .key_store
            .as_mut()
            .context("the state has no key store")?;
        anyhow::ensure!(
            store.len() == self.memory.len() + 1,
            "the key store holds {} edits, the memory {}",
            store.len(),
            self.memory.len() + 1
        );
        store.remove(entry);

        let rank = self.cfg.rank;
        let usage = expert_usage(
            &self.memory,
            self.layers.len(),
            self.layers.first().map_or(0, |l| l.experts(rank)),
        );
        for ((layer, chosen), used) in self.layers.iter_mut().zip(&removed.allocation).zip(&usage) {
            for &x in chosen {
                let x = x as usize;
                if used.get(x).copied().unwrap_or(0) == 0 {
                    layer.zero_expert(x, rank);
                }
            }
        }
        self.refresh_scope_calibration();
        Ok(())
    }
}
