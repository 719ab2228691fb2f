//! ELDER: mixture-of-LoRA experts with per-sequence routers, guided loss and a deferral codebook,
//! plus what goes beyond the paper (the key store, stored allocations, per-edit experts).
pub mod buckets;
pub mod capture;
pub mod codebook;
pub mod config;
pub mod forget;
pub mod keystore;
pub mod last_block;
pub mod memory;
pub mod molora;
pub mod persist;
pub mod plan;
pub mod segments;
pub mod state;
pub mod train_stored;
pub mod trainer;
pub mod words;
