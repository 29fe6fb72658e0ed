//! Real VMs under QEMU (TCG on hosts without usable KVM): the `vm` nextest group runs
//! these one at a time. They use the default image store, so images are built once.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{assert_no_leftovers, qemu_pids_under, repo, run_dirs, text};

use common::vmrig_rerun as vmrig;

/// A test file with the same node as examples/single.toml (same image) and `script`.
fn single_node_test(dir: &Path, name: &str, script: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, format!("name = \"{name}\"\ntest_script = '''\n{script}\n'''\n\n[nodes.machine]\npackages = [\"less\"]\n")).unwrap();
    path
}

#[test]
fn single_example_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    let out = vmrig(
        &[
            "run",
            "examples/single.toml",
            // A cold boot: the serial log must show the guest init.
            "--no-snapshots",
            "-o",
            out_dir.to_str().unwrap(),
        ],
        tmp.path(),
    );
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("test single passed"), "{log}");
    assert!(log.contains("connected to guest root shell"), "{log}");
    let serial = std::fs::read_to_string(out_dir.join("serial-machine.log")).unwrap();
    assert!(
        serial.contains("vmrig-init: switching to /sbin/init"),
        "{serial}"
    );
    let events = std::fs::read_to_string(out_dir.join("events.jsonl")).unwrap();
    assert_eq!(
        events.matches("\"must succeed: true\"").count(),
        100,
        "50 begin + 50 end events"
    );
    assert_no_leftovers(tmp.path());
}

#[test]
fn failing_succeed_exits_1_and_names_the_line_command_and_console() {
    let tmp = tempfile::tempdir().unwrap();
    let file = single_node_test(tmp.path(), "fails", "machine.succeed(\"true\")\nmachine.succeed(\"echo doomed; exit 7\")\nprint(\"not reached\")");
    let out = vmrig(
        &[
            "run",
            file.to_str().unwrap(),
            "-o",
            tmp.path().join("out").to_str().unwrap(),
        ],
        tmp.path(),
    );
    let log = text(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!("{}:4", file.display())),
        "script line missing:\n{log}"
    );
    assert!(
        log.contains("command `echo doomed; exit 7` failed (exit code 7)"),
        "{log}"
    );
    assert!(log.contains("doomed"), "output missing:\n{log}");
    assert!(log.contains("last console lines of `machine`"), "{log}");
    assert!(!log.contains("not reached"));
    assert_no_leftovers(tmp.path());
}

#[test]
fn guest_state_and_api_basics() {
    let tmp = tempfile::tempdir().unwrap();
    let script = r#"
machine.start()
machine.wait_for_unit("multi-user.target")
status, out = machine.execute("echo -n hi; exit 3")
assert (status, out) == (3, "hi"), (status, out)
machine.fail("false")
assert machine.succeed("echo a", "echo b") == "a\nb\n"
machine.wait_for_file("/etc/hostname")
machine.succeed("touch /tmp/later")
machine.wait_until_succeeds("test -e /tmp/later", timeout=30)
machine.wait_until_fails("test -e /nonexistent", timeout=30)
info = machine.get_unit_info("multi-user.target")
assert info["ActiveState"] == "active", info
machine.require_unit_state("multi-user.target")
assert machine.get_unit_property("multi-user.target", "Id") == "multi-user.target"
machine.succeed("(sleep 1; echo vmrig-console-marker > /dev/ttyS0) >/dev/null 2>&1 &")
machine.wait_for_console_text("vmrig-console-marker", timeout=60)
assert "vmrig-console-marker" in machine.get_console_log()
try:
    machine.wait_for_unit("no-such-unit.service", timeout=20)
    raise Exception("wait_for_unit of a missing unit returned")
except RequestedAssertionFailed as e:
    assert "inactive and there are no pending jobs" in str(e), str(e)
machine.succeed("systemd-run --unit=listener nc -lk 4444")
machine.wait_for_open_port(4444, timeout=60)
machine.succeed("systemctl stop listener")
machine.wait_for_closed_port(4444, timeout=60)
machine.copy_from_host(__vmrig_host_file__, "/root/copied")
assert machine.succeed("cat /root/copied") == "from the host\n"
machine.succeed("mkdir -p /root/export && echo out > /root/export/f")
machine.copy_from_machine("/root/export", "copied")
with subtest("shutdown and restart keep the disk"):
    machine.shutdown()
    assert not machine.is_up()
    machine.start()
    machine.succeed("test -e /tmp/later || test -e /root/copied")
machine.crash()
"#;
    let host_file = tmp.path().join("host-file");
    std::fs::write(&host_file, "from the host\n").unwrap();
    let script = script.replace(
        "__vmrig_host_file__",
        &format!("{:?}", host_file.display().to_string()),
    );
    let file = single_node_test(tmp.path(), "api", &script);
    let out_dir = tmp.path().join("out");
    let out = vmrig(
        &[
            "run",
            file.to_str().unwrap(),
            "-o",
            out_dir.to_str().unwrap(),
        ],
        tmp.path(),
    );
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert_eq!(
        std::fs::read_to_string(out_dir.join("copied/export/f")).unwrap(),
        "out\n"
    );
    assert_no_leftovers(tmp.path());
}

