//! A test's machine: one node of the spec, booted lazily, with its console and state dir.
//!
//! NixOS semantics: `start()` launches QEMU and returns; the first command waits for the
//! backdoor shell (`connect`). `start_all()` therefore boots every machine in parallel.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmrig_image::node_layer::{self, NodeLayer};
use vmrig_image::NodeImage;
use vmrig_spec::NodeSpec;
use vmrig_vm::accel::Accel;
use vmrig_vm::backdoor::ShellError;
use vmrig_vm::cmdline::{VlanNic, VmConfig};
use vmrig_vm::machine::{Vm, VmError};
use vmrig_vm::serial::Console;

use crate::events::BlockKind;
use crate::logger::Logger;
use crate::phase::Phase;
use crate::ApiError;

/// The longest a boot may take before the machine counts as hung (TCG is slow; KVM boots
/// in a few seconds).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest wait for a guest to power off after `poweroff`.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(300);

/// The QEMU that boots a run's nodes (start commands bring their own).
#[derive(Debug, Clone)]
pub struct NodeQemu {
    pub qemu: PathBuf,
    pub qemu_img: PathBuf,
    /// `qemu --version`, part of every snapshot key.
    pub version: String,
    /// `-bios`: qboot when QEMU ships it.
    pub firmware: Option<PathBuf>,
}

/// What every machine of a run shares.
pub struct RunContext {
    /// `None` in a run of start commands only (`vmrig nixos-driver`).
    pub node_qemu: Option<NodeQemu>,
    pub accel: Accel,
    pub logger: Logger,
    pub out_dir: PathBuf,
    pub run_dir: PathBuf,
    pub serial_stdout: Arc<AtomicBool>,
    /// The global timeout.
    pub deadline: Arc<crate::deadline::Deadline>,
    /// The image store (boot snapshots live there).
    pub store: vmrig_store::Store,
    /// Boot from snapshots and save them (`--no-snapshots` turns it off).
    pub snapshots: bool,
    /// `--keep-vm-state`: each machine's disk lives in `<dir>/vm-state-<node>` and is reused
    /// by the next run (as NixOS's `-K`), instead of in the throwaway run directory.
    pub keep_state_in: Option<PathBuf>,
}

/// Where a machine stands with boot snapshots.
enum Snapshot {
    /// Not used (off, or not the machine's first start in this run).
    Off,
    /// None fits yet: save one when the machine is first ready.
    Save(vmrig_store::StoreKey),
    /// Started from one (see `Machine::snapshot_in_use`).
    Restoring,
    /// Started from a failure snapshot (`vmrig debug`).
    RestoringFailure,
}

/// Where a machine of `vmrig debug` comes back from: its part of a failure snapshot.
#[derive(Debug, Clone)]
pub struct FailureRestore {
    /// `<snapshot>/<name>/`: `state`, `disk.qcow2`, `console.log`, `initrd`.
    pub dir: PathBuf,
    pub allow_reboot: bool,
    pub forwards: Vec<(u16, u16)>,
}

/// A machine's part of a failure snapshot, once saved.
pub struct FailureSave {
    /// What its disk layer is backed by, and that file's format.
    pub backing: (PathBuf, &'static str),
    /// The store paths it boots from (images, the boot snapshot it was restored from).
    pub store_paths: Vec<PathBuf>,
    pub allow_reboot: bool,
    pub forwards: Vec<(u16, u16)>,
}

/// What a machine boots.
enum Source {
    /// A node of the test file: vmrig's images and command line.
    Node {
        node: Box<NodeSpec>,
        image: Box<NodeImage>,
        layer: Box<NodeLayer>,
        vlans: Vec<VlanNic>,
    },
    /// A NixOS start command (`nixos-driver`, `create_machine`).
    Command {
        command: vmrig_vm::machine::StartCommand,
        /// The run's VLANs (the command decides which it joins, through their VDE sockets).
        vlans: Vec<(u8, Arc<vmrig_net::Vlan>)>,
    },
}

/// One machine of the test.
pub struct Machine {
    pub name: String,
    ctx: Arc<RunContext>,
    source: Source,
    dir: PathBuf,
    console: Arc<Console>,
    /// First console line `wait_for_console_text` has not consumed yet.
    pub(crate) console_cursor: usize,
    vm: Option<Vm>,
    /// Where the machine stands (checked moves, see `phase.rs`).
    phase: Phase,
    started_at: Option<Instant>,
    forwards: Vec<(u16, u16)>,
    snapshot: Snapshot,
    /// Keeps `store gc` away from the snapshot this machine's disk is layered on.
    snapshot_in_use: Option<vmrig_store::UseGuard>,
    /// The running QEMU's `allow_reboot`.
    allow_reboot: bool,
    /// Its first start restores this failure snapshot (`vmrig debug`).
    failure_restore: Option<FailureRestore>,
}

impl Machine {
    pub fn new(
        ctx: Arc<RunContext>,
        node: NodeSpec,
        image: NodeImage,
        layer: NodeLayer,
        vlans: Vec<VlanNic>,
    ) -> Machine {
        let dir = ctx.run_dir.join(&node.name);
        let name = node.name.clone();
        let source = Source::Node {
            node: Box::new(node),
            image: Box::new(image),
            layer: Box::new(layer),
            vlans,
        };
        Machine::with_source(ctx, name, dir, source)
    }

