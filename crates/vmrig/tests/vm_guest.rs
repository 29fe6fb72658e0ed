//! The guest is a faithful NixOS test guest (nixpkgs test-instrumentation.nix): no getty on
//! the serial line (commands' stderr works and reaches the console log), kernel and
//! journal messages on the console, network cards brought up after udev with the network
//! targets reached, every module of the kernel loadable, and Debian 13 and 12 side by side.
//! Real VMs: the `vm` nextest group runs these one at a time.

use std::path::{Path, PathBuf};

mod common;
use common::{assert_no_leftovers, text};

use common::vmrig_rerun as vmrig;

/// Writes a test file `<name>.toml` with `script` and `nodes` (TOML after the script).
fn test_file(dir: &Path, name: &str, script: &str, nodes: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!("name = \"{name}\"\ntest_script = '''\n{script}\n'''\n\n{nodes}\n"),
    )
    .unwrap();
    path
}

/// The node of examples/single.toml (so the image is shared with the other VM tests).
const SINGLE: &str = "[nodes.machine]\npackages = [\"less\"]\n";

/// Runs `file` (never from the result cache) into `<tmp>/out`; returns the log and
/// asserts it passed.
fn run_passes(tmp: &Path, file: &Path, extra: &[&str]) -> String {
    let out_dir = tmp.join("out");
    let mut args = vec![
        "run",
        file.to_str().unwrap(),
        "-o",
        out_dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = vmrig(&args, tmp);
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    log
}

#[test]
fn commands_stderr_works_and_failing_greps_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let script = r#"
machine.wait_for_unit("multi-user.target")
# No getty on the serial line, whose vhangup made the backdoor's stderr fail with EIO.
machine.fail("systemctl is-active serial-getty@ttyS0.service")
status, out = machine.execute("echo small >&2; echo rc=$?")
assert (status, out) == (0, "rc=0\n"), (status, out)
status, out = machine.execute("seq 1 20000 >&2; echo rc=$?")
assert (status, out) == (0, "rc=0\n"), (status, out)
# grep's message goes to stderr: grep must exit with its real status (2), not 0.
status, out = machine.execute("grep -q inet /nonexistent; echo rc=$?")
assert (status, out) == (0, "rc=2\n"), (status, out)
machine.fail("grep -q inet /nonexistent")
try:
    machine.succeed("grep -q inet /nonexistent")
    raise Exception("succeed of a failing grep returned")
except RequestedAssertionFailed:
    pass
try:
    machine.wait_until_succeeds("grep -q inet /nonexistent", timeout=5)
    raise Exception("wait_until_succeeds of a failing grep returned")
except RequestedAssertionFailed:
    pass
# A command's stderr goes to the serial console, so it is in the console log.
machine.succeed("echo vmrig-stderr-$((40 + 2)) >&2")
machine.wait_for_console_text("vmrig-stderr-42", timeout=30)
assert "vmrig-stderr-42" in machine.get_console_log()
"#;
    let file = test_file(tmp.path(), "stderr", script, SINGLE);
    run_passes(tmp.path(), &file, &[]);
    let serial = std::fs::read_to_string(tmp.path().join("out/serial-machine.log")).unwrap();
    assert!(serial.contains("vmrig-stderr-42"), "{serial}");
    assert!(serial.contains("grep: /nonexistent"), "{serial}");
    assert_no_leftovers(tmp.path());
}
