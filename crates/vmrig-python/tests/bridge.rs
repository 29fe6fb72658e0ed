//! The bridge end to end, with a real python3 and a fake driver (no VMs).
//!
//! `VMRIG_TEST_PYTHON` picks the interpreter (default `python3`); run the
//! suite with a 3.9 one to check the module's compatibility.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vmrig_python::{
    check_syntax, Handler, MachineInfo, Mode, RpcError, ScriptChild, ScriptContext, ScriptError,
    ScriptOutcome, ScriptSource, SyntaxDiagnostic,
};

fn python() -> PathBuf {
    std::env::var_os("VMRIG_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("python3"))
}

type Responder = Box<dyn Fn(&str, &Value) -> Option<Result<Value, RpcError>> + Send + Sync>;

/// Records every call; answers from `responder`, else with plausible defaults.
struct Fake {
    calls: Mutex<Vec<(String, Value)>>,
    responder: Responder,
}

impl Fake {
    fn new() -> Self {
        Self::with(|_, _| None)
    }
    fn with(
        f: impl Fn(&str, &Value) -> Option<Result<Value, RpcError>> + Send + Sync + 'static,
    ) -> Self {
        Fake {
            calls: Mutex::new(Vec::new()),
            responder: Box::new(f),
        }
    }
    fn calls(&self) -> Vec<(String, Value)> {
        self.calls.lock().unwrap().clone()
    }
    /// Calls other than logging and blocks.
    fn work(&self) -> Vec<(String, Value)> {
        self.calls()
            .into_iter()
            .filter(|(m, _)| !m.starts_with("block.") && m != "log.message")
            .collect()
    }
}

impl Handler for Fake {
    fn call(&self, method: &str, params: &Value) -> Result<Value, RpcError> {
        let n = {
            let mut calls = self.calls.lock().unwrap();
            calls.push((method.to_string(), params.clone()));
            calls.len()
        };
        if let Some(answer) = (self.responder)(method, params) {
            return answer;
        }
        Ok(match method {
            "block.begin" => json!({ "id": n }),
            "machine.execute" | "machine.systemctl" | "machine.start_job" | "machine.stop_job" => {
                json!([0, "output\n"])
            }
            "machine.succeed" | "machine.fail" => json!("output\n"),
            "machine.get_unit_info" => json!({"ActiveState": "active"}),
            "machine.state" => json!({"booted": true, "connected": false}),
            "machine.is_up" => json!(true),
            "machine.get_screen_text_variants" | "machine.get_window_names" => json!(["a", "b"]),
            m if m.starts_with("machine.get_") || m == "machine.send_monitor_command" => {
                json!("text")
            }
            _ => Value::Null,
        })
    }
}

struct Run {
    outcome: ScriptOutcome,
    fake: Fake,
}

fn ctx(dir: &Path, nodes: &[&str]) -> ScriptContext {
    ScriptContext {
        machines: nodes.iter().map(|n| MachineInfo::new(*n)).collect(),
        vlans: vec![1, 2],
        out_dir: dir.join("out"),
        work_dir: dir.join("work"),
    }
}

fn source(text: &str, first_line: usize) -> ScriptSource {
    ScriptSource {
        text: text.to_string(),
        filename: PathBuf::from("/tests/example.toml"),
        first_line,
        first_column: 1,
    }
}

fn run_with(fake: Fake, nodes: &[&str], text: &str, first_line: usize) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let child = ScriptChild::spawn(
        &python(),
        &source(text, first_line),
        &ctx(dir.path(), nodes),
        Mode::Script,
    )
    .unwrap();
    let outcome = child.serve(&fake).unwrap();
    Run { outcome, fake }
}

fn run(nodes: &[&str], text: &str) -> Run {
    run_with(Fake::new(), nodes, text, 1)
}

#[track_caller]
fn assert_passed(r: &Run) {
    assert_eq!(
        r.outcome,
        ScriptOutcome::Passed,
        "calls: {:#?}",
        r.fake.calls()
    );
}

