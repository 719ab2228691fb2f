//! The CUDA model as a [`SiteReader`]: the key store's keys and background read on the device's
//! forward (blocks up to the last site's only), so a default-preset edit on the GPU does not
//! build the f32 CPU model for them. The CPU twin is `elder::capture::capture_inputs`.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaSlice;

use crate::backend::cuda::buffers::KernelDtype;
use crate::backend::cuda::device::GpuDevice;
use crate::elder::capture::{per_prompt, SiteInputs, SiteReader};
use crate::model::layers::Site;
use crate::model::names::site_dims;
use crate::model::runner::pad_batch;
use crate::model::{BatchShape, ModelConfig};

use super::blocks::SiteHook;
use super::forward::GpuModel;
use super::plan::Capacity;

/// Prompts per forward (as `capture_inputs`).
const CHUNK: usize = 16;

/// Downloads the input of each wanted site, the first time the forward reaches it.
struct SiteDownloads {
    wanted: Vec<(Site, usize)>,
    inputs: BTreeMap<Site, Vec<f32>>,
}

impl<T: KernelDtype> SiteHook<T> for SiteDownloads {
    fn after_linear(
        &mut self,
        dev: &GpuDevice,
        site: Site,
        shape: &BatchShape,
        x: &CudaSlice<T>,
        _out: &mut CudaSlice<T>,
    ) -> Result<()> {
        let Some(&(_, width)) = self.wanted.iter().find(|(s, _)| *s == site) else {
            return Ok(());
        };
        if let std::collections::btree_map::Entry::Vacant(slot) = self.inputs.entry(site) {
            slot.insert(dev.download_f32::<T, _>(&x.slice(0..shape.rows() * width))?);
        }
        Ok(())
    }
}

impl<T: KernelDtype> SiteReader for GpuModel<T>
where
    CudaBlas: Gemm<T>,
{
    fn model_config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn site_inputs(&mut self, prompts: &[Vec<u32>], sites: &[Site]) -> Result<Vec<SiteInputs>> {
        let Some(last) = sites.iter().map(|s| s.block).max() else {
            return Ok(vec![BTreeMap::new(); prompts.len()]);
        };
        let wanted = sites
            .iter()
            .map(|&s| {
                site_dims(&self.cfg, s.proj)
                    .map(|(width, _)| (s, width))
                    .with_context(|| format!("{:?} does not exist in this model", s.proj))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(prompts.len());
        for chunk in prompts.chunks(CHUNK) {
            let (ids, shape) = pad_batch(chunk, &vec![0; chunk.len()]);
            self.reserve(Capacity {
                batch: shape.batch,
                seq: shape.seq,
            })?;
            let mut hook = SiteDownloads {
                wanted: wanted.clone(),
                inputs: BTreeMap::new(),
            };
            self.forward_through(&ids, &shape, last, &mut hook)
                .context("reading the key sites")?;
            for &(site, _) in &wanted {
                anyhow::ensure!(
                    hook.inputs.contains_key(&site),
                    "the forward never reached {site:?}"
                );
            }
            out.extend(per_prompt(&hook.inputs, chunk, &shape));
        }
        Ok(out)
    }
}
