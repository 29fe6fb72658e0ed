//! Bad input, end to end through the `vmrig` binary, without VMs or network: each class
//! of mistake gets one clear message (the file and line, or the path, and the fix) and its
//! exit code. docs/bad-input.md lists every message with the test that pins it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod common;
use common::run_dirs;

/// `vmrig ARGS` with its own store and TMPDIR under `tmp`, and none of the user's overrides.
fn vmrig_cmd(tmp: &Path, args: &[&str]) -> Command {
    let mut cmd = common::command(tmp);
    cmd.args(args)
        .env("VMRIG_STORE", tmp.join("store"))
        .env_remove("VMRIG_PYTHON")
        .env_remove("VMRIG_QEMU")
        .env_remove("VMRIG_MIRROR")
        .env_remove("VMRIG_RERUN");
    cmd
}

fn vmrig(tmp: &Path, args: &[&str]) -> Output {
    let started = Instant::now();
    let out = vmrig_cmd(tmp, args).output().expect("run vmrig");
    // Nothing here builds an image or boots a VM: every answer comes at once.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "vmrig {args:?} took {:?}",
        started.elapsed()
    );
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit code `code`, and `message` on one line of stderr (miette's `× ` or `error: ` first).
fn assert_error(out: &Output, code: i32, message: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "stderr:\n{err}");
    assert!(
        err.lines().any(|l| {
            let l = l.trim_start();
            l == message
                || l.strip_prefix("× ") == Some(message)
                || l.strip_prefix("error: ") == Some(message)
        }),
        "expected the line\n  {message}\nin stderr:\n{err}"
    );
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn executable(dir: &Path, name: &str, script: &str) -> PathBuf {
    let path = write(dir, name, &format!("#!/bin/sh\n{script}\n"));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A valid one-node test whose script compiles.
fn good_test(dir: &Path) -> PathBuf {
    write(
        dir,
        "good.toml",
        "name = \"good\"\ntest_script = '''\nstart_all()\n'''\n\n[nodes.server]\n",
    )
}

/// A QEMU that is new enough and never boots anything.
fn fake_new_qemu(dir: &Path) -> PathBuf {
    executable(
        dir,
        "qemu-system-x86_64",
        "echo 'QEMU emulator version 8.2.2'",
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ---- 1. typos and wrong types in the test file ----------------------------------------

#[test]
fn bad_input_test_file_mistakes_name_file_line_and_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let head = "name = \"t\"\ntest_script = \"start_all()\"\n\n[nodes.server]\n";
    let cases = [
        (
            "typo.toml",
            "pakages = [\"curl\"]\n",
            "5:1: unknown key `pakages` in node `server` (did you mean `packages`?)",
            "help: did you mean `packages`?",
        ),
        (
            "type.toml",
            "memory = \"1G\"\n",
            "5:10: wrong type for `memory` in node `server`: expected an integer, found a string",
            "help: `memory` takes an integer",
        ),
        (
            "port.toml",
            "firewall.allowed_tcp_ports = [70000]\n",
            "5:31: invalid port 70000 in `allowed_tcp_ports` in `firewall` of node `server`",
            "help: a port is a number from 1 to 65535",
        ),
        (
            "relative.toml",
            "files.\"etc/motd\".text = \"hi\"\n",
            "5:7: file path `etc/motd` in node `server` is not absolute",
            "help: write the full path in the guest, e.g. `files.\"/etc/motd\"`",
        ),
        (
            "groups.toml",
            "users.alice.groups = \"wheel\"\n",
            "5:22: wrong type for `groups` in user `alice` of node `server`: expected an array of strings, found a string",
            "help: write a list, e.g. `groups = [...]`",
        ),
        (
            "group-name.toml",
            "users.alice.groups = [\"Wheel\"]\n",
            "5:23: invalid group name `Wheel` in user `alice` of node `server`",
            "help: group names match [a-z_][a-z0-9_-]*, at most 32 characters",
        ),
    ];
    for (name, rest, message, help) in cases {
        let file = write(tmp.path(), name, &format!("{head}{rest}"));
        // A QEMU that does not exist: a test file error comes before anything else.
        let out = vmrig(
            tmp.path(),
            &["run", s(&file), "--qemu", "/nonexistent/qemu"],
        );
        assert_error(&out, 2, &format!("{}:{message}", file.display()));
        assert!(stderr(&out).contains(help), "{name}: {}", stderr(&out));
    }
    assert!(run_dirs(tmp.path()).is_empty());
}

#[test]
fn bad_input_shared_dir_that_is_not_a_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let head = "name = \"t\"\ntest_script = \"start_all()\"\n\n[nodes.server]\n";
    let file = write(
        tmp.path(),
        "shared.toml",
        &format!("{head}shared_dirs.data = {{ source = \"missing\", target = \"/mnt/data\" }}\n"),
    );
    let out = vmrig(
        tmp.path(),
        &["run", s(&file), "--qemu", "/nonexistent/qemu"],
    );
    assert_error(
        &out,
        2,
        &format!(
            "{}:5:31: `source` of shared directory `data` of node `server`: {}: No such file or directory (os error 2)",
            file.display(),
            tmp.path().join("missing").display()
        ),
    );
    assert!(
        stderr(&out).contains("help: `source` is a host directory"),
        "{}",
        stderr(&out)
    );

    let file = write(
        tmp.path(),
        "target.toml",
        &format!("{head}shared_dirs.data = {{ source = \".\", target = \"mnt/data\" }}\n"),
    );
    let out = vmrig(
        tmp.path(),
        &["run", s(&file), "--qemu", "/nonexistent/qemu"],
    );
    assert_error(
        &out,
        2,
        &format!(
            "{}:5:45: `target` `mnt/data` of shared directory `data` of node `server` is not absolute",
            file.display()
        ),
    );
    assert!(run_dirs(tmp.path()).is_empty());
}

// ---- 3. a missing script file -----------------------------------------------------------

#[test]
fn bad_input_local_deb_that_is_missing_or_not_a_package() {
    let tmp = tempfile::tempdir().unwrap();
    let head = "name = \"t\"\ntest_script = \"start_all()\"\n\n[nodes.server]\n";
    write(tmp.path(), "fake.deb", "a text file, not an ar archive\n");
    write(tmp.path(), "app.tar", "");
    let missing = tmp.path().join("build/nope.deb");
    let fake = tmp.path().join("fake.deb");
    let cases = [
        (
            "missing.toml",
            "packages = [\"curl\", \"./build/nope.deb\"]\n",
            format!(
                "5:21: local package `./build/nope.deb` in node `server`: {}: No such file or directory (os error 2)",
                missing.display()
            ),
            "help: the path is relative to the directory of the test file; build the package first (`dpkg-deb --build --root-owner-group DIR FILE.deb`)",
        ),
        (
            "fake.toml",
            "packages = [\"./fake.deb\"]\n",
            format!(
                "5:13: local package `./fake.deb` in node `server`: {}: is not a Debian package (no `ar` archive with a `debian-binary` member)",
                fake.display()
            ),
            "help: the path is relative to the directory of the test file",
        ),
        (
            "tar.toml",
            "packages = [\"./app.tar\"]\n",
            "5:13: `./app.tar` in node `server` is a path but not a `.deb` file".to_string(),
            "help: a path in `packages` names a Debian package file ending in `.deb`",
        ),
        (
            "user.toml",
            "users.alice.packages = [\"./fake.deb\"]\n",
            "5:25: local package file `./fake.deb` in user `alice` of node `server`".to_string(),
            "help: install local package files through the node's `packages`",
        ),
    ];
    for (name, rest, message, help) in cases {
        let file = write(tmp.path(), name, &format!("{head}{rest}"));
        let out = vmrig(
            tmp.path(),
            &["run", s(&file), "--qemu", "/nonexistent/qemu"],
        );
        assert_error(&out, 2, &format!("{}:{message}", file.display()));
        assert!(stderr(&out).contains(help), "{name}: {}", stderr(&out));
        // `vmrig build` checks the file before any image step too.
        let out = vmrig(tmp.path(), &["build", s(&file)]);
        assert_eq!(out.status.code(), Some(2), "{name}: {}", stderr(&out));
    }
    assert!(run_dirs(tmp.path()).is_empty());
}

#[test]
fn bad_input_missing_script_file() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write(
        tmp.path(),
        "t.toml",
        "name = \"t\"\ntest_script_file = \"tests/t.py\"\n\n[nodes.server]\n",
    );
    let out = vmrig(tmp.path(), &["run", s(&file)]);
    assert_error(
        &out,
        2,
        &format!(
            "{}:2:20: cannot read `test_script_file` {}: No such file or directory (os error 2)",
            file.display(),
            tmp.path().join("tests/t.py").display()
        ),
    );
    assert!(
        stderr(&out)
            .contains("help: `test_script_file` is relative to the directory of the test file"),
        "{}",
        stderr(&out)
    );
}

/// A directory `source` with a socket in it: a test-file error at the `source` value, naming
/// the socket as the test file writes its directory, before QEMU is looked for.
#[test]
fn bad_input_special_file_in_a_directory_source() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("app/run")).unwrap();
    std::fs::write(tmp.path().join("app/ok.txt"), "ok").unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(tmp.path().join("app/run/app.sock"))
        .expect("bind a unix socket");
    let file = write(
        tmp.path(),
        "t.toml",
        "name = \"t\"\ntest_script = \"start_all()\"\n\n[nodes.server]\nfiles.\"/opt/app\".source = \"app/\"\n",
    );
    let out = vmrig(
        tmp.path(),
        &["run", s(&file), "--qemu", "/nonexistent/qemu"],
    );
    assert_error(
        &out,
        2,
        &format!(
            "{}:5:27: cannot copy `source` of file `/opt/app` of node `server`: app/run/app.sock is a socket",
            file.display()
        ),
    );
    assert!(
        stderr(&out).contains("help: a directory `source` may hold only files, directories and symlinks: remove app/run/app.sock from it"),
        "{}",
        stderr(&out)
    );
}

