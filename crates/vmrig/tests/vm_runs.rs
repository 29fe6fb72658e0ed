//! Test runs as users run them, with real VMs: the result cache, several tests at once,
//! JUnit. In the nextest `vm` group (one at a time). The node is examples/single.toml's
//! (`packages = ["less"]`), so the image is shared with the other VM tests.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use quick_junit::{NonSuccessKind, Report, TestCaseStatus};

mod common;
use common::text;

fn vmrig(args: &[&str], tmp: &Path) -> Output {
    common::command(tmp)
        .args(args)
        .env_remove("VMRIG_RERUN")
        .output()
        .expect("run vmrig")
}

/// A test with the shared node; `nonce` keeps an earlier run's cached result from applying.
fn test_file(dir: &Path, name: &str, script: &str) -> PathBuf {
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\ntest_script = '''\n# {nonce}\n{script}\n'''\n\n[nodes.machine]\npackages = [\"less\"]\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn a_passing_run_is_cached_until_rerun() {
    let tmp = tempfile::tempdir().unwrap();
    let file = test_file(tmp.path(), "cache-me", "machine.succeed(\"true\")");
    let file = file.to_str().unwrap();
    let out1 = tmp.path().join("out1");
    let first = vmrig(&["run", file, "-o", out1.to_str().unwrap()], tmp.path());
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    assert!(
        !text(&first).contains("cache-me: cached"),
        "{}",
        text(&first)
    );

    let out2 = tmp.path().join("out2");
    let started = Instant::now();
    let second = vmrig(&["run", file, "-o", out2.to_str().unwrap()], tmp.path());
    let took = started.elapsed();
    assert_eq!(second.status.code(), Some(0), "{}", text(&second));
    assert!(
        text(&second).contains("cache-me: cached (passed just now)"),
        "{}",
        text(&second)
    );
    assert!(took < Duration::from_secs(1), "a cached run took {took:?}");
    assert!(!out2.exists(), "a cached run wrote an output directory");

    let listed = vmrig(&["list", file], tmp.path());
    let listing = text(&listed);
    assert!(listing.contains("cached (passed"), "{listing}");
    assert!(!listing.contains("not built"), "{listing}");

    let rerun = vmrig(
        &["run", "--rerun", file, "-o", out2.to_str().unwrap()],
        tmp.path(),
    );
    assert_eq!(rerun.status.code(), Some(0), "{}", text(&rerun));
    let rerun_log = text(&rerun);
    assert!(
        rerun_log.contains("connected to guest root shell")
            || rerun_log.contains("restored from the boot snapshot"),
        "{rerun_log}"
    );
    common::assert_no_leftovers(tmp.path());
}

#[test]
fn two_tests_in_parallel_with_junit_and_no_cache_for_failures() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tests");
    std::fs::create_dir(&dir).unwrap();
    test_file(
        &dir,
        "good",
        "with subtest(\"hostname\"):\n    machine.succeed(\"test \\\"$(hostname)\\\" = machine\")",
    );
    test_file(
        &dir,
        "bad",
        "with subtest(\"works\"):\n    machine.succeed(\"true\")\nwith subtest(\"breaks\"):\n    machine.succeed(\"echo oops-output; exit 3\")",
    );
    let junit = tmp.path().join("junit.xml");
    let out = tmp.path().join("out");
    let run = vmrig(
        &[
            "run",
            dir.to_str().unwrap(),
            "-j",
            "2",
            "-o",
            out.to_str().unwrap(),
            "--junit",
            junit.to_str().unwrap(),
        ],
        tmp.path(),
    );
    let log = text(&run);
    assert_eq!(run.status.code(), Some(1), "{log}");
    // Compact, prefixed lines (stderr is not a terminal here), and the summary table.
    assert!(log.contains("[good] subtest: hostname"), "{log}");
    assert!(log.contains("[bad] subtest failed: breaks"), "{log}");
    // The failed test's status line says how to debug it (the nested log is off).
    assert!(
        log.contains(&format!(
            "[bad] failure snapshot saved: `vmrig debug {}`",
            out.join("bad").display()
        )),
        "{log}"
    );
    assert!(!out.join("good/failure-snapshot").exists(), "{log}");
    assert!(
        !log.contains("machine # "),
        "console lines interleaved: {log}"
    );
    let table: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("good ") || l.starts_with("bad "))
        .collect();
    assert!(table.iter().any(|l| l.contains("FAILED")), "{log}");
    assert!(table.iter().any(|l| l.contains("passed")), "{log}");
    assert!(out.join("good/events.jsonl").exists() && out.join("bad/serial-machine.log").exists());

    let xml = std::fs::read_to_string(&junit).unwrap();
    let report = Report::deserialize_from_str(&xml).expect("valid JUnit");
    let names: Vec<&str> = report.test_suites.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["bad", "good"], "in the order of the sorted files");
    let bad = &report.test_suites[0];
    let cases: Vec<&str> = bad.test_cases.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(cases, ["bad", "works", "breaks"]);
    match &bad.test_cases[0].status {
        TestCaseStatus::NonSuccess {
            kind: NonSuccessKind::Failure,
            message: Some(m),
            description: Some(d),
            ..
        } => {
            assert!(m.as_str().contains("bad.toml:"), "{m:?}");
            assert!(d.as_str().contains("oops-output"), "{d:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        bad.test_cases[1].status,
        TestCaseStatus::Success { .. }
    ));
    assert!(matches!(
        bad.test_cases[2].status,
        TestCaseStatus::NonSuccess { .. }
    ));
    assert!(xml.contains("serial-machine.log"), "{xml}");

    // The pass is cached, the failure is not.
    let again = vmrig(
        &["run", dir.to_str().unwrap(), "--filter", "good"],
        tmp.path(),
    );
    assert!(text(&again).contains("good: cached"), "{}", text(&again));
    let bad_file = dir.join("bad.toml");
    let listed = vmrig(&["list", bad_file.to_str().unwrap()], tmp.path());
    assert!(
        text(&listed).contains("bad.toml): not cached"),
        "{}",
        text(&listed)
    );
    common::assert_no_leftovers(tmp.path());
}