    /// A machine started by a NixOS start command in `command.state_dir`; `vlans` are the
    /// run's VLANs.
    pub fn from_start_command(
        ctx: Arc<RunContext>,
        command: vmrig_vm::machine::StartCommand,
        vlans: Vec<(u8, Arc<vmrig_net::Vlan>)>,
    ) -> Machine {
        let (name, dir) = (command.name.clone(), command.state_dir.clone());
        Machine::with_source(ctx, name, dir, Source::Command { command, vlans })
    }

    fn with_source(ctx: Arc<RunContext>, name: String, dir: PathBuf, source: Source) -> Machine {
        Machine {
            name,
            ctx,
            source,
            dir,
            console: Console::new(),
            console_cursor: 0,
            vm: None,
            phase: Phase::Off,
            started_at: None,
            forwards: Vec::new(),
            snapshot: Snapshot::Off,
            snapshot_in_use: None,
            failure_restore: None,
            allow_reboot: false,
        }
    }

    /// Whether a start command (not a node of the test file) starts this machine.
    pub fn is_start_command(&self) -> bool {
        matches!(self.source, Source::Command { .. })
    }

    pub fn logger(&self) -> &Logger {
        &self.ctx.logger
    }

    /// Whether the machine has no display (a test-file node without `graphics`); unknown
    /// (false) for a start command, which decides that itself.
    pub fn has_no_display(&self) -> bool {
        matches!(&self.source, Source::Node { node, .. } if !node.graphics)
    }

    pub fn console(&self) -> &Arc<Console> {
        &self.console
    }

    pub fn out_dir(&self) -> &PathBuf {
        &self.ctx.out_dir
    }

    pub fn vlan_numbers(&self) -> Vec<u8> {
        match &self.source {
            Source::Node { vlans, .. } => vlans.iter().map(|v| v.vlan).collect(),
            Source::Command { vlans, .. } => vlans.iter().map(|(nr, _)| *nr).collect(),
        }
    }

    /// Whether QEMU is running.
    pub fn is_booted(&mut self) -> bool {
        match self.vm.as_mut() {
            Some(vm) => vm.is_running(),
            None => false,
        }
    }

    pub fn is_up(&mut self) -> bool {
        self.is_booted() && self.phase.is_connected()
    }

    pub fn is_connected(&self) -> bool {
        self.phase.is_connected()
    }

    /// Moves to `to`; a move `phase.rs` does not allow is a driver bug.
    fn set_phase(&mut self, to: Phase) {
        debug_assert!(
            self.phase.may_become(to),
            "machine `{}`: {:?} -> {:?} is not a move a machine makes",
            self.name,
            self.phase,
            to
        );
        self.phase = to;
    }

    /// The global deadline, or `secs` from now if sooner.
    pub fn deadline_in(&self, secs: Option<f64>) -> Instant {
        match secs {
            Some(s) if s.is_finite() && s >= 0.0 => {
                (Instant::now() + Duration::from_secs_f64(s.min(1e9))).min(self.ctx.deadline.get())
            }
            _ => self.ctx.deadline.get(),
        }
    }

    /// Launches QEMU unless it is running.
    pub fn start(&mut self, allow_reboot: bool) -> Result<(), ApiError> {
        if self.is_booted() {
            return Ok(());
        }
        // Whatever the phase said, there is no QEMU.
        self.vm = None;
        self.set_phase(Phase::Off);
        // `get_console_log()` is per start, as upstream's (the serial log file keeps all).
        self.console.clear();
        let log = self.ctx.logger.clone();
        let name = self.name.clone();
        log.nested("starting vm", Some(&name), || self.launch(allow_reboot))
    }

    fn launch(&mut self, allow_reboot: bool) -> Result<(), ApiError> {
        self.snapshot = Snapshot::Off;
        self.allow_reboot = allow_reboot;
        let vm = match &self.source {
            Source::Node { .. } => self.launch_node(allow_reboot)?,
            Source::Command { command, vlans } => {
                let mut command = command.clone();
                command.allow_reboot = allow_reboot;
                let vlans = vlans.clone();
                self.launch_command(command, &vlans)?
            }
        };
        self.ctx.logger.log(
            crate::events::Level::Info,
            format!("QEMU running (pid {}, {})", vm.pid(), self.ctx.accel),
            Some(&self.name),
        );
        self.vm = Some(vm);
        self.set_phase(Phase::Booting);
        self.started_at = Some(Instant::now());
        Ok(())
    }

    /// The serial log file and the sink that echoes console lines (when enabled).
    fn serial_outputs(&self) -> (PathBuf, vmrig_vm::serial::LineSink) {
        let serial_log = self.ctx.out_dir.join(format!("serial-{}.log", self.name));
        let logger = self.ctx.logger.clone();
        let flag = self.ctx.serial_stdout.clone();
        let name = self.name.clone();
        let sink = Arc::new(move |line: &str| {
            if flag.load(Ordering::Relaxed) {
                logger.console(&name, line);
            }
        });
        (serial_log, sink)
    }

