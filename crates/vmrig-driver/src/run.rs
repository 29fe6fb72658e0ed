//! `vmrig run`'s test run: checks, images, then the [`Driver`] with the test file's nodes,
//! the outcome.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmrig_image::{BuildObserver, ImageBuilder};
use vmrig_python::Mode;
use vmrig_spec::TestSpec;
use vmrig_store::Store;
use vmrig_vm::accel::{self, AccelChoice};
use vmrig_vm::process::find_program;

use crate::cleanup;
use crate::driver::{
    checked_python, firmware, run_logger, spec_names, Driver, DriverSetup, MachineSource,
};
use crate::events::{Event, Reporter};
use crate::logger::Logger;
use crate::machine::NodeQemu;
use crate::RunError;

/// How to run a test (resolved from the command line).
#[derive(Clone)]
pub struct RunOptions {
    /// Output directory; default `./vmrig-out/<test name>`.
    pub out_dir: Option<PathBuf>,
    pub keep_vm_state: bool,
    pub accel: AccelChoice,
    pub mode: Mode,
    pub python: PathBuf,
    pub qemu: PathBuf,
    /// Extra consumers of the run's events (JUnit, a CLI's progress), besides the terminal
    /// log and `events.jsonl`.
    pub reporters: Vec<Arc<dyn Reporter>>,
    /// Show the NixOS-style log on stderr (off when many tests run at once).
    pub terminal_log: bool,
    /// Write one pcap file per VLAN (`vlan<N>.pcap`) into the output directory.
    pub capture: bool,
    /// Boot from saved snapshots and save new ones (nodes may opt out with `snapshot = false`).
    pub snapshots: bool,
    /// A shared cache of store paths: images missing here are fetched from it, and what
    /// this run builds is pushed to it (unless read-only).
    pub remote_cache: Option<Arc<vmrig_store::remote::RemoteCache>>,
    /// Save a failure snapshot (`<out>/failure-snapshot/`) when the script fails.
    pub failure_snapshots: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            out_dir: None,
            keep_vm_state: false,
            accel: AccelChoice::Auto,
            mode: Mode::Script,
            python: "python3".into(),
            qemu: "qemu-system-x86_64".into(),
            reporters: Vec::new(),
            terminal_log: true,
            capture: false,
            snapshots: true,
            remote_cache: None,
            failure_snapshots: true,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub passed: bool,
    pub elapsed: Duration,
    /// One line saying why it failed.
    pub failure: Option<String>,
    pub out_dir: PathBuf,
    /// The images the machines booted, by node (for the result cache).
    pub images: BTreeMap<String, vmrig_image::NodeImage>,
}

/// Runs `spec`: checks the script, builds images (progress to `observer`), boots, runs.
pub fn run_test(
    spec: &TestSpec,
    opts: &RunOptions,
    observer: &dyn BuildObserver,
) -> Result<RunOutcome, RunError> {
    let started = Instant::now();
    let python = checked_python(&opts.python, &spec.script, &spec_names(spec))?;
    let prepared = prepare(spec, opts, observer)?;
    let (failure, _) =
        prepared
            .driver
            .run_script(&python, &spec.script, opts.mode, spec.global_timeout)?;
    let Prepared {
        driver,
        logger,
        out_dir,
        images,
        guards,
    } = prepared;
    driver.finish();
    drop(guards);
    let elapsed = started.elapsed();
    let passed = failure.is_none();
    let summary = match &failure {
        None => format!(
            "test {} passed in {:.1} s",
            spec.name,
            elapsed.as_secs_f64()
        ),
        Some(why) => format!(
            "test {} FAILED after {:.1} s: {why}",
            spec.name,
            elapsed.as_secs_f64()
        ),
    };
    logger.emit(Event::RunFinished {
        passed,
        elapsed,
        summary,
    });
    Ok(RunOutcome {
        passed,
        elapsed,
        failure,
        out_dir,
        images,
    })
}

/// A test's machines, made and not started: what [`run_test`] and the Rust API
/// (`vmrig::Run`) share. Dropping it stops the driver first, then releases the images.
pub struct Prepared {
    /// The driver with the test file's nodes.
    pub driver: Driver,
    /// The run's log (`RunStarted` emitted; `RunFinished` is the caller's).
    pub logger: Logger,
    pub out_dir: PathBuf,
    /// The images the machines boot, by node.
    pub images: BTreeMap<String, vmrig_image::NodeImage>,
    /// Keeps the images' store paths in use (a `store gc` leaves them alone); released
    /// after the driver, whose machines boot them.
    pub guards: Vec<vmrig_store::UseGuard>,
}

