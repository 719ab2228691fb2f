//! Everything about the frozen base model: config, weights, tokenizer, checkpoint formats, and the
//! one description of the transformer that every backend runs.
pub mod checkpoint;
pub mod config;
pub mod gguf;
pub mod layers;
pub mod loader;
pub mod names;
pub mod presets;
pub mod runner;
pub mod structure;
pub mod tokenizer;
pub mod transformer;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use transformer::{Adapter, BatchShape, KvCache, Model, NoAdapter};
