//! How each test of a `vmrig run` ended, the summary table and the exit code.

use std::time::{Duration, SystemTime};

use crate::exit;
use crate::units::{format_age, format_elapsed};

/// How one test ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Passed,
    /// A passing result recorded earlier (when it passed).
    Cached(SystemTime),
    /// The test ran and failed; one line saying why.
    Failed(String),
    /// The test could not run (exit code of that kind of error, message).
    Error(i32, String),
    /// Not run because an earlier test failed and `--fail-fast` was given.
    Skipped,
}

/// One row of the summary.
#[derive(Debug, Clone, PartialEq)]
pub struct TestResult {
    pub name: String,
    pub outcome: Outcome,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn word(&self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Cached(_) => "cached",
            Outcome::Failed(_) => "FAILED",
            Outcome::Error(..) => "ERROR",
            Outcome::Skipped => "skipped",
        }
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Passed | Outcome::Cached(_))
    }
}

/// The table printed after several tests: test, result, time, and why for failures.
pub fn table(results: &[TestResult], now: SystemTime) -> String {
    let rows: Vec<[String; 4]> = results
        .iter()
        .map(|r| {
            let (time, note) = match &r.outcome {
                Outcome::Cached(at) => (
                    "-".to_owned(),
                    format!("passed {}", format_age(Some(*at), now)),
                ),
                Outcome::Failed(why) | Outcome::Error(_, why) => {
                    (format_elapsed(r.elapsed), first_line(why))
                }
                Outcome::Skipped => ("-".to_owned(), "--fail-fast".to_owned()),
                Outcome::Passed => (format_elapsed(r.elapsed), String::new()),
            };
            [r.name.clone(), r.outcome.word().to_owned(), time, note]
        })
        .collect();
    let header = ["TEST", "RESULT", "TIME", ""].map(str::to_owned);
    let mut widths = [0usize; 3];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let line = format!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let count = |f: fn(&Outcome) -> bool| results.iter().filter(|r| f(&r.outcome)).count();
    out.push_str(&format!(
        "{} passed ({} cached), {} failed, {} errors, {} skipped",
        count(Outcome::is_ok),
        count(|o| matches!(o, Outcome::Cached(_))),
        count(|o| matches!(o, Outcome::Failed(_))),
        count(|o| matches!(o, Outcome::Error(..))),
        count(|o| matches!(o, Outcome::Skipped)),
    ));
    out
}

fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() > 100 {
        format!("{}…", line.chars().take(99).collect::<String>())
    } else {
        line.to_owned()
    }
}

/// The exit code of the whole run: the first error's code (the run could not be done
/// properly), else 1 if a test failed (or was skipped after one), else 0.
pub fn exit_code(results: &[TestResult]) -> i32 {
    if let Some(code) = results.iter().find_map(|r| match r.outcome {
        Outcome::Error(code, _) => Some(code),
        _ => None,
    }) {
        return code;
    }
    if results.iter().all(|r| r.outcome.is_ok()) {
        exit::OK
    } else {
        exit::TEST_FAILED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str, outcome: Outcome, secs: u64) -> TestResult {
        TestResult {
            name: name.into(),
            outcome,
            elapsed: Duration::from_secs(secs),
        }
    }

    #[test]
    fn golden_table() {
        let now = SystemTime::now();
        let results = vec![
            r("client-server", Outcome::Passed, 31),
            r(
                "single",
                Outcome::Cached(now - Duration::from_secs(7200)),
                0,
            ),
            r(
                "web",
                Outcome::Failed("web.toml:12: RequestedAssertionFailed: curl\nmore".into()),
                75,
            ),
            r("late", Outcome::Skipped, 0),
        ];
        assert_eq!(
            table(&results, now),
            "\
TEST           RESULT     TIME
client-server  passed    31.0s
single         cached        -  passed 2h ago
web            FAILED   1m 15s  web.toml:12: RequestedAssertionFailed: curl
late           skipped       -  --fail-fast
2 passed (1 cached), 1 failed, 0 errors, 1 skipped"
        );
    }

    #[test]
    fn exit_codes() {
        let ok = r("a", Outcome::Passed, 1);
        let cached = r("b", Outcome::Cached(SystemTime::now()), 0);
        let failed = r("c", Outcome::Failed("x".into()), 1);
        let error = r("d", Outcome::Error(exit::IMAGE, "x".into()), 1);
        assert_eq!(exit_code(&[ok.clone(), cached.clone()]), 0);
        assert_eq!(exit_code(&[ok.clone(), failed.clone()]), 1);
        assert_eq!(exit_code(&[failed, error, ok]), exit::IMAGE);
        assert_eq!(exit_code(&[r("e", Outcome::Skipped, 0), cached]), 1);
        assert_eq!(exit_code(&[]), 0);
    }
}
