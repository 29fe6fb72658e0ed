//! Integration tests for the store. Some tests re-execute this test binary as
//! a child process (see `child_process_role`) to get real concurrent
//! processes and real SIGKILLs.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant, SystemTime};

use vmrig_store::{GcPolicy, Store, StoreError, StoreKey};

const ROLE_ENV: &str = "VMRIG_STORE_TEST_ROLE";
const DIR_ENV: &str = "VMRIG_STORE_TEST_DIR";
const ID_ENV: &str = "VMRIG_STORE_TEST_ID";
const KEY_NAME: &str = "shared-image";
const KEY_MATERIAL: &[u8] = b"shared material v1";

fn new_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    (dir, store)
}

fn dir_names(path: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(path)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Entries at the store root other than the bookkeeping directories.
fn store_paths(store: &Store) -> Vec<String> {
    dir_names(store.root())
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect()
}

fn tmp_entries(store: &Store) -> Vec<String> {
    dir_names(&store.root().join(".tmp"))
}

fn append_line(path: &Path, line: &str) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    writeln!(f, "{line}").unwrap();
}

fn count_lines(path: &Path) -> usize {
    fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

fn set_last_used(store: &Store, key: &StoreKey, t: SystemTime) {
    let f = File::options()
        .write(true)
        .open(store.root().join(".uses").join(key.base_name()))
        .unwrap();
    f.set_modified(t).unwrap();
}

fn days_ago(days: u64) -> SystemTime {
    SystemTime::now() - Duration::from_secs(days * 24 * 60 * 60)
}

/// Polls for `path` to exist. The deadline only keeps a broken test from
/// hanging forever; nothing is asserted about durations.
fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn spawn_child(role: &str, dir: &Path, id: usize) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_role",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE_ENV, role)
        .env(DIR_ENV, dir)
        .env(ID_ENV, id.to_string())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn flock_exclusive(path: &Path) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    // SAFETY: valid fd.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    f
}

