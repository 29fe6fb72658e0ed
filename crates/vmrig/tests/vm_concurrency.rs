//! Several vmrig processes on one store at once, with real VMs: the same test twice, two
//! tests sharing an image, `vmrig store gc` while a run uses its paths. In the nextest `vm`
//! group (one test at a time; the runs inside a test are concurrent).
//!
//! Each test has a store of its own (`VMRIG_STORE`) holding the image the other VM tests
//! use (`packages = ["less"]`), hard-linked from the default store: nothing is built, every
//! test starts without boot snapshots (so concurrent runs race to save one), and `store gc
//! --all` here cannot touch anyone else's paths.
//!
//! Concurrent builds of one image (two `vmrig build` of one file) are
//! `vm.rs`'s `concurrent_builds_of_one_file_build_once_and_both_succeed`.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vmrig_image::{ImageBuilder, Quiet};
use vmrig_store::{Store, StoreKey};

mod common;
use common::{assert_no_leftovers, text};

/// A one-node test file with the shared image; bounded by its own global timeout.
fn test_file(dir: &Path, name: &str, node: &str, script: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\nglobal_timeout = 300\ntest_script = '''\n{script}\n'''\n\n[nodes.{node}]\npackages = [\"less\"]\n"
        ),
    )
    .unwrap();
    path
}

/// A store of one test's own, next to the default store (so hard links work), removed
/// when dropped.
struct PrivateStore {
    dir: tempfile::TempDir,
    /// `<hash>-<name>` of the imported kernel, initramfs and root image.
    image: Vec<String>,
}

