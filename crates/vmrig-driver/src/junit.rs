//! JUnit XML reports (`vmrig run --junit FILE`), built from the event stream.
//!
//! A [`JunitCollector`] is a [`Reporter`] given to one run (`RunOptions.reporters`); it keeps
//! the subtests, the script's failure and the outcome. A [`JunitReport`] gathers every test
//! of an invocation, one `<testsuite>` per test holding one `<testcase>` for the test itself
//! and one per subtest (classname = the test's name), and is written with `quick-junit`.
//! Failures carry the script's file and line, the exception and the command's output; the
//! test's case lists its serial logs and `events.jsonl` as properties and in `system-out`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use quick_junit::{NonSuccessKind, Property, Report, TestCase, TestCaseStatus, TestSuite};

use crate::events::{BlockKind, Event, Reporter, Stamped};

/// Lines of log kept per subtest for its `system-out` (the last ones).
const SUBTEST_LOG_LINES: usize = 200;

#[derive(Debug, Clone, PartialEq)]
struct Subtest {
    name: String,
    elapsed: Duration,
    error: Option<String>,
    log: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
struct ScriptFailure {
    exc_type: String,
    message: String,
    place: String,
    traceback: String,
}

#[derive(Debug, Default)]
struct Collected {
    /// Subtests still open, by block id: (name, log so far).
    open: HashMap<u64, (String, Vec<String>)>,
    subtests: Vec<Subtest>,
    failure: Option<ScriptFailure>,
    /// `(passed, elapsed, summary)` from `RunFinished`.
    finished: Option<(bool, Duration, String)>,
    started: Option<SystemTime>,
}

/// Collects what a JUnit report needs from one run's events.
#[derive(Debug, Default)]
pub struct JunitCollector {
    state: Mutex<Collected>,
}

impl JunitCollector {
    pub fn new() -> JunitCollector {
        JunitCollector::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Collected> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Reporter for JunitCollector {
    fn report(&self, stamped: &Stamped) {
        let mut s = self.lock();
        s.started.get_or_insert(stamped.time);
        // Every line the terminal would show goes to the open subtests' logs (a subtest's
        // own first line is not in its log: it opens below).
        if let Some(line) = crate::reporters::render(&stamped.event, &|_, t| t.to_owned()) {
            for (_, log) in s.open.values_mut() {
                if log.len() == SUBTEST_LOG_LINES {
                    log.remove(0);
                }
                log.push(line.clone());
            }
        }
        match &stamped.event {
            Event::BlockBegin {
                id,
                kind: BlockKind::Subtest,
                message,
                ..
            } => {
                s.open.insert(*id, (message.clone(), Vec::new()));
            }
            Event::BlockEnd {
                id,
                kind: BlockKind::Subtest,
                elapsed,
                error,
                ..
            } => {
                if let Some((name, log)) = s.open.remove(id) {
                    s.subtests.push(Subtest {
                        name,
                        elapsed: *elapsed,
                        error: error.clone(),
                        log,
                    });
                }
            }
            Event::ScriptFailed {
                exc_type,
                message,
                line,
                file,
                traceback,
            } => {
                let place = crate::events::script_place(file, *line);
                s.failure = Some(ScriptFailure {
                    exc_type: exc_type.clone(),
                    message: message.clone(),
                    place,
                    traceback: traceback.clone(),
                });
            }
            Event::RunFinished {
                passed,
                elapsed,
                summary,
            } => s.finished = Some((*passed, *elapsed, summary.clone())),
            _ => {}
        }
    }
}

/// Every test of an invocation, as a JUnit report.
#[derive(Debug, Clone)]
pub struct JunitReport {
    report: Report,
}

impl Default for JunitReport {
    fn default() -> Self {
        JunitReport::new()
    }
}

impl JunitReport {
    pub fn new() -> JunitReport {
        JunitReport {
            report: Report::new("vmrig"),
        }
    }

    /// A test that ran: its case, and one case per subtest. `out_dir` is the run's output
    /// directory (serial logs and `events.jsonl` are linked from it).
    pub fn add_run(&mut self, test: &str, collected: &JunitCollector, out_dir: Option<&Path>) {
        let s = collected.lock();
        let mut suite = TestSuite::new(test);
        if let Some(t) = s.started {
            suite.set_timestamp(chrono_like(t));
        }
        let (passed, elapsed, summary) = s.finished.clone().unwrap_or((
            false,
            Duration::ZERO,
            format!("test {test} did not finish"),
        ));
        let status = if passed {
            TestCaseStatus::success()
        } else {
            let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
            match &s.failure {
                Some(f) => {
                    let first = f.message.lines().next().unwrap_or_default();
                    status
                        .set_message(format!("{}: {}: {first}", f.place, f.exc_type))
                        .set_type(f.exc_type.clone())
                        .set_description(failure_text(f));
                }
                None => {
                    status.set_message(summary.clone());
                }
            }
            status
        };
        let mut case = TestCase::new(test, status);
        case.set_classname(test).set_time(elapsed);
        let mut out = vec![summary];
        if let Some(dir) = out_dir {
            let events = dir.join("events.jsonl");
            case.add_property(Property::new("events", events.display().to_string()));
            out.push(format!("events: {}", events.display()));
            for log in serial_logs(dir) {
                case.add_property(Property::new("serial-log", log.display().to_string()));
                out.push(format!("serial log: {}", log.display()));
            }
        }
        case.set_system_out(out.join("\n"));
        suite.add_test_case(case);
        for sub in &s.subtests {
            suite.add_test_case(subtest_case(test, sub));
        }
        // Subtests still open when the run ended (the failure happened inside them).
        let mut open: Vec<_> = s.open.iter().collect();
        open.sort_by_key(|(id, _)| **id);
        for (_, (name, log)) in open {
            let sub = Subtest {
                name: name.clone(),
                elapsed: Duration::ZERO,
                error: Some("the run ended inside this subtest".into()),
                log: log.clone(),
            };
            suite.add_test_case(subtest_case(test, &sub));
        }
        self.report.add_test_suite(suite);
    }

    /// A test whose passing result was cached: one passing case, marked `cached`.
    pub fn add_cached(&mut self, test: &str, passed_at: SystemTime) {
        let mut suite = TestSuite::new(test);
        let mut case = TestCase::new(test, TestCaseStatus::success());
        case.set_classname(test)
            .set_time(Duration::ZERO)
            .add_property(Property::new("cached", "true"))
            .add_property(Property::new(
                "passed-at",
                chrono_like(passed_at).to_rfc3339(),
            ));
        suite.add_test_case(case);
        self.report.add_test_suite(suite);
    }

    /// A test that was not run.
    pub fn add_skipped(&mut self, test: &str, why: &str) {
        let mut suite = TestSuite::new(test);
        let mut status = TestCaseStatus::skipped();
        status.set_message(why);
        let mut case = TestCase::new(test, status);
        case.set_classname(test);
        suite.add_test_case(case);
        self.report.add_test_suite(suite);
    }

    /// A test that could not run (its images did not build, its script did not compile...).
    pub fn add_error(&mut self, test: &str, message: &str, elapsed: Duration) {
        let mut suite = TestSuite::new(test);
        let mut status = TestCaseStatus::non_success(NonSuccessKind::Error);
        let first = message.lines().next().unwrap_or_default();
        status.set_message(first).set_description(message);
        let mut case = TestCase::new(test, status);
        case.set_classname(test).set_time(elapsed);
        suite.add_test_case(case);
        self.report.add_test_suite(suite);
    }

    pub fn to_xml(&self) -> Result<String, quick_junit::SerializeError> {
        self.report.to_string()
    }

    /// Writes the report to `path` (written aside, then renamed).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let xml = self.to_xml().map_err(std::io::Error::other)?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = tempfile::NamedTempFile::new_in(dir)?;
        std::fs::write(tmp.path(), xml)?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }
}

fn subtest_case(test: &str, sub: &Subtest) -> TestCase {
    let status = match &sub.error {
        None => TestCaseStatus::success(),
        Some(err) => {
            let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
            let first = err.lines().next().unwrap_or_default();
            status.set_message(first).set_description(err.clone());
            status
        }
    };
    let mut case = TestCase::new(sub.name.clone(), status);
    case.set_classname(test).set_time(sub.elapsed);
    if !sub.log.is_empty() {
        case.set_system_out(sub.log.join("\n"));
    }
    case
}

fn failure_text(f: &ScriptFailure) -> String {
    let mut text = String::new();
    if !f.traceback.trim().is_empty() {
        text.push_str(f.traceback.trim_end());
        text.push('\n');
    }
    text.push_str(&format!("{}: {}: {}", f.place, f.exc_type, f.message));
    text
}

/// `serial-*.log` files of an output directory, sorted.
fn serial_logs(dir: &Path) -> Vec<PathBuf> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("serial-") && n.ends_with(".log"))
        })
        .collect();
    logs.sort();
    logs
}

