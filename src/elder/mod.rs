//! ELDER itself: codebook and deferral, the persistent edit state.
pub mod codebook;
pub mod state;