/// Not a test of its own: the body of the child processes spawned by other
/// tests. Does nothing when run normally.
#[test]
fn child_process_role() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    let dir = PathBuf::from(std::env::var(DIR_ENV).unwrap());
    let id = std::env::var(ID_ENV).unwrap();
    let store = Store::open(dir.join("store")).unwrap();
    let key = StoreKey::new(KEY_NAME, KEY_MATERIAL);
    match role.as_str() {
        "build" => {
            fs::write(dir.join(format!("ready-{id}")), "").unwrap();
            let sp = store
                .build(&key, |out| -> std::io::Result<()> {
                    append_line(&dir.join("count"), &id);
                    // Give the other process time to pile up on the lock.
                    std::thread::sleep(Duration::from_millis(200));
                    fs::write(out.join("data"), format!("built by {id}"))
                })
                .unwrap();
            fs::write(
                dir.join(format!("result-{id}")),
                sp.path().to_str().unwrap(),
            )
            .unwrap();
        }
        "hang" => {
            let _ = store.build(&key, |out| -> std::io::Result<()> {
                fs::write(out.join("half-written"), vec![7u8; 4096])?;
                fs::write(dir.join("started"), "")?;
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
            unreachable!();
        }
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn build_then_lookup() {
    let (_dir, store) = new_store();
    let key = StoreKey::new("kernel", b"linux 6.1 v1");
    assert_eq!(store.lookup(&key), None);
    let sp = store
        .build(&key, |out| fs::write(out.join("vmlinuz"), b"kernel"))
        .unwrap();
    assert_eq!(sp.name(), "kernel");
    assert_eq!(sp.hash(), key.hash());
    assert_eq!(sp.path(), store.root().join(key.base_name()));
    assert_eq!(fs::read(sp.path().join("vmlinuz")).unwrap(), b"kernel");
    assert_eq!(store.lookup(&key), Some(sp.clone()));
    // A second build finds it without running the builder.
    let again = store
        .build(&key, |_| -> Result<(), String> { panic!("rebuilt") })
        .unwrap();
    assert_eq!(again, sp);
    assert!(tmp_entries(&store).is_empty());
    let entries = store.list().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].name, "kernel");
    assert_eq!(entries[0].hash, key.hash());
    assert_eq!(entries[0].path, sp.path());
    assert!(entries[0].last_used.is_some());
    assert!(!entries[0].in_use);
    assert!(entries[0].size_bytes > 0);
}

#[test]
fn failing_builder_leaves_nothing() {
    let (_dir, store) = new_store();
    let key = StoreKey::new("rootfs", b"m");
    let err = store
        .build(&key, |out| {
            fs::write(out.join("partial"), b"x").unwrap();
            Err("mmdebstrap exited with status 1")
        })
        .unwrap_err();
    match &err {
        StoreError::Build { path, source } => {
            assert_eq!(path, &store.root().join(key.base_name()));
            assert_eq!(source.to_string(), "mmdebstrap exited with status 1");
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err.to_string().starts_with("build "), "{err}");
    assert_eq!(store.lookup(&key), None);
    assert!(store_paths(&store).is_empty());
    assert!(tmp_entries(&store).is_empty());
    // The lock was released: building again works.
    store.build(&key, |_| Ok::<_, String>(())).unwrap();
    assert!(store.lookup(&key).is_some());
}

#[test]
fn panicking_builder_leaves_nothing() {
    let (_dir, store) = new_store();
    let key = StoreKey::new("rootfs", b"m");
    let result = std::panic::catch_unwind(|| {
        store.build(&key, |out| -> Result<(), String> {
            fs::write(out.join("partial"), b"x").unwrap();
            panic!("builder bug");
        })
    });
    assert!(result.is_err());
    assert_eq!(store.lookup(&key), None);
    assert!(store_paths(&store).is_empty());
    assert!(tmp_entries(&store).is_empty());
    store.build(&key, |_| Ok::<_, String>(())).unwrap();
    assert!(store.lookup(&key).is_some());
}

#[test]
fn builder_error_types_anyhow_like_boxes() {
    let (_dir, store) = new_store();
    let key = StoreKey::new("x", b"m");
    let err = store
        .build(
            &key,
            |_| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
                Err(std::io::Error::other("io failed").into())
            },
        )
        .unwrap_err();
    let source = std::error::Error::source(&err).unwrap();
    assert_eq!(source.to_string(), "io failed");
}

#[test]
fn eight_threads_build_once() {
    let (_dir, store) = new_store();
    let key = StoreKey::new("image", b"threads");
    let runs = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (store, key, runs, barrier) =
                (store.clone(), key.clone(), runs.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                store
                    .build(&key, |out| {
                        runs.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(100));
                        fs::write(out.join("f"), b"content")
                    })
                    .unwrap()
            })
        })
        .collect();
    let paths: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(paths.iter().all(|p| p == &paths[0]));
    assert_eq!(fs::read(paths[0].path().join("f")).unwrap(), b"content");
    assert!(tmp_entries(&store).is_empty());
}

#[test]
fn two_processes_build_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let key = StoreKey::new(KEY_NAME, KEY_MATERIAL);
    // Hold the key's lock until both children are about to build, so that
    // both of them contend for it.
    let gate = flock_exclusive(
        &store
            .root()
            .join(".locks")
            .join(format!("{}.lock", key.base_name())),
    );
    let mut children: Vec<Child> = (0..2)
        .map(|id| spawn_child("build", dir.path(), id))
        .collect();
    for id in 0..2 {
        wait_for_file(&dir.path().join(format!("ready-{id}")));
    }
    drop(gate);
    for child in &mut children {
        assert!(child.wait().unwrap().success());
    }
    assert_eq!(count_lines(&dir.path().join("count")), 1);
    let r0 = fs::read_to_string(dir.path().join("result-0")).unwrap();
    let r1 = fs::read_to_string(dir.path().join("result-1")).unwrap();
    assert_eq!(r0, r1);
    let sp = store.lookup(&key).unwrap();
    assert_eq!(sp.path().to_str().unwrap(), r0);
    assert!(fs::read_to_string(sp.path().join("data"))
        .unwrap()
        .starts_with("built by "));
    assert!(tmp_entries(&store).is_empty());
}

