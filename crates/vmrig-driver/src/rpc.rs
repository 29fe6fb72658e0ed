//! The Rust side of the script's JSON-RPC calls: one method per API call.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::{json, Value};
use vmrig_python::{Handler, RpcError};

use crate::api::{DEFAULT_WAIT, MONITOR_PROMPT};
use crate::events::{BlockKind, Level};
use crate::logger::Logger;
use crate::machine::Machine;
use crate::ApiError;

/// Serves a test script: the machines, the VLAN switches, the log.
pub struct DriverHandler {
    /// Grows when the script calls `create_machine`.
    pub machines: RwLock<BTreeMap<String, Arc<Mutex<Machine>>>>,
    pub vlans: BTreeMap<u8, Arc<vmrig_net::Vlan>>,
    pub logger: Logger,
    pub serial_stdout: Arc<AtomicBool>,
    /// Makes machines from start commands (`create_machine`).
    pub creator: crate::nixos::MachineCreator,
}

/// Typed access to a request's params.
pub(crate) struct Params<'a>(pub(crate) &'a Value);

impl<'a> Params<'a> {
    fn str(&self, key: &str) -> Result<&'a str, RpcError> {
        self.0
            .get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| RpcError::internal(format!("missing string parameter `{key}`")))
    }
    /// A string, or a number given for it (`wait_until_tty_matches(1, ...)`: upstream
    /// formats the tty into a command, so both work there).
    fn str_or_number(&self, key: &str) -> Result<String, RpcError> {
        match self.0.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            _ => Err(RpcError::assertion(format!(
                "`{key}` must be a string or a number"
            ))),
        }
    }
    fn opt_str(&self, key: &str) -> Option<&'a str> {
        self.0.get(key).and_then(Value::as_str)
    }
    fn opt_f64(&self, key: &str) -> Option<f64> {
        self.0.get(key).and_then(Value::as_f64)
    }
    fn f64_or(&self, key: &str, default: f64) -> f64 {
        self.opt_f64(key).unwrap_or(default)
    }
    fn bool_or(&self, key: &str, default: bool) -> bool {
        self.0.get(key).and_then(Value::as_bool).unwrap_or(default)
    }
    fn u16(&self, key: &str) -> Result<u16, RpcError> {
        self.0
            .get(key)
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| RpcError::assertion(format!("`{key}` must be a port number (0-65535)")))
    }
    fn strings(&self, key: &str) -> Vec<String> {
        self.0
            .get(key)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl From<ApiError> for RpcError {
    fn from(e: ApiError) -> RpcError {
        match e {
            ApiError::Assertion(m) => RpcError::assertion(m),
            ApiError::Machine(m) => RpcError::machine(m),
            ApiError::Timeout(m) => RpcError::timeout(m),
        }
    }
}

impl Handler for DriverHandler {
    fn call(&self, method: &str, params: &Value) -> Result<Value, RpcError> {
        let p = Params(params);
        if let Some(m) = method.strip_prefix("machine.") {
            return self.machine_call(m, &p);
        }
        match method {
            "driver.start_all" => {
                let id = self.logger.begin(BlockKind::Nested, "start all VMs", None);
                let mut result = Ok(Value::Null);
                for machine in self.all_machines() {
                    if let Err(e) = machine.lock().unwrap().start(false) {
                        result = Err(e.into());
                        break;
                    }
                }
                self.logger.end(
                    id,
                    result.as_ref().err().map(|e: &RpcError| e.message.clone()),
                );
                result
            }
            "driver.join_all" => {
                let id = self
                    .logger
                    .begin(BlockKind::Nested, "wait for all VMs to finish", None);
                for machine in self.all_machines() {
                    machine.lock().unwrap().wait_for_shutdown()?;
                }
                self.logger.end(id, None);
                Ok(Value::Null)
            }
            "block.begin" => {
                let kind = if p.opt_str("kind") == Some("subtest") {
                    BlockKind::Subtest
                } else {
                    BlockKind::Nested
                };
                let machine = params
                    .get("attrs")
                    .and_then(|a| a.get("machine"))
                    .and_then(Value::as_str);
                Ok(json!({ "id": self.logger.begin(kind, p.str("message")?, machine) }))
            }
            "block.end" => {
                let id = params.get("id").and_then(Value::as_u64).unwrap_or(0);
                self.logger.end(id, p.opt_str("error").map(str::to_owned));
                Ok(Value::Null)
            }
            "log.message" => {
                let level = match p.opt_str("level") {
                    Some("warning") => Level::Warning,
                    Some("error") => Level::Error,
                    Some("debug") => Level::Debug,
                    _ => Level::Info,
                };
                let machine = params
                    .get("attrs")
                    .and_then(|a| a.get("machine"))
                    .and_then(Value::as_str);
                self.logger.log(level, p.str("message")?, machine);
                Ok(Value::Null)
            }
            "serial_stdout" => {
                self.serial_stdout
                    .store(p.bool_or("on", true), Ordering::Relaxed);
                Ok(Value::Null)
            }
            "vlan.set_loss" => {
                let vlan = self.vlan(params)?;
                vlan.set_loss(p.f64_or("percent", 0.0)).map_err(net_error)?;
                Ok(Value::Null)
            }
            "vlan.set_delay" => {
                let vlan = self.vlan(params)?;
                vlan.set_delay(Duration::from_secs_f64(
                    p.f64_or("ms", 0.0).max(0.0) / 1000.0,
                ))
                .map_err(net_error)?;
                Ok(Value::Null)
            }
            "net.partition" => {
                let (a, b) = (p.strings("group_a"), p.strings("group_b"));
                for name in a.iter().chain(&b) {
                    if !self.machines.read().unwrap().contains_key(name) {
                        return Err(RpcError::assertion(format!(
                            "partition: no machine named `{name}`"
                        )));
                    }
                }
                self.logger.info(format!("partitioning {a:?} from {b:?}"));
                for vlan in self.vlans.values() {
                    vlan.partition(&a, &b).map_err(net_error)?;
                }
                Ok(Value::Null)
            }
            "driver.create_machine" => self.create_machine(&p),
            "net.heal" => {
                self.logger.info("healing all partitions");
                for vlan in self.vlans.values() {
                    vlan.heal().map_err(net_error)?;
                }
                Ok(Value::Null)
            }
            other => Err(RpcError::unknown_method(other)),
        }
    }
}

fn net_error(e: vmrig_net::NetError) -> RpcError {
    RpcError::machine(format!("switch: {e}"))
}

impl DriverHandler {
    /// Every machine, in name order (a snapshot: the lock is not held while they work).
    fn all_machines(&self) -> Vec<Arc<Mutex<Machine>>> {
        self.machines.read().unwrap().values().cloned().collect()
    }

    /// `create_machine(start_command, name=, keep_vm_state=)`.
    fn create_machine(&self, p: &Params) -> Result<Value, RpcError> {
        let command = p.str("start_command")?;
        let machine = self.creator.create(
            p.opt_str("name"),
            command,
            p.bool_or("keep_vm_state", false),
        )?;
        let name = machine.name.clone();
        let mut machines = self.machines.write().unwrap();
        if machines.contains_key(&name) {
            return Err(RpcError::machine(format!(
                "create_machine: a machine named `{name}` exists already; pass another name="
            )));
        }
        self.logger
            .info(format!("created machine `{name}` from `{command}`"));
        machines.insert(name.clone(), Arc::new(Mutex::new(machine)));
        Ok(json!({ "name": name }))
    }

    fn vlan(&self, params: &Value) -> Result<&vmrig_net::Vlan, RpcError> {
        let nr = params.get("vlan").and_then(Value::as_u64).unwrap_or(0);
        u8::try_from(nr)
            .ok()
            .and_then(|n| self.vlans.get(&n).map(|v| &**v))
            .ok_or_else(|| RpcError::assertion(format!("no VLAN {nr} in this test")))
    }

    fn machine_call(&self, method: &str, p: &Params) -> Result<Value, RpcError> {
        let name = p.str("machine")?;
        let cell = self
            .machines
            .read()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| RpcError::internal(format!("no machine named `{name}`")))?;
        let mut m = cell.lock().unwrap();
        let ok = |_| Value::Null;
        Ok(match method {
            "start" => m.start(p.bool_or("allow_reboot", false)).map(ok)?,
            "connect" => m.connect().map(ok)?,
            "shutdown" => m.shutdown().map(ok)?,
            "crash" => {
                m.crash();
                Value::Null
            }
            "wait_for_shutdown" => m.wait_for_shutdown().map(ok)?,
            "reboot" => {
                // Upstream: press Ctrl+Alt+Delete; the next command waits for the new shell.
                // Without allow_reboot QEMU exits instead, and the next command boots anew.
                m.connect()?;
                let vm = m.vm_mut()?;
                vm.qmp()
                    .map_err(|e| RpcError::machine(e.to_string()))?
                    .send_key(&["ctrl", "alt", "delete"], None)
                    .map_err(|e| RpcError::machine(e.to_string()))?;
                let message = if m.expect_reboot() {
                    "rebooting (ctrl-alt-delete)"
                } else {
                    "rebooting (ctrl-alt-delete); QEMU runs without allow_reboot, so it exits and the next command boots the machine again"
                };
                self.logger.log(Level::Info, message, Some(name));
                Value::Null
            }
            "send_console" => {
                let chars = p.str("chars")?;
                m.vm_mut()?
                    .send_console(chars.as_bytes())
                    .map_err(|e| RpcError::machine(e.to_string()))?;
                Value::Null
            }
            "get_tty_text" => json!(m.get_tty_text(&p.str_or_number("tty")?)?),
            "wait_until_tty_matches" => {
                m.wait_until_tty_matches(
                    &p.str_or_number("tty")?,
                    p.str("regexp")?,
                    p.f64_or("timeout", DEFAULT_WAIT),
                )?;
                Value::Null
            }
            "is_up" => json!(m.is_up()),
            "state" => json!({ "booted": m.is_booted(), "connected": m.is_connected() }),
            "execute" => {
                let command = p.str("command")?;
                let timeout = p.opt_f64("timeout");
                if !p.bool_or("check_output", true) {
                    // Upstream sends the command and returns at once (for commands that
                    // take the shell down); its reply is dropped before the next command's.
                    m.execute_user_detached(command, timeout)?;
                    return Ok(json!([-2, ""]));
                }
                let (status, output) = m.execute_user(command, timeout)?;
                let status = if p.bool_or("check_return", true) {
                    status
                } else {
                    -1
                };
                json!([status, output])
            }
            "succeed" => json!(m.succeed(&p.strings("commands"), p.opt_f64("timeout"))?),
            "fail" => json!(m.fail(&p.strings("commands"), p.opt_f64("timeout"))?),
            "wait_until_succeeds" => json!(m.wait_until_succeeds(
                p.str("command")?,
                p.f64_or("timeout", DEFAULT_WAIT),
                p.opt_f64("attempt_timeout"),
            )?),
            "wait_until_fails" => json!(m.wait_until_fails(
                p.str("command")?,
                p.f64_or("timeout", DEFAULT_WAIT),
                p.opt_f64("attempt_timeout"),
            )?),
            "sleep" => {
                let secs = p.f64_or("secs", 0.0);
                m.succeed(&[format!("sleep {secs}")], None)?;
                Value::Null
            }
            "systemctl" => json!(m.systemctl(p.str("q")?, p.opt_str("user"))?),
            "start_job" => {
                json!(m.systemctl(&format!("start {}", p.str("jobname")?), p.opt_str("user"))?)
            }
            "stop_job" => {
                json!(m.systemctl(&format!("stop {}", p.str("jobname")?), p.opt_str("user"))?)
            }
            "get_unit_info" => json!(m.get_unit_info(p.str("unit")?, p.opt_str("user"))?),
            "get_unit_property" => {
                json!(m.get_unit_property(p.str("unit")?, p.str("property")?, p.opt_str("user"))?)
            }
            "wait_for_unit" => m
                .wait_for_unit(
                    p.str("unit")?,
                    p.opt_str("user"),
                    p.f64_or("timeout", DEFAULT_WAIT),
                )
                .map(ok)?,
            "wait_for_unit_active_state" => m
                .wait_for_unit_active_state(
                    p.str("unit")?,
                    p.str("state")?,
                    p.opt_str("user"),
                    p.f64_or("timeout", DEFAULT_WAIT),
                )
                .map(ok)?,
            "switch_root" => m.switch_root().map(ok)?,
            "require_unit_state" => m
                .require_unit_state(
                    p.str("unit")?,
                    p.opt_str("require_state").unwrap_or("active"),
                )
                .map(ok)?,
            "wait_for_file" => m
                .wait_for_file(p.str("filename")?, p.f64_or("timeout", DEFAULT_WAIT))
                .map(ok)?,
            "wait_for_open_port" | "wait_for_closed_port" => {
                let addr = p.opt_str("addr").unwrap_or("localhost");
                m.wait_for_port(
                    p.u16("port")?,
                    addr,
                    method == "wait_for_open_port",
                    p.f64_or("timeout", DEFAULT_WAIT),
                )
                .map(ok)?
            }
            "wait_for_open_unix_socket" => m
                .wait_for_open_unix_socket(
                    p.str("addr")?,
                    p.bool_or("is_datagram", false),
                    p.f64_or("timeout", DEFAULT_WAIT),
                )
                .map(ok)?,
            "wait_for_console_text" => m
                .wait_for_console_text(p.str("regex")?, p.opt_f64("timeout"))
                .map(ok)?,
            "get_console_log" => json!(m.console().text()),
            "send_monitor_command" => {
                let command = p.str("command")?;
                let vm = m.vm_mut()?;
                let out = vm
                    .qmp()
                    .map_err(|e| RpcError::machine(e.to_string()))?
                    .human_monitor_command(command)
                    .map_err(|e| RpcError::machine(e.to_string()))?;
                // Upstream reads its monitor socket up to the next prompt, so its reply ends
                // with one (and tests look for it); QMP's reply has none.
                json!(format!("{out}{MONITOR_PROMPT}"))
            }
            "next_qmp_event" => {
                let timeout = Duration::from_secs_f64(p.f64_or("timeout", 0.0).clamp(0.0, 3600.0));
                let vm = m.vm_mut()?;
                match vm
                    .qmp()
                    .map_err(|e| RpcError::machine(e.to_string()))?
                    .next_event(timeout)
                    .map_err(|e| RpcError::machine(e.to_string()))?
                {
                    Some(ev) => {
                        json!({ "event": ev.name, "data": ev.data, "timestamp": { "seconds": ev.timestamp.0, "microseconds": ev.timestamp.1 } })
                    }
                    None => Value::Null,
                }
            }
            "screenshot" => {
                let file = screenshot_path(m.out_dir(), p.str("filename")?);
                let vm = m.vm_mut()?;
                vm.qmp()
                    .map_err(|e| RpcError::machine(e.to_string()))?
                    .screendump(&file, true)
                    .map_err(|e| RpcError::machine(e.to_string()))?;
                self.logger.log(
                    Level::Info,
                    format!("screenshot saved to {}", file.display()),
                    Some(name),
                );
                Value::Null
            }
            "forward_port" => {
                let (host, guest) = (p.u16("host_port")?, p.u16("guest_port")?);
                if m.is_booted() {
                    let vm = m.vm_mut()?;
                    let out = vm
                        .qmp()
                        .map_err(|e| RpcError::machine(e.to_string()))?
                        .human_monitor_command(&format!(
                            "hostfwd_add user0 tcp:127.0.0.1:{host}-:{guest}"
                        ))
                        .map_err(|e| RpcError::machine(e.to_string()))?;
                    if !out.trim().is_empty() {
                        return Err(RpcError::machine(format!("forward_port: {}", out.trim())));
                    }
                } else {
                    m.add_forward(host, guest);
                }
                Value::Null
            }
            "block" | "unblock" => {
                let up = method == "unblock";
                let from_command = m.is_start_command();
                for nr in m.vlan_numbers() {
                    if let Some(vlan) = self.vlans.get(&nr) {
                        match vlan.set_link(name, up) {
                            // A start command's VM may not have joined this VLAN.
                            Err(vmrig_net::NetError::UnknownPort { .. }) if from_command => {}
                            other => other.map_err(net_error)?,
                        }
                    }
                    if m.is_booted() {
                        let vm = m.vm_mut()?;
                        let set = vm
                            .qmp()
                            .map_err(|e| RpcError::machine(e.to_string()))?
                            .set_link(&vmrig_vm::cmdline::vlan_netdev_id(nr), up);
                        match set {
                            Err(_) if from_command => {}
                            other => other.map_err(|e| RpcError::machine(e.to_string()))?,
                        }
                    }
                }
                self.logger.log(
                    Level::Info,
                    format!(
                        "{} all VLAN links",
                        if up { "unblocked" } else { "blocked" }
                    ),
                    Some(name),
                );
                Value::Null
            }
            "copy_from_host" | "copy_from_host_via_shell" => {
                crate::copy::from_host(&mut m, p.str("source")?, p.str("target")?)?;
                Value::Null
            }
            "copy_from_machine" => {
                crate::copy::from_machine(
                    &mut m,
                    p.str("source")?,
                    p.opt_str("target_dir").unwrap_or(""),
                )?;
                Value::Null
            }
            other if crate::screen::handles(other) => {
                crate::screen::call(&mut m, other, p.0, &self.logger)?
            }
            other => {
                return Err(RpcError::machine(format!(
                    "`{other}` is not implemented by vmrig yet (see the README's API table)"
                )))
            }
        })
    }
}

/// Upstream's screenshot naming: `.png` added when the name has no extension, relative to
/// the output directory when it has no directory part.
pub fn screenshot_path(out_dir: &std::path::Path, filename: &str) -> std::path::PathBuf {
    let mut name = filename.to_owned();
    if !name.contains('.') {
        name.push_str(".png");
    }
    if name.contains('/') {
        std::path::PathBuf::from(name)
    } else {
        out_dir.join(name)
    }
}