/// Everything of a run before its script: the host checks (QEMU, `qemu-img`, the
/// accelerator), the images (built or found, progress to `observer`, held in use), the
/// output directory, the log, and the [`Driver`] with `spec`'s nodes. Installs the
/// SIGINT/SIGTERM cleanup. The script is not looked at (the caller checks it, if it runs one).
pub fn prepare(
    spec: &TestSpec,
    opts: &RunOptions,
    observer: &dyn BuildObserver,
) -> Result<Prepared, RunError> {
    cleanup::install_signal_handlers();
    let qemu = find_program(&opts.qemu).ok_or_else(|| RunError::QemuNotFound {
        qemu: opts.qemu.clone(),
    })?;
    let qemu_img = find_program(Path::new("qemu-img")).ok_or(RunError::QemuImgNotFound)?;
    let qemu_version = check_qemu_version(&qemu)?;
    let decision = accel::decide(opts.accel)?;

    let store = Store::open_default().map_err(RunError::StoreOpen)?;
    let builder = ImageBuilder::new(&store, observer).with_remote(opts.remote_cache.as_deref());
    builder.check_tools().map_err(RunError::Image)?;
    let (images, guards) = build_and_hold(&store, &builder, spec)?;

    let out_dir = opts
        .out_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("vmrig-out").join(&spec.name));
    std::fs::create_dir_all(&out_dir).map_err(|source| RunError::OutputDirCreate {
        dir: out_dir.clone(),
        source,
    })?;
    // A failure snapshot of an earlier run does not describe this one.
    let _ = vmrig_store::remove_all(&out_dir.join(crate::failure::DIR_NAME));
    let logger = run_logger(
        &out_dir,
        opts.terminal_log,
        &opts.reporters,
        Event::RunStarted {
            test: spec.name.clone(),
            file: spec.path.display().to_string(),
        },
    )?;
    logger.emit(Event::Info {
        message: format!("accelerator: {} ({})", decision.accel, decision.reason),
    });
    let setup = DriverSetup {
        logger: logger.clone(),
        out_dir: out_dir.clone(),
        deadline: Instant::now() + Duration::from_secs(spec.global_timeout),
        keep_run_dir: opts.keep_vm_state,
        vlans: Vec::new(),
        capture: opts.capture,
        node_qemu: Some(NodeQemu {
            qemu,
            qemu_img,
            version: qemu_version,
            firmware: firmware(),
        }),
        accel: decision.accel,
        store: store.clone(),
        snapshots: opts.snapshots,
        keep_state_in: opts.keep_vm_state.then(|| out_dir.clone()),
        start_command_state: (out_dir.clone(), false),
        failure_snapshot: opts.failure_snapshots.then(|| crate::failure::SaveSetup {
            test_file: spec.path.clone(),
        }),
    };
    let driver = Driver::new(
        setup,
        &[MachineSource::Nodes {
            spec,
            images: &images,
        }],
    )?;
    Ok(Prepared {
        driver,
        logger,
        out_dir,
        images,
        guards,
    })
}

/// Builds (or finds) the test's images and marks every store path in use. A `store gc`
/// may remove a path between the build and the guard: then build again (bounded).
fn build_and_hold(
    store: &Store,
    builder: &ImageBuilder,
    spec: &TestSpec,
) -> Result<
    (
        BTreeMap<String, vmrig_image::NodeImage>,
        Vec<vmrig_store::UseGuard>,
    ),
    RunError,
> {
    let mut attempt = 0;
    'build: loop {
        attempt += 1;
        let images = builder.build_test(spec).map_err(RunError::Image)?;
        let mut guards = Vec::new();
        for image in images.values() {
            for path in image.store_paths() {
                match store.use_path(path) {
                    Ok(guard) => guards.push(guard),
                    Err(vmrig_store::StoreError::Gone { .. }) if attempt < 5 => continue 'build,
                    Err(e) => return Err(RunError::HoldImage(e)),
                }
            }
        }
        return Ok((images, guards));
    }
}

/// The oldest QEMU vmrig works with: `-netdev stream` (the switch) arrived in 7.2.
pub const MIN_QEMU: (u32, u32) = (7, 2);

/// Parses `QEMU emulator version 7.2.22 (...)`.
pub fn parse_qemu_version(text: &str) -> Option<(u32, u32)> {
    let rest = text.split("version ").nth(1)?;
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

pub(crate) fn check_qemu_version(qemu: &Path) -> Result<String, RunError> {
    let text =
        crate::snapshot::qemu_version_line(qemu).map_err(|source| RunError::QemuUnrunnable {
            qemu: qemu.to_owned(),
            source,
        })?;
    match parse_qemu_version(&text) {
        Some(v) if v >= MIN_QEMU => Ok(text),
        Some(found) => Err(RunError::QemuTooOld {
            qemu: qemu.to_owned(),
            found,
            needed: MIN_QEMU,
        }),
        None => Err(RunError::NotQemu {
            qemu: qemu.to_owned(),
            printed: text.trim().to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_versions_parse() {
        assert_eq!(
            parse_qemu_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n"),
            Some((7, 2))
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 10.0.2"),
            Some((10, 0))
        );
        assert_eq!(parse_qemu_version("garbage"), None);
        assert!((6, 2) < MIN_QEMU && (10, 0) >= MIN_QEMU);
    }
}
