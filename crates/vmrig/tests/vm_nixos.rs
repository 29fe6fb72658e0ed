//! The NixOS-compatible driver with real VMs: start scripts made by
//! `vmrig build --start-scripts`, run by `vmrig nixos-driver` in the upstream driver's three
//! command-line forms (old flags, environment variables, `--config`), a VLAN between the
//! machines through the switch's VDE side, the global timeout's exit status 143 (also
//! inside `wait_for_unit`), boot snapshots of vmrig's start scripts, and `create_machine`
//! in a vmrig run. In the nextest `vm` group.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::text;

/// Two nodes on VLAN 1 with the image the other VM tests use (`less`).
const PAIR: &str = r#"name = "nixos-pair"
test_script = "start_all()"

[nodes.alpha]
packages = ["less"]

[nodes.beta]
packages = ["less"]
"#;

/// The script every form runs: the VLAN works, block() cuts it, unblock() heals it.
const SCRIPT: &str = r#"
start_all()
# The cards get their addresses after udev, before network-online.target (as on NixOS).
alpha.wait_for_unit("network-online.target")
beta.wait_for_unit("network-online.target")
alpha.succeed("ping -c1 -W10 beta")
beta.block()
alpha.fail("ping -c1 -W2 beta")
beta.unblock()
alpha.wait_until_succeeds("ping -c1 -W2 beta", timeout=60)
assert [m.name for m in machines] == ["alpha", "beta"], machines
"#;

/// Writes the pair's start scripts into `<tmp>/scripts` and the test script; returns both.
fn setup(tmp: &Path) -> (PathBuf, PathBuf) {
    let spec = tmp.join("pair.toml");
    std::fs::write(&spec, PAIR).unwrap();
    let scripts = tmp.join("scripts");
    let out = common::command(tmp)
        .args(["build", "--start-scripts"])
        .arg(&scripts)
        .arg(&spec)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for node in ["alpha", "beta"] {
        assert!(
            scripts.join(format!("run-{node}-vm")).exists(),
            "{}",
            text(&out)
        );
    }
    let script = tmp.join("test.py");
    std::fs::write(&script, SCRIPT).unwrap();
    (scripts, script)
}

