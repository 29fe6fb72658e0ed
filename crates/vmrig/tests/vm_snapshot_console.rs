//! A boot snapshot keeps the boot's console: after a restore, `get_console_log()`,
//! `wait_for_console_text` and the serial log show what a cold boot shows, for vmrig's
//! nodes (`vmrig run`) and for start scripts vmrig wrote (`vmrig nixos-driver`). Each test
//! runs the same machine twice: cold (it saves the snapshot), then warm (it restores it).
//! In the nextest `vm` group.

use std::path::Path;
use std::process::Output;

mod common;
use common::text;

/// What the backdoor prints on the serial line as it starts (NixOS prints the same).
const BOOT_LINE: &str = "connecting to host...";

/// The script both runs execute: once the machine is up, the boot's line is in the console
/// log and a wait for it matches.
const SCRIPT: &str = r#"
machine.succeed("true")
log = machine.get_console_log()
assert "connecting to host..." in log, "the boot's console is missing: %r" % log
machine.wait_for_console_text("connecting to host", timeout=10)
print("CONSOLE-LINES", len(log.splitlines()))
"#;

/// A nonce in the node's files: a node no other run has booted, so the first run is cold.
fn nonce() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn spec(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("console.toml");
    let script = SCRIPT.replace("'''", "");
    std::fs::write(
        &path,
        format!(
            "name = \"snapshot-console\"\ntest_script = '''{script}'''\n\n[nodes.machine]\npackages = [\"less\"]\nfiles.\"/etc/vmrig-test-nonce\".text = \"{}\"\n",
            nonce()
        ),
    )
    .unwrap();
    path
}

/// Checks one run: it passed, it was cold or warm as `restored` says, and its serial log
/// has the boot's line.
fn check(out: &Output, out_dir: &Path, serial: &str, restored: bool) {
    let log = text(out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert_eq!(
        log.contains("restored from the boot snapshot"),
        restored,
        "restored should be {restored}:\n{log}"
    );
    assert!(log.contains("CONSOLE-LINES"), "{log}");
    let serial = std::fs::read_to_string(out_dir.join(serial)).unwrap();
    assert!(serial.contains(BOOT_LINE), "serial log: {serial}");
}

#[test]
fn console_log_survives_a_snapshot_restore_in_vmrig_run() {
    let tmp = tempfile::tempdir().unwrap();
    let file = spec(tmp.path());
    for (i, restored) in [false, true].into_iter().enumerate() {
        let out_dir = tmp.path().join(format!("out{i}"));
        let out = common::vmrig_rerun(
            &[
                "run",
                file.to_str().unwrap(),
                "-o",
                out_dir.to_str().unwrap(),
            ],
            tmp.path(),
        );
        check(&out, &out_dir, "serial-machine.log", restored);
    }
    common::assert_no_leftovers(tmp.path());
}

#[test]
fn console_log_survives_a_snapshot_restore_in_nixos_driver() {
    let tmp = tempfile::tempdir().unwrap();
    let file = spec(tmp.path());
    let scripts = tmp.path().join("scripts");
    let out = common::command(tmp.path())
        .args(["build", "--start-scripts"])
        .arg(&scripts)
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let script = tmp.path().join("test.py");
    std::fs::write(&script, SCRIPT).unwrap();
    for (i, restored) in [false, true].into_iter().enumerate() {
        let out_dir = tmp.path().join(format!("out{i}"));
        std::fs::create_dir_all(&out_dir).unwrap();
        let out = common::command(tmp.path())
            .arg("nixos-driver")
            .arg("-o")
            .arg(&out_dir)
            .arg("--start-scripts")
            .arg(scripts.join("run-machine-vm"))
            .args(["--vlans", "1", "--"])
            .arg(&script)
            .output()
            .unwrap();
        check(&out, &out_dir, "serial-machine.log", restored);
    }
    common::assert_no_leftovers(tmp.path());
}