/// A system time as the fixed-offset (UTC) date-time quick-junit takes.
fn chrono_like(t: SystemTime) -> chrono::DateTime<chrono::FixedOffset> {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    chrono::DateTime::from_timestamp(secs, 0)
        .unwrap_or_default()
        .fixed_offset()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logger::Logger;
    use std::sync::Arc;

    /// Feeds a run with a passing and a failing subtest through a real Logger.
    fn failing_run() -> Arc<JunitCollector> {
        let collector = Arc::new(JunitCollector::new());
        struct Fwd(Arc<JunitCollector>);
        impl Reporter for Fwd {
            fn report(&self, e: &Stamped) {
                self.0.report(e)
            }
        }
        let log = Logger::new(vec![Box::new(Fwd(collector.clone()))]);
        log.emit(Event::RunStarted {
            test: "web".into(),
            file: "web.toml".into(),
        });
        let ok = log.begin(BlockKind::Subtest, "server starts", None);
        log.info("waiting for unit nginx.service");
        log.end(ok, None);
        let bad = log.begin(BlockKind::Subtest, "client fetches <page>", None);
        let cmd = log.begin(
            BlockKind::Nested,
            "must succeed: curl http://server/",
            Some("client"),
        );
        log.end(
            cmd,
            Some("command `curl http://server/` failed (exit code 7)".into()),
        );
        log.end(
            bad,
            Some(
                "command `curl http://server/` failed (exit code 7)\noutput: refused & gone".into(),
            ),
        );
        log.emit(Event::ScriptFailed {
            exc_type: "RequestedAssertionFailed".into(),
            message: "command `curl http://server/` failed (exit code 7)\nrefused".into(),
            line: Some(12),
            file: "web.toml".into(),
            traceback: "Traceback (most recent call last):\n  File \"web.toml\", line 12\n".into(),
        });
        log.emit(Event::RunFinished {
            passed: false,
            elapsed: Duration::from_secs(3),
            summary: "test web FAILED after 3.0 s".into(),
        });
        collector
    }

    #[test]
    fn report_parses_back_with_subtests_and_failure_text() {
        let out = tempfile::tempdir().unwrap();
        std::fs::write(out.path().join("serial-client.log"), "").unwrap();
        let mut report = JunitReport::new();
        report.add_run("web", &failing_run(), Some(out.path()));
        report.add_cached("single", SystemTime::now());
        report.add_error(
            "broken",
            "building the images: unknown package `nope`",
            Duration::ZERO,
        );
        report.add_skipped("late", "skipped after a failure");
        let xml = report.to_xml().unwrap();
        let parsed = Report::deserialize_from_str(&xml).expect("valid JUnit");
        assert_eq!(parsed.test_suites.len(), 4);
        assert!(matches!(
            parsed.test_suites[3].test_cases[0].status,
            TestCaseStatus::Skipped { .. }
        ));
        let web = &parsed.test_suites[0];
        let names: Vec<&str> = web.test_cases.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["web", "server starts", "client fetches <page>"]);
        assert!(web
            .test_cases
            .iter()
            .all(|c| c.classname.as_ref().map(|c| c.as_str()) == Some("web")));
        let message = |c: &TestCase| match &c.status {
            TestCaseStatus::NonSuccess { message, .. } => message.as_ref().map(|m| m.to_string()),
            _ => None,
        };
        assert_eq!(
            message(&web.test_cases[0]).as_deref(),
            Some("web.toml:12: RequestedAssertionFailed: command `curl http://server/` failed (exit code 7)")
        );
        assert_eq!(message(&web.test_cases[1]), None, "passing subtest");
        assert!(matches!(&web.test_cases[2].status,
            TestCaseStatus::NonSuccess { description: Some(d), kind: NonSuccessKind::Failure, .. }
                if d.contains("refused & gone")));
        let sub_out = web.test_cases[1].system_out.as_ref().unwrap().to_string();
        assert!(
            sub_out.contains("waiting for unit nginx.service"),
            "{sub_out}"
        );
        let props: Vec<_> = web.test_cases[0]
            .properties
            .iter()
            .map(|p| p.name.to_string())
            .collect();
        assert_eq!(props, ["events", "serial-log"]);
        assert!(xml.contains("serial-client.log"));
        assert!(matches!(
            parsed.test_suites[2].test_cases[0].status,
            TestCaseStatus::NonSuccess {
                kind: NonSuccessKind::Error,
                ..
            }
        ));
        assert_eq!(
            parsed.test_suites[1].test_cases[0].properties[0]
                .name
                .as_str(),
            "cached"
        );
    }

    #[test]
    fn an_unfinished_subtest_is_a_failure_and_written_files_parse() {
        let collector = JunitCollector::new();
        collector.report(&Stamped {
            time: SystemTime::now(),
            event: Event::BlockBegin {
                id: 1,
                depth: 0,
                kind: BlockKind::Subtest,
                message: "hangs".into(),
                machine: None,
            },
        });
        let mut report = JunitReport::new();
        report.add_run("t", &collector, None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/junit.xml");
        report.write(&path).unwrap();
        let parsed =
            Report::deserialize_from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let cases = &parsed.test_suites[0].test_cases;
        assert_eq!(cases.len(), 2);
        assert!(matches!(cases[0].status, TestCaseStatus::NonSuccess { .. }));
        assert!(matches!(cases[1].status, TestCaseStatus::NonSuccess { .. }));
    }
}
