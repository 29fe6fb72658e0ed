//! `vmrig` killed at many moments (SIGKILL; SIGINT and SIGTERM): nothing it started may
//! outlive it, and the store must stay usable. In the nextest `vm` group (one at a time).
//!
//! Each moment starts `vmrig` with its own `TMPDIR` and an environment tag, watches its
//! output (stderr, and the script's prints on stdout) for a marker line (or polls the store),
//! waits a little and kills it. Within 5 s no process may remain whose command line mentions
//! that `TMPDIR` or a store build directory of the killed driver, or whose environment carries
//! the tag (QEMU, the Python child, the run-directory watcher, build tools); `TMPDIR` must be
//! empty again (no run directory, no switch socket); nothing may stay mounted under it or in
//! the killed driver's build directories; every store path must be complete. A line that ends
//! the moment must not have been printed before the kill (the kill landed inside it).
//!
//! After a kill of a VM run the same test runs again and must pass: the script reads
//! `VMRIG_KILL_MODE`, so killed runs go on to their moment while the next run only boots and
//! runs a command. Image builds are too slow to finish after every kill (a root image takes
//! over a minute on a 2-core TCG host): they run in a fresh store where each run resumes the
//! build the previous kill interrupted (the kernel is rebuilt before the initramfs is killed,
//! and so on), and at the end the kernel and initramfs are complete and no root image was
//! published.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod common;

/// How long after the kill everything must be gone.
const CLEANUP_BUDGET: Duration = Duration::from_secs(5);
/// Bounds on reaching a moment and on a whole run (TCG on shared cores is slow).
const MARKER_TIMEOUT: Duration = Duration::from_secs(180);
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

/// What the killed `vmrig` runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Scenario {
    /// One node with the shared image (`packages = ["less"]`): boots from its snapshot.
    Single,
    /// The same, booted cold (`--no-snapshots`; the next run uses the snapshot).
    SingleCold,
    /// A node whose boot snapshot is new (a file unique to this test run): it saves one.
    Save,
    /// Two nodes on VLAN 1, with `--capture`.
    Net,
    /// One node with a display (`graphics = true`, booted cold: `snapshot = false`).
    Graphics,
    /// `vmrig build -v` of the single node into a fresh store.
    Build,
    /// `vmrig run -v` of the single node into a fresh store.
    BuildRun,
}

