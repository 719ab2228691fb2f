//! elder: lifelong model editing (ELDER) on a frozen language model.
pub mod model;
pub mod tensor;
pub mod backend;
