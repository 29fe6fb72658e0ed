//! Machines from NixOS start commands, and the NixOS-compatible driver run
//! (`vmrig nixos-driver`, or vmrig invoked as `nixos-test-driver`).
//!
//! As the upstream driver: each machine has a state directory `vm-state-<name>` (its
//! `TMPDIR`, working directory and socket home), `SHARED_DIR` names `shared-xchg` next to
//! it, `QEMU_VDE_SOCKET_<n>` names VLAN `n`'s switch (vmrig's switch speaks VDE), and the
//! driver's options are appended to the command ([`vmrig_vm::cmdline::nixos_driver_args`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use vmrig_python::{MachineInfo, Mode, ScriptContext};
use vmrig_vm::machine::StartCommand;

use crate::cleanup::{self, RunDir};
use crate::events::{Event, Reporter};
use crate::machine::{Machine, RunContext};
use crate::rpc::DriverHandler;
use crate::{ApiError, RunError};

/// The machine name of a start command, as upstream takes it: `run-<name>-vm` at its end,
/// else `machine`.
pub fn machine_name_from_command(command: &str) -> String {
    let command = command.trim_end();
    command
        .strip_suffix("-vm")
        .and_then(|rest| rest.rfind("run-").map(|i| &rest[i + 4..]))
        .filter(|name| !name.is_empty() && !name.contains('/') && !name.contains(' '))
        .unwrap_or("machine")
        .to_owned()
}

/// Makes machines from start commands for a run (`create_machine`, `nixos-driver`).
/// Nothing is prepared until a machine is made: most runs never make one.
pub struct MachineCreator {
    ctx: Arc<RunContext>,
    /// Where `vm-state-<name>` directories (and `shared-xchg`) go when their state is kept
    /// (`-K`, or `keep_vm_state=True`); otherwise they live in the run directory and go
    /// with it.
    keep_dir: PathBuf,
    vlans: BTreeMap<u8, Arc<vmrig_net::Vlan>>,
    /// `-K` for the whole run.
    keep_all: bool,
}

impl MachineCreator {
    pub fn new(
        ctx: Arc<RunContext>,
        keep_dir: PathBuf,
        vlans: &BTreeMap<u8, Arc<vmrig_net::Vlan>>,
        keep_all: bool,
    ) -> MachineCreator {
        MachineCreator {
            ctx,
            keep_dir,
            vlans: vlans.clone(),
            keep_all,
        }
    }

    /// The environment start commands get besides `TMPDIR` and `USE_TMPDIR`: `SHARED_DIR`
    /// (made here) and `QEMU_VDE_SOCKET_<n>` for every VLAN (its switch starts listening
    /// for VDE clients on the first call).
    pub fn env(&self) -> Result<Vec<(String, String)>, ApiError> {
        let base = if self.keep_all {
            &self.keep_dir
        } else {
            &self.ctx.run_dir
        };
        let shared_dir = base.join("shared-xchg");
        std::fs::create_dir_all(&shared_dir)
            .map_err(|e| ApiError::Machine(format!("creating {}: {e}", shared_dir.display())))?;
        let mut env = vec![(
            "SHARED_DIR".to_owned(),
            shared_dir.to_string_lossy().into_owned(),
        )];
        for (nr, vlan) in &self.vlans {
            let dir = vlan
                .vde_dir()
                .map_err(|e| ApiError::Machine(format!("the VDE socket of VLAN {nr}: {e}")))?;
            env.push((
                format!("QEMU_VDE_SOCKET_{nr}"),
                dir.to_string_lossy().into_owned(),
            ));
        }
        Ok(env)
    }

