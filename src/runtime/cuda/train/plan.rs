//! Host-side planning of the CUDA edit step: how many elements every preallocated training buffer
//! needs for a capacity, how the MoLoRA parameters of all layers stack into one device tensor per
//! kind, the head gradient's row plan, and which configs the GPU trainer serves. Pure host code,
//! unit-tested on machines without a GPU.

use anyhow::{bail, Result};

use crate::elder::config::{ElderConfig, QueryPooling};
use crate::elder::molora::MoloraLayer;
use crate::model::{Arch, ModelConfig};
use crate::runtime::cuda::plan::Capacity;

/// Element counts of the four stacked trainable tensors (also their gradients and Adam moments):
/// layer `l`'s tensor is the `l`-th equal slice of each, in `MoloraLayer::tensors_mut` order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamSizes {
    /// `[L, E, d_in, r]`
    pub a: usize,
    /// `[L, E, r, d_out]`
    pub b: usize,
    /// `[L, E, d_in]`
    pub w_r: usize,
    /// `[L, E]`
    pub b_r: usize,
}

impl ParamSizes {
    /// `pool`'s experts per layer, with a router over them when it is routed.
    pub fn new(cfg: &ElderConfig, pool: Pool, d_in: usize, d_out: usize) -> Self {
        let (l, r) = (cfg.molora_blocks.len(), cfg.rank);
        let (e, routed) = match pool {
            Pool::Routed => (cfg.num_experts, cfg.num_experts),
            Pool::Fixed(e) => (e, 0),
        };
        ParamSizes {
            a: l * e * d_in * r,
            b: l * e * r * d_out,
            w_r: l * routed * d_in,
            b_r: l * routed,
        }
    }

    /// In `MoloraLayer::tensors_mut` order (A, B, router weight, router bias).
    pub fn as_array(&self) -> [usize; 4] {
        [self.a, self.b, self.w_r, self.b_r]
    }
}

/// The experts a batch trains: the config's pool chosen by its routers (the paper), or a pool of
/// `n` experts per layer with every sequence's experts given (the stored allocation: no
/// routers; the pool is the batch's gathered experts, padded with unused ones up to `n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    Routed,
    Fixed(usize),
}

impl Pool {
    /// Experts per layer of the device layout.
    pub fn experts(self, cfg: &ElderConfig) -> usize {
        match self {
            Pool::Routed => cfg.num_experts,
            Pool::Fixed(e) => e,
        }
    }
}

/// Every layer's A, B, router weight and router bias, concatenated layer after layer.
pub fn stack_params(layers: &[MoloraLayer]) -> [Vec<f32>; 4] {
    let cat = |f: fn(&MoloraLayer) -> &Vec<f32>| -> Vec<f32> {
        layers.iter().flat_map(|l| f(l).iter().copied()).collect()
    };
    [
        cat(|l| &l.a),
        cat(|l| &l.b),
        cat(|l| &l.w_r),
        cat(|l| &l.b_r),
    ]
}

/// The inverse of [`stack_params`]: writes each layer's slices back into `layers`.
pub fn unstack_params(stacked: &[Vec<f32>; 4], layers: &mut [MoloraLayer]) -> Result<()> {
    let n = layers.len();
    for (kind, values) in stacked.iter().enumerate() {
        let per_layer = values.len() / n.max(1);
        if per_layer * n != values.len() {
            bail!(
                "stacked tensor {kind} has {} values, not a multiple of {n} layers",
                values.len()
            );
        }
        for (l, layer) in layers.iter_mut().enumerate() {
            let dst = &mut layer.tensors_mut()[kind];
            if dst.len() != per_layer {
                bail!(
                    "layer {l} tensor {kind} holds {} values, the device copy {per_layer}",
                    dst.len()
                );
            }
            dst.copy_from_slice(&values[l * per_layer..(l + 1) * per_layer]);
        }
    }
    Ok(())
}