// ---- 4. a Python syntax error, before any VM ---------------------------------------------

#[test]
fn bad_input_python_syntax_error_is_reported_before_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write(
        tmp.path(),
        "t.toml",
        "name = \"t\"\ntest_script = '''\nstart_all()\nserver.succeed(\"true\"\n'''\n\n[nodes.server]\n",
    );
    // QEMU does not exist: had vmrig got as far as QEMU, it would say so instead.
    let out = vmrig(
        tmp.path(),
        &["run", s(&file), "--qemu", "/nonexistent/qemu-system-x86_64"],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    // Python's own wording differs between versions ("'(' was never closed" since 3.10).
    let first = err.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(&format!(
            "error: {}:4:15: SyntaxError in the test script: ",
            file.display()
        )),
        "{err}"
    );
    assert!(err.contains("    server.succeed(\"true\"\n"), "{err}");
    assert!(!err.contains("qemu"), "got as far as QEMU: {err}");
    assert!(run_dirs(tmp.path()).is_empty(), "a run directory was made");
}

/// Every file (and directory) under `dir`, relative to it.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path.clone());
            }
            found.push(path.strip_prefix(dir).unwrap().to_path_buf());
        }
    }
    found
}

#[test]
fn bad_input_check_names_file_line_column_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write(
        tmp.path(),
        "t.toml",
        "name = \"t\"\ntest_script = '''\nstart_all()\nservr.succeed(\"true\")\nclient.succeed(\"curl server\", timout=5)\nserver.wait_for_unti(\"nginx.service\")\n'''\n\n[nodes.server]\n\n[nodes.client]\n",
    );
    let good = good_test(tmp.path());
    let out = vmrig(tmp.path(), &["check", s(&good), s(&file)]);
    let f = file.display();
    for line in [
        format!("{f}:4:1: undefined name `servr`; did you mean `server`?"),
        format!(
            "{f}:5:31: unknown keyword argument `timout` of `client.succeed`; did you mean \
             `timeout`? (it takes `client.succeed(*commands, timeout=...)`)"
        ),
        format!(
            "{f}:6:8: machine `server` has no attribute `wait_for_unti`; did you mean \
             `wait_for_unit`?"
        ),
    ] {
        assert_error(&out, 2, &line);
    }
    // The offending line and a caret under the mistake.
    assert!(
        stderr(&out).contains("    server.wait_for_unti(\"nginx.service\")\n           ^\n"),
        "{}",
        stderr(&out)
    );
    // A clean file passes on its own.
    let out = vmrig(tmp.path(), &["check", s(&good)]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{}: ok\n", good.display())
    );
}