#[test]
fn sigkill_of_the_driver_leaves_no_qemu_and_no_temp_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let file = single_node_test(tmp.path(), "killed", "machine.succeed(\"true\")\nprint(\"vmrig-test: booted\", flush=True)\nmachine.succeed(\"sleep 600\")");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmrig"))
        .args([
            "run",
            file.to_str().unwrap(),
            "-o",
            tmp.path().join("out").to_str().unwrap(),
        ])
        .current_dir(repo())
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    use std::io::BufRead;
    while stdout.read_line(&mut line).unwrap() > 0 && !line.contains("vmrig-test: booted") {
        line.clear();
    }
    assert!(line.contains("booted"), "the test never booted");
    std::thread::sleep(Duration::from_millis(500));
    let qemus = qemu_pids_under(tmp.path());
    assert!(!qemus.is_empty(), "no QEMU found while the test runs");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let alive: Vec<_> = qemus
            .iter()
            .filter(|p| Path::new(&format!("/proc/{p}")).exists() && !is_zombie(**p))
            .collect();
        let dirs = run_dirs(tmp.path());
        if alive.is_empty() && dirs.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "5 s after SIGKILL: qemu {alive:?}, run dirs {dirs:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Nor any other process of the run (the script's python3, the watcher, ...).
    assert_no_leftovers(tmp.path());
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.contains(") Z "))
        .unwrap_or(true)
}

