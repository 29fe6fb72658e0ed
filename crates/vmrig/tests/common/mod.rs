//! What the real-VM test files share: running the `vmrig` binary and checking that a run
//! left nothing behind.
#![allow(dead_code)] // each test file uses a different part

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root (examples are relative to it).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `vmrig` run from the repository root with its own `TMPDIR` (run directories land there).
pub fn command(tmp: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmrig"));
    cmd.current_dir(repo())
        .env("TMPDIR", tmp)
        .env("NO_COLOR", "1");
    cmd
}

/// Stdout and stderr together.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// QEMU processes whose command line mentions `dir` (their sockets live there).
pub fn qemu_pids_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.contains("qemu-system") && cmdline.contains(&needle)
        })
        .collect()
}

/// Run directories (`vmrig-run-*`) in `tmp`.
pub fn run_dirs(tmp: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(tmp)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vmrig-run-")
        })
        .collect()
}

/// No run directory and no QEMU left from runs that used `tmp`.
pub fn assert_no_leftovers(tmp: &Path) {
    assert!(
        run_dirs(tmp).is_empty(),
        "run dirs left: {:?}",
        run_dirs(tmp)
    );
    assert!(qemu_pids_under(tmp).is_empty(), "QEMU left running");
}
