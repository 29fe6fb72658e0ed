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
# grep's message goes to stderr: grep must exit with its real status (2), not 0 (commands
# run under `set -euo pipefail`, as upstream, so the echo is not reached).
status, out = machine.execute("grep -q inet /nonexistent; echo rc=$?")
assert (status, out) == (2, ""), (status, out)
status, out = machine.execute("grep -q inet /nonexistent || echo rc=$?")
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

/// A node on VLAN 1 with a udev rule and a sysctl for eth1, and a unit ordered after
/// network-online.target.
const NETWORK_NODE: &str = r#"[nodes.machine]
packages = ["less"]
vlans = [1]

# Sorted after 99-systemd.rules, whose RUN applies the card's sysctls: this RUN sees what
# udev saw of eth1 on "add", after its sysctls.
[nodes.machine.files."/etc/udev/rules.d/99-zz-vmrig-test.rules"]
text = '''ACTION=="add", SUBSYSTEM=="net", KERNEL=="eth1", RUN+="/bin/sh -c 'ip -o addr show dev eth1 > /run/eth1-at-add; cat /proc/sys/net/ipv6/conf/eth1/use_tempaddr > /run/eth1-tempaddr-at-add'"
'''

[nodes.machine.files."/etc/sysctl.d/70-vmrig-test.conf"]
text = "net.ipv6.conf.eth1.use_tempaddr = 2\n"

[nodes.machine.files."/etc/systemd/system/online-check.service"]
text = '''[Unit]
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'ip -o addr show dev eth1 > /run/online-check'

[Install]
WantedBy=multi-user.target
'''

[nodes.machine.services.online-check]

[nodes.machine.services.talker]
script = "echo vmrig-service-$((40 + 2)) says hello"
"#;

#[test]
fn console_network_targets_and_modules_as_in_nixos_test_vms() {
    let tmp = tempfile::tempdir().unwrap();
    let script = r#"
with subtest("kernel and journal messages on the console"):
    machine.start()
    machine.wait_for_console_text("vmrig-service-42 says hello", timeout=120)
    log = machine.get_console_log()
    assert "Linux version" in log, log[-3000:]
    assert "loglevel=7" in machine.succeed("cat /proc/cmdline")
    assert machine.succeed("cut -f1 /proc/sys/kernel/printk").strip() == "7"
    machine.succeed("systemd-cat -t vmrig-test echo vmrig-journal-$((40 + 3))")
    machine.wait_for_console_text("vmrig-journal-43", timeout=60)

with subtest("network.target and network-online.target are reached"):
    machine.wait_for_unit("network.target", timeout=120)
    machine.wait_for_unit("network-online.target", timeout=120)
    machine.wait_for_unit("online-check.service", timeout=120)
    # Ordered after network-online.target: eth1 had its addresses when it started.
    assert "192.168.1.1/24" in machine.succeed("cat /run/online-check")
    machine.succeed("systemctl is-active vmrig-network-addresses@eth1.service")
    # eth0 as before: host-only user networking, no default route, no name servers.
    assert "10.0.2.15/24" in machine.succeed("ip -o addr show dev eth0")
    machine.fail("ip route show default | grep -q .")
    machine.fail("grep -qs '^nameserver' /etc/resolv.conf")

with subtest("cards come up after udev: rules on add and the card's sysctls apply"):
    # udev saw eth1 on "add" before it had addresses, and after its sysctls.
    machine.fail("grep -q 192.168.1 /run/eth1-at-add")
    assert machine.succeed("cat /run/eth1-tempaddr-at-add").strip() == "2"
    assert machine.succeed("cat /proc/sys/net/ipv6/conf/eth1/use_tempaddr").strip() == "2"

with subtest("every module of the kernel is loadable"):
    for module in ["wireguard", "bonding", "dm_mod"]:
        machine.succeed(f"modprobe {module}")
        machine.succeed(f"grep -q '^{module} ' /proc/modules")
    machine.succeed("modprobe snd-timer")
    machine.wait_for_file("/dev/snd/timer", timeout=30)
    # From the kernel's read-only modules disk, not from the root image.
    opts = machine.succeed("findmnt -n -o OPTIONS --target /lib/modules/$(uname -r)")
    assert opts.startswith("ro"), opts

with subtest("test instrumentation settings"):
    assert machine.succeed("sysctl -n kernel.hung_task_timeout_secs").strip() == "600"
    assert machine.succeed("sysctl -n vm.panic_on_oom").strip() == "2"
    assert machine.succeed("systemctl show -P DefaultTimeoutStartUSec").strip() == "5min"
    machine.succeed("grep -q '^root::' /etc/shadow")
"#;
    let file = test_file(tmp.path(), "nixos-guest", script, NETWORK_NODE);
    // A cold boot: the console log must hold the kernel's messages.
    run_passes(tmp.path(), &file, &["--no-snapshots"]);
    let serial = std::fs::read_to_string(tmp.path().join("out/serial-machine.log")).unwrap();
    assert!(serial.contains("Linux version"), "{serial}");
    assert!(serial.contains("vmrig-service-42 says hello"), "{serial}");
    assert_no_leftovers(tmp.path());
}

#[test]
fn trixie_and_bookworm_nodes_ping_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    let script = r#"
start_all()
for m, codename in [(new, "trixie"), (old, "bookworm")]:
    m.wait_for_unit("network-online.target", timeout=120)
    m.succeed(f"grep -q '^VERSION_CODENAME={codename}$' /etc/os-release")
    m.succeed("modprobe wireguard")
new.succeed("ping -c 1 -W 10 old")
old.succeed("ping -c 1 -W 10 new")
new.succeed("ping -c 1 -W 10 2001:db8:1::2")
"#;
    let nodes = "[nodes.new]\nsuite = \"trixie\"\npackages = [\"less\"]\n\n[nodes.old]\nsuite = \"bookworm\"\npackages = [\"less\"]\n";
    let file = test_file(tmp.path(), "two-suites", script, nodes);
    run_passes(tmp.path(), &file, &[]);
    assert_no_leftovers(tmp.path());
}
