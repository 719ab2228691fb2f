//! The CPU reference backend.
pub mod molora;
pub mod ops;
pub mod skinny;
