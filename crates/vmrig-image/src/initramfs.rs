//! The initramfs store path: one uncompressed newc cpio (`initrd`) holding the static guest
//! init as `/init`, the kernel modules it loads, and `/etc/vmrig/modules`, the load order.
//!
//! Uncompressed on purpose: the kernel unpacks it faster than it could decompress, and the
//! per-node layer is another cpio appended to it at test start.

use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};
use vmrig_store::{StoreKey, StorePath};

use crate::cpio_writer::CpioWriter;
use crate::modules::{ModuleIndex, GUEST_MODULES};
use crate::{ImageBuilder, ImageError, BUILDER_VERSION, GUEST_INIT};

/// Builds or finds the initramfs for `kernel`.
pub fn build(b: &ImageBuilder, kernel: &StorePath) -> Result<StorePath, ImageError> {
    b.cached_step("initramfs", &key(kernel), |out| {
        write_initramfs(kernel.path(), out)
    })
}

/// The store key of the initramfs for `kernel` (named by hash: kernels of one suite from
/// two mirrors differ).
pub fn key(kernel: &StorePath) -> StoreKey {
    let init_hash = hex::encode(Sha256::digest(GUEST_INIT));
    let material = format!(
        "{BUILDER_VERSION}\ninitramfs\nuncompressed modules\n{}\n{init_hash}\n{}",
        kernel.base_name(),
        GUEST_MODULES.join(",")
    );
    StoreKey::new("initramfs", material.as_bytes())
}

fn write_initramfs(kernel: &Path, out: &Path) -> Result<(), ImageError> {
    let version = std::fs::read_to_string(kernel.join("version"))
        .map_err(ImageError::io("reading the kernel version"))?;
    let modules_dir = kernel.join("lib/modules").join(version.trim());
    let read = |name: &str| std::fs::read_to_string(modules_dir.join(name)).unwrap_or_default();
    let index = ModuleIndex::parse(
        &read("modules.dep"),
        &read("modules.softdep"),
        &read("modules.alias"),
        &read("modules.builtin"),
    );
    let order = index.resolve(GUEST_MODULES)?;

    let file =
        std::fs::File::create(out.join("initrd")).map_err(ImageError::io("creating initrd"))?;
    let mut cpio = CpioWriter::new(std::io::BufWriter::new(file));
    let io = ImageError::io("writing initrd");
    (|| -> std::io::Result<()> {
        for dir in [
            "dev",
            "proc",
            "sys",
            "newroot",
            "etc",
            "etc/vmrig",
            "lib",
            "lib/modules",
        ] {
            cpio.dir(dir, 0o755)?;
        }
        cpio.char_device("dev/console", 0o600, 5, 1)?;
        cpio.file("init", 0o755, GUEST_INIT)?;
        let mut load_order = String::new();
        for rel in &order {
            let (rel, data) = uncompressed(rel, std::fs::read(modules_dir.join(rel))?)?;
            let target = format!("lib/modules/{rel}");
            cpio.parents(&target)?;
            cpio.file(&target, 0o644, &data)?;
            load_order.push_str(&format!("/{target}\n"));
        }
        cpio.file("etc/vmrig/modules", 0o644, load_order.as_bytes())?;
        cpio.finish()?.flush()
    })()
    .map_err(io)
}

/// A module as the guest init loads it: uncompressed. Debian 13 ships `.ko.xz` (and other
/// distributions `.ko.zst`/`.ko.gz`); the init's `init_module` takes ELF, so they are
/// decompressed here, once, and named `.ko`.
pub fn uncompressed(rel: &str, data: Vec<u8>) -> std::io::Result<(String, Vec<u8>)> {
    let tools: [(&str, &[&str]); 3] = [
        (".ko.xz", &["xz", "-dc"]),
        (".ko.zst", &["zstd", "-dcq"]),
        (".ko.gz", &["gzip", "-dc"]),
    ];
    let Some((suffix, argv)) = tools.iter().find(|(suffix, _)| rel.ends_with(suffix)) else {
        return Ok((rel.to_owned(), data));
    };
    let mut child = vmrig_vm::process::command(argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("running `{}` to decompress {rel}: {e}", argv[0]),
            )
        })?;
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let output = child.wait_with_output()?;
    let _ = writer.join();
    if !output.status.success() || !output.stdout.starts_with(b"\x7fELF") {
        return Err(std::io::Error::other(format!(
            "decompressing {rel} with `{}` failed ({})",
            argv[0], output.status
        )));
    }
    let name = format!("{}.ko", &rel[..rel.len() - suffix.len()]);
    Ok((name, output.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_modules_are_decompressed_and_renamed() {
        let elf = b"\x7fELF module".to_vec();
        assert_eq!(
            uncompressed("kernel/a.ko", elf.clone()).unwrap(),
            ("kernel/a.ko".to_string(), elf.clone())
        );
        let mut xz = std::process::Command::new("xz")
            .args(["-c"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        xz.stdin.take().unwrap().write_all(&elf).unwrap();
        let packed = xz.wait_with_output().unwrap().stdout;
        assert_eq!(
            uncompressed("kernel/fs/ext4/ext4.ko.xz", packed).unwrap(),
            ("kernel/fs/ext4/ext4.ko".to_string(), elf)
        );
        assert!(uncompressed("kernel/b.ko.xz", b"not xz".to_vec()).is_err());
    }
}