/// Element counts of the trainer's buffers for one capacity (batch x padded length), one model and
/// one ELDER config. Steady-state edit batches within the capacity allocate nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainPlan {
    pub cap: Capacity,
    /// `cap.batch * cap.seq`: every per-row buffer holds this many rows.
    pub rows: usize,
    /// First MoLoRA block: blocks below it are the frozen prefix, run once per batch.
    pub first: usize,
    /// Blocks `first..num_layers` keep an MLP tape; all but `first` keep an attention tape (the
    /// attention of `first` is part of the frozen prefix).
    pub mlp_tapes: usize,
    pub attn_tapes: usize,
    /// `[rows, d]`, `[rows, q_dim]`, `[rows, kv_dim]`, `[rows, intermediate]`.
    pub hidden: usize,
    pub q: usize,
    pub kv: usize,
    pub ffn: usize,
    /// Llama's up-projection tape `[rows, intermediate]`; GPT-2 has none (one placeholder element).
    pub up: usize,
    /// Attention log-sum-exp `[batch, heads, seq]` per attention tape.
    pub lse: usize,
    /// `x A_e` of one MoLoRA layer, and the backward's `dh_raw` scratch: `[batch, k, seq, r]` f32.
    pub low_rank: usize,
    /// Head: every row can be a target row; `[rows, vocab]` logits and their gradient.
    pub logits: usize,
    /// The head's input gradient `[rows + 1, d]`: one row more than any batch supervises, so the
    /// row after a batch's `n` target rows can stay zero (see [`head_scatter_ids`]).
    pub head_dx: usize,
    /// Per-row cross-entropy of every iteration `[iterations, rows]` (read back once per batch).
    pub ce: usize,
    pub params: ParamSizes,
    /// Which experts train (and how many per layer the parameters hold).
    pub pool: Pool,
    /// MoLoRA layers.
    pub layers: usize,
    /// Router rows `[L, batch]`, their top-k `[L, batch, k]` and logits `[L, batch, E]`.
    pub router_rows: usize,
    pub chosen: usize,
    pub router_logits: usize,
    /// Router input `[batch, d_in]` (f32) and the captured queries (activation dtype).
    pub query: usize,
}

impl TrainPlan {
    pub fn new(
        cfg: &ModelConfig,
        ecfg: &ElderConfig,
        (d_in, d_out): (usize, usize),
        cap: Capacity,
        pool: Pool,
    ) -> Result<Self> {
        let first = *ecfg
            .molora_blocks
            .first()
            .ok_or_else(|| anyhow::anyhow!("the ELDER config has no MoLoRA blocks"))?;
        if first >= cfg.num_layers {
            bail!(
                "first MoLoRA block {first} is past the model's {} blocks",
                cfg.num_layers
            );
        }
        let rows = cap.rows();
        let layers = ecfg.molora_blocks.len();
        let mlp_tapes = cfg.num_layers - first;
        Ok(TrainPlan {
            cap,
            rows,
            first,
            mlp_tapes,
            attn_tapes: mlp_tapes - 1,
            hidden: rows * cfg.hidden_size,
            q: rows * cfg.q_dim(),
            kv: rows * cfg.kv_dim(),
            ffn: rows * cfg.intermediate_size,
            up: match cfg.arch {
                Arch::Llama => rows * cfg.intermediate_size,
                Arch::Gpt2 => 1,
            },
            lse: cap.batch * cfg.num_heads * cap.seq,
            low_rank: cap.batch * ecfg.top_k * cap.seq * ecfg.rank,
            logits: rows * cfg.vocab_size,
            head_dx: (rows + 1) * cfg.hidden_size,
            ce: ecfg.iterations * rows,
            params: ParamSizes::new(ecfg, pool, d_in, d_out),
            pool,
            layers,
            router_rows: layers * cap.batch,
            chosen: layers * cap.batch * ecfg.top_k,
            router_logits: layers * cap.batch * ecfg.num_experts,
            query: cap.batch * d_in,
        })
    }
}

/// For every row of a padded batch, the row of the head's gradient `[n + 1, d]` it takes: its
/// position among the `n` supervised rows, or `n` (a row kept at zero) when it is not supervised.
/// A gather with these ids scatters the head's gradient into the residual stream's gradient and
/// zeroes every other row in the same launch.
pub fn head_scatter_ids(rows: usize, target_rows: &[usize]) -> Result<Vec<u32>> {
    let n = target_rows.len();
    let mut ids = vec![n as u32; rows];
    for (i, &r) in target_rows.iter().enumerate() {
        if r >= rows {
            bail!("target row {r} is outside the batch's {rows} rows");
        }
        if ids[r] != n as u32 {
            bail!("row {r} is supervised twice");
        }
        ids[r] = i as u32;
    }
    Ok(ids)
}

