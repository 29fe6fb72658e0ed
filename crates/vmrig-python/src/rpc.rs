//! The wire protocol: newline-delimited JSON, strictly request/response.
//!
//! Request `{"id": n, "method": "...", "params": {...}}`; response
//! `{"id": n, "result": <json>}` or
//! `{"id": n, "error": {"kind": "RequestedAssertionFailed" | "MachineError" |
//! "Timeout" | "Internal", "message": "..."}}`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// Which Python exception the script sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RpcErrorKind {
    /// `RequestedAssertionFailed`: a command failed, a check did not hold.
    RequestedAssertionFailed,
    /// `MachineError`: the machine cannot do that (not running, no display).
    MachineError,
    /// A wait ran out of time. Upstream raises `RequestedAssertionFailed`
    /// for that, so the script sees that class (and `TimeoutError` from
    /// `wait_for_qmp_event`, as upstream).
    Timeout,
    /// A driver bug or an unknown method: `VmrigInternalError` (a
    /// `RuntimeError`).
    Internal,
}

/// An error answer to a request. The message reaches Python unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcError {
    pub kind: RpcErrorKind,
    pub message: String,
}

impl RpcError {
    pub fn new(kind: RpcErrorKind, message: impl Into<String>) -> Self {
        RpcError {
            kind,
            message: message.into(),
        }
    }
    pub fn assertion(message: impl Into<String>) -> Self {
        Self::new(RpcErrorKind::RequestedAssertionFailed, message)
    }
    pub fn machine(message: impl Into<String>) -> Self {
        Self::new(RpcErrorKind::MachineError, message)
    }
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(RpcErrorKind::Timeout, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(RpcErrorKind::Internal, message)
    }
    /// The answer for a method the handler does not know.
    pub fn unknown_method(method: &str) -> Self {
        Self::internal(format!("vmrig driver: unknown method {method:?}"))
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for RpcError {}

/// The driver side of the script's calls. `call` runs on the thread that
/// runs [`crate::ScriptChild::serve`], one call at a time.
///
/// `script.finished` and `script.failed` never reach the handler: `serve`
/// turns them into its [`crate::ScriptOutcome`].
pub trait Handler {
    fn call(&self, method: &str, params: &Value) -> Result<Value, RpcError>;
}

impl<F> Handler for F
where
    F: Fn(&str, &Value) -> Result<Value, RpcError>,
{
    fn call(&self, method: &str, params: &Value) -> Result<Value, RpcError> {
        self(method, params)
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct Request {
    pub id: Value,
    pub method: String,
    #[serde(default)]
    pub params: Value,
}

pub(crate) fn response(id: &Value, answer: Result<Value, RpcError>) -> String {
    let v = match answer {
        Ok(result) => serde_json::json!({ "id": id, "result": result }),
        Err(e) => serde_json::json!({ "id": id, "error": e }),
    };
    let mut line = v.to_string();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_wire_format() {
        let line = response(&Value::from(7), Err(RpcError::timeout("too slow")));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": 7, "error": {"kind": "Timeout", "message": "too slow"}})
        );
        let line = response(&Value::from(8), Ok(Value::from("out")));
        assert_eq!(line, "{\"id\":8,\"result\":\"out\"}\n");
    }
}
