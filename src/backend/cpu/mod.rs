//! The CPU reference backend.
pub mod linear_ce;
pub mod ops;
pub mod skinny;