/// Each line of the script is one call; its recorded params must be exactly
/// the upstream arguments with the defaults filled in.
#[test]
fn argument_defaults_land_in_params_exactly() {
    let cases: &[(&str, &str, Value)] = &[
        (
            "machine.start()",
            "machine.start",
            json!({"allow_reboot": false}),
        ),
        (
            "machine.start(allow_reboot=True)",
            "machine.start",
            json!({"allow_reboot": true}),
        ),
        ("machine.shutdown()", "machine.shutdown", json!({})),
        ("machine.crash()", "machine.crash", json!({})),
        ("machine.reboot()", "machine.reboot", json!({})),
        (
            "machine.wait_for_shutdown()",
            "machine.wait_for_shutdown",
            json!({}),
        ),
        ("machine.connect()", "machine.connect", json!({})),
        (
            "machine.execute('ls')",
            "machine.execute",
            json!({"command": "ls", "check_return": true, "check_output": true, "timeout": 900}),
        ),
        (
            "machine.execute('ls', timeout=None, check_output=False)",
            "machine.execute",
            json!({"command": "ls", "check_return": true, "check_output": false, "timeout": null}),
        ),
        (
            "machine.succeed('a', 'b')",
            "machine.succeed",
            json!({"commands": ["a", "b"], "timeout": null}),
        ),
        (
            "machine.fail('a', timeout=5)",
            "machine.fail",
            json!({"commands": ["a"], "timeout": 5}),
        ),
        (
            "machine.wait_until_succeeds('a')",
            "machine.wait_until_succeeds",
            json!({"command": "a", "timeout": 900}),
        ),
        (
            "machine.wait_until_fails('a', 3)",
            "machine.wait_until_fails",
            json!({"command": "a", "timeout": 3}),
        ),
        ("machine.sleep(2)", "machine.sleep", json!({"secs": 2})),
        (
            "machine.systemctl('list-jobs')",
            "machine.systemctl",
            json!({"q": "list-jobs", "user": null}),
        ),
        (
            "machine.start_job('x', 'alice')",
            "machine.start_job",
            json!({"jobname": "x", "user": "alice"}),
        ),
        (
            "machine.stop_job('x')",
            "machine.stop_job",
            json!({"jobname": "x", "user": null}),
        ),
        (
            "machine.get_unit_info('x')",
            "machine.get_unit_info",
            json!({"unit": "x", "user": null}),
        ),
        (
            "machine.get_unit_property('x', 'ActiveState')",
            "machine.get_unit_property",
            json!({"unit": "x", "property": "ActiveState", "user": null}),
        ),
        (
            "machine.wait_for_unit('x')",
            "machine.wait_for_unit",
            json!({"unit": "x", "user": null, "timeout": 900}),
        ),
        (
            "machine.require_unit_state('x')",
            "machine.require_unit_state",
            json!({"unit": "x", "require_state": "active"}),
        ),
        (
            "machine.wait_for_file('/f')",
            "machine.wait_for_file",
            json!({"filename": "/f", "timeout": 900}),
        ),
        (
            "machine.wait_for_open_port(80)",
            "machine.wait_for_open_port",
            json!({"port": 80, "addr": "localhost", "timeout": 900}),
        ),
        (
            "machine.wait_for_closed_port(80, '::1', 4)",
            "machine.wait_for_closed_port",
            json!({"port": 80, "addr": "::1", "timeout": 4}),
        ),
        (
            "machine.wait_for_open_unix_socket('/s')",
            "machine.wait_for_open_unix_socket",
            json!({"addr": "/s", "is_datagram": false, "timeout": 900}),
        ),
        (
            "machine.wait_for_console_text('re')",
            "machine.wait_for_console_text",
            json!({"regex": "re", "timeout": null}),
        ),
        (
            "machine.get_console_log()",
            "machine.get_console_log",
            json!({}),
        ),
        (
            "machine.send_console('x')",
            "machine.send_console",
            json!({"chars": "x"}),
        ),
        (
            "machine.send_monitor_command('info')",
            "machine.send_monitor_command",
            json!({"command": "info"}),
        ),
        (
            "machine.send_key('ret')",
            "machine.send_key",
            json!({"key": "ret", "delay": 0.01, "log": true}),
        ),
        (
            "machine.send_chars('ab')",
            "machine.send_chars",
            json!({"chars": "ab", "delay": 0.01}),
        ),
        (
            "machine.screenshot('s')",
            "machine.screenshot",
            json!({"filename": "s"}),
        ),
        (
            "machine.get_screen_text()",
            "machine.get_screen_text",
            json!({}),
        ),
        (
            "machine.get_screen_text_variants()",
            "machine.get_screen_text_variants",
            json!({}),
        ),
        (
            "machine.wait_for_text('re')",
            "machine.wait_for_text",
            json!({"regex": "re", "timeout": 900}),
        ),
        (
            "machine.wait_for_x()",
            "machine.wait_for_x",
            json!({"timeout": 900}),
        ),
        (
            "machine.get_window_names()",
            "machine.get_window_names",
            json!({}),
        ),
        (
            "machine.wait_for_window('re')",
            "machine.wait_for_window",
            json!({"regexp": "re", "timeout": 900}),
        ),
        (
            "machine.get_tty_text('1')",
            "machine.get_tty_text",
            json!({"tty": "1"}),
        ),
        (
            "machine.wait_until_tty_matches('1', 're')",
            "machine.wait_until_tty_matches",
            json!({"tty": "1", "regexp": "re", "timeout": 900}),
        ),
        (
            "machine.copy_from_host('a', '/b')",
            "machine.copy_from_host",
            json!({"source": "a", "target": "/b"}),
        ),
        (
            "machine.copy_from_host_via_shell(pathlib.Path('a'), '/b')",
            "machine.copy_from_host_via_shell",
            json!({"source": "a", "target": "/b"}),
        ),
        (
            "machine.copy_from_vm('/a')",
            "machine.copy_from_machine",
            json!({"source": "/a", "target_dir": ""}),
        ),
        (
            "machine.copy_from_machine('/a', 'd')",
            "machine.copy_from_machine",
            json!({"source": "/a", "target_dir": "d"}),
        ),
        (
            "machine.forward_port()",
            "machine.forward_port",
            json!({"host_port": 8080, "guest_port": 80}),
        ),
        ("machine.block()", "machine.block", json!({})),
        ("machine.unblock()", "machine.unblock", json!({})),
        ("machine.is_up()", "machine.is_up", json!({})),
        ("machine.booted", "machine.state", json!({})),
        (
            "machine.dump_tty_contents(2)",
            "machine.execute",
            json!({
            "command": "fold -w 80 /dev/vcs2 | systemd-cat",
            "check_return": true, "check_output": true, "timeout": 900}),
        ),
    ];
    let script = std::iter::once("import pathlib".to_string())
        .chain(cases.iter().map(|(line, _, _)| line.to_string()))
        .collect::<Vec<_>>()
        .join("\n");
    let r = run(&["machine"], &script);
    assert_passed(&r);
    let work = r.fake.work();
    assert_eq!(work.len(), cases.len(), "{work:#?}");
    for ((line, method, params), (got_method, got_params)) in cases.iter().zip(&work) {
        let mut expected = json!({"machine": "machine"});
        expected
            .as_object_mut()
            .unwrap()
            .extend(params.as_object().unwrap().clone());
        assert_eq!(
            (got_method.as_str(), got_params),
            (*method, &expected),
            "{line}"
        );
    }
}

