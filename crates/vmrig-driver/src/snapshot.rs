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
/// 3: the boot's console output is kept with the snapshot (`console.log`).
/// 4: the time-limited command frame changed (the watchdog reads a pipe the command holds);
///    a console example's snapshot saved by the earlier build did not answer after a restore.
pub const SNAPSHOT_FORMAT: &str = "vmrig-snapshot-4";

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

/// The snapshot of a machine started by a start script that vmrig wrote (`vmrig build
/// --start-scripts`): where its disk goes and the key. `None` when the script is not one
/// of vmrig's (real NixOS scripts boot cold: vmrig cannot see what they boot) or the run
/// decides where the disk goes (`NIX_DISK_IMAGE`).
#[derive(Debug, Clone)]
pub struct StartScriptSnapshot {
    pub key: StoreKey,
    /// The disk the script makes on first start (in the state directory).
    pub disk: std::path::PathBuf,
    pub qemu_img: std::path::PathBuf,
}

/// Keys a start command's boot snapshot: the script's text (which names the kernel and
/// root image by store path), the contents of the other files it names (its initrd), the
/// QEMU it runs and that QEMU's version, vmrig's version, the environment the script reads
/// (`QEMU_OPTS`, `QEMU_NET_OPTS`, `QEMU_KERNEL_PARAMS`, which VLANs have switches) and the
/// options the driver appends (`allow_reboot`, graphics), with the state directory made
/// neutral. `env` is what the driver adds to its own environment (`getenv`).
pub fn start_script_snapshot(
    command: &vmrig_vm::machine::StartCommand,
    getenv: &dyn Fn(&str) -> Option<String>,
) -> Option<StartScriptSnapshot> {
    use vmrig_vm::start_script::read_inputs;
    let script = Path::new(command.command.trim());
    let meta = std::fs::metadata(script).ok()?;
    if !meta.is_file() || meta.len() > 1024 * 1024 {
        return None;
    }
    let text = std::fs::read_to_string(script).ok()?;
    let inputs = read_inputs(&text)?;
    let value = |var: &str| {
        command
            .env
            .iter()
            .find(|(k, _)| k == var)
            .map(|(_, v)| v.clone())
            .or_else(|| getenv(var))
    };
    if value("NIX_DISK_IMAGE").is_some() {
        return None;
    }
    // The same script written into another directory (every `vmrig build
    // --start-scripts DIR`) boots the same machine: its comments (which name where it came
    // from) and its own directory do not count; the files it names there are hashed below.
    let dir = script
        .parent()
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    let code: Vec<String> = text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .map(|line| {
            if dir.is_empty() {
                line.to_owned()
            } else {
                line.replace(&dir, "<scripts>")
            }
        })
        .collect();
    let mut material = format!(
        "{SNAPSHOT_FORMAT}\nvmrig {}\nstart script {}\n",
        env!("CARGO_PKG_VERSION"),
        hex::encode(Sha256::digest(code.join("\n").as_bytes()))
    );
    material.push_str(&format!("qemu {}\n", qemu_version(&inputs.qemu)?));
    for file in &inputs.store_files {
        // Store paths are named by their contents; a missing one fails the boot anyway.
        std::fs::metadata(file).ok()?;
        material.push_str(&format!("store file {}\n", file.display()));
    }
    for file in &inputs.other_files {
        let name = file.to_string_lossy().replace(&dir, "<scripts>");
        material.push_str(&format!("file {name} {}\n", file_hash(file).ok()?));
    }
    for var in ["QEMU_OPTS", "QEMU_NET_OPTS", "QEMU_KERNEL_PARAMS"] {
        material.push_str(&format!("{var}={:?}\n", value(var)));
    }
    let mut vlans: Vec<&str> = command
        .env
        .iter()
        .filter_map(|(k, _)| k.strip_prefix("QEMU_VDE_SOCKET_"))
        .collect();
    vlans.sort();
    material.push_str(&format!("vlans {}\n", vlans.join(" ")));
    let neutral = vmrig_vm::cmdline::NixosSockets {
        qmp: "<state>/qmp".into(),
        monitor: "<state>/monitor".into(),
        shell: "<state>/shell".into(),
    };
    let nographic = getenv("DISPLAY").is_none() && getenv("WAYLAND_DISPLAY").is_none();
    for arg in vmrig_vm::cmdline::nixos_driver_args(&neutral, command.allow_reboot, nographic) {
        material.push_str(&arg);
        material.push('\n');
    }
    Some(StartScriptSnapshot {
        key: StoreKey::new(
            &format!("{NAME_PREFIX}{}", inputs.machine),
            material.as_bytes(),
        ),
        disk: command.state_dir.join(&inputs.default_disk),
        qemu_img: inputs.qemu_img,
    })
}

