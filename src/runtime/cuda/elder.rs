//! ELDER on the device: the CPU [`Elder`]'s f32 experts, routers and codebook uploaded once, and
//! the per-request routing state that mirrors the CPU `ElderAdapter` in inference mode:
//! the query is read at the query site from the last prompt token of each sequence, the fused router
//! decides experts, code, distance and scope in one launch, and every MoLoRA site then adds its
//! mixture in one gather/scatter launch pair. Decode steps keep the routing of the prompt.

use anyhow::{bail, Context, Result};
use cudarc::driver::CudaSlice;

use crate::backend::shapes::MixShape;
use crate::elder::config::{Deferral, ElderConfig, QueryPooling};
use crate::elder::molora::Elder;
use crate::eval::Routed;
use crate::model::layers::Site;
use crate::model::BatchShape;

use super::activations::write;
use super::blocks::SiteHook;
use super::elder_keys::GpuKeyElder;
use super::plan::{distance_of, to_u32, Capacity, ElderPlan};
use crate::backend::cuda::buffers::KernelDtype;
use crate::backend::cuda::device::GpuDevice;
use crate::backend::cuda::elementwise;
use crate::backend::cuda::lora::{self, LoraSite};
use crate::backend::cuda::router::{self, RouterOutputs, RouterShape};

/// Routers of every layer stacked as the fused router reads them: `w_r [L, E, d_in]`, `b_r [L, E]`.
pub fn stack_routers(elder: &Elder) -> (Vec<f32>, Vec<f32>) {
    let w = elder
        .layers
        .iter()
        .flat_map(|l| l.w_r.iter().copied())
        .collect();
    let b = elder
        .layers
        .iter()
        .flat_map(|l| l.b_r.iter().copied())
        .collect();
    (w, b)
}

/// An uploaded ELDER state as the device forward drives it, whichever way it decides scope: the
/// paper's routers and codebook ([`GpuElder`]) or the key store
/// ([`super::elder_keys::GpuKeyElder`]). The forward calls `begin` before a prompt call and the
/// site hook at every projection; decode calls keep the prompt's decision.
pub trait DeviceElder<T: KernelDtype>: SiteHook<T> {
    /// Grows the per-call buffers to `cap` (never shrinks).
    fn reserve(&mut self, dev: &GpuDevice, cap: Capacity) -> Result<()>;
    /// Starts a request: sequence `b`'s prompt is rows `b * seq ..= query_rows[b]` of the call's
    /// token ids `ids`.
    fn begin(
        &mut self,
        dev: &GpuDevice,
        query_rows: &[usize],
        seq: usize,
        ids: &[u32],
    ) -> Result<()>;
    /// What the request decided for each sequence, as the CPU reports it (waits for the device).
    fn report(&self, dev: &GpuDevice) -> Result<Routed>;
    /// The answer gate's questions about the current request: each sequence it asks and the
    /// answer tokens it asks for (none without a gate).
    fn gate_questions(&self) -> Vec<(usize, Vec<u32>)> {
        Vec::new()
    }
    /// The experts' log-probability of each asked answer; returns whether the gate turned a
    /// sequence away (then the prompt runs again without its experts).
    fn gate_answers(&mut self, _dev: &GpuDevice, _logps: &[(usize, f32)]) -> Result<bool> {
        Ok(false)
    }
}

/// The uploaded form of `elder` for its deferral.
pub fn upload_elder<T: KernelDtype>(
    dev: &GpuDevice,
    elder: &Elder,
    cap: Capacity,
) -> Result<Box<dyn DeviceElder<T>>> {
    Ok(match elder.cfg.deferral {
        Deferral::Codebook => Box::new(GpuElder::<T>::upload(dev, elder, cap)?),
        Deferral::KeyStore => Box::new(GpuKeyElder::upload(dev, elder, cap)?),
    })
}

pub struct GpuElder<T: KernelDtype> {
    cfg: ElderConfig,
    /// The mean query the router centres on (`query_centering` with a calibrated mean), on device.
    query_mean: Option<CudaSlice<f32>>,
    d_in: usize,
    d_out: usize,
    /// Per layer: experts' `A [E, d_in, r]` and `B [E, r, d_out]` (f32, as the LoRA kernels take them).
    a: Vec<CudaSlice<f32>>,
    b: Vec<CudaSlice<f32>>,
    w_r: CudaSlice<f32>,
    b_r: CudaSlice<f32>,
    codebook: CudaSlice<u64>,
    n_codes: usize,
    cap: Capacity,
    query_rows: CudaSlice<u32>,
    query: CudaSlice<T>,
    out: RouterOutputs,
    /// Sequences of the current request and whether the router has run for it.
    batch: usize,
    routed: bool,
}