#[test]
fn results_come_back_as_upstream_types() {
    let r = run(
        &["server"],
        r#"
status, out = server.execute("true")
assert (status, out) == (0, "output\n")
assert isinstance(server.execute("x"), tuple)
assert isinstance(server.systemctl("x"), tuple)
assert server.succeed("x") == "output\n"
assert server.get_unit_info("x") == {"ActiveState": "active"}
assert server.get_window_names() == ["a", "b"]
assert server.is_up() is True
assert server.booted is True and server.connected is False
assert server.name == "server"
assert repr(server) == "<Machine 'server'>"
assert str(server.out_dir).endswith("out")
"#,
    );
    assert_passed(&r);
}

#[test]
fn error_kinds_raise_the_matching_exception() {
    let fake = Fake::with(
        |method, params| match (method, params["command"].as_str()) {
            ("machine.wait_until_succeeds", Some("assert")) => Some(Err(RpcError::assertion(
                "command `assert` failed (exit code 1)",
            ))),
            ("machine.wait_until_succeeds", Some("machine")) => {
                Some(Err(RpcError::machine("machine is not running")))
            }
            ("machine.wait_until_succeeds", Some("timeout")) => Some(Err(RpcError::timeout(
                "action timed out after 3.00 seconds (timeout=3)",
            ))),
            ("machine.wait_until_succeeds", Some("internal")) => {
                Some(Err(RpcError::internal("driver bug")))
            }
            ("no.such", _) => Some(Err(RpcError::unknown_method(method))),
            _ => None,
        },
    );
    let r = run_with(
        fake,
        &["m"],
        r#"
try:
    m.wait_until_succeeds("assert")
    raise Exception("not raised")
except RequestedAssertionFailed as e:
    assert str(e) == "command `assert` failed (exit code 1)", str(e)
    assert isinstance(e, AssertionError) and isinstance(e, TestScriptError)
try:
    m.wait_until_succeeds("machine")
except MachineError as e:
    assert str(e) == "machine is not running"
try:
    m.wait_until_succeeds("timeout")
except RequestedAssertionFailed as e:
    assert "timed out" in str(e)
try:
    m.wait_until_succeeds("internal")
except RuntimeError as e:
    assert type(e).__name__ == "VmrigInternalError" and str(e) == "driver bug"
from test_driver.errors import RequestedAssertionFailed as Upstream
assert Upstream is RequestedAssertionFailed
import vmrig_driver
try:
    vmrig_driver._rpc("no.such", {})
except RuntimeError as e:
    assert "unknown method" in str(e)
"#,
        1,
    );
    assert_passed(&r);
}

