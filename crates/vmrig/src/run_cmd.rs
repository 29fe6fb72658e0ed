//! `vmrig run`: build images, boot the machines, run each test's script.

use std::path::PathBuf;

use clap::Args;
use vmrig_driver::{RunError, RunOptions};
use vmrig_python::Mode;
use vmrig_vm::accel::AccelChoice;

use crate::exit::{self, Reported};
use crate::progress::Progress;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Test files to run.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Output directory (serial logs, screenshots, events.jsonl); default ./vmrig-out/<test name>.
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
    /// Keep each VM's state directory (disk overlay, sockets) after the run.
    #[arg(long, short = 'K')]
    pub keep_vm_state: bool,
    /// Accelerator: auto (KVM when it can boot a standard guest, else TCG), kvm or tcg.
    #[arg(long, default_value = "auto", value_parser = parse_accel)]
    pub accel: AccelChoice,
    /// Open a Python REPL with the test's machines instead of running the script.
    #[arg(short = 'I', long)]
    pub interactive: bool,
    /// The Python interpreter that runs the test script.
    #[arg(long, default_value = "python3", env = "VMRIG_PYTHON")]
    pub python: PathBuf,
    /// The QEMU system emulator.
    #[arg(long, default_value = "qemu-system-x86_64", env = "VMRIG_QEMU")]
    pub qemu: PathBuf,
}

fn parse_accel(s: &str) -> Result<AccelChoice, String> {
    s.parse()
}

pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    let specs = crate::build_cmd::load_specs(&args.files)?;
    let mut failed = 0;
    for spec in &specs {
        let out_dir = match (&args.output, specs.len()) {
            (Some(dir), 1) => Some(dir.clone()),
            (Some(dir), _) => Some(dir.join(&spec.name)),
            (None, _) => None,
        };
        let opts = RunOptions {
            out_dir,
            keep_vm_state: args.keep_vm_state,
            accel: args.accel,
            mode: if args.interactive {
                Mode::Interactive
            } else {
                Mode::Script
            },
            python: args.python.clone(),
            qemu: args.qemu.clone(),
            reporters: Vec::new(),
            terminal_log: true,
        };
        let progress = Progress::new(crate::verbosity() > 0);
        let result = vmrig_driver::run_test(spec, &opts, &progress);
        drop(progress);
        match result {
            Ok(outcome) if outcome.passed => {}
            Ok(_) => failed += 1,
            Err(RunError::Image(e)) => {
                return Err(
                    anyhow::Error::new(e).context(format!("building the images of {}", spec.name))
                )
            }
            Err(RunError::Script(e)) => {
                eprintln!("error: {e}");
                return Err(Reported(exit::USAGE).into());
            }
            Err(e) => anyhow::bail!("{}: {e}", spec.name),
        }
    }
    if specs.len() > 1 {
        eprintln!(
            "vmrig: {} of {} tests passed",
            specs.len() - failed,
            specs.len()
        );
    }
    Ok(if failed > 0 { exit::TEST_FAILED } else { 0 })
}
