//! `vmrig stubs`: mypy (from PyPI, in this test's own venv) checks every example's script
//! against the generated stubs and finds it clean, and flags a deliberately wrong call. No
//! VM. Needs `python3 -m venv` (Debian: python3-venv) and PyPI; where either is missing the
//! test says so, and fails in CI (vmrig-testkit).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{repo, text};

/// mypy in a venv under the target directory, made once and kept between runs.
fn mypy() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mypy-venv");
    let mypy = venv.join("bin/mypy");
    if mypy.exists() {
        return Some(mypy);
    }
    let out = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .expect("run python3");
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&venv);
        vmrig_testkit::cannot_run(&format!(
            "`python3 -m venv` failed (install python3-venv): {}",
            text(&out)
        ));
        return None;
    }
    let out = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "mypy"])
        .output()
        .expect("run pip");
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&venv);
        vmrig_testkit::cannot_run(&format!("`pip install mypy` failed: {}", text(&out)));
        return None;
    }
    Some(mypy)
}

/// `vmrig stubs <dir>/stubs <test>`, then mypy on `script` with the globals imported for
/// type checking only, as docs/reference.md shows.
fn check(mypy: &Path, dir: &Path, test: &Path, script: &str) -> Output {
    let stubs = dir.join("stubs");
    let out = Command::new(env!("CARGO_BIN_EXE_vmrig"))
        .arg("stubs")
        .arg(&stubs)
        .arg(test)
        .output()
        .unwrap();
    assert!(out.status.success(), "vmrig stubs: {}", text(&out));
    let file = dir.join("script.py");
    std::fs::write(&file, format!(
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vmrig_globals import *\n{script}"
        )).unwrap();
    Command::new(mypy)
        .args([
            "--no-incremental",
            "--cache-dir=/dev/null",
            "--no-error-summary",
        ])
        .arg(&file)
        .env("MYPYPATH", &stubs)
        .current_dir(dir)
        .output()
        .unwrap()
}

#[test]
fn mypy_checks_the_examples_clean_and_flags_a_wrong_call() {
    let Some(mypy) = mypy() else { return };
    common::build_example_artifacts();
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    let mut examples: Vec<PathBuf> = std::fs::read_dir(repo().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    examples.sort();
    for example in &examples {
        let spec = vmrig_spec::load(example).unwrap();
        let dir = tmp.path().join(&spec.name);
        std::fs::create_dir(&dir).unwrap();
        let out = check(&mypy, &dir, example, &spec.script.text);
        assert!(
            out.status.success(),
            "mypy on {}:\n{}",
            example.display(),
            text(&out)
        );
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} examples");

    // A typo'd keyword, a wrong type and an extra argument, on the test's own machine.
    let dir = tmp.path().join("wrong");
    std::fs::create_dir(&dir).unwrap();
    let single = repo().join("examples/single.toml");
    let out = check(
        &mypy,
        &dir,
        &single,
        "machine.wait_for_unit(\"x\", timout=3)\nmachine.succeed(1)\nstart_all(2)\n",
    );
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    for expected in [
        "script.py:4: error: Unexpected keyword argument \"timout\" for \"wait_for_unit\" of \"Machine\"",
        "script.py:5: error: Argument 1 to \"succeed\" of \"Machine\" has incompatible type \"int\"; expected \"str\"",
        "script.py:6: error: Too many arguments for \"start_all\"",
    ] {
        assert!(log.contains(expected), "no {expected:?} in:\n{log}");
    }
}
