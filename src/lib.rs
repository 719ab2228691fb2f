//! elder: lifelong model editing (ELDER) on a frozen language model.
pub mod data;
pub mod elder;
pub mod model;
pub mod tensor;
pub mod util;
