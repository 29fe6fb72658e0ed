//! The driver's machine lifecycle, waits and errors, on fake machines (see support/): the
//! real driver, switches and Python bridge, with `fake_qemu.py` for QEMU and a real bash
//! for the guest's shell. Each test takes well under a second.

mod support;

use support::{MachineSourceSpec, Rig, RunOpts};

const ONE: &str = "[nodes.machine]\n";

#[test]
fn a_command_runs_in_the_guest_shell() {
    let rig = Rig::new(ONE);
    rig.run(
        "start_all()\n\
         assert machine.succeed('echo hello') == 'hello\\n'\n\
         status, out = machine.execute('echo out; exit 3')\n\
         assert (status, out) == (3, 'out\\n'), (status, out)\n\
         assert machine.succeed('echo a', 'echo b') == 'a\\nb\\n'\n",
    )
    .passed();
}

#[test]
fn succeed_raises_with_the_command_and_its_status() {
    let rig = Rig::new(ONE);
    let out = rig.run("machine.succeed('echo oops; exit 4')");
    out.failed_with(&["echo oops; exit 4", "4"]);
}

#[test]
fn fail_raises_when_the_command_succeeds() {
    let rig = Rig::new(ONE);
    rig.run("machine.fail('false')").passed();
    rig.run("machine.fail('true')").failed_with(&["true"]);
}

#[test]
fn commands_run_under_pipefail_as_upstream() {
    let rig = Rig::new(ONE);
    rig.run("machine.fail('false | true')\nmachine.fail('false; true')")
        .passed();
}

#[test]
fn a_machine_is_up_only_once_its_shell_answered() {
    let rig = Rig::new(ONE);
    rig.run(
        "assert not machine.is_up() and not machine.booted\n\
         machine.start()\n\
         assert machine.booted\n\
         machine.connect()\n\
         assert machine.is_up() and machine.connected\n",
    )
    .passed();
}

#[test]
fn start_all_launches_every_qemu_before_any_waits() {
    let rig = Rig::with_fake("[nodes.a]\n[nodes.b]\n[nodes.c]\n", &[("DELAY", "0.3")]);
    let out = rig.run("start_all()\nfor m in [a, b, c]:\n    m.succeed('true')\n");
    out.passed();
    let launched: Vec<usize> = ["a", "b", "c"]
        .iter()
        .map(|m| position(&out.events, "QEMU running", m))
        .collect();
    let first_connect = ["a", "b", "c"]
        .iter()
        .map(|m| position(&out.events, "connected to guest root shell", m))
        .min()
        .unwrap();
    assert!(
        launched.iter().all(|&at| at < first_connect),
        "{}",
        out.events
    );
}

/// The first line of `events` holding `text` for `machine`.
fn position(events: &str, text: &str, machine: &str) -> usize {
    events
        .lines()
        .position(|l| l.contains(text) && l.contains(&format!("\"machine\":\"{machine}\"")))
        .unwrap_or_else(|| panic!("no {text:?} of {machine} in\n{events}"))
}

#[test]
fn shutdown_powers_off_and_the_next_command_boots_again() {
    let rig = Rig::new(ONE);
    let out = rig.run(
        "first = machine.succeed('echo $FAKE_QEMU_PID')\n\
         machine.shutdown()\n\
         assert not machine.booted and not machine.is_up()\n\
         assert machine.succeed('echo $FAKE_QEMU_PID') != first\n",
    );
    out.passed();
    let serial = out.serial_log("machine");
    assert_eq!(serial.matches("reboot: Power down").count(), 1, "{serial}");
    assert_eq!(serial.matches("machine starting").count(), 2, "{serial}");
}

#[test]
fn crash_kills_qemu_and_the_next_command_boots_again() {
    let rig = Rig::new(ONE);
    let out = rig.run(
        "first = machine.succeed('echo $FAKE_QEMU_PID')\n\
         machine.crash()\n\
         assert not machine.booted\n\
         assert machine.succeed('echo $FAKE_QEMU_PID') != first\n",
    );
    out.passed();
    let serial = out.serial_log("machine");
    assert!(!serial.contains("Power down"), "{serial}");
    assert_eq!(serial.matches("machine starting").count(), 2, "{serial}");
}

