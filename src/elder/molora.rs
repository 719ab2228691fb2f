//! The trainable part of ELDER: per MoLoRA layer, E LoRA experts and a router, and the adapter that
//! plugs them into the frozen model's forward (routing, deferral, mixture) and backward.

use std::ops::Range;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::cpu::molora::{self as ops, MixShape, Routing};
use crate::model::layers::Site;
use crate::model::names::site_dims;
use crate::model::{Adapter, BatchShape, ModelConfig};

use super::codebook::Codebook;
use super::config::{ElderConfig, QueryPooling};

/// The parameters of one MoLoRA layer (all f32, all trainable).
#[derive(Debug, Clone, PartialEq)]
pub struct MoloraLayer {
    /// Experts' down projections `[E, d_in, r]`.
    pub a: Vec<f32>,
    /// Experts' up projections `[E, r, d_out]`.
    pub b: Vec<f32>,
    /// Router weight `[E, d_in]`.
    pub w_r: Vec<f32>,
    /// Router bias `[E]`.
    pub b_r: Vec<f32>,
    pub d_in: usize,
    pub d_out: usize,
}

impl MoloraLayer {
    /// The released code's initialisation: `B = 0` (every expert starts as a zero update),
    /// `A ~ U(-1/sqrt(r), 1/sqrt(r))`, router `~ U(-1/sqrt(d_in), 1/sqrt(d_in))`.
    pub fn init(cfg: &ElderConfig, d_in: usize, d_out: usize, rng: &mut ChaCha8Rng) -> Self {
        let (e, r) = (cfg.num_experts, cfg.rank);
        let ba = 1.0 / (r as f32).sqrt();
        let br = 1.0 / (d_in as f32).sqrt();
        MoloraLayer {
            a: (0..e * d_in * r).map(|_| rng.gen_range(-ba..ba)).collect(),
            b: vec![0.0; e * r * d_out],
            w_r: (0..e * d_in).map(|_| rng.gen_range(-br..br)).collect(),
            b_r: (0..e).map(|_| rng.gen_range(-br..br)).collect(),
            d_in,
            d_out,
        }
    }

    /// The four parameter tensors with their names and shapes, in a fixed order.
    pub fn tensors(&self, cfg: &ElderConfig) -> [(&'static str, Vec<usize>, &Vec<f32>); 4] {
        let (e, r) = (cfg.num_experts, cfg.rank);
        [
            ("lora_a", vec![e, self.d_in, r], &self.a),
            ("lora_b", vec![e, r, self.d_out], &self.b),
            ("router_w", vec![e, self.d_in], &self.w_r),
            ("router_b", vec![e], &self.b_r),
        ]
    }

    pub fn tensors_mut(&mut self) -> [&mut Vec<f32>; 4] {
        [&mut self.a, &mut self.b, &mut self.w_r, &mut self.b_r]
    }

    pub fn zeros_like(&self) -> Self {
        MoloraLayer {
            a: vec![0.0; self.a.len()],
            b: vec![0.0; self.b.len()],
            w_r: vec![0.0; self.w_r.len()],
            b_r: vec![0.0; self.b_r.len()],
            d_in: self.d_in,
            d_out: self.d_out,
        }
    }
}

/// Everything ELDER adds to a frozen model: the config, the MoLoRA layers and the deferral codebook.
#[derive(Debug, Clone, PartialEq)]
pub struct Elder {
    pub cfg: ElderConfig,
    pub layers: Vec<MoloraLayer>,
    pub codebook: Codebook,
    /// Mean query of the calibration prompts, subtracted before routing when
    /// `cfg.query_centering` is on. Fixed once computed, so stored codes stay valid.
    pub query_mean: Option<Vec<f32>>,
}

impl Elder {
    /// Fresh experts and routers for the model of config `model` (validated against it), seeded by
    /// `cfg.seed`. Only the model's shape matters, so no weights are needed.
    pub fn new(cfg: ElderConfig, model: &ModelConfig) -> anyhow::Result<Self> {
        cfg.validate(model)?;
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let (d_in, d_out) = site_dims(model, cfg.molora_proj).unwrap_or((0, 0));
        let layers = (0..cfg.molora_blocks.len())
            .map(|_| MoloraLayer::init(&cfg, d_in, d_out, &mut rng))
            .collect();
        let codebook = Codebook::new(cfg.code_bits())?;
        Ok(Elder {
            cfg,
            layers,
            codebook,
            query_mean: None,
        })
    }

