//! The one [`Driver`]: a run's switches, machines and script, built from a list of machine
//! sources, for every entry point (`vmrig run` in `run.rs`, `vmrig nixos-driver` in
//! `nixos.rs`; `-I` is the same run with an interactive script; `create_machine` adds to a
//! running driver through its [`MachineCreator`]). One setup, one cleanup
//! ([`Driver::finish`], also on drop), as nixpkgs' `driver.py` has one `Driver`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use vmrig_image::{node_layer, NodeImage};
use vmrig_python::{
    MachineInfo, Mode, RpcError, ScriptChild, ScriptContext, ScriptNames, ScriptOutcome,
};
use vmrig_spec::{ScriptSource, TestSpec};
use vmrig_vm::accel::Accel;
use vmrig_vm::cmdline::VlanNic;

use crate::cleanup::{self, RunDir};
use crate::creator::MachineCreator;
use crate::deadline::Deadline;
use crate::events::{Event, Reporter};
use crate::logger::Logger;
use crate::machine::{Machine, RunContext};
use crate::reporters::{JsonLines, Terminal};
use crate::request::Request;
use crate::rpc::DriverHandler;
use crate::RunError;

/// Where a run's machines come from.
pub enum MachineSource<'a> {
    /// Every node of a test file, booting its built images.
    Nodes {
        spec: &'a TestSpec,
        images: &'a BTreeMap<String, NodeImage>,
    },
    /// A NixOS start command (`run-<name>-vm`), named `name` or after the command.
    StartCommand {
        name: Option<String>,
        command: String,
    },
}

/// What every run has, whatever its machines are.
pub struct DriverSetup {
    pub logger: Logger,
    pub out_dir: PathBuf,
    /// The global timeout.
    pub deadline: Instant,
    /// Keep the run directory (and so the machines' disks) after the run.
    pub keep_run_dir: bool,
    /// VLANs to start besides those the nodes are on (`nixos-driver --vlans`).
    pub vlans: Vec<u8>,
    /// One pcap file per VLAN in the output directory.
    pub capture: bool,
    /// QEMU for nodes (start commands bring their own): `None` when the run has none.
    pub node_qemu: Option<crate::machine::NodeQemu>,
    pub accel: Accel,
    pub store: vmrig_store::Store,
    pub snapshots: bool,
    /// `--keep-vm-state` of nodes: their disks live in this directory.
    pub keep_state_in: Option<PathBuf>,
    /// Where start commands keep state with `keep_vm_state`, and whether all of them do.
    pub start_command_state: (PathBuf, bool),
    /// Save a failure snapshot when the script fails (`None`: do not).
    pub failure_snapshot: Option<crate::failure::SaveSetup>,
}

/// A run's switches and machines, ready for its script.
pub struct Driver {
    handler: Option<DriverHandler>,
    run_dir: Option<RunDir>,
    machines: Vec<MachineInfo>,
    deadline: Arc<Deadline>,
    out_dir: PathBuf,
    failure_snapshot: Option<crate::failure::SaveSetup>,
    /// The QEMU version line and accelerator of nodes (for failure snapshots).
    node_qemu_version: Option<String>,
    accel: Accel,
}

