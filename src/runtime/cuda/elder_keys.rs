//! ELDER with the key store on the device (`deferral = "key_store"`, `inference_allocation =
//! "stored"`): the CPU `ElderAdapter`'s inference with a key store, on the one CUDA block walk.
//!
//! Per prompt call: the key site's rows become unit keys on the device (`key_embed`); the
//! relation site's rows are copied to the host; at the first MoLoRA site one launch matches every
//! stored key against every position of every prompt (`key_match`), and the host takes the
//! decision from those scores with the CPU's own code (`Elder::rank_matches`: the relation
//! tie-break among the best edit's subject, the calibrated scope threshold); each sequence in
//! scope then gets its matched edit's stored experts, and every MoLoRA site adds them in one
//! gather/scatter launch, as with the paper's routing. Decode steps keep the prompt's decision.
//!
//! One host round trip per prompt call (the scores and the relation rows come back once the
//! match ran); the decision on the device is the next step of issue 15. The answer gate asks
//! through [`DeviceElder::gate_questions`] / [`DeviceElder::gate_answers`], driven by the request
//! layer (`GpuModel::answer_gate`), in rounds as the CPU's revisions: the first asks every
//! sequence in scope; with `answer_gate_fallback` a sequence turned away moves to its runner-up
//! edit (once), which the next round asks on a pass with that edit's experts; with
//! `answer_gate_candidates` each round asks the next candidate until all were asked, then the
//! best answers (`Elder::candidate_step`, the CPU's rule).

use std::ops::Range;

use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::CudaSlice;

use crate::backend::cuda::buffers::KernelDtype;
use crate::backend::cuda::device::GpuDevice;
use crate::backend::cuda::keystore::{self, KeyMatchOutputs, KeyMatchShape, StoredKeys};
use crate::backend::cuda::lora::{self, LoraSite};
use crate::backend::shapes::MixShape;
use crate::elder::codebook::Codebook;
use crate::elder::config::ExpertRows;
use crate::elder::keystore::KeyMatch;
use crate::elder::molora::{CandidateStep, Elder};
use crate::eval::{self, Routed};
use crate::model::layers::Site;
use crate::model::BatchShape;

use super::activations::write;
use super::blocks::SiteHook;
use super::elder::DeviceElder;
use super::plan::Capacity;

/// One MoLoRA layer's expert pool, `A [E, d_in, r]` and `B [E, r, d_out]` (f32).
struct Pool {
    a: CudaSlice<f32>,
    b: CudaSlice<f32>,
    experts: usize,
}

/// The key store on the device and its per-call buffers.
struct Matcher {
    key_site: Site,
    /// The relation check's site and its input width (its rows come back to the host).
    relation_site: Option<(Site, usize)>,
    /// The key space's width (keys are not projected on the device).
    width: usize,
    entries: usize,
    variants: usize,
    span: usize,
    keys: CudaSlice<f32>,
    key_rows: CudaSlice<u8>,
    ceilings: Option<(CudaSlice<f32>, f32)>,
    /// The background means the keys are centred on, stacked (position 0, the leading
    /// positions, the rest), and how many.
    means: Option<(CudaSlice<f32>, usize)>,
    queries: CudaSlice<f32>,
    lens: CudaSlice<i32>,
    out: KeyMatchOutputs,
}

impl Matcher {
    fn upload(dev: &GpuDevice, elder: &Elder) -> Result<Option<Self>> {
        let Some(store) = elder.key_store.as_ref().filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        ensure!(
            store.space.dim == store.space.width,
            "key_dim = {} (a projected key) is not on the GPU yet; use --device cpu for this state",
            elder.cfg.key_dim
        );
        let sites = elder.key_sites();
        let ceilings = match store.ceilings.margin {
            Some(m) if !store.ceilings.of_keys.is_empty() => Some((
                dev.upload(&store.ceilings.of_keys)
                    .context("uploading the key ceilings")?,
                m,
            )),
            _ => None,
        };
        let means = if store.space.centred {
            let (m, n) = store.space.background.stacked();
            Some((dev.upload(&m).context("uploading the background means")?, n))
        } else {
            None
        };
        Ok(Some(Matcher {
            key_site: sites[0],
            relation_site: sites
                .get(1)
                .copied()
                .zip(store.relation.as_ref().map(|r| r.space.width)),
            width: store.space.width,
            entries: store.len(),
            variants: store.variants,
            span: store.span,
            keys: dev
                .upload(&store.keys)
                .context("uploading the stored keys")?,
            key_rows: dev.upload(&store.key_rows)?,
            ceilings,
            means,
            queries: dev.zeros(1)?,
            lens: dev.zeros(1)?,
            out: KeyMatchOutputs::alloc(dev, 1, 1)?,
        }))
    }