/// Starts a build in a child process and SIGKILLs it mid-build.
fn killed_build(dir: &Path) {
    let mut child = spawn_child("hang", dir, 0);
    wait_for_file(&dir.join("started"));
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn killed_build_is_never_visible_and_gc_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let key = StoreKey::new(KEY_NAME, KEY_MATERIAL);
    killed_build(dir.path());

    assert_eq!(store.lookup(&key), None);
    assert!(store_paths(&store).is_empty());
    assert!(store.list().unwrap().is_empty());
    let tmp = tmp_entries(&store);
    assert_eq!(tmp.len(), 1, "{tmp:?}");
    assert!(tmp[0].starts_with(&format!("{}.", key.base_name())));

    let dry = store
        .gc(&GcPolicy {
            older_than: Duration::ZERO,
            dry_run: true,
            ..GcPolicy::default()
        })
        .unwrap();
    assert_eq!(dry.removed_tmp.len(), 1);
    assert_eq!(tmp_entries(&store).len(), 1);

    let report = store.gc(&GcPolicy::default()).unwrap();
    assert_eq!(
        report.removed_tmp,
        vec![store.root().join(".tmp").join(&tmp[0])]
    );
    assert!(report.removed.is_empty());
    assert!(report.freed_bytes >= 4096);
    assert!(tmp_entries(&store).is_empty());
    assert_eq!(store.lookup(&key), None);
}

#[test]
fn build_after_killed_build_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let key = StoreKey::new(KEY_NAME, KEY_MATERIAL);
    killed_build(dir.path());
    assert_eq!(tmp_entries(&store).len(), 1);
    let sp = store
        .build(&key, |out| fs::write(out.join("data"), b"ok"))
        .unwrap();
    assert!(!sp.path().join("half-written").exists());
    assert_eq!(fs::read(sp.path().join("data")).unwrap(), b"ok");
    assert!(tmp_entries(&store).is_empty());
}

