//! The rest of the test-script API on real VMs, in one run of two nodes with the image the
//! other VM tests use (`less`): polling conditions, `serial_stdout_on/off`, `t`,
//! `test_script()`, `start_job`/`stop_job`, virtual terminals (`get_tty_text`,
//! `wait_until_tty_matches`), `send_console`, the monitor and QMP events, file copies both
//! ways, `reboot()` with and without `allow_reboot`, and a failing subtest reported as its
//! own JUnit case. (`create_machine` runs in `vm_nixos.rs`; the basics, waits and
//! `shutdown` in `vm.rs`.) In the nextest `vm` group.

mod common;
use common::{assert_no_leftovers, text};

use quick_junit::{NonSuccessKind, Report, TestCaseStatus};

use common::vmrig_rerun as vmrig;

/// `machine` starts as upstream's `start()` (QEMU with `-no-reboot`), `inplace` with
/// `allow_reboot=True`. `__HOST_DIR__` is a host directory with `a.txt` and `run.sh` (0755).
const SCRIPT: &str = r#"
import os

if os.environ.get("VMRIG_API_NESTED") == "1":
    # The run that test_script() starts below: fresh globals, the same machines.
    assert "outer_only" not in globals(), "test_script() reused the script's globals"
    machine.succeed("touch /tmp/nested-ran")