    fn reserve(&mut self, dev: &GpuDevice, cap: Capacity) -> Result<()> {
        self.queries = dev.zeros(cap.rows() * self.width)?;
        self.lens = dev.zeros(cap.batch)?;
        self.out = KeyMatchOutputs::alloc(dev, cap.batch, self.entries)?;
        Ok(())
    }

    /// Each prompt's `(score, position)` per edit (`-inf`: nothing counted), from one launch.
    fn scores(
        &mut self,
        dev: &GpuDevice,
        prompt_rows: &[Range<usize>],
        seq: usize,
    ) -> Result<Vec<Vec<(f32, usize)>>> {
        let batch = prompt_rows.len();
        let lens: Vec<i32> = prompt_rows.iter().map(|r| r.len() as i32).collect();
        write(dev, &mut self.lens, &lens, "prompt lengths")?;
        let s = KeyMatchShape {
            batch,
            seq,
            dim: self.width,
            entries: self.entries,
            variants: self.variants,
            span: self.span,
        };
        let stored = StoredKeys {
            keys: &self.keys,
            key_rows: &self.key_rows,
            ceilings: self.ceilings.as_ref().map(|(c, m)| (c, *m)),
        };
        keystore::key_match(dev, &s, &self.queries, &self.lens, &stored, &mut self.out)
            .context("matching the key store")?;
        let best = dev.download(&self.out.best.slice(0..batch * self.entries))?;
        Ok(keystore::unpack_best(&best, self.entries)
            .into_iter()
            .map(|row| {
                row.into_iter()
                    .map(|m| m.unwrap_or((f32::NEG_INFINITY, 0)))
                    .collect()
            })
            .collect())
    }
}

/// The decision of the current request, and what went to the device of it.
struct Decision {
    matches: Vec<Option<KeyMatch>>,
    /// Each sequence's candidates, best first (`matches` holds the first).
    candidates: Vec<Vec<KeyMatch>>,
    in_scope: Vec<bool>,
    /// Sequences the answer gate turned away (empty without a gate).
    gated: Vec<bool>,
    /// The edit the gate asked for each sequence and log P(its answer) under its experts.
    asked: Vec<Vec<(usize, f32)>>,
    /// Gate rounds answered so far, and the sequences the last one moved to their runner-up
    /// edit (`answer_gate_fallback`: the next round asks them).
    rounds: usize,
    switched: Vec<bool>,
    /// Per layer `[B, k]`: each sequence's experts and gates.
    experts: Vec<u32>,
    gates: Vec<f32>,
    /// `expert_rows = "answer"`: each sequence's last prompt row (within it), the first the
    /// experts change in the prompt call.
    first_rows: Option<Vec<u32>>,
}

impl Decision {
    /// Writes the decision where the LoRA kernels read it.
    fn upload(&self, dev: &GpuDevice, to: &mut RequestBuffers) -> Result<()> {
        write(dev, &mut to.experts, &self.experts, "stored experts")?;
        write(dev, &mut to.gates, &self.gates, "stored gates")?;
        let mask: Vec<u8> = self.in_scope.iter().map(|&s| s as u8).collect();
        write(dev, &mut to.in_scope, &mask, "in-scope mask")?;
        match &self.first_rows {
            Some(rows) => write(dev, &mut to.first_rows, rows, "first changed rows"),
            None => Ok(()),
        }
    }
}

/// What the LoRA kernels read of a request's decision, sized for the reserved batch.
struct RequestBuffers {
    experts: CudaSlice<u32>,
    gates: CudaSlice<f32>,
    in_scope: CudaSlice<u8>,
    first_rows: CudaSlice<u32>,
}

impl RequestBuffers {
    fn new(dev: &GpuDevice, layers: usize, batch: usize, k: usize) -> Result<Self> {
        Ok(RequestBuffers {
            experts: dev.zeros(layers * batch * k)?,
            gates: dev.zeros(layers * batch * k)?,
            in_scope: dev.zeros(batch.max(1))?,
            first_rows: dev.zeros(batch.max(1))?,
        })
    }
}

