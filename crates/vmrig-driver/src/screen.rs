//! The screen: keys, screenshots' text (OCR), X11 windows, image matching.
//! (Dispatched from `rpc.rs`; methods listed in [`METHODS`].)

use serde_json::Value;
use vmrig_python::RpcError;

use crate::logger::Logger;
use crate::machine::Machine;

/// The machine methods this module answers.
pub const METHODS: &[&str] = &[];

pub fn handles(method: &str) -> bool {
    METHODS.contains(&method)
}

pub fn call(
    _m: &mut Machine,
    method: &str,
    _params: &Value,
    _logger: &Logger,
) -> Result<Value, RpcError> {
    Err(RpcError::machine(format!(
        "`{method}` is not implemented yet"
    )))
}