#[test]
fn bad_input_run_with_a_typo_on_the_last_line_fails_before_any_build() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write(
        tmp.path(),
        "t.toml",
        "name = \"t\"\ntest_script = '''\nstart_all()\nserver.wait_for_unit(\"multi-user.target\")\nserver.succeed(\"true\")\nserver.wait_for_unti(\"nginx.service\")'''\n\n[nodes.server]\npackages = [\"nginx-light\"]\n",
    );
    let store = tmp.path().join("store");
    std::fs::create_dir(&store).unwrap();
    // A real QEMU is not needed: the run ends before QEMU is looked for.
    let out = vmrig(tmp.path(), &["run", s(&file)]);
    assert_error(
        &out,
        2,
        &format!(
            "{}:6:8: machine `server` has no attribute `wait_for_unti`; did you mean \
             `wait_for_unit`?",
            file.display()
        ),
    );
    // No image was built: the store holds no path (at most its own bookkeeping).
    let paths: Vec<PathBuf> = tree(&store)
        .into_iter()
        .filter(|p| !p.to_string_lossy().starts_with('.'))
        .collect();
    assert!(paths.is_empty(), "the store has {paths:?}");
    assert!(run_dirs(tmp.path()).is_empty(), "a run directory was made");
    assert!(
        !tmp.path().join("vmrig-out").exists(),
        "an output directory was made"
    );
}