#[test]
fn failure_reports_the_line_in_the_users_file() {
    let fake = Fake::with(|method, _| {
        (method == "machine.succeed")
            .then(|| Err(RpcError::assertion("command `false` failed (exit code 1)")))
    });
    let text = "start_all()\n\ndef check():\n    server.succeed(\"false\")\n\ncheck()\n";
    let r = run_with(fake, &["server"], text, 10);
    let ScriptOutcome::Failed {
        exc_type,
        message,
        line,
        traceback,
    } = &r.outcome
    else {
        panic!("{:?}", r.outcome)
    };
    assert_eq!(exc_type, "RequestedAssertionFailed");
    assert_eq!(message, "command `false` failed (exit code 1)");
    assert_eq!(*line, Some(13), "{traceback}");
    assert!(
        traceback.starts_with("Traceback (most recent call last):\n"),
        "{traceback}"
    );
    assert!(
        traceback.contains("File \"/tests/example.toml\", line 15, in <module>\n    check()"),
        "{traceback}"
    );
    assert!(
        traceback.contains(
            "File \"/tests/example.toml\", line 13, in check\n    server.succeed(\"false\")"
        ),
        "{traceback}"
    );
    assert!(!traceback.contains("vmrig_driver"), "{traceback}");
    assert!(!traceback.contains("vmrig_test_main"), "{traceback}");
}

#[test]
fn other_exceptions_keep_library_frames_but_not_ours() {
    let r = run(&["m"], "import json\n\njson.loads('{')\n");
    let ScriptOutcome::Failed {
        exc_type,
        line,
        traceback,
        ..
    } = &r.outcome
    else {
        panic!("{:?}", r.outcome)
    };
    assert_eq!(exc_type, "JSONDecodeError");
    assert_eq!(*line, Some(3));
    assert!(traceback.contains("json"), "{traceback}");
    assert!(!traceback.contains("vmrig_driver"), "{traceback}");
}

#[test]
fn t_asserts_raise_requested_assertion_failed() {
    let r = run(&["m"], "t.assertEqual(1, 1)\nt.assertIn('a', 'xyz')\n");
    match &r.outcome {
        ScriptOutcome::Failed { exc_type, line, .. } => {
            assert_eq!(exc_type, "RequestedAssertionFailed");
            assert_eq!(*line, Some(2));
        }
        o => panic!("{o:?}"),
    }
}

#[test]
fn syntax_errors_point_at_the_users_file() {
    let err = check_syntax(&python(), &source("start_all()\nif x\n    pass\n", 7)).unwrap_err();
    let ScriptError::Syntax(diag) = &err else {
        panic!("{err}")
    };
    let SyntaxDiagnostic {
        filename,
        line,
        text,
        kind,
        ..
    } = &**diag;
    assert_eq!(filename, Path::new("/tests/example.toml"));
    assert_eq!(*line, Some(8));
    assert_eq!(text.as_deref().map(str::trim), Some("if x"));
    assert_eq!(kind, "SyntaxError");
    let shown = err.to_string();
    assert!(shown.starts_with("/tests/example.toml:8"), "{shown}");
    assert!(shown.contains("\n    if x"), "{shown}");

    check_syntax(&python(), &source("start_all()\n", 3)).unwrap();
    let err = check_syntax(&python(), &source("x = 1\n  y = 2\n", 1)).unwrap_err();
    assert!(
        matches!(&err, ScriptError::Syntax(d) if d.line == Some(2) && d.kind == "IndentationError"),
        "{err}"
    );
}

#[test]
fn missing_python_names_the_fix() {
    let err = check_syntax(Path::new("/nonexistent/python3"), &source("", 1)).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("apt-get install python3"), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let err = ScriptChild::spawn(
        Path::new("/nonexistent/python3"),
        &source("", 1),
        &ctx(dir.path(), &[]),
        Mode::Script,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("Python 3.9 or newer"), "{err}");
}

