//! Drive vmrig's virtual machines from Rust tests (`cargo test`).
//!
//! A test file declares the machines (the same TOML as `vmrig run` takes; its
//! `test_script` may be left out), and the Rust test drives them with the NixOS test
//! driver's API under Rust names: [`Run`] is upstream's driver (`start_all`, `subtest`,
//! `partition`, ...), [`Machine`] a machine (`succeed`, `fail`, `execute`,
//! `wait_for_unit`, `copy_from_host`, ...). Every call goes through the same driver and
//! the same request handler as a Python test script's calls, so a call means what it means
//! there; results are Rust types and errors are [`Error`]s, one variant per kind of
//! failure.
//!
//! ```no_run
//! # fn main() -> Result<(), vmrig::Error> {
//! // Builds the images (cached in the store) and makes the machines; none boots yet.
//! let run = vmrig::Run::from_file("tests/web.toml")?;
//! run.start_all()?;
//! let server = run.machine("server")?;
//! server.wait_for_unit("nginx.service")?;
//! server.wait_for_open_port(80)?;
//! let page = run.machine("client")?.succeed("curl -s http://server/")?;
//! assert!(page.contains("Welcome to nginx!"));
//! // A failed check is an `Error::Assertion`, as upstream's `RequestedAssertionFailed`.
//! assert!(matches!(server.succeed("false"), Err(vmrig::Error::Assertion(_))));
//! # Ok(())
//! # }
//! // Dropping `run` stops every VM, the switches, and removes the run directory.
//! ```
//!
//! # Cleanup
//!
//! Dropping a [`Run`] kills its QEMU processes, stops its switches and removes its run
//! directory, also when the test panics (the drop runs while the panic unwinds). When the
//! test process dies without unwinding (SIGKILL, `panic = "abort"`), QEMU dies with it
//! (`PR_SET_PDEATHSIG`) and a watcher process removes the run directory; SIGINT and
//! SIGTERM stop every VM of the process before it exits.
//!
//! # Timeouts
//!
//! As upstream: commands have no time limit of their own (but [`Machine::execute`]: 900 s)
//! and waits give up after 900 s; [`Machine::with_timeout`] sets another limit. Every wait
//! also ends at the test file's `global_timeout` (default 3600 s, counted from when the
//! [`Run`] is ready, after the image builds): past it, calls fail.
//!
//! # Output
//!
//! The run writes `events.jsonl` and the machines' serial logs into its output directory
//! (default `vmrig-out/<test name>`, relative to the working directory, which `cargo test`
//! sets to the package's directory; see [`RunBuilder::out_dir`]). The NixOS-style log goes
//! to the test's stderr through `eprint!`, so the test harness shows it for failed tests.

#![warn(missing_docs)]

pub use vmrig_driver::RunError;
pub use vmrig_image::ImageError;
pub use vmrig_spec::SpecError;

mod api;

pub use api::error::{Error, Result};
pub use api::machine::Machine;
pub use api::run::{Accel, Run, RunBuilder};