#[test]
fn gc_keeps_in_use_and_recent_and_removes_old() {
    let (_dir, store) = new_store();
    let build = |name: &str| {
        let key = StoreKey::new(name, name.as_bytes());
        let sp = store
            .build(&key, |out| fs::write(out.join("f"), vec![1u8; 10_000]))
            .unwrap();
        (key, sp)
    };
    let (old_key, old) = build("old");
    let (recent_key, recent) = build("recent");
    let (busy_key, busy) = build("busy");
    set_last_used(&store, &old_key, days_ago(30));
    set_last_used(&store, &recent_key, days_ago(1));
    let guard = store.use_path(&busy).unwrap();
    set_last_used(&store, &busy_key, days_ago(30));

    let entries = store.list().unwrap();
    let find = |name: &str| entries.iter().find(|e| e.name == name).unwrap().clone();
    assert!(find("busy").in_use);
    assert!(!find("old").in_use);
    assert!(find("old").last_used.unwrap() < days_ago(29));

    // Dry run: reports, removes nothing.
    let dry = store
        .gc(&GcPolicy {
            dry_run: true,
            ..GcPolicy::default()
        })
        .unwrap();
    assert_eq!(dry.removed.len(), 1);
    assert_eq!(dry.removed[0].name, "old");
    assert!(old.path().exists());

    let report = store.gc(&GcPolicy::default()).unwrap();
    let names = |v: &[vmrig_store::Entry]| v.iter().map(|e| e.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&report.removed), ["old"]);
    assert_eq!(names(&report.kept_in_use), ["busy"]);
    assert_eq!(names(&report.kept_recent), ["recent"]);
    assert!(report.freed_bytes >= 10_000);
    assert!(!old.path().exists());
    assert_eq!(store.lookup(&old_key), None);
    assert!(recent.path().exists());
    assert!(busy.path().exists());
    assert!(tmp_entries(&store).is_empty());

    // older_than zero removes everything not in use.
    let report = store
        .gc(&GcPolicy {
            older_than: Duration::ZERO,
            dry_run: false,
            ..GcPolicy::default()
        })
        .unwrap();
    assert_eq!(names(&report.removed), ["recent"]);
    assert_eq!(names(&report.kept_in_use), ["busy"]);
    assert!(busy.path().exists());
    assert_eq!(fs::read(guard.path().join("f")).unwrap().len(), 10_000);

    drop(guard);
    let report = store
        .gc(&GcPolicy {
            older_than: Duration::ZERO,
            dry_run: false,
            ..GcPolicy::default()
        })
        .unwrap();
    assert_eq!(names(&report.removed), ["busy"]);
    assert!(store_paths(&store).is_empty());
    assert!(store.list().unwrap().is_empty());

    // A collected path can be used no more, and can be built again.
    assert!(matches!(
        store.use_path(&busy),
        Err(StoreError::Gone { .. })
    ));
    let rebuilt = store.build(&busy_key, |_| Ok::<_, String>(())).unwrap();
    assert_eq!(rebuilt, busy);
}

#[test]
fn use_records_time() {
    let (_dir, store) = new_store();
    let key = StoreKey::new("k", b"m");
    let sp = store.build(&key, |_| Ok::<_, String>(())).unwrap();
    set_last_used(&store, &key, days_ago(30));
    drop(store.use_path(&sp).unwrap());
    let e = &store.list().unwrap()[0];
    assert!(e.last_used.unwrap() > days_ago(1));
    assert!(!e.in_use);
}

#[test]
fn gc_tmp_handling() {
    let (_dir, store) = new_store();
    let key = StoreKey::new("slow", b"m");
    let tmp_root = store.root().join(".tmp");
    // A stale temp dir of another key (as if killed), an interrupted deletion,
    // and a foreign entry gc must not touch.
    let other = StoreKey::new("other", b"m2");
    let stale = tmp_root.join(format!("{}.999999.AbCd1234", other.base_name()));
    fs::create_dir(&stale).unwrap();
    fs::write(stale.join("x"), b"x").unwrap();
    let deleting = tmp_root.join(format!("{}.999999.ab12.deleting", other.base_name()));
    fs::create_dir(&deleting).unwrap();
    let foreign = tmp_root.join("not-ours");
    fs::create_dir(&foreign).unwrap();

    // A build in progress in another thread: its temp dir must survive gc.
    let (started_tx, started_rx) = mpsc::channel();
    let (finish_tx, finish_rx) = mpsc::channel::<()>();
    let builder = {
        let (store, key) = (store.clone(), key.clone());
        std::thread::spawn(move || {
            store
                .build(&key, |out| {
                    fs::write(out.join("f"), b"x").unwrap();
                    started_tx.send(out.to_owned()).unwrap();
                    finish_rx.recv().unwrap();
                    Ok::<_, String>(())
                })
                .unwrap()
        })
    };
    let in_progress = started_rx.recv().unwrap();

    let report = store
        .gc(&GcPolicy {
            older_than: Duration::ZERO,
            dry_run: false,
            ..GcPolicy::default()
        })
        .unwrap();
    let mut removed = report.removed_tmp.clone();
    removed.sort();
    let mut expected = vec![stale.clone(), deleting.clone()];
    expected.sort();
    assert_eq!(removed, expected);
    assert!(!stale.exists());
    assert!(!deleting.exists());
    assert!(foreign.exists());
    assert!(in_progress.join("f").exists());

    finish_tx.send(()).unwrap();
    let sp = builder.join().unwrap();
    assert!(sp.path().join("f").exists());
    assert_eq!(tmp_entries(&store), ["not-ours"]);
}