/// Refuses configs the GPU trainer would not train the way the CPU does.
pub fn check_trainable(cfg: &ElderConfig) -> Result<()> {
    if cfg.query_pooling != QueryPooling::LastToken {
        bail!(
            "query_pooling = {:?} is not on the GPU yet (the GPU reads the query at the last prompt \
             token); use --device cpu for this state",
            cfg.query_pooling
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elder::molora::Elder;
    use crate::model::loader::{build_model, RandomSource};
    use crate::model::presets::preset;

    fn gpt2_xl_plan(cap: Capacity) -> TrainPlan {
        let cfg = preset(Arch::Gpt2, "gpt2-xl").unwrap();
        let ecfg = ElderConfig::preset_for(&cfg); // 6 layers from block 36, c_fc, E=4, k=2, r=8
        TrainPlan::new(&cfg, &ecfg, (1600, 6400), cap, Pool::Routed).unwrap()
    }

    #[test]
    fn tapes_cover_the_blocks_from_the_first_molora_block_up() {
        let p = gpt2_xl_plan(Capacity { batch: 2, seq: 20 });
        assert_eq!(p.first, 36);
        assert_eq!(p.mlp_tapes, 12); // blocks 36..48
        assert_eq!(p.attn_tapes, 11); // 37..48: block 36's attention is the frozen prefix
        assert_eq!(p.rows, 40);
        assert_eq!(p.hidden, 40 * 1600);
        assert_eq!(p.q, 40 * 1600);
        assert_eq!(p.kv, 40 * 1600);
        assert_eq!(p.ffn, 40 * 6400);
        assert_eq!(p.up, 1, "GPT-2 has no up projection");
        assert_eq!(p.lse, 2 * 25 * 20);
        assert_eq!(p.low_rank, 2 * 2 * 20 * 8);
        assert_eq!(p.logits, 40 * 50257);
        assert_eq!(p.head_dx, 41 * 1600);
        assert_eq!(p.ce, 50 * 40);
        assert_eq!(
            p.params,
            ParamSizes {
                a: 6 * 4 * 1600 * 8,
                b: 6 * 4 * 8 * 6400,
                w_r: 6 * 4 * 1600,
                b_r: 24
            }
        );
        assert_eq!((p.router_rows, p.chosen, p.router_logits), (12, 24, 48));
        assert_eq!(p.query, 2 * 1600);
    }

    #[test]
    fn llama_tapes_keep_the_up_projection_and_gqa_widths() {
        let mut cfg = preset(Arch::Llama, "tiny").unwrap();
        cfg.num_heads = 4;
        cfg.num_kv_heads = 2;
        cfg.head_dim = 24;
        let ecfg = ElderConfig {
            query_block: 0,
            molora_blocks: vec![1],
            ..ElderConfig::preset_for(&cfg)
        };
        let cap = Capacity { batch: 3, seq: 5 };
        let p =
            TrainPlan::new(&cfg, &ecfg, (cfg.intermediate_size, 64), cap, Pool::Routed).unwrap();
        assert_eq!((p.mlp_tapes, p.attn_tapes), (1, 0));
        assert_eq!(p.q, 15 * 96);
        assert_eq!(p.kv, 15 * 48);
        assert_eq!(p.up, 15 * cfg.intermediate_size);
        assert_eq!(p.lse, 3 * 4 * 5);
    }

    #[test]
    fn a_fixed_pool_holds_its_experts_and_no_routers() {
        let cfg = preset(Arch::Gpt2, "tiny").unwrap();
        let ecfg = ElderConfig {
            query_block: 0,
            molora_blocks: vec![1],
            ..ElderConfig::preset_for(&cfg)
        };
        let cap = Capacity { batch: 2, seq: 4 };
        let r = ecfg.rank;
        let p = TrainPlan::new(&cfg, &ecfg, (64, 256), cap, Pool::Fixed(7)).unwrap();
        assert_eq!(
            p.params,
            ParamSizes {
                a: 7 * 64 * r,
                b: 7 * r * 256,
                w_r: 0,
                b_r: 0
            }
        );
        assert_eq!(Pool::Fixed(7).experts(&ecfg), 7);
        assert_eq!(Pool::Routed.experts(&ecfg), ecfg.num_experts);
        let routed = TrainPlan::new(&cfg, &ecfg, (64, 256), cap, Pool::Routed).unwrap();
        assert_ne!(routed, p, "a pool change reallocates");
        assert_eq!(routed.params.b_r, ecfg.num_experts);
    }

    #[test]
    fn configs_the_model_cannot_hold_are_refused() {
        let cfg = preset(Arch::Gpt2, "tiny").unwrap(); // 2 blocks
        let ecfg = ElderConfig {
            query_block: 0,
            molora_blocks: vec![5],
            ..ElderConfig::preset_for(&cfg)
        };
        let cap = Capacity { batch: 1, seq: 4 };
        assert!(TrainPlan::new(&cfg, &ecfg, (64, 256), cap, Pool::Routed).is_err());
        let empty = ElderConfig {
            molora_blocks: vec![],
            ..ecfg
        };
        assert!(TrainPlan::new(&cfg, &empty, (64, 256), cap, Pool::Routed).is_err());
    }

    #[test]
    fn stacking_round_trips_and_is_layer_major() {
        let cfg = preset(Arch::Gpt2, "tiny").unwrap();
        let model = build_model(&cfg, &RandomSource { seed: 2 }).unwrap();
        let ecfg = ElderConfig {
            query_block: 0,
            molora_blocks: vec![1],
            ..ElderConfig::preset_for(&cfg)
        };
        let mut elder = Elder::new(ecfg.clone(), &model.cfg).unwrap();
        // Two layers with distinct values (the config has one; duplicate it with an offset).
        let mut second = elder.layers[0].clone();
        second.tensors_mut().into_iter().for_each(|t| {
            t.iter_mut().for_each(|v| *v += 1.0);
        });
        elder.layers.push(second);
        let stacked = stack_params(&elder.layers);
        let (d_in, d_out) = (elder.layers[0].d_in, elder.layers[0].d_out);
        let two = ElderConfig {
            molora_blocks: vec![1, 2],
            ..ecfg
        };
        let sizes = ParamSizes::new(&two, Pool::Routed, d_in, d_out).as_array();
        for (kind, values) in stacked.iter().enumerate() {
            assert_eq!(values.len(), sizes[kind], "tensor {kind}");
            let half = values.len() / 2;
            assert_eq!(values[half..], *elder.layers[1].tensors_mut()[kind]);
        }
        let mut back: Vec<MoloraLayer> = elder.layers.iter().map(|l| l.zeros_like()).collect();
        unstack_params(&stacked, &mut back).unwrap();
        assert_eq!(back, elder.layers);
        let mut short = stacked.clone();
        short[2].pop();
        assert!(unstack_params(&short, &mut back).is_err());
    }

    #[test]
    fn head_gradient_rows_scatter_to_the_supervised_rows_only() {
        // Batch of 2 x 4 rows; sequence 0 supervises rows 1, 2, sequence 1 row 6.
        let ids = head_scatter_ids(8, &[1, 2, 6]).unwrap();
        assert_eq!(ids, vec![3, 0, 1, 3, 3, 3, 2, 3]);
        assert!(head_scatter_ids(4, &[4]).is_err());
        assert!(head_scatter_ids(4, &[1, 1]).is_err());
        assert_eq!(head_scatter_ids(2, &[]).unwrap(), vec![0, 0]);
    }

    #[test]
    fn only_last_token_pooling_trains_on_the_gpu() {
        let mut cfg = ElderConfig::default();
        check_trainable(&cfg).unwrap();
        cfg.query_pooling = QueryPooling::PromptMean;
        let e = check_trainable(&cfg).unwrap_err().to_string();
        assert!(e.contains("query_pooling"), "{e}");
    }
}