impl Driver {
    /// Starts the switches and makes the machines of `sources` (none is started yet).
    pub fn new(setup: DriverSetup, sources: &[MachineSource]) -> Result<Driver, RunError> {
        let run_dir = RunDir::create(setup.keep_run_dir).map_err(|source| RunError::RunDir {
            dir: std::env::temp_dir(),
            source,
        })?;
        if setup.keep_run_dir {
            setup.logger.emit(Event::Info {
                message: format!("keeping VM state in {}", run_dir.path().display()),
            });
        }
        let deadline = Arc::new(Deadline::new(setup.deadline));
        let node_qemu_version = setup.node_qemu.as_ref().map(|q| q.version.clone());
        let ctx = Arc::new(RunContext {
            node_qemu: setup.node_qemu,
            accel: setup.accel,
            logger: setup.logger.clone(),
            out_dir: setup.out_dir.clone(),
            run_dir: run_dir.path().to_owned(),
            serial_stdout: Arc::new(AtomicBool::new(true)),
            deadline: deadline.clone(),
            store: setup.store,
            snapshots: setup.snapshots,
            keep_state_in: setup.keep_state_in,
        });
        let mut wanted: BTreeSet<u8> = setup.vlans.iter().copied().collect();
        for source in sources {
            if let MachineSource::Nodes { spec, .. } = source {
                wanted.extend(spec.nodes.values().flat_map(|n| n.vlans.iter().copied()));
            }
        }
        let vlans = start_vlans(&wanted, run_dir.path(), setup.capture, &ctx)?;
        let (keep_dir, keep_all) = setup.start_command_state;
        let creator = MachineCreator::new(ctx.clone(), keep_dir, &vlans, keep_all);

        let mut machines: BTreeMap<String, Arc<Mutex<Machine>>> = BTreeMap::new();
        let mut infos = Vec::new();
        let mut add = |machine: Machine| -> Result<(), RunError> {
            let name = machine.name.clone();
            if machines.contains_key(&name) {
                return Err(RunError::DuplicateMachine { name });
            }
            infos.push(MachineInfo::new(name.clone()));
            machines.insert(name, Arc::new(Mutex::new(machine)));
            Ok(())
        };
        for source in sources {
            match source {
                MachineSource::Nodes { spec, images } => {
                    for (name, node) in &spec.nodes {
                        let nics = node_nics(spec, node, &vlans)?;
                        let layer = node_layer::node_layer(spec, node).map_err(|source| {
                            RunError::NodeLayer {
                                node: name.clone(),
                                source,
                            }
                        })?;
                        let image = images[name].clone();
                        add(Machine::new(ctx.clone(), node.clone(), image, layer, nics))?;
                    }
                }
                MachineSource::StartCommand { name, command } => {
                    let machine = creator
                        .create(name.as_deref(), command, false)
                        .map_err(RunError::CreateMachine)?;
                    add(machine)?;
                }
            }
        }
        let handler = DriverHandler {
            machines: RwLock::new(machines),
            vlans,
            logger: setup.logger,
            serial_stdout: ctx.serial_stdout.clone(),
            creator,
            deadline: deadline.clone(),
            net: Mutex::new(Default::default()),
        };
        Ok(Driver {
            handler: Some(handler),
            run_dir: Some(run_dir),
            machines: infos,
            deadline,
            out_dir: setup.out_dir,
            failure_snapshot: setup.failure_snapshot,
            node_qemu_version,
            accel: setup.accel,
        })
    }

    /// Runs the test script until it ends or the global timeout (`global_timeout` seconds,
    /// ending at the setup's deadline) passes: why it failed (also logged; `None` if it
    /// passed), and whether the global timeout ended it.
    pub fn run_script(
        &self,
        python: &Path,
        script: &ScriptSource,
        mode: Mode,
        global_timeout: u64,
    ) -> Result<(Option<String>, bool), RunError> {
        let handler = self
            .handler
            .as_ref()
            .expect("a driver serves until finished");
        let run_dir = self
            .run_dir
            .as_ref()
            .expect("a driver serves until finished");
        let script_ctx = ScriptContext {
            machines: self.machines.clone(),
            vlans: handler.vlans.keys().copied().collect(),
            out_dir: self.out_dir.clone(),
            work_dir: run_dir.path().to_owned(),
        };
        let (failure, timed_out) = serve_script(
            handler,
            python,
            script,
            &script_ctx,
            mode,
            (&self.deadline, global_timeout),
        )?;
        // Only a script that ran by itself: with a REPL the user was already there.
        if let (Some(why), Some(setup), Mode::Script) = (&failure, &self.failure_snapshot, mode) {
            self.save_failure_snapshot(handler, setup, why);
        }
        Ok((failure, timed_out))
    }

    /// Saves the failure snapshot (`failure.rs`); a failure to save only warns.
    fn save_failure_snapshot(
        &self,
        handler: &DriverHandler,
        setup: &crate::failure::SaveSetup,
        why: &str,
    ) {
        // The machines' commands must not time out now: the global timeout may be what
        // failed the test (the watchdog has stopped).
        self.deadline.lift();
        let Some(version) = &self.node_qemu_version else {
            return;
        };
        if let Err(e) =
            crate::failure::save(handler, setup, &self.out_dir, version, self.accel, why)
        {
            let _ = vmrig_store::remove_all(&self.out_dir.join(crate::failure::DIR_NAME));
            handler.logger.log(
                crate::events::Level::Warning,
                format!("no failure snapshot saved: {e}"),
                None,
            );
        }
    }