#[test]
fn reboot_with_allow_reboot_stays_in_the_same_qemu() {
    let rig = Rig::new(ONE);
    let out = rig.run(
        "machine.start(allow_reboot=True)\n\
         qemu, shell = machine.succeed('echo $FAKE_QEMU_PID $$').split()\n\
         machine.reboot()\n\
         qemu2, shell2 = machine.succeed('echo $FAKE_QEMU_PID $$').split()\n\
         assert qemu2 == qemu and shell2 != shell, (qemu, qemu2, shell, shell2)\n",
    );
    out.passed();
    assert!(out.serial_log("machine").contains("(boot 2)"));
}

#[test]
fn reboot_without_allow_reboot_ends_qemu_and_boots_a_new_one() {
    let rig = Rig::new(ONE);
    let out = rig.run(
        "first = machine.succeed('echo $FAKE_QEMU_PID')\n\
         machine.reboot()\n\
         assert machine.succeed('echo $FAKE_QEMU_PID') != first\n",
    );
    out.passed();
    let serial = out.serial_log("machine");
    assert!(!serial.contains("(boot 2)"), "{serial}");
    assert_eq!(serial.matches("machine starting").count(), 2, "{serial}");
}

#[test]
fn reboot_then_shutdown_waits_for_the_going_down_qemu() {
    let rig = Rig::new(ONE);
    rig.run(
        "machine.succeed('true')\n\
         machine.reboot()\n\
         machine.shutdown()\n\
         assert not machine.booted\n",
    )
    .passed();
}

#[test]
fn a_guest_that_powers_itself_off_is_waited_for() {
    let rig = Rig::new(ONE);
    rig.run(
        "machine.succeed('true')\n\
         machine.execute('poweroff', check_return=False, check_output=False)\n\
         machine.wait_for_shutdown()\n\
         assert not machine.booted\n",
    )
    .passed();
}

#[test]
fn a_boot_that_never_reaches_the_shell_ends_at_the_global_timeout() {
    let rig = Rig::with_fake(ONE, &[("MODE", "no-banner")]);
    let out = rig.run_with(
        "machine.succeed('true')",
        RunOpts {
            global_timeout: 2,
            ..RunOpts::default()
        },
    );
    out.failed_with(&["global timeout of 2 s reached"]);
    assert!(out.global_timeout);
    // The log has the console's last lines: where the boot stopped.
    assert!(
        out.events.contains("had not finished booting"),
        "{}",
        out.events
    );
    assert!(
        out.events.contains("stuck before the shell"),
        "{}",
        out.events
    );
}

#[test]
fn qemu_that_exits_at_start_shows_its_error() {
    let rig = Rig::with_fake(ONE, &[("MODE", "exit-at-start")]);
    let out = rig.run("machine.succeed('true')");
    out.failed_with(&["exited during start-up"]);
    // Its stderr follows in the error (the log has all of it).
    assert!(
        out.events.contains("Could not open: fake"),
        "{}",
        out.events
    );
}

#[test]
fn a_guest_that_dies_booting_shows_its_console() {
    let rig = Rig::with_fake(ONE, &[("MODE", "die-booting")]);
    let out = rig.run("machine.succeed('true')");
    out.failed_with(&["stopped before its shell came up"]);
    assert!(
        out.events.contains("kernel panic - not syncing: fake"),
        "{}",
        out.events
    );
}

#[test]
fn a_command_past_its_timeout_is_killed_and_the_shell_goes_on() {
    let rig = Rig::new(ONE);
    let out = rig.run(
        "status, _ = machine.execute('sleep 30', timeout=1)\n\
         assert status == 124, status\n\
         assert machine.succeed('echo still here') == 'still here\\n'\n",
    );
    out.passed();
    assert!(out.elapsed.as_secs() < 20, "{:?}", out.elapsed);
}

