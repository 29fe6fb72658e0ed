//! The kernel store path: Debian's `linux-image-amd64` unpacked with
//! `mmdebstrap --variant=extract` (no maintainer scripts run), then `depmod` over it.
//!
//! Layout: `vmlinuz`, `version`, `lib/modules/<version>/...` (with `modules.dep` etc.;
//! from `usr/lib/modules` on merged-/usr suites), and `modules.img`, the modules as a
//! read-only disk image for the VMs ([`crate::modules_image`]).

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
    // As a normal user mmdebstrap (unshare mode) works where its namespace can reach.
    let scratch = (!crate::run::is_root())
        .then(|| crate::run::Scratch::new(out))
        .transpose()?;
    let work = scratch.as_ref().map_or(out, |s| s.path());
    let unpacked = work.join("extract");
    let mut cmd = Command::new("mmdebstrap");
    cmd.env("TMPDIR", work)
        .arg("--variant=extract")
        .arg(format!("--include={KERNEL_PACKAGE}"))
        .arg(suite)
        .arg(&unpacked);
    cmd.args(mirror);
    run_tool(&mut cmd, step, b.observer)?;
    crate::run::reclaim(&unpacked, step, b.observer)?;

    let vmlinuz = only_entry(&unpacked.join("boot"), "vmlinuz-", "vmlinuz")?;
    let modules_root = modules_root(&unpacked);
    let version_dir = only_entry(&modules_root, "", "lib/modules/<version>")?;
    let version = version_dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    crate::run::move_path(&vmlinuz, &out.join("vmlinuz"))?;
    unpack_vmlinux(&out.join("vmlinuz"), &out.join("vmlinux"))?;
    std::fs::create_dir_all(out.join("lib/modules"))
        .map_err(ImageError::io("creating lib/modules"))?;
    crate::run::move_path(&version_dir, &out.join("lib/modules").join(&version))?;
    std::fs::remove_dir_all(&unpacked)
        .map_err(ImageError::io("removing the unpacked kernel package"))?;
    std::fs::write(out.join("version"), &version).map_err(ImageError::io("writing version"))?;

    let mut depmod =
        Command::new(crate::tools::find_program("depmod").unwrap_or_else(|| "depmod".into()));
    depmod.arg("-b").arg(out).arg(&version);
    run_tool(&mut depmod, step, b.observer)?;
    crate::modules_image::write(out, &version, step, b.observer)?;
    Ok(())
}

/// Where an unpacked kernel package keeps its modules: `usr/lib/modules` on merged-/usr
/// suites (Debian 13 and later), else `lib/modules`.
fn modules_root(unpacked: &Path) -> PathBuf {
    let merged = unpacked.join("usr/lib/modules");
    if merged.is_dir() {
        merged
    } else {
        unpacked.join("lib/modules")
    }
}

/// Writes the uncompressed kernel (`vmlinux`, an ELF that QEMU boots through PVH) next to
/// the bzImage: the kernel's own XZ decompression costs about 3 s of every boot under TCG.
/// Nothing is written when the bzImage's payload is not XZ; the driver then boots `vmlinuz`.
fn unpack_vmlinux(bzimage: &Path, out: &Path) -> Result<(), ImageError> {
    let image = std::fs::read(bzimage).map_err(ImageError::io("reading vmlinuz"))?;
    let Some(payload) = bzimage_payload(&image) else {
        return Ok(());
    };
    if !payload.starts_with(b"\xfd7zXZ\0") {
        return Ok(());
    }
    // Without xz (xz-utils) the kernel still boots, compressed.
    let Ok(mut child) = vmrig_vm::process::command("xz")
        .args(["-dc", "--single-stream"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
    else {
        return Ok(());
    };
    let mut stdin = child.stdin.take().expect("piped");
    let data = payload.to_vec();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let _ = stdin.write_all(&data);
    });
    let output = child
        .wait_with_output()
        .map_err(ImageError::io("running xz"))?;
    let _ = writer.join();
    if output.status.success() && output.stdout.starts_with(b"\x7fELF") {
        std::fs::write(out, &output.stdout).map_err(ImageError::io("writing vmlinux"))?;
    }
    Ok(())
}

/// The compressed payload of a bzImage (boot protocol >= 2.08: `payload_offset` and
/// `payload_length` at 0x248/0x24c, relative to the protected-mode code).
pub fn bzimage_payload(image: &[u8]) -> Option<&[u8]> {
    let word = |at: usize| {
        image
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let setup_sects = match *image.get(0x1f1)? {
        0 => 4,
        n => n as usize,
    };
    let start = (setup_sects + 1) * 512 + word(0x248)?;
    image.get(start..start + word(0x24c)?)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bzimage(setup_sects: u8, payload_offset: u32, payload: &[u8]) -> Vec<u8> {
        let start = (if setup_sects == 0 {
            4
        } else {
            setup_sects as usize
        } + 1)
            * 512;
        let mut image = vec![0u8; start + payload_offset as usize + payload.len() + 16];
        image[0x1f1] = setup_sects;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x248..0x24c].copy_from_slice(&payload_offset.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        let at = start + payload_offset as usize;
        image[at..at + payload.len()].copy_from_slice(payload);
        image
    }

    #[test]
    fn modules_are_found_under_lib_or_usr_lib() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(modules_root(dir.path()), dir.path().join("lib/modules"));
        std::fs::create_dir_all(dir.path().join("usr/lib/modules/6.12.0-test")).unwrap();
        assert_eq!(modules_root(dir.path()), dir.path().join("usr/lib/modules"));
    }

    #[test]
    fn payload_is_found_from_the_boot_header() {
        let image = bzimage(30, 0x3c0, b"\xfd7zXZ\0payload");
        assert_eq!(bzimage_payload(&image), Some(&b"\xfd7zXZ\0payload"[..]));
        // setup_sects 0 means 4.
        let image = bzimage(0, 16, b"abc");
        assert_eq!(bzimage_payload(&image), Some(&b"abc"[..]));
    }

    #[test]
    fn not_a_bzimage_or_truncated_gives_none() {
        assert_eq!(bzimage_payload(b"short"), None);
        let mut image = bzimage(30, 0, b"abc");
        image[0x202] = b'X';
        assert_eq!(bzimage_payload(&image), None);
        let mut image = bzimage(30, 0, b"abc");
        image[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(bzimage_payload(&image), None);
    }
}