else:
    outer_only = True
    machine.start()
    inplace.start(allow_reboot=True)

    with subtest("t"):
        t.assertEqual(machine.succeed("echo -n 42"), "42")
        t.assertIn("machine", machine.succeed("hostname"))
        try:
            t.assertEqual(1, 2)
            raise Exception("t.assertEqual(1, 2) did not raise")
        except RequestedAssertionFailed as e:
            t.assertIsInstance(e, AssertionError)
            t.assertIn("1 != 2", str(e))
        with t.assertRaises(RequestedAssertionFailed):
            machine.succeed("false")

    with subtest("polling_condition"):
        @polling_condition
        def shell_answers():
            "the shell answers"
            machine.succeed("true")

        @polling_condition(seconds_interval=0, description="/tmp/flag exists")
        def flag_exists():
            machine.succeed("test -e /tmp/flag")

        with shell_answers:
            machine.succeed("true")
        machine.succeed("(sleep 1; touch /tmp/flag) >/dev/null 2>&1 &")
        flag_exists.wait(timeout=60)
        with flag_exists:
            machine.succeed("true")
            # Checked after the call too: the call that breaks the condition raises.
            with t.assertRaisesRegex(PollingConditionError, "Polling condition failed: /tmp/flag exists"):
                machine.succeed("rm /tmp/flag")
        machine.succeed("true")  # not checked outside its block
        with t.assertRaises(PollingConditionError):
            with flag_exists:
                machine.succeed("touch /tmp/unreachable")  # checked before: never runs
        machine.fail("test -e /tmp/unreachable")

    with subtest("serial_stdout_off/on"):
        serial_stdout_off()
        machine.succeed("echo vmrig-serial-$((40 + 2)) > /dev/ttyS0")
        machine.wait_for_console_text("vmrig-serial-42")
        serial_stdout_on()
        machine.succeed("echo vmrig-serial-$((40 + 3)) > /dev/ttyS0")
        machine.wait_for_console_text("vmrig-serial-43")

    with subtest("start_job, stop_job, get_tty_text, wait_until_tty_matches"):
        # Nothing draws on tty2 until a getty runs there (no logind to start one on Alt+F2).
        t.assertEqual(machine.start_job("getty@tty2.service")[0], 0)
        machine.wait_until_tty_matches("2", "machine login: ", timeout=60)
        text = machine.get_tty_text("2")
        t.assertIn("machine tty2", text)
        t.assertEqual({len(line) for line in text.split("\n")}, {80}, text)
        t.assertEqual(machine.stop_job("getty@tty2.service")[0], 0)
        machine.fail("systemctl is-active getty@tty2.service")
        t.assertNotEqual(machine.start_job("no-such-unit.service")[0], 0)
        machine.succeed("echo vmrig-tty-marker > /dev/tty3")
        t.assertIn("vmrig-tty-marker", machine.get_tty_text("3"))
        with t.assertRaisesRegex(RequestedAssertionFailed, "timed out") as caught:
            machine.wait_until_tty_matches("3", "never-on-tty3", timeout=2)
        t.assertTrue(caught.exception.timed_out)
        t.assertIn("vmrig-tty-marker", str(caught.exception))

    with subtest("send_console"):
        # No getty holds the serial line (as in NixOS test VMs).
        machine.fail("systemctl is-active serial-getty@ttyS0.service")
        machine.succeed("systemd-run --unit=serial-reader sh -c 'exec 3</dev/ttyS0; touch /tmp/reader-up; exec cat <&3 >/tmp/serial-in'")
        machine.wait_for_file("/tmp/reader-up", timeout=30)
        machine.send_console("hello from the host\n")
        machine.wait_until_succeeds("grep -q 'hello from the host' /tmp/serial-in", timeout=30)
        t.assertEqual(machine.stop_job("serial-reader")[0], 0)

    with subtest("send_monitor_command, wait_for_qmp_event"):
        t.assertIn("running", machine.send_monitor_command("info status"))
        t.assertTrue(machine.send_monitor_command("help").endswith("(qemu) "))
        with t.assertRaises(TimeoutError):
            machine.wait_for_qmp_event(lambda e: False, timeout=1)
        machine.send_monitor_command("stop")
        t.assertIn("paused", machine.send_monitor_command("info status"))
        t.assertEqual(machine.wait_for_qmp_event(lambda e: e["event"] == "STOP", timeout=30)["event"], "STOP")
        machine.send_monitor_command("cont")
        event = machine.wait_for_qmp_event(lambda e: e["event"] == "RESUME", timeout=30)
        t.assertIn("seconds", event["timestamp"])
        machine.succeed("true")

    with subtest("copy_from_host, copy_from_vm, copy_from_machine"):
        machine.copy_from_host(__HOST_DIR__, "/root/from-host")
        t.assertEqual(machine.succeed("cat /root/from-host/a.txt"), "file a\n")
        t.assertEqual(machine.succeed("stat -c %a /root/from-host/run.sh"), "755\n")
        machine.copy_from_host(os.path.join(__HOST_DIR__, "a.txt"), "/etc/single-file")
        t.assertEqual(machine.succeed("cat /etc/single-file"), "file a\n")
        machine.succeed("mkdir -p /root/export/sub && echo guest-data > /root/export/sub/f")
        machine.copy_from_machine("/root/export", "copied")
        machine.copy_from_vm("/etc/hostname")
        t.assertEqual((machine.out_dir / "copied/export/sub/f").read_text(), "guest-data\n")
        t.assertEqual((machine.out_dir / "hostname").read_text(), "machine\n")

    try:
        with subtest("a failing subtest"):
            machine.succeed("echo vmrig-doomed; exit 3")
    except RequestedAssertionFailed:
        pass

    with subtest("test_script"):
        os.environ["VMRIG_API_NESTED"] = "1"
        test_script()
        machine.succeed("test -e /tmp/nested-ran")

    with subtest("reboot with and without allow_reboot"):
        boot_id = "cat /proc/sys/kernel/random/boot_id"
        before = (machine.succeed(boot_id), inplace.succeed(boot_id))
        machine.succeed("echo kept > /root/kept")
        machine.reboot()
        inplace.reboot()
        t.assertFalse(machine.connected)
        t.assertFalse(inplace.connected)
        # machine: QEMU exits; this command waits for that and boots it again from its disk.
        t.assertEqual(machine.succeed("cat /root/kept"), "kept\n")
        # inplace: the guest reboots inside the same QEMU.
        t.assertEqual(inplace.succeed("echo -n back"), "back")
        t.assertNotEqual(machine.succeed(boot_id), before[0])
        t.assertNotEqual(inplace.succeed(boot_id), before[1])
        t.assertTrue(machine.is_up() and inplace.is_up())
"#;