    /// Index of the MoLoRA layer at `site`, if there is one.
    pub fn layer_at(&self, site: Site) -> Option<usize> {
        self.cfg.layer_at(site)
    }

    pub fn is_query_site(&self, site: Site) -> bool {
        self.cfg.is_query_site(site)
    }

    /// The query vectors `[B, d_in]` of a batch, read from the query site's input `x` `[rows, d_in]`
    /// at each sequence's prompt rows (the last one, or their mean, as the config says).
    pub fn pool_query(&self, x: &[f32], d_in: usize, prompt_rows: &[Range<usize>]) -> Vec<f32> {
        let mut q = Vec::with_capacity(prompt_rows.len() * d_in);
        for rows in prompt_rows {
            assert!(!rows.is_empty(), "a sequence has no prompt rows");
            match self.cfg.query_pooling {
                QueryPooling::LastToken => {
                    let r = rows.end - 1;
                    q.extend_from_slice(&x[r * d_in..(r + 1) * d_in]);
                }
                QueryPooling::PromptMean => {
                    let mut mean = vec![0.0f32; d_in];
                    for r in rows.clone() {
                        for (m, v) in mean.iter_mut().zip(&x[r * d_in..(r + 1) * d_in]) {
                            *m += v;
                        }
                    }
                    let n = rows.len() as f32;
                    q.extend(mean.iter().map(|m| m / n));
                }
            }
        }
        q
    }

    /// What the routers see of a batch of queries `[B, d_in]`: the query itself, or (with
    /// `query_centering` and a calibrated mean) the query minus the mean, scaled to unit RMS.
    /// Hidden states share a large common component; without removing it every router learns
    /// mostly that component and sends all prompts to the latest edit's experts.
    pub fn router_input(&self, query: &[f32]) -> Vec<f32> {
        match (self.cfg.query_centering, &self.query_mean) {
            (true, Some(mean)) => center_queries(query, mean),
            _ => query.to_vec(),
        }
    }

    /// Routes a batch of queries `[B, d_in]` through every layer's router.
    pub fn route_all(&self, query: &[f32]) -> Vec<Routing> {
        let input = self.router_input(query);
        self.layers
            .iter()
            .map(|l| ops::route(&input, &l.w_r, &l.b_r, self.cfg.top_k, self.cfg.renormalize))
            .collect()
    }

    /// The allocation codes `[B, words]` of a routing: for each layer, the k-hot vector of its chosen
    /// experts, concatenated (bit `layer * E + expert`).
    pub fn codes(&self, routing: &[Routing]) -> Vec<Vec<u64>> {
        let e = self.cfg.num_experts;
        let words = self.cfg.code_bits().div_ceil(64);
        let batch = routing.first().map_or(0, |r| r.experts.len() / r.k);
        let mut codes = vec![vec![0u64; words]; batch];
        for (l, r) in routing.iter().enumerate() {
            for (b, chosen) in r.experts.chunks(r.k).enumerate() {
                for &x in chosen {
                    let bit = l * e + x as usize;
                    codes[b][bit / 64] |= 1 << (bit % 64);
                }
            }
        }
        codes
    }

    /// Hamming distance of each code to its nearest codebook entry (`None` with an empty codebook).
    pub fn distances(&self, codes: &[Vec<u64>]) -> Vec<Option<u32>> {
        codes
            .iter()
            .map(|c| self.codebook.min_distance(c))
            .collect()
    }

