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
//!
//! Before a script runs, [`check_script`] reads it with the host's Python (`ast`,
//! `symtable`) against the module's own globals and signatures; [`stubs`] writes the
//! module's API as typed `.pyi` files. Both come from [`PYTHON_MODULE`] (see `check.rs`).
//!
//! # The methods a [`Handler`] answers
//!
//! Params are always a JSON object; absent Python arguments arrive with
//! their upstream defaults filled in (`null` for `None`). Timeouts are
//! seconds, int or float. Errors: see [`RpcErrorKind`].
//!
//! Machine methods all carry `"machine": <node name>` (the node's name, not
//! its Python name) besides the listed params; `-> x` is the result
//! (`null` when none is listed).
//!
//! | method | params | result |
//! | --- | --- | --- |
//! | `machine.start` | `allow_reboot` | |
//! | `machine.connect` | | |
//! | `machine.shutdown`, `machine.crash`, `machine.reboot`, `machine.wait_for_shutdown` | | |
//! | `machine.is_up` | | bool |
//! | `machine.state` | | `{"booted": bool, "connected": bool}` |
//! | `machine.execute` | `command`, `check_return`, `check_output`, `timeout` (null = none) | `[status, output]` |
//! | `machine.succeed`, `machine.fail` | `commands` (list), `timeout` (null) | output, concatenated |
//! | `machine.wait_until_succeeds`, `machine.wait_until_fails` | `command`, `timeout`, `attempt_timeout` (null = the time left) | output of the last attempt |
//! | `machine.sleep` | `secs` (guest time) | |
//! | `machine.systemctl` | `q`, `user` | `[status, output]` |
//! | `machine.start_job`, `machine.stop_job` | `jobname`, `user` | `[status, output]` |
//! | `machine.get_unit_info` | `unit`, `user` | object of strings |
//! | `machine.get_unit_property` | `unit`, `property`, `user` | string |
//! | `machine.wait_for_unit` | `unit`, `user`, `timeout` | |
//! | `machine.require_unit_state` | `unit`, `require_state` | |
//! | `machine.wait_for_file` | `filename`, `timeout` | |
//! | `machine.wait_for_open_port`, `machine.wait_for_closed_port` | `port`, `addr`, `timeout` | |
//! | `machine.wait_for_open_unix_socket` | `addr`, `is_datagram`, `timeout` | |
//! | `machine.wait_for_console_text` | `regex`, `timeout` (null: the driver's own bound) | |
//! | `machine.get_console_log` | | string |
//! | `machine.send_console` | `chars` | |
//! | `machine.send_monitor_command` | `command` | string |
//! | `machine.next_qmp_event` | `timeout` (float s) | the next QMP event (object) since the last call, or `null`/`Timeout` error when none came in time |
//! | `machine.send_key` | `key` (QEMU name or one character, mapped as upstream's CHAR_TO_KEY), `delay` (null = none), `log` | |
//! | `machine.send_chars` | `chars`, `delay` | |
//! | `machine.screenshot` | `filename` (upstream: `.png` added when no `.`; relative to out_dir when no `/`) | |
//! | `machine.get_screen_text` | | string |
//! | `machine.get_screen_text_variants`, `machine.get_window_names` | | list of strings |
//! | `machine.wait_for_text` | `regex`, `timeout` | |
//! | `machine.wait_for_x` | `timeout` | |
//! | `machine.wait_for_window` | `regexp`, `timeout` | |
//! | `machine.get_tty_text` | `tty` | string |
//! | `machine.wait_until_tty_matches` | `tty`, `regexp`, `timeout` | |
//! | `machine.copy_from_host`, `machine.copy_from_host_via_shell` | `source` (host path), `target` | |
//! | `machine.copy_from_machine` (also for `copy_from_vm`) | `source`, `target_dir` (relative to out_dir) | |
//! | `machine.forward_port` | `host_port`, `guest_port` | |
//! | `machine.block`, `machine.unblock` | | |
//!
//! Done in Python: `shell_interact` (a line-by-line root shell over `machine.execute`),
//! `console_interact` (reads stdin, one `machine.send_console`
//! per character), `wait_for_qmp_event` (loops over `machine.next_qmp_event`),
//! `dump_tty_contents` (one `machine.execute`), `log`/`nested` on a machine
//! (`log.message`/`block.begin` with `attrs.machine`).
//!
//! | method | params | result |
//! | --- | --- | --- |
//! | `driver.start_all`, `driver.join_all` | | |
//! | `block.begin` | `message`, `kind` (`"subtest"` or `"nested"`), `attrs` (object of strings) | `{"id": <any JSON>}` |
//! | `block.end` | `id`, `error` (null, or `"ExcType: message"`) | |
//! | `log.message` | `level` (`debug`/`info`/`warning`/`error`), `message`, `attrs` | |
//! | `serial_stdout` | `on` (bool) | |
//! | `vlan.set_loss` | `vlan`, `percent` | |
//! | `vlan.set_delay` | `vlan`, `ms` | |
//! | `net.partition` | `group_a`, `group_b` (lists of node names) | |
//! | `net.heal` | | |
//!
//! `script.finished {}` and `script.failed {"type", "message", "line",
//! "traceback"}` end the run; [`ScriptChild::serve`] answers them itself and
//! returns them as a [`ScriptOutcome`].

mod check;
mod child;
mod error;
pub use error::BridgeError;
mod names;
mod rpc;
mod syntax;

pub use check::{check_script, stubs, write_stubs, Finding, Findings, ScriptNames, STUB_FILES};
pub use child::{Mode, ScriptChild, ScriptContext, ScriptKiller, ScriptOutcome};
pub use names::{pythonize_name, MachineInfo};
pub use rpc::{Handler, RpcError, RpcErrorKind};
pub use syntax::{
    check_syntax, driver_symbols, probe_python, PythonVersion, ScriptError, ScriptSource,
    SyntaxDiagnostic,
};

/// The embedded Python module (`vmrig_driver.py`): the test-script API.
pub const PYTHON_MODULE: &str = include_str!("../python/vmrig_driver.py");

/// The tiny main file that imports [`PYTHON_MODULE`] and runs the script.
pub const PYTHON_MAIN: &str = include_str!("../python/vmrig_test_main.py");

/// File name under which [`PYTHON_MODULE`] is written into the work dir.
pub const MODULE_FILE_NAME: &str = "vmrig_driver.py";

/// The oldest CPython the embedded module supports.
pub const MIN_PYTHON: PythonVersion = PythonVersion { major: 3, minor: 9 };
