//! Boot snapshots: the first time a node is ready, its VM state is saved into the store;
//! later runs of an identical node start from it instead of booting.
//!
//! The key is everything that decides the guest's state at that point: the QEMU command
//! line (with the run directory's paths made neutral), the exact initrd (image plus the
//! per-node layer), QEMU's version, the accelerator and vmrig's version. A snapshot path
//! holds `state` (QEMU's migration stream) and `disk.qcow2` (the VM's disk layer at that
//! instant, backed by the store's root image); a restored VM gets its own writable layer
//! on top of that.

use std::path::Path;

use sha2::{Digest, Sha256};
use vmrig_store::StoreKey;
use vmrig_vm::cmdline::{qemu_args, VmConfig};

/// Bumped when what a snapshot contains or how it is restored changes.
pub const SNAPSHOT_FORMAT: &str = "vmrig-snapshot-2";

/// What the store names of snapshots start with (`vmrig store gc --snapshots`).
pub const NAME_PREFIX: &str = "snapshot-";

/// The store key of the snapshot of a VM started with `cfg` (whose `incoming` is unset)
/// in `run_dir`; `inputs` names what the command line does not show (the initrd's
/// contents, the root image behind the disk layer).
pub fn snapshot_key(cfg: &VmConfig, run_dir: &Path, inputs: &str, qemu_version: &str) -> StoreKey {
    let run = run_dir.to_string_lossy();
    let argv: Vec<String> = qemu_args(cfg)
        .iter()
        .map(|a| a.to_string_lossy().replace(run.as_ref(), "<run>"))
        .collect();
    let material = format!(
        "{SNAPSHOT_FORMAT}\nvmrig {}\n{}\n{inputs}\n{}",
        env!("CARGO_PKG_VERSION"),
        qemu_version.trim(),
        argv.join("\n")
    );
    StoreKey::new(&format!("{NAME_PREFIX}{}", cfg.name), material.as_bytes())
}

/// sha256 of a file, hex.
pub fn file_hash(path: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(path)?;
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// The guest command that sets the clock to the host's after a restore.
pub fn set_clock_command(now: std::time::SystemTime) -> String {
    let d = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "date -u -s @{}.{:06} >/dev/null",
        d.as_secs(),
        d.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmrig_vm::accel::Accel;

    fn cfg(run: &str) -> VmConfig {
        VmConfig {
            name: "server".into(),
            accel: Accel::Tcg,
            memory_mib: 1024,
            cpus: 1,
            kernel: "/store/k/vmlinuz".into(),
            initrd: format!("{run}/server/initrd").into(),
            disk: format!("{run}/server/disk.qcow2").into(),
            modules_disk: None,
            kernel_params: vec![],
            shell_socket: format!("{run}/server/shell.sock").into(),
            qmp_socket: format!("{run}/server/qmp.sock").into(),
            vlans: vec![],
            graphics: false,
            firmware: None,
            allow_reboot: false,
            forwards: vec![],
            incoming: None,
        }
    }

    #[test]
    fn key_ignores_the_run_directory_but_not_the_machine() {
        let a = snapshot_key(
            &cfg("/tmp/vmrig-run-1-aaa"),
            Path::new("/tmp/vmrig-run-1-aaa"),
            "h",
            "QEMU 7.2",
        );
        let b = snapshot_key(
            &cfg("/tmp/vmrig-run-2-bbb"),
            Path::new("/tmp/vmrig-run-2-bbb"),
            "h",
            "QEMU 7.2",
        );
        assert_eq!(a, b);
        let mut bigger = cfg("/tmp/r");
        bigger.memory_mib = 2048;
        assert_ne!(
            a,
            snapshot_key(&bigger, Path::new("/tmp/r"), "h", "QEMU 7.2")
        );
        assert_ne!(
            a,
            snapshot_key(
                &cfg("/tmp/r"),
                Path::new("/tmp/r"),
                "other layer",
                "QEMU 7.2"
            )
        );
        assert_ne!(
            a,
            snapshot_key(&cfg("/tmp/r"), Path::new("/tmp/r"), "h", "QEMU 8.0")
        );
        let mut reboot = cfg("/tmp/r");
        reboot.allow_reboot = true;
        assert_ne!(
            a,
            snapshot_key(&reboot, Path::new("/tmp/r"), "h", "QEMU 7.2")
        );
        assert_eq!(a.name(), "snapshot-server");
    }

    #[test]
    fn clock_command_has_microseconds() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(
            set_clock_command(t),
            "date -u -s @1700000000.123456 >/dev/null"
        );
    }
}
