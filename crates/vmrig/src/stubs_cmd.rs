//! `vmrig stubs DIR [FILE]`: typed stubs of the test-script API for editors and type
//! checkers, generated from the embedded module (`vmrig_python::write_stubs`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::exit;

#[derive(Debug, Args)]
pub struct StubsArgs {
    /// Where to write vmrig_driver.pyi, vmrig_globals.pyi and __builtins__.pyi (made if
    /// missing).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// A test file: its machines and VLANs become typed globals too.
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// The Python interpreter that reads the API.
    #[arg(long, default_value = "python3", env = "VMRIG_PYTHON")]
    pub python: PathBuf,
}

pub fn run(args: StubsArgs) -> anyhow::Result<i32> {
    let names = match &args.file {
        Some(file) => {
            let spec = crate::build_cmd::load_specs(std::slice::from_ref(file))?;
            Some(vmrig_driver::driver::spec_names(&spec[0]))
        }
        None => None,
    };
    let written = vmrig_python::write_stubs(&args.python, &args.dir, names.as_ref())
        .with_context(|| format!("writing the stubs into {}", args.dir.display()))?;
    for path in written {
        println!("{}", path.display());
    }
    Ok(exit::OK)
}
