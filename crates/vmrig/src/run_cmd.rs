//! `vmrig run` (and `vmrig interactive`): select tests, run them, report.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use vmrig_driver::cache::ResultCache;
use vmrig_driver::RunOptions;
use vmrig_python::Mode;
use vmrig_store::Store;
use vmrig_vm::accel::AccelChoice;

use crate::exit::{self, Reported};
use crate::runner::{self, Plan};
use crate::select::{self, Partition};
use crate::summary;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Test files to run, or directories (every *.toml in them).
    #[arg(required = true, value_name = "FILE|DIR")]
    pub files: Vec<PathBuf>,
    /// Output directory (serial logs, screenshots, events.jsonl); default ./vmrig-out/<test
    /// name>. With several tests, each gets <DIR>/<test name>.
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
    /// Keep each VM's state directory (disk overlay, sockets) after the run.
    #[arg(long, short = 'K')]
    pub keep_vm_state: bool,
    /// Boot every machine cold: neither start from boot snapshots nor save new ones.
    #[arg(long, env = "VMRIG_NO_SNAPSHOTS")]
    pub no_snapshots: bool,
    /// Save nothing when a test fails (by default every running machine's state and the
    /// network's go into <output>/failure-snapshot/, for `vmrig debug <output>`).
    #[arg(long, env = "VMRIG_NO_FAILURE_SNAPSHOTS")]
    pub no_failure_snapshots: bool,

    /// Accelerator: auto (KVM when it can boot a standard guest, else TCG), kvm or tcg.
    #[arg(long, default_value = "auto", value_parser = parse_accel)]
    pub accel: AccelChoice,
    /// Open a Python REPL with the test's machines instead of running the script.
    #[arg(short = 'I', long)]
    pub interactive: bool,
    /// Where the script fails (an exception, a timeout, Ctrl-C), keep the machines running
    /// and open the Python REPL there, with the failing frame's names; leaving it ends the
    /// run as failed. One test at a time.
    #[arg(long, conflicts_with = "interactive")]
    pub pause_on_failure: bool,
    /// The Python interpreter that runs the test script.
    #[arg(long, default_value = "python3", env = "VMRIG_PYTHON")]
    pub python: PathBuf,
    /// The QEMU system emulator.
    #[arg(long, default_value = "qemu-system-x86_64", env = "VMRIG_QEMU")]
    pub qemu: PathBuf,
    /// Run even when an identical run passed before (its result is cached).
    #[arg(long, env = "VMRIG_RERUN")]
    pub rerun: bool,
    /// Tests to run at once (default: by cores and free memory, counting each VM's memory
    /// and leaving 2 GiB for the host).
    #[arg(short = 'j', long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub jobs: Option<u16>,
    /// Run only shard K of N (CI sharding; tests are dealt by sorted name).
    #[arg(long, value_name = "K/N")]
    pub partition: Option<Partition>,
    /// Run only the tests whose name contains this text.
    #[arg(long, value_name = "SUBSTRING")]
    pub filter: Option<String>,
    /// Stop starting tests after the first failure (the rest are reported as skipped).
    #[arg(long)]
    pub fail_fast: bool,
    /// Write a JUnit XML report: one testcase per test and one per subtest.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Capture each VLAN's traffic into <output>/vlan<N>.pcap.
    #[arg(long)]
    pub capture: bool,
}

fn parse_accel(s: &str) -> Result<AccelChoice, String> {
    s.parse()
}

pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    let files = select::expand(&args.files)?;
    let specs = crate::build_cmd::load_specs(&files)?;
    let total = specs.len();
    let specs = select::filter(specs, args.filter.as_deref(), |s| &s.name);
    let specs = match args.partition {
        Some(p) => p.select(specs, |s| &s.name),
        None => specs,
    };
    if specs.is_empty() {
        eprintln!("vmrig: no test to run (0 of {total} selected)");
        return Ok(exit::OK);
    }
    if (args.interactive || args.pause_on_failure) && specs.len() > 1 {
        let what = if args.interactive {
            "interactive mode"
        } else {
            "--pause-on-failure"
        };
        eprintln!("error: {what} takes one test ({} selected)", specs.len());
        return Err(Reported(exit::USAGE).into());
    }
    // Before anything else: the scripts' static check (`vmrig check`), every file's
    // findings at once, in well under a second.
    crate::check_cmd::check_scripts(&specs, &args.python, false)?;
    // Before any image build: an output directory that cannot be made fails the run now,
    // not after minutes of building.
    let base_out = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from("vmrig-out"));
    check_output_dir(&base_out)?;
    let store = Store::open_default().context("failed to open the image store")?;
    let cache = ResultCache::in_store(store.root());
    let jobs = match args.jobs {
        Some(j) => usize::from(j),
        None => crate::jobs::default_jobs(
            crate::jobs::cores(),
            crate::jobs::available_memory_mib(),
            specs
                .iter()
                .map(crate::jobs::test_memory_mib)
                .max()
                .unwrap_or(0),
        ),
    };
    let plan = Plan {
        options: RunOptions {
            out_dir: args.output.clone(),
            keep_vm_state: args.keep_vm_state,
            accel: args.accel,
            mode: if args.interactive {
                Mode::Interactive
            } else if args.pause_on_failure {
                Mode::PauseOnFailure
            } else {
                Mode::Script
            },
            python: args.python.clone(),
            qemu: args.qemu.clone(),
            reporters: Vec::new(),
            terminal_log: true,
            capture: args.capture,
            snapshots: !args.no_snapshots,
            remote_cache: crate::cache_cmd::remote(),
            failure_snapshots: !args.no_failure_snapshots,
        },
        store,
        cache,
        // A cached pass makes no pcap and keeps no VM state: asking for them runs the test.
        use_cache: !args.interactive
            && !args.pause_on_failure
            && !args.rerun
            && !args.capture
            && !args.keep_vm_state,
        record_cache: !args.interactive,
        jobs,
        fail_fast: args.fail_fast,
        junit: args.junit.clone(),
        per_test_dirs: specs.len() > 1,
    };
    let results = runner::run_all(&specs, &plan);
    if results.len() > 1 {
        println!("{}", summary::table(&results, std::time::SystemTime::now()));
    }
    Ok(summary::exit_code(&results))
}

