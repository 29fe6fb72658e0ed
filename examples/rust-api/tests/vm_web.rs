//! vmrig's Rust API on a real VM: the machine of `web.toml` booted and driven from
//! `cargo test`, errors checked by kind, and no QEMU or run directory left once the `Run`
//! is dropped, whether the test ends normally or panics.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmrig::{Error, Run};

/// The test's run, writing into a directory of its own under the target directory; `None`
/// (with a note; a failure in CI) where QEMU is missing.
fn web_run(name: &str) -> Option<Run> {
    if !vmrig_testkit::require_program("qemu-system-x86_64") {
        return None;
    }
    let run = Run::builder("tests/web.toml")
        .out_dir(Path::new(env!("CARGO_TARGET_TMPDIR")).join(name))
        .build()
        .expect("build the images and make the machine");
    Some(run)
}

#[test]
fn a_web_server_vm_driven_from_rust() {
    let Some(run) = web_run("driven") else { return };
    assert_eq!(run.machine_names(), ["web"]);
    match run.machine("webb") {
        Err(Error::NoSuchMachine { name, known }) => {
            assert_eq!((name, known), ("webb".to_owned(), vec!["web".to_owned()]))
        }
        other => panic!("expected NoSuchMachine, got {other:?}"),
    }

    run.start_all().unwrap();
    let web = run.machine("web").unwrap();
    web.wait_for_unit("httpd.service").unwrap();
    web.wait_for_open_port(8080).unwrap();
    let page = web
        .succeed("busybox wget -qO- http://localhost:8080/")
        .unwrap();
    assert_eq!(page, "hello from vmrig's Rust API\n");
    assert_eq!(
        web.get_unit_property("httpd.service", "ActiveState")
            .unwrap(),
        "active"
    );
    assert!(web.is_up().unwrap());

    run.subtest("failed checks are assertion errors", || {
        match web.succeed("echo on stdout; false") {
            Err(Error::Assertion(why)) => {
                assert!(why.contains("exit code 1"), "{why}");
                assert!(why.contains("on stdout"), "{why}");
            }
            other => panic!("expected an assertion error, got {other:?}"),
        }
        assert!(matches!(web.fail("true"), Err(Error::Assertion(_))));
        assert_eq!(web.fail("test -e /nonexistent").unwrap(), "");
        assert_eq!(
            web.execute("echo out; exit 3").unwrap(),
            (3, "out\n".to_owned())
        );
        Ok::<_, Error>(())
    })
    .unwrap();

    run.subtest("a wait that runs out of time is a timeout error", || {
        let quick = web.with_timeout(Duration::from_secs(2));
        match quick.wait_until_succeeds("test -e /nonexistent") {
            Err(Error::Timeout(why)) => assert!(why.contains("test -e /nonexistent"), "{why}"),
            other => panic!("expected a timeout, got {other:?}"),
        }
        Ok::<_, Error>(())
    })
    .unwrap();

    run.subtest("files go in and out", || {
        let host = tempfile::tempdir().unwrap();
        let file = host.path().join("greeting.txt");
        std::fs::write(&file, "copied in\n").unwrap();
        web.copy_from_host(&file, "/srv/www/greeting.txt")?;
        let served = web.succeed("busybox wget -qO- http://localhost:8080/greeting.txt")?;
        assert_eq!(served, "copied in\n");
        web.succeed("echo made in the guest > /root/made.txt")?;
        web.copy_from_machine("/root/made.txt", "from-web")?;
        let back = std::fs::read_to_string(run.out_dir().join("from-web/made.txt")).unwrap();
        assert_eq!(back, "made in the guest\n");
        Ok::<_, Error>(())
    })
    .unwrap();

    let vms = vms_of_this_process();
    assert_eq!(vms.len(), 1, "one QEMU runs: {vms:?}");
    drop(run);
    assert_gone(&vms);
}

#[test]
fn a_panicking_test_leaves_no_vm_behind() {
    if !vmrig_testkit::require_program("qemu-system-x86_64") {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let test = std::thread::spawn(move || {
        let run = web_run("panicking").unwrap();
        run.machine("web").unwrap().succeed("true").unwrap();
        tx.send(vms_of_this_process()).unwrap();
        panic!("a deliberate panic with the VM running");
    });
    assert!(test.join().is_err(), "the test thread panicked");
    let vms = rx.recv().unwrap();
    assert_eq!(vms.len(), 1, "one QEMU ran: {vms:?}");
    assert_gone(&vms);
}

/// A QEMU this process started, and its run directory (where its sockets are).
#[derive(Debug)]
struct Vm {
    pid: u32,
    run_dir: PathBuf,
}

/// Every live QEMU whose parent is this process.
fn vms_of_this_process() -> Vec<Vm> {
    let me = std::process::id();
    let mut vms = Vec::new();
    for pid in pids() {
        let Some((ppid, state)) = stat(pid) else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if ppid != me || state == 'Z' || !comm.starts_with("qemu-system") {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let run_dir = String::from_utf8_lossy(&cmdline)
            .split('\0')
            .find_map(run_dir_in)
            .expect("QEMU's sockets are in the run directory");
        vms.push(Vm { pid, run_dir });
    }
    vms
}

/// The run directory (`.../vmrig-run-<pid>-<x>`) of a path in a QEMU argument such as
/// `socket,id=qmp,path=/tmp/vmrig-run-1-a/web/qmp`.
fn run_dir_in(arg: &str) -> Option<PathBuf> {
    let at = arg.find("/vmrig-run-")?;
    let begin = arg[..at].rfind(['=', ',']).map_or(0, |i| i + 1);
    let end = arg[at + 1..].find('/').map_or(arg.len(), |i| at + 1 + i);
    Some(PathBuf::from(&arg[begin..end]))
}

/// The VMs' QEMU has exited, and no process names their run directory (the run
/// directory's watcher), and the directory is gone: within a few seconds.
fn assert_gone(vms: &[Vm]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<String> = vms
            .iter()
            .flat_map(|vm| {
                let mut left = Vec::new();
                if stat(vm.pid).is_some_and(|(_, state)| state != 'Z') {
                    left.push(format!("QEMU {}", vm.pid));
                }
                let dir = vm.run_dir.to_string_lossy().into_owned();
                for pid in pids() {
                    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    if String::from_utf8_lossy(&cmdline).contains(&dir)
                        && stat(pid).is_some_and(|(_, state)| state != 'Z')
                    {
                        left.push(format!("process {pid} naming {dir}"));
                    }
                }
                if vm.run_dir.exists() {
                    left.push(format!("run directory {dir}"));
                }
                left
            })
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "left behind: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// A process's parent and state, if it exists.
fn stat(pid: u32) -> Option<(u32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((fields.next()?.parse().ok()?, state))
}
