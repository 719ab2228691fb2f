//! Reading the frozen model's activations at chosen MLP projections: the inputs the key store
//! keeps (and the query its routers read) come from here.

use std::collections::BTreeMap;

use crate::model::layers::Site;
use crate::model::runner::pad_batch;
use crate::model::{Adapter, BatchShape, KvCache, Model, ModelConfig};

/// Each prompt's inputs of some sites: site -> `[prompt.len(), width]` (f32).
pub type SiteInputs = BTreeMap<Site, Vec<f32>>;

/// What reads the frozen model's inputs of MLP sites for prompts (the key store's keys and its
/// background): the CPU model ([`CpuSites`]) or a device's forward (the CUDA model), so the key
/// store is written once for both.
pub trait SiteReader {
    /// The model it reads.
    fn model_config(&self) -> &ModelConfig;
    /// For each prompt, the inputs of every site in `sites`, through the frozen blocks up to the
    /// last site's block only.
    fn site_inputs(
        &mut self,
        prompts: &[Vec<u32>],
        sites: &[Site],
    ) -> anyhow::Result<Vec<SiteInputs>>;
}

/// The CPU model as a [`SiteReader`] ([`capture_inputs`]).
pub struct CpuSites<'m>(pub &'m Model);

impl SiteReader for CpuSites<'_> {
    fn model_config(&self) -> &ModelConfig {
        &self.0.cfg
    }

    fn site_inputs(
        &mut self,
        prompts: &[Vec<u32>],
        sites: &[Site],
    ) -> anyhow::Result<Vec<SiteInputs>> {
        Ok(capture_inputs(self.0, prompts, sites))
    }
}

/// An adapter that keeps the input of each wanted site, every row of the first call that
/// reaches it (later calls, such as decode steps, leave it as it is).
#[derive(Debug, Default)]
pub struct SiteCapture {
    wanted: Vec<Site>,
    /// Site -> its input `[rows, width]`.
    pub inputs: BTreeMap<Site, Vec<f32>>,
}

impl SiteCapture {
    pub fn new(wanted: &[Site]) -> Self {
        SiteCapture {
            wanted: wanted.to_vec(),
            inputs: BTreeMap::new(),
        }
    }

    /// Records `x` if `site` is wanted and not captured yet.
    pub fn offer(&mut self, site: Site, x: &[f32]) {
        if self.wanted.contains(&site) && !self.inputs.contains_key(&site) {
            self.inputs.insert(site, x.to_vec());
        }
    }

    /// Whether every wanted site has been captured.
    pub fn complete(&self) -> bool {
        self.wanted.iter().all(|s| self.inputs.contains_key(s))
    }
}

impl Adapter for SiteCapture {
    fn after_linear(&mut self, site: Site, _: &BatchShape, x: &[f32], _: &mut [f32]) {
        self.offer(site, x);
    }

    fn backward_linear(
        &mut self,
        _: Site,
        _: &BatchShape,
        _: &[f32],
        _: &[f32],
        _: Option<&mut [f32]>,
    ) {
    }
}

/// The inputs of `sites` for each prompt, through the frozen blocks up to the last site's block
/// only: per prompt, site -> `[prompt.len(), width]`.
pub fn capture_inputs(model: &Model, prompts: &[Vec<u32>], sites: &[Site]) -> Vec<SiteInputs> {
    let Some(last) = sites.iter().map(|s| s.block).max() else {
        return vec![BTreeMap::new(); prompts.len()];
    };
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(16) {
        let (ids, shape) = pad_batch(chunk, &vec![0; chunk.len()]);
        let mut cache = KvCache::new(&model.cfg, shape.batch, shape.seq);
        let mut h = model.embed(&ids, &shape);
        let mut capture = SiteCapture::new(sites);
        for l in 0..=last {
            model.attn_half(l, &mut h, &shape, &mut cache, None);
            model.mlp_half(l, &mut h, &shape, &mut capture, None);
        }
        out.extend(per_prompt(&capture.inputs, chunk, &shape));
    }
    out
}

/// A padded batch's inputs of some sites (`[rows, width]` each) split into each prompt's own rows.
pub fn per_prompt(
    inputs: &BTreeMap<Site, Vec<f32>>,
    prompts: &[Vec<u32>],
    shape: &BatchShape,
) -> Vec<SiteInputs> {
    prompts
        .iter()
        .enumerate()
        .map(|(b, prompt)| {
            inputs
                .iter()
                .map(|(&site, x)| {
                    let width = x.len() / shape.rows();
                    let start = b * shape.seq * width;
                    (site, x[start..start + prompt.len() * width].to_vec())
                })
                .collect()
        })
        .collect()
}
