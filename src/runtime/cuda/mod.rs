//! The CUDA runtime: the model description uploaded once (weights in bf16, f16 or f32, straight
//! from the checkpoint's memory map or from an f32 CPU model),
//! preallocated activations and KV cache, a padded-batch forward on the kernels of this backend plus
//! cuBLAS, ELDER (fused router, MoLoRA gather/scatter) on top, and ELDER's edit step.
//!
//! - [`plan`]: buffer sizes and padded-batch row arithmetic (host only, unit-tested without a GPU);
//! - [`staging`]: the host half of the upload (each tensor in the device dtype, one at a time;
//!   unit-tested without a GPU); [`weights`]: the uploaded model (the CPU's `Model` type over
//!   device buffers) and its layers' device methods; [`activations`]: the
//!   preallocated buffers;
//! - [`elder`]: the uploaded ELDER state and its per-request routing;
//! - [`blocks`]: the one block walk (attention and MLP halves) of the inference forward and the
//!   training forward; [`forward`]: the inference forward over it and the head; [`requests`]:
//!   logits, score, eval scoring and generation with the CPU runner's semantics;
//! - [`train`]: the edit step (ELDER's trainer on the device).
//!
//! Compiled only: none of this has run on a GPU yet (`tests/gpu_model.rs` and `tests/gpu_train.rs`
//! check it against the CPU when one is available).

pub mod activations;
pub mod blocks;
pub mod elder;
pub mod elder_keys;
pub mod forward;
pub mod plan;
pub mod requests;
pub mod sites;
pub mod staging;
pub mod train;
pub mod weights;

use std::sync::Arc;

use anyhow::Result;
use half::{bf16, f16};

use crate::elder::molora::Elder;
use crate::eval::{self, PairScorer, Routed};
use crate::model::runner::Forward;

use crate::backend::cuda::device::GpuDevice;
pub use forward::{ElderStep, GpuModel};
pub use plan::Capacity;
pub use requests::GpuRequest;
pub use staging::{Staged, WeightSource};
pub use train::{open_gpu_editor, GpuEditor, GpuTrainer};

/// Storage and activation dtype of the CUDA forward (matmuls accumulate in f32 in every case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum GpuDtype {
    #[default]
    Bf16,
    F16,
    F32,
}

impl GpuDtype {
    pub fn as_str(self) -> &'static str {
        match self {
            GpuDtype::Bf16 => "bf16",
            GpuDtype::F16 => "f16",
            GpuDtype::F32 => "f32",
        }
    }
}

/// A [`GpuModel`] of any dtype, for callers that pick the dtype at run time (the command line):
/// requests run on it through [`GpuRunner::request`] and the request layer's functions.
pub trait GpuRunner {
    fn dtype(&self) -> GpuDtype;
    /// Uploads the ELDER state that `edited` requests use (`None` drops it).
    fn set_elder(&mut self, elder: Option<&Elder>) -> Result<()>;
    /// Buffer (re)allocations so far.
    fn allocations(&self) -> usize;
    /// One request on this model as the request layer's [`Forward`] (`edited`: with the
    /// uploaded ELDER state).
    fn request(&mut self, edited: bool) -> Box<dyn Forward<Report = Routed> + '_>;
}

macro_rules! impl_runner {
    ($t:ty, $d:expr) => {
        impl GpuRunner for GpuModel<$t> {
            fn dtype(&self) -> GpuDtype {
                $d
            }
            fn set_elder(&mut self, elder: Option<&Elder>) -> Result<()> {
                GpuModel::set_elder(self, elder)
            }
            fn allocations(&self) -> usize {
                GpuModel::allocations(self)
            }
            fn request(&mut self, edited: bool) -> Box<dyn Forward<Report = Routed> + '_> {
                Box::new(GpuModel::request(self, edited))
            }
        }
    };
}

impl_runner!(f32, GpuDtype::F32);
impl_runner!(f16, GpuDtype::F16);
impl_runner!(bf16, GpuDtype::Bf16);

/// Uploads the model of `source` to `dev` in `dtype` with buffers for calls up to `cap` (they grow
/// on demand).
pub fn open_gpu_model<'a>(
    dev: Arc<GpuDevice>,
    source: impl Into<WeightSource<'a>>,
    dtype: GpuDtype,
    cap: Capacity,
) -> Result<Box<dyn GpuRunner>> {
    let source = source.into();
    Ok(match dtype {
        GpuDtype::F32 => Box::new(GpuModel::<f32>::new(dev, source, cap)?),
        GpuDtype::F16 => Box::new(GpuModel::<f16>::new(dev, source, cap)?),
        GpuDtype::Bf16 => Box::new(GpuModel::<bf16>::new(dev, source, cap)?),
    })
}

/// The evaluator's view of a GPU model (its ELDER state uploaded with [`GpuRunner::set_elder`]).
pub struct GpuScorer<'a>(pub &'a mut dyn GpuRunner);

impl PairScorer for GpuScorer<'_> {
    fn score_pairs(
        &mut self,
        edited: bool,
        pairs: &[(&[u32], &[u32])],
    ) -> Result<Vec<eval::Scored>> {
        eval::score_pairs_on(&mut *self.0.request(edited), pairs)
    }
}
