//! [`Error`]: why a call failed, by kind.

use std::time::Duration;

use crate::{ImageError, RunError, SpecError};
use serde::de::DeserializeOwned;
use serde_json::Value;
use vmrig_python::{RpcError, RpcErrorKind};

/// A `Result` whose error is vmrig's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a call failed. Match on the variant to tell a failed check from a broken host.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The test file cannot be read or is not valid (the message names file, line and
    /// column).
    #[error(transparent)]
    TestFile(Box<SpecError>),
    /// A guest image could not be built: a missing host tool, an unknown package, a
    /// builder that failed.
    #[error(transparent)]
    Build(Box<ImageError>),
    /// A check did not hold: `succeed`'s command failed, `fail`'s succeeded, a unit failed
    /// (upstream's `RequestedAssertionFailed`).
    #[error("{0}")]
    Assertion(String),
    /// The machine cannot do that: it is not running, has no display, its shell is gone
    /// (upstream's `MachineError`).
    #[error("{0}")]
    Machine(String),
    /// A wait ran out of time (its own timeout or the test's `global_timeout`).
    #[error("{0}")]
    Timeout(String),
    /// [`Run::machine`](crate::Run::machine) was given a name that is no machine of the test.
    #[error("no machine named `{name}` in this test; it has: {}", known.join(", "))]
    NoSuchMachine {
        /// The name asked for.
        name: String,
        /// The test's machines.
        known: Vec<String>,
    },
    /// The host could not run the test: QEMU, the store, the output directory, the
    /// switches. The [`RunError`] names what failed (a variant each), and its
    /// [`kind`](RunError::kind) tells a full disk from the rest.
    #[error(transparent)]
    Infra(Box<RunError>),
    /// A bug in vmrig (a request it did not serve, an answer that does not parse).
    #[error("vmrig internal error: {0}")]
    Internal(String),
}

impl From<RunError> for Error {
    fn from(e: RunError) -> Error {
        match e {
            RunError::Image(e) => Error::Build(Box::new(e)),
            other => Error::Infra(Box::new(other)),
        }
    }
}

pub(crate) fn call_error(e: RpcError) -> Error {
    match e.kind {
        RpcErrorKind::RequestedAssertionFailed => Error::Assertion(e.message),
        RpcErrorKind::MachineError => Error::Machine(e.message),
        RpcErrorKind::Timeout => Error::Timeout(e.message),
        RpcErrorKind::Internal => Error::Internal(e.message),
    }
}

pub(crate) fn answer<T: DeserializeOwned>(value: Value) -> Result<T> {
    serde_json::from_value(value.clone())
        .map_err(|e| Error::Internal(format!("unexpected answer {value}: {e}")))
}

pub(crate) fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