/// `qemu --version`'s first line, asked once per program (the run's QEMU check and the
/// snapshot keys both need it).
pub fn qemu_version(qemu: &Path) -> Option<String> {
    qemu_version_line(qemu).ok().filter(|v| !v.is_empty())
}

/// [`qemu_version`], or why `qemu --version` could not run (an empty line when it printed
/// nothing or failed).
pub fn qemu_version_line(qemu: &Path) -> std::io::Result<String> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static KNOWN: Mutex<Option<HashMap<std::path::PathBuf, String>>> = Mutex::new(None);
    if let Some(v) = KNOWN
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .get(qemu)
    {
        return Ok(v.clone());
    }
    let out = vmrig_vm::process::command(qemu)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let version = stdout.lines().next().unwrap_or_default().trim().to_owned();
    if !out.status.success() || version.is_empty() {
        return Ok(String::new());
    }
    KNOWN
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .insert(qemu.to_owned(), version.clone());
    Ok(version)
}

/// Puts a restored machine's boot back at the start of its console: the lines saved with
/// the snapshot go into `console` (for `get_console_log`, `wait_for_console_text`) and are
/// appended to `serial_log`, as a cold boot would have left them. A snapshot without the
/// file (none should exist: the format names it) restores an empty console.
pub fn replay_console(
    snapshot: &Path,
    console: &vmrig_vm::serial::Console,
    serial_log: &Path,
) -> std::io::Result<usize> {
    let text = match std::fs::read(snapshot.join(vmrig_vm::machine::CONSOLE_FILE)) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    {
        use std::io::Write;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(serial_log)?;
        log.write_all(text.as_bytes())?;
    }
    let mut lines = 0;
    for line in text.lines() {
        console.push(line.to_owned());
        lines += 1;
    }
    Ok(lines)
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
    use std::path::PathBuf;
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
            transfer_dir: None,
            shared_dirs: Vec::new(),
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
    fn the_boots_console_comes_back_before_what_follows() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(vmrig_vm::machine::CONSOLE_FILE),
            "[    0.000000] Linux version 6.1\nconnecting to host...\n",
        )
        .unwrap();
        let log = dir.path().join("serial-m.log");
        std::fs::write(&log, "earlier run\n").unwrap();
        let console = vmrig_vm::serial::Console::new();
        assert_eq!(replay_console(dir.path(), &console, &log).unwrap(), 2);
        console.push("after the restore".into());
        assert_eq!(
            console.text(),
            "[    0.000000] Linux version 6.1\nconnecting to host...\nafter the restore\n"
        );
        assert_eq!(
            console.wait_for(0, std::time::Instant::now(), |l| l.contains("connecting")),
            Ok(1)
        );
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "earlier run\n[    0.000000] Linux version 6.1\nconnecting to host...\n"
        );
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(replay_console(empty.path(), &console, &log).unwrap(), 0);
    }

    /// A start script in `<root>/<sub>` as vmrig writes it, with its initrd (`initrd` is
    /// its contents) next to it; QEMU and the kernel are `<root>`'s (the store's).
    fn start_script(root: &Path, sub: &str, initrd: &str) -> vmrig_vm::machine::StartCommand {
        use std::os::unix::fs::PermissionsExt;
        let qemu = root.join("qemu");
        std::fs::write(&qemu, "#!/bin/sh\necho QEMU emulator version 7.2.0\n").unwrap();
        std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
        let kernel = root.join("vmlinux");
        std::fs::write(&kernel, "k").unwrap();
        let dir = root.join(sub);
        std::fs::create_dir_all(&dir).unwrap();
        let initrd_file = dir.join("m-initrd");
        std::fs::write(&initrd_file, initrd).unwrap();
        let inputs = vmrig_vm::start_script::ScriptInputs {
            machine: "m".into(),
            qemu,
            qemu_img: "/usr/bin/qemu-img".into(),
            store_files: vec![kernel],
            other_files: vec![initrd_file.clone()],
            default_disk: "m.qcow2".into(),
        };
        let script = dir.join("run-m-vm");
        std::fs::write(
            &script,
            format!(
                "#!/usr/bin/env bash\n# Made from {sub}\n{}{}\nexec qemu -initrd {}\n",
                vmrig_vm::start_script::INPUTS_MARKER,
                serde_json::to_string(&inputs).unwrap(),
                initrd_file.display()
            ),
        )
        .unwrap();
        vmrig_vm::machine::StartCommand {
            name: "m".into(),
            command: script.to_string_lossy().into_owned(),
            state_dir: dir.join("vm-state-m"),
            env: vec![("QEMU_VDE_SOCKET_1".into(), format!("/run/{sub}/vde1"))],
            allow_reboot: false,
        }
    }

    #[test]
    fn start_script_keys_cover_what_the_script_boots() {
        let root = tempfile::tempdir().unwrap();
        let none = |_: &str| None;
        let a = start_script(root.path(), "a", "layer-a");
        let snap = start_script_snapshot(&a, &none).expect("a vmrig script");
        assert_eq!(snap.disk, a.state_dir.join("m.qcow2"));
        assert_eq!(snap.key.name(), "snapshot-m");
        // Another state directory and switch path: the same key.
        let mut moved = a.clone();
        moved.state_dir = root.path().join("elsewhere");
        moved.env = vec![("QEMU_VDE_SOCKET_1".into(), "/other/vde1".into())];
        assert_eq!(start_script_snapshot(&moved, &none).unwrap().key, snap.key);
        // The same script and initrd written into another directory: the same key.
        let copy = start_script(root.path(), "copy", "layer-a");
        assert_eq!(start_script_snapshot(&copy, &none).unwrap().key, snap.key);
        // The initrd's contents (the node's layer) change it.
        let b = start_script(root.path(), "b", "layer-b");
        assert_ne!(start_script_snapshot(&b, &none).unwrap().key, snap.key);
        // So do the variables the script reads, allow_reboot and the set of VLANs.
        let opts = |v: &str| (v == "QEMU_OPTS").then(|| "-m 2048".to_owned());
        assert_ne!(start_script_snapshot(&a, &opts).unwrap().key, snap.key);
        let mut reboot = a.clone();
        reboot.allow_reboot = true;
        assert_ne!(start_script_snapshot(&reboot, &none).unwrap().key, snap.key);
        let mut two = a.clone();
        two.env
            .push(("QEMU_VDE_SOCKET_2".into(), "/run/x/vde2".into()));
        assert_ne!(start_script_snapshot(&two, &none).unwrap().key, snap.key);
        // A changed command line in the script changes it.
        let script = PathBuf::from(&a.command);
        let text = std::fs::read_to_string(&script).unwrap();
        std::fs::write(&script, text.replace("exec qemu", "exec qemu -smp 2")).unwrap();
        assert_ne!(start_script_snapshot(&a, &none).unwrap().key, snap.key);
        // A disk the run places itself, and scripts vmrig did not write: no snapshot.
        let disk = |v: &str| (v == "NIX_DISK_IMAGE").then(|| "/tmp/d.qcow2".to_owned());
        assert!(start_script_snapshot(&a, &disk).is_none());
        let foreign = root.path().join("run-n-vm");
        std::fs::write(&foreign, "#!/bin/sh\nexec qemu-kvm \"$@\"\n").unwrap();
        let mut n = a.clone();
        n.command = foreign.to_string_lossy().into_owned();
        assert!(start_script_snapshot(&n, &none).is_none());
        n.command = format!("{} -m 512", a.command);
        assert!(
            start_script_snapshot(&n, &none).is_none(),
            "not a plain script path"
        );
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