impl PrivateStore {
    /// Imports the images of the tests in `files` from the default store (building them
    /// there first if needed, as any VM test would).
    fn with_images_of(files: &[&Path]) -> PrivateStore {
        let default = Store::open_default().unwrap();
        let parent = default.root().parent().unwrap();
        let dir = tempfile::Builder::new()
            .prefix("vmrig-test-store-")
            .tempdir_in(parent)
            .unwrap();
        let private = Store::open(dir.path()).unwrap();
        let builder = ImageBuilder::new(&default, &Quiet);
        let mut image = Vec::new();
        for file in files {
            let spec = vmrig_spec::load(file).unwrap();
            let images = builder.build_test(&spec).unwrap();
            for (node, paths) in &images {
                // Nobody's gc removes them while they are linked.
                let _guards: Vec<_> = paths
                    .store_paths()
                    .into_iter()
                    .map(|p| default.use_path(p).unwrap())
                    .collect();
                import(&private, &paths.kernel.key(), paths.kernel.path());
                import(&private, &paths.initramfs.key(), paths.initramfs.path());
                // The root image's key names the kernel's path (its modules are copied from
                // there): in this store it is this store's kernel.
                let kernel = private.lookup(&paths.kernel.key()).unwrap();
                let rootfs =
                    vmrig_image::rootfs::key(&spec.nodes[node].image_inputs(), &kernel).unwrap();
                import(&private, &rootfs, paths.rootfs.path());
                for key in [paths.kernel.key(), paths.initramfs.key(), rootfs] {
                    if !image.contains(&key.base_name()) {
                        image.push(key.base_name());
                    }
                }
            }
            // vmrig finds every image in this store: a run builds nothing.
            let listed = Command::new(env!("CARGO_BIN_EXE_vmrig"))
                .arg("list")
                .arg(file)
                .env("VMRIG_STORE", dir.path())
                .output()
                .unwrap();
            assert!(
                listed.status.success() && !text(&listed).contains("not built"),
                "{}",
                text(&listed)
            );
        }
        PrivateStore { dir, image }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// `vmrig` on this store, never answering from the result cache or skipping snapshots.
    fn vmrig(&self, tmp: &Path) -> Command {
        let mut cmd = common::command(tmp);
        cmd.env("VMRIG_STORE", self.root())
            .env_remove("VMRIG_RERUN")
            .env_remove("VMRIG_NO_SNAPSHOTS");
        cmd
    }

    /// Store path names (`<hash>-<name>`) whose name is `name`.
    fn paths_named(&self, name: &str) -> Vec<String> {
        let suffix = format!("-{name}");
        let mut names: Vec<String> = std::fs::read_dir(self.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with('.') && n.ends_with(&suffix))
            .collect();
        names.sort();
        names
    }

    /// Builds, stores away or deletes nothing is going on: no temporary directories.
    fn assert_tmp_empty(&self) {
        let left: Vec<_> = std::fs::read_dir(self.root().join(".tmp"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "left in the store's .tmp: {left:?}");
    }
}

/// Copies `from` into `store` as `key`, by hard links where the file system allows.
fn import(store: &Store, key: &StoreKey, from: &Path) {
    if store.lookup(key).is_some() {
        return;
    }
    let staging = store
        .root()
        .join(".tmp")
        .join(format!("{}.import", key.base_name()));
    let linked = Command::new("cp")
        .arg("-al")
        .arg(from)
        .arg(&staging)
        .status()
        .unwrap();
    if !linked.success() {
        let _ = std::fs::remove_dir_all(&staging);
        let copied = Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(from)
            .arg(&staging)
            .status()
            .unwrap();
        assert!(copied.success(), "copying {}", from.display());
    }
    std::fs::rename(&staging, store.root().join(key.base_name())).unwrap();
}

/// Runs every command at once (each waited for on its own thread, so no pipe fills up).
fn all_at_once(commands: Vec<Command>) -> Vec<Output> {
    std::thread::scope(|s| {
        let handles: Vec<_> = commands
            .into_iter()
            .map(|mut cmd| s.spawn(move || cmd.output().expect("run vmrig")))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn run_args(cmd: &mut Command, file: &Path, out: &Path) {
    cmd.arg("run").arg("--rerun").arg(file).arg("-o").arg(out);
}

/// The script both runs of one test run: the guest is booted, its disk is its own.
const OWN_DISK: &str = "machine.succeed(\"test ! -e /root/mine && touch /root/mine\")\nmachine.succeed(\"test \\\"$(hostname)\\\" = machine\")";

#[test]
fn the_same_test_twice_at_once_both_pass_and_save_one_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let file = test_file(tmp.path(), "twice", "machine", OWN_DISK);
    let store = PrivateStore::with_images_of(&[&file]);

    // The same test twice at once, each with its own output directory.
    let run_pair = |outs: [&str; 2]| {
        all_at_once(
            outs.iter()
                .map(|out| {
                    let mut cmd = store.vmrig(tmp.path());
                    run_args(&mut cmd, &file, &tmp.path().join(out));
                    cmd
                })
                .collect(),
        )
    };
    // No snapshot yet: both boot cold and both try to save one; one does.
    let outs = run_pair(["a1", "b1"]);
    for out in &outs {
        assert_eq!(out.status.code(), Some(0), "{}", text(out));
        assert!(text(out).contains("test twice passed"), "{}", text(out));
    }
    assert_eq!(
        store.paths_named("snapshot-machine").len(),
        1,
        "one snapshot:\n{}\n---\n{}",
        text(&outs[0]),
        text(&outs[1])
    );
    store.assert_tmp_empty();

    // Now both restore that snapshot at once.
    let outs = run_pair(["a2", "b2"]);
    for out in &outs {
        let log = text(out);
        assert_eq!(out.status.code(), Some(0), "{log}");
        assert!(log.contains("restored from the boot snapshot"), "{log}");
    }
    assert_eq!(store.paths_named("snapshot-machine").len(), 1);
    store.assert_tmp_empty();
    assert_no_leftovers(tmp.path());
}

#[test]
fn two_tests_sharing_an_image_at_once_both_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let alpha = test_file(tmp.path(), "alpha", "machine", OWN_DISK);
    let beta = test_file(
        tmp.path(),
        "beta",
        "peer",
        "peer.succeed(\"test \\\"$(hostname)\\\" = peer\")\npeer.succeed(\"less --version\")",
    );
    let store = PrivateStore::with_images_of(&[&alpha, &beta]);
    assert_eq!(
        store.image.len(),
        3,
        "one image for both: {:?}",
        store.image
    );

    let outs = all_at_once(
        [(&alpha, "alpha"), (&beta, "beta")]
            .iter()
            .map(|(file, out)| {
                let mut cmd = store.vmrig(tmp.path());
                run_args(&mut cmd, file, &tmp.path().join(out));
                cmd
            })
            .collect(),
    );
    assert_eq!(outs[0].status.code(), Some(0), "{}", text(&outs[0]));
    assert!(text(&outs[0]).contains("test alpha passed"));
    assert_eq!(outs[1].status.code(), Some(0), "{}", text(&outs[1]));
    assert!(text(&outs[1]).contains("test beta passed"));
    // Each node saved its own snapshot; nothing else was added to the store.
    assert_eq!(store.paths_named("snapshot-machine").len(), 1);
    assert_eq!(store.paths_named("snapshot-peer").len(), 1);
    let mut all: Vec<String> = std::fs::read_dir(store.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with('.'))
        .filter(|n| !n.contains("-snapshot-"))
        .collect();
    all.sort();
    let mut image = store.image.clone();
    image.sort();
    assert_eq!(all, image, "nothing was built");
    store.assert_tmp_empty();
    assert_no_leftovers(tmp.path());
}

/// `vmrig store list`'s IN USE column for `name`, None if it is not listed.
fn in_use(listing: &str, name: &str) -> Option<bool> {
    listing.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some(name)).then(|| line.trim_end().ends_with(" yes"))
    })
}

