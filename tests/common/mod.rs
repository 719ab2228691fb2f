//! Helpers shared by the GPU-vs-CPU test binaries (`gpu_model`, `gpu_train`): closeness checks,
//! the CPU model as a GPU dtype sees it, and random tiny models.
#![allow(dead_code)] // each test binary uses its own subset

use std::sync::Arc;

use elder::backend::cuda::{announce, cuda_available, gpu_or_skip, GpuDevice, KernelDtype};
use elder::model::layers::{Linear, Mlp, Norm};
use elder::model::loader::{build_model, RandomSource};
use elder::model::transformer::QkvProj;
use elder::model::{Arch, Model, ModelConfig};

/// Asserts closeness and returns the largest absolute difference (printed by the callers).
#[track_caller]
pub fn assert_close(what: &str, gpu: &[f32], cpu: &[f32], (atol, rtol): (f32, f32)) -> f32 {
    assert_eq!(gpu.len(), cpu.len(), "{what}: length differs");
    let mut worst = 0.0f32;
    let mut bad = Vec::new();
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        let d = (g - c).abs();
        let ok = d <= atol + rtol * c.abs(); // false for NaN
        if !ok {
            bad.push((i, g, c));
        }
        worst = worst.max(d);
    }
    assert!(
        bad.is_empty(),
        "{what}: {} of {} values off (atol {atol}, rtol {rtol}); first: {:?}",
        bad.len(),
        cpu.len(),
        &bad[..bad.len().min(8)]
    );
    worst
}

/// Every weight of `m` as a `T` buffer holds it (the CPU then sees what the GPU uploaded).
pub fn rounded<T: KernelDtype>(m: &Model) -> Model {
    let r = |v: &mut Vec<f32>| v.iter_mut().for_each(|x| *x = T::from_f32(*x).to_f32());
    let lin = |l: &mut Linear| {
        r(&mut l.weight);
        if let Some(b) = &mut l.bias {
            r(b);
        }
    };
    let norm = |n: &mut Norm| match n {
        Norm::Layer { weight, bias, .. } => {
            r(weight);
            r(bias);
        }
        Norm::Rms { weight, .. } => r(weight),
    };
    let mut m = m.clone();
    r(&mut m.embed);
    if let Some(p) = &mut m.pos_embed {
        r(p);
    }
    for b in &mut m.blocks {
        norm(&mut b.norm1);
        norm(&mut b.norm2);
        match &mut b.qkv {
            QkvProj::Fused(l) => lin(l),
            QkvProj::Split { q, k, v } => {
                lin(q);
                lin(k);
                lin(v);
            }
        }
        lin(&mut b.o_proj);
        match &mut b.mlp {
            Mlp::Gpt2 { c_fc, c_proj } => {
                lin(c_fc);
                lin(c_proj);
            }
            Mlp::Llama { gate, up, down } => {
                lin(gate);
                lin(up);
                lin(down);
            }
        }
    }
    norm(&mut m.final_norm);
    if let Some(l) = &mut m.lm_head {
        lin(l);
    }
    m
}

pub fn tiny(arch: Arch, seed: u64) -> Model {
    let cfg = ModelConfig {
        arch,
        vocab_size: 97,
        hidden_size: 64,
        num_layers: 4,
        num_heads: 4,
        num_kv_heads: if arch == Arch::Llama { 2 } else { 4 },
        head_dim: 16,
        intermediate_size: 128,
        max_positions: 64,
        norm_eps: 1e-5,
        rope_theta: 10000.0,
        tie_word_embeddings: arch == Arch::Gpt2,
        bos_token_id: None,
        eos_token_id: None,
    };
    sharpened(build_model(&cfg, &RandomSource { seed }).unwrap())
}

/// A random model with its head scaled up: logits spread over a few units instead of a few
/// hundredths, so greedy choices are not decided by rounding noise (ties would make the token-level
/// comparisons meaningless, not wrong).
pub fn sharpened(mut m: Model) -> Model {
    match &mut m.lm_head {
        Some(l) => l.weight.iter_mut().for_each(|v| *v *= 10.0),
        None => m.embed.iter_mut().for_each(|v| *v *= 10.0),
    }
    m
}

/// The device for a GPU test. With a CUDA driver: the GPU. Without one: the CPU emulator of
/// `tools/cuda-emu` (real kernels, host memory), announced by a visible `EMULATED` line, unless
/// `ELDER_CUDA_EMU=0`; with neither, `None` after a visible `SKIP` line.
pub fn test_device(test_name: &str) -> Option<Arc<GpuDevice>> {
    let emulating = *EMULATING.get_or_init(|| {
        let allowed = std::env::var("ELDER_CUDA_EMU").map_or(true, |v| v != "0");
        if cuda_available() || !allowed {
            return false;
        }
        match elder_cuda_emu::install() {
            Ok(()) => true,
            Err(e) => {
                announce(&format!("CUDA emulator unavailable: {e}"));
                false
            }
        }
    });
    if emulating {
        announce(&format!(
            "EMULATED {test_name}: no CUDA driver, so the CUDA path runs on the CPU emulator \
             (tools/cuda-emu: checks results, not speed)"
        ));
    }
    gpu_or_skip(test_name)
}

/// Whether the GPU tests of this process run on the emulator (decided by [`test_device`]).
static EMULATING: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// The device for a test that reads the emulator's trace of host calls (`elder_cuda_emu::trace`):
/// the emulator, or `None` after a visible `SKIP` line where a real driver serves the GPU tests
/// (CUDA has no such trace; Nsight Systems shows the same on a GPU).
pub fn traced_device(test_name: &str) -> Option<Arc<GpuDevice>> {
    let dev = test_device(test_name)?;
    if EMULATING.get() != Some(&true) {
        announce(&format!(
            "SKIP {test_name}: the launch trace exists only on the CUDA emulator, and a CUDA \
             driver is loaded"
        ));
        return None;
    }
    Some(dev)
}

/// The CUDA emulator's library folder, for running the `elder` binary with `--device cuda` the way
/// a real driver is loaded (`LD_LIBRARY_PATH`); `None` after a visible `SKIP` line when the
/// emulator or the embedded kernels were not built.
pub fn emulator_library_or_skip(test_name: &str) -> Option<&'static str> {
    use elder::backend::cuda::{BUILT_WITH_KERNELS, NO_KERNELS_MSG};
    let Some(dir) = elder_cuda_emu::LIBRARY_DIR else {
        announce(&format!(
            "SKIP {test_name}: the CUDA emulator was not built"
        ));
        return None;
    };
    if !BUILT_WITH_KERNELS {
        announce(&format!("SKIP {test_name}: {NO_KERNELS_MSG}"));
        return None;
    }
    Some(dir)
}
