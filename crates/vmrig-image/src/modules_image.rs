//! The kernel's modules as one read-only disk image (`modules.img` in the kernel's store
//! path): every module of the booted kernel is loadable (`modprobe wireguard`, sound,
//! device mapper, ...) without a copy in every root image. Built once per kernel; each VM
//! attaches it read-only (`cmdline.rs`), and the guest init mounts it on
//! `/lib/modules/<version>` (`/usr/lib/modules/<version>` on merged-/usr roots) before
//! systemd starts.
//!
//! ext4 without a journal: the initramfs already has ext4 (for the root), so nothing is
//! added to it; the image is sparse on the host.

use std::path::Path;
use std::process::Command;

use crate::run::run_tool;
use crate::{tools, BuildObserver, ImageError};

/// The image's file name in the kernel's store path.
pub const MODULES_IMAGE: &str = "modules.img";

/// The image's ext4 volume label; the guest init finds the disk by it
/// (`vmrig.modules=LABEL=vmrig-modules` on the kernel command line).
pub const MODULES_LABEL: &str = "vmrig-modules";

/// Writes `<kernel>/modules.img` from `<kernel>/lib/modules/<version>` (depmod's index
/// included).
pub fn write(
    kernel: &Path,
    version: &str,
    step: &str,
    observer: &dyn BuildObserver,
) -> Result<(), ImageError> {
    let src = kernel.join("lib/modules").join(version);
    let size_mib = size_mib(dir_size(&src));
    let mke2fs = tools::find_program("mke2fs").unwrap_or_else(|| "mke2fs".into());
    // As a normal user the modules are the caller's: seen as root's (uid 0 in the image)
    // from a user namespace where the caller is root.
    let mut cmd = if crate::run::is_root() {
        Command::new(mke2fs)
    } else {
        crate::run::as_owner(&mke2fs)
    };
    cmd.args(["-q", "-F", "-t", "ext4", "-L", MODULES_LABEL, "-m", "0"])
        .args(["-O", "^has_journal"])
        .args(["-E", "root_owner=0:0,lazy_itable_init=0"])
        .arg("-d")
        .arg(&src)
        .arg(kernel.join(MODULES_IMAGE))
        .arg(format!("{size_mib}M"));
    run_tool(&mut cmd, step, observer)?;
    Ok(())
}

/// The image size for `bytes` of files: an eighth more for ext4's metadata and per-file
/// block rounding, plus 32 MiB.
pub fn size_mib(bytes: u64) -> u64 {
    bytes / (1024 * 1024) * 9 / 8 + 32
}

/// The space the files under `dir` take in whole 4 KiB blocks (what an ext4 image made
/// from it needs, before metadata); also sizes root images.
pub(crate) fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                // Whole 4 KiB blocks per file.
                total += meta.len().div_ceil(4096) * 4096;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_holds_the_modules_tree() {
        if tools::find_program("mke2fs").is_none() || tools::find_program("debugfs").is_none() {
            vmrig_testkit::cannot_run("no mke2fs/debugfs (Debian package e2fsprogs)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let v = dir.path().join("lib/modules/6.1.0-test");
        std::fs::create_dir_all(v.join("kernel/net/wireguard")).unwrap();
        std::fs::write(v.join("kernel/net/wireguard/wireguard.ko"), b"\x7fELF").unwrap();
        std::fs::write(
            v.join("modules.dep"),
            "kernel/net/wireguard/wireguard.ko:\n",
        )
        .unwrap();
        write(dir.path(), "6.1.0-test", "test", &crate::Quiet).unwrap();
        let image = dir.path().join(MODULES_IMAGE);
        let out = Command::new(tools::find_program("debugfs").unwrap())
            .args(["-R", "ls -p /kernel/net/wireguard"])
            .arg(&image)
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(listing.contains("wireguard.ko"), "{listing}");
        let label = Command::new(tools::find_program("debugfs").unwrap())
            .args(["-R", "stats"])
            .arg(&image)
            .output()
            .unwrap();
        let stats = String::from_utf8_lossy(&label.stdout);
        assert!(
            stats.contains(&format!("Filesystem volume name:   {MODULES_LABEL}")),
            "{stats}"
        );
        assert!(!stats.contains("has_journal"), "{stats}");
    }

    #[test]
    fn size_leaves_room_for_metadata() {
        assert_eq!(size_mib(0), 32);
        assert_eq!(size_mib(400 * 1024 * 1024), 482);
    }
}
