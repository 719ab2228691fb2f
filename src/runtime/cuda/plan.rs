//! Host-side planning of the CUDA forward: how many elements every preallocated buffer needs for a
//! maximum batch x sequence, whether a call fits, and the row arithmetic of a padded batch (which
//! rows feed the head, where each sequence's ELDER query is read). Pure host code: everything here
//! is unit-tested on machines without a GPU.

use anyhow::{bail, Context, Result};

use crate::elder::config::ElderConfig;
use crate::model::runner::prompt_rows;
use crate::model::{Arch, BatchShape, ModelConfig};

use crate::backend::cuda::router::code_words;

/// The largest call the preallocated buffers serve. Steady-state calls within it allocate nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Sequences per call.
    pub batch: usize,
    /// Tokens per sequence: both the longest padded call and the KV-cache length.
    pub seq: usize,
}

impl Capacity {
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }

    pub fn covers(&self, other: Capacity) -> bool {
        self.batch >= other.batch && self.seq >= other.seq
    }

    /// The smallest capacity covering both (reservations only ever grow).
    pub fn union(self, other: Capacity) -> Capacity {
        Capacity {
            batch: self.batch.max(other.batch),
            seq: self.seq.max(other.seq),
        }
    }
}

/// Element counts of the model's activation buffers for one capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferPlan {
    pub rows: usize,
    /// `[rows, d]`: residual stream (two, ping-pong), sublayer output, norm output, head input.
    pub hidden: usize,
    /// `[rows, q_dim]`: queries and the attention output.
    pub q: usize,
    /// `[rows, kv_dim]`: this call's keys and values before they enter the cache.
    pub kv_new: usize,
    /// `[rows, intermediate]`: two projections and the activation of the MLP.
    pub ffn: usize,
    /// `[rows, vocab]`: logits of the rows the head is asked for (at most every row).
    pub logits: usize,
    /// `[batch, seq, kv_dim]` per layer, for keys and again for values.
    pub cache_per_layer: usize,
    pub layers: usize,
}

/// Buffers of each size class, as allocated by `Activations`.
pub const HIDDEN_BUFFERS: usize = 5;
pub const Q_BUFFERS: usize = 2;
pub const KV_NEW_BUFFERS: usize = 2;
pub const FFN_BUFFERS: usize = 3;

impl BufferPlan {
    pub fn new(cfg: &ModelConfig, cap: Capacity) -> Self {
        let rows = cap.rows();
        BufferPlan {
            rows,
            hidden: rows * cfg.hidden_size,
            q: rows * cfg.q_dim(),
            kv_new: rows * cfg.kv_dim(),
            ffn: rows * cfg.intermediate_size,
            logits: rows * cfg.vocab_size,
            cache_per_layer: rows * cfg.kv_dim(),
            layers: cfg.num_layers,
        }
    }

    /// Device bytes of the plan with activations of `elem` bytes: the typed buffers, the KV cache,
    /// the f32 norm statistics `[rows]` x2 and the u32 ids / positions / head rows `[rows]` x3
    /// (the i32 `[batch]` start/valid arrays are negligible and not counted).
    pub fn bytes(&self, elem: usize) -> usize {
        let typed = HIDDEN_BUFFERS * self.hidden
            + Q_BUFFERS * self.q
            + KV_NEW_BUFFERS * self.kv_new
            + FFN_BUFFERS * self.ffn
            + self.logits
            + 2 * self.layers * self.cache_per_layer;
        typed * elem + 5 * self.rows * 4
    }
}

/// Element counts of ELDER's per-call buffers for one capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElderPlan {
    /// `[batch, d_in]`: the gathered queries (activation dtype, and f32 when centred on the host).
    pub query: usize,
    /// `[L, batch, E]` router probabilities.
    pub probs: usize,
    /// `[L, batch, k]` chosen experts and their gates.
    pub chosen: usize,
    /// `[batch, words]` allocation codes.
    pub codes: usize,
}

impl ElderPlan {
    pub fn new(cfg: &ElderConfig, d_in: usize, cap: Capacity) -> Self {
        let layers = cfg.molora_blocks.len();
        ElderPlan {
            query: cap.batch * d_in,
            probs: layers * cap.batch * cfg.num_experts,
            chosen: layers * cap.batch * cfg.top_k,
            codes: cap.batch * code_words(layers, cfg.num_experts),
        }
    }
}

