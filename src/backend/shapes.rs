//! Shape types both backends share: the CPU ops and the CUDA launchers take the same
//! descriptions, so neither backend imports the other's.

/// Storage order of a weight matrix used as `y = x W`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[in, out]` row-major (GPT-2 Conv1D, LoRA A and B).
    InOut,
    /// `[out, in]` row-major (torch nn.Linear, embedding tables used as the lm_head).
    OutIn,
}

/// Shapes of one MoLoRA mixture call.
#[derive(Debug, Clone, Copy)]
pub struct MixShape {
    pub batch: usize,
    pub seq: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub rank: usize,
    pub k: usize,
    /// LoRA scaling `alpha / r`.
    pub scale: f32,
}