#[test]
fn store_gc_during_a_run_removes_nothing_it_uses() {
    let tmp = tempfile::tempdir().unwrap();
    let go = tmp.path().join("go-on");
    // After the gcs, the machine boots again (not from the snapshot: a restart keeps its
    // disk), so the kernel, the root image and the snapshot's disk layer are read again.
    let script = format!(
        r#"import os, time
machine.succeed("touch /root/before-gc")
print("vmrig-test: running", flush=True)
deadline = time.time() + 120
while not os.path.exists({go:?}):
    assert time.time() < deadline, "never told to go on"
    time.sleep(0.1)
machine.shutdown()
machine.start()
machine.succeed("test -e /root/before-gc")"#,
        go = go.display().to_string()
    );
    let file = test_file(tmp.path(), "gc-while-running", "machine", &script);
    let store = PrivateStore::with_images_of(&[&file]);

    // A first run of the same node saves the boot snapshot that the second one restores
    // (and so uses).
    let warm_up = test_file(
        tmp.path(),
        "warm-up",
        "machine",
        "machine.succeed(\"true\")",
    );
    let mut cmd = store.vmrig(tmp.path());
    run_args(&mut cmd, &warm_up, &tmp.path().join("warm-up-out"));
    let first = cmd.output().unwrap();
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    let snapshot = store.paths_named("snapshot-machine");
    assert_eq!(snapshot.len(), 1, "{}", text(&first));
    let mut used = store.image.clone();
    used.push(snapshot[0].clone());

    // Paths nobody uses, which the gcs below must remove.
    let private = Store::open(store.root()).unwrap();
    let unused = |name: &str| {
        private
            .build(&StoreKey::new(name, b"unused"), |dir| {
                std::fs::write(dir.join("f"), "x")
            })
            .unwrap()
            .base_name()
    };
    let (unused_snapshot, unused_other) = (unused("snapshot-nobody"), unused("nobody"));

    let stderr = std::fs::File::create(tmp.path().join("run.log")).unwrap();
    let mut cmd = store.vmrig(tmp.path());
    run_args(&mut cmd, &file, &tmp.path().join("out"));
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap_or_default();
            if line.contains("vmrig-test: running") {
                let _ = tx.send(());
            }
        }
    });
    let running = rx.recv_timeout(Duration::from_secs(180));
    let run_log = || std::fs::read_to_string(tmp.path().join("run.log")).unwrap_or_default();
    if running.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the run never got going:\n{}", run_log());
    }

    let store_cmd = |args: &[&str]| {
        let out = store
            .vmrig(tmp.path())
            .arg("store")
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let listing = store_cmd(&["list"]);
    for name in &used {
        assert_eq!(in_use(&listing, name), Some(true), "{name}:\n{listing}");
    }
    assert_eq!(in_use(&listing, &unused_other), Some(false), "{listing}");

    let gc_snapshots = store_cmd(&["gc", "--snapshots", "--all"]);
    assert!(
        gc_snapshots.contains(&format!("removed {unused_snapshot} ")),
        "{gc_snapshots}"
    );
    assert!(
        gc_snapshots.contains(&format!("kept {} (in use)", snapshot[0])),
        "{gc_snapshots}"
    );
    assert!(
        store.root().join(&unused_other).is_dir(),
        "--snapshots removed a path that is no snapshot"
    );
    let gc_all = store_cmd(&["gc", "--all"]);
    assert!(
        gc_all.contains(&format!("removed {unused_other} ")),
        "{gc_all}"
    );
    for name in &used {
        assert!(
            gc_all.contains(&format!("kept {name} (in use)")),
            "{name}:\n{gc_all}"
        );
        assert!(store.root().join(name).is_dir(), "{name} was removed");
    }
    assert!(!store.root().join(&unused_snapshot).exists());
    assert!(!store.root().join(&unused_other).exists());
    let listing = store_cmd(&["list"]);
    for name in &used {
        assert_eq!(in_use(&listing, name), Some(true), "{name}:\n{listing}");
    }

    std::fs::write(&go, "").unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(240) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the run did not end:\n{}", run_log());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    reader.join().unwrap();
    let log = run_log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("restored from the boot snapshot"), "{log}");
    assert!(log.contains("test gc-while-running passed"), "{log}");
    // Done: nothing is in use any more.
    let listing = store_cmd(&["list"]);
    for name in &used {
        assert_eq!(in_use(&listing, name), Some(false), "{name}:\n{listing}");
    }
    store.assert_tmp_empty();
    assert_no_leftovers(tmp.path());
}