fn driver(tmp: &Path, args: &[&str], env: &[(&str, String)]) -> Output {
    let out_dir = tmp.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut cmd = common::command(tmp);
    cmd.arg("nixos-driver").arg("-o").arg(&out_dir).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn script_path(scripts: &Path, node: &str) -> String {
    scripts
        .join(format!("run-{node}-vm"))
        .to_string_lossy()
        .into_owned()
}

#[test]
fn nixos_driver_old_flags_with_junit() {
    let tmp = tempfile::tempdir().unwrap();
    let (scripts, script) = setup(tmp.path());
    let out = driver(
        tmp.path(),
        &[
            "--start-scripts",
            &script_path(&scripts, "alpha"),
            &script_path(&scripts, "beta"),
            "--vlans",
            "1",
            "--global-timeout",
            "600",
            "--junit-xml",
            "junit.xml",
            "--",
            script.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("test script finished in"),
        "{}",
        text(&out)
    );
    let junit = std::fs::read_to_string(tmp.path().join("out/junit.xml")).unwrap();
    assert!(junit.contains("<testsuite"), "{junit}");
    common::assert_no_leftovers(tmp.path());
}

#[test]
fn nixos_driver_environment_variables() {
    let tmp = tempfile::tempdir().unwrap();
    let (scripts, script) = setup(tmp.path());
    let start_scripts = format!(
        "{} {}",
        script_path(&scripts, "alpha"),
        script_path(&scripts, "beta")
    );
    let out = driver(
        tmp.path(),
        &[],
        &[
            ("startScripts", start_scripts),
            ("vlans", "1".into()),
            ("testScript", script.to_string_lossy().into_owned()),
            ("globalTimeout", "600".into()),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    common::assert_no_leftovers(tmp.path());
}

#[test]
fn nixos_driver_config_file_with_vm_names() {
    let tmp = tempfile::tempdir().unwrap();
    let (scripts, script) = setup(tmp.path());
    let config = tmp.path().join("config.json");
    let json = serde_json::json!({
        "vms": {
            "alpha": { "name": "alpha", "start_script": script_path(&scripts, "alpha") },
            "beta": { "name": "beta", "start_script": script_path(&scripts, "beta") },
        },
        "containers": {},
        "vlans": [1],
        "global_timeout": 600,
        "enable_ssh_backdoor": false,
        "test_script": script,
    });
    std::fs::write(&config, json.to_string()).unwrap();
    let out = driver(tmp.path(), &["--config", config.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    common::assert_no_leftovers(tmp.path());
}

#[test]
fn nixos_driver_global_timeout_exits_143() {
    let tmp = tempfile::tempdir().unwrap();
    let (scripts, _) = setup(tmp.path());
    let script = tmp.path().join("hang.py");
    std::fs::write(&script, "import time\nalpha.start()\ntime.sleep(600)\n").unwrap();
    let started = std::time::Instant::now();
    let out = driver(
        tmp.path(),
        &[
            "--vm-names",
            "alpha",
            "--vm-start-scripts",
            &script_path(&scripts, "alpha"),
            "--global-timeout",
            "5",
            "--",
            script.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(143), "{}", text(&out));
    assert!(text(&out).contains("global timeout"), "{}", text(&out));
    assert!(
        started.elapsed().as_secs() < 60,
        "took {:?}",
        started.elapsed()
    );
    common::assert_no_leftovers(tmp.path());
}

/// The global timeout striking inside `wait_for_unit` (a unit that stays activating) ends
/// the run with 143 too, as upstream: the call's own timeout error comes a moment before
/// the watchdog, and must not turn the exit status into 1.
#[test]
fn nixos_driver_global_timeout_inside_wait_for_unit_exits_143() {
    let tmp = tempfile::tempdir().unwrap();
    let (scripts, _) = setup(tmp.path());
    let script = tmp.path().join("hang.py");
    std::fs::write(
        &script,
        "alpha.succeed('systemd-run --unit=stuck --no-block -p Type=oneshot sleep 600')\n\
         alpha.wait_for_unit('stuck.service')\n",
    )
    .unwrap();
    // Warm the pair's snapshots so that the 5 s below are spent inside wait_for_unit, not
    // booting (a cold boot takes longer than that; it would strike there, also inside).
    let warm = tmp.path().join("warm.py");
    std::fs::write(&warm, "alpha.succeed('true')\n").unwrap();
    let alpha = script_path(&scripts, "alpha");
    let out = driver(
        tmp.path(),
        &[
            "--start-scripts",
            &alpha,
            "--vlans",
            "1",
            "--",
            warm.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let started = std::time::Instant::now();
    let out = driver(
        tmp.path(),
        &[
            "--start-scripts",
            &alpha,
            "--vlans",
            "1",
            "--global-timeout",
            "5",
            "--",
            script.to_str().unwrap(),
        ],
        &[],
    );
    let log = text(&out);
    assert_eq!(out.status.code(), Some(143), "{log}");
    assert!(log.contains("waiting for unit stuck.service"), "{log}");
    assert!(log.contains("global timeout of 5 s"), "{log}");
    assert!(
        started.elapsed().as_secs() < 60,
        "took {:?}",
        started.elapsed()
    );
    common::assert_no_leftovers(tmp.path());
}

/// Start scripts vmrig wrote boot from boot snapshots under `nixos-driver` (the first run
/// saves them unless an identical machine did already; scripts written into another
/// directory share them), and `--no-snapshots` boots them cold.
#[test]
fn nixos_driver_restores_vmrigs_start_scripts_from_snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    let (scripts, script) = setup(tmp.path());
    let args = |extra: &[&str]| {
        let mut args = vec![
            "--start-scripts".to_owned(),
            script_path(&scripts, "alpha"),
            script_path(&scripts, "beta"),
            "--vlans".to_owned(),
            "1".to_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push("--".to_owned());
        args.push(script.to_string_lossy().into_owned());
        args
    };
    let run = |extra: &[&str]| {
        let args = args(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        driver(tmp.path(), &args, &[])
    };
    let first = run(&[]);
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    let second = run(&[]);
    let log = text(&second);
    assert_eq!(second.status.code(), Some(0), "{log}");
    for node in ["alpha", "beta"] {
        assert!(
            log.contains(&format!("{node}: restored from the boot snapshot")),
            "{log}"
        );
    }
    let cold = run(&["--no-snapshots"]);
    let log = text(&cold);
    assert_eq!(cold.status.code(), Some(0), "{log}");
    assert!(!log.contains("restored from the boot snapshot"), "{log}");
    assert!(!log.contains("saving a boot snapshot"), "{log}");
    common::assert_no_leftovers(tmp.path());
}

/// `create_machine` in a vmrig run: a start script of another test joins this run's VLAN.
#[test]
fn create_machine_starts_a_start_script_on_the_runs_vlan() {
    let tmp = tempfile::tempdir().unwrap();
    let (scripts, _) = setup(tmp.path());
    // alpha is node 1 of the pair: 192.168.1.1; `machine` below is node 1 of its own test,
    // so beta (node 2, 192.168.1.2) is the one that can join it without a clash.
    let test = tmp.path().join("create.toml");
    std::fs::write(
        &test,
        format!(
            r#"name = "create-machine"
test_script = '''
extra = create_machine("{beta}")
assert extra.name == "beta", extra.name
assert extra in machines
extra.start()
assert extra.succeed("hostname").strip() == "beta"
machine.wait_for_unit("network-online.target")
extra.wait_for_unit("network-online.target")
machine.succeed("ping -c1 -W10 192.168.1.2")
extra.succeed("ping -c1 -W10 192.168.1.1")
named = create_machine("{alpha}", name="other")
assert named.name == "other"
'''

[nodes.machine]
packages = ["less"]
"#,
            beta = script_path(&scripts, "beta"),
            alpha = script_path(&scripts, "alpha"),
        ),
    )
    .unwrap();
    let out = common::command(tmp.path())
        .args(["run", "--rerun", "-o"])
        .arg(tmp.path().join("out"))
        .arg(&test)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    common::assert_no_leftovers(tmp.path());
}
