//! The upstream corpus: real tests from nixpkgs' `nixos/tests`, ported to vmrig test files
//! with their scripts kept as they are (tests/nixpkgs/, table in docs/corpus.md), run under
//! TCG. Every test of tests/nixpkgs/ must pass; the one of tests/nixpkgs/expect-fail/ is
//! a test that upstream expects to fail, and must fail for the reason upstream's does.

mod common;

use std::path::Path;

/// `vmrig run ARGS --rerun -j 1 -o <tmp>/out` from the repository root.
fn run(tmp: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out_dir = tmp.join("out");
    let mut all = vec!["run", "-j", "1", "-o", out_dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = common::vmrig_rerun(&all, tmp);
    (out.status.code(), common::text(&out))
}

/// The lines of the summary table that name a test that did not pass.
fn failures(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            let mut words = l.split("  ").map(str::trim).filter(|w| !w.is_empty());
            let _test = words.next();
            matches!(words.next(), Some("FAILED" | "ERROR" | "skipped"))
        })
        .collect()
}

#[test]
fn corpus_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, log) = run(tmp.path(), &["tests/nixpkgs/"]);
    let failed = failures(&log);
    assert!(
        code == Some(0) && failed.is_empty(),
        "the upstream corpus failed (exit code {code:?}); tests that did not pass:\n{}\n\nthe whole log:\n{log}",
        failed.join("\n")
    );
    // Every test of the directory ran and passed (the summary counts them).
    let tests = std::fs::read_dir(common::repo().join("tests/nixpkgs"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "toml")
        })
        .count();
    assert!(tests >= 15, "only {tests} corpus tests");
    assert!(
        log.contains(&format!("{tests} passed (0 cached), 0 failed")),
        "{log}"
    );
    common::assert_no_leftovers(tmp.path());
}

/// Upstream's nixos-test-driver/timeout.nix: a 5 s global timeout strikes.
#[test]
fn corpus_timeout_fails_on_the_global_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, log) = run(
        tmp.path(),
        &["tests/nixpkgs/expect-fail/driver-timeout.toml"],
    );
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("global timeout of 5 s reached"), "{log}");
    common::assert_no_leftovers(tmp.path());
}
