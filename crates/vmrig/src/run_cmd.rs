//! `vmrig run` (written by the lead).
use clap::Args;
#[derive(Debug, Args)]
pub struct RunArgs { /// Test files to run.
    pub files: Vec<std::path::PathBuf> }
pub fn run(_args: RunArgs) -> anyhow::Result<i32> { anyhow::bail!("vmrig run is not wired yet") }