    /// `vmrig debug`: restores the machines of `manifest` (saved in `snapshot_dir`) and
    /// the network as they were at the failure; the other machines stay off.
    pub fn restore_failure(
        &self,
        manifest: &crate::failure::Manifest,
        snapshot_dir: &Path,
    ) -> Result<(), RpcError> {
        let handler = self
            .handler
            .as_ref()
            .expect("a driver serves until finished");
        let cells: Vec<_> = {
            let machines = handler.machines.read().unwrap();
            manifest
                .machines
                .iter()
                .map(|saved| {
                    machines.get(&saved.name).cloned().ok_or_else(|| {
                        RpcError::machine(format!(
                            "the failure snapshot has a machine `{}` the test file lacks",
                            saved.name
                        ))
                    })
                })
                .collect::<Result<_, _>>()?
        };
        // All launched first, so that they load their states at once.
        for (saved, cell) in manifest.machines.iter().zip(&cells) {
            let mut m = cell.lock().unwrap();
            m.restore_failure_at_start(crate::machine::FailureRestore {
                dir: snapshot_dir.join(&saved.name),
                allow_reboot: saved.allow_reboot,
                forwards: saved.forwards.clone(),
            });
            m.start(saved.allow_reboot)?;
        }
        for cell in &cells {
            cell.lock().unwrap().connect()?;
        }
        handler.apply_net_state(&manifest.network)?;
        handler.logger.info(format!(
            "network as at the failure: {}",
            manifest.network.describe()
        ));
        Ok(())
    }

    /// Serves one call of the NixOS API, as the script's calls are served (the Rust API's
    /// entry point): the result as the script would receive it, or its error.
    pub fn call(&self, request: Request) -> Result<serde_json::Value, RpcError> {
        self.handler
            .as_ref()
            .expect("a driver serves until finished")
            .handle(request)
    }