    /// A machine for `command` (named `name`, else from the command). Without kept state,
    /// a fresh state directory; with it, the one a previous run left.
    pub fn create(
        &self,
        name: Option<&str>,
        command: &str,
        keep_state: bool,
    ) -> Result<Machine, ApiError> {
        let name = name
            .map(str::to_owned)
            .unwrap_or_else(|| machine_name_from_command(command));
        if name.is_empty() || name.contains('/') {
            return Err(ApiError::Machine(format!(
                "`{name}` cannot name a machine (it names its state directory)"
            )));
        }
        let keep = keep_state || self.keep_all;
        let base = if keep {
            &self.keep_dir
        } else {
            &self.ctx.run_dir
        };
        let state_dir = base.join(format!("vm-state-{name}"));
        if !keep && state_dir.exists() {
            std::fs::remove_dir_all(&state_dir)
                .map_err(|e| ApiError::Machine(format!("removing {}: {e}", state_dir.display())))?;
        }
        let command = StartCommand {
            name: name.clone(),
            command: command.to_owned(),
            state_dir,
            env: self.env()?,
            allow_reboot: false,
        };
        let vlans = self.vlans.iter().map(|(nr, v)| (*nr, v.clone())).collect();
        Ok(Machine::from_start_command(
            self.ctx.clone(),
            command,
            vlans,
        ))
    }
}

/// A NixOS driver run, as the upstream command line describes it.
#[derive(Clone)]
pub struct NixosRun {
    /// `(name, start command)`; a missing name comes from the command.
    pub machines: Vec<(Option<String>, String)>,
    pub vlans: Vec<u8>,
    pub test_script: PathBuf,
    pub out_dir: PathBuf,
    pub keep_vm_state: bool,
    pub global_timeout: Duration,
    pub interactive: bool,
    pub python: PathBuf,
    pub reporters: Vec<Arc<dyn Reporter>>,
    /// Boot snapshots for start scripts vmrig wrote (others always boot cold).
    pub snapshots: bool,
}

impl std::fmt::Debug for NixosRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NixosRun")
            .field("machines", &self.machines)
            .field("vlans", &self.vlans)
            .field("test_script", &self.test_script)
            .field("out_dir", &self.out_dir)
            .field("keep_vm_state", &self.keep_vm_state)
            .field("global_timeout", &self.global_timeout)
            .field("interactive", &self.interactive)
            .field("snapshots", &self.snapshots)
            .finish_non_exhaustive()
    }
}

/// How a NixOS driver run ended.
#[derive(Debug, Clone)]
pub struct NixosOutcome {
    pub failure: Option<String>,
    pub timed_out: bool,
    pub elapsed: Duration,
}