#[test]
fn too_old_python_is_refused() {
    // A fake "python3" that claims to be 3.8.
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("python3");
    std::fs::write(&fake, "#!/bin/sh\necho 3.8\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = vmrig_python::probe_python(&fake).unwrap_err();
    assert!(err.to_string().contains("is Python 3.8"), "{err}");
    assert!(err.to_string().contains("3.9 or newer"), "{err}");
}

#[test]
fn subtests_send_block_pairs_with_errors() {
    let r = run(
        &["m"],
        r#"
with subtest("first"):
    m.succeed("x")
try:
    with subtest("second"):
        raise RequestedAssertionFailed("boom")
except RequestedAssertionFailed:
    pass
with log.nested("inner", {"k": "v"}):
    log.info("hello")
"#,
    );
    assert_passed(&r);
    let blocks: Vec<_> = r
        .fake
        .calls()
        .into_iter()
        .filter(|(m, _)| m.starts_with("block.") || m == "log.message")
        .collect();
    // [0]/[last] are "run the VM test script"
    let begin = |i: usize| blocks[i].1.clone();
    assert_eq!(blocks[0].0, "block.begin");
    assert_eq!(begin(0)["message"], "run the VM test script");
    assert_eq!(
        begin(1),
        json!({"message": "first", "kind": "subtest", "attrs": {}})
    );
    let ends: Vec<_> = blocks
        .iter()
        .filter(|(m, _)| m == "block.end")
        .map(|(_, p)| p.clone())
        .collect();
    assert_eq!(ends.len(), 4);
    // ids are the begin answers (= call numbers of the fake)
    let all = r.fake.calls();
    let id_of = |message: &str| {
        1 + all
            .iter()
            .position(|(m, p)| m == "block.begin" && p["message"] == message)
            .unwrap()
    };
    assert_eq!(ends[0], json!({"id": id_of("first"), "error": null}));
    assert_eq!(
        ends[1],
        json!({"id": id_of("second"), "error": "RequestedAssertionFailed: boom"})
    );
    assert_eq!(
        all.iter()
            .find(|(m, p)| m == "block.begin" && p["message"] == "inner")
            .unwrap()
            .1,
        json!({"message": "inner", "kind": "nested", "attrs": {"k": "v"}})
    );
    assert!(all.contains(&(
        "log.message".to_string(),
        json!({"level": "info", "message": "hello", "attrs": {}})
    )));
    assert_eq!(
        ends[3],
        json!({"id": id_of("run the VM test script"), "error": null})
    );
}

#[test]
fn a_failing_subtest_reports_its_error_and_propagates() {
    let r = run(&["m"], "with subtest('s'):\n    1 / 0\n");
    assert!(
        matches!(&r.outcome, ScriptOutcome::Failed { exc_type, line: Some(2), .. } if exc_type == "ZeroDivisionError")
    );
    let ends: Vec<_> = r
        .fake
        .calls()
        .into_iter()
        .filter(|(m, _)| m == "block.end")
        .collect();
    assert_eq!(ends[0].1["error"], "ZeroDivisionError: division by zero");
    assert_eq!(ends[1].1["error"], "ZeroDivisionError: division by zero");
}

#[test]
fn retry_calls_about_once_a_second_then_tells_the_last_try() {
    let started = Instant::now();
    let r = run(
        &["m"],
        r#"
seen = []
def never(last_try):
    seen.append(last_try)
    return False
try:
    retry(never, timeout_seconds=2)
    raise Exception("retry did not raise")
except RequestedAssertionFailed as e:
    assert "action timed out after" in str(e) and "(timeout=2)" in str(e), str(e)
assert seen == [False, False, True], seen

calls = []
def second(last_try):
    calls.append(last_try)
    return len(calls) == 2
retry(second)
assert calls == [False, False], calls
"#,
    );
    assert_passed(&r);
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(3), "{took:?}");
}

#[test]
fn polling_conditions_are_checked_around_machine_calls() {
    let r = run(
        &["m"],
        r#"
state = {"ok": True, "checks": 0}

@polling_condition(seconds_interval=0)
def healthy():
    "the service stays up"
    state["checks"] += 1
    return state["ok"]

m.succeed("outside")
assert state["checks"] == 0
with healthy:
    m.succeed("inside")
    assert state["checks"] == 2, state
    state["ok"] = False
    try:
        m.succeed("doomed")
        raise Exception("not raised")
    except PollingConditionError as e:
        assert str(e) == "Polling condition failed: the service stays up", str(e)
state["ok"] = True
m.succeed("after")

@polling_condition
def plain():
    return None  # None counts as success
with plain:
    m.succeed("x")
assert plain.condition.description == "plain"
plain.wait(timeout=5)
"#,
    );
    assert_passed(&r);
    let commands: Vec<_> = r
        .fake
        .work()
        .into_iter()
        .map(|(_, p)| p["commands"][0].as_str().unwrap().to_string())
        .collect();
    // "doomed" is never sent: the check before the call fails.
    assert_eq!(commands, ["outside", "inside", "after", "x"]);
}

#[test]
fn machine_alias_only_with_one_node() {
    let r = run(
        &["server"],
        "assert machine is server\nassert machines == [server]\n",
    );
    assert_passed(&r);
    let r = run(
        &["client", "server"],
        "try:\n    machine\n    raise Exception('machine exists')\nexcept NameError:\n    pass\nassert [m.name for m in machines] == ['client', 'server']\n",
    );
    assert_passed(&r);
}

#[test]
fn node_names_become_python_identifiers() {
    let r = run(&["my-node", "other"], "my_node.succeed('x')\n");
    assert_passed(&r);
    assert_eq!(r.fake.work()[0].1["machine"], "my-node");
}

