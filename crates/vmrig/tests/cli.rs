//! The `vmrig` binary, end to end, without VMs or network.

use std::path::Path;
use std::process::{Command, Output};

fn vmrig(store: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmrig"))
        .args(args)
        .env("VMRIG_STORE", store)
        .env("NO_COLOR", "1")
        .env_remove("VMRIG_MIRROR")
        .output()
        .expect("run vmrig")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_lists_subcommands_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let out = vmrig(dir.path(), &["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    for word in ["run", "build", "store", "Exit codes", "infrastructure"] {
        assert!(
            stdout.contains(word),
            "{word:?} missing from --help:\n{stdout}"
        );
    }
    let out = vmrig(dir.path(), &["store", "--help"]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("list") && stdout.contains("gc"), "{stdout}");
}

#[test]
fn typo_in_test_file_exits_2_with_place_and_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typo.toml");
    std::fs::write(
        &file,
        "name = \"typo\"\ntest_script = \"start_all()\"\n\n[nodes.server]\npakages = [\"curl\"]\n",
    )
    .unwrap();
    let out = vmrig(dir.path(), &["build", file.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:5:1", file.display())),
        "no file:line:col in:\n{stderr}"
    );
    assert!(stderr.contains("packages"), "no suggestion in:\n{stderr}");
    assert!(out.stdout.is_empty(), "stdout: {}", text(&out.stdout));
}

#[test]
fn every_bad_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.toml");
    std::fs::write(&a, "nme = \"a\"\n").unwrap();
    let b = dir.path().join("b.toml");
    let out = vmrig(
        dir.path(),
        &["build", a.to_str().unwrap(), b.to_str().unwrap()],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("a.toml:1:1"), "{stderr}");
    assert!(stderr.contains(&b.display().to_string()), "{stderr}");
}

