//! Compute backends: the CPU reference and (when built with nvcc) CUDA.
pub mod cpu;
pub mod cuda;
pub mod dtype;
pub mod select;
pub mod shapes;
