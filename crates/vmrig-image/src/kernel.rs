//! The kernel store path: Debian's `linux-image-amd64` unpacked with
//! `mmdebstrap --variant=extract` (no maintainer scripts run), then `depmod` over it.
//!
//! Layout: `vmlinuz`, `version`, `lib/modules/<version>/...` (with `modules.dep` etc.).

use std::path::{Path, PathBuf};
use std::process::Command;

use vmrig_store::{StoreKey, StorePath};

use crate::run::run_tool;
use crate::{ImageBuilder, ImageError, BUILDER_VERSION};

/// The kernel package vmrig boots.
pub const KERNEL_PACKAGE: &str = "linux-image-amd64";

/// Builds or finds the kernel for `suite`.
pub fn build(b: &ImageBuilder, suite: &str, mirror: Option<&str>) -> Result<StorePath, ImageError> {
    let key = key(suite, mirror);
    let step = format!("kernel ({KERNEL_PACKAGE}, {suite})");
    b.cached_step(&step, &key, |out| extract(b, &step, suite, mirror, out))
}

/// The store key of the kernel for `suite` from `mirror`.
pub fn key(suite: &str, mirror: Option<&str>) -> StoreKey {
    let material = format!(
        "{BUILDER_VERSION}\nkernel\n{KERNEL_PACKAGE}\n{suite}\n{}",
        mirror.unwrap_or("")
    );
    StoreKey::new(&format!("kernel-{suite}"), material.as_bytes())
}

fn extract(
    b: &ImageBuilder,
    step: &str,
    suite: &str,
    mirror: Option<&str>,
    out: &Path,
) -> Result<(), ImageError> {
    let unpacked = out.join("extract");
    let mut cmd = Command::new("mmdebstrap");
    cmd.env("TMPDIR", out)
        .arg("--variant=extract")
        .arg(format!("--include={KERNEL_PACKAGE}"))
        .arg(suite)
        .arg(&unpacked);
    cmd.args(mirror);
    run_tool(&mut cmd, step, b.observer)?;

    let vmlinuz = only_entry(&unpacked.join("boot"), "vmlinuz-", "vmlinuz")?;
    let modules_root = unpacked.join("lib/modules");
    let version_dir = only_entry(&modules_root, "", "lib/modules/<version>")?;
    let version = version_dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    std::fs::rename(&vmlinuz, out.join("vmlinuz")).map_err(ImageError::io("moving vmlinuz"))?;
    std::fs::create_dir_all(out.join("lib/modules"))
        .map_err(ImageError::io("creating lib/modules"))?;
    std::fs::rename(&version_dir, out.join("lib/modules").join(&version))
        .map_err(ImageError::io("moving the kernel modules"))?;
    std::fs::remove_dir_all(&unpacked)
        .map_err(ImageError::io("removing the unpacked kernel package"))?;
    std::fs::write(out.join("version"), &version).map_err(ImageError::io("writing version"))?;

    let mut depmod =
        Command::new(crate::tools::find_program("depmod").unwrap_or_else(|| "depmod".into()));
    depmod.arg("-b").arg(out).arg(&version);
    run_tool(&mut depmod, step, b.observer)?;
    Ok(())
}

/// The single entry of `dir` whose name starts with `prefix`.
fn only_entry(dir: &Path, prefix: &str, what: &'static str) -> Result<PathBuf, ImageError> {
    let layout = || ImageError::KernelLayout {
        what,
        dir: dir.display().to_string(),
    };
    let mut found = std::fs::read_dir(dir)
        .map_err(|_| layout())?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        });
    found.next().ok_or_else(layout)
}

/// The kernel version of a kernel store path.
pub fn version(kernel: &StorePath) -> Result<String, ImageError> {
    std::fs::read_to_string(kernel.path().join("version"))
        .map(|v| v.trim().to_owned())
        .map_err(ImageError::io(format!(
            "reading {}/version",
            kernel.path().display()
        )))
}
