//! vmrig-python: the test-script bridge.
//!
//! A test's Python script runs in the host's CPython (3.9 or newer) as a child
//! process. Its API is the NixOS test driver's (`start_all()`,
//! `server.wait_for_unit("nginx.service")`, `subtest`, `retry`, ...), provided
//! by an embedded module, [`PYTHON_MODULE`]. Every machine call in the script
//! is one JSON-RPC request over a socket pair to the Rust side, where a
//! [`Handler`] (the driver) does the work.
//!
//! ```text
//!   driver thread                          python3 child
//!   ScriptChild::spawn ── fd 3 ──────────▶ vmrig_driver.main()
//!   ScriptChild::serve(&handler) ◀──────── {"id":1,"method":"machine.succeed",...}
//!       handler.call(method, params) ───▶ {"id":1,"result":"..."}
//!   ... until script.finished / script.failed, then the child exits
//! ```
//!
//! Nothing here holds VM state; the module never prints a failure itself, it
//! reports it (`script.failed`) and the driver prints it.

mod child;
mod names;
mod rpc;
mod syntax;

pub use child::{BridgeError, Mode, ScriptChild, ScriptContext, ScriptKiller, ScriptOutcome};
pub use names::{pythonize_name, MachineInfo};
pub use rpc::{Handler, RpcError, RpcErrorKind};
pub use syntax::{check_syntax, probe_python, PythonVersion, ScriptError, ScriptSource};

/// The embedded Python module (`vmrig_driver.py`): the test-script API.
pub const PYTHON_MODULE: &str = include_str!("../python/vmrig_driver.py");

/// The tiny main file that imports [`PYTHON_MODULE`] and runs the script.
pub const PYTHON_MAIN: &str = include_str!("../python/vmrig_test_main.py");

/// File name under which [`PYTHON_MODULE`] is written into the work dir.
pub const MODULE_FILE_NAME: &str = "vmrig_driver.py";

/// The oldest CPython the embedded module supports.
pub const MIN_PYTHON: PythonVersion = PythonVersion { major: 3, minor: 9 };

/// Every method of the NixOS driver's `Machine` that the embedded module
/// provides (DESIGN.md's list plus `copy_from_host_via_shell`); each is one
/// RPC `machine.<name>` except the aliases and loops noted in the module.
pub const MACHINE_METHODS: &[&str] = &[
    "start",
    "shutdown",
    "crash",
    "reboot",
    "wait_for_shutdown",
    "execute",
    "succeed",
    "fail",
    "wait_until_succeeds",
    "wait_until_fails",
    "sleep",
    "systemctl",
    "start_job",
    "stop_job",
    "get_unit_info",
    "get_unit_property",
    "wait_for_unit",
    "require_unit_state",
    "wait_for_file",
    "wait_for_open_port",
    "wait_for_closed_port",
    "wait_for_open_unix_socket",
    "wait_for_console_text",
    "get_console_log",
    "send_console",
    "send_monitor_command",
    "send_key",
    "send_chars",
    "screenshot",
    "get_screen_text",
    "get_screen_text_variants",
    "wait_for_text",
    "wait_for_x",
    "get_window_names",
    "wait_for_window",
    "get_tty_text",
    "wait_until_tty_matches",
    "copy_from_host",
    "copy_from_host_via_shell",
    "copy_from_vm",
    "copy_from_machine",
    "forward_port",
    "block",
    "unblock",
    "shell_interact",
    "console_interact",
    "wait_for_qmp_event",
];
