//! An example of vmrig's Rust API: a project whose `cargo test` boots VMs.
//!
//! The library is empty; the example is in `tests/`: `web.toml` declares the machine, and
//! `vm_web.rs` drives it with `vmrig::Run` (`cargo test -p vmrig-example-rust-api`).
