//! elder: lifelong model editing (ELDER) on a frozen language model.
pub mod backend;
pub mod elder;
pub mod eval;
pub mod model;
pub mod tensor;
