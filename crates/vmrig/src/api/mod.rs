//! The Rust API's parts: errors, the run, its machines.

pub mod error;
pub mod machine;
pub mod run;

#[cfg(test)]
mod tests;