/// Refuses a call the buffers or the model cannot serve, before anything is launched.
pub fn check_shape(shape: &BatchShape, cap: Capacity, cfg: &ModelConfig) -> Result<()> {
    if shape.batch == 0 || shape.seq == 0 {
        bail!("empty batch ({} x {})", shape.batch, shape.seq);
    }
    if shape.valid.len() != shape.batch || shape.start.len() != shape.batch {
        bail!(
            "batch of {} sequences with {} lengths and {} start positions",
            shape.batch,
            shape.valid.len(),
            shape.start.len()
        );
    }
    if shape.batch > cap.batch || shape.seq > cap.seq {
        bail!(
            "a {} x {} call exceeds the reserved capacity {} x {} (reserve first)",
            shape.batch,
            shape.seq,
            cap.batch,
            cap.seq
        );
    }
    for b in 0..shape.batch {
        let (start, valid) = (shape.start[b], shape.valid[b]);
        if valid == 0 || valid > shape.seq {
            bail!(
                "sequence {b} has {valid} tokens in a call of padded length {}",
                shape.seq
            );
        }
        if start + valid > cap.seq {
            bail!(
                "sequence {b} would hold {} tokens, past the KV-cache capacity {}",
                start + valid,
                cap.seq
            );
        }
        // Learned position tables end at max_positions (rotary embeddings have no table).
        if cfg.arch == Arch::Gpt2 && start + valid > cfg.max_positions {
            bail!(
                "sequence {b} reaches position {}, past the model's {} positions",
                start + valid - 1,
                cfg.max_positions
            );
        }
    }
    Ok(())
}

/// The CPU runner's row arithmetic, shared (one model description, two backends).
pub use crate::model::runner::{last_rows, target_rows};

/// Rows where the GPU router reads each pair's query: the last of its prompt rows (the GPU has
/// only `QueryPooling::LastToken`).
pub fn prompt_query_rows(seq: usize, prompt_lens: &[usize]) -> Vec<usize> {
    prompt_rows(seq, prompt_lens.iter().copied())
        .into_iter()
        .map(|rows| rows.end.saturating_sub(1).max(rows.start))
        .collect()
}

/// Host values as the kernels' 32-bit indices.
pub fn to_i32(what: &str, v: &[usize]) -> Result<Vec<i32>> {
    v.iter()
        .map(|&x| i32::try_from(x).with_context(|| format!("{what} {x} does not fit an i32")))
        .collect()
}

pub fn to_u32(what: &str, v: &[usize]) -> Result<Vec<u32>> {
    v.iter()
        .map(|&x| u32::try_from(x).with_context(|| format!("{what} {x} does not fit a u32")))
        .collect()
}

