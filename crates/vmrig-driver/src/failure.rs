//! Failure snapshots: when a test fails, every running machine's state (memory and disk)
//! and the network's (blocked links, loss, delay, partitions) are saved into
//! `<out>/failure-snapshot/`, so that `vmrig debug <out>` can put everything back as it was
//! at the failure (`debug.rs`).
//!
//! A machine is saved as a boot snapshot is (`Vm::save_state`: the migration stream
//! `state`, its disk layer `disk.qcow2`, `console.log`), plus the initrd it booted (the
//! node's layer is in it; QEMU's command line names it). The disk layer stays backed by
//! the store (the root image, or a boot snapshot's disk), so the store paths it needs are
//! listed and checked before a restore.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Bumped when what a failure snapshot holds or how it is restored changes.
pub const FORMAT: &str = "vmrig-failure-snapshot-1";
/// The directory in the output directory.
pub const DIR_NAME: &str = "failure-snapshot";
/// The manifest in it.
pub const MANIFEST: &str = "manifest.json";
/// The copy of the test file in it.
pub const TEST_COPY: &str = "test.toml";
/// Turns failure snapshots off for `vmrig run` (as `--no-failure-snapshots`).
pub const ENV_OFF: &str = "VMRIG_NO_FAILURE_SNAPSHOTS";

/// What the script did to the network, as it stands (re-applied after a restore).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetState {
    /// Packet loss in percent, by VLAN (VLANs without loss are not listed).
    pub loss_percent: BTreeMap<u8, f64>,
    /// Added delay in milliseconds, by VLAN (VLANs without delay are not listed).
    pub delay_ms: BTreeMap<u8, f64>,
    /// Partitions in force (`partition(a, b)` calls since the last `heal()`).
    pub partitions: Vec<(Vec<String>, Vec<String>)>,
    /// Machines whose links are down (`block()`).
    pub blocked: BTreeSet<String>,
}

impl NetState {
    pub fn set_loss(&mut self, vlan: u8, percent: f64) {
        if percent > 0.0 {
            self.loss_percent.insert(vlan, percent);
        } else {
            self.loss_percent.remove(&vlan);
        }
    }

    pub fn set_delay(&mut self, vlan: u8, ms: f64) {
        if ms > 0.0 {
            self.delay_ms.insert(vlan, ms);
        } else {
            self.delay_ms.remove(&vlan);
        }
    }

    pub fn set_blocked(&mut self, machine: &str, blocked: bool) {
        if blocked {
            self.blocked.insert(machine.to_owned());
        } else {
            self.blocked.remove(machine);
        }
    }

    pub fn is_default(&self) -> bool {
        *self == NetState::default()
    }

    /// One line for the log: "blocked: client; VLAN 1: loss 20%, delay 5 ms; partition [a] | [b]".
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.blocked.is_empty() {
            let names: Vec<&str> = self.blocked.iter().map(|s| s.as_str()).collect();
            parts.push(format!("blocked: {}", names.join(", ")));
        }
        let vlans: BTreeSet<u8> = self
            .loss_percent
            .keys()
            .chain(self.delay_ms.keys())
            .copied()
            .collect();
        for nr in vlans {
            let mut what = Vec::new();
            if let Some(p) = self.loss_percent.get(&nr) {
                what.push(format!("loss {p}%"));
            }
            if let Some(ms) = self.delay_ms.get(&nr) {
                what.push(format!("delay {ms} ms"));
            }
            parts.push(format!("VLAN {nr}: {}", what.join(", ")));
        }
        for (a, b) in &self.partitions {
            parts.push(format!("partition {a:?} | {b:?}"));
        }
        if parts.is_empty() {
            "as the test started".into()
        } else {
            parts.join("; ")
        }
    }
}

/// One saved machine: its files are in `<snapshot>/<name>/` (`state`, `disk.qcow2`,
/// `console.log`, `initrd`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedMachine {
    pub name: String,
    /// What the disk layer is backed by (in the store).
    pub backing: PathBuf,
    /// Its format (`raw` for a root image, `qcow2` for a boot snapshot's disk).
    pub backing_format: String,
    /// QEMU's command line options that the test file does not decide.
    pub allow_reboot: bool,
    pub forwards: Vec<(u16, u16)>,
    /// Bytes saved and how long the save took.
    pub bytes: u64,
    pub save_seconds: f64,
}