/// When to kill (then wait the moment's delay).
#[derive(Clone, Copy, Debug)]
enum Trigger {
    /// Right after spawning.
    Spawn,
    /// When a line of output contains this text.
    Line(&'static str),
    /// When the killed driver's snapshot build directory holds a non-empty `state` file:
    /// QEMU is writing its migration stream into the store.
    SnapshotStream,
    /// When a process of the run (its command line mentions the run's `TMPDIR`) whose
    /// command line contains this text is alive.
    Process(&'static str),
}

struct Moment {
    name: &'static str,
    scenario: Scenario,
    /// `VMRIG_KILL_MODE` for the script of the killed run.
    mode: &'static str,
    trigger: Trigger,
    delay_ms: u64,
    /// A line that ends the moment: it must not be in the output of the killed run.
    until: Option<&'static str>,
    /// A line that must be in the output of the killed run (what it had to redo first).
    after: Option<&'static str>,
    /// SIGKILL, or SIGINT/SIGTERM: then `vmrig` must say so and exit with 128 + the signal.
    signal: i32,
}

impl Moment {
    const fn new(
        name: &'static str,
        scenario: Scenario,
        mode: &'static str,
        trigger: Trigger,
        delay_ms: u64,
    ) -> Moment {
        Moment {
            name,
            scenario,
            mode,
            trigger,
            delay_ms,
            until: None,
            after: None,
            signal: libc::SIGKILL,
        }
    }

    const fn until(mut self, line: &'static str) -> Moment {
        self.until = Some(line);
        self
    }

    const fn after(mut self, line: &'static str) -> Moment {
        self.after = Some(line);
        self
    }

    const fn signal(mut self, signal: i32) -> Moment {
        self.signal = signal;
        self
    }
}

use Scenario::*;
use Trigger::*;

/// SIGKILL moments of VM runs, in the order they run.
const VM_MOMENTS: &[Moment] = &[
    Moment::new("startup (30 ms after exec)", Single, "check", Spawn, 30),
    Moment::new("image lookup", Single, "check", Line("cached: kernel"), 0),
    Moment::new(
        "script running, no VM yet",
        Single,
        "idle",
        Line("vmrig-kill: script started"),
        150,
    )
    .until("starting vm"),
    Moment::new("QEMU spawning", Single, "check", Line("starting vm"), 0)
        .until("restoring the VM from its boot snapshot"),
    Moment::new(
        "restoring a boot snapshot",
        Single,
        "check",
        Line("restoring the VM from its boot snapshot"),
        250,
    )
    .until("restored from the boot snapshot"),
    Moment::new(
        "right after the restore",
        Single,
        "check",
        Line("restored from the boot snapshot"),
        0,
    ),
    Moment::new(
        "mid-command (sleep 30)",
        Single,
        "command",
        Line("must succeed: sleep 30"),
        1000,
    )
    .until("(finished: must succeed: sleep 30"),
    Moment::new(
        "copy_from_host",
        Single,
        "copy-in",
        Line("machine: copying /"),
        300,
    )
    .until("(finished: copying /"),
    Moment::new(
        "copy_from_machine",
        Single,
        "copy-out",
        Line("from the guest to"),
        100,
    )
    .until("(finished: copying /root/out.bin"),
    Moment::new(
        "shutdown",
        Single,
        "shutdown",
        Line("waiting for the VM to power off"),
        400,
    )
    .until("(finished: waiting for the VM to power off"),
    Moment::new(
        "teardown after the script",
        Single,
        "check",
        Line("(finished: run the VM test script"),
        0,
    ),
    Moment::new(
        "cold boot, before the banner",
        SingleCold,
        "check",
        Line("waiting for the VM to finish booting"),
        1500,
    )
    .until("connected to guest root shell"),
    Moment::new(
        "cold boot, right after the banner",
        SingleCold,
        "check",
        Line("connected to guest root shell"),
        0,
    ),
    Moment::new(
        "saving a boot snapshot (migration)",
        Save,
        "check",
        SnapshotStream,
        0,
    )
    .until("(finished: saving a boot snapshot"),
    Moment::new(
        "network setup (switch up, no QEMU)",
        Net,
        "check",
        Line("capturing VLAN 1"),
        0,
    )
    .until("QEMU running"),
    Moment::new(
        "two VMs pinging over the VLAN",
        Net,
        "ping",
        Line("must succeed: ping -c 40"),
        1000,
    )
    .until("(finished: must succeed: ping -c 40"),
    Moment::new(
        "screenshot (back to back)",
        Graphics,
        "shots",
        Line("screenshot saved to"),
        30,
    )
    .until("vmrig-kill: screenshots done"),
    Moment::new(
        "OCR (tesseract running)",
        Graphics,
        "ocr",
        Process("tesseract"),
        0,
    ),
];

/// SIGKILL moments of image builds into a fresh store, in this order: each run resumes what
/// the previous kill interrupted.
const BUILD_MOMENTS: &[Moment] = &[
    Moment::new(
        "vmrig run: kernel download",
        BuildRun,
        "check",
        Line("building kernel"),
        300,
    )
    .until("I: extracting archives")
    .signal(libc::SIGTERM),
    Moment::new(
        "vmrig build: kernel download",
        Build,
        "check",
        Line("building kernel"),
        300,
    )
    .until("I: extracting archives")
    .signal(libc::SIGINT),
    Moment::new(
        "vmrig build: kernel download",
        Build,
        "check",
        Line("building kernel"),
        300,
    )
    .until("I: extracting archives"),
    Moment::new(
        "kernel extraction (mmdebstrap)",
        BuildRun,
        "check",
        Line("kernel (linux-image-amd64, trixie): I: extracting archives"),
        1000,
    )
    .until("I: success in"),
    Moment::new(
        "kernel unpack (vmlinux, depmod)",
        BuildRun,
        "check",
        Line("kernel (linux-image-amd64, trixie): I: success in"),
        1500,
    )
    .until("built kernel"),
    Moment::new(
        "initramfs",
        BuildRun,
        "check",
        Line("building initramfs"),
        0,
    )
    .after("built kernel (linux-image-amd64, trixie)"),
    Moment::new(
        "vmrig build: root image download",
        Build,
        "check",
        Line("building root image"),
        300,
    )
    .until("root image for machine: I: extracting archives"),
    Moment::new(
        "root image: installing in the chroot",
        BuildRun,
        "check",
        Line("root image for machine: I: installing essential packages"),
        1500,
    )
    .until("root image for machine: I: installing remaining packages"),
];

/// SIGINT and SIGTERM: `vmrig` stops everything, says so and exits with 128 + the signal.
const SIGNAL_MOMENTS: &[Moment] = &[
    Moment::new(
        "script running, no VM yet",
        Single,
        "idle",
        Line("vmrig-kill: script started"),
        150,
    )
    .signal(libc::SIGINT),
    Moment::new(
        "mid-command (sleep 30)",
        Single,
        "command",
        Line("must succeed: sleep 30"),
        800,
    )
    .signal(libc::SIGINT),
    Moment::new(
        "restoring a boot snapshot",
        Single,
        "check",
        Line("restoring the VM from its boot snapshot"),
        250,
    )
    .signal(libc::SIGTERM),
    Moment::new(
        "mid-command (sleep 30)",
        Single,
        "command",
        Line("must succeed: sleep 30"),
        800,
    )
    .signal(libc::SIGTERM),
];

const SINGLE_SCRIPT: &str = r#"
import os, time
mode = os.environ.get("VMRIG_KILL_MODE", "check")
print("vmrig-kill: script started", mode, flush=True)
if mode == "idle":
    time.sleep(120)
machine.succeed("true")
if mode == "command":
    machine.succeed("sleep 30")
elif mode == "copy-in":
    machine.copy_from_host(__big__, "/root/big")
elif mode == "copy-out":
    machine.succeed("head -c 2000000 /dev/urandom > /root/out.bin")
    machine.copy_from_machine("/root/out.bin", "copied")
elif mode == "shutdown":
    machine.shutdown()
"#;

const GRAPHICS_SCRIPT: &str = r#"
import os
mode = os.environ.get("VMRIG_KILL_MODE", "check")
machine.succeed("true")
machine.screenshot("shot")
if mode == "shots":
    for i in range(500):
        machine.screenshot(f"shot{i}")
    print("vmrig-kill: screenshots done", flush=True)
elif mode == "ocr":
    try:
        machine.wait_for_text("vmrig-kill-never-on-screen", timeout=120)
    except Exception:
        pass
"#;

const NET_SCRIPT: &str = r#"
import os
mode = os.environ.get("VMRIG_KILL_MODE", "check")
start_all()
# start_all() does not wait for the guests: b must be up before a pings it.
b.succeed("true")
a.wait_until_succeeds("ping -c 1 -W 2 b", timeout=60)
if mode == "ping":
    a.succeed("ping -c 40 -i 0.2 b")
"#;

/// The test files of the scenarios and the directories of the runs.
struct Fixture {
    base: tempfile::TempDir,
    single: PathBuf,
    save: PathBuf,
    net: PathBuf,
    graphics: PathBuf,
    /// The store of the VM scenarios (the default one: images and snapshots are shared).
    store: PathBuf,
    /// A fresh store for the build moments.
    fresh_store: PathBuf,
    /// Store paths that existed before this test.
    store_before: BTreeSet<String>,
    /// Pids of killed drivers (their store build directories are removed at the end).
    killed: Vec<u32>,
    counter: usize,
}

impl Fixture {
    fn new() -> Fixture {
        let base = tempfile::tempdir().unwrap();
        let files = base.path().join("files");
        std::fs::create_dir(&files).unwrap();
        // Copying it into the guest takes a few seconds.
        let big = files.join("big.bin");
        std::fs::write(&big, vec![b'x'; 150_000]).unwrap();
        let single = files.join("killme.toml");
        let script = SINGLE_SCRIPT.replace("__big__", &format!("{:?}", big.to_str().unwrap()));
        std::fs::write(
            &single,
            format!("name = \"killme\"\ntest_script = '''{script}'''\n\n[nodes.machine]\npackages = [\"less\"]\n"),
        )
        .unwrap();
        // A file unique to this test run: the node's boot snapshot does not exist yet, and
        // the node's name makes the snapshot's store path recognisable for the cleanup.
        let nonce = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let save = files.join("killsave.toml");
        std::fs::write(
            &save,
            format!(
                "name = \"killsave\"\ntest_script = \"killsave.succeed('true')\"\n\n[nodes.killsave]\npackages = [\"less\"]\nfiles.\"/etc/vmrig-kill-nonce\".text = \"{nonce}\"\n"
            ),
        )
        .unwrap();
        let net = files.join("killnet.toml");
        std::fs::write(
            &net,
            format!(
                "name = \"killnet\"\ntest_script = '''{NET_SCRIPT}'''\n\n[defaults]\npackages = [\"less\"]\n\n[nodes.a]\n[nodes.b]\n"
            ),
        )
        .unwrap();
        let graphics = files.join("killscreen.toml");
        std::fs::write(
            &graphics,
            format!(
                "name = \"killscreen\"\ntest_script = '''{GRAPHICS_SCRIPT}'''\n\n[nodes.machine]\nsnapshot = false\npackages = [\"less\"]\ngraphics = true\n"
            ),
        )
        .unwrap();
        let store = vmrig_store::default_store_dir().expect("a store directory");
        let store_before = store_paths(&store);
        let fresh_store = base.path().join("store");
        Fixture {
            base,
            single,
            save,
            net,
            graphics,
            store,
            fresh_store,
            store_before,
            killed: Vec::new(),
            counter: 0,
        }
    }

    fn file(&self, scenario: Scenario) -> &Path {
        match scenario {
            Single | SingleCold | Build | BuildRun => &self.single,
            Save => &self.save,
            Net => &self.net,
            Graphics => &self.graphics,
        }
    }

    /// A new, empty directory (a `TMPDIR`, an output directory).
    fn dir(&mut self, what: &str) -> PathBuf {
        self.counter += 1;
        let dir = self.base.path().join(format!("{what}-{}", self.counter));
        std::fs::create_dir(&dir).unwrap();
        dir
    }

    /// `vmrig` for `scenario` with its own `TMPDIR` and tag. A `killed` run gets the
    /// scenario's special arguments (a cold boot); runs after a kill use the defaults.
    fn invocation(&mut self, scenario: Scenario, mode: &str, killed: bool) -> Invocation {
        let tmp = self.dir("tmp");
        let out = self.dir("out");
        let tag = format!("vm_kill-{}-{}", std::process::id(), self.counter);
        let mut cmd = common::command(&tmp);
        match scenario {
            Build => cmd.args(["build", "-v"]),
            BuildRun => cmd.args(["run", "-v"]),
            _ => cmd.arg("run"),
        };
        if scenario != Build {
            cmd.arg("-o").arg(&out);
        }
        if scenario == SingleCold && killed {
            cmd.arg("--no-snapshots");
        }
        if scenario == Net {
            cmd.arg("--capture");
        }
        cmd.arg(self.file(scenario))
            .env("VMRIG_RERUN", "true")
            .env_remove("VMRIG_NO_SNAPSHOTS")
            .env("VMRIG_KILL_MODE", mode)
            .env("VMRIG_KILL_TAG", &tag);
        let store = if matches!(scenario, Build | BuildRun) {
            cmd.env("VMRIG_STORE", &self.fresh_store);
            self.fresh_store.clone()
        } else {
            self.store.clone()
        };
        Invocation {
            cmd,
            tmp,
            tag,
            store,
        }
    }
}

struct Invocation {
    cmd: Command,
    tmp: PathBuf,
    tag: String,
    store: PathBuf,
}

/// A running `vmrig` whose output lines (stdout and stderr) arrive on a channel.
struct Watched {
    child: Child,
    lines: Receiver<String>,
    log: Vec<String>,
    started: Instant,
}

impl Watched {
    fn spawn(cmd: &mut Command) -> Watched {
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmrig");
        let (tx, rx) = channel();
        let streams: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        for stream in streams {
            let tx = tx.clone();
            // Detached: a process that survives the driver may hold the pipe open.
            std::thread::spawn(move || {
                for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                    if tx
                        .send(String::from_utf8_lossy(&line).into_owned())
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
        Watched {
            child,
            lines: rx,
            log: Vec::new(),
            started,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
    }

    /// The rest of the output, once every writer closed its end (bounded).
    fn finish_output(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => self.log.push(line),
                Err(_) => break,
            }
        }
    }

    fn saw(&self, text: &str) -> bool {
        self.log.iter().any(|l| l.contains(text))
    }

    fn output(&mut self) -> String {
        self.drain();
        self.log.join("\n")
    }

    /// Waits until `trigger` holds: an error if `vmrig` ends first or it takes too long.
    fn wait_for(&mut self, trigger: Trigger, inv: &Invocation) -> Result<(), String> {
        let deadline = Instant::now() + MARKER_TIMEOUT;
        loop {
            let reached = match trigger {
                Spawn => true,
                Line(marker) => self.saw(marker),
                SnapshotStream => snapshot_stream_started(&inv.store, self.pid()),
                Process(text) => process_running(&inv.tmp, text),
            };
            if reached {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{trigger:?} not reached within {MARKER_TIMEOUT:?}"));
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("vmrig ended ({status}) before {trigger:?}"));
            }
            match self.lines.recv_timeout(Duration::from_millis(20)) {
                Ok(line) => self.log.push(line),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
            }
        }
    }

    /// Waits for the exit, up to `timeout` (then kills it): the exit code.
    fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain();
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether the snapshot build directory of driver `pid` holds a non-empty migration stream.
fn snapshot_stream_started(store: &Path, pid: u32) -> bool {
    store_tmp_of(store, pid).iter().any(|dir| {
        dir.to_string_lossy().contains("-snapshot-")
            && dir.join("state").metadata().is_ok_and(|m| m.len() > 0)
    })
}

/// Whether a process mentioning `tmp` and `text` on its command line is alive.
fn process_running(tmp: &Path, text: &str) -> bool {
    let tmp = format!("{}/", tmp.display());
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        cmdline.contains(&tmp) && cmdline.contains(text)
    })
}

/// The store paths (`<hash>-<name>`) of a store.
fn store_paths(store: &Path) -> BTreeSet<String> {
    std::fs::read_dir(store)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// Store paths that miss what every path of their kind has.
fn incomplete_store_paths(store: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    for name in store_paths(store) {
        let needs: &[&str] = if name.contains("-kernel-") {
            &["vmlinuz", "version", "lib/modules"]
        } else if name.ends_with("-initramfs") {
            &["initrd"]
        } else if name.contains("-rootfs-base-") {
            // The base tree that local .deb packages are layered on.
            &["root.tar"]
        } else if name.contains("-rootfs-") {
            &["root.img"]
        } else if name.contains("-snapshot-") {
            &["state", "disk.qcow2"]
        } else {
            &[]
        };
        let path = store.join(&name);
        let missing: Vec<&str> = needs
            .iter()
            .copied()
            .filter(|f| !path.join(f).exists())
            .collect();
        if !missing.is_empty() {
            bad.push(format!("{name} lacks {missing:?}"));
        }
    }
    bad
}

/// `<store>/.tmp` entries of driver `pid` (`<hash>-<name>.<pid>.<random>`).
fn store_tmp_of(store: &Path, pid: u32) -> Vec<PathBuf> {
    let needle = format!(".{pid}.");
    std::fs::read_dir(store.join(".tmp"))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().contains(&needle))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// What a dead driver left behind.
#[derive(Default)]
struct Leftovers {
    /// Live processes: (pid, description).
    procs: Vec<(i32, String)>,
    /// Files, directories and sockets in its `TMPDIR`.
    files: Vec<String>,
    /// Mount points in its `TMPDIR` or its store build directories, deepest first.
    mounts: Vec<PathBuf>,
}

impl Leftovers {
    fn is_empty(&self) -> bool {
        self.procs.is_empty() && self.files.is_empty() && self.mounts.is_empty()
    }

    fn describe(&self) -> Vec<String> {
        let mut what: Vec<String> = self.procs.iter().map(|(_, d)| d.clone()).collect();
        what.extend(self.files.iter().take(10).cloned());
        what.extend(self.mounts.iter().map(|m| format!("mount {}", m.display())));
        what
    }

    /// Kills what survived and detaches its mounts, so that later moments and the host are
    /// not disturbed by a leak.
    fn remove(&self) {
        for (pid, _) in &self.procs {
            // SAFETY: plain syscall; the pid was just found running the dead driver's work.
            unsafe {
                libc::kill(*pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        detach(&self.mounts);
    }
}

fn leftovers(inv: &Invocation, pid: u32) -> Leftovers {
    let me = std::process::id() as i32;
    // With the separator: `tmp-3` must not match `tmp-31`.
    let tmp = format!("{}/", inv.tmp.display());
    let build_dirs = store_tmp_of(&inv.store, pid);
    let build_dir_names: Vec<String> = build_dirs
        .iter()
        .map(|p| format!("{}/", p.display()))
        .collect();
    let tag = format!("VMRIG_KILL_TAG={}", inv.tag);
    let mut procs = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(") ")
            .is_none_or(|(_, rest)| rest.starts_with('Z'));
        if p == me || zombie {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let environ = std::fs::read(format!("/proc/{p}/environ")).unwrap_or_default();
        let why = if cmdline.contains(&tmp) {
            "mentions its TMPDIR"
        } else if build_dir_names.iter().any(|d| cmdline.contains(d.as_str())) {
            "works in its store build directory"
        } else if environ.split(|b| *b == 0).any(|v| v == tag.as_bytes()) {
            "has its environment"
        } else {
            continue;
        };
        let short: String = cmdline.trim_end().chars().take(150).collect();
        procs.push((p, format!("pid {p} ({why}): {short}")));
    }
    let files = walk(&inv.tmp)
        .into_iter()
        .map(|(path, kind)| format!("{kind} {}", path.display()))
        .collect();
    let mut prefixes = vec![inv.tmp.clone()];
    prefixes.extend(build_dirs);
    Leftovers {
        procs,
        files,
        mounts: mounts_under(&prefixes),
    }
}

/// Everything under `dir`, with its kind.
fn walk(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    use std::os::unix::fs::FileTypeExt;
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            let kind = if t.is_dir() {
                stack.push(e.path());
                "dir"
            } else if t.is_socket() {
                "socket"
            } else {
                "file"
            };
            found.push((e.path(), kind));
        }
    }
    found
}

/// Mount points at or under one of `prefixes`, deepest first.
fn mounts_under(prefixes: &[PathBuf]) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| prefixes.iter().any(|p| m.starts_with(p)))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    found
}

fn detach(mounts: &[PathBuf]) {
    for m in mounts {
        let c = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: umount2 with a valid C string; a failure leaves the mount as it was.
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
}

/// How the cleanup after a driver went.
struct Cleanup {
    took: Duration,
    /// What was still there at the first look (for the summary), if anything.
    waited_for: Option<String>,
}

/// Polls until the driver `pid` (run as `inv`) left nothing behind, up to
/// [`CLEANUP_BUDGET`] after `since`; an error lists what is still there (then removed).
fn wait_until_clean(inv: &Invocation, pid: u32, since: Instant) -> Result<Cleanup, String> {
    let mut waited_for = None;
    loop {
        let left = leftovers(inv, pid);
        if left.is_empty() {
            return Ok(Cleanup {
                took: since.elapsed(),
                waited_for,
            });
        }
        if waited_for.is_none() {
            waited_for = left.describe().into_iter().next();
        }
        if since.elapsed() > CLEANUP_BUDGET {
            left.remove();
            let _ = std::fs::remove_dir_all(&inv.tmp);
            return Err(format!(
                "{} s after the kill still there:\n    {}",
                CLEANUP_BUDGET.as_secs(),
                left.describe().join("\n    ")
            ));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Where a kill landed, for the summary.
struct Killed {
    pid: u32,
    /// From the start of `vmrig` to the trigger.
    triggered: Duration,
    cleanup: Cleanup,
}

/// Sends `signal` to `vmrig` at `m`'s moment and checks what it left. Problems go to
/// `problems`; `None` if the moment was never reached.
fn kill_at(fx: &mut Fixture, m: &Moment, problems: &mut Vec<String>) -> Option<Killed> {
    let signal = m.signal;
    let mut inv = fx.invocation(m.scenario, m.mode, true);
    let mut run = Watched::spawn(&mut inv.cmd);
    let pid = run.pid();
    fx.killed.push(pid);
    if let Err(e) = run.wait_for(m.trigger, &inv) {
        let _ = run.child.kill();
        let _ = run.child.wait();
        problems.push(format!("{}: {e}; output:\n{}", m.name, run.output()));
        if let Err(e) = wait_until_clean(&inv, pid, Instant::now()) {
            problems.push(format!("{}: {e}", m.name));
        }
        return None;
    }
    let triggered = run.started.elapsed();
    std::thread::sleep(Duration::from_millis(m.delay_ms));
    let killed_at = Instant::now();
    // SAFETY: plain syscall on our own child, which is not reaped yet.
    unsafe {
        libc::kill(pid as i32, signal);
    }
    let code = run.wait(Duration::from_secs(30));
    let cleanup = match wait_until_clean(&inv, pid, killed_at) {
        Ok(c) => c,
        Err(e) => {
            problems.push(format!("{}: {e}", m.name));
            Cleanup {
                took: CLEANUP_BUDGET,
                waited_for: None,
            }
        }
    };
    run.finish_output();
    if let Some(until) = m.until.filter(|u| run.saw(u)) {
        problems.push(format!(
            "{}: the kill came too late (`{until}` was printed before it):\n{}",
            m.name,
            run.output()
        ));
    }
    if let Some(after) = m.after.filter(|a| !run.saw(a)) {
        problems.push(format!(
            "{}: `{after}` missing from the output:\n{}",
            m.name,
            run.output()
        ));
    }
    if signal != libc::SIGKILL {
        let (name, want) = if signal == libc::SIGINT {
            ("SIGINT", 130)
        } else {
            ("SIGTERM", 143)
        };
        let said =
            format!("vmrig: interrupted by {name}: stopping all VMs and removing temporary files");
        if code != Some(want) || !run.saw(&said) {
            problems.push(format!(
                "{}: {name}: exit code {code:?} (want {want}), and `{said}` on stderr:\n{}",
                m.name,
                run.output()
            ));
        }
    }
    for bad in incomplete_store_paths(&inv.store) {
        problems.push(format!("{}: half-written store path: {bad}", m.name));
    }
    Some(Killed {
        pid,
        triggered,
        cleanup,
    })
}

/// Runs the scenario's test to its end after a kill: it must pass and leave nothing; the
/// killed driver's store build directories must be gone (the run rebuilt those paths).
fn next_run_passes(
    fx: &mut Fixture,
    m: &Moment,
    killed_pid: u32,
    problems: &mut Vec<String>,
) -> Duration {
    let started = Instant::now();
    let mut inv = fx.invocation(m.scenario, "check", false);
    let mut run = Watched::spawn(&mut inv.cmd);
    let pid = run.pid();
    let code = run.wait(RUN_TIMEOUT);
    let took = started.elapsed();
    if code != Some(0) {
        problems.push(format!(
            "{}: the next run ended with {code:?}:\n{}",
            m.name,
            run.output()
        ));
    }
    if let Err(e) = wait_until_clean(&inv, pid, Instant::now()) {
        problems.push(format!(
            "{}: the next run (a normal exit) left: {e}",
            m.name
        ));
    }
    let stale = store_tmp_of(&inv.store, killed_pid);
    if !stale.is_empty() {
        problems.push(format!(
            "{}: build directories of the killed driver are still in the store: {stale:?}",
            m.name
        ));
    }
    took
}

/// Removes what the test put into the shared store: the snapshots of its `killsave` node
/// (unique to the run) and build directories of the drivers it killed.
fn clean_store(fx: &Fixture) {
    for name in store_paths(&fx.store) {
        if !fx.store_before.contains(&name) && name.ends_with("-snapshot-killsave") {
            let _ = std::fs::remove_dir_all(fx.store.join(&name));
        }
    }
    for pid in &fx.killed {
        for dir in store_tmp_of(&fx.store, *pid) {
            detach(&mounts_under(std::slice::from_ref(&dir)));
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn summary(m: &Moment, k: &Killed, then: &str) {
    let signal = match m.signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "SIGKILL",
    };
    let waited = k
        .cleanup
        .waited_for
        .as_deref()
        .map(|w| format!(" (waited for {})", w.chars().take(70).collect::<String>()))
        .unwrap_or_default();
    println!(
        "vm_kill: {:<40} {signal:<7} at {:>6.2} s +{:>4} ms: clean after {:>4} ms{waited}; {then}",
        m.name,
        k.triggered.as_secs_f64(),
        m.delay_ms,
        k.cleanup.took.as_millis(),
    );
}

#[test]
fn sigkill_at_every_moment_of_a_run_leaves_nothing_and_the_next_run_passes() {
    let started = Instant::now();
    let mut fx = Fixture::new();
    let mut problems = Vec::new();
    for m in VM_MOMENTS {
        let before = store_paths(&fx.store);
        let Some(k) = kill_at(&mut fx, m, &mut problems) else {
            continue;
        };
        let next = next_run_passes(&mut fx, m, k.pid, &mut problems);
        if m.scenario == Save
            && !store_paths(&fx.store)
                .difference(&before)
                .any(|n| n.ends_with("-snapshot-killsave"))
        {
            problems.push(format!("{}: the next run saved no snapshot", m.name));
        }
        summary(
            m,
            &k,
            &format!("next run passed in {:.1} s", next.as_secs_f64()),
        );
    }
    clean_store(&fx);
    println!(
        "vm_kill: {} moments of a run in {:.1} s",
        VM_MOMENTS.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

#[test]
fn sigkill_during_image_builds_leaves_nothing_and_no_half_written_store_path() {
    let started = Instant::now();
    let mut fx = Fixture::new();
    let mut problems = Vec::new();
    for m in BUILD_MOMENTS {
        let Some(k) = kill_at(&mut fx, m, &mut problems) else {
            continue;
        };
        summary(m, &k, "the next build resumes");
    }
    // Each run rebuilt what the kill before it interrupted: the kernel and the initramfs
    // are complete (checked after every kill), and no root image was published.
    let paths = store_paths(&fx.fresh_store);
    for kind in ["-kernel-", "-initramfs", "-rootfs-"] {
        let want = kind != "-rootfs-";
        if paths.iter().any(|p| p.contains(kind)) != want {
            problems.push(format!("store paths after the builds: {paths:?}"));
        }
    }
    let tmp = fx.dir("tmp");
    let list = common::command(&tmp)
        .args(["list", fx.single.to_str().unwrap()])
        .env("VMRIG_STORE", &fx.fresh_store)
        .output()
        .unwrap();
    let listing = common::text(&list);
    if list.status.code() != Some(0) || !listing.contains("rootfs     not built") {
        problems.push(format!("`vmrig list` after the builds:\n{listing}"));
    }
    // Whatever happened, nothing may stay mounted in the temporary store when it goes.
    detach(&mounts_under(std::slice::from_ref(&fx.fresh_store)));
    println!(
        "vm_kill: {} moments of image builds in {:.1} s",
        BUILD_MOMENTS.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

#[test]
fn sigint_and_sigterm_stop_everything_and_exit_130_and_143() {
    let started = Instant::now();
    let mut fx = Fixture::new();
    let mut problems = Vec::new();
    for m in SIGNAL_MOMENTS {
        if let Some(k) = kill_at(&mut fx, m, &mut problems) {
            summary(m, &k, "exit code and message checked");
        }
    }
    println!(
        "vm_kill: {} SIGINT/SIGTERM moments in {:.1} s",
        SIGNAL_MOMENTS.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}
