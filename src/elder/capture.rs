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

    /// [`SiteReader::site_inputs`] for several groups of prompts, each with its own sites: each
    /// group's inputs exactly as it alone would get them. A reader may walk the blocks once for
    /// all the groups (the CPU does: [`capture_inputs_grouped`]).
    fn site_inputs_grouped(
        &mut self,
        groups: &[(&[Vec<u32>], &[Site])],
    ) -> anyhow::Result<Vec<Vec<SiteInputs>>> {
        groups
            .iter()
            .map(|(prompts, sites)| self.site_inputs(prompts, sites))
            .collect()
    }
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

    fn site_inputs_grouped(
        &mut self,
        groups: &[(&[Vec<u32>], &[Site])],
    ) -> anyhow::Result<Vec<Vec<SiteInputs>>> {
        Ok(capture_inputs_grouped(self.0, groups))
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
    capture_inputs_grouped(model, &[(prompts, sites)])
        .pop()
        .expect("one group in, one out")
}

/// Prompts padded and run together (at most [`PROMPTS_PER_PASS`]), with what they carry from
/// block to block.
struct Pass<'a> {
    group: usize,
    prompts: &'a [Vec<u32>],
    shape: BatchShape,
    cache: KvCache,
    h: Vec<f32>,
    capture: SiteCapture,
    /// The last block its group reads.
    last: usize,
}

/// Prompts one padded pass takes.
const PROMPTS_PER_PASS: usize = 16;

/// [`capture_inputs`] of several groups at once, each group's prompts with its own sites. Each
/// group gets the same padded passes and the same products as alone, so the same bits; the
/// blocks are walked once for all of them, each block's passes one after another, so that a
/// block's weights come from memory once for every group and not once per group (the key reads
/// of a batch of edits: a few rows each, where reading the weights is the cost).
pub fn capture_inputs_grouped(
    model: &Model,
    groups: &[(&[Vec<u32>], &[Site])],
) -> Vec<Vec<SiteInputs>> {
    let mut passes: Vec<Pass> = Vec::new();
    for (group, (prompts, sites)) in groups.iter().enumerate() {
        let Some(last) = sites.iter().map(|s| s.block).max() else {
            continue;
        };
        for chunk in prompts.chunks(PROMPTS_PER_PASS) {
            let (ids, shape) = pad_batch(chunk, &vec![0; chunk.len()]);
            passes.push(Pass {
                group,
                prompts: chunk,
                cache: KvCache::new(&model.cfg, shape.batch, shape.seq),
                h: model.embed(&ids, &shape),
                shape,
                capture: SiteCapture::new(sites),
                last,
            });
        }
    }
    let top = passes.iter().map(|p| p.last).max();
    for l in top.map_or(0..0, |top| 0..top + 1) {
        for p in passes.iter_mut().filter(|p| l <= p.last) {
            model.attn_half(l, &mut p.h, &p.shape, &mut p.cache, None);
            model.mlp_half(l, &mut p.h, &p.shape, &mut p.capture, None);
        }
    }
    let mut out: Vec<Vec<SiteInputs>> = groups
        .iter()
        .map(|(prompts, sites)| {
            // A group with no site reads nothing: an empty map per prompt.
            if sites.is_empty() {
                vec![BTreeMap::new(); prompts.len()]
            } else {
                Vec::with_capacity(prompts.len())
            }
        })
        .collect();
    for p in &passes {
        out[p.group].extend(per_prompt(&p.capture.inputs, p.prompts, &p.shape));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::MlpProj;
    use crate::model::loader::{build_model, RandomSource};
    use crate::model::Arch;

    fn tiny(arch: Arch) -> Model {
        let cfg = crate::model::presets::preset(arch, "tiny").unwrap();
        build_model(&cfg, &RandomSource { seed: 5 }).unwrap()
    }

    fn prompts(n: usize, seed: u32) -> Vec<Vec<u32>> {
        (0..n)
            .map(|i| {
                let len = 1 + (i * 7 + seed as usize) % 11;
                (0..len)
                    .map(|t| ((t as u32 + 1) * (seed + 3 + i as u32)) % 97)
                    .collect()
            })
            .collect()
    }

    fn bits(inputs: &[SiteInputs]) -> Vec<Vec<(Site, Vec<u32>)>> {
        inputs
            .iter()
            .map(|m| {
                m.iter()
                    .map(|(s, x)| (*s, x.iter().map(|v| v.to_bits()).collect()))
                    .collect()
            })
            .collect()
    }

    /// Groups read together give each group exactly what it gets alone: other groups, with other
    /// last blocks, more prompts than one pass takes, or no site at all, change nothing.
    #[test]
    fn grouped_reads_give_each_group_its_own_bits() {
        for arch in [Arch::Gpt2, Arch::Llama] {
            let model = tiny(arch);
            let proj = match arch {
                Arch::Gpt2 => MlpProj::CFc,
                Arch::Llama => MlpProj::DownProj,
            };
            let site = |block| Site { block, proj };
            // The tiny presets have two blocks.
            let deep = [site(0), site(1)];
            let shallow = [site(0)];
            let many = prompts(PROMPTS_PER_PASS + 3, 1);
            let one = prompts(1, 2);
            let two = prompts(2, 3);
            let groups: Vec<(&[Vec<u32>], &[Site])> = vec![
                (&one, &deep),
                (&two, &shallow),
                (&many, &shallow),
                (&two, &[]),
                (&one, &shallow),
            ];
            let together = capture_inputs_grouped(&model, &groups);
            assert_eq!(together.len(), groups.len());
            for (g, (p, s)) in groups.iter().enumerate() {
                let alone = capture_inputs(&model, p, s);
                assert_eq!(together[g].len(), p.len(), "{arch:?} group {g}");
                assert_eq!(bits(&together[g]), bits(&alone), "{arch:?} group {g}");
                for (prompt, inputs) in p.iter().zip(&together[g]) {
                    assert_eq!(inputs.len(), s.len());
                    for x in inputs.values() {
                        assert_eq!(x.len() % prompt.len(), 0);
                    }
                }
            }
        }
    }
}
