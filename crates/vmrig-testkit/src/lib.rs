//! What vmrig's own tests share.
//!
//! A test that needs something this host lacks (QEMU, root, a tool) says so and returns
//! early on a developer's machine; in CI (`CI` set to anything but `false` or `0`, as
//! GitHub Actions, GitLab CI and `.ci/run` do) it fails instead, so that a test that
//! could not run is never counted as passed.

/// Whether this is a CI run.
pub fn in_ci() -> bool {
    ci_value(std::env::var("CI").ok().as_deref())
}

fn ci_value(value: Option<&str>) -> bool {
    matches!(value.map(str::trim), Some(v) if !v.is_empty() && v != "false" && v != "0")
}

/// Reports that the calling test cannot run here because of `why`: in CI it panics, else it
/// prints a note. The caller returns right after.
#[track_caller]
pub fn cannot_run(why: &str) {
    if in_ci() {
        panic!("this test cannot run here, and CI must run every test: {why}");
    }
    eprintln!("skipped (cannot run here; in CI this fails): {why}");
}

/// `true` when `program` runs (`program --version`), else [`cannot_run`] and `false`.
#[track_caller]
pub fn require_program(program: &str) -> bool {
    let found = std::process::Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if !found {
        cannot_run(&format!("{program} is not installed"));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_is_any_value_but_empty_false_or_zero() {
        for v in ["true", "1", "yes", "github"] {
            assert!(ci_value(Some(v)), "{v}");
        }
        for v in [None, Some(""), Some("false"), Some("0"), Some(" ")] {
            assert!(!ci_value(v), "{v:?}");
        }
    }
}