#[test]
fn concurrent_builds_of_one_file_build_once_and_both_succeed() {
    let tmp = tempfile::tempdir().unwrap();
    // A setup command unique to this run forces a fresh root image (the kernel is shared).
    let marker = format!(
        "{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    );
    let file = tmp.path().join("concurrent.toml");
    std::fs::write(
        &file,
        format!("name = \"concurrent\"\ntest_script = \"machine.succeed('true')\"\n[nodes.machine]\npackages = [\"less\"]\nsetup = [\"echo {marker} > /etc/vmrig-marker\"]\n"),
    )
    .unwrap();
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_vmrig"))
            .args(["build", "--json", file.to_str().unwrap()])
            .env("TMPDIR", tmp.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert_eq!(a.status.code(), Some(0), "{}", text(&a));
    assert_eq!(b.status.code(), Some(0), "{}", text(&b));
    let rootfs = |o: &Output| {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["tests"][0]["nodes"]["machine"]["rootfs"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(rootfs(&a), rootfs(&b));
    let built = [&a, &b]
        .iter()
        .filter(|o| String::from_utf8_lossy(&o.stderr).contains("built root image"))
        .count();
    assert_eq!(
        built,
        1,
        "exactly one process builds:\n{}\n---\n{}",
        text(&a),
        text(&b)
    );
    // Drop this test's image again; it is of no use to anyone else.
    let dir = Path::new(&rootfs(&a)).parent().unwrap().to_owned();
    std::fs::remove_dir_all(dir).unwrap();
    assert_no_leftovers(tmp.path());
}

#[test]
fn boot_snapshot_is_saved_then_restored_with_the_clock_set() {
    let tmp = tempfile::tempdir().unwrap();
    let script = "import time\nguest = int(machine.succeed('date +%s'))\nassert abs(guest - time.time()) < 5, (guest, time.time())\nmachine.succeed('test $(hostname) = machine')";
    let file = single_node_test(tmp.path(), "snapshot", script);
    let run = || {
        vmrig(
            &[
                "run",
                file.to_str().unwrap(),
                "-o",
                tmp.path().join("out").to_str().unwrap(),
            ],
            tmp.path(),
        )
    };
    // The first run saves a snapshot unless an identical node already did.
    let first = run();
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    std::thread::sleep(Duration::from_secs(3)); // the restored clock must not be the saved one
    let second = run();
    let log = text(&second);
    assert_eq!(second.status.code(), Some(0), "{log}");
    assert!(log.contains("restored from the boot snapshot"), "{log}");
    assert_no_leftovers(tmp.path());
}

#[test]
fn network_faults_forwarding_capture_and_reboot() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("net.toml");
    let script = r#"
start_all()
b.wait_for_unit("multi-user.target")
a.succeed("ping -c 1 -W 10 b")
with subtest("loss"):
    vlan1.set_loss(100)
    a.fail("ping -c 1 -W 1 b")
    vlan1.set_loss(0)
    a.wait_until_succeeds("ping -c 1 -W 1 b", timeout=30)
with subtest("delay"):
    vlan1.set_delay(300)
    rtt = float(a.succeed("ping -c 1 -W 5 b | sed -n 's/.*time=\\([0-9.]*\\) ms.*/\\1/p'"))
    assert rtt >= 300, rtt
    vlan1.set_delay(0)
with subtest("forward_port"):
    import socket, time
    b.succeed("systemd-run --unit=hello sh -c 'while true; do echo hello-from-b | nc -N -l 4444; done'")
    b.forward_port(__port__, 4444)
    deadline = time.time() + 60
    data = b""
    while not data:
        assert time.time() < deadline, "no answer through the forwarded port"
        try:
            with socket.create_connection(("127.0.0.1", __port__), timeout=5) as s:
                data = s.recv(100)
        except OSError:
            time.sleep(0.5)
    assert data == b"hello-from-b\n", data
with subtest("reboot"):
    a.shutdown()
    a.start(allow_reboot=True)
    a.succeed("touch /root/before-reboot")
    a.reboot()
    a.succeed("test -e /root/before-reboot")
    assert float(a.succeed("cut -d' ' -f1 /proc/uptime")) < 120
"#;
    std::fs::write(
        &file,
        format!(
            "name = \"net\"\ntest_script = '''{}'''\n\n[defaults]\npackages = [\"less\"]\n\n[nodes.a]\n[nodes.b]\n",
            script.replace("__port__", &(20000 + std::process::id() % 20000).to_string())
        ),
    )
    .unwrap();
    let out_dir = tmp.path().join("out");
    let out = vmrig(
        &[
            "run",
            file.to_str().unwrap(),
            "--capture",
            "-o",
            out_dir.to_str().unwrap(),
        ],
        tmp.path(),
    );
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    let pcap = std::fs::read(out_dir.join("vlan1.pcap")).unwrap();
    assert_eq!(&pcap[..4], &[0xd4, 0xc3, 0xb2, 0xa1], "pcap magic");
    assert!(pcap.len() > 24 + 16 * 10, "the capture holds frames");
    assert_no_leftovers(tmp.path());
}

#[test]
fn interactive_repl_and_shell_interact() {
    let tmp = tempfile::tempdir().unwrap();
    let file = single_node_test(tmp.path(), "repl", "machine.succeed('true')");
    let out = common::output_with_input(
        common::command(tmp.path()).args([
            "run",
            "-I",
            file.to_str().unwrap(),
            "-o",
            tmp.path().join("out").to_str().unwrap(),
        ]),
        "print('repl-sees', len(machines))\nmachine.shell_interact()\necho shell-$(hostname)\nexit 3\n",
    );
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("repl-sees 1"), "{log}");
    assert!(log.contains("shell-machine"), "{log}");
    assert!(log.contains("[exit status 3]"), "{log}");
    assert_no_leftovers(tmp.path());
}

#[test]
fn keep_vm_state_carries_the_disk_to_the_next_run() {
    let tmp = tempfile::tempdir().unwrap();
    let script = "machine.succeed('test -e /root/counter || echo 0 > /root/counter')\nn = int(machine.succeed('cat /root/counter'))\nmachine.succeed(f'echo {n + 1} > /root/counter')\nprint('vmrig-keep:', n + 1, flush=True)\nmachine.shutdown()";
    let file = single_node_test(tmp.path(), "keep", script);
    let out_dir = tmp.path().join("out");
    for expected in ["vmrig-keep: 1", "vmrig-keep: 2"] {
        let out = vmrig(
            &[
                "run",
                file.to_str().unwrap(),
                "-K",
                "-o",
                out_dir.to_str().unwrap(),
            ],
            tmp.path(),
        );
        let log = text(&out);
        assert_eq!(out.status.code(), Some(0), "{log}");
        assert!(log.contains(expected), "{expected} missing:\n{log}");
    }
    assert!(out_dir.join("vm-state-machine/disk.qcow2").exists());
    // `-K` keeps the run directory on purpose; nothing may keep running.
    common::assert_no_processes_left(tmp.path());
}
