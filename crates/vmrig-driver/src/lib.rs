//! The test driver: a run of one test (machines, networks, the script) and its reports.
//!
//! The driver never prints; it emits [`events::Event`]s that reporters turn into the
//! terminal log and `events.jsonl`.

pub mod api;
pub mod cache;
pub mod cleanup;
mod copy;
pub mod creator;
pub mod deadline;
pub mod debug;
pub mod driver;
mod error;
pub mod events;
pub mod failure;
pub mod html_report;
pub mod junit;
pub mod logger;
pub mod machine;
pub mod nixos;
pub mod phase;
pub mod reporters;
pub mod request;
pub mod rpc;
pub mod run;
pub mod screen;
pub mod snapshot;

pub use error::{kind_of, ErrorKind, RunError};
pub use run::{run_test, RunOptions, RunOutcome};

/// Default budget of upstream's waits, in seconds.
pub const DEFAULT_WAIT: f64 = 900.0;

/// The HMP prompt that ends every reply of upstream's `send_monitor_command`.
pub const MONITOR_PROMPT: &str = "(qemu) ";

/// Why a machine call failed; becomes the script's exception.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The test's expectation failed (`RequestedAssertionFailed`).
    #[error("{0}")]
    Assertion(String),
    /// Something went wrong with the machine (`MachineError`).
    #[error("{0}")]
    Machine(String),
    /// A wait ran out of time.
    #[error("{0}")]
    Timeout(String),
}