impl<T: KernelDtype> GpuElder<T> {
    /// Uploads `elder` (experts, routers, codebook) and allocates its per-call buffers for `cap`.
    pub fn upload(dev: &GpuDevice, elder: &Elder, cap: Capacity) -> Result<Self> {
        let cfg = elder.cfg.clone();
        if cfg.query_pooling != QueryPooling::LastToken {
            bail!(
                "query_pooling = {:?} is not on the GPU yet (the router reads the last prompt \
                 token there); use --device cpu for this state",
                cfg.query_pooling
            );
        }
        let first = elder
            .layers
            .first()
            .context("the ELDER state has no MoLoRA layers")?;
        let (d_in, d_out) = (first.d_in, first.d_out);
        if elder.codebook.words_per_code()
            != router::code_words(elder.layers.len(), cfg.num_experts)
        {
            bail!(
                "codebook codes have {} words, the routers produce {}",
                elder.codebook.words_per_code(),
                router::code_words(elder.layers.len(), cfg.num_experts)
            );
        }
        let upload = |v: &[f32], what: &str| -> Result<CudaSlice<f32>> {
            dev.upload(v)
                .with_context(|| format!("uploading ELDER {what}"))
        };
        let a = elder
            .layers
            .iter()
            .map(|l| upload(&l.a, "expert A"))
            .collect::<Result<_>>()?;
        let b = elder
            .layers
            .iter()
            .map(|l| upload(&l.b, "expert B"))
            .collect::<Result<_>>()?;
        let (w_r, b_r) = stack_routers(elder);
        let codes = elder.codebook.entries();
        // An empty codebook still needs a (never read) device buffer.
        let codebook = if codes.is_empty() {
            dev.zeros::<u64>(1)?
        } else {
            dev.upload(codes).context("uploading the codebook")?
        };
        let mut this = GpuElder {
            d_in,
            d_out,
            a,
            b,
            w_r: upload(&w_r, "router weights")?,
            b_r: upload(&b_r, "router biases")?,
            codebook,
            n_codes: elder.codebook.len(),
            query_mean: match (&elder.query_mean, cfg.query_centering) {
                (Some(mean), true) if mean.len() == d_in => Some(upload(mean, "mean query")?),
                (Some(mean), true) => bail!(
                    "the state's mean query has {} values, the query site is {d_in} wide",
                    mean.len()
                ),
                _ => None,
            },
            cap: Capacity { batch: 0, seq: 0 },
            query_rows: dev.zeros(1)?,
            query: dev.zeros(1)?,
            out: RouterOutputs::alloc(dev, &router_shape(&cfg, 1, d_in))?,
            batch: 0,
            routed: false,
            cfg,
        };
        this.grow(dev, cap)?;
        Ok(this)
    }

    /// Grows the per-call buffers to `cap` (never shrinks).
    fn grow(&mut self, dev: &GpuDevice, cap: Capacity) -> Result<()> {
        if self.cap.covers(cap) {
            return Ok(());
        }
        let cap = self.cap.union(cap);
        let p = ElderPlan::new(&self.cfg, self.d_in, cap);
        self.query_rows = dev.zeros(cap.batch)?;
        self.query = dev.zeros(p.query)?;
        self.out = RouterOutputs::alloc(dev, &router_shape(&self.cfg, cap.batch, self.d_in))?;
        self.cap = cap;
        Ok(())
    }

    /// Starts a request: the query of sequence `b` will be read at row `query_rows[b]` of the query
    /// site's input, and routing is decided then (once; later calls keep it).
    fn start(&mut self, dev: &GpuDevice, query_rows: &[usize]) -> Result<()> {
        if query_rows.len() > self.cap.batch {
            bail!(
                "{} sequences exceed the {} reserved for ELDER",
                query_rows.len(),
                self.cap.batch
            );
        }
        write(
            dev,
            &mut self.query_rows,
            &to_u32("query row", query_rows)?,
            "ELDER query rows",
        )?;
        self.batch = query_rows.len();
        self.routed = false;
        Ok(())
    }

    /// Gathers the queries and runs the fused router (experts, gates, codes, distance, scope).
    fn route(&mut self, dev: &GpuDevice, shape: &BatchShape, x: &CudaSlice<T>) -> Result<()> {
        let b = self.batch;
        if b != shape.batch {
            bail!(
                "ELDER expected {} query rows, the call has {} sequences",
                b,
                shape.batch
            );
        }
        // A row gather is an embedding lookup with the activations as the table.
        elementwise::embedding(
            dev,
            &self.query_rows,
            b,
            x,
            shape.rows(),
            self.d_in,
            &mut self.query,
        )
        .context("gathering the ELDER queries")?;
        let rs = router_shape(&self.cfg, b, self.d_in);
        router::router_fused::<T>(
            dev,
            &rs,
            &self.query,
            self.query_mean.as_ref(),
            &self.w_r,
            &self.b_r,
            &self.codebook,
            self.n_codes,
            &mut self.out,
        )
        .context("routing the ELDER queries")?;
        self.routed = true;
        Ok(())
    }
}

