//! Runtimes per device: the base model and the method run on one device. The CPU runtime is the
//! model's own forward ([`crate::model`]) with the method's adapter; [`cuda`] stages the model on
//! a GPU and runs inference and edit training with the kernels of [`crate::backend::cuda`].
//!
//! This layer sits above the method (`elder`, `eval`) and below the engine handle
//! ([`crate::engine`]); the backends under it are leaf libraries of ops, kernels and launchers.
pub mod cuda;
