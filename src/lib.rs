//! elder: lifelong model editing (ELDER) on a frozen language model.
//!
//! - [`model`]: the frozen base model (config, weights, tokenizer, the transformer description).
//! - [`backend`]: the ops every backend implements (CPU reference; CUDA kernels when built with nvcc).
//! - [`elder`]: MoLoRA layers, routers, codebook and deferral, the trainer, the durable edit state.
//! - [`data`]: edit records and dataset readers; [`eval`]: metrics and protocols.
//! - [`session`]: a base model, an edit state and the edit stream on one trainer;
//!   [`engine`]: the handle every command uses, a base model on the device chosen once.
//! - [`serve`]: `elder serve`, the HTTP service over an engine and a durable edit log.
pub mod backend;
pub mod data;
pub mod elder;
pub mod engine;
pub mod eval;
pub mod model;
pub mod runtime;
pub mod serve;
pub mod session;
pub mod util;