/// A machine that was running at the failure and could not be saved (it boots afresh in
/// `vmrig debug`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkippedMachine {
    pub name: String,
    pub why: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub vmrig_version: String,
    /// `qemu --version`'s first line: only the same QEMU restores a saved state.
    pub qemu_version: String,
    pub accel: String,
    /// The test file, as the run was given it; its copy is [`TEST_COPY`].
    pub test_file: PathBuf,
    /// Why the test failed (one line).
    pub failure: String,
    pub machines: Vec<SavedMachine>,
    pub skipped: Vec<SkippedMachine>,
    pub network: NetState,
    /// Store paths the restore needs (images, boot snapshots behind disk layers).
    pub store_paths: Vec<PathBuf>,
}

/// Why a failure snapshot cannot be debugged.
#[derive(Debug, thiserror::Error)]
pub enum FailureError {
    #[error(
        "{} holds no failure snapshot ({} is missing): a run saves one in its output \
         directory when its test fails (unless --no-failure-snapshots or {ENV_OFF} is set)",
        .dir.display(), .manifest.display()
    )]
    Missing { dir: PathBuf, manifest: PathBuf },
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a failure snapshot's manifest: {source}", .path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "this failure snapshot has format {found:?}, which vmrig {} cannot restore (it \
         restores {FORMAT:?}): run the test again to save a new one",
        env!("CARGO_PKG_VERSION")
    )]
    Format { found: String },
    #[error(
        "this failure snapshot was saved by vmrig {saved}; this is vmrig {current}, which \
         cannot restore it: debug it with vmrig {saved}, or run the test again to save a new one"
    )]
    VmrigVersion { saved: String, current: String },
    #[error(
        "this failure snapshot was saved with QEMU {saved:?}; {} is {current:?}, which \
         cannot restore it: name that QEMU with `--qemu PATH` (or VMRIG_QEMU), or run the \
         test again to save a new one",
        .qemu.display()
    )]
    QemuVersion {
        saved: String,
        current: String,
        qemu: PathBuf,
    },
    #[error(
        "this failure snapshot was saved under {saved}, and this host runs {current}: a \
         saved state loads only under the accelerator that saved it; run the test again here"
    )]
    Accel { saved: String, current: String },
    #[error(
        "store paths this failure snapshot needs are gone: {} ({}); run the test again to \
         save a new one",
        .paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
        gone_help(.paths, .test_file)
    )]
    StoreGone {
        paths: Vec<PathBuf>,
        test_file: PathBuf,
    },
    #[error(
        "the test file {} no longer describes the machines of this failure snapshot ({why}); \
         restore its saved copy {} or run the test again",
        .test_file.display(), .copy.display()
    )]
    TestChanged {
        test_file: PathBuf,
        copy: PathBuf,
        why: String,
    },
    #[error("writing the failure snapshot into {}: {source}", .dir.display())]
    Write {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn gone_help(paths: &[PathBuf], test_file: &Path) -> String {
    let snapshot = paths.iter().any(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains(crate::snapshot::NAME_PREFIX))
    });
    let build = format!(
        "`vmrig build {}` brings the images back",
        test_file.display()
    );
    if snapshot {
        format!("{build}, but not a boot snapshot (a `vmrig store gc` removed it?)")
    } else {
        build
    }
}

impl Manifest {
    /// Reads `<out>/failure-snapshot/manifest.json`.
    pub fn read(out_dir: &Path) -> Result<Manifest, FailureError> {
        let dir = out_dir.join(DIR_NAME);
        let path = dir.join(MANIFEST);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(FailureError::Missing {
                    dir: out_dir.to_owned(),
                    manifest: path,
                })
            }
            Err(source) => return Err(FailureError::Read { path, source }),
        };
        // The format first: a later format may not parse as this one.
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| FailureError::Corrupt {
                path: path.clone(),
                source,
            })?;
        let format = value.get("format").and_then(|f| f.as_str()).unwrap_or("");
        if format != FORMAT {
            return Err(FailureError::Format {
                found: format.to_owned(),
            });
        }
        serde_json::from_value(value).map_err(|source| FailureError::Corrupt { path, source })
    }

    /// Writes it into `dir` (the failure snapshot's directory).
    pub fn write(&self, dir: &Path) -> Result<(), FailureError> {
        let text = serde_json::to_string_pretty(self).expect("a manifest serializes");
        std::fs::write(dir.join(MANIFEST), text + "\n").map_err(|source| FailureError::Write {
            dir: dir.to_owned(),
            source,
        })
    }

    /// Whether this vmrig, with QEMU `qemu` (`qemu --version`'s first line `qemu_version`)
    /// under `accel`, can restore it.
    pub fn check(
        &self,
        qemu: &Path,
        qemu_version: &str,
        accel: vmrig_vm::accel::Accel,
    ) -> Result<(), FailureError> {
        let current = env!("CARGO_PKG_VERSION");
        if self.vmrig_version != current {
            return Err(FailureError::VmrigVersion {
                saved: self.vmrig_version.clone(),
                current: current.to_owned(),
            });
        }
        if self.qemu_version.trim() != qemu_version.trim() {
            return Err(FailureError::QemuVersion {
                saved: self.qemu_version.clone(),
                current: qemu_version.trim().to_owned(),
                qemu: qemu.to_owned(),
            });
        }
        if self.accel != accel.to_string() {
            return Err(FailureError::Accel {
                saved: self.accel.clone(),
                current: accel.to_string(),
            });
        }
        Ok(())
    }

    /// The store paths it needs that are gone.
    pub fn missing_store_paths(&self) -> Vec<PathBuf> {
        self.store_paths
            .iter()
            .filter(|p| !p.exists())
            .cloned()
            .collect()
    }

    /// Bytes saved in all.
    pub fn bytes(&self) -> u64 {
        self.machines.iter().map(|m| m.bytes).sum()
    }
}