#[test]
fn wait_until_succeeds_returns_once_the_command_succeeds() {
    let rig = Rig::new(ONE);
    rig.run(
        "machine.succeed('(sleep 0.3; echo done > flag) >/dev/null 2>&1 &')\n\
         assert machine.wait_until_succeeds('cat flag', timeout=30) == 'done\\n'\n\
         machine.wait_for_file('flag', timeout=30)\n\
         machine.wait_until_fails('rm flag; cat flag', timeout=30)\n",
    )
    .passed();
}

#[test]
fn wait_until_succeeds_gives_up_at_its_timeout() {
    let rig = Rig::new(ONE);
    let out = rig.run("machine.wait_until_succeeds('echo not yet; false', timeout=1)");
    out.failed_with(&["echo not yet; false"]);
    assert!(!out.global_timeout);
}

#[test]
fn wait_for_unit_follows_the_units_state() {
    let rig = Rig::new(ONE);
    rig.unit(
        "web.service",
        "Id=web.service\nLoadState=loaded\nActiveState=active\nSubState=running\n",
    );
    rig.unit(
        "broken.service",
        "Id=broken.service\nLoadState=loaded\nActiveState=failed\nSubState=failed\n",
    );
    rig.run(
        "machine.wait_for_unit('web.service', timeout=10)\n\
         machine.require_unit_state('web.service', 'active')\n\
         assert machine.get_unit_property('web.service', 'SubState') == 'running'\n",
    )
    .passed();
    rig.run("machine.wait_for_unit('broken.service', timeout=10)")
        .failed_with(&["broken.service", "failed"]);
    rig.run("machine.wait_for_unit('nothing.service', timeout=10)")
        .failed_with(&["nothing.service"]);
}

#[test]
fn wait_for_console_text_reads_the_console() {
    let rig = Rig::new(ONE);
    rig.run(
        "machine.start()\n\
         machine.wait_for_console_text('reached the shell', timeout=30)\n\
         assert 'machine starting' in machine.get_console_log()\n",
    )
    .passed();
    rig.run("machine.start()\nmachine.wait_for_console_text('never printed', timeout=1)")
        .failed_with(&["never printed"]);
}

#[test]
fn the_console_log_is_per_start() {
    let rig = Rig::new(ONE);
    rig.run(
        "machine.succeed('true')\n\
         machine.crash()\n\
         machine.succeed('true')\n\
         assert machine.get_console_log().count('machine starting') == 1\n",
    )
    .passed();
}

#[test]
fn monitor_replies_end_with_the_prompt() {
    let rig = Rig::new(ONE);
    rig.run(
        "machine.start()\n\
         out = machine.send_monitor_command('info status')\n\
         assert 'fake monitor: info status' in out and out.endswith('(qemu) '), repr(out)\n",
    )
    .passed();
}

#[test]
fn the_node_spec_reaches_qemus_command_line() {
    let rig = Rig::new("[nodes.machine]\nmemory = 1536\ncpus = 2\n");
    let out = rig.run("machine.forward_port(18080, 80)\nmachine.succeed('true')");
    out.passed();
    let serial = out.serial_log("machine");
    for wanted in [
        " -m 1536 ",
        " -smp 2 ",
        "hostfwd=tcp:127.0.0.1:18080-:80",
        "-no-reboot",
    ] {
        assert!(serial.contains(wanted), "{wanted:?} not in {serial}");
    }
}

#[test]
fn allow_reboot_drops_no_reboot_from_the_command_line() {
    let rig = Rig::new(ONE);
    let out = rig.run("machine.start(allow_reboot=True)\nmachine.succeed('true')");
    out.passed();
    let argv = out.serial_log("machine");
    let argv = argv.lines().find(|l| l.contains("argv")).unwrap();
    assert!(!argv.contains("-no-reboot"), "{argv}");
}

#[test]
fn block_and_unblock_set_the_machines_links() {
    let rig = Rig::new("[nodes.machine]\nvlans = [1]\n");
    let out = rig.run(
        "machine.succeed('true')\n\
         machine.block()\n\
         machine.wait_for_console_text('link vlan1 down', timeout=10)\n\
         machine.unblock()\n\
         machine.wait_for_console_text('link vlan1 up', timeout=10)\n",
    );
    out.passed();
}