// ---- 6. python3 missing or too old -------------------------------------------------------

#[test]
fn bad_input_python_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let file = good_test(tmp.path());
    let out = vmrig(
        tmp.path(),
        &["run", s(&file), "--python", "/nonexistent/python3"],
    );
    assert_error(
        &out,
        4,
        "good: /nonexistent/python3: not found. vmrig runs test scripts with Python 3.9 or newer: install it (e.g. `apt-get install python3`) or name another with `--python PATH` (or VMRIG_PYTHON)",
    );
}

#[test]
fn bad_input_python_too_old() {
    let tmp = tempfile::tempdir().unwrap();
    let file = good_test(tmp.path());
    let python = executable(tmp.path(), "python3", "echo 3.8");
    // Through the environment this time (the flag's twin).
    let out = vmrig_cmd(tmp.path(), &["run", s(&file)])
        .env("VMRIG_PYTHON", &python)
        .output()
        .unwrap();
    assert_error(
        &out,
        4,
        &format!("good: {} is Python 3.8, but vmrig needs Python 3.9 or newer: install a newer one (e.g. `apt-get install python3` on a current distribution) or name another with `--python PATH` (or VMRIG_PYTHON)", python.display()),
    );
}

// ---- 7. QEMU missing or too old ----------------------------------------------------------