pub struct GpuKeyElder {
    /// The host side of the decision: config, key store and memory (no experts).
    host: Elder,
    /// The stored keys (`None` before the first edit: nothing is in scope).
    matcher: Option<Matcher>,
    pools: Vec<Pool>,
    d_in: usize,
    d_out: usize,
    cap: Capacity,
    bufs: RequestBuffers,
    /// The request's prompt rows (`b * seq ..` of the prompt call) and what was read of it.
    prompt_rows: Vec<Range<usize>>,
    /// The prompt call's token ids (the relation words read them).
    prompt_ids: Vec<u32>,
    keys_read: bool,
    relation_rows: Option<(Vec<f32>, usize)>,
    decision: Option<Decision>,
}

impl GpuKeyElder {
    pub fn upload(dev: &GpuDevice, elder: &Elder, cap: Capacity) -> Result<Self> {
        let cfg = elder.cfg.clone();
        let missing = cfg.gpu_inference_unsupported();
        if !missing.is_empty() {
            bail!(
                "{} not on the GPU yet; use --device cpu for this state",
                missing.join(", ")
            );
        }
        let first = elder
            .layers
            .first()
            .context("the ELDER state has no MoLoRA layers")?;
        let (d_in, d_out) = (first.d_in, first.d_out);
        let pools = elder
            .layers
            .iter()
            .map(|l| {
                Ok(Pool {
                    a: dev.upload(&l.a).context("uploading the experts' A")?,
                    b: dev.upload(&l.b).context("uploading the experts' B")?,
                    experts: l.experts(cfg.rank),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // The host side keeps everything but the experts (they live on the device).
        let host = Elder {
            cfg: cfg.clone(),
            layers: Vec::new(),
            codebook: Codebook::new(cfg.code_bits())?,
            query_mean: None,
            key_store: elder.key_store.clone(),
            memory: elder.memory.clone(),
            word_map: elder.word_map.clone(),
        };
        let mut this = GpuKeyElder {
            matcher: Matcher::upload(dev, elder)?,
            pools,
            d_in,
            d_out,
            cap: Capacity { batch: 0, seq: 0 },
            bufs: RequestBuffers::new(dev, 1, 1, 1)?,
            prompt_rows: Vec::new(),
            prompt_ids: Vec::new(),
            keys_read: false,
            relation_rows: None,
            decision: None,
            host,
        };
        this.grow(dev, cap)?;
        Ok(this)
    }

    /// Matches the keys, decides on the host and uploads each sequence's experts.
    fn decide(&mut self, dev: &GpuDevice, shape: &BatchShape) -> Result<()> {
        let batch = self.prompt_rows.len();
        ensure!(
            batch == shape.batch,
            "ELDER began a request of {batch} sequences, the call has {}",
            shape.batch
        );
        let scores = match &mut self.matcher {
            Some(m) => {
                ensure!(
                    self.keys_read,
                    "the key store's site was not reached before the first MoLoRA layer"
                );
                m.scores(dev, &self.prompt_rows, shape.seq)?
            }
            None => vec![Vec::new(); batch],
        };
        let relation = self
            .relation_rows
            .as_ref()
            .map(|(rows, width)| (rows.as_slice(), *width));
        // Every candidate when the gate asks several (`answer_gate_candidates`), else the first.
        let candidates =
            self.host
                .rank_matches(scores, relation, &self.prompt_rows, Some(&self.prompt_ids));
        let matches: Vec<Option<KeyMatch>> = candidates
            .iter()
            .map(|ranked| KeyMatch::first_of(ranked))
            .collect();
        let in_scope = self.host.matches_in_scope(&matches);
        let (experts, gates) = self.stored_experts(&matches, &in_scope)?;
        // Without a gate nothing is turned away or asked (empty, as the CPU reports it).
        let gate = self.host.cfg.answer_gate > 0.0;
        let (gated, asked) = if gate {
            (vec![false; batch], vec![Vec::new(); batch])
        } else {
            (Vec::new(), Vec::new())
        };
        // Under `expert_rows = "answer"` the prompt call's rows change from the last prompt token.
        let first_rows = (self.host.cfg.expert_rows == ExpertRows::Answer).then(|| {
            self.prompt_rows
                .iter()
                .map(|r| r.len().saturating_sub(1) as u32)
                .collect()
        });
        let decision = Decision {
            asked,
            candidates,
            rounds: 0,
            switched: vec![false; batch],
            matches,
            in_scope,
            gated,
            experts,
            gates,
            first_rows,
        };
        decision.upload(dev, &mut self.bufs)?;
        self.decision = Some(decision);
        Ok(())
    }
}

impl GpuKeyElder {
    /// Per layer `[B, k]`: each sequence in scope gets its matched edit's stored experts, gate 1
    /// (out of scope: gate 0).
    fn stored_experts(
        &self,
        matches: &[Option<KeyMatch>],
        in_scope: &[bool],
    ) -> Result<(Vec<u32>, Vec<f32>)> {
        let (k, layers, batch) = (self.host.cfg.top_k, self.pools.len(), matches.len());
        let mut experts = vec![0u32; layers * batch * k];
        let mut gates = vec![0.0f32; layers * batch * k];
        for (b, (m, &inside)) in matches.iter().zip(in_scope).enumerate() {
            let Some(m) = m.filter(|_| inside) else {
                continue;
            };
            let allocation = &self.host.memory[m.entry].allocation;
            for (l, chosen) in allocation.iter().enumerate().take(layers) {
                ensure!(
                    chosen.len() == k,
                    "edit {} has {} experts in layer {l}, the config {k}",
                    self.host.memory[m.entry].id,
                    chosen.len()
                );
                let at = (l * batch + b) * k;
                experts[at..at + k].copy_from_slice(chosen);
                gates[at..at + k].fill(1.0);
            }
        }
        Ok((experts, gates))
    }

    /// Grows the per-call buffers to `cap` (never shrinks).
    fn grow(&mut self, dev: &GpuDevice, cap: Capacity) -> Result<()> {
        if self.cap.covers(cap) {
            return Ok(());
        }
        let cap = self.cap.union(cap);
        let (l, k) = (self.pools.len(), self.host.cfg.top_k);
        if let Some(m) = &mut self.matcher {
            m.reserve(dev, cap)?;
        }
        self.bufs = RequestBuffers::new(dev, l, cap.batch, k)?;
        self.cap = cap;
        // A request growing mid-way (the answer gate's longer pass) keeps its decision.
        if let Some(d) = &self.decision {
            d.upload(dev, &mut self.bufs)?;
        }
        Ok(())
    }
}

impl<T: KernelDtype> DeviceElder<T> for GpuKeyElder {
    fn reserve(&mut self, dev: &GpuDevice, cap: Capacity) -> Result<()> {
        self.grow(dev, cap)
    }

    /// A new request: sequence `b`'s prompt ends at row `query_rows[b]` (its rows start at
    /// `b * seq`, so the prompt is `b * seq ..= query_rows[b]`).
    fn begin(
        &mut self,
        _dev: &GpuDevice,
        query_rows: &[usize],
        seq: usize,
        ids: &[u32],
    ) -> Result<()> {
        ensure!(
            query_rows.len() <= self.cap.batch,
            "{} sequences exceed the {} reserved for ELDER",
            query_rows.len(),
            self.cap.batch
        );
        self.prompt_rows = query_rows
            .iter()
            .enumerate()
            .map(|(b, &last)| b * seq..last + 1)
            .collect();
        self.prompt_ids = ids.to_vec();
        self.keys_read = false;
        self.relation_rows = None;
        self.decision = None;
        Ok(())
    }

    fn report(&self, _dev: &GpuDevice) -> Result<Routed> {
        let Some(d) = &self.decision else {
            return Ok(Routed::default());
        };
        Ok(Routed {
            in_scope: d.in_scope.clone(),
            distances: vec![None; d.in_scope.len()],
            matches: eval::reported_matches(&self.host, &d.matches),
            gated: d.gated.clone(),
            asked: eval::reported_asked(&self.host, &d.asked),
        })
    }

    fn gate_questions(&self) -> Vec<(usize, Vec<u32>)> {
        let Some(d) = &self.decision else {
            return Vec::new();
        };
        d.matches
            .iter()
            .zip(&d.in_scope)
            .zip(&self.prompt_rows)
            .enumerate()
            .filter_map(|(b, ((m, &inside), rows))| {
                let asking = inside && (d.rounds == 0 || d.switched[b]);
                let answer = self.host.gate_question(m.as_ref(), asking, rows.len())?;
                Some((b, answer.to_vec()))
            })
            .collect()
    }

    fn gate_answers(&mut self, dev: &GpuDevice, logps: &[(usize, f32)]) -> Result<bool> {
        let Some(d) = &mut self.decision else {
            return Ok(false);
        };
        let first = d.rounds == 0;
        d.rounds += 1;
        d.switched.fill(false);
        let threshold = self.host.scope_threshold();
        let mut changed = false;
        for &(b, logp) in logps {
            if let (Some(m), Some(asked)) = (d.matches[b], d.asked.get_mut(b)) {
                asked.push((m.entry, logp));
            }
            if self.host.cfg.answer_gate_candidates > 1 {
                // The CPU's rule: the next candidate, or the best of those asked.
                let lps: Vec<f32> = d.asked[b].iter().map(|&(_, lp)| lp).collect();
                let prompt_len = self.prompt_rows.get(b).map_or(0, |r| r.len());
                match self
                    .host
                    .candidate_step(&d.candidates[b], &lps, prompt_len, threshold)
                {
                    CandidateStep::Ask(next) => {
                        d.matches[b] = Some(next);
                        d.switched[b] = true;
                        changed = true;
                    }
                    CandidateStep::Settle { answer: None, .. } => {
                        d.in_scope[b] = false;
                        d.gated[b] = true;
                        changed = true;
                    }
                    CandidateStep::Settle {
                        answer: Some(Some(m)),
                        ..
                    } => {
                        d.matches[b] = Some(m);
                        changed = true;
                    }
                    CandidateStep::Settle {
                        answer: Some(None), ..
                    } => {}
                }
                continue;
            }
            if self.host.gate_keeps(logp) {
                continue;
            }
            changed = true;
            // As the CPU's revision: once, to a runner-up edit still over the scope threshold.
            let next = d.matches[b]
                .and_then(|m| m.runner_up())
                .filter(|m| self.host.cfg.answer_gate_fallback && first && m.score >= threshold);
            match next {
                Some(m) => {
                    d.matches[b] = Some(m);
                    d.switched[b] = true;
                }
                None => {
                    d.in_scope[b] = false;
                    d.gated[b] = true;
                }
            }
        }
        if changed {
            let d = self.decision.as_ref().expect("decided above");
            let (experts, gates) = self.stored_experts(&d.matches, &d.in_scope)?;
            let d = self.decision.as_mut().expect("decided above");
            (d.experts, d.gates) = (experts, gates);
            d.upload(dev, &mut self.bufs)?;
        }
        Ok(changed)
    }
}

impl<T: KernelDtype> SiteHook<T> for GpuKeyElder {
    fn after_linear(
        &mut self,
        dev: &GpuDevice,
        site: Site,
        shape: &BatchShape,
        x: &CudaSlice<T>,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        if let (None, Some(m)) = (&self.decision, &mut self.matcher) {
            if site == m.key_site {
                keystore::key_embed::<T>(
                    dev,
                    shape.rows(),
                    shape.seq,
                    m.width,
                    x,
                    m.means.as_ref().map(|(means, n)| (means, *n)),
                    &mut m.queries,
                )
                .context("the prompt's keys")?;
                self.keys_read = true;
            }
            if let Some((relation_site, w)) = m.relation_site {
                if site == relation_site {
                    let host = dev.download_f32::<T, _>(&x.slice(0..shape.rows() * w))?;
                    self.relation_rows = Some((host, w));
                }
            }
        }
        let Some(layer) = self.host.cfg.layer_at(site) else {
            return Ok(());
        };
        if self.decision.is_none() {
            self.decide(dev, shape)?;
        }
        let d = self.decision.as_ref().expect("decided above");
        if !d.in_scope.iter().any(|&s| s) {
            return Ok(());
        }
        ensure!(
            shape.batch == d.in_scope.len(),
            "ELDER decided for {} sequences, the call has {}",
            d.in_scope.len(),
            shape.batch
        );
        let k = self.host.cfg.top_k;
        let bk = shape.batch * k;
        let pool = &self.pools[layer];
        let site_shape = LoraSite {
            shape: MixShape {
                batch: shape.batch,
                seq: shape.seq,
                d_in: self.d_in,
                d_out: self.d_out,
                rank: self.host.cfg.rank,
                k,
                scale: self.host.cfg.scale(),
            },
            n_experts: pool.experts,
        };
        let chosen = layer * bk..(layer + 1) * bk;
        // The prompt call changes each sequence from its first row on; later calls (decode steps,
        // after the cache) change every row, as on the CPU.
        let prompt_call = shape.start.iter().all(|&s| s == 0);
        let first_rows = (d.first_rows.is_some() && prompt_call).then_some(&self.bufs.first_rows);
        lora::lora_forward(
            dev,
            site_shape,
            x,
            &pool.a,
            &pool.b,
            &self.bufs.experts.slice(chosen.clone()),
            &self.bufs.gates.slice(chosen),
            Some(&self.bufs.in_scope),
            first_rows,
            None::<&mut CudaSlice<f32>>,
            out,
        )
        .with_context(|| format!("MoLoRA layer {layer} (block {})", site.block))
    }
}