    /// Stops everything, in order: the machines (QEMU killed), then the switches, then the
    /// run directory.
    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        drop(self.handler.take());
        drop(self.run_dir.take());
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The switches of `wanted`, capturing into the output directory when asked.
fn start_vlans(
    wanted: &BTreeSet<u8>,
    run_dir: &Path,
    capture: bool,
    ctx: &RunContext,
) -> Result<BTreeMap<u8, Arc<vmrig_net::Vlan>>, RunError> {
    let mut vlans = BTreeMap::new();
    for &nr in wanted {
        let vlan = vmrig_net::Vlan::start(nr, run_dir)
            .map_err(|source| RunError::Switch { vlan: nr, source })?;
        if capture {
            let pcap = ctx.out_dir.join(format!("vlan{nr}.pcap"));
            vlan.capture(&pcap).map_err(|source| RunError::Capture {
                vlan: nr,
                path: pcap.clone(),
                source,
            })?;
            ctx.logger.emit(Event::Info {
                message: format!("capturing VLAN {nr} to {}", pcap.display()),
            });
        }
        vlans.insert(nr, Arc::new(vlan));
    }
    Ok(vlans)
}

/// A node's cards, each a port of its VLAN's switch.
fn node_nics(
    spec: &TestSpec,
    node: &vmrig_spec::NodeSpec,
    vlans: &BTreeMap<u8, Arc<vmrig_net::Vlan>>,
) -> Result<Vec<VlanNic>, RunError> {
    node_layer::vlan_addresses(spec, node)
        .into_iter()
        .map(|a| {
            let socket =
                vlans[&a.vlan]
                    .add_port(&node.name)
                    .map_err(|source| RunError::AddPort {
                        node: node.name.clone(),
                        vlan: a.vlan,
                        source,
                    })?;
            Ok(VlanNic {
                vlan: a.vlan,
                mac: a.mac,
                socket,
            })
        })
        .collect()
}

/// Runs the test script against `handler` until it ends or the global timeout
/// `(deadline, seconds)` passes: why it failed (also logged; `None` if it passed), and
/// whether the global timeout ended it.
fn serve_script(
    handler: &DriverHandler,
    python: &Path,
    script: &vmrig_spec::ScriptSource,
    script_ctx: &ScriptContext,
    mode: Mode,
    (deadline, global_timeout): (&Arc<Deadline>, u64),
) -> Result<(Option<String>, bool), RunError> {
    let logger = &handler.logger;
    if mode.is_interactive() {
        cleanup::ignore_sigint(true);
    }
    let child = ScriptChild::spawn(python, script, script_ctx, mode).map_err(RunError::Python)?;
    let killer = child.killer();
    let script_id = cleanup::register_script(killer.clone());
    let (stop_watchdog, watchdog) = global_timeout_watchdog(
        deadline.clone(),
        killer,
        logger.clone(),
        global_timeout,
        mode == Mode::PauseOnFailure,
    );
    let served = child.serve(handler);
    let _ = stop_watchdog.send(());
    let fired = watchdog.join().unwrap_or(false);
    cleanup::unregister_script(script_id);
    cleanup::ignore_sigint(false);

    let outcome = served.map_err(RunError::Python)?;
    let timed_out = global_timeout_ended(fired, &outcome, deadline.get(), Instant::now());
    let global = format!("global timeout of {global_timeout} s reached");
    let failure = match outcome {
        ScriptOutcome::Passed => None,
        ScriptOutcome::Failed {
            exc_type,
            message,
            line,
            traceback,
        } => {
            let file = script.filename.display().to_string();
            let first = message.lines().next().unwrap_or_default().to_owned();
            let place = line.map(|l| format!("{file}:{l}: ")).unwrap_or_default();
            // Logged with its traceback and console lines even when the global timeout
            // ended the call: it says which step was running.
            logger.emit(Event::ScriptFailed {
                exc_type: exc_type.clone(),
                message,
                line,
                file,
                traceback,
            });
            let why = format!("{place}{exc_type}: {first}");
            Some(if timed_out {
                format!("{global} ({why})")
            } else {
                why
            })
        }
        _ if timed_out => Some(global),
        ScriptOutcome::Killed => Some("the test script was killed".into()),
        ScriptOutcome::ExitedWithoutReport(code) => Some(format!(
            "the test script exited with status {code} without reporting"
        )),
    };
    if timed_out {
        log_unfinished_boots(handler);
    }
    Ok((failure, timed_out))
}

/// After the global timeout: the last console lines of every machine still booting (where
/// a boot that never reached its shell stopped).
fn log_unfinished_boots(handler: &DriverHandler) {
    let machines = handler.machines.read().unwrap();
    for machine in machines.values() {
        // The call that was waiting has returned (its wait had the same deadline).
        let Ok(mut m) = machine.try_lock() else {
            continue;
        };
        if m.is_booted() && !m.is_connected() {
            handler.logger.log(
                crate::events::Level::Error,
                format!(
                    "`{}` had not finished booting; last console lines:\n{}",
                    m.name,
                    vmrig_vm::machine::console_tail(m.console())
                ),
                Some(&m.name),
            );
        }
    }
}

/// Kills the script and every VM when the global timeout passes. Returns a sender that
/// stops the watchdog, and its handle (true if it fired).
fn global_timeout_watchdog(
    deadline: Arc<Deadline>,
    killer: vmrig_python::ScriptKiller,
    logger: Logger,
    secs: u64,
    pause: bool,
) -> (mpsc::Sender<()>, std::thread::JoinHandle<bool>) {
    let (tx, rx) = mpsc::channel::<()>();
    let handle = std::thread::spawn(move || loop {
        let wait = deadline.get().saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            // Lifted while waiting (a paused script): wait for the new deadline.
            Err(mpsc::RecvTimeoutError::Timeout) if deadline.get() > Instant::now() => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                logger.log(
                    crate::events::Level::Error,
                    format!("global timeout of {secs} s reached: stopping the test"),
                    None,
                );
                if pause {
                    // The script pauses where it is (and lifts the deadline); it is not
                    // killed unless it ignores the interrupt.
                    killer.interrupt();
                    deadline.lift();
                    return true;
                }
                // Only this run's script: every wait of its machines is bounded by the
                // same deadline, so the call in progress returns now too (other tests
                // running in this process are left alone).
                killer.kill();
                return true;
            }
            _ => return false,
        }
    });
    (tx, handle)
}

/// How long before the global deadline a call's own wait may give up: a polling wait
/// (`wait_for_unit`, `wait_until_succeeds`) does not start a pause of up to a second that
/// would end past its deadline.
const DEADLINE_SLACK: Duration = Duration::from_millis(1500);

