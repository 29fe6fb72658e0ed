//! The script's calls, typed: every JSON-RPC request from `vmrig_driver.py` is deserialized
//! once into a [`Request`] (method name and parameter names checked there, unknown ones
//! refused), and `rpc.rs` dispatches on the enum. This is the one place the Python-Rust
//! contract is written on the Rust side; the test at the end reads `vmrig_driver.py` and
//! fails when the two disagree on a method or a parameter name.

use serde::Deserialize;
use serde_json::Value;
use vmrig_python::RpcError;

/// A call of the test script.
#[derive(Debug, PartialEq)]
pub enum Request {
    Driver(DriverRequest),
    /// `machine.<method>` with `machine` = the machine's name.
    Machine {
        machine: String,
        call: MachineRequest,
    },
}

/// Calls on the driver, the log and the networks.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(tag = "method", deny_unknown_fields)]
pub enum DriverRequest {
    #[serde(rename = "driver.start_all")]
    StartAll {},
    #[serde(rename = "driver.join_all")]
    JoinAll {},
    /// The script failed and pauses for the user (`--pause-on-failure`): the global
    /// timeout is lifted.
    #[serde(rename = "driver.pause")]
    Pause {},
    #[serde(rename = "driver.create_machine")]
    CreateMachine {
        start_command: String,
        name: Option<String>,
        #[serde(default)]
        keep_vm_state: bool,
    },
    #[serde(rename = "block.begin")]
    BlockBegin {
        message: String,
        kind: Option<String>,
        #[serde(default)]
        attrs: Attrs,
    },
    #[serde(rename = "block.end")]
    BlockEnd { id: u64, error: Option<String> },
    #[serde(rename = "log.message")]
    LogMessage {
        level: Option<String>,
        message: String,
        #[serde(default)]
        attrs: Attrs,
    },
    #[serde(rename = "serial_stdout")]
    SerialStdout { on: Option<bool> },
    #[serde(rename = "vlan.set_loss")]
    SetLoss { vlan: u64, percent: Option<f64> },
    #[serde(rename = "vlan.set_delay")]
    SetDelay { vlan: u64, ms: Option<f64> },
    #[serde(rename = "net.partition")]
    Partition {
        group_a: Vec<String>,
        group_b: Vec<String>,
    },
    #[serde(rename = "net.heal")]
    Heal {},
}

/// A log line's or block's attributes; only `machine` is used.
#[derive(Debug, Default, PartialEq, Deserialize)]
pub struct Attrs {
    pub machine: Option<String>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

/// A tty given as upstream allows: `1` or `"1"`.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(untagged, expecting = "`tty` must be a string or a number")]
pub enum Tty {
    Number(u64),
    Name(String),
}

impl std::fmt::Display for Tty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tty::Number(n) => write!(f, "{n}"),
            Tty::Name(s) => f.write_str(s),
        }
    }
}

/// Calls on one machine (`machine.<method>`), with upstream's parameter names. A timeout of
/// `None` means the method's default.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum MachineRequest {
    Start {
        #[serde(default)]
        allow_reboot: bool,
    },
    Connect {},
    Shutdown {},
    Crash {},
    WaitForShutdown {},
    Reboot {},
    SwitchRoot {},
    IsUp {},
    State {},
    Execute {
        command: String,
        timeout: Option<f64>,
        check_return: Option<bool>,
        check_output: Option<bool>,
    },
    Succeed {
        commands: Vec<String>,
        timeout: Option<f64>,
    },
    Fail {
        commands: Vec<String>,
        timeout: Option<f64>,
    },
    WaitUntilSucceeds {
        command: String,
        timeout: Option<f64>,
        attempt_timeout: Option<f64>,
    },
    WaitUntilFails {
        command: String,
        timeout: Option<f64>,
        attempt_timeout: Option<f64>,
    },
    Sleep {
        secs: Option<f64>,
    },
    Systemctl {
        q: String,
        user: Option<String>,
    },
    StartJob {
        jobname: String,
        user: Option<String>,
    },
    StopJob {
        jobname: String,
        user: Option<String>,
    },
    GetUnitInfo {
        unit: String,
        user: Option<String>,
    },
    GetUnitProperty {
        unit: String,
        property: String,
        user: Option<String>,
    },
    WaitForUnit {
        unit: String,
        user: Option<String>,
        timeout: Option<f64>,
    },
    WaitForUnitActiveState {
        unit: String,
        state: String,
        user: Option<String>,
        timeout: Option<f64>,
    },
    RequireUnitState {
        unit: String,
        require_state: Option<String>,
    },
    WaitForFile {
        filename: String,
        timeout: Option<f64>,
    },
    WaitForOpenPort {
        port: u16,
        addr: Option<String>,
        timeout: Option<f64>,
    },
    WaitForClosedPort {
        port: u16,
        addr: Option<String>,
        timeout: Option<f64>,
    },
    WaitForOpenUnixSocket {
        addr: String,
        is_datagram: Option<bool>,
        timeout: Option<f64>,
    },
    WaitForConsoleText {
        regex: String,
        timeout: Option<f64>,
    },
    GetConsoleLog {},
    SendConsole {
        chars: String,
    },
    SendMonitorCommand {
        command: String,
    },
    NextQmpEvent {
        timeout: Option<f64>,
    },
    GetTtyText {
        tty: Tty,
    },
    WaitUntilTtyMatches {
        tty: Tty,
        regexp: String,
        timeout: Option<f64>,
    },
    Screenshot {
        filename: String,
    },
    ForwardPort {
        host_port: u16,
        guest_port: u16,
    },
    Block {},
    Unblock {},
    CopyFromHost {
        source: String,
        target: String,
    },
    CopyFromHostViaShell {
        source: String,
        target: String,
    },
    CopyFromMachine {
        source: String,
        target_dir: Option<String>,
    },
    SendKey {
        key: String,
        delay: Option<f64>,
        log: Option<bool>,
    },
    SendChars {
        chars: String,
        delay: Option<f64>,
    },
    GetScreenText {},
    GetScreenTextVariants {},
    WaitForText {
        regex: String,
        timeout: Option<f64>,
    },
    WaitForX {
        timeout: Option<f64>,
    },
    GetWindowNames {},
    WaitForWindow {
        regexp: String,
        timeout: Option<f64>,
    },
    WaitForImage {
        path: String,
        threshold: Option<f64>,
        timeout: Option<f64>,
    },
    ScreenMatches {
        path: String,
        threshold: Option<f64>,
    },
}