#[test]
fn bad_input_qemu_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let file = good_test(tmp.path());
    let out = vmrig(
        tmp.path(),
        &["run", s(&file), "--qemu", "/nonexistent/qemu"],
    );
    assert_error(
        &out,
        4,
        "good: `/nonexistent/qemu` not found: install QEMU (`sudo apt-get install qemu-system-x86 qemu-utils`) or name another with `--qemu PATH` (or VMRIG_QEMU)",
    );
}

#[test]
fn bad_input_qemu_too_old() {
    let tmp = tempfile::tempdir().unwrap();
    let file = good_test(tmp.path());
    let qemu = executable(
        tmp.path(),
        "qemu-system-x86_64",
        "echo 'QEMU emulator version 4.2.0'",
    );
    let out = vmrig(tmp.path(), &["run", s(&file), "--qemu", s(&qemu)]);
    assert_error(
        &out,
        4,
        &format!("good: {} is QEMU 4.2, too old: vmrig needs QEMU 7.2 or newer (for `-netdev stream`): install a newer qemu-system-x86 or name another with `--qemu PATH` (or VMRIG_QEMU)", qemu.display()),
    );
}

#[test]
fn bad_input_qemu_that_is_not_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    let file = good_test(tmp.path());
    let qemu = executable(tmp.path(), "qemu-system-x86_64", "echo hello");
    let out = vmrig(tmp.path(), &["run", s(&file), "--qemu", s(&qemu)]);
    assert_error(
        &out,
        4,
        &format!("good: `{} --version` did not print a QEMU version (it printed \"hello\"): name the QEMU system emulator with `--qemu PATH` (or VMRIG_QEMU)", qemu.display()),
    );
}

// ---- 8. KVM forced but not usable ----------------------------------------------------------

#[test]
fn bad_input_accel_kvm_when_kvm_is_not_usable() {
    use vmrig_vm::accel::{decide, AccelChoice};
    let Err(why) = decide(AccelChoice::Kvm) else {
        // Not a missing dependency but a host where the case does not arise (so not
        // `cannot_run`, which would fail CI on KVM runners). The message itself is pinned by
        // vmrig-vm's unit test `forced_kvm_that_cannot_be_opened_says_why_and_what_to_do`.
        eprintln!(
            "not applicable: KVM is usable on this host, so `--accel kvm` does not fail here"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let file = good_test(tmp.path());
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let qemu = fake_new_qemu(&bin);
    executable(&bin, "qemu-img", "exit 0");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = vmrig_cmd(
        tmp.path(),
        &["run", s(&file), "--qemu", s(&qemu), "--accel", "kvm"],
    )
    .env("PATH", path)
    .output()
    .unwrap();
    assert_error(&out, 4, &format!("good: {why}"));
    assert!(
        why.to_string()
            .ends_with("; run with `--accel auto` (TCG when KVM cannot be used) or `--accel tcg`"),
        "{why}"
    );
}

// ---- 9. no space left ----------------------------------------------------------------------

#[test]
fn bad_input_store_on_a_full_disk() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        vmrig_testkit::cannot_run("mounting a full tmpfs needs root (the message is pinned by the unit tests in exit.rs and runner.rs)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = good_test(tmp.path());
    let full = tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    let store = full.join("store");
    // A tmpfs with no free inode, in a mount namespace of its own (gone when it exits).
    let out = Command::new("unshare")
        .args([
            "-m",
            "sh",
            "-c",
            "mount -t tmpfs -o size=64k,nr_inodes=2 vmrig-full \"$1\" || exit 99; shift; exec \"$@\"",
            "sh",
            s(&full),
            env!("CARGO_BIN_EXE_vmrig"),
            "run",
            s(&file),
            "-o",
            s(&tmp.path().join("out")),
        ])
        .current_dir(common::repo())
        .env("TMPDIR", tmp.path())
        .env("NO_COLOR", "1")
        .env("VMRIG_STORE", &store)
        .env_remove("VMRIG_RERUN")
        .output();
    match out {
        Ok(out) if out.status.code() == Some(99) || out.status.code().is_none() => {
            vmrig_testkit::cannot_run(&format!("cannot mount a tmpfs here: {}", stderr(&out)));
        }
        Err(e) => vmrig_testkit::cannot_run(&format!("cannot run unshare: {e}")),
        Ok(out) => {
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(4), "{err}");
            let want = format!(
                "error: no space left on the disk of {} (the image store, ",
                store.display()
            );
            let first = err.lines().next().unwrap_or_default();
            assert!(first.starts_with(&want), "{err}");
            assert!(
                first.ends_with(" free): remove unused images with `vmrig store gc`, free space on that disk, or set VMRIG_STORE to a directory on a bigger disk"),
                "{err}"
            );
            assert!(
                err.contains(&format!(
                    "  cause: failed to open the image store: create directory {}/.locks: No space left on device (os error 28)",
                    store.display()
                )),
                "{err}"
            );
        }
    }
}

// ---- 10. an output directory that cannot be made -------------------------------------------

#[test]
fn bad_input_output_dir_under_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let file = good_test(tmp.path());
    let afile = write(tmp.path(), "afile", "not a directory");
    let out_dir = afile.join("out");
    // Checked before the store, the images and QEMU: nothing is built first.
    let out = vmrig(
        tmp.path(),
        &[
            "run",
            s(&file),
            "-o",
            s(&out_dir),
            "--qemu",
            "/nonexistent/qemu",
        ],
    );
    assert_error(
        &out,
        4,
        &format!(
            "cannot create the output directory {}: {} is not a directory; choose another with `-o DIR`",
            out_dir.display(),
            afile.display()
        ),
    );
    assert!(!tmp.path().join("store").exists(), "the store was opened");
}