/// The fused router's per-sequence result as the CPU reports it: `min_dist` is `i32::MAX` for an
/// empty codebook, which the CPU calls "no distance" (`None`).
pub fn distance_of(min_dist: i32, n_codes: usize) -> Option<u32> {
    (n_codes > 0 && min_dist >= 0).then_some(min_dist as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::presets::preset;
    use crate::model::runner::pad_batch;

    fn gpt2_xl() -> ModelConfig {
        preset(Arch::Gpt2, "gpt2-xl").unwrap()
    }

    #[test]
    fn buffer_sizes_follow_the_model_widths() {
        let cfg = gpt2_xl();
        let cap = Capacity { batch: 4, seq: 32 };
        let p = BufferPlan::new(&cfg, cap);
        assert_eq!(p.rows, 128);
        assert_eq!(p.hidden, 128 * 1600);
        assert_eq!(p.q, 128 * 1600);
        assert_eq!(p.kv_new, 128 * 1600);
        assert_eq!(p.ffn, 128 * 6400);
        assert_eq!(p.logits, 128 * 50257);
        assert_eq!(p.cache_per_layer, 4 * 32 * 1600);
        assert_eq!(p.layers, 48);
        // bf16: 5 + 2 + 2 hidden-wide, 3 ffn-wide, logits, 2 x 48 cache layers; plus 5 u32/f32 rows.
        let typed = (9 * 1600 + 3 * 6400 + 50257 + 96 * 1600) * 128;
        assert_eq!(p.bytes(2), typed * 2 + 5 * 128 * 4);
    }

    #[test]
    fn gqa_and_wide_heads_size_q_and_kv_separately() {
        let mut cfg = preset(Arch::Llama, "tiny").unwrap();
        cfg.num_heads = 4;
        cfg.num_kv_heads = 2;
        cfg.head_dim = 24; // q_dim 96, kv_dim 48, independent of d
        let p = BufferPlan::new(&cfg, Capacity { batch: 2, seq: 3 });
        assert_eq!(p.q, 6 * 96);
        assert_eq!(p.kv_new, 6 * 48);
        assert_eq!(p.cache_per_layer, 6 * 48);
        assert_eq!(p.hidden, 6 * cfg.hidden_size);
    }

    #[test]
    fn elder_buffers_cover_every_layer_and_sequence() {
        let cfg = ElderConfig::default(); // 6 layers, E=4, k=2, r=8
        let p = ElderPlan::new(&cfg, 1600, Capacity { batch: 3, seq: 10 });
        assert_eq!(p.query, 3 * 1600);
        assert_eq!(p.probs, 6 * 3 * 4);
        assert_eq!(p.chosen, 6 * 3 * 2);
        assert_eq!(p.codes, 3); // 24 bits: one word per sequence
        let wide = ElderConfig {
            num_experts: 32,
            ..ElderConfig::default()
        };
        assert_eq!(
            ElderPlan::new(&wide, 8, Capacity { batch: 2, seq: 1 }).codes,
            2 * 3
        );
    }

    #[test]
    fn capacity_grows_monotonically() {
        let a = Capacity { batch: 4, seq: 8 };
        let b = Capacity { batch: 2, seq: 16 };
        assert!(!a.covers(b) && !b.covers(a));
        let u = a.union(b);
        assert_eq!(u, Capacity { batch: 4, seq: 16 });
        assert!(u.covers(a) && u.covers(b) && u.covers(u));
    }

    #[test]
    fn shapes_outside_the_capacity_or_the_model_are_refused() {
        let cfg = preset(Arch::Gpt2, "tiny").unwrap();
        let cap = Capacity { batch: 2, seq: 8 };
        let (_, ok) = pad_batch(&[vec![1, 2, 3], vec![4]], &[0, 0]);
        check_shape(&ok, cap, &cfg).unwrap();
        let (_, too_many) = pad_batch(&[vec![1], vec![2], vec![3]], &[0, 0, 0]);
        assert!(check_shape(&too_many, cap, &cfg).is_err());
        // A decode step whose cache would pass the capacity.
        let (_, past_cache) = pad_batch(&[vec![1], vec![2]], &[7, 8]);
        let e = check_shape(&past_cache, cap, &cfg).unwrap_err().to_string();
        assert!(e.contains("KV-cache capacity"), "{e}");
        // GPT-2's learned positions end at max_positions even when the cache is larger.
        let big = Capacity {
            batch: 1,
            seq: cfg.max_positions + 4,
        };
        let (_, past_table) = pad_batch(&[vec![1]], &[cfg.max_positions]);
        let e = check_shape(&past_table, big, &cfg).unwrap_err().to_string();
        assert!(e.contains("positions"), "{e}");
        let llama = preset(Arch::Llama, "tiny").unwrap();
        let (_, rotary) = pad_batch(&[vec![1]], &[llama.max_positions]);
        let big = Capacity {
            batch: 1,
            seq: llama.max_positions + 4,
        };
        check_shape(&rotary, big, &llama).unwrap();
    }

    #[test]
    fn row_arithmetic_of_a_padded_batch() {
        let seqs = vec![vec![5, 6, 7], vec![8], vec![1, 2, 3, 4, 5]];
        let (_, shape) = pad_batch(&seqs, &[0, 0, 0]);
        assert_eq!(shape.seq, 5);
        assert_eq!(last_rows(&shape), vec![2, 5, 14]);
        // (prompt, target) = (2, 1), (1, 0), (3, 2): rows 1 | - | 12, 13.
        assert_eq!(target_rows(5, [(2, 1), (1, 0), (3, 2)]), vec![1, 12, 13]);
        assert_eq!(prompt_query_rows(5, &[2, 1, 3]), vec![1, 5, 12]);
        // The CPU runner's score uses the same rows for one sequence.
        assert_eq!(target_rows(9, [(4, 3)]), vec![3, 4, 5]);
    }

    #[test]
    fn index_conversions_and_distances() {
        assert_eq!(to_i32("x", &[0, 7]).unwrap(), vec![0, 7]);
        assert!(to_i32("x", &[1 << 31]).is_err());
        assert_eq!(to_u32("x", &[3]).unwrap(), vec![3]);
        assert_eq!(distance_of(i32::MAX, 0), None);
        assert_eq!(distance_of(4, 3), Some(4));
        assert_eq!(distance_of(0, 1), Some(0));
    }
}