/// Runs a NixOS test: switches for the VLANs, a machine per start command, the script.
pub fn run_nixos(run: &NixosRun) -> Result<NixosOutcome, RunError> {
    let started = Instant::now();
    cleanup::install_signal_handlers();
    let python = crate::run::find_program(&run.python).ok_or_else(|| {
        RunError::Python(vmrig_python::BridgeError::PythonNotFound {
            python: run.python.clone(),
        })
    })?;
    let text = std::fs::read_to_string(&run.test_script).map_err(|e| {
        RunError::Infra(format!(
            "cannot read the test script {}: {e}",
            run.test_script.display()
        ))
    })?;
    let script = vmrig_spec::ScriptSource {
        text,
        filename: run.test_script.clone(),
        first_line: 1,
    };
    vmrig_python::check_syntax(&python, &script).map_err(RunError::Script)?;
    let logger = crate::run::run_logger(
        &run.out_dir,
        true,
        &run.reporters,
        Event::RunStarted {
            test: "nixos-test".into(),
            file: run.test_script.display().to_string(),
        },
    )?;
    if !run.keep_vm_state {
        logger.info("Machine state will be reset. To keep it, pass --keep-vm-state");
    }
    let run_dir = RunDir::create(false)
        .map_err(|e| RunError::Infra(format!("creating a run directory: {e}")))?;
    let deadline = Instant::now() + run.global_timeout;
    let serial_stdout = Arc::new(AtomicBool::new(true));
    let decision = vmrig_vm::accel::decide(vmrig_vm::accel::AccelChoice::Auto)
        .map_err(|e| RunError::Infra(e.to_string()))?;
    let store = vmrig_store::Store::open_default()
        .map_err(|e| RunError::Infra(format!("opening the store: {e}")))?;
    let ctx = Arc::new(RunContext {
        // Start commands bring their own QEMU; these are for nodes, which this run has not.
        qemu: "qemu-system-x86_64".into(),
        qemu_img: "qemu-img".into(),
        accel: decision.accel,
        firmware: None,
        logger: logger.clone(),
        out_dir: run.out_dir.clone(),
        run_dir: run_dir.path().to_owned(),
        serial_stdout: serial_stdout.clone(),
        deadline,
        store,
        // Only start scripts vmrig wrote: they say what they boot (`snapshot.rs`).
        snapshots: run.snapshots,
        qemu_version: String::new(),
        keep_state_in: None,
    });
    let mut vlans = BTreeMap::new();
    for &nr in &run.vlans {
        let vlan = vmrig_net::Vlan::start(nr, run_dir.path())
            .map_err(|e| RunError::Infra(format!("starting the switch of VLAN {nr}: {e}")))?;
        vlans.insert(nr, Arc::new(vlan));
    }
    let keep_dir = std::env::temp_dir();
    let creator = MachineCreator::new(ctx.clone(), keep_dir, &vlans, run.keep_vm_state);
    let mut machines = BTreeMap::new();
    let mut infos = Vec::new();
    for (name, command) in &run.machines {
        let machine = creator
            .create(name.as_deref(), command, false)
            .map_err(|e| RunError::Infra(e.to_string()))?;
        infos.push(MachineInfo::new(machine.name.clone()));
        if machines
            .insert(machine.name.clone(), Arc::new(Mutex::new(machine)))
            .is_some()
        {
            return Err(RunError::Infra(format!(
                "two machines are named `{}`: name them with --vm-names",
                infos.last().expect("pushed").name
            )));
        }
    }
    let handler = DriverHandler {
        machines: RwLock::new(machines),
        vlans,
        logger: logger.clone(),
        serial_stdout,
        creator,
    };
    let script_ctx = ScriptContext {
        machines: infos,
        vlans: run.vlans.clone(),
        out_dir: run.out_dir.clone(),
        work_dir: run_dir.path().to_owned(),
    };
    let mode = if run.interactive {
        Mode::Interactive
    } else {
        Mode::Script
    };
    let secs = run.global_timeout.as_secs();
    let served = crate::run::serve_script(
        &handler,
        &python,
        &script,
        &script_ctx,
        mode,
        (deadline, secs),
    )?;
    drop(handler);
    drop(run_dir);
    let elapsed = started.elapsed();
    let (failure, timed_out) = served;
    let summary = match &failure {
        None => format!("test script finished in {:.2}s", elapsed.as_secs_f64()),
        Some(why) => format!("test FAILED after {:.1} s: {why}", elapsed.as_secs_f64()),
    };
    logger.emit(Event::RunFinished {
        passed: failure.is_none(),
        elapsed,
        summary,
    });
    Ok(NixosOutcome {
        failure,
        timed_out,
        elapsed,
    })
}