/// What a run needs to know to save a failure snapshot (`DriverSetup::failure_snapshot`).
#[derive(Debug, Clone)]
pub struct SaveSetup {
    /// The test file (copied into the snapshot).
    pub test_file: PathBuf,
}

/// Saves a failure snapshot of every running machine of `handler` and its network into
/// `<out_dir>/failure-snapshot/`, logging each machine's size and time. A machine that
/// cannot be saved is left out with the reason (it boots afresh in `vmrig debug`).
pub fn save(
    handler: &crate::rpc::DriverHandler,
    setup: &SaveSetup,
    out_dir: &Path,
    qemu_version: &str,
    accel: vmrig_vm::accel::Accel,
    failure: &str,
) -> Result<Manifest, FailureError> {
    use crate::events::Level;
    let dir = out_dir.join(DIR_NAME);
    let write_err = |source| FailureError::Write {
        dir: dir.clone(),
        source,
    };
    let _ = vmrig_store::remove_all(&dir);
    std::fs::create_dir_all(&dir).map_err(write_err)?;
    std::fs::copy(&setup.test_file, dir.join(TEST_COPY)).map_err(write_err)?;
    let logger = &handler.logger;
    let started = std::time::Instant::now();
    let mut manifest = Manifest {
        format: FORMAT.into(),
        vmrig_version: env!("CARGO_PKG_VERSION").into(),
        qemu_version: qemu_version.trim().into(),
        accel: accel.to_string(),
        // Absolute: `vmrig debug` may run from another directory.
        test_file: std::path::absolute(&setup.test_file).unwrap_or(setup.test_file.clone()),
        failure: failure.to_owned(),
        machines: Vec::new(),
        skipped: Vec::new(),
        network: handler.net.lock().unwrap().clone(),
        store_paths: Vec::new(),
    };
    let id = logger.begin(
        crate::events::BlockKind::Nested,
        "saving a failure snapshot",
        None,
    );
    let machines: Vec<_> = handler.machines.read().unwrap().values().cloned().collect();
    for cell in machines {
        let mut m = cell.lock().unwrap();
        let name = m.name.clone();
        let mdir = dir.join(&name);
        let t = std::time::Instant::now();
        match m.save_failure_state(&mdir) {
            Ok(None) => {}
            Ok(Some(saved)) => {
                let bytes = dir_bytes(&mdir);
                let secs = t.elapsed().as_secs_f64();
                logger.log(
                    Level::Info,
                    format!("saved its state: {} in {secs:.1} s", human_bytes(bytes)),
                    Some(&name),
                );
                for p in saved.store_paths {
                    if !manifest.store_paths.contains(&p) {
                        manifest.store_paths.push(p);
                    }
                }
                manifest.machines.push(SavedMachine {
                    name,
                    backing: saved.backing.0,
                    backing_format: saved.backing.1.into(),
                    allow_reboot: saved.allow_reboot,
                    forwards: saved.forwards,
                    bytes,
                    save_seconds: secs,
                });
            }
            Err(why) => {
                let _ = vmrig_store::remove_all(&mdir);
                logger.log(
                    Level::Warning,
                    format!("not saved in the failure snapshot: {why}"),
                    Some(&name),
                );
                manifest.skipped.push(SkippedMachine { name, why });
            }
        }
    }
    manifest.write(&dir)?;
    logger.end(id, None);
    logger.log(
        Level::Info,
        format!(
            "failure snapshot: {} machine(s), {} in {:.1} s, in {}; restore it with `vmrig debug {}`",
            manifest.machines.len(),
            human_bytes(manifest.bytes()),
            started.elapsed().as_secs_f64(),
            dir.display(),
            out_dir.display()
        ),
        None,
    );
    Ok(manifest)
}

