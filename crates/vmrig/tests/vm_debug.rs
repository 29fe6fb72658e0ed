//! Failure snapshots and `vmrig debug` with real VMs: a failed two-machine run saves both
//! machines and the network; `vmrig debug OUT -c CODE` finds them as the failure left them
//! (a file only the failed run wrote, a link still blocked), as often as asked; failing
//! code exits 1; `--no-failure-snapshots` saves nothing; a snapshot of another QEMU is
//! refused. The nodes are examples/single.toml's (`packages = ["less"]`): the image is
//! shared with the other VM tests.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Instant;

mod common;
use common::text;

const PAIR: &str = r#"name = "debug-pair"
test_script = '''
start_all()
server.wait_for_unit("network-online.target")
client.wait_for_unit("network-online.target")
client.wait_until_succeeds("ping -c1 -W2 server", timeout=60)
server.succeed("echo at-the-failure > /tmp/state")
client.block()
vlan1.set_delay(5)
assert False, "the test fails here"
'''

[nodes.server]
packages = ["less"]

[nodes.client]
packages = ["less"]
"#;

fn vmrig(tmp: &Path, args: &[&str]) -> Output {
    common::command(tmp)
        .args(args)
        .env("VMRIG_RERUN", "true")
        .env_remove("VMRIG_NO_FAILURE_SNAPSHOTS")
        .output()
        .expect("run vmrig")
}

fn write(tmp: &Path, name: &str, text: &str) -> PathBuf {
    let path = tmp.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `vmrig debug OUT -c CODE`, run in `tmp` with `OUT` relative to it (the new disk layers
/// must name the saved ones by absolute paths), and how long it took.
fn debug_c(tmp: &Path, out: &Path, code: &str) -> (Output, f64) {
    let started = Instant::now();
    let relative = out.strip_prefix(tmp).unwrap().to_str().unwrap();
    let result = common::command(tmp)
        .current_dir(tmp)
        .args(["debug", relative, "-c", code])
        .output()
        .expect("run vmrig");
    (result, started.elapsed().as_secs_f64())
}

#[test]
fn a_failed_run_is_debugged_as_the_failure_left_it() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write(tmp.path(), "pair.toml", PAIR);
    let out = tmp.path().join("out");
    let run = vmrig(
        tmp.path(),
        &["run", file.to_str().unwrap(), "-o", out.to_str().unwrap()],
    );
    let log = text(&run);
    assert_eq!(run.status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!("restore it with `vmrig debug {}`", out.display())),
        "{log}"
    );
    assert!(log.contains("saved its state: "), "{log}");
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("failure-snapshot/manifest.json")).unwrap(),
    )
    .unwrap();
    let names: Vec<&str> = manifest["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["client", "server"], "{manifest}");
    assert_eq!(manifest["network"]["blocked"][0], "client", "{manifest}");
    assert_eq!(manifest["network"]["delay_ms"]["1"], 5.0, "{manifest}");
    for m in manifest["machines"].as_array().unwrap() {
        eprintln!(
            "saved {}: {} bytes in {:.2} s",
            m["name"], m["bytes"], m["save_seconds"]
        );
    }

    // What only the failure had, and the link still blocked; then the network works.
    let code = "assert server.succeed('cat /tmp/state').strip() == 'at-the-failure'\n\
                client.fail('ping -c1 -W2 server')\n\
                client.unblock()\n\
                client.wait_until_succeeds('ping -c1 -W2 server', timeout=60)\n\
                print('debugged', flush=True)";
    let (first, took) = debug_c(tmp.path(), &out, code);
    let log = text(&first);
    assert_eq!(first.status.code(), Some(0), "{log}");
    assert!(log.contains("restored from the failure snapshot"), "{log}");
    assert!(log.contains("debugged"), "{log}");
    assert!(
        log.contains("network as at the failure: blocked: client; VLAN 1: delay 5 ms"),
        "{log}"
    );
    eprintln!("vmrig debug -c (to its end): {took:.1} s");

    // Again (the snapshot was not changed by the first session), with code that fails.
    let (second, took) = debug_c(
        tmp.path(),
        &out,
        "assert server.succeed('cat /tmp/state').strip() == 'something else', 'not as saved'",
    );
    let log = text(&second);
    assert_eq!(second.status.code(), Some(1), "{log}");
    assert!(log.contains("not as saved"), "{log}");
    eprintln!("vmrig debug -c, failing (to its end): {took:.1} s");

    // The REPL (reading stdin, a terminal for users), with the test's globals.
    let started = Instant::now();
    let repl = common::output_with_input(
        common::command(tmp.path())
            .args(["debug", out.to_str().unwrap()])
            .env("VMRIG_RERUN", "true"),
        "print('from the REPL:', server.succeed('cat /tmp/state').strip())\n",
    );
    let log = text(&repl);
    assert_eq!(repl.status.code(), Some(0), "{log}");
    assert!(log.contains("from the REPL: at-the-failure"), "{log}");
    eprintln!(
        "vmrig debug (REPL, one line): {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Another QEMU cannot load the state: refused before anything boots.
    let path = out.join("failure-snapshot/manifest.json");
    let text_before = std::fs::read_to_string(&path).unwrap();
    let mut edited: serde_json::Value = serde_json::from_str(&text_before).unwrap();
    edited["qemu_version"] = "QEMU emulator version 1.0.0".into();
    std::fs::write(&path, edited.to_string()).unwrap();
    let (refused, took) = debug_c(tmp.path(), &out, "pass");
    let log = text(&refused);
    assert_eq!(refused.status.code(), Some(4), "{log}");
    assert!(
        log.contains("this failure snapshot was saved with QEMU \"QEMU emulator version 1.0.0\"; ")
            && log.contains("which cannot restore it"),
        "{log}"
    );
    assert!(took < 5.0, "the refusal took {took:.1} s");
    common::assert_no_leftovers(tmp.path());
}

#[test]
fn no_failure_snapshots_saves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write(
        tmp.path(),
        "one.toml",
        "name = \"debug-off\"\ntest_script = '''\nmachine.succeed('true')\nassert False\n'''\n\n[nodes.machine]\npackages = [\"less\"]\n",
    );
    let out = tmp.path().join("out");
    let run = vmrig(
        tmp.path(),
        &[
            "run",
            "--no-failure-snapshots",
            file.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
    );
    let log = text(&run);
    assert_eq!(run.status.code(), Some(1), "{log}");
    assert!(!out.join("failure-snapshot").exists(), "{log}");
    assert!(!log.contains("vmrig debug"), "{log}");
    // And then there is nothing to debug.
    let debug = vmrig(tmp.path(), &["debug", out.to_str().unwrap()]);
    let log = text(&debug);
    assert_eq!(debug.status.code(), Some(2), "{log}");
    assert!(log.contains("holds no failure snapshot"), "{log}");
    common::assert_no_leftovers(tmp.path());
}
