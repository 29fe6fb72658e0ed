//! `vmrig check FILE...`: the test files and their scripts checked with nothing built or
//! booted (`vmrig run` does the same first). The check itself is the library's
//! (`vmrig_python::check_script`, through `vmrig_driver::driver::checked_python`).

use std::path::{Path, PathBuf};

use clap::Args;
use vmrig_driver::driver::{checked_python, spec_names};
use vmrig_driver::{ErrorKind, RunError};
use vmrig_spec::TestSpec;

use crate::exit::{self, Reported};

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Test files to check, or directories (every *.toml in them).
    #[arg(required = true, value_name = "FILE|DIR")]
    pub files: Vec<PathBuf>,
    /// The Python interpreter whose `ast` and `symtable` read the scripts.
    #[arg(long, default_value = "python3", env = "VMRIG_PYTHON")]
    pub python: PathBuf,
}

pub fn run(args: CheckArgs) -> anyhow::Result<i32> {
    let files = crate::select::expand(&args.files)?;
    let specs = crate::build_cmd::load_specs(&files)?;
    check_scripts(&specs, &args.python, true)?;
    for spec in &specs {
        println!("{}: ok", spec.path.display());
    }
    Ok(exit::OK)
}

/// Checks every script of `specs` and shows every finding of every file; exit code 2 when
/// there are any. An error that is not the test's (Python missing or too old) is returned
/// with `host_errors`; without, it ends the check without a word (`vmrig run`: each test's
/// run reports it where it always did).
pub fn check_scripts(specs: &[TestSpec], python: &Path, host_errors: bool) -> anyhow::Result<()> {
    let mut failed = false;
    for spec in specs {
        match checked_python(python, &spec.script, &spec_names(spec)) {
            Ok(_) => {}
            Err(RunError::Script(vmrig_python::ScriptError::Findings(found))) => {
                for finding in &found.0 {
                    eprintln!("error: {finding}");
                }
                failed = true;
            }
            Err(e) if e.kind() == ErrorKind::TestInput => {
                eprintln!("error: {e}");
                failed = true;
            }
            // Python missing or too old: every run of `specs` will say so, per test, as a
            // run always did (exit 4).
            Err(_) if !failed && !host_errors => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    if failed {
        return Err(Reported(exit::USAGE).into());
    }
    Ok(())
}