/// Fails when `dir` cannot be created or written: a part of it is a file, or no directory
/// can be made in the nearest existing one (read-only file system, permissions, `/proc`).
/// Leaves nothing behind.
fn check_output_dir(dir: &Path) -> Result<(), OutputDirError> {
    let Some(existing) = dir
        .ancestors()
        .find(|p| p.as_os_str().is_empty() || p.exists())
    else {
        return Ok(());
    };
    let existing = if existing.as_os_str().is_empty() {
        Path::new(".")
    } else {
        existing
    };
    let fail = |cause| OutputDirError {
        dir: dir.to_owned(),
        existing: existing.to_owned(),
        cause,
    };
    if !existing.is_dir() {
        return Err(fail(None));
    }
    // A probe of our own (not the directory itself, which a concurrent run may be making):
    // catches read-only file systems and the like even for root, who passes `access(2)`.
    let probe = existing.join(format!(".vmrig-probe-{}", std::process::id()));
    match std::fs::create_dir(&probe) {
        Ok(()) => {
            let _ = std::fs::remove_dir(&probe);
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(fail(Some(e))),
    }
    Ok(())
}

/// An output directory that cannot be made: `existing`, the nearest part of it that
/// exists, is not a directory (`cause` is `None`), or no directory can be made in it.
#[derive(Debug)]
pub struct OutputDirError {
    dir: PathBuf,
    existing: PathBuf,
    cause: Option<std::io::Error>,
}

impl OutputDirError {
    /// A full disk (where the output directory would be), else the host's problem.
    pub fn kind(&self) -> vmrig_driver::ErrorKind {
        match &self.cause {
            Some(e) if vmrig_store::is_disk_full(e) => {
                vmrig_driver::ErrorKind::DiskFull(vmrig_store::DiskFull::at(&self.dir))
            }
            _ => vmrig_driver::ErrorKind::Host,
        }
    }
}

impl std::fmt::Display for OutputDirError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot create the output directory {}: ",
            self.dir.display()
        )?;
        match &self.cause {
            None => write!(f, "{} is not a directory", self.existing.display())?,
            Some(e) => write!(
                f,
                "cannot make a directory in {} ({e})",
                self.existing.display()
            )?,
        }
        write!(f, "; choose another with `-o DIR`")
    }
}

impl std::error::Error for OutputDirError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// `vmrig interactive FILE`: the same as `vmrig run -I FILE`.
#[derive(Debug, Args)]
pub struct InteractiveArgs {
    /// The test file whose machines to drive from a Python REPL.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Keep each VM's state directory (disk overlay, sockets) after the session.
    #[arg(long, short = 'K')]
    pub keep_vm_state: bool,
    /// Output directory; default ./vmrig-out/<test name>.
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
    /// Accelerator: auto, kvm or tcg.
    #[arg(long, default_value = "auto", value_parser = parse_accel)]
    pub accel: AccelChoice,
    /// The Python interpreter.
    #[arg(long, default_value = "python3", env = "VMRIG_PYTHON")]
    pub python: PathBuf,
    /// The QEMU system emulator.
    #[arg(long, default_value = "qemu-system-x86_64", env = "VMRIG_QEMU")]
    pub qemu: PathBuf,
}

impl From<InteractiveArgs> for RunArgs {
    fn from(a: InteractiveArgs) -> RunArgs {
        RunArgs {
            files: vec![a.file],
            output: a.output,
            keep_vm_state: a.keep_vm_state,
            accel: a.accel,
            interactive: true,
            pause_on_failure: false,
            python: a.python,
            qemu: a.qemu,
            rerun: true,
            jobs: Some(1),
            partition: None,
            filter: None,
            fail_fast: false,
            junit: None,
            capture: false,
            no_snapshots: false,
            no_failure_snapshots: false,
        }
    }
}
