//! The Rust side of the script's JSON-RPC calls: one method per API call.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::{json, Value};
use vmrig_python::{Handler, RpcError};

use crate::events::{BlockKind, Level};
use crate::logger::Logger;
use crate::machine::Machine;
use crate::request::{DriverRequest, MachineRequest, Request};
use crate::ApiError;
use crate::{DEFAULT_WAIT, MONITOR_PROMPT};

/// Serves a test script: the machines, the VLAN switches, the log.
pub struct DriverHandler {
    /// Grows when the script calls `create_machine`.
    pub machines: RwLock<BTreeMap<String, Arc<Mutex<Machine>>>>,
    pub vlans: BTreeMap<u8, Arc<vmrig_net::Vlan>>,
    pub logger: Logger,
    pub serial_stdout: Arc<AtomicBool>,
    /// Makes machines from start commands (`create_machine`).
    pub creator: crate::creator::MachineCreator,
    /// The global timeout (lifted when a failed script pauses).
    pub deadline: Arc<crate::deadline::Deadline>,
    /// What the script did to the network (saved with a failure snapshot).
    pub net: Mutex<crate::failure::NetState>,
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
        self.handle(Request::parse(method, params)?)
    }
}

fn machine_err(e: impl std::fmt::Display) -> RpcError {
    RpcError::machine(e.to_string())
}

fn net_error(e: vmrig_net::NetError) -> RpcError {
    RpcError::machine(format!("switch: {e}"))
}

impl DriverHandler {
    /// Serves one typed call: the script's, parsed, or the Rust API's (`Driver::call`).
    pub fn handle(&self, request: Request) -> Result<Value, RpcError> {
        match request {
            Request::Machine { machine, call } => self.machine_call(&machine, call),
            Request::Driver(call) => self.driver_call(call),
        }
    }

    /// Every machine, in name order (a snapshot: the lock is not held while they work).
    fn all_machines(&self) -> Vec<Arc<Mutex<Machine>>> {
        self.machines.read().unwrap().values().cloned().collect()
    }