impl<T: KernelDtype> DeviceElder<T> for GpuElder<T> {
    fn reserve(&mut self, dev: &GpuDevice, cap: Capacity) -> Result<()> {
        self.grow(dev, cap)
    }

    fn begin(
        &mut self,
        dev: &GpuDevice,
        query_rows: &[usize],
        _seq: usize,
        _ids: &[u32],
    ) -> Result<()> {
        self.start(dev, query_rows)
    }

    /// The codebook's decision and code distances (empty before the router ran).
    fn report(&self, dev: &GpuDevice) -> Result<Routed> {
        if !self.routed {
            return Ok(Routed::default());
        }
        let b = self.batch;
        let in_scope = dev.download(&self.out.in_scope.slice(0..b))?;
        let dist = dev.download(&self.out.min_dist.slice(0..b))?;
        Ok(Routed {
            in_scope: in_scope.iter().map(|&s| s != 0).collect(),
            distances: dist.iter().map(|&d| distance_of(d, self.n_codes)).collect(),
            matches: Vec::new(),
            gated: Vec::new(),
            asked: Vec::new(),
        })
    }
}

impl<T: KernelDtype> SiteHook<T> for GpuElder<T> {
    /// What the CPU adapter's `after_linear` does at `site`: read the query (query site), then add
    /// the mixture (MoLoRA sites). `x` is the projection's input `[rows, in]`, `out` its output.
    fn after_linear(
        &mut self,
        dev: &GpuDevice,
        site: Site,
        shape: &BatchShape,
        x: &CudaSlice<T>,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        if !self.routed && self.cfg.is_query_site(site) {
            self.route(dev, shape, x)?;
        }
        let Some(layer) = self.cfg.layer_at(site) else {
            return Ok(());
        };
        if !self.routed {
            // As on the CPU: a MoLoRA layer before the query site (refused by the config) adds nothing.
            return Ok(());
        }
        if shape.batch != self.batch {
            bail!(
                "ELDER was routed for {} sequences, the call has {}",
                self.batch,
                shape.batch
            );
        }
        let (bk, k) = (shape.batch * self.cfg.top_k, self.cfg.top_k);
        let site_shape = LoraSite {
            shape: MixShape {
                batch: shape.batch,
                seq: shape.seq,
                d_in: self.d_in,
                d_out: self.d_out,
                rank: self.cfg.rank,
                k,
                scale: self.cfg.scale(),
            },
            n_experts: self.cfg.num_experts,
        };
        // The router writes layer l's [B, k] block at l * B * k for the request's B.
        let chosen = layer * bk..(layer + 1) * bk;
        lora::lora_forward(
            dev,
            site_shape,
            x,
            &self.a[layer],
            &self.b[layer],
            &self.out.experts.slice(chosen.clone()),
            &self.out.gates.slice(chosen),
            Some(&self.out.in_scope),
            None::<&CudaSlice<u32>>,
            None::<&mut CudaSlice<f32>>,
            out,
        )
        .with_context(|| format!("MoLoRA layer {layer} (block {})", site.block))
    }
}

fn router_shape(cfg: &ElderConfig, batch: usize, d_in: usize) -> RouterShape {
    RouterShape {
        batch,
        layers: cfg.molora_blocks.len(),
        experts: cfg.num_experts,
        d_in,
        k: cfg.top_k,
        renormalize: cfg.renormalize,
        threshold: cfg.threshold,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::loader::{build_model, RandomSource};
    use crate::model::presets::preset;
    use crate::model::Arch;

    /// The stacked routers reproduce each layer's router when read at `l * E * d_in`.
    #[test]
    fn stacked_routers_are_layer_major() {
        let cfg = preset(Arch::Gpt2, "tiny").unwrap();
        let model = build_model(&cfg, &RandomSource { seed: 1 }).unwrap();
        let ecfg = ElderConfig {
            query_block: 0,
            molora_blocks: vec![1],
            ..ElderConfig::preset_for(&cfg)
        };
        let elder = Elder::new(ecfg, &model.cfg).unwrap();
        let (w, b) = stack_routers(&elder);
        let (e, d) = (elder.cfg.num_experts, elder.layers[0].d_in);
        assert_eq!(w.len(), elder.layers.len() * e * d);
        assert_eq!(b.len(), elder.layers.len() * e);
        for (l, layer) in elder.layers.iter().enumerate() {
            assert_eq!(&w[l * e * d..(l + 1) * e * d], &layer.w_r[..]);
            assert_eq!(&b[l * e..(l + 1) * e], &layer.b_r[..]);
        }
        // The router kernel's code width is the codebook's.
        assert_eq!(
            router::code_words(elder.layers.len(), e),
            elder.codebook.words_per_code()
        );
    }
}