#[test]
fn globals_vlans_partition_and_friends() {
    let r = run(
        &["a", "b"],
        r#"
assert [v.nr for v in vlans] == [1, 2] and vlan2 is vlans[1]
assert driver.machines == machines and driver.vlans == vlans
vlan1.set_loss(10)
vlan2.set_delay(50)
partition([a], "b")
heal()
start_all()
join_all()
serial_stdout_off()
serial_stdout_on()
try:
    create_machine("")
except MachineError as e:
    assert "needs a start command" in str(e)
a.log("from a")
"#,
    );
    assert_passed(&r);
    let expected = vec![
        ("vlan.set_loss", json!({"vlan": 1, "percent": 10})),
        ("vlan.set_delay", json!({"vlan": 2, "ms": 50})),
        ("net.partition", json!({"group_a": ["a"], "group_b": ["b"]})),
        ("net.heal", json!({})),
        ("driver.start_all", json!({})),
        ("driver.join_all", json!({})),
        ("serial_stdout", json!({"on": false})),
        ("serial_stdout", json!({"on": true})),
    ];
    let got: Vec<_> = r.fake.work();
    let got: Vec<_> = got.iter().map(|(m, p)| (m.as_str(), p.clone())).collect();
    assert_eq!(got, expected);
    assert!(r.fake.calls().contains(&(
        "log.message".to_string(),
        json!({"level": "info", "message": "from a", "attrs": {"machine": "a"}})
    )));
}

#[test]
fn wait_for_qmp_event_filters_in_python() {
    let counter = Mutex::new(0);
    let fake = Fake::with(move |method, params| {
        (method == "machine.next_qmp_event").then(|| {
            let mut n = counter.lock().unwrap();
            *n += 1;
            assert!(params["timeout"].as_f64().unwrap() <= 600.0);
            Ok(json!({"event": format!("E{n}")}))
        })
    });
    let r = run_with(
        fake,
        &["m"],
        "evt = m.wait_for_qmp_event(lambda e: e['event'] == 'E3')\nassert evt == {'event': 'E3'}\n",
        1,
    );
    assert_passed(&r);
    assert_eq!(r.fake.work().len(), 3);

    let fake = Fake::with(|method, _| {
        (method == "machine.next_qmp_event").then(|| Err(RpcError::timeout("no event")))
    });
    let r = run_with(
        fake,
        &["m"],
        "try:\n    m.wait_for_qmp_event(lambda e: True, timeout=1)\nexcept TimeoutError:\n    pass\n",
        1,
    );
    assert_passed(&r);
}

#[test]
fn sys_exit_zero_passes_and_a_silent_exit_is_reported() {
    assert_passed(&run(&["m"], "import sys\nsys.exit(0)\n"));
    let r = run(&["m"], "import os\nos._exit(5)\n");
    assert_eq!(r.outcome, ScriptOutcome::ExitedWithoutReport(5));
    let r = run(&["m"], "import sys\nsys.exit(2)\n");
    assert!(
        matches!(&r.outcome, ScriptOutcome::Failed { exc_type, message, .. } if exc_type == "SystemExit" && message == "2")
    );
}

#[test]
fn a_killed_child_gives_killed() {
    let dir = tempfile::tempdir().unwrap();
    let child = ScriptChild::spawn(
        &python(),
        &source("import time\nm.succeed('x')\ntime.sleep(60)\n", 1),
        &ctx(dir.path(), &["m"]),
        Mode::Script,
    )
    .unwrap();
    let killer = child.killer();
    let fake = Fake::with(move |method, _| {
        if method == "machine.succeed" {
            let k = killer.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                k.kill();
            });
        }
        None
    });
    let started = Instant::now();
    let outcome = child.serve(&fake).unwrap();
    assert_eq!(outcome, ScriptOutcome::Killed);
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn killing_after_exit_is_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let child = ScriptChild::spawn(
        &python(),
        &source("pass\n", 1),
        &ctx(dir.path(), &["m"]),
        Mode::Script,
    )
    .unwrap();
    let killer = child.killer();
    assert_eq!(child.serve(&Fake::new()).unwrap(), ScriptOutcome::Passed);
    killer.kill(); // reaped: must not signal anything
}

#[test]
fn dropping_an_unserved_child_kills_it() {
    let dir = tempfile::tempdir().unwrap();
    let child = ScriptChild::spawn(
        &python(),
        &source("import time\ntime.sleep(60)\n", 1),
        &ctx(dir.path(), &["m"]),
        Mode::Script,
    )
    .unwrap();
    let pid = child.pid();
    drop(child);
    // Killed and reaped: the pid is gone (a reuse this fast would not be
    // running our main file).
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(!cmdline.contains("vmrig_test_main"), "{cmdline}");
}

