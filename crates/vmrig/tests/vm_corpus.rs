//! The upstream corpus: real tests from nixpkgs' `nixos/tests`, ported to vmrig test files
//! with their scripts kept as they are (tests/nixpkgs/, table in docs/corpus.md), run under
//! TCG. One nextest test per file (datatest-stable), so a failure names its test, nextest
//! times each one, and a failure's message ends with that test's own log. Every file of
//! tests/nixpkgs/ must pass; every file of tests/nixpkgs/expect-fail/ is a test upstream
//! expects to fail, and must fail with the text its `# expect-fail:` line names.

mod common;

use std::path::Path;

datatest_stable::harness! {
    { test = passes, root = "../../tests/nixpkgs", pattern = r"^[^/]+\.toml$" },
    { test = fails_as_upstream, root = "../../tests/nixpkgs/expect-fail", pattern = r"^[^/]+\.toml$" },
}

/// How many lines of a failed run's log the failure shows: its end holds the failing
/// script line, the command, its output, the machine's last console lines and the summary.
const LOG_TAIL_LINES: usize = 120;

/// `vmrig run --rerun -j 1 -o <tmp>/out FILE` from the repository root: (exit code, log).
fn run(file: &Path, tmp: &Path) -> (Option<i32>, String) {
    let file = file.canonicalize().expect("the corpus file exists");
    let out_dir = tmp.join("out");
    let args = ["run", "-j", "1", "-o", out_dir.to_str().unwrap()];
    let out = common::vmrig_rerun(&[&args[..], &[file.to_str().unwrap()]].concat(), tmp);
    (out.status.code(), common::text(&out))
}

/// The last `n` lines of `log`, saying how many came before.
fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let skipped = lines.len().saturating_sub(n);
    let head = if skipped > 0 {
        format!("[… {skipped} earlier lines of the log …]\n")
    } else {
        String::new()
    };
    format!("{head}{}", lines[skipped..].join("\n"))
}

/// Whether the log says the test passed (a single test's run ends with
/// `test <name> passed in <t> s`).
fn says_passed(log: &str) -> bool {
    log.lines()
        .any(|l| l.starts_with("test ") && l.contains(" passed in "))
}

// Failures panic rather than return an error: datatest-stable prints an error with `{:?}`,
// which would put the whole log on one line.
fn passes(file: &Path) -> datatest_stable::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (code, log) = run(file, tmp.path());
    assert!(
        code == Some(0) && says_passed(&log),
        "{} did not pass (exit code {code:?}); the end of its log:\n{}",
        file.display(),
        tail(&log, LOG_TAIL_LINES)
    );
    common::assert_no_leftovers(tmp.path());
    Ok(())
}

/// The text after `# expect-fail:` in `file`: what the failure must say.
fn expected_failure(file: &Path) -> String {
    let text = std::fs::read_to_string(file).expect("read the corpus file");
    text.lines()
        .find_map(|l| l.strip_prefix("# expect-fail:"))
        .unwrap_or_else(|| panic!("{}: no `# expect-fail: TEXT` line", file.display()))
        .trim()
        .to_string()
}

fn fails_as_upstream(file: &Path) -> datatest_stable::Result<()> {
    let expected = expected_failure(file);
    let tmp = tempfile::tempdir()?;
    let (code, log) = run(file, tmp.path());
    assert!(
        code == Some(1) && log.contains(&expected),
        "{} should fail with {expected:?} (exit code 1), got exit code {code:?}; the end of its log:\n{}",
        file.display(),
        tail(&log, LOG_TAIL_LINES)
    );
    common::assert_no_leftovers(tmp.path());
    Ok(())
}
