//! Parity with the upstream NixOS driver where the guest shows it, on one real VM (the
//! image the other VM tests use): a command that opens `/dev/tty` gets ENXIO and the
//! machine stays usable (the command channel is no command's controlling terminal); a
//! command's `timeout=` kills it in the guest (status 124, as upstream's `timeout` wrapper)
//! and the next command runs at once; `execute(check_output=False)`; upstream's message
//! texts for unit waits, `require_unit_state` and timed-out waits;
//! `wait_for_unit_active_state`; `wait_for_file` with a glob; `wait_until_tty_matches` with
//! a number. In the nextest `vm` group.

mod common;
use common::{assert_no_leftovers, text, vmrig_rerun as vmrig};

const SCRIPT: &str = r#"
import time

machine.wait_for_unit("multi-user.target")

with subtest("no controlling terminal"):
    status, out = machine.execute("echo hi > /dev/tty")
    t.assertNotEqual(status, 0)
    t.assertEqual(out, "")
    err = machine.succeed("{ : </dev/tty; } 2>&1 || true")
    t.assertIn("No such device or address", err)
    t.assertEqual(machine.succeed("echo still usable"), "still usable\n")
    # A prompt that reads the terminal (ssh asking for a password) fails at once.
    started = time.monotonic()
    status, _ = machine.execute("read -r -p 'Password: ' pw < /dev/tty", timeout=60)
    t.assertNotEqual(status, 0)
    t.assertLess(time.monotonic() - started, 30)
    # No terminal in /proc either (tty_nr, field 7 of stat, is 0).
    stat = machine.succeed("cat /proc/self/stat")
    t.assertEqual(stat.rsplit(")", 1)[1].split()[4], "0", stat)
    t.assertEqual(machine.succeed("echo after"), "after\n")

with subtest("timeout kills the command in the guest"):
    started = time.monotonic()
    t.assertEqual(machine.execute("echo before; sleep 600", timeout=2), (124, "before\n"))
    t.assertEqual(machine.succeed("echo next"), "next\n")
    t.assertLess(time.monotonic() - started, 20)
    # The sleep is gone (the pattern does not match grep's own command line).
    machine.wait_until_fails("grep -qa '[s]leep.600' /proc/[0-9]*/cmdline", timeout=10)
    with t.assertRaisesRegex(RequestedAssertionFailed, r"command `sleep 600` failed \(exit code 124\)"):
        machine.succeed("sleep 600", timeout=2)
    started = time.monotonic()
    with t.assertRaisesRegex(RequestedAssertionFailed, "action timed out"):
        machine.wait_until_succeeds("sleep 600", timeout=3)
    t.assertEqual(machine.succeed("echo free"), "free\n")
    t.assertLess(time.monotonic() - started, 30)

with subtest("check_return and check_output"):
    t.assertEqual(machine.execute("false", check_return=False), (-1, ""))
    t.assertEqual(machine.execute("sleep 1; touch /tmp/detached", check_output=False), (-2, ""))
    # The next command runs after it (its reply is read first).
    machine.succeed("test -e /tmp/detached")

with subtest("unit states and upstream's messages"):
    machine.wait_for_unit_active_state("multi-user.target", "active", timeout=60)
    machine.succeed("systemd-run --unit=vmrig-slow --service-type=oneshot --no-block sleep 4")
    machine.wait_for_unit_active_state("vmrig-slow.service", "activating", timeout=30)
    machine.wait_for_unit_active_state("vmrig-slow.service", "inactive", timeout=60)
    with t.assertRaisesRegex(RequestedAssertionFailed, "to to be in state 'borked'"):
        machine.require_unit_state("multi-user.target", "borked")
    with t.assertRaisesRegex(RequestedAssertionFailed, 'unit "vmrig-none.service" is inactive and there are no pending jobs'):
        machine.wait_for_unit("vmrig-none.service")
    machine.succeed(
        "printf '[Service]\\nType=oneshot\\nExecStart=/bin/false\\n' > /etc/systemd/system/vmrig-fails.service",
        "systemctl daemon-reload",
    )
    machine.fail("systemctl start vmrig-fails.service")
    with t.assertRaisesRegex(RequestedAssertionFailed, 'unit "vmrig-fails.service" reached state "failed"'):
        machine.wait_for_unit("vmrig-fails.service")
    machine.wait_for_unit_active_state("vmrig-fails.service", "failed", timeout=10)
    with t.assertRaisesRegex(RequestedAssertionFailed, r"^action timed out after [0-9.]+ seconds \(timeout=2\)"):
        machine.wait_for_unit_active_state("vmrig-fails.service", "active", timeout=2)

with subtest("globs, ttys and the console"):
    machine.succeed("(sleep 1; touch /tmp/glob-a1) >/dev/null 2>&1 &")
    machine.wait_for_file("/tmp/glob-*", timeout=30)
    t.assertEqual(machine.start_job("getty@tty3.service")[0], 0)
    machine.wait_until_tty_matches(3, "login: ", timeout=120)
    t.assertIn("login: ", machine.get_tty_text(3))
    with t.assertRaisesRegex(RequestedAssertionFailed, "action timed out"):
        machine.wait_for_console_text("vmrig-never-printed", timeout=2)
"#;

#[test]
fn guest_visible_parity_with_the_upstream_driver() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("parity.toml");
    std::fs::write(
        &file,
        format!(
            "name = \"parity\"\ntest_script = '''{SCRIPT}'''\n\n[defaults]\npackages = [\"less\"]\n\n[nodes.machine]\n"
        ),
    )
    .unwrap();
    let out = vmrig(&["run", file.to_str().unwrap()], tmp.path());
    let log = text(&out);
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(log.contains("test parity passed"), "{log}");
    assert_no_leftovers(tmp.path());
}