#[test]
fn gc_racing_builds_and_uses() {
    // Many rounds of gc(older_than = 0) against builders that build and use
    // the same key: a use guard always sees a complete path.
    let (_dir, store) = new_store();
    let key = StoreKey::new("churn", b"m");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                store
                    .gc(&GcPolicy {
                        older_than: Duration::ZERO,
                        dry_run: false,
                        ..GcPolicy::default()
                    })
                    .unwrap();
            }
        })
    };
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (store, key) = (store.clone(), key.clone());
            std::thread::spawn(move || {
                for _ in 0..50 {
                    let guard = build_and_use(&store, &key);
                    assert_eq!(fs::read(guard.path().join("a")).unwrap(), b"1");
                    assert_eq!(fs::read(guard.path().join("b")).unwrap(), b"2");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    gc.join().unwrap();
}

#[test]
fn default_store_dir_order() {
    // The only test that touches these variables.
    let saved: Vec<_> = ["VMRIG_STORE", "XDG_CACHE_HOME", "HOME"]
        .iter()
        .map(|v| (v, std::env::var_os(v)))
        .collect();
    std::env::set_var("VMRIG_STORE", "/x/store");
    std::env::set_var("XDG_CACHE_HOME", "/cache");
    std::env::set_var("HOME", "/home/u");
    assert_eq!(
        vmrig_store::default_store_dir().unwrap(),
        Path::new("/x/store")
    );
    std::env::remove_var("VMRIG_STORE");
    assert_eq!(
        vmrig_store::default_store_dir().unwrap(),
        Path::new("/cache/vmrig/store")
    );
    std::env::remove_var("XDG_CACHE_HOME");
    assert_eq!(
        vmrig_store::default_store_dir().unwrap(),
        Path::new("/home/u/.cache/vmrig/store")
    );
    std::env::remove_var("HOME");
    assert!(matches!(
        vmrig_store::default_store_dir(),
        Err(StoreError::NoStoreDir)
    ));
    for (var, value) in saved {
        match value {
            Some(v) => std::env::set_var(var, v),
            None => std::env::remove_var(var),
        }
    }
}

#[test]
fn gc_with_a_name_prefix_removes_only_those_paths() {
    let (_dir, store) = new_store();
    let build = |name: &str| {
        store
            .build(&StoreKey::new(name, name.as_bytes()), |out| {
                fs::write(out.join("f"), b"x")
            })
            .unwrap()
    };
    let image = build("rootfs-bookworm");
    let snap = build("snapshot-server");
    let report = store
        .gc(&GcPolicy {
            older_than: Duration::ZERO,
            name_prefix: Some("snapshot-".into()),
            ..GcPolicy::default()
        })
        .unwrap();
    assert_eq!(report.removed.len(), 1);
    assert_eq!(report.removed[0].name, "snapshot-server");
    assert!(!snap.path().exists());
    assert!(image.path().exists());
}

/// Builds (or finds) `key` and marks it in use, again when a gc removed it in between
/// (possible only with a gc of `older_than` zero), as the driver's image step does.
fn build_and_use(store: &Store, key: &StoreKey) -> vmrig_store::UseGuard {
    for _ in 0..20 {
        let sp = store
            .build(key, |out| {
                fs::write(out.join("a"), b"1")?;
                fs::write(out.join("b"), b"2")
            })
            .unwrap();
        match store.use_path(&sp) {
            Ok(guard) => return guard,
            Err(vmrig_store::StoreError::Gone { .. }) => continue,
            Err(e) => panic!("{e}"),
        }
    }
    panic!("a gc removed the path 20 times in a row")
}
