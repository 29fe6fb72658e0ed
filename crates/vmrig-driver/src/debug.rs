//! `vmrig debug DIR`: the machines and the network of a failure snapshot (`failure.rs`)
//! restored as they were at the failure, then the REPL with the test's globals, or code
//! run as the script (`-c`).
//!
//! The same [`Driver`] as a run, with the saved test file's nodes: each saved machine's
//! first start loads its state on a new writable layer over the saved disk (the snapshot
//! itself is never written, so it can be debugged again), the others stay off (they boot
//! as usual when used).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmrig_image::{ImageBuilder, Quiet};
use vmrig_python::Mode;
use vmrig_spec::ScriptSource;
use vmrig_store::Store;
use vmrig_vm::accel::{self, AccelChoice};
use vmrig_vm::process::find_program;

use crate::driver::{firmware, run_logger, spec_names, Driver, DriverSetup, MachineSource};
use crate::events::Event;
use crate::failure::{FailureError, Manifest, DIR_NAME, TEST_COPY};
use crate::machine::NodeQemu;
use crate::RunError;

/// How to debug (from the command line).
#[derive(Debug, Clone)]
pub struct DebugOptions {
    pub python: PathBuf,
    pub qemu: PathBuf,
    /// Run this instead of opening the REPL.
    pub code: Option<String>,
    /// Show the log on stderr.
    pub terminal_log: bool,
}

/// How a debug session ended.
#[derive(Debug, Clone)]
pub struct DebugOutcome {
    /// `-c` code that raised (one line); `None` when it passed or the REPL ended.
    pub failure: Option<String>,
    /// From the start to the machines and network restored (a usable REPL).
    pub restored_after: Duration,
    pub elapsed: Duration,
}