/// Writes a NixOS-style start script `run-<node>-vm` (and the node's initrd,
/// `<node>-initrd`) into `dir` for every node of `spec`, booting `images`. VLAN NICs join
/// the switches named by `QEMU_VDE_SOCKET_<n>`; the scripts run under vmrig's
/// `nixos-driver` or the upstream driver. Returns the scripts' paths.
pub fn write_start_scripts(
    spec: &vmrig_spec::TestSpec,
    images: &BTreeMap<String, vmrig_image::NodeImage>,
    dir: &Path,
    accel: vmrig_vm::accel::Accel,
) -> Result<Vec<PathBuf>, RunError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |what: &Path, e: std::io::Error| {
        RunError::Infra(format!("writing {}: {e}", what.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let dir = dir.canonicalize().map_err(|e| io(dir, e))?;
    let program = |name: &str| {
        crate::run::find_program(Path::new(name)).unwrap_or_else(|| PathBuf::from(name))
    };
    let (qemu, qemu_img) = (program("qemu-system-x86_64"), program("qemu-img"));
    let mut scripts = Vec::new();
    for (name, node) in &spec.nodes {
        let image = &images[name];
        let layer = vmrig_image::node_layer::node_layer(spec, node)
            .map_err(|e| RunError::Infra(format!("node `{name}`: {e}")))?;
        let initrd = dir.join(format!("{name}-initrd"));
        vmrig_image::node_layer::write_initrd(&image.initrd_file(), &layer, &initrd)
            .map_err(|e| io(&initrd, e))?;
        let nics = vmrig_image::node_layer::vlan_addresses(spec, node)
            .into_iter()
            .map(|a| vmrig_vm::cmdline::VlanNic {
                vlan: a.vlan,
                mac: a.mac,
                socket: PathBuf::new(),
            })
            .collect();
        let mut cfg = crate::machine::node_vm_config(node, image, &initrd, nics, accel);
        cfg.firmware = crate::run::firmware();
        let origin = format!("`vmrig build --start-scripts` from {}", spec.path.display());
        let text = vmrig_vm::start_script::render(&vmrig_vm::start_script::StartScript {
            cfg: &cfg,
            root_image: &image.root_image(),
            qemu: &qemu,
            qemu_img: &qemu_img,
            origin: &origin,
        });
        let script = dir.join(vmrig_vm::start_script::file_name(name));
        std::fs::write(&script, text).map_err(|e| io(&script, e))?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| io(&script, e))?;
        scripts.push(script);
    }
    Ok(scripts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logger::Logger;

    #[test]
    fn machine_names_come_from_run_name_vm() {
        assert_eq!(
            machine_name_from_command("/nix/store/abc-nixos-vm/bin/run-server-vm"),
            "server"
        );
        assert_eq!(machine_name_from_command("./run-my-node-vm"), "my-node");
        assert_eq!(
            machine_name_from_command("qemu-system-x86_64 -m 512"),
            "machine"
        );
        assert_eq!(machine_name_from_command("/x/run--vm"), "machine");
    }

    /// What makes start scripts' `-netdev vde,sock=$QEMU_VDE_SOCKET_<n>` hermetic (see
    /// `vmrig_vm::cmdline`'s `guests_are_hermetic_in_start_scripts_too`): the driver names
    /// vmrig's own switch of VLAN `n` there, in the run directory, and nothing else.
    #[test]
    fn guests_are_hermetic_start_scripts_get_vmrigs_switch_as_vde_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let run_dir = tmp.path().join("run");
        std::fs::create_dir(&run_dir).unwrap();
        let ctx = Arc::new(RunContext {
            qemu: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            accel: vmrig_vm::accel::Accel::Tcg,
            firmware: None,
            logger: Logger::new(Vec::new()),
            out_dir: tmp.path().join("out"),
            run_dir: run_dir.clone(),
            serial_stdout: Arc::new(AtomicBool::new(false)),
            deadline: Instant::now() + Duration::from_secs(60),
            store: vmrig_store::Store::open(tmp.path().join("store")).unwrap(),
            snapshots: false,
            qemu_version: String::new(),
            keep_state_in: None,
        });
        let vlans: BTreeMap<u8, Arc<vmrig_net::Vlan>> = [1, 5]
            .into_iter()
            .map(|nr| (nr, Arc::new(vmrig_net::Vlan::start(nr, &run_dir).unwrap())))
            .collect();
        let creator = MachineCreator::new(ctx, tmp.path().join("keep"), &vlans, false);
        let env = creator.env().unwrap();
        let vde: Vec<(&str, &str)> = env
            .iter()
            .filter(|(k, _)| k.starts_with("QEMU"))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let expected: Vec<(String, String)> = vlans
            .iter()
            .map(|(nr, vlan)| {
                let dir = vlan.vde_dir().unwrap();
                assert!(dir.starts_with(&run_dir), "{}", dir.display());
                assert!(dir.join("ctl").exists(), "the switch listens there");
                (
                    format!("QEMU_VDE_SOCKET_{nr}"),
                    dir.to_string_lossy().into_owned(),
                )
            })
            .collect();
        let expected: Vec<(&str, &str)> = expected
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(vde, expected, "no QEMU_NET_OPTS or QEMU_OPTS either");
    }
}