#[test]
fn missing_file_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("no-such-test.toml");
    let out = vmrig(dir.path(), &["build", "--json", file.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_arguments_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = vmrig(dir.path(), &["store", "gc", "--older-than", "7"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("7d"), "{}", text(&out.stderr));
    let out = vmrig(dir.path(), &["build"]);
    assert_eq!(out.status.code(), Some(2));
    let out = vmrig(dir.path(), &["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn store_list_on_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let out = vmrig(&store, &["store", "list"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("empty"), "{}", text(&out.stdout));
}

#[test]
fn store_list_shows_paths() {
    let dir = tempfile::tempdir().unwrap();
    let store = vmrig_store_dir_with_one_path(dir.path());
    let out = vmrig(&store, &["store", "list"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        stdout.contains("NAME") && stdout.contains("SIZE"),
        "{stdout}"
    );
    assert!(stdout.contains("-kernel-bookworm"), "{stdout}");
    assert!(stdout.contains("1 path,"), "{stdout}");
}

#[test]
fn store_gc_all_dry_run_removes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = vmrig_store_dir_with_one_path(dir.path());
    let out = vmrig(&store, &["store", "gc", "--all", "--dry-run"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(stdout.contains("would remove"), "{stdout}");
    assert!(stdout.contains("-kernel-bookworm"), "{stdout}");
    let listed = text(&vmrig(&store, &["store", "list"]).stdout);
    assert!(
        listed.contains("-kernel-bookworm"),
        "dry run removed it:\n{listed}"
    );

    let out = vmrig(&store, &["store", "gc", "--all"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("removed"),
        "{}",
        text(&out.stdout)
    );
    assert!(text(&vmrig(&store, &["store", "list"]).stdout).contains("empty"));
}

#[test]
fn store_gc_free_removes_paths_until_the_disk_has_room() {
    let dir = tempfile::tempdir().unwrap();
    let store = vmrig_store_dir_with_one_path(dir.path());
    // Nobody's disk has 1 PiB free: the path goes, and the report says what is left.
    let out = vmrig(&store, &["store", "gc", "--free", "1024T"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(stdout.contains("-kernel-bookworm"), "{stdout}");
    assert!(stdout.contains("removed 1 path,"), "{stdout}");
    assert!(stdout.contains("less than 1.0 PiB free"), "{stdout}");
    assert!(text(&vmrig(&store, &["store", "list"]).stdout).contains("empty"));

    let store = vmrig_store_dir_with_one_path(&dir.path().join("second"));
    let out = vmrig(&store, &["store", "gc", "--free", "1K"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("removed 0 paths"));
    assert!(text(&vmrig(&store, &["store", "list"]).stdout).contains("-kernel-bookworm"));

    let out = vmrig(&store, &["store", "gc", "--free", "lots"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("not a size"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn store_gc_on_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    let out = vmrig(dir.path(), &["store", "gc", "--all", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = vmrig(dir.path(), &["store", "gc", "--older-than", "12h"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn examples_parse() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    for name in ["client-server.toml", "single.toml"] {
        let spec = vmrig_spec_load(&examples.join(name));
        assert!(spec.is_ok(), "{name}: {}", spec.unwrap_err());
    }
}

/// A store holding one (fake) complete path, made through the store's own API so that the
/// test does not depend on its layout.
fn vmrig_store_dir_with_one_path(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("store");
    let store = vmrig_store::Store::open(&root).unwrap();
    let key = vmrig_store::StoreKey::new("kernel-bookworm", b"test");
    store
        .build(&key, |tmp| {
            std::fs::write(tmp.join("vmlinuz"), b"not a kernel")
        })
        .unwrap();
    root
}

fn vmrig_spec_load(path: &Path) -> Result<(), String> {
    vmrig_spec::load(path)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A test file with one node, in `dir`.
fn one_node_test(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!("name = \"{name}\"\ntest_script = \"start_all()\"\n[nodes.machine]\npackages = [\"less\"]\n"),
    )
    .unwrap();
    path
}

#[test]
fn list_shows_nodes_and_unbuilt_images() {
    let dir = tempfile::tempdir().unwrap();
    let file = one_node_test(dir.path(), "listed");
    let out = vmrig(dir.path(), &["list", file.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(stdout.contains("listed ("), "{stdout}");
    assert!(stdout.contains(": not cached"), "{stdout}");
    assert!(
        stdout.contains("  machine: 1024 MiB, 1 cpu, vlans [1], packages: less"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("not built").count(), 3, "{stdout}");
}

#[test]
fn a_filter_that_matches_nothing_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    one_node_test(dir.path(), "alpha");
    one_node_test(dir.path(), "beta");
    let out = vmrig(
        dir.path(),
        &["run", dir.path().to_str().unwrap(), "--filter", "gamma"],
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("no test to run (0 of 2 selected)"),
        "{}",
        text(&out.stderr)
    );
    let out = vmrig(
        dir.path(),
        &["run", dir.path().to_str().unwrap(), "--partition", "3/2"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("invalid partition"));
}

#[test]
fn interactive_takes_one_test() {
    let dir = tempfile::tempdir().unwrap();
    one_node_test(dir.path(), "alpha");
    one_node_test(dir.path(), "beta");
    let out = vmrig(dir.path(), &["run", "-I", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("interactive mode takes one test"));
    let out = vmrig(dir.path(), &["interactive", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("REPL"), "{}", text(&out.stdout));
}

#[test]
fn doctor_on_an_empty_path_says_what_to_install_and_exits_4() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vmrig"))
        .arg("doctor")
        .env("PATH", dir.path())
        .env("VMRIG_STORE", dir.path().join("store"))
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{stdout}");
    assert!(
        stdout.contains("MISS qemu-system-x86_64 not found"),
        "{stdout}"
    );
    assert!(
        stdout.contains("apt-get install qemu-system-x86 qemu-utils"),
        "{stdout}"
    );
    assert!(stdout.contains("MISS python3 not found"), "{stdout}");
    assert!(stdout.contains("info accelerator: "), "{stdout}");
}

#[test]
fn invoked_as_nixos_test_driver_it_takes_the_upstream_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("nixos-test-driver");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vmrig"), &link).unwrap();
    let out = Command::new(&link).arg("--help").output().unwrap();
    let help = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{help}");
    for flag in [
        "--start-scripts",
        "--vm-names",
        "--vm-start-scripts",
        "--vlans",
        "--keep-vm-state",
        "--global-timeout",
        "--junit-xml",
        "--config",
        "--interactive",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    // No test script anywhere: a clear error, not a crash.
    let out = Command::new(&link)
        .args(["-o"])
        .arg(dir.path())
        .env_remove("testScript")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no test script"),
        "{}",
        text(&out.stderr)
    );
}
