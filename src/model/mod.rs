//! Everything about the frozen base model: config, weights, tokenizer, checkpoint formats.
pub mod checkpoint;
pub mod config;
pub mod presets;
pub mod tokenizer;
pub mod weights;

pub use config::{Arch, ModelConfig};
