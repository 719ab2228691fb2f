//! The building blocks of the frozen base model: linear projections, norms and MLPs, each with the
//! forward and the input-gradient the ELDER trainer needs (frozen weights never get gradients).

use crate::backend::cpu::layout_copy::LayoutCopy;
use crate::backend::cpu::ops::{self, Direction, Layout, MatRef};

/// A frozen linear projection `y = x W (+ b)`, W kept in its checkpoint layout. `W` is what holds
/// a tensor: f32 values on the CPU, a tensor's name and shape in the model description
/// ([`super::names::describe`]), a device buffer on the way to a GPU.
#[derive(Debug, Clone)]
pub struct Linear<W = Vec<f32>> {
    pub weight: W,
    pub bias: Option<W>,
    pub in_dim: usize,
    pub out_dim: usize,
    pub layout: Layout,
    /// The weight in its other layout, made on the first product it speeds up (CPU only).
    pub layout_copy: LayoutCopy,
}

impl Linear {
    pub fn mat(&self) -> MatRef<'_> {
        MatRef {
            data: &self.weight,
            in_dim: self.in_dim,
            out_dim: self.out_dim,
            layout: self.layout,
        }
    }

    /// `out[rows, out_dim] = x W + b`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; rows * self.out_dim];
        self.layout_copy
            .run(Direction::Forward, x, rows, self.mat(), &mut out, false);
        if let Some(b) = &self.bias {
            ops::add_bias(&mut out, b);
        }
        out
    }

    /// `dx (+)= dy W^T`.
    pub fn backward_input(&self, dy: &[f32], rows: usize, dx: &mut [f32], accumulate: bool) {
        self.layout_copy
            .run(Direction::InputGrad, dy, rows, self.mat(), dx, accumulate);
    }
}

/// Pre-norm of a block: LayerNorm (GPT-2) or RMSNorm (Llama).
#[derive(Debug, Clone)]
pub enum Norm<W = Vec<f32>> {
    Layer { weight: W, bias: W, eps: f32 },
    Rms { weight: W, eps: f32 },
}

/// What a norm saves for its backward pass.
#[derive(Debug, Clone, Default)]
pub struct NormSaved {
    pub mean: Vec<f32>,
    pub rstd: Vec<f32>,
}

impl Norm {
    pub fn width(&self) -> usize {
        match self {
            Norm::Layer { weight, .. } | Norm::Rms { weight, .. } => weight.len(),
        }
    }

    pub fn forward(&self, x: &[f32]) -> (Vec<f32>, NormSaved) {
        let rows = x.len() / self.width();
        let mut out = vec![0.0f32; x.len()];
        let mut saved = NormSaved {
            mean: vec![0.0; rows],
            rstd: vec![0.0; rows],
        };
        match self {
            Norm::Layer { weight, bias, eps } => ops::layernorm(
                x,
                weight,
                bias,
                *eps,
                &mut out,
                &mut saved.mean,
                &mut saved.rstd,
            ),
            Norm::Rms { weight, eps } => ops::rmsnorm(x, weight, *eps, &mut out, &mut saved.rstd),
        }
        (out, saved)
    }

    /// `dx += d(norm)/dx^T dout`.
    pub fn backward_accumulate(&self, x: &[f32], saved: &NormSaved, dout: &[f32], dx: &mut [f32]) {
        match self {
            Norm::Layer { weight, .. } => {
                ops::layernorm_backward(x, weight, &saved.mean, &saved.rstd, dout, dx, true)
            }
            Norm::Rms { weight, .. } => {
                ops::rmsnorm_backward(x, weight, &saved.rstd, dout, dx, true)
            }
        }
    }
}

/// The linear projections of an MLP that ELDER can wrap (and read its query from).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum MlpProj {
    /// GPT-2 `mlp.c_fc` (input width d).
    CFc,
    /// GPT-2 `mlp.c_proj` (input width 4d).
    CProj,
    /// Llama `mlp.gate_proj` (input width d).
    GateProj,
    /// Llama `mlp.up_proj` (input width d).
    UpProj,
    /// Llama `mlp.down_proj` (input width intermediate).
    DownProj,
}

impl MlpProj {
    pub fn hf_name(self) -> &'static str {
        match self {
            MlpProj::CFc => "mlp.c_fc",
            MlpProj::CProj => "mlp.c_proj",
            MlpProj::GateProj => "mlp.gate_proj",
            MlpProj::UpProj => "mlp.up_proj",
            MlpProj::DownProj => "mlp.down_proj",
        }
    }
}

impl std::str::FromStr for MlpProj {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let s = s.strip_prefix("mlp.").unwrap_or(s);
        Ok(match s {
            "c_fc" => MlpProj::CFc,
            "c_proj" => MlpProj::CProj,
            "gate_proj" => MlpProj::GateProj,
            "up_proj" => MlpProj::UpProj,
            "down_proj" => MlpProj::DownProj,
            other => anyhow::bail!(
                "unknown MLP projection {other:?}: expected c_fc, c_proj (GPT-2) or gate_proj, up_proj, down_proj (Llama)"
            ),
        })
    }
}

/// One MLP projection in one block: where an adapter can attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Site {
    pub block: usize,
    pub proj: MlpProj,
}

/// The feed-forward half of a block.
#[derive(Debug, Clone)]
pub enum Mlp<W = Vec<f32>> {
    /// `c_proj(gelu_new(c_fc(x)))`
    Gpt2 { c_fc: Linear<W>, c_proj: Linear<W> },
    /// `down(silu(gate(x)) * up(x))`
    Llama {
        gate: Linear<W>,
        up: Linear<W>,
        down: Linear<W>,
    },
}

impl<W> Mlp<W> {
    pub fn linear(&self, proj: MlpProj) -> Option<&Linear<W>> {
        match (self, proj) {
            (Mlp::Gpt2 { c_fc, .. }, MlpProj::CFc) => Some(c_fc),
            (Mlp::Gpt2 { c_proj, .. }, MlpProj::CProj) => Some(c_proj),
            (Mlp::Llama { gate, .. }, MlpProj::GateProj) => Some(gate),
            (Mlp::Llama { up, .. }, MlpProj::UpProj) => Some(up),
            (Mlp::Llama { down, .. }, MlpProj::DownProj) => Some(down),
            _ => None,
        }
    }

    /// The projections that read the block's normed input.
    pub fn input_projs(&self) -> &'static [MlpProj] {
        match self {
            Mlp::Gpt2 { .. } => &[MlpProj::CFc],
            Mlp::Llama { .. } => &[MlpProj::GateProj, MlpProj::UpProj],
        }
    }

    /// The projection that writes the block's output.
    pub fn output_proj(&self) -> MlpProj {
        match self {
            Mlp::Gpt2 { .. } => MlpProj::CProj,
            Mlp::Llama { .. } => MlpProj::DownProj,
        }
    }
}