/// The bytes of the files in `dir` (not recursive: a machine's directory is flat).
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// "312.5 MiB".
pub fn human_bytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmrig_vm::accel::Accel;

    fn manifest() -> Manifest {
        let mut network = NetState::default();
        network.set_loss(1, 50.0);
        network.set_delay(2, 0.0);
        network.set_blocked("client", true);
        network
            .partitions
            .push((vec!["a".into()], vec!["b".into(), "c".into()]));
        Manifest {
            format: FORMAT.into(),
            vmrig_version: env!("CARGO_PKG_VERSION").into(),
            qemu_version: "QEMU emulator version 7.2.22".into(),
            accel: "tcg".into(),
            test_file: "/tests/t.toml".into(),
            failure: "t.toml:3: AssertionError: boom".into(),
            machines: vec![SavedMachine {
                name: "server".into(),
                backing: "/store/abc-rootfs-trixie/root.img".into(),
                backing_format: "raw".into(),
                allow_reboot: false,
                forwards: vec![(8080, 80)],
                bytes: 123,
                save_seconds: 1.5,
            }],
            skipped: vec![SkippedMachine {
                name: "client".into(),
                why: "it had not finished booting".into(),
            }],
            network,
            store_paths: vec!["/store/abc-rootfs-trixie".into()],
        }
    }

    #[test]
    fn manifests_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest();
        std::fs::create_dir(dir.path().join(DIR_NAME)).unwrap();
        m.write(&dir.path().join(DIR_NAME)).unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap(), m);
        assert_eq!(m.network.delay_ms.len(), 0, "no delay is not recorded");
        assert_eq!(
            m.network.describe(),
            "blocked: client; VLAN 1: loss 50%; partition [\"a\"] | [\"b\", \"c\"]"
        );
        let mut healed = m.network.clone();
        healed.set_loss(1, 0.0);
        healed.set_blocked("client", false);
        healed.partitions.clear();
        assert!(healed.is_default());
    }

    #[test]
    fn only_the_same_vmrig_qemu_and_accelerator_restore() {
        let m = manifest();
        let qemu = Path::new("/usr/bin/qemu-system-x86_64");
        m.check(qemu, "QEMU emulator version 7.2.22\n", Accel::Tcg)
            .unwrap();
        let e = m
            .check(qemu, "QEMU emulator version 8.2.0", Accel::Tcg)
            .unwrap_err();
        assert!(matches!(e, FailureError::QemuVersion { .. }));
        assert_eq!(
            e.to_string(),
            "this failure snapshot was saved with QEMU \"QEMU emulator version 7.2.22\"; \
             /usr/bin/qemu-system-x86_64 is \"QEMU emulator version 8.2.0\", which cannot \
             restore it: name that QEMU with `--qemu PATH` (or VMRIG_QEMU), or run the test \
             again to save a new one"
        );
        let e = m
            .check(qemu, "QEMU emulator version 7.2.22", Accel::Kvm)
            .unwrap_err();
        assert!(matches!(e, FailureError::Accel { .. }), "{e}");
        let mut old = m.clone();
        old.vmrig_version = "0.0.1".into();
        let e = old
            .check(qemu, "QEMU emulator version 7.2.22", Accel::Tcg)
            .unwrap_err();
        assert!(e.to_string().contains("saved by vmrig 0.0.1"), "{e}");
    }

    #[test]
    fn missing_wrong_format_and_gone_paths_are_told() {
        let dir = tempfile::tempdir().unwrap();
        let e = Manifest::read(dir.path()).unwrap_err();
        assert!(matches!(e, FailureError::Missing { .. }), "{e}");
        std::fs::create_dir(dir.path().join(DIR_NAME)).unwrap();
        let path = dir.path().join(DIR_NAME).join(MANIFEST);
        std::fs::write(&path, r#"{"format": "vmrig-failure-snapshot-0"}"#).unwrap();
        let e = Manifest::read(dir.path()).unwrap_err();
        assert!(
            e.to_string().contains("\"vmrig-failure-snapshot-0\""),
            "{e}"
        );
        std::fs::write(&path, "not json").unwrap();
        assert!(matches!(
            Manifest::read(dir.path()).unwrap_err(),
            FailureError::Corrupt { .. }
        ));
        let m = manifest();
        assert_eq!(m.missing_store_paths(), m.store_paths);
        let e = FailureError::StoreGone {
            paths: vec!["/store/h-snapshot-server".into()],
            test_file: "t.toml".into(),
        };
        assert!(
            e.to_string()
                .contains("`vmrig build t.toml` brings the images back, but not a boot snapshot"),
            "{e}"
        );
    }
}