    /// Deferral: a sequence is in scope when its code is closer than the threshold to some entry.
    pub fn in_scope(&self, distances: &[Option<u32>]) -> Vec<bool> {
        distances
            .iter()
            .map(|d| d.is_some_and(|d| d < self.cfg.threshold))
            .collect()
    }
}

/// Each query `[B, d_in]` minus `mean`, scaled to unit RMS: the centred router input of
/// [`Elder::router_input`] (a free function so the CUDA runtime routes on exactly the same numbers).
pub fn center_queries(query: &[f32], mean: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(query.len());
    for q in query.chunks(mean.len()) {
        let centered: Vec<f32> = q.iter().zip(mean).map(|(a, m)| a - m).collect();
        let rms = (centered.iter().map(|v| v * v).sum::<f32>() / centered.len() as f32).sqrt();
        out.extend(centered.iter().map(|v| v / rms.max(1e-6)));
    }
    out
}

/// Whether the adapter decides scope from the codebook or treats every sequence as in scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Inference: the deferral codebook decides.
    Codebook,
    /// Training: every sequence is in scope.
    All,
}

/// One forward (and, when training, backward) of ELDER over a batch.
///
/// The query is read at the query site from each sequence's prompt rows (`prompt_rows`), once: later calls (decode steps with a KV cache) keep the routing and the scope decided
/// from the prompt.
pub struct ElderAdapter<'a> {
    pub elder: &'a Elder,
    /// Rows of each sequence's prompt in the first forward call (see `prompt_rows`).
    pub prompt_rows: Vec<Range<usize>>,
    pub scope: Scope,
    /// `[B, d_in]`, captured at the query site or provided by the trainer.
    pub query: Option<Vec<f32>>,
    pub routing: Option<Vec<Routing>>,
    pub in_scope: Vec<bool>,
    /// Distance of each sequence's code to the nearest codebook entry (inference only).
    pub distances: Vec<Option<u32>>,
    /// Saved `x A_e` per layer, when training.
    pub shrink: Vec<Vec<f32>>,
    pub training: bool,
    /// Gradients of the gates per layer `[B, k]`, filled by the backward pass.
    pub dgates: Vec<Vec<f32>>,
    /// Parameter gradients (same shapes as the layers), when training.
    pub grads: Vec<MoloraLayer>,
}

impl<'a> ElderAdapter<'a> {
    pub fn inference(elder: &'a Elder, prompt_rows: Vec<Range<usize>>) -> Self {
        Self::build(elder, prompt_rows, Scope::Codebook, false)
    }

    /// Inference on one sequence whose first `prompt_len` tokens are the prompt.
    pub fn single(elder: &'a Elder, prompt_len: usize) -> Self {
        Self::inference(elder, std::iter::once(0..prompt_len).collect())
    }

    pub fn training(elder: &'a Elder, query: Vec<f32>) -> Self {
        let mut a = Self::build(elder, Vec::new(), Scope::All, true);
        a.query = Some(query);
        a
    }

    fn build(
        elder: &'a Elder,
        prompt_rows: Vec<Range<usize>>,
        scope: Scope,
        training: bool,
    ) -> Self {
        let n = elder.layers.len();
        ElderAdapter {
            elder,
            prompt_rows,
            scope,
            query: None,
            routing: None,
            in_scope: Vec::new(),
            distances: Vec::new(),
            shrink: vec![Vec::new(); n],
            training,
            dgates: vec![Vec::new(); n],
            grads: if training {
                elder.layers.iter().map(MoloraLayer::zeros_like).collect()
            } else {
                Vec::new()
            },
        }
    }

    fn batch(&self) -> usize {
        self.in_scope.len()
    }

    /// Decides routing and scope once per sequence, from the query.
    fn ensure_routing(&mut self) {
        if self.routing.is_some() {
            return;
        }
        let Some(q) = &self.query else { return };
        let routing = self.elder.route_all(q);
        let batch = q.len() / self.elder.layers[0].d_in.max(1);
        self.in_scope = match self.scope {
            Scope::All => vec![true; batch],
            Scope::Codebook => {
                self.distances = self.elder.distances(&self.elder.codes(&routing));
                self.elder.in_scope(&self.distances)
            }
        };
        self.routing = Some(routing);
    }