#[test]
fn the_rest_of_the_api() {
    let tmp = tempfile::tempdir().unwrap();
    let host_dir = tmp.path().join("host-dir");
    std::fs::create_dir(&host_dir).unwrap();
    std::fs::write(host_dir.join("a.txt"), "file a\n").unwrap();
    let run_sh = host_dir.join("run.sh");
    std::fs::write(&run_sh, "#!/bin/sh\necho run\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&run_sh, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = SCRIPT.replace(
        "__HOST_DIR__",
        &format!("{:?}", host_dir.display().to_string()),
    );
    let file = tmp.path().join("api.toml");
    std::fs::write(
        &file,
        format!("name = \"api\"\ntest_script = '''{script}'''\n\n[defaults]\npackages = [\"less\"]\n\n[nodes.machine]\n[nodes.inplace]\n"),
    )
    .unwrap();
    let out_dir = tmp.path().join("out");
    let junit = tmp.path().join("junit.xml");
    let out = vmrig(
        &[
            "run",
            file.to_str().unwrap(),
            "-o",
            out_dir.to_str().unwrap(),
            "--junit",
            junit.to_str().unwrap(),
        ],
        tmp.path(),
    );
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");

    // serial_stdout_off hides console lines from the log, not from the serial log.
    assert!(log.contains("machine # vmrig-serial-43"), "{log}");
    assert!(!log.contains("machine # vmrig-serial-42"), "{log}");
    let serial = std::fs::read_to_string(out_dir.join("serial-machine.log")).unwrap();
    assert!(serial.contains("vmrig-serial-42") && serial.contains("vmrig-serial-43"));
    let events: Vec<serde_json::Value> = std::fs::read_to_string(out_dir.join("events.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let console = |needle: &str| {
        events
            .iter()
            .any(|e| e["event"] == "console" && e["line"].as_str().unwrap().contains(needle))
    };
    assert!(console("vmrig-serial-43") && !console("vmrig-serial-42"));

    // A polling condition is described by its docstring.
    let begun = |message: &str| {
        events
            .iter()
            .filter(|e| e["event"] == "block_begin" && e["message"] == message)
            .count()
    };
    assert!(begun("Checking polling condition 'the shell answers'") >= 1);
    // test_script() ran the script a second time, nested.
    assert_eq!(begun("run the VM test script"), 2);

    // reboot(): without allow_reboot QEMU exited and the machine booted again.
    assert!(
        log.contains("machine: waiting for QEMU to exit after the reboot"),
        "{log}"
    );
    assert!(
        log.contains("inplace: connected to guest root shell (")
            && log.contains(" s after the reboot)"),
        "{log}"
    );

    // The failing subtest is reported on its own, in the events and in JUnit; the test passed.
    let failed_subtest = events
        .iter()
        .find(|e| {
            e["event"] == "block_end"
                && e["kind"] == "subtest"
                && e["message"] == "a failing subtest"
        })
        .expect("the failing subtest's end");
    assert!(
        failed_subtest["error"]
            .as_str()
            .unwrap()
            .contains("command `echo vmrig-doomed; exit 3` failed (exit code 3)"),
        "{failed_subtest}"
    );
    let xml = std::fs::read_to_string(&junit).unwrap();
    let report = Report::deserialize_from_str(&xml).expect("valid JUnit");
    let suite = &report.test_suites[0];
    let cases: Vec<&str> = suite.test_cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        cases,
        [
            "api",
            "t",
            "polling_condition",
            "serial_stdout_off/on",
            "start_job, stop_job, get_tty_text, wait_until_tty_matches",
            "send_console",
            "send_monitor_command, wait_for_qmp_event",
            "copy_from_host, copy_from_vm, copy_from_machine",
            "a failing subtest",
            "test_script",
            "reboot with and without allow_reboot",
        ]
    );
    for case in &suite.test_cases {
        match (case.name.as_str(), &case.status) {
            (
                "a failing subtest",
                TestCaseStatus::NonSuccess {
                    kind: NonSuccessKind::Failure,
                    message: Some(m),
                    ..
                },
            ) => assert!(m.as_str().contains("exit code 3"), "{m:?}"),
            ("a failing subtest", other) => panic!("{other:?}"),
            (_, TestCaseStatus::Success { .. }) => {}
            (name, other) => panic!("{name}: {other:?}"),
        }
    }

    // copy_from_machine/copy_from_vm wrote into the output directory.
    assert_eq!(
        std::fs::read_to_string(out_dir.join("copied/export/sub/f")).unwrap(),
        "guest-data\n"
    );
    assert_no_leftovers(tmp.path());
}
