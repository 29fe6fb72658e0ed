//! The Rust API's logic without VMs (the VM tests are tests/vm_api.rs).

use std::collections::BTreeMap;

use serde_json::Value;
use vmrig_python::RpcError;

use super::error::{answer, call_error};
use crate::{Error, Machine, Run};

#[test]
fn a_run_is_shared_by_threads_and_errors_cross_them() {
    fn sync<T: Sync>() {}
    fn send_sync_static<T: Send + Sync + 'static>() {}
    sync::<Run>();
    sync::<Machine<'static>>();
    send_sync_static::<Error>();
}

#[test]
fn call_errors_keep_their_kind() {
    assert!(matches!(
        call_error(RpcError::assertion("no")),
        Error::Assertion(m) if m == "no"
    ));
    assert!(matches!(
        call_error(RpcError::machine("gone")),
        Error::Machine(_)
    ));
    assert!(matches!(
        call_error(RpcError::timeout("late")),
        Error::Timeout(_)
    ));
    assert!(matches!(
        call_error(RpcError::internal("bug")),
        Error::Internal(_)
    ));
}

#[test]
fn answers_parse_into_rust_types() {
    let (status, out): (i32, String) = answer(serde_json::json!([3, "x\n"])).unwrap();
    assert_eq!((status, out.as_str()), (3, "x\n"));
    let () = answer(Value::Null).unwrap();
    let info: BTreeMap<String, String> =
        answer(serde_json::json!({"ActiveState": "active"})).unwrap();
    assert_eq!(info["ActiveState"], "active");
    assert!(matches!(
        answer::<String>(serde_json::json!(1)),
        Err(Error::Internal(_))
    ));
}

#[test]
fn a_missing_test_file_is_a_test_file_error() {
    let err = Run::from_file("/nonexistent/web.toml").unwrap_err();
    assert!(matches!(err, Error::TestFile(_)), "{err:?}");
    assert!(err.to_string().contains("cannot read test file"), "{err}");
}
