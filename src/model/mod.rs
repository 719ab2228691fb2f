//! Everything about the frozen base model: config, weights, tokenizer, checkpoint formats.
pub mod checkpoint;
pub mod config;
pub mod gguf;

pub use config::{Arch, ModelConfig};