    /// Starts a start command's QEMU; a start script vmrig wrote boots from its snapshot
    /// when one fits (see [`crate::snapshot::start_script_snapshot`]).
    fn launch_command(
        &mut self,
        mut command: vmrig_vm::machine::StartCommand,
        vlans: &[(u8, Arc<vmrig_net::Vlan>)],
    ) -> Result<Vm, ApiError> {
        let (log, sink) = self.serial_outputs();
        let mut snapshot = Snapshot::Off;
        let mut snapshot_in_use = None;
        let mut disk = None;
        if self.ctx.snapshots {
            let getenv = |var: &str| std::env::var(var).ok();
            if let Some(found) = crate::snapshot::start_script_snapshot(&command, &getenv) {
                // Only the first start: a restart keeps the disk the script made.
                if !found.disk.exists() {
                    disk = Some(found.disk.clone());
                    snapshot = match self.restore_command_disk(&found)? {
                        Some(guard) => {
                            let state = guard.path().join("state");
                            let uri = format!(
                                "exec:cat {}",
                                vmrig_vm::backdoor::shell_quote(&state.to_string_lossy())
                            );
                            command.command = format!(
                                "{} -incoming {}",
                                command.command,
                                vmrig_vm::backdoor::shell_quote(&uri)
                            );
                            crate::snapshot::replay_console(guard.path(), &self.console, &log)
                                .map_err(|e| {
                                    ApiError::Machine(format!(
                                        "replaying the console saved with {}: {e}",
                                        guard.path().display()
                                    ))
                                })?;
                            snapshot_in_use = Some(guard);
                            Snapshot::Restoring
                        }
                        None => Snapshot::Save(found.key),
                    };
                }
            }
        }
        let mut vm = Vm::launch_start_command(&command, &log, self.console.clone(), sink)
            .map_err(vm_error)?;
        if let Some(disk) = disk {
            vm.set_disk(disk);
        }
        // The VDE port QEMU opens is known by its pid (the start command `exec`s QEMU);
        // naming it lets partition() and block() find the machine's port.
        for (_, vlan) in vlans {
            let _ = vlan.name_vde_client(vm.pid(), &self.name);
        }
        self.snapshot = snapshot;
        if snapshot_in_use.is_some() {
            self.snapshot_in_use = snapshot_in_use;
        }
        Ok(vm)
    }

