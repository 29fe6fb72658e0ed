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
