//! ELDER: mixture-of-LoRA experts with per-sequence routers, guided loss and a deferral codebook.
pub mod codebook;
pub mod config;
pub mod molora;
pub mod persist;
pub mod state;
pub mod trainer;