/// Whether the global timeout ended the script: the watchdog fired, or the script failed
/// when the deadline had passed or was at most [`DEADLINE_SLACK`] away. Every wait of a
/// call is bounded by the same deadline, so a call in progress (`wait_for_unit`, a
/// command) returns its own timeout error before the watchdog wakes, and the script fails
/// of the global timeout all the same (upstream exits 143 there too).
fn global_timeout_ended(
    fired: bool,
    outcome: &ScriptOutcome,
    deadline: Instant,
    now: Instant,
) -> bool {
    fired || (!matches!(outcome, ScriptOutcome::Passed) && now + DEADLINE_SLACK >= deadline)
}

/// The Python that runs `script` (found on PATH), once `script` passed its static check
/// (syntax, undefined names, unknown attributes and calls of the API; `names` are the
/// test's machines and VLANs): every entry point checks before it builds or boots anything.
pub fn checked_python(
    python: &Path,
    script: &ScriptSource,
    names: &ScriptNames,
) -> Result<PathBuf, RunError> {
    let found = vmrig_vm::process::find_program(python).ok_or_else(|| {
        RunError::Python(vmrig_python::BridgeError::PythonNotFound {
            python: python.to_owned(),
        })
    })?;
    vmrig_python::check_script(&found, script, names).map_err(RunError::Script)?;
    Ok(found)
}

/// The machines and VLANs a script of `spec` sees (as [`Driver::new`] makes them).
pub fn spec_names(spec: &TestSpec) -> ScriptNames {
    let vlans: Vec<u8> = spec
        .nodes
        .values()
        .flat_map(|n| n.vlans.iter().copied())
        .collect();
    ScriptNames::new(spec.nodes.keys().cloned(), &vlans)
}

/// The firmware to boot with: qboot when QEMU ships it (about 1.7 s faster than SeaBIOS).
pub fn firmware() -> Option<PathBuf> {
    ["/usr/share/qemu/qboot.rom", "/usr/share/qboot/bios.bin"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// The run's log: `events.jsonl` and `report.html` in `out_dir`, the terminal (if `terminal`), the caller's
/// reporters; `started` is its first event.
pub fn run_logger(
    out_dir: &Path,
    terminal: bool,
    extra: &[Arc<dyn Reporter>],
    started: Event,
) -> Result<Logger, RunError> {
    let events = JsonLines::create(&out_dir.join("events.jsonl")).map_err(|source| {
        RunError::OutputDirWrite {
            dir: out_dir.to_owned(),
            source,
        }
    })?;
    let mut reporters: Vec<Box<dyn Reporter>> = vec![
        Box::new(events),
        Box::new(crate::html_report::HtmlReport::new(out_dir)),
    ];
    if terminal {
        reporters.push(Box::new(Terminal::stderr()));
    }
    for reporter in extra {
        reporters.push(Box::new(Shared(reporter.clone())));
    }
    let logger = Logger::new(reporters);
    logger.emit(started);
    Ok(logger)
}

/// A reporter shared with the caller (who reads what it collected after the run).
struct Shared(Arc<dyn Reporter>);

impl Reporter for Shared {
    fn report(&self, event: &crate::events::Stamped) {
        self.0.report(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_after_the_deadline_is_the_global_timeout() {
        let deadline = Instant::now();
        let failed = ScriptOutcome::Failed {
            exc_type: "RequestedAssertionFailed".into(),
            message: "timed out".into(),
            line: Some(3),
            traceback: String::new(),
        };
        let after = deadline + Duration::from_millis(1);
        assert!(global_timeout_ended(false, &failed, deadline, after));
        // A poll that gave up a second early (its next pause would end past the deadline).
        let poll_gave_up = deadline - Duration::from_millis(900);
        assert!(global_timeout_ended(false, &failed, deadline, poll_gave_up));
        let before = deadline - Duration::from_secs(3);
        assert!(!global_timeout_ended(false, &failed, deadline, before));
        assert!(!global_timeout_ended(
            false,
            &ScriptOutcome::Passed,
            deadline,
            after
        ));
        assert!(global_timeout_ended(
            true,
            &ScriptOutcome::Killed,
            deadline,
            before
        ));
    }
}