    /// When the store has the snapshot `found` names, makes the script's disk over the
    /// snapshot's (the script then finds it and leaves it alone) and returns the guard
    /// that keeps the snapshot while the machine uses it.
    fn restore_command_disk(
        &self,
        found: &crate::snapshot::StartScriptSnapshot,
    ) -> Result<Option<vmrig_store::UseGuard>, ApiError> {
        let Some(guard) = self
            .ctx
            .store
            .lookup(&found.key)
            .and_then(|path| self.ctx.store.use_path(&path).ok())
        else {
            return Ok(None);
        };
        if let Some(dir) = found.disk.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| ApiError::Machine(format!("creating {}: {e}", dir.display())))?;
        }
        create_overlay(
            &found.qemu_img,
            (&guard.path().join("disk.qcow2"), "qcow2"),
            &found.disk,
        )?;
        Ok(Some(guard))
    }

    fn launch_node(&mut self, allow_reboot: bool) -> Result<Vm, ApiError> {
        let Some(qemu) = self.ctx.node_qemu.clone() else {
            return Err(ApiError::Machine(format!(
                "`{}` is a node, and this run has no QEMU for nodes",
                self.name
            )));
        };
        let Source::Node {
            node,
            image,
            layer,
            vlans,
        } = &self.source
        else {
            unreachable!("launch_node is for nodes")
        };
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| ApiError::Machine(format!("creating {}: {e}", self.dir.display())))?;
        let disk = match &self.ctx.keep_state_in {
            Some(dir) => {
                let state = dir.join(format!("vm-state-{}", self.name));
                std::fs::create_dir_all(&state)
                    .map_err(|e| ApiError::Machine(format!("creating {}: {e}", state.display())))?;
                state.join("disk.qcow2")
            }
            None => self.dir.join("disk.qcow2"),
        };
        let first_start = !disk.exists();
        // `vmrig debug`: the first start loads the failure snapshot, with the initrd and
        // the options QEMU had then (the device set must be the same).
        let restore = if first_start {
            self.failure_restore.take()
        } else {
            None
        };
        let initrd = match &restore {
            Some(r) => r.dir.join("initrd"),
            None => self.dir.join("initrd"),
        };
        if !initrd.exists() {
            node_layer::write_initrd(&image.initrd_file(), layer, &initrd)
                .map_err(|e| ApiError::Machine(format!("writing {}: {e}", initrd.display())))?;
        }
        let mut cfg = node_vm_config(node, image, &initrd, vlans.clone(), self.ctx.accel);
        cfg.disk = disk.clone();
        cfg.shell_socket = self.dir.join("shell.sock");
        cfg.qmp_socket = self.dir.join("qmp.sock");
        cfg.firmware = qemu.firmware.clone();
        cfg.allow_reboot = allow_reboot;
        cfg.forwards = self.forwards.clone();
        let transfer = self.dir.join("xfer");
        std::fs::create_dir_all(&transfer)
            .map_err(|e| ApiError::Machine(format!("creating {}: {e}", transfer.display())))?;
        cfg.transfer_dir = Some(transfer);
        // A snapshot only stands in for a first boot: a restart keeps the disk as the
        // test left it, as NixOS does.
        let mut backing = (image.root_image(), "raw");
        let mut snapshot = Snapshot::Off;
        let mut snapshot_in_use = None;
        let mut replay_from = None;
        if let Some(r) = &restore {
            cfg.allow_reboot = r.allow_reboot;
            cfg.forwards = r.forwards.clone();
            backing = (r.dir.join("disk.qcow2"), "qcow2");
            cfg.incoming = Some(r.dir.join("state"));
            replay_from = Some(r.dir.clone());
            snapshot = Snapshot::RestoringFailure;
        } else if first_start && node.snapshot && self.ctx.snapshots {
            let hash = crate::snapshot::file_hash(&initrd)
                .map_err(|e| ApiError::Machine(format!("reading {}: {e}", initrd.display())))?;
            // The root image is behind the per-VM disk, not on QEMU's command line: name it.
            let inputs = format!("initrd {hash}\nroot {}", image.rootfs.base_name());
            let key =
                crate::snapshot::snapshot_key(&cfg, &self.ctx.run_dir, &inputs, &qemu.version);
            let found = self
                .ctx
                .store
                .lookup(&key)
                .and_then(|path| self.ctx.store.use_path(&path).ok());
            snapshot = match found {
                Some(guard) => {
                    backing = (guard.path().join("disk.qcow2"), "qcow2");
                    cfg.incoming = Some(guard.path().join("state"));
                    snapshot_in_use = Some(guard);
                    Snapshot::Restoring
                }
                None => Snapshot::Save(key),
            };
        }
        if first_start {
            create_overlay(&qemu.qemu_img, (&backing.0, backing.1), &disk)?;
        }
        let (serial_log, sink) = self.serial_outputs();
        if let Some(guard) = &snapshot_in_use {
            replay_from = Some(guard.path().to_owned());
        }
        if let Some(dir) = &replay_from {
            // The boot's console, as a cold boot would have shown it.
            crate::snapshot::replay_console(dir, &self.console, &serial_log).map_err(|e| {
                ApiError::Machine(format!(
                    "replaying the console saved with {}: {e}",
                    dir.display()
                ))
            })?;
        }
        if let Some(r) = &restore {
            self.allow_reboot = r.allow_reboot;
            self.forwards = r.forwards.clone();
        }
        let vm = Vm::launch(&qemu.qemu, cfg, &serial_log, self.console.clone(), sink)
            .map_err(vm_error)?;
        self.snapshot = snapshot;
        if snapshot_in_use.is_some() {
            self.snapshot_in_use = snapshot_in_use;
        }
        Ok(vm)
    }

    /// Starts the machine if needed and waits for its shell.
    pub fn connect(&mut self) -> Result<(), ApiError> {
        if self.phase == Phase::Ready && self.is_booted() {
            return Ok(());
        }
        // A failed wait keeps the reboot pending, so the next command waits the same way.
        let booted = self.is_booted();
        match self.phase {
            Phase::RebootingToExit => self.wait_for_exit_after_reboot()?,
            Phase::RebootingInPlace if booted => return self.reconnect_after_reboot(),
            _ => {}
        }
        self.start(false)?;
        let deadline = self.deadline_in(Some(BOOT_TIMEOUT.as_secs_f64()));
        let logger = self.ctx.logger.clone();
        let failure = matches!(self.snapshot, Snapshot::RestoringFailure);
        let restoring = failure || matches!(self.snapshot, Snapshot::Restoring);
        let what = if failure {
            "restoring the VM from the failure snapshot"
        } else if restoring {
            "restoring the VM from its boot snapshot"
        } else {
            "waiting for the VM to finish booting"
        };
        let id = logger.begin(BlockKind::Nested, what, Some(&self.name));
        let vm = self.vm.as_mut().expect("started");
        let result = if restoring {
            vm.wait_until_restored(deadline)
        } else {
            vm.wait_until_ready(deadline)
        };
        if let Err(e) = result {
            let e = vm_error(e);
            logger.end(id, Some(e.to_string()));
            return Err(e);
        }
        self.set_phase(Phase::Ready);
        if restoring {
            // The guest's clock stopped when the snapshot was saved.
            let clock = crate::snapshot::set_clock_command(std::time::SystemTime::now());
            if let Err(e) = self.execute(&clock, Some(30.0)) {
                logger.end(id, Some(e.to_string()));
                return Err(e);
            }
        }
        let since = self
            .started_at
            .map(|t| t.elapsed().as_secs_f64())
            .unwrap_or_default();
        let how = if failure {
            "restored from the failure snapshot"
        } else if restoring {
            "restored from the boot snapshot"
        } else {
            "connected to guest root shell"
        };
        logger.log(
            crate::events::Level::Info,
            format!("{how} ({since:.2} s after QEMU started)"),
            Some(&self.name),
        );
        logger.end(id, None);
        // A later connect (after a reboot or restart) is an ordinary one.
        if let Snapshot::Save(key) = std::mem::replace(&mut self.snapshot, Snapshot::Off) {
            self.save_snapshot(&key);
        }
        // After the snapshot: QEMU cannot save a VM while a 9p export is mounted.
        self.mount_shared_dirs()
    }

    /// Mounts the node's shared directories (after every boot, restore and reboot).
    fn mount_shared_dirs(&mut self) -> Result<(), ApiError> {
        let Source::Node { node, .. } = &self.source else {
            return Ok(());
        };
        if node.shared_dirs.is_empty() {
            return Ok(());
        }
        let command = node
            .shared_dirs
            .iter()
            .map(|(name, dir)| {
                crate::copy::mount_9p(
                    &shared_dir_tag(name),
                    &vmrig_vm::backdoor::shell_quote(&dir.target),
                    vmrig_vm::cmdline::NINEP_MOUNT_OPTIONS,
                )
            })
            .collect::<Vec<_>>()
            .join(" && ");
        let (status, output) = self.execute(&command, Some(60.0))?;
        if status != 0 {
            return Err(ApiError::Machine(format!(
                "`{}`: mounting the shared directories failed (exit code {status}): {}",
                self.name,
                output.trim()
            )));
        }
        Ok(())
    }

    /// `reboot()` without `allow_reboot`: QEMU (`-no-reboot`) exits once the guest is down.
    fn wait_for_exit_after_reboot(&mut self) -> Result<(), ApiError> {
        let name = self.name.clone();
        self.wait_for_qemu_exit(
            "waiting for QEMU to exit after the reboot (started without allow_reboot)",
            |secs| format!("`{name}` did not go down within {secs:.0} s of reboot() (QEMU runs with -no-reboot, so the guest's reboot ends it: did the guest ignore Ctrl+Alt+Delete?)"),
        )
    }

    /// Waits (bounded by the shutdown timeout and the global deadline) until QEMU has
    /// exited; `what` names the wait in the log, `timed_out` says what went wrong.
    fn wait_for_qemu_exit(
        &mut self,
        what: &str,
        timed_out: impl Fn(f64) -> String,
    ) -> Result<(), ApiError> {
        let Some(vm) = self.vm.as_mut() else {
            return Ok(());
        };
        let timeout = self
            .ctx
            .deadline
            .get()
            .saturating_duration_since(Instant::now())
            .min(SHUTDOWN_TIMEOUT);
        let logger = self.ctx.logger.clone();
        logger.nested(what, Some(&self.name), || match vm.wait_for_exit(timeout) {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(ApiError::Timeout(timed_out(timeout.as_secs_f64()))),
            Err(e) => Err(vm_error(e)),
        })?;
        self.vm = None;
        self.set_phase(Phase::Off);
        Ok(())
    }

    /// `reboot()` with `allow_reboot`: waits for the rebooted guest's new shell.
    fn reconnect_after_reboot(&mut self) -> Result<(), ApiError> {
        let deadline = self.deadline_in(Some(BOOT_TIMEOUT.as_secs_f64()));
        let logger = self.ctx.logger.clone();
        let name = self.name.clone();
        let started = Instant::now();
        logger.nested("waiting for the VM to finish booting", Some(&name), || {
            // The shell waits for the new guest's banner before it runs the command.
            let vm = self.vm.as_mut().expect("booted");
            match vm.execute("true", Some(deadline)) {
                Ok(_) => {
                    logger.log(
                        crate::events::Level::Info,
                        format!(
                            "connected to guest root shell ({:.2} s after the reboot)",
                            started.elapsed().as_secs_f64()
                        ),
                        Some(&name),
                    );
                    Ok(())
                }
                Err(VmError::Shell {
                    source: ShellError::Timeout(_),
                    ..
                }) => Err(ApiError::Timeout(format!(
                    "`{name}` did not come back from its reboot within {:.0} s; last console lines:\n{}",
                    started.elapsed().as_secs_f64(),
                    vmrig_vm::machine::console_tail(&self.console)
                ))),
                Err(e) => Err(ApiError::Machine(format!(
                    "`{name}` did not come back from its reboot: {e}; last console lines:\n{}",
                    vmrig_vm::machine::console_tail(&self.console)
                ))),
            }
        })?;
        self.set_phase(Phase::Ready);
        self.mount_shared_dirs()
    }

    /// Restores the failure snapshot in `restore` at the machine's first start.
    pub fn restore_failure_at_start(&mut self, restore: FailureRestore) {
        self.failure_restore = Some(restore);
    }

    /// Saves the machine's part of a failure snapshot into `dir`: `Ok(None)` when it is
    /// not running, `Err(why)` when it runs and cannot be saved. The VM goes on running.
    pub fn save_failure_state(
        &mut self,
        dir: &std::path::Path,
    ) -> Result<Option<FailureSave>, String> {
        if !self.is_booted() {
            return Ok(None);
        }
        let Source::Node { node, image, .. } = &self.source else {
            return Err(
                "a start command started it, and vmrig cannot restore its command line".into(),
            );
        };
        let (shared, image) = (node.shared_dirs.clone(), image.clone());
        match self.phase {
            Phase::Ready => {}
            Phase::Booting => {
                return Err("it had not finished booting (its shell had not answered)".into())
            }
            _ => return Err("it was rebooting".into()),
        }
        // Also reads a late reply of a command that outlived its wait: the shell saved must
        // be idle, or the restored one would answer the next command with the old reply.
        match self.execute("true", Some(10.0)) {
            Ok((0, _)) => {}
            Ok((status, _)) => return Err(format!("its shell answers `true` with {status}")),
            Err(e) => return Err(format!("its shell does not answer: {e}")),
        }
        // QEMU cannot save a VM while a 9p export is mounted; `vmrig debug` mounts them
        // again after the restore (`connect`).
        if !shared.is_empty() {
            let targets: Vec<String> = shared
                .values()
                .map(|d| vmrig_vm::backdoor::shell_quote(&d.target))
                .collect();
            let (status, out) = self
                .execute(&format!("umount {}", targets.join(" ")), Some(30.0))
                .map_err(|e| format!("unmounting its shared directories: {e}"))?;
            if status != 0 {
                return Err(format!(
                    "its shared directories could not be unmounted (QEMU cannot save a VM \
                     with a 9p export mounted): {}",
                    out.trim()
                ));
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        // Not the global deadline: it may be what failed the test.
        let deadline = Instant::now() + Duration::from_secs(300);
        let vm = self.vm.as_mut().expect("booted");
        vm.save_state(dir, deadline).map_err(|e| error_chain(&e))?;
        let initrd = self.dir.join("initrd");
        std::fs::copy(&initrd, dir.join("initrd"))
            .map_err(|e| format!("copying {}: {e}", initrd.display()))?;
        let mut store_paths: Vec<PathBuf> = image
            .store_paths()
            .into_iter()
            .map(|p| p.path().to_owned())
            .collect();
        let backing = match &self.snapshot_in_use {
            Some(guard) => {
                store_paths.push(guard.path().to_owned());
                (guard.path().join("disk.qcow2"), "qcow2")
            }
            None => (image.root_image(), "raw"),
        };
        Ok(Some(FailureSave {
            backing,
            store_paths,
            allow_reboot: self.allow_reboot,
            forwards: self.forwards.clone(),
        }))
    }

    /// Saves the boot snapshot once the system has settled; failures only warn.
    fn save_snapshot(&mut self, key: &vmrig_store::StoreKey) {
        let logger = self.ctx.logger.clone();
        let name = self.name.clone();
        let result: Result<(), String> =
            logger.nested("saving a boot snapshot", Some(&name), || {
                let (_, state) = self
                    .execute("systemctl is-system-running --wait", Some(300.0))
                    .map_err(|e| e.to_string())?;
                let state = state.trim();
                if state != "running" && state != "degraded" {
                    return Err(format!("the system did not settle (it is {state:?})"));
                }
                let room = self.ctx.store.make_room().map_err(|e| error_chain(&e))?;
                if !room.removed.is_empty() {
                    let line = vmrig_store::describe_room(&room, self.ctx.store.root());
                    logger.log(crate::events::Level::Info, line, Some(&name));
                }
                let deadline = self.deadline_in(Some(120.0));
                let vm = self.vm.as_mut().ok_or("the machine stopped")?;
                self.ctx
                    .store
                    .build(key, |tmp| vm.save_state(tmp, deadline))
                    .map_err(|e| error_chain(&e))?;
                Ok(())
            });
        if let Err(why) = result {
            logger.log(
                crate::events::Level::Warning,
                format!("no boot snapshot saved: {why}"),
                Some(&name),
            );
        }
    }

    /// Runs a test script's command as NixOS does: under `set -euo pipefail`, so a failing
    /// step or pipeline stage fails the command, and killed in the guest after `timeout`
    /// seconds (status 124, as NixOS's `timeout` wrapper), so the shell is free at once.
    pub fn execute_user(
        &mut self,
        command: &str,
        timeout: Option<f64>,
    ) -> Result<(i32, String), ApiError> {
        let (status, output) = self.execute_limited(&user_command(command), timeout)?;
        if status == BASH_SYNTAX_STATUS {
            if let Some(error) = syntax_error(command) {
                return Err(ApiError::Assertion(format!(
                    "command `{command}` is not valid shell: {error}"
                )));
            }
        }
        Ok((status, output))
    }

    /// [`Machine::execute_user`] without waiting for the command (NixOS's
    /// `execute(check_output=False)`): its reply is read and dropped before the next
    /// command's.
    pub fn execute_user_detached(
        &mut self,
        command: &str,
        timeout: Option<f64>,
    ) -> Result<(), ApiError> {
        self.connect()?;
        let deadline = self.deadline_in(timeout.map(|t| t + LIMIT_GRACE));
        let vm = self.vm.as_mut().expect("connected");
        vm.execute_detached(&user_command(command), guest_limit(timeout), deadline)
            .map_err(|e| self.command_error(command, e))
    }

    /// Runs `command` in the guest: `(status, stdout)`.
    pub fn execute(
        &mut self,
        command: &str,
        timeout: Option<f64>,
    ) -> Result<(i32, String), ApiError> {
        self.execute_with_input(command, None, timeout)
    }

    /// Runs `command`, killed in the guest after `limit` seconds (status 124); the driver
    /// waits a few seconds longer for the reply before it gives up on the shell.
    pub fn execute_limited(
        &mut self,
        command: &str,
        limit: Option<f64>,
    ) -> Result<(i32, String), ApiError> {
        self.connect()?;
        let deadline = self.deadline_in(limit.map(|t| t + LIMIT_GRACE));
        let vm = self.vm.as_mut().expect("connected");
        match vm.execute_limited(command, guest_limit(limit), Some(deadline)) {
            Ok(out) => Ok((out.status, out.text())),
            Err(e) => Err(self.command_error(command, e)),
        }
    }

    /// [`Machine::execute`] with `input` (if any) as the command's stdin.
    pub fn execute_with_input(
        &mut self,
        command: &str,
        input: Option<&[u8]>,
        timeout: Option<f64>,
    ) -> Result<(i32, String), ApiError> {
        self.connect()?;
        let deadline = self.deadline_in(timeout);
        let vm = self.vm.as_mut().expect("connected");
        match vm.execute_with_input(command, input, Some(deadline)) {
            Ok(out) => Ok((out.status, out.text())),
            Err(e) => Err(self.command_error(command, e)),
        }
    }

    /// The error for a command that got no reply.
    fn command_error(&mut self, command: &str, e: VmError) -> ApiError {
        match e {
            VmError::Shell {
                source: ShellError::Timeout(waited),
                ..
            } => ApiError::Timeout(format!(
                "command `{command}` did not finish within {:.0} s{}",
                waited.as_secs_f64(),
                if Instant::now() >= self.ctx.deadline.get() {
                    " (global timeout)"
                } else {
                    ""
                }
            )),
            VmError::Shell {
                source: ShellError::Closed,
                ..
            } => {
                // The shell went away; QEMU may still run (the next command waits for a
                // new shell) or not (it boots the machine again).
                if self.phase == Phase::Ready {
                    self.set_phase(Phase::Booting);
                }
                ApiError::Machine(format!(
                    "`{}`: the guest shell closed while running `{command}` (did the machine stop?); last console lines:\n{}",
                    self.name,
                    vmrig_vm::machine::console_tail(&self.console)
                ))
            }
            e => vm_error(e),
        }
    }

    /// `switch_root()`: from the initrd's shell to the system's (NixOS's
    /// `testing.initrdBackdoor` with a systemd initrd): isolates `initrd-switch-root.target`
    /// and waits for the new shell.
    pub fn switch_root(&mut self) -> Result<(), ApiError> {
        self.wait_for_unit("initrd.target", None, crate::DEFAULT_WAIT)?;
        self.execute_user_detached(
            "systemctl isolate --no-block initrd-switch-root.target 2>/dev/null >/dev/null",
            Some(crate::DEFAULT_WAIT),
        )?;
        if let Some(vm) = self.vm.as_mut() {
            vm.expect_new_shell();
        }
        self.set_phase(Phase::RebootingInPlace);
        self.connect()
    }

    /// Sends `poweroff` and waits for QEMU to exit.
    pub fn shutdown(&mut self) -> Result<(), ApiError> {
        if !self.is_booted() {
            return Ok(());
        }
        if self.phase == Phase::RebootingToExit {
            // reboot() without allow_reboot: the guest is going down already.
            return self.wait_for_shutdown();
        }
        self.connect()?;
        if let Some(vm) = self.vm.as_mut() {
            vm.send_and_forget("poweroff").map_err(vm_error)?;
        }
        self.wait_for_shutdown()
    }

    /// Waits (bounded) until QEMU has exited.
    pub fn wait_for_shutdown(&mut self) -> Result<(), ApiError> {
        let name = self.name.clone();
        self.wait_for_qemu_exit("waiting for the VM to power off", |secs| {
            format!("`{name}` did not power off within {secs:.0} s")
        })
    }

    /// Kills QEMU at once.
    pub fn crash(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            self.ctx.logger.log(
                crate::events::Level::Info,
                "simulating a crash (killing QEMU)",
                Some(&self.name),
            );
            vm.kill();
        }
        self.set_phase(Phase::Off);
    }

    /// The running VM, for QMP and the switch.
    pub fn vm_mut(&mut self) -> Result<&mut Vm, ApiError> {
        let name = self.name.clone();
        self.vm
            .as_mut()
            .ok_or_else(|| ApiError::Machine(format!("`{name}` is not running")))
    }

    /// After Ctrl+Alt+Delete: not connected until the guest is back. With `allow_reboot`
    /// the guest reboots inside the same QEMU and the next command waits for its new shell;
    /// without, QEMU exits and the next command boots the machine again (as NixOS). Returns
    /// whether the reboot stays inside the running QEMU.
    pub fn expect_reboot(&mut self) -> bool {
        let to = if self.allow_reboot {
            if let Some(vm) = self.vm.as_mut() {
                vm.expect_new_shell();
            }
            Phase::RebootingInPlace
        } else {
            Phase::RebootingToExit
        };
        self.set_phase(to);
        self.allow_reboot
    }

    pub fn add_forward(&mut self, host: u16, guest: u16) {
        self.forwards.push((host, guest));
    }

    /// The host side of the VM's 9p transfer directory (`copy.rs`); start commands have none.
    pub fn transfer_dir(&self) -> Option<PathBuf> {
        match self.source {
            Source::Node { .. } => Some(self.dir.join("xfer")),
            Source::Command { .. } => None,
        }
    }

    /// The machine's own directory under the run directory (made when it starts; removed
    /// with the run directory). The screen code keeps its screenshots there.
    pub fn state_dir(&self) -> &std::path::Path {
        &self.dir
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            vm.kill();
        }
    }
}