/// PR_SET_PDEATHSIG fires when the spawning *thread* exits: the child of a
/// short-lived thread dies with it. (Callers spawn from a long-lived thread.)
#[test]
fn the_child_dies_with_the_thread_that_spawned_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let child = std::thread::spawn(move || {
        ScriptChild::spawn(
            &python(),
            &source("import time\ntime.sleep(60)\n", 1),
            &ctx(&path, &["m"]),
            Mode::Script,
        )
        .unwrap()
    })
    .join()
    .unwrap();
    let started = Instant::now();
    assert_eq!(child.serve(&Fake::new()).unwrap(), ScriptOutcome::Killed);
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn values_the_driver_cannot_read_fail_at_the_call() {
    let r = run(
        &["m"],
        r#"
import math
for bad in (math.inf, "\udcff", object()):
    try:
        m.execute("x", timeout=bad)
        raise Exception("sent %r" % (bad,))
    except (ValueError, TypeError, UnicodeEncodeError):
        pass
m.succeed("still connected")
"#,
    );
    assert_passed(&r);
    assert_eq!(r.fake.work().len(), 1);
}

#[test]
fn threads_in_the_script_are_serialised() {
    let r = run(
        &["m"],
        r#"
import threading
ts = [threading.Thread(target=m.succeed, args=("t%d" % i,)) for i in range(8)]
for th in ts: th.start()
for th in ts: th.join()
"#,
    );
    assert_passed(&r);
    assert_eq!(r.fake.work().len(), 8);
}

#[test]
fn the_script_sees_its_own_file_and_no_driver_fd_leaks() {
    let r = run(
        &["m"],
        r#"
assert __file__ == "/tests/example.toml"
import os, subprocess
fd = int(os.environ["VMRIG_RPC_FD"])
assert not os.get_inheritable(fd)
"#,
    );
    assert_passed(&r);
}

/// Every method named in DESIGN.md's API list exists on Machine, with the
/// upstream parameter names and defaults.
/// Upstream's own driver tests replace `time.sleep` (`no_sleep()`) around a
/// `retry` that fails: upstream counts tries, so that returns at once; a
/// time-based loop would spin for the whole 900 s.
#[test]
fn retry_counts_tries_when_time_sleep_is_patched() {
    let started = Instant::now();
    let r = run(
        &["m"],
        r#"
import time
import datetime
from test_driver.errors import RequestedAssertionFailed as Upstream
assert Upstream is RequestedAssertionFailed
old_sleep = time.sleep
time.sleep = lambda x: None
try:
    seen = []
    def never(last_try):
        seen.append(last_try)
        return False
    try:
        retry(never)
        raise Exception("retry did not raise")
    except RequestedAssertionFailed as e:
        assert str(e).startswith("action timed out after "), str(e)
        assert "(timeout=900)" in str(e), str(e)
    assert seen == [False] * 900 + [True], len(seen)
    # Saved in the last go.
    retry(lambda last: last)
finally:
    time.sleep = old_sleep
"#,
    );
    assert_passed(&r);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(30), "{took:?}");
}

/// The newest upstream `retry(fn, timeout=...)` (nixos-test-driver/retry.nix): fn gets the
/// time left (None without a bound), is never called without time left, and gets no
/// extra last try.
#[test]
fn retry_with_a_timeout_keyword_passes_the_time_left() {
    let r = run(
        &["m"],
        r#"
import datetime as dt
import time
args = []
retry(lambda left: args.append(left) or True, timeout=None)
assert args == [None], args
args.clear()
def slow_failure(left):
    args.append(left)
    time.sleep(0.05)
    return False
try:
    retry(slow_failure, timeout=dt.timedelta(seconds=0.01))
    raise Exception("retry did not raise")
except RequestedAssertionFailed as e:
    assert str(e).startswith("action timed out after "), str(e)
assert len(args) == 1 and 0 < args[0] <= 0.01, args
late = []
retry(lambda left: late.append(left) or time.sleep(0.02) or True, timeout=dt.timedelta(seconds=0.01))
assert len(late) == 1, late
never = []
try:
    retry(lambda left: never.append(left) or True, timeout=dt.timedelta(0))
    raise Exception("retry did not raise")
except RequestedAssertionFailed:
    pass
assert never == [], never
left = []
def third(t):
    left.append(t)
    return len(left) == 3
retry(third, timeout=30)
assert len(left) == 3 and 28 < left[0] <= 30 and left[2] < left[1] < left[0], left
"#,
    );
    assert_passed(&r);
}