#[test]
fn bad_input_output_dir_where_no_directory_can_be_made() {
    let tmp = tempfile::tempdir().unwrap();
    let file = good_test(tmp.path());
    // Not even root can make a directory in /proc.
    let out = vmrig(
        tmp.path(),
        &[
            "run",
            s(&file),
            "-o",
            "/proc/vmrig-out",
            "--qemu",
            "/nonexistent/qemu",
        ],
    );
    assert_error(
        &out,
        4,
        "cannot create the output directory /proc/vmrig-out: cannot make a directory in /proc (No such file or directory (os error 2)); choose another with `-o DIR`",
    );
}

// ---- the command line --------------------------------------------------------------------

#[test]
fn bad_input_unknown_flag_suggests_the_right_one() {
    let tmp = tempfile::tempdir().unwrap();
    let file = good_test(tmp.path());
    let out = vmrig(tmp.path(), &["run", "--pyton", "python3", s(&file)]);
    assert_error(&out, 2, "unexpected argument '--pyton' found");
    assert!(
        stderr(&out).contains("tip: a similar argument exists: '--python'"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_input_test_file_that_does_not_exist() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("no-such-test.toml");
    let out = vmrig(tmp.path(), &["run", s(&file)]);
    assert_error(
        &out,
        2,
        &format!(
            "{}: cannot read test file: No such file or directory (os error 2)",
            file.display()
        ),
    );
    assert!(
        stderr(&out).contains("help: check the path of the test file"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_input_directory_without_tests() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tests");
    std::fs::create_dir(&dir).unwrap();
    write(&dir, "notes.md", "not a test");
    for cmd in ["run", "list"] {
        let out = vmrig(tmp.path(), &[cmd, s(&dir)]);
        assert_error(
            &out,
            2,
            &format!(
                "{}: no test files (*.toml) in this directory; name test files or a directory that holds some",
                dir.display()
            ),
        );
    }
}

#[test]
fn bad_input_nixos_driver_checks_its_script_before_any_machine() {
    let tmp = tempfile::tempdir().unwrap();
    let script = write(
        tmp.path(),
        "test.py",
        "start_all()\nalpha.wait_for_unti(\"multi-user.target\")\n",
    );
    // The start script does not exist: had the driver got as far as a machine, it would say so.
    let out = vmrig(
        tmp.path(),
        &[
            "nixos-driver",
            "--start-scripts",
            "/nonexistent/run-alpha-vm",
            "--",
            s(&script),
        ],
    );
    assert_error(
        &out,
        2,
        &format!(
            "{}:2:7: machine `alpha` has no attribute `wait_for_unti`; did you mean \
             `wait_for_unit`?",
            script.display()
        ),
    );
    assert!(run_dirs(tmp.path()).is_empty(), "a run directory was made");
}

#[test]
fn bad_input_cache_url() {
    let tmp = tempfile::tempdir().unwrap();
    let test = write(
        tmp.path(),
        "t.toml",
        "name = \"t\"\ntest_script = \"start_all()\"\n[nodes.a]\n",
    );
    let forms = "s3://BUCKET/PREFIX, file:///PATH, http(s)://HOST/PATH (read-only), \
                 gcs://BUCKET/PREFIX, azblob://CONTAINER/PREFIX or ghac://PREFIX";
    let out = vmrig(tmp.path(), &["--cache", "ftp://host/x", "build", s(&test)]);
    assert_error(
        &out,
        2,
        &format!(
            "use \"ftp://host/x\" as a cache: vmrig has no cache backend `ftp` (write {forms})"
        ),
    );
    // Credentials in the URL: refused, and never shown.
    let out = vmrig_cmd(tmp.path(), &["list", s(&test)])
        .env("VMRIG_CACHE", "s3://KEYID:SECRET@bucket/x")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!stderr(&out).contains("SECRET"), "{}", stderr(&out));
    assert!(stderr(&out).contains("credentials do not belong in the URL"));
    assert!(
        !tmp.path().join("store").join(".tmp").exists(),
        "the store was opened"
    );
}

#[test]
fn bad_input_unreachable_cache() {
    let tmp = tempfile::tempdir().unwrap();
    // Nothing listens on port 9 (discard): refused at once.
    let out = vmrig(
        tmp.path(),
        &["--cache", "http://127.0.0.1:9/cache", "cache", "status"],
    );
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with(
            "error: failed to reach the prefix in the cache http://127.0.0.1:9/cache: "
        ),
        "{err}"
    );
    assert!(err.trim_end().ends_with("check the URL, the network, and the credentials in the provider's environment variables or configuration files"), "{err}");
}

// ---- vmrig debug: failure snapshots it cannot restore ---------------------------------------

/// `<tmp>/out/failure-snapshot/manifest.json` saved by this vmrig with QEMU 7.2.0 under TCG,
/// changed by `edit`, and a QEMU that says it is 7.2.0.
fn failure_snapshot(tmp: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> (PathBuf, PathBuf) {
    let dir = tmp.join("out/failure-snapshot");
    std::fs::create_dir_all(&dir).unwrap();
    let mut manifest = serde_json::json!({
        "format": "vmrig-failure-snapshot-1",
        "vmrig_version": env!("CARGO_PKG_VERSION"),
        "qemu_version": "QEMU emulator version 7.2.0",
        "accel": "tcg",
        "test_file": tmp.join("t.toml"),
        "failure": "t.toml:3: AssertionError: boom",
        "machines": [],
        "skipped": [],
        "network": {"loss_percent": {}, "delay_ms": {}, "partitions": [], "blocked": []},
        "store_paths": [],
    });
    edit(&mut manifest);
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    let qemu = executable(
        tmp,
        "qemu-system-x86_64",
        "echo 'QEMU emulator version 7.2.0'",
    );
    (tmp.join("out"), qemu)
}

#[test]
fn bad_input_debug_without_a_failure_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let out = vmrig(tmp.path(), &["debug", s(tmp.path())]);
    assert_error(
        &out,
        2,
        &format!("{} holds no failure snapshot ({}/failure-snapshot/manifest.json is missing): a run saves one in its output directory when its test fails (unless --no-failure-snapshots or VMRIG_NO_FAILURE_SNAPSHOTS is set)", tmp.path().display(), tmp.path().display()),
    );
}

#[test]
fn bad_input_debug_with_another_qemu_or_vmrig() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, qemu) = failure_snapshot(tmp.path(), |m| {
        m["qemu_version"] = "QEMU emulator version 9.9.9".into();
    });
    let result = vmrig(
        tmp.path(),
        &["debug", s(&out), "--qemu", s(&qemu), "-c", "pass"],
    );
    assert_error(
        &result,
        4,
        &format!("this failure snapshot was saved with QEMU \"QEMU emulator version 9.9.9\"; {} is \"QEMU emulator version 7.2.0\", which cannot restore it: name that QEMU with `--qemu PATH` (or VMRIG_QEMU), or run the test again to save a new one", qemu.display()),
    );
    let tmp = tempfile::tempdir().unwrap();
    let (out, qemu) = failure_snapshot(tmp.path(), |m| {
        m["vmrig_version"] = "0.0.1".into();
    });
    let result = vmrig(tmp.path(), &["debug", s(&out), "--qemu", s(&qemu)]);
    assert_error(
        &result,
        4,
        &format!("this failure snapshot was saved by vmrig 0.0.1; this is vmrig {}, which cannot restore it: debug it with vmrig 0.0.1, or run the test again to save a new one", env!("CARGO_PKG_VERSION")),
    );
    let tmp = tempfile::tempdir().unwrap();
    let (out, qemu) = failure_snapshot(tmp.path(), |m| {
        m["format"] = "vmrig-failure-snapshot-0".into();
    });
    let result = vmrig(tmp.path(), &["debug", s(&out), "--qemu", s(&qemu)]);
    assert_error(
        &result,
        4,
        &format!("this failure snapshot has format \"vmrig-failure-snapshot-0\", which vmrig {} cannot restore (it restores \"vmrig-failure-snapshot-1\"): run the test again to save a new one", env!("CARGO_PKG_VERSION")),
    );
}