/// How long a REPL session may last (nothing should time out under the user's hands).
const SESSION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Restores the failure snapshot in `out_dir` and runs the REPL or `opts.code`.
pub fn debug(out_dir: &Path, opts: &DebugOptions) -> Result<DebugOutcome, RunError> {
    let started = Instant::now();
    crate::cleanup::install_signal_handlers();
    let manifest = Manifest::read(out_dir)?;
    // Absolute: the new disk layers name the saved ones as their backing files, which
    // qemu-img would otherwise resolve from the layer's own directory.
    let out_dir = &std::path::absolute(out_dir).map_err(|source| FailureError::Read {
        path: out_dir.to_owned(),
        source,
    })?;
    let snapshot_dir = out_dir.join(DIR_NAME);
    let qemu = find_program(&opts.qemu).ok_or_else(|| RunError::QemuNotFound {
        qemu: opts.qemu.clone(),
    })?;
    let qemu_img = find_program(Path::new("qemu-img")).ok_or(RunError::QemuImgNotFound)?;
    let version = crate::run::check_qemu_version(&qemu)?;
    // The accelerator that saved the state, or a clear refusal.
    let choice: AccelChoice = manifest.accel.parse().unwrap_or(AccelChoice::Tcg);
    let decision = accel::decide(choice)?;
    manifest.check(&qemu, &version, decision.accel)?;
    let gone = manifest.missing_store_paths();
    if !gone.is_empty() {
        return Err(FailureError::StoreGone {
            paths: gone,
            test_file: manifest.test_file.clone(),
        }
        .into());
    }
    let copy = snapshot_dir.join(TEST_COPY);
    let text = std::fs::read_to_string(&copy).map_err(|source| FailureError::Read {
        path: copy.clone(),
        source,
    })?;
    // The copy, read as if it were the original (whose directory has its script file and
    // file sources).
    let spec =
        vmrig_spec::parse(&text, &manifest.test_file).map_err(|e| FailureError::TestChanged {
            test_file: manifest.test_file.clone(),
            copy: copy.clone(),
            why: e.to_string(),
        })?;
    for saved in &manifest.machines {
        if !spec.nodes.contains_key(&saved.name) {
            return Err(FailureError::TestChanged {
                test_file: manifest.test_file.clone(),
                copy,
                why: format!("it has no node `{}`", saved.name),
            }
            .into());
        }
    }
    let store = Store::open_default().map_err(RunError::StoreOpen)?;
    let mut images = std::collections::BTreeMap::new();
    let mut guards = Vec::new();
    for (node, planned) in ImageBuilder::new(&store, &Quiet).planned(&spec) {
        let Some(image) = planned.complete() else {
            return Err(FailureError::StoreGone {
                paths: vec![PathBuf::from(format!("the images of node `{node}`"))],
                test_file: manifest.test_file.clone(),
            }
            .into());
        };
        for path in image.store_paths() {
            guards.push(store.use_path(path).map_err(RunError::HoldImage)?);
        }
        images.insert(node, image);
    }

    let session_out = out_dir.join("debug");
    std::fs::create_dir_all(&session_out).map_err(|source| RunError::OutputDirCreate {
        dir: session_out.clone(),
        source,
    })?;
    let logger = run_logger(
        &session_out,
        opts.terminal_log,
        &[],
        Event::RunStarted {
            test: format!("{} (vmrig debug)", spec.name),
            file: manifest.test_file.display().to_string(),
        },
    )?;
    logger.info(format!(
        "the test failed: {}; restoring {} machine(s) as they were then ({})",
        manifest.failure,
        manifest.machines.len(),
        crate::failure::human_bytes(manifest.bytes())
    ));
    for skipped in &manifest.skipped {
        logger.log(
            crate::events::Level::Warning,
            format!(
                "was not saved ({}): it is off and boots afresh when used",
                skipped.why
            ),
            Some(&skipped.name),
        );
    }
    let timeout = match opts.code {
        Some(_) => Duration::from_secs(spec.global_timeout),
        None => SESSION,
    };
    let setup = DriverSetup {
        logger: logger.clone(),
        out_dir: session_out.clone(),
        deadline: Instant::now() + timeout,
        keep_run_dir: false,
        vlans: Vec::new(),
        capture: false,
        node_qemu: Some(NodeQemu {
            qemu,
            qemu_img,
            version,
            firmware: firmware(),
        }),
        accel: decision.accel,
        store: store.clone(),
        snapshots: true,
        keep_state_in: None,
        start_command_state: (session_out.clone(), false),
        failure_snapshot: None,
    };
    let driver = Driver::new(
        setup,
        &[MachineSource::Nodes {
            spec: &spec,
            images: &images,
        }],
    )?;
    driver
        .restore_failure(&manifest, &snapshot_dir)
        .map_err(|e| RunError::Restore { message: e.message })?;
    let restored_after = started.elapsed();
    logger.info(format!(
        "restored the failure snapshot in {:.1} s",
        restored_after.as_secs_f64()
    ));
    let (script, mode) = match &opts.code {
        Some(code) => (
            ScriptSource {
                text: code.clone(),
                filename: PathBuf::from("<vmrig debug -c>"),
                first_line: 1,
                first_column: 1,
            },
            Mode::Script,
        ),
        None => (spec.script.clone(), Mode::Interactive),
    };
    let python = match mode {
        Mode::Script => crate::driver::checked_python(&opts.python, &script, &spec_names(&spec))?,
        _ => find_program(&opts.python).ok_or_else(|| {
            RunError::Python(vmrig_python::BridgeError::PythonNotFound {
                python: opts.python.clone(),
            })
        })?,
    };
    let (failure, _) = driver.run_script(&python, &script, mode, timeout.as_secs())?;
    driver.finish();
    drop(guards);
    let elapsed = started.elapsed();
    logger.emit(Event::RunFinished {
        passed: failure.is_none(),
        elapsed,
        summary: match &failure {
            None => format!("vmrig debug ended after {:.1} s", elapsed.as_secs_f64()),
            Some(why) => format!(
                "vmrig debug: the code FAILED after {:.1} s: {why}",
                elapsed.as_secs_f64()
            ),
        },
    });
    Ok(DebugOutcome {
        failure,
        restored_after,
        elapsed,
    })
}