/// Upstream formats the tty into a command, so a number works as well as a
/// string; timedelta timeouts arrive as seconds.
#[test]
fn tty_numbers_timedeltas_and_new_methods_reach_the_driver() {
    let r = run(
        &["m"],
        r#"
import datetime
machine.wait_until_tty_matches(1, "root@")
machine.get_tty_text(2)
machine.wait_for_unit_active_state("x.service", "activating", timeout=10)
machine.wait_until_succeeds("true", timeout=datetime.timedelta(seconds=2.5))
machine.switch_root()
machine.wait_until_fails("x", timeout=20, attempt_timeout=datetime.timedelta(seconds=2))
from test_driver.logger import rootlog
assert rootlog.sanitise("a\x07b") == "ab"
assert machine.execute("poweroff", check_output=False) == (0, "output\n")
"#,
    );
    assert_passed(&r);
    let work = r.fake.work();
    let calls: Vec<(&str, &Value)> = work.iter().map(|(m, p)| (m.as_str(), p)).collect();
    assert_eq!(
        calls[0],
        (
            "machine.wait_until_tty_matches",
            &json!({"machine": "m", "tty": "1", "regexp": "root@", "timeout": 900})
        )
    );
    assert_eq!(
        calls[1],
        ("machine.get_tty_text", &json!({"machine": "m", "tty": "2"}))
    );
    assert_eq!(
        calls[2],
        (
            "machine.wait_for_unit_active_state",
            &json!({"machine": "m", "unit": "x.service", "state": "activating", "user": null, "timeout": 10})
        )
    );
    assert_eq!(
        calls[3],
        (
            "machine.wait_until_succeeds",
            &json!({"machine": "m", "command": "true", "timeout": 2.5})
        )
    );
    assert_eq!(calls[4], ("machine.switch_root", &json!({"machine": "m"})));
    assert_eq!(
        calls[5],
        (
            "machine.wait_until_fails",
            &json!({"machine": "m", "command": "x", "timeout": 20, "attempt_timeout": 2.0})
        )
    );
    assert_eq!(calls[6].0, "machine.execute");
    assert_eq!(calls[6].1["check_output"], json!(false));
}

#[test]
fn machine_api_matches_upstream_signatures() {
    let golden = r#"start(allow_reboot=False)
shutdown()
crash()
reboot()
wait_for_shutdown()
switch_root()
execute(command, check_return=True, check_output=True, timeout=900)
succeed(*commands, timeout=None)
fail(*commands, timeout=None)
wait_until_succeeds(command, timeout=900, attempt_timeout=None)
wait_until_fails(command, timeout=900, attempt_timeout=None)
sleep(secs)
systemctl(q, user=None)
start_job(jobname, user=None)
stop_job(jobname, user=None)
get_unit_info(unit, user=None)
get_unit_property(unit, property, user=None)
wait_for_unit(unit, user=None, timeout=900)
wait_for_unit_active_state(unit, state, user=None, timeout=900)
require_unit_state(unit, require_state='active')
wait_for_file(filename, timeout=900)
wait_for_open_port(port, addr='localhost', timeout=900)
wait_for_closed_port(port, addr='localhost', timeout=900)
wait_for_open_unix_socket(addr, is_datagram=False, timeout=900)
wait_for_console_text(regex, timeout=None)
get_console_log()
send_console(chars)
send_monitor_command(command)
send_key(key, delay=0.01, log=True)
send_chars(chars, delay=0.01)
screenshot(filename)
get_screen_text()
get_screen_text_variants()
wait_for_text(regex, timeout=900)
wait_for_x(timeout=900)
get_window_names()
wait_for_window(regexp, timeout=900)
get_tty_text(tty)
wait_until_tty_matches(tty, regexp, timeout=900)
copy_from_host(source, target)
copy_from_host_via_shell(source, target)
copy_from_vm(source, target_dir='')
copy_from_machine(source, target_dir='')
forward_port(host_port=8080, guest_port=80)
block()
unblock()
shell_interact(address=None)
console_interact()
wait_for_qmp_event(event_filter, timeout=600)"#;
    let script = format!(
        "import inspect\ngolden = {golden:?}.splitlines()\nfor line in golden:\n    name = line.split('(')[0]\n    fn = getattr(Machine, name)\n    sig = inspect.signature(fn)\n    sig = sig.replace(parameters=[p.replace(annotation=p.empty) for p in sig.parameters.values()], return_annotation=sig.empty)\n    sig = str(sig).replace('(self, ', '(').replace('(self)', '()')\n    t.assertEqual(name + sig, line)\n"
    );
    let r = run(&["m"], &script);
    assert_passed(&r);
}

/// Guards the "CPython 3.9" promise even when the suite runs on a newer one.
#[test]
fn module_parses_as_python_3_9() {
    let check = "import ast, sys\nsrc = sys.stdin.read()\nast.parse(src, feature_version=(3, 9))\nprint('ok')\n";
    let mut child = std::process::Command::new(python())
        .args(["-c", check])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(vmrig_python::PYTHON_MODULE.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

#[test]
fn driver_symbols_name_the_script_globals() {
    let symbols = vmrig_python::driver_symbols(std::path::Path::new("python3")).unwrap();
    for name in [
        "start_all",
        "join_all",
        "subtest",
        "polling_condition",
        "create_machine",
        "t",
        "driver",
        "Machine",
    ] {
        assert!(
            symbols.iter().any(|s| s == name),
            "{name} missing from {symbols:?}"
        );
    }
}