#[test]
fn bad_input_debug_with_a_store_path_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let gone = tmp.path().join("store/0123-rootfs-trixie");
    let (out, qemu) = failure_snapshot(tmp.path(), |m| {
        m["store_paths"] = serde_json::json!([gone]);
    });
    let result = vmrig(tmp.path(), &["debug", s(&out), "--qemu", s(&qemu)]);
    assert_error(
        &result,
        4,
        &format!("store paths this failure snapshot needs are gone: {} (`vmrig build {}` brings the images back); run the test again to save a new one", gone.display(), tmp.path().join("t.toml").display()),
    );
}

#[test]
fn bad_input_debug_when_the_test_file_lost_a_saved_machine() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, qemu) = failure_snapshot(tmp.path(), |m| {
        m["machines"] = serde_json::json!([{
            "name": "server", "backing": "/store/x/root.img", "backing_format": "raw",
            "allow_reboot": false, "forwards": [], "bytes": 1, "save_seconds": 1.0,
        }]);
    });
    let copy = out.join("failure-snapshot/test.toml");
    std::fs::write(
        &copy,
        "name = \"t\"\ntest_script = 'pass'\n\n[nodes.other]\n",
    )
    .unwrap();
    let result = vmrig(tmp.path(), &["debug", s(&out), "--qemu", s(&qemu)]);
    assert_error(
        &result,
        2,
        &format!("the test file {} no longer describes the machines of this failure snapshot (it has no node `server`); restore its saved copy {} or run the test again", tmp.path().join("t.toml").display(), copy.display()),
    );
}