impl Request {
    /// Parses a call: `method` and its `params` object as the script sent them. A method
    /// vmrig does not know, a parameter it does not know or one of the wrong type is the
    /// script's mistake (an assertion error naming the method); a machine call without
    /// its machine is the embedded module's (an internal error).
    pub fn parse(method: &str, params: &Value) -> Result<Request, RpcError> {
        let mut object = match params {
            Value::Object(map) => map.clone(),
            Value::Null => serde_json::Map::new(),
            other => {
                return Err(RpcError::internal(format!(
                    "`{method}`: the parameters are not an object but {other}"
                )))
            }
        };
        let wrong = |e: serde_json::Error| RpcError::assertion(format!("`{method}`: {e}"));
        if let Some(call) = method.strip_prefix("machine.") {
            let Some(Value::String(machine)) = object.remove("machine") else {
                return Err(RpcError::internal(format!(
                    "`{method}` without the name of its machine"
                )));
            };
            object.insert("method".into(), Value::String(call.to_owned()));
            let call = serde_json::from_value(Value::Object(object)).map_err(|e| {
                if e.to_string().starts_with("unknown variant") {
                    RpcError::machine(format!(
                        "`{call}` is not implemented by vmrig yet (see the README's API table)"
                    ))
                } else {
                    wrong(e)
                }
            })?;
            return Ok(Request::Machine { machine, call });
        }
        object.insert("method".into(), Value::String(method.to_owned()));
        serde_json::from_value(Value::Object(object))
            .map(Request::Driver)
            .map_err(|e| {
                if e.to_string().starts_with("unknown variant") {
                    RpcError::unknown_method(method)
                } else {
                    wrong(e)
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::{BTreeMap, BTreeSet};

    #[test]
    fn calls_parse_with_upstream_names_and_defaults_left_to_the_method() {
        let r = Request::parse(
            "machine.execute",
            &json!({"machine": "server", "command": "true", "timeout": null, "check_return": true, "check_output": true}),
        )
        .unwrap();
        assert_eq!(
            r,
            Request::Machine {
                machine: "server".into(),
                call: MachineRequest::Execute {
                    command: "true".into(),
                    timeout: None,
                    check_return: Some(true),
                    check_output: Some(true),
                }
            }
        );
        let r = Request::parse(
            "machine.wait_until_tty_matches",
            &json!({"machine": "m", "tty": 1, "regexp": "root@", "timeout": 5}),
        )
        .unwrap();
        let Request::Machine {
            call: MachineRequest::WaitUntilTtyMatches { tty, .. },
            ..
        } = r
        else {
            panic!("{r:?}")
        };
        assert_eq!(tty.to_string(), "1");
        let r = Request::parse(
            "block.begin",
            &json!({"message": "m", "kind": "subtest", "attrs": {"machine": "a", "x": 1}}),
        )
        .unwrap();
        let Request::Driver(DriverRequest::BlockBegin { attrs, .. }) = r else {
            panic!("{r:?}")
        };
        assert_eq!(attrs.machine.as_deref(), Some("a"));
    }

    #[test]
    fn mistakes_are_named() {
        let err = |method: &str, params: Value| Request::parse(method, &params).unwrap_err();
        let e = err(
            "machine.wait_for_open_port",
            json!({"machine": "m", "port": 70000}),
        );
        assert_eq!(
            e.kind,
            vmrig_python::RpcErrorKind::RequestedAssertionFailed,
            "{e:?}"
        );
        assert!(
            e.message.contains("wait_for_open_port") && e.message.contains("70000"),
            "{e:?}"
        );
        let e = err(
            "machine.execute",
            json!({"machine": "m", "command": "x", "timout": 1}),
        );
        assert!(e.message.contains("unknown field `timout`"), "{e:?}");
        let e = err("machine.fly", json!({"machine": "m"}));
        assert!(
            e.message.contains("`fly` is not implemented by vmrig"),
            "{e:?}"
        );
        let e = err("machine.execute", json!({"command": "x"}));
        assert_eq!(e.kind, vmrig_python::RpcErrorKind::Internal, "{e:?}");
        let e = err("driver.fly", json!({}));
        assert!(e.message.contains("unknown method \"driver.fly\""), "{e:?}");
    }

    /// What `vmrig_driver.py` calls: method -> keyword names, from `self._call("m", k=...)`
    /// (machine methods) and `_rpc("m", {"k": ...})` (the rest).
    fn python_calls() -> BTreeMap<String, BTreeSet<String>> {
        let src = vmrig_python::PYTHON_MODULE;
        let mut calls: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let args_of = |from: usize| -> &str {
            let mut depth = 0;
            for (i, c) in src[from..].char_indices() {
                match c {
                    '(' | '{' | '[' => depth += 1,
                    ')' | '}' | ']' if depth == 1 => return &src[from..from + i],
                    ')' | '}' | ']' => depth -= 1,
                    _ => {}
                }
            }
            panic!("unbalanced call at {from}")
        };
        let machine_call = regex::Regex::new(r#"self\._call\(\s*"(\w+)""#).unwrap();
        let keyword = regex::Regex::new(r"(?:^|[(,\s])(\w+)\s*=[^=]").unwrap();
        for m in machine_call.captures_iter(src) {
            let start = m.get(0).unwrap().start() + "self._call".len();
            let args = &args_of(start)[m.get(0).unwrap().len() - "self._call".len()..];
            let names = keyword.captures_iter(args).map(|k| k[1].to_owned());
            calls
                .entry(format!("machine.{}", &m[1]))
                .or_default()
                .extend(names);
        }
        let rpc_call = regex::Regex::new(r#"_rpc\(\s*"([\w.]+)"(\s*,\s*\{)?"#).unwrap();
        let key = regex::Regex::new(r#""(\w+)"\s*:"#).unwrap();
        for m in rpc_call.captures_iter(src) {
            let name = m[1].to_owned();
            if name.ends_with('.') {
                continue; // `_call` itself: "machine." + method
            }
            let entry = calls.entry(name).or_default();
            if m.get(2).is_some() {
                let open = m.get(0).unwrap().end() - 1;
                let object = args_of(open);
                entry.extend(key.captures_iter(object).map(|k| k[1].to_owned()));
            }
        }
        calls
    }

    /// Every method and parameter the embedded module sends is one the enum knows: each
    /// parameter, sent as null, either parses or is refused for its type, never as unknown.
    #[test]
    fn the_python_module_and_the_request_types_agree() {
        let calls = python_calls();
        assert!(
            calls.len() > 60,
            "found only {} calls: {calls:?}",
            calls.len()
        );
        for (method, names) in &calls {
            let mut params = serde_json::Map::new();
            if method.starts_with("machine.") {
                params.insert("machine".into(), json!("m"));
            }
            for name in names.iter().filter(|n| *n != "machine") {
                params.insert(name.clone(), Value::Null);
            }
            match Request::parse(method, &Value::Object(params)) {
                Ok(_) => {}
                Err(e) => assert!(
                    e.message.contains("invalid type: null")
                        || e.message.contains("missing field")
                        || e.message.contains("must be a string or a number"),
                    "{method}{names:?}: {}",
                    e.message
                ),
            }
        }
        // The other way: every machine method the enum knows is called by the module.
        for variant in serde_variants::<MachineRequest>() {
            assert!(
                calls.contains_key(&format!("machine.{variant}")),
                "`machine.{variant}` is handled but vmrig_driver.py never calls it"
            );
        }
    }

    /// The variant names of an internally tagged enum, from serde's own "unknown variant"
    /// message (which lists them all).
    fn serde_variants<T: serde::de::DeserializeOwned + std::fmt::Debug>() -> Vec<String> {
        let e = serde_json::from_value::<T>(json!({"method": "\u{1}"})).unwrap_err();
        let text = e.to_string();
        let list = text
            .split("expected one of ")
            .nth(1)
            .expect("a list of variants");
        regex::Regex::new(r"`(\w+)`")
            .unwrap()
            .captures_iter(list)
            .map(|c| c[1].to_owned())
            .collect()
    }
}
