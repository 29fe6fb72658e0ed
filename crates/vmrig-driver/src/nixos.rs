//! The NixOS-compatible driver run (`vmrig nixos-driver`, or vmrig invoked as
//! `nixos-test-driver`): the [`Driver`] with one machine per start command
//! (`creator.rs` makes them as upstream does), and the start scripts
//! `vmrig build --start-scripts` writes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmrig_python::Mode;

use crate::cleanup;
use crate::driver::{Driver, DriverSetup, MachineSource};
use crate::events::{Event, Reporter};
use crate::RunError;

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

impl NixosRun {
    /// The machines and VLANs the script sees: each start command's machine, named as
    /// `creator.rs` names it.
    pub fn script_names(&self) -> vmrig_python::ScriptNames {
        let names = self.machines.iter().map(|(name, command)| {
            name.clone()
                .unwrap_or_else(|| crate::creator::machine_name_from_command(command))
        });
        vmrig_python::ScriptNames::new(names, &self.vlans)
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
    let text =
        std::fs::read_to_string(&run.test_script).map_err(|source| RunError::ReadScript {
            path: run.test_script.clone(),
            source,
        })?;
    let script = vmrig_spec::ScriptSource {
        text,
        filename: run.test_script.clone(),
        first_line: 1,
        first_column: 1,
    };
    let python = crate::driver::checked_python(&run.python, &script, &run.script_names())?;
    let logger = crate::driver::run_logger(
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
    let decision = vmrig_vm::accel::decide(vmrig_vm::accel::AccelChoice::Auto)?;
    let store = vmrig_store::Store::open_default().map_err(RunError::StoreOpen)?;
    let setup = DriverSetup {
        logger: logger.clone(),
        out_dir: run.out_dir.clone(),
        deadline: Instant::now() + run.global_timeout,
        keep_run_dir: false,
        vlans: run.vlans.clone(),
        capture: false,
        // Start commands bring their own QEMU; this run has no nodes.
        node_qemu: None,
        accel: decision.accel,
        store,
        // Only start scripts vmrig wrote: they say what they boot (`snapshot.rs`).
        snapshots: run.snapshots,
        keep_state_in: None,
        start_command_state: (std::env::temp_dir(), run.keep_vm_state),
        failure_snapshot: None,
    };
    let sources: Vec<MachineSource> = run
        .machines
        .iter()
        .map(|(name, command)| MachineSource::StartCommand {
            name: name.clone(),
            command: command.clone(),
        })
        .collect();
    let driver = Driver::new(setup, &sources)?;
    let mode = if run.interactive {
        Mode::Interactive
    } else {
        Mode::Script
    };
    let served = driver.run_script(&python, &script, mode, run.global_timeout.as_secs())?;
    driver.finish();
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
    let io = |what: &Path, source: std::io::Error| RunError::WriteStartScript {
        path: what.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let dir = dir.canonicalize().map_err(|e| io(dir, e))?;
    let program =
        |name: &str| vmrig_vm::process::find_program(name).unwrap_or_else(|| PathBuf::from(name));
    let (qemu, qemu_img) = (program("qemu-system-x86_64"), program("qemu-img"));
    let mut scripts = Vec::new();
    for (name, node) in &spec.nodes {
        let image = &images[name];
        let layer = vmrig_image::node_layer::node_layer(spec, node).map_err(|source| {
            RunError::NodeLayer {
                node: name.clone(),
                source,
            }
        })?;
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
        cfg.firmware = crate::driver::firmware();
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