/// `qemu-img create`: a qcow2 `disk` over `backing` (path, format).
fn create_overlay(
    qemu_img: &std::path::Path,
    backing: (&std::path::Path, &str),
    disk: &std::path::Path,
) -> Result<(), ApiError> {
    let out = vmrig_vm::process::command(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-F", backing.1, "-b"])
        .arg(backing.0)
        .arg(disk)
        .output()
        .map_err(|e| {
            ApiError::Machine(format!(
                "running {}: {e} (install qemu-utils)",
                qemu_img.display()
            ))
        })?;
    if !out.status.success() {
        return Err(ApiError::Machine(format!(
            "qemu-img create failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The QEMU configuration of `node` booting `image` with its own `initrd` (the image's plus
/// the node layer); the caller fills in the disk, sockets, firmware and run-time options.
pub fn node_vm_config(
    node: &NodeSpec,
    image: &NodeImage,
    initrd: &std::path::Path,
    vlans: Vec<VlanNic>,
    accel: Accel,
) -> VmConfig {
    VmConfig {
        name: node.name.clone(),
        accel,
        memory_mib: node.memory,
        cpus: node.cpus,
        kernel: image.kernel_file(),
        initrd: initrd.to_owned(),
        disk: PathBuf::new(),
        modules_disk: image.modules_image(),
        kernel_params: node.kernel_params.clone(),
        shell_socket: PathBuf::new(),
        qmp_socket: PathBuf::new(),
        vlans,
        graphics: node.graphics,
        firmware: None,
        allow_reboot: false,
        forwards: Vec::new(),
        incoming: None,
        transfer_dir: None,
        shared_dirs: node
            .shared_dirs
            .iter()
            .map(|(name, dir)| (shared_dir_tag(name), dir.source.clone()))
            .collect(),
    }
}

/// The 9p mount tag of the node's shared directory `name` (at most 31 bytes: the spec
/// allows names of up to 20).
pub fn shared_dir_tag(name: &str) -> String {
    format!("vmrig-sd-{name}")
}

/// How much longer than a command's time limit the driver waits for its reply (the guest
/// kills it at the limit; TERM, then KILL two seconds later).
const LIMIT_GRACE: f64 = 10.0;

/// A test script's command as NixOS runs it.
fn user_command(command: &str) -> String {
    format!("set -euo pipefail; {command}")
}

/// The status bash gives a command it cannot parse (and many commands give for other
/// reasons).
const BASH_SYNTAX_STATUS: i32 = 2;

/// bash's message when `command` is not valid shell, from the host's `bash -n` (parses,
/// runs nothing). Upstream raises on such a command (`execute(")")`): it is a bug in the
/// test, never a failure a test waits for. Asked only after a status of 2, so a command
/// that works costs nothing; no message when the host has no bash.
fn syntax_error(command: &str) -> Option<String> {
    let out = vmrig_vm::process::command("bash")
        .args(["-n", "-c", command])
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).trim().to_owned())
}

/// A time limit in seconds as the guest enforces it (none for 0, negative, or not finite:
/// `timeout 0` means no limit).
fn guest_limit(secs: Option<f64>) -> Option<Duration> {
    secs.filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| Duration::from_secs_f64(s.min(1e9)))
}

pub(crate) fn vm_error(e: VmError) -> ApiError {
    match e {
        VmError::BootTimeout { .. } | VmError::ConnectTimeout { .. } => {
            ApiError::Timeout(e.to_string())
        }
        other => ApiError::Machine(other.to_string()),
    }
}

/// `e` and its sources, `: `-separated (a store error's own text names only the path).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_errors_are_told_from_commands_that_exit_2() {
        let error = syntax_error(")").expect("a syntax error");
        assert!(
            error.contains("syntax error near unexpected token"),
            "{error}"
        );
        assert_eq!(syntax_error("exit 2"), None);
        assert_eq!(syntax_error("grep -q x /nonexistent"), None);
    }
}
