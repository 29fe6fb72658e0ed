//! `vmrig debug DIR [-c CODE]`: restore a failed run's machines and network from the
//! failure snapshot in its output directory (`vmrig_driver::debug`), then the REPL or CODE.

use std::path::PathBuf;

use clap::Args;
use vmrig_driver::debug::{debug, DebugOptions};

use crate::exit;

#[derive(Debug, Args)]
pub struct DebugArgs {
    /// The output directory of the failed run (it holds `failure-snapshot/`).
    #[arg(value_name = "OUT_DIR")]
    pub dir: PathBuf,
    /// Run CODE (Python, with the test's globals) instead of opening the REPL: exit 0 if
    /// it passes, 1 if it raises.
    #[arg(short = 'c', value_name = "CODE")]
    pub code: Option<String>,
    /// The Python interpreter.
    #[arg(long, default_value = "python3", env = "VMRIG_PYTHON")]
    pub python: PathBuf,
    /// The QEMU system emulator (the version that saved the snapshot).
    #[arg(long, default_value = "qemu-system-x86_64", env = "VMRIG_QEMU")]
    pub qemu: PathBuf,
}

pub fn run(args: DebugArgs) -> anyhow::Result<i32> {
    let opts = DebugOptions {
        python: args.python,
        qemu: args.qemu,
        code: args.code,
        terminal_log: true,
    };
    let outcome = debug(&args.dir, &opts)?;
    eprintln!(
        "vmrig debug: restored in {:.1} s, ended after {:.1} s",
        outcome.restored_after.as_secs_f64(),
        outcome.elapsed.as_secs_f64()
    );
    Ok(match outcome.failure {
        None => exit::OK,
        Some(_) => exit::TEST_FAILED,
    })
}