    fn mix_shape(&self, shape: &BatchShape, layer: usize) -> MixShape {
        let l = &self.elder.layers[layer];
        MixShape {
            batch: shape.batch,
            seq: shape.seq,
            d_in: l.d_in,
            d_out: l.d_out,
            rank: self.elder.cfg.rank,
            k: self.elder.cfg.top_k,
            scale: self.elder.cfg.scale(),
        }
    }
}

impl Adapter for ElderAdapter<'_> {
    fn after_linear(&mut self, site: Site, shape: &BatchShape, x: &[f32], out: &mut [f32]) {
        if self.query.is_none() && self.elder.is_query_site(site) {
            let d = x.len() / shape.rows();
            self.query = Some(self.elder.pool_query(x, d, &self.prompt_rows));
        }
        let Some(layer) = self.elder.layer_at(site) else {
            return;
        };
        self.ensure_routing();
        let Some(routing) = &self.routing else { return };
        let r = &routing[layer];
        if self.batch() != shape.batch || !self.in_scope.iter().any(|&s| s) {
            return;
        }
        let s = self.mix_shape(shape, layer);
        let p = &self.elder.layers[layer];
        let mut saved = self
            .training
            .then(|| vec![0.0f32; s.batch * s.k * s.seq * s.rank]);
        ops::molora_forward(
            s,
            x,
            &p.a,
            &p.b,
            &r.experts,
            &r.gates,
            &self.in_scope,
            out,
            saved.as_deref_mut(),
        );
        if let Some(saved) = saved {
            self.shrink[layer] = saved;
        }
    }

    fn backward_linear(
        &mut self,
        site: Site,
        shape: &BatchShape,
        x: &[f32],
        dout: &[f32],
        dx: Option<&mut [f32]>,
    ) {
        let Some(layer) = self.elder.layer_at(site) else {
            return;
        };
        let (Some(routing), true) = (&self.routing, self.training) else {
            return;
        };
        let r = &routing[layer];
        let s = self.mix_shape(shape, layer);
        let p = &self.elder.layers[layer];
        let g = &mut self.grads[layer];
        let mut dgates = vec![0.0f32; s.batch * s.k];
        ops::molora_backward(
            s,
            x,
            &p.a,
            &p.b,
            &r.experts,
            &r.gates,
            &self.in_scope,
            &self.shrink[layer],
            dout,
            &mut g.a,
            &mut g.b,
            &mut dgates,
            dx,
        );
        self.dgates[layer] = dgates;
    }
}

impl ElderAdapter<'_> {
    /// Completes the backward pass through the routers: adds the guided loss on `presets`
    /// (`[L][B * k]`) and returns the guided loss value (summed over layers, unweighted).
    pub fn router_backward(&mut self, presets: &[Vec<u32>]) -> f32 {
        let Some(routing) = &self.routing else {
            return 0.0;
        };
        let q = self
            .elder
            .router_input(self.query.as_deref().unwrap_or(&[]));
        let cfg = &self.elder.cfg;
        let mut guide_total = 0.0;
        for (layer, r) in routing.iter().enumerate() {
            let batch = r.probs.len() / r.num_experts;
            let dgates = if self.dgates[layer].is_empty() {
                vec![0.0; batch * r.k]
            } else {
                self.dgates[layer].clone()
            };
            let preset = presets.get(layer).map(Vec::as_slice);
            if let Some(p) = preset {
                guide_total += ops::guided_loss(r, p);
            }
            let dlogits = ops::route_backward(
                r,
                &dgates,
                cfg.renormalize,
                preset.map(|p| (p, cfg.guide_weight)),
            );
            let g = &mut self.grads[layer];
            ops::router_param_grad(&dlogits, &q, r.num_experts, &mut g.w_r, &mut g.b_r);
        }
        guide_total
    }
}