    fn driver_call(&self, call: DriverRequest) -> Result<Value, RpcError> {
        match call {
            DriverRequest::StartAll {} => {
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
            DriverRequest::JoinAll {} => {
                let id = self
                    .logger
                    .begin(BlockKind::Nested, "wait for all VMs to finish", None);
                for machine in self.all_machines() {
                    machine.lock().unwrap().wait_for_shutdown()?;
                }
                self.logger.end(id, None);
                Ok(Value::Null)
            }
            DriverRequest::Pause {} => {
                self.deadline.lift();
                self.logger.log(
                    Level::Warning,
                    "the test failed: paused with its machines running (no global timeout \
                     from now on); leave the REPL (Ctrl-D) to end the run",
                    None,
                );
                Ok(Value::Null)
            }
            DriverRequest::CreateMachine {
                start_command,
                name,
                keep_vm_state,
            } => self.create_machine(&start_command, name.as_deref(), keep_vm_state),
            DriverRequest::BlockBegin {
                message,
                kind,
                attrs,
            } => {
                let kind = if kind.as_deref() == Some("subtest") {
                    BlockKind::Subtest
                } else {
                    BlockKind::Nested
                };
                let id = self.logger.begin(kind, &message, attrs.machine.as_deref());
                Ok(json!({ "id": id }))
            }
            DriverRequest::BlockEnd { id, error } => {
                self.logger.end(id, error);
                Ok(Value::Null)
            }
            DriverRequest::LogMessage {
                level,
                message,
                attrs,
            } => {
                let level = match level.as_deref() {
                    Some("warning") => Level::Warning,
                    Some("error") => Level::Error,
                    Some("debug") => Level::Debug,
                    _ => Level::Info,
                };
                self.logger.log(level, message, attrs.machine.as_deref());
                Ok(Value::Null)
            }
            DriverRequest::SerialStdout { on } => {
                self.serial_stdout
                    .store(on.unwrap_or(true), Ordering::Relaxed);
                Ok(Value::Null)
            }
            DriverRequest::SetLoss { vlan, percent } => {
                let percent = percent.unwrap_or(0.0);
                let switch = self.vlan(vlan)?;
                switch.set_loss(percent).map_err(net_error)?;
                self.net.lock().unwrap().set_loss(switch.nr(), percent);
                Ok(Value::Null)
            }
            DriverRequest::SetDelay { vlan, ms } => {
                let ms = ms.unwrap_or(0.0).max(0.0);
                let switch = self.vlan(vlan)?;
                switch
                    .set_delay(Duration::from_secs_f64(ms / 1000.0))
                    .map_err(net_error)?;
                self.net.lock().unwrap().set_delay(switch.nr(), ms);
                Ok(Value::Null)
            }
            DriverRequest::Partition { group_a, group_b } => {
                for name in group_a.iter().chain(&group_b) {
                    if !self.machines.read().unwrap().contains_key(name) {
                        return Err(RpcError::assertion(format!(
                            "partition: no machine named `{name}`"
                        )));
                    }
                }
                self.logger
                    .info(format!("partitioning {group_a:?} from {group_b:?}"));
                for vlan in self.vlans.values() {
                    vlan.partition(&group_a, &group_b).map_err(net_error)?;
                }
                self.net.lock().unwrap().partitions.push((group_a, group_b));
                Ok(Value::Null)
            }
            DriverRequest::Heal {} => {
                self.logger.info("healing all partitions");
                for vlan in self.vlans.values() {
                    vlan.heal().map_err(net_error)?;
                }
                self.net.lock().unwrap().partitions.clear();
                Ok(Value::Null)
            }
        }
    }

    /// `create_machine(start_command, name=, keep_vm_state=)`.
    fn create_machine(
        &self,
        command: &str,
        name: Option<&str>,
        keep_vm_state: bool,
    ) -> Result<Value, RpcError> {
        let machine = self.creator.create(name, command, keep_vm_state)?;
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

    fn vlan(&self, nr: u64) -> Result<&vmrig_net::Vlan, RpcError> {
        u8::try_from(nr)
            .ok()
            .and_then(|n| self.vlans.get(&n).map(|v| &**v))
            .ok_or_else(|| RpcError::assertion(format!("no VLAN {nr} in this test")))
    }

    fn machine_call(&self, name: &str, call: MachineRequest) -> Result<Value, RpcError> {
        use MachineRequest as R;
        let cell = self
            .machines
            .read()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| RpcError::internal(format!("no machine named `{name}`")))?;
        let mut m = cell.lock().unwrap();
        let ok = |_| Value::Null;
        let wait = |t: Option<f64>| t.unwrap_or(DEFAULT_WAIT);
        Ok(match call {
            R::Start { allow_reboot } => m.start(allow_reboot).map(ok)?,
            R::Connect {} => m.connect().map(ok)?,
            R::Shutdown {} => m.shutdown().map(ok)?,
            R::Crash {} => {
                m.crash();
                Value::Null
            }
            R::WaitForShutdown {} => m.wait_for_shutdown().map(ok)?,
            R::Reboot {} => {
                // Upstream: press Ctrl+Alt+Delete; the next command waits for the new shell.
                // Without allow_reboot QEMU exits instead, and the next command boots anew.
                m.connect()?;
                m.vm_mut()?
                    .qmp()
                    .map_err(machine_err)?
                    .send_key(&["ctrl", "alt", "delete"], None)
                    .map_err(machine_err)?;
                let message = if m.expect_reboot() {
                    "rebooting (ctrl-alt-delete)"
                } else {
                    "rebooting (ctrl-alt-delete); QEMU runs without allow_reboot, so it exits and the next command boots the machine again"
                };
                self.logger.log(Level::Info, message, Some(name));
                Value::Null
            }
            R::SwitchRoot {} => m.switch_root().map(ok)?,
            R::IsUp {} => json!(m.is_up()),
            R::State {} => json!({ "booted": m.is_booted(), "connected": m.is_connected() }),
            R::Execute {
                command,
                timeout,
                check_return,
                check_output,
            } => {
                if !check_output.unwrap_or(true) {
                    // Upstream sends the command and returns at once (for commands that
                    // take the shell down); its reply is dropped before the next command's.
                    m.execute_user_detached(&command, timeout)?;
                    return Ok(json!([-2, ""]));
                }
                let (status, output) = m.execute_user(&command, timeout)?;
                let status = if check_return.unwrap_or(true) {
                    status
                } else {
                    -1
                };
                json!([status, output])
            }
            R::Succeed { commands, timeout } => json!(m.succeed(&commands, timeout)?),
            R::Fail { commands, timeout } => json!(m.fail(&commands, timeout)?),
            R::WaitUntilSucceeds {
                command,
                timeout,
                attempt_timeout,
            } => json!(m.wait_until_succeeds(&command, wait(timeout), attempt_timeout)?),
            R::WaitUntilFails {
                command,
                timeout,
                attempt_timeout,
            } => json!(m.wait_until_fails(&command, wait(timeout), attempt_timeout)?),
            R::Sleep { secs } => {
                m.succeed(&[format!("sleep {}", secs.unwrap_or(0.0))], None)?;
                Value::Null
            }
            R::Systemctl { q, user } => json!(m.systemctl(&q, user.as_deref())?),
            R::StartJob { jobname, user } => {
                json!(m.systemctl(&format!("start {jobname}"), user.as_deref())?)
            }
            R::StopJob { jobname, user } => {
                json!(m.systemctl(&format!("stop {jobname}"), user.as_deref())?)
            }
            R::GetUnitInfo { unit, user } => json!(m.get_unit_info(&unit, user.as_deref())?),
            R::GetUnitProperty {
                unit,
                property,
                user,
            } => json!(m.get_unit_property(&unit, &property, user.as_deref())?),
            R::WaitForUnit {
                unit,
                user,
                timeout,
            } => m
                .wait_for_unit(&unit, user.as_deref(), wait(timeout))
                .map(ok)?,
            R::WaitForUnitActiveState {
                unit,
                state,
                user,
                timeout,
            } => m
                .wait_for_unit_active_state(&unit, &state, user.as_deref(), wait(timeout))
                .map(ok)?,
            R::RequireUnitState {
                unit,
                require_state,
            } => m
                .require_unit_state(&unit, require_state.as_deref().unwrap_or("active"))
                .map(ok)?,
            R::WaitForFile { filename, timeout } => {
                m.wait_for_file(&filename, wait(timeout)).map(ok)?
            }
            R::WaitForOpenPort {
                port,
                addr,
                timeout,
            } => {
                let addr = addr.as_deref().unwrap_or("localhost");
                m.wait_for_port(port, addr, true, wait(timeout)).map(ok)?
            }
            R::WaitForClosedPort {
                port,
                addr,
                timeout,
            } => {
                let addr = addr.as_deref().unwrap_or("localhost");
                m.wait_for_port(port, addr, false, wait(timeout)).map(ok)?
            }
            R::WaitForOpenUnixSocket {
                addr,
                is_datagram,
                timeout,
            } => m
                .wait_for_open_unix_socket(&addr, is_datagram.unwrap_or(false), wait(timeout))
                .map(ok)?,
            R::WaitForConsoleText { regex, timeout } => {
                m.wait_for_console_text(&regex, timeout).map(ok)?
            }
            R::GetConsoleLog {} => json!(m.console().text()),
            R::SendConsole { chars } => {
                m.vm_mut()?
                    .send_console(chars.as_bytes())
                    .map_err(machine_err)?;
                Value::Null
            }
            R::SendMonitorCommand { command } => {
                let out = m
                    .vm_mut()?
                    .qmp()
                    .map_err(machine_err)?
                    .human_monitor_command(&command)
                    .map_err(machine_err)?;
                // Upstream reads its monitor socket up to the next prompt, so its reply ends
                // with one (and tests look for it); QMP's reply has none.
                json!(format!("{out}{MONITOR_PROMPT}"))
            }
            R::NextQmpEvent { timeout } => {
                let timeout = Duration::from_secs_f64(timeout.unwrap_or(0.0).clamp(0.0, 3600.0));
                let event = m
                    .vm_mut()?
                    .qmp()
                    .map_err(machine_err)?
                    .next_event(timeout)
                    .map_err(machine_err)?;
                match event {
                    Some(ev) => {
                        json!({ "event": ev.name, "data": ev.data, "timestamp": { "seconds": ev.timestamp.0, "microseconds": ev.timestamp.1 } })
                    }
                    None => Value::Null,
                }
            }
            R::GetTtyText { tty } => json!(m.get_tty_text(&tty.to_string())?),
            R::WaitUntilTtyMatches {
                tty,
                regexp,
                timeout,
            } => {
                m.wait_until_tty_matches(&tty.to_string(), &regexp, wait(timeout))?;
                Value::Null
            }
            R::Screenshot { filename } => {
                let file = screenshot_path(m.out_dir(), &filename);
                m.vm_mut()?
                    .qmp()
                    .map_err(machine_err)?
                    .screendump(&file, true)
                    .map_err(machine_err)?;
                self.logger.log(
                    Level::Info,
                    format!("screenshot saved to {}", file.display()),
                    Some(name),
                );
                Value::Null
            }
            R::ForwardPort {
                host_port,
                guest_port,
            } => {
                if m.is_booted() {
                    let out = m
                        .vm_mut()?
                        .qmp()
                        .map_err(machine_err)?
                        .human_monitor_command(&format!(
                            "hostfwd_add user0 tcp:127.0.0.1:{host_port}-:{guest_port}"
                        ))
                        .map_err(machine_err)?;
                    if !out.trim().is_empty() {
                        return Err(RpcError::machine(format!("forward_port: {}", out.trim())));
                    }
                } else {
                    m.add_forward(host_port, guest_port);
                }
                Value::Null
            }
            R::Block {} => self.set_links(&mut m, name, false)?,
            R::Unblock {} => self.set_links(&mut m, name, true)?,
            R::CopyFromHost { source, target } => {
                crate::copy::from_host(&mut m, &source, &target)?;
                Value::Null
            }
            R::CopyFromHostViaShell { source, target } => {
                crate::copy::from_host_via_shell(&mut m, &source, &target)?;
                Value::Null
            }
            R::CopyFromMachine { source, target_dir } => {
                crate::copy::from_machine(&mut m, &source, target_dir.as_deref().unwrap_or(""))?;
                Value::Null
            }
            screen => crate::screen::call(&mut m, screen)?,
        })
    }

    /// `block()` / `unblock()`: the machine's links on all its VLANs, down or up.
    fn set_links(&self, m: &mut Machine, name: &str, up: bool) -> Result<Value, RpcError> {
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
                let set = m
                    .vm_mut()?
                    .qmp()
                    .map_err(machine_err)?
                    .set_link(&vmrig_vm::cmdline::vlan_netdev_id(nr), up);
                match set {
                    Err(_) if from_command => {}
                    other => other.map_err(machine_err)?,
                }
            }
        }
        self.net.lock().unwrap().set_blocked(name, !up);
        self.logger.log(
            Level::Info,
            format!(
                "{} all VLAN links",
                if up { "unblocked" } else { "blocked" }
            ),
            Some(name),
        );
        Ok(Value::Null)
    }
}

impl DriverHandler {
    /// Puts the network back as `net` says (`vmrig debug`, after the machines are
    /// restored): loss and delay per VLAN, partitions, blocked links.
    pub fn apply_net_state(&self, net: &crate::failure::NetState) -> Result<(), RpcError> {
        for (&nr, &percent) in &net.loss_percent {
            self.handle(Request::Driver(DriverRequest::SetLoss {
                vlan: nr.into(),
                percent: Some(percent),
            }))?;
        }
        for (&nr, &ms) in &net.delay_ms {
            self.handle(Request::Driver(DriverRequest::SetDelay {
                vlan: nr.into(),
                ms: Some(ms),
            }))?;
        }
        for (a, b) in &net.partitions {
            self.handle(Request::Driver(DriverRequest::Partition {
                group_a: a.clone(),
                group_b: b.clone(),
            }))?;
        }
        for name in &net.blocked {
            self.handle(Request::Machine {
                machine: name.clone(),
                call: MachineRequest::Block {},
            })?;
        }
        Ok(())
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
