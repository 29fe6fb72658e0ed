//! What the real-VM test files share: running the `vmrig` binary and checking that a run
//! left nothing behind.
#![allow(dead_code)] // each test file uses a different part

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The repository root (examples are relative to it).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds what the examples take from a build, as their comments say: `kv`
/// (examples/own-program.toml) with cargo and the package of examples/deb-daemon.toml with
/// `dpkg-deb` (reproducibly: an unchanged source is the same file, so images stay cached).
/// Until then those examples do not parse (their `source`/package files are missing). Tests
/// in several processes call it at once: a lock file makes one build at a time.
pub fn build_example_artifacts() {
    let repo = repo();
    let lock = std::fs::File::create(Path::new(env!("CARGO_TARGET_TMPDIR")).join("examples.lock"))
        .expect("create the examples' lock file");
    // SAFETY: flock on a file we own; released when `lock` is dropped.
    assert_eq!(
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) },
        0
    );
    let built = Command::new(env!("CARGO"))
        .current_dir(&repo)
        .args(["build", "--release", "-p", "kv-example", "--target-dir"])
        .arg(repo.join("examples/own-program/target"))
        .output()
        .expect("run cargo");
    assert!(built.status.success(), "cargo: {}", text(&built));
    let dir = repo.join("examples/deb-daemon");
    let built = Command::new("dpkg-deb")
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .args(["--build", "--root-owner-group"])
        .arg(dir.join("hello-daemon"))
        .arg(dir.join("hello-daemon.deb"))
        .output()
        .expect("run dpkg-deb");
    assert!(built.status.success(), "dpkg-deb: {}", text(&built));
}

/// Runs `cmd` with `input` on its stdin (a REPL's typed lines), stdout and stderr captured.
pub fn output_with_input(cmd: &mut Command, input: &str) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the command");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// `vmrig` run from the repository root with its own `TMPDIR` (run directories land there).
/// It gets SIGTERM when the test's thread ends, so a test runner killed from outside (a CI
/// timeout) leaves no `vmrig run` behind; vmrig's own cleanup then stops its VMs.
pub fn command(tmp: &Path) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmrig"));
    cmd.current_dir(repo())
        .env("TMPDIR", tmp)
        .env("NO_COLOR", "1");
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// `vmrig ARGS` with its own `TMPDIR`, never answered from the result cache (these tests
/// are about running).
pub fn vmrig_rerun(args: &[&str], tmp: &Path) -> Output {
    command(tmp)
        .args(args)
        .env("VMRIG_RERUN", "true")
        .output()
        .expect("run vmrig")
}

/// Stdout and stderr together.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// QEMU processes whose command line mentions `dir` (their sockets live there).
pub fn qemu_pids_under(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.contains("qemu-system") && cmdline.contains(&needle)
        })
        .collect()
}

/// Run directories (`vmrig-run-*`) in `tmp`.
pub fn run_dirs(tmp: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(tmp)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vmrig-run-")
        })
        .collect()
}

/// Live processes that runs using `tmp` started, directly or not: they inherit
/// `TMPDIR=<tmp>` (vmrig, its QEMUs, the script's python3, the run directory's watcher,
/// build tools, start scripts) or name a path in it (QEMU's sockets live there). Zombies
/// hold nothing and are not counted. As (pid, command line).
pub fn processes_under(tmp: &Path) -> Vec<(u32, String)> {
    let dir = tmp.to_string_lossy().into_owned();
    let in_dir = format!("{dir}/");
    let env_entry = format!("TMPDIR={dir}");
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            if stat.rsplit_once(')')?.1.trim_start().starts_with('Z') {
                return None;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let inherited = environ.split(|b| *b == 0).any(|v| {
                let v = String::from_utf8_lossy(v);
                v == env_entry || v.starts_with(&format!("{env_entry}/"))
            });
            let named = args
                .iter()
                .any(|a| a.contains(&in_dir) || a.ends_with(&dir));
            (inherited || named).then(|| (pid, args.join(" ")))
        })
        .collect()
}

/// Waits (a few seconds at most: a process may still be ending) until `done` holds.
fn settles(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// No process left from runs that used `tmp` (see [`processes_under`]).
pub fn assert_no_processes_left(tmp: &Path) {
    if !settles(|| processes_under(tmp).is_empty()) {
        panic!("processes left running: {:#?}", processes_under(tmp));
    }
}

/// No run directory and no process (QEMU or any other) left from runs that used `tmp`.
/// Every real-VM test ends with it (`-K` runs keep their run directory on purpose: they
/// check [`assert_no_processes_left`]).
pub fn assert_no_leftovers(tmp: &Path) {
    assert_no_processes_left(tmp);
    assert!(
        settles(|| run_dirs(tmp).is_empty()),
        "run dirs left: {:?}",
        run_dirs(tmp)
    );
}