#[test]
fn screenshots_are_written_as_png() {
    let rig = Rig::new("[nodes.machine]\ngraphics = true\n");
    let out = rig.run("machine.start()\nmachine.screenshot('first')");
    out.passed();
    let png = std::fs::read(out.out_dir.join("first.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
}

#[test]
fn a_screen_request_on_a_machine_without_display_says_how_to_get_one() {
    let rig = Rig::new(ONE);
    rig.run("machine.start()\nmachine.get_screen_text()")
        .failed_with(&["enableOCR is false", "graphics = true"]);
}

#[test]
fn copies_go_both_ways_and_keep_the_content() {
    let rig = Rig::new(ONE);
    let src = rig.dir.path().join("payload");
    std::fs::write(&src, "some bytes\n").unwrap();
    let inside = rig.guest.join("inside/payload");
    let out = rig.run(&format!(
        "machine.copy_from_host('{}', '{}')\n\
         assert machine.succeed('cat inside/payload') == 'some bytes\\n'\n\
         machine.copy_from_machine('{}', 'back')\n",
        src.display(),
        inside.display(),
        inside.display()
    ));
    out.passed();
    let back = std::fs::read_to_string(out.out_dir.join("back/payload")).unwrap();
    assert_eq!(back, "some bytes\n");
}

#[test]
fn directories_are_copied_with_modes_and_links_both_ways() {
    use std::os::unix::fs::PermissionsExt;
    let rig = Rig::new(ONE);
    let tree = rig.dir.path().join("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::write(tree.join("bin/tool"), "#!/bin/sh\necho tool\n").unwrap();
    std::fs::set_permissions(
        tree.join("bin/tool"),
        std::fs::Permissions::from_mode(0o751),
    )
    .unwrap();
    std::os::unix::fs::symlink("bin/tool", tree.join("link")).unwrap();
    let inside = rig.guest.join("opt/tree");
    let out = rig.run(&format!(
        "machine.copy_from_host('{tree}', '{inside}')\n\
         assert machine.succeed('{inside}/link') == 'tool\\n'\n\
         assert machine.succeed('stat -c %a {inside}/bin/tool') == '751\\n'\n\
         machine.copy_from_machine('{inside}', 'back')\n\
         machine.copy_from_host_via_shell('{tree}/bin/tool', '{inside}/via-shell')\n\
         assert machine.succeed('cat {inside}/via-shell') == '#!/bin/sh\\necho tool\\n'\n",
        tree = tree.display(),
        inside = inside.display(),
    ));
    out.passed();
    let back = out.out_dir.join("back/tree");
    let mode = std::fs::metadata(back.join("bin/tool"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o751);
    assert_eq!(
        std::fs::read_link(back.join("link")).unwrap(),
        std::path::Path::new("bin/tool")
    );
    // Nothing is left in the transfer directory, and the share is not left mounted.
    assert!(!rig.guest.join("xfer-mount").exists());
}

#[test]
fn copy_from_machine_of_a_missing_path_raises() {
    let rig = Rig::new(ONE);
    let missing = rig.guest.join("no-such-file");
    rig.run(&format!(
        "machine.copy_from_machine('{}')",
        missing.display()
    ))
    .failed_with(&["no-such-file"]);
}

#[test]
fn qemu_dying_mid_command_is_a_machine_error_with_the_console() {
    let rig = Rig::new(ONE);
    rig.run("machine.succeed('kill -9 $FAKE_QEMU_PID; sleep 2')")
        .failed_with(&["shell closed", "kill -9"]);
}

#[test]
fn the_global_timeout_ends_a_script_that_runs_too_long() {
    let rig = Rig::new(ONE);
    let out = rig.run_with(
        "machine.succeed('true')\nimport time\ntime.sleep(60)\n",
        RunOpts {
            global_timeout: 2,
            ..RunOpts::default()
        },
    );
    assert!(out.failure.is_some() && out.global_timeout, "{out:?}");
    assert!(out.elapsed.as_secs() < 30, "{:?}", out.elapsed);
}

#[test]
fn a_script_exception_names_its_line() {
    let rig = Rig::new(ONE);
    rig.run("x = 1\nraise ValueError('boom')\n")
        .failed_with(&["boom", "2"]);
}

#[test]
fn a_boot_snapshot_is_saved_once_and_restored_by_the_next_run() {
    let rig = Rig::new(ONE);
    let snapshots = || RunOpts {
        snapshots: true,
        ..RunOpts::default()
    };
    let first = rig.run_with("machine.succeed('true')", snapshots());
    first.passed();
    assert!(
        first.events.contains("saving a boot snapshot"),
        "{}",
        first.events
    );
    assert!(
        !first.events.contains("no boot snapshot saved"),
        "{}",
        first.events
    );
    let second = rig.run_with(
        "assert machine.succeed('echo restored') == 'restored\\n'",
        snapshots(),
    );
    second.passed();
    assert!(
        second.events.contains("restored from the boot snapshot"),
        "{}",
        second.events
    );
    assert!(
        !second.events.contains("saving a boot snapshot"),
        "{}",
        second.events
    );
    // The restored guest's clock was set to the host's.
    let dates = std::fs::read_to_string(rig.guest.join("date-calls")).unwrap();
    assert!(dates.starts_with("-u -s @"), "{dates}");
    // The console of the saved boot is replayed into the restored machine's log.
    assert!(second.serial_log("machine").contains("reached the shell"));
}

#[test]
fn a_system_that_does_not_settle_gets_no_snapshot_but_the_test_goes_on() {
    let rig = Rig::new(ONE);
    std::fs::write(rig.guest.join("system-state"), "starting\n").unwrap();
    let out = rig.run_with(
        "machine.succeed('true')",
        RunOpts {
            snapshots: true,
            ..RunOpts::default()
        },
    );
    out.passed();
    assert!(
        out.events.contains("no boot snapshot saved"),
        "{}",
        out.events
    );
    assert!(out.events.contains("did not settle"), "{}", out.events);
}

#[test]
fn without_snapshots_nothing_is_saved() {
    let rig = Rig::new(ONE);
    let out = rig.run("machine.succeed('true')");
    out.passed();
    assert!(!out.events.contains("snapshot"), "{}", out.events);
}

#[test]
fn a_start_command_machine_is_named_after_its_script() {
    let rig = Rig::new(ONE);
    let command = rig.start_command("run-other-vm");
    let out = rig.run_with(
        "assert other.succeed('echo from other') == 'from other\\n'\n\
         assert machine.succeed('echo from node') == 'from node\\n'\n",
        RunOpts {
            extra: vec![MachineSourceSpec {
                name: None,
                command,
            }],
            ..RunOpts::default()
        },
    );
    out.passed();
    // The NixOS driver's line: QEMU listens for QMP, the shell goes over a virtconsole.
    let serial = out.serial_log("other");
    assert!(serial.contains("-qmp unix:"), "{serial}");
}

#[test]
fn create_machine_adds_a_machine_to_a_running_test() {
    let rig = Rig::new(ONE);
    let command = rig.start_command("run-late-vm");
    rig.run(&format!(
        "late = create_machine('{command}')\n\
         assert late.name == 'late'\n\
         named = create_machine('{command}', name='named')\n\
         assert late.succeed('echo $FAKE_QEMU_PID') != named.succeed('echo $FAKE_QEMU_PID')\n"
    ))
    .passed();
}

#[test]
fn two_machines_with_one_name_are_refused() {
    let rig = Rig::new(ONE);
    let command = rig.start_command("run-machine-vm");
    rig.run_with(
        "pass",
        RunOpts {
            extra: vec![MachineSourceSpec {
                name: None,
                command,
            }],
            ..RunOpts::default()
        },
    )
    .failed_with(&["two machines are named `machine`"]);
}

/// A node with the shared directory `data` (host: `<rig>/shared`, guest: `<guest>/mnt/data`).
fn shared_dir_rig() -> (Rig, std::path::PathBuf, std::path::PathBuf) {
    let host = tempfile::tempdir().unwrap().keep();
    let rig = Rig::new(&format!(
        "[nodes.machine.shared_dirs.data]\nsource = '{}'\ntarget = '/will-be-replaced'\n",
        host.display()
    ));
    // The guest path must be inside the fake guest's directory (its shell runs on the host).
    let target = rig.guest.join("mnt/data");
    let mut rig = rig;
    let node = rig.spec.nodes.get_mut("machine").unwrap();
    node.shared_dirs.get_mut("data").unwrap().target = target.display().to_string();
    (rig, host, target)
}

#[test]
fn a_shared_directory_is_read_write_both_ways() {
    let (rig, host, target) = shared_dir_rig();
    std::fs::write(host.join("from-host"), "hello guest\n").unwrap();
    let out = rig.run(&format!(
        "assert machine.succeed('cat {t}/from-host') == 'hello guest\\n'\n\
         machine.succeed('echo hello host > {t}/from-guest')\n",
        t = target.display()
    ));
    out.passed();
    assert_eq!(
        std::fs::read_to_string(host.join("from-guest")).unwrap(),
        "hello host\n"
    );
    std::fs::remove_dir_all(host).unwrap();
}

#[test]
fn a_shared_directory_is_mounted_after_a_restore_and_a_reboot() {
    let (rig, host, target) = shared_dir_rig();
    std::fs::write(host.join("f"), "x\n").unwrap();
    let snapshots = || RunOpts {
        snapshots: true,
        ..RunOpts::default()
    };
    let script = format!(
        "machine.start(allow_reboot=True)\n\
         assert machine.succeed('cat {t}/f') == 'x\\n'\n\
         machine.reboot()\n\
         assert machine.succeed('cat {t}/f') == 'x\\n'\n",
        t = target.display()
    );
    let first = rig.run_with(&script, snapshots());
    first.passed();
    assert!(
        first.events.contains("saving a boot snapshot"),
        "{}",
        first.events
    );
    // The snapshot was saved before the mount (QEMU refuses while a 9p export is mounted).
    assert!(
        !first.events.contains("no boot snapshot saved"),
        "{}",
        first.events
    );
    let second = rig.run_with(&script, snapshots());
    second.passed();
    assert!(
        second.events.contains("restored from the boot snapshot"),
        "{}",
        second.events
    );
    std::fs::remove_dir_all(host).unwrap();
}

#[test]
fn a_failure_saves_the_running_machines_and_the_network_and_debug_restores_them() {
    let rig = Rig::new("[nodes.machine]\n\n[nodes.idle]\n");
    let failing = RunOpts {
        failure_snapshot: true,
        ..RunOpts::default()
    };
    let first = rig.run_with(
        "machine.succeed('true')\nmachine.block()\nvlan1.set_loss(20)\nvlan1.set_delay(0)\n\
         assert False, 'boom'",
        failing,
    );
    first.failed_with(&["boom"]);
    let manifest = vmrig_driver::failure::Manifest::read(&first.out_dir).unwrap();
    // The machine that ran, not the one that never started.
    let saved: Vec<&str> = manifest.machines.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(saved, ["machine"], "{manifest:?}");
    assert!(manifest.skipped.is_empty(), "{manifest:?}");
    assert_eq!(manifest.qemu_version, "QEMU emulator version 9.2.0 (fake)");
    assert_eq!(
        manifest.network.blocked.iter().collect::<Vec<_>>(),
        ["machine"]
    );
    assert_eq!(manifest.network.loss_percent.get(&1), Some(&20.0));
    assert!(manifest.network.delay_ms.is_empty(), "a zero delay is none");
    let dir = first.out_dir.join("failure-snapshot/machine");
    for file in ["state", "disk.qcow2", "console.log", "initrd"] {
        assert!(dir.join(file).exists(), "{file} was not saved");
    }
    assert!(
        first.events.contains("saved its state: "),
        "{}",
        first.events
    );
    assert!(
        first.events.contains(&format!(
            "restore it with `vmrig debug {}`",
            first.out_dir.display()
        )),
        "{}",
        first.events
    );

    // Restored: the machine is up without a boot, its links are down again.
    let debug = rig.run_with(
        "assert machine.is_up()\nassert not idle.is_up()\nmachine.succeed('true')",
        RunOpts {
            restore: Some(first.out_dir.clone()),
            ..RunOpts::default()
        },
    );
    debug.passed();
    assert!(
        debug.events.contains("restored from the failure snapshot"),
        "{}",
        debug.events
    );
    assert!(
        debug.events.contains("blocked all VLAN links"),
        "{}",
        debug.events
    );
    assert!(debug
        .serial_log("machine")
        .contains("fake-qemu: link vlan1 down"));

    // A passing script, or one with failure snapshots off, saves nothing.
    let passed = rig.run_with(
        "machine.succeed('true')",
        RunOpts {
            failure_snapshot: true,
            ..RunOpts::default()
        },
    );
    passed.passed();
    assert!(!passed.out_dir.join("failure-snapshot").exists());
    let off = rig.run("machine.succeed('true')\nassert False");
    assert!(!off.out_dir.join("failure-snapshot").exists());
}

#[test]
fn a_failure_snapshot_unmounts_shared_directories_and_debug_mounts_them_again() {
    let (rig, host, target) = shared_dir_rig();
    std::fs::write(host.join("f"), "x\n").unwrap();
    let read = format!(
        "assert machine.succeed('cat {}/f') == 'x\\n'",
        target.display()
    );
    let first = rig.run_with(
        &format!("{read}\nassert False, 'boom'"),
        RunOpts {
            failure_snapshot: true,
            ..RunOpts::default()
        },
    );
    first.failed_with(&["boom"]);
    // Saved (the fake QEMU, as QEMU, refuses to migrate with the export mounted).
    assert!(!first.events.contains("not saved"), "{}", first.events);
    let manifest = vmrig_driver::failure::Manifest::read(&first.out_dir).unwrap();
    assert_eq!(manifest.machines.len(), 1, "{manifest:?}");
    let debug = rig.run_with(
        &read,
        RunOpts {
            restore: Some(first.out_dir.clone()),
            ..RunOpts::default()
        },
    );
    debug.passed();
    assert!(debug.events.contains("restored from the failure snapshot"));
    std::fs::remove_dir_all(host).unwrap();
}

#[test]
fn the_global_timeout_saves_a_failure_snapshot_too() {
    let rig = Rig::new(ONE);
    let out = rig.run_with(
        "machine.succeed('true')\nimport time\ntime.sleep(60)",
        RunOpts {
            failure_snapshot: true,
            global_timeout: 3,
            ..RunOpts::default()
        },
    );
    assert!(out.global_timeout, "{:?}", out.failure);
    let manifest = vmrig_driver::failure::Manifest::read(&out.out_dir).unwrap();
    assert_eq!(manifest.machines.len(), 1, "{manifest:?}");
    assert!(manifest.failure.contains("global timeout"), "{manifest:?}");
}

#[test]
fn a_machine_still_booting_is_left_out_of_the_failure_snapshot_with_the_reason() {
    let rig = Rig::with_fake("[nodes.machine]\n\n[nodes.slow]\n", &[("DELAY", "30")]);
    let out = rig.run_with(
        "start_all()\nassert False, 'boom'",
        RunOpts {
            failure_snapshot: true,
            ..RunOpts::default()
        },
    );
    out.failed_with(&["boom"]);
    let manifest = vmrig_driver::failure::Manifest::read(&out.out_dir).unwrap();
    assert!(manifest.machines.is_empty(), "{manifest:?}");
    let why: Vec<&str> = manifest.skipped.iter().map(|s| s.why.as_str()).collect();
    assert_eq!(
        why, ["it had not finished booting (its shell had not answered)"; 2],
        "{manifest:?}"
    );
}
