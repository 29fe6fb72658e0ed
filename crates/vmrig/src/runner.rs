//! Running the selected tests: the result cache first, then the driver, `-j` at a time.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use vmrig_driver::cache::ResultCache;
use vmrig_driver::events::Reporter;
use vmrig_driver::junit::{JunitCollector, JunitReport};
use vmrig_driver::{RunError, RunOptions};
use vmrig_image::BuildObserver;
use vmrig_spec::TestSpec;
use vmrig_store::Store;

use crate::board::{Board, TestLine};
use crate::cached;
use crate::exit;
use crate::progress::Progress;
use crate::summary::{Outcome, TestResult};
use crate::units::{format_age, format_elapsed};

/// What every test of the invocation shares.
pub struct Plan {
    /// Options for each run (`out_dir` is the base: per test `<dir>/<name>` when several).
    pub options: RunOptions,
    pub store: Store,
    pub cache: ResultCache,
    /// Use and record the result cache (not for `--rerun`'s lookups, never interactive).
    pub use_cache: bool,
    pub record_cache: bool,
    pub jobs: usize,
    pub fail_fast: bool,
    pub junit: Option<PathBuf>,
    /// Whether each run's output dir is `<out>/<name>` (several tests) or `<out>` itself.
    pub per_test_dirs: bool,
}

/// Runs every test of `specs` and returns one result per test, in the order given.
pub fn run_all(specs: &[TestSpec], plan: &Plan) -> Vec<TestResult> {
    let identity = cached::vmrig_identity();
    let parallel = plan.jobs > 1 && specs.len() > 1;
    let board = parallel.then(|| Arc::new(Board::new()));
    let queue = Mutex::new((0..specs.len()).collect::<VecDeque<_>>());
    let results: Mutex<Vec<Option<(TestResult, Junit)>>> =
        Mutex::new((0..specs.len()).map(|_| None).collect());
    let stop = AtomicBool::new(false);
    let worker = || loop {
        if plan.fail_fast && stop.load(Ordering::SeqCst) {
            return;
        }
        let Some(i) = queue.lock().unwrap().pop_front() else {
            return;
        };
        let result = run_one(&specs[i], plan, &identity, board.as_ref());
        if !result.0.outcome.is_ok() {
            stop.store(true, Ordering::SeqCst);
        }
        results.lock().unwrap()[i] = Some(result);
    };
    std::thread::scope(|s| {
        for _ in 0..plan.jobs.min(specs.len()).max(1) {
            s.spawn(worker);
        }
    });
    let mut junit = JunitReport::new();
    let mut out_dirs = Vec::new();
    let results = results
        .into_inner()
        .unwrap()
        .into_iter()
        .zip(specs)
        .map(|(r, spec)| {
            let (result, piece) = r.unwrap_or_else(|| {
                let skipped = TestResult {
                    name: spec.name.clone(),
                    outcome: Outcome::Skipped,
                    elapsed: Default::default(),
                };
                (skipped, Junit::Skipped)
            });
            if let Junit::Ran(_, dir) = &piece {
                out_dirs.push(dir.clone());
            }
            piece.add_to(&mut junit, &spec.name);
            result
        })
        .collect();
    if let Some(path) = &plan.junit {
        if let Err(e) = junit.write(path) {
            eprintln!(
                "vmrig: error: cannot write the JUnit report {}: {e}",
                path.display()
            );
        }
        // Each test's report.html links the report (a missing page is no error).
        let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
        for dir in &out_dirs {
            let _ = vmrig_driver::html_report::add_link(dir, &path);
        }
    }
    results
}

/// What a test adds to the JUnit report (added in the order the tests were given).
enum Junit {
    Ran(Arc<JunitCollector>, PathBuf),
    Cached(SystemTime),
    Error(String, std::time::Duration),
    Skipped,
}

impl Junit {
    fn add_to(self, report: &mut JunitReport, test: &str) {
        match self {
            Junit::Ran(collector, out) => report.add_run(test, &collector, Some(&out)),
            Junit::Cached(at) => report.add_cached(test, at),
            Junit::Error(message, took) => report.add_error(test, &message, took),
            Junit::Skipped => report.add_skipped(test, "skipped after a failure (--fail-fast)"),
        }
    }
}

fn run_one(
    spec: &TestSpec,
    plan: &Plan,
    identity: &str,
    board: Option<&Arc<Board>>,
) -> (TestResult, Junit) {
    let started = Instant::now();
    let result = |outcome| TestResult {
        name: spec.name.clone(),
        outcome,
        elapsed: started.elapsed(),
    };
    if plan.use_cache {
        if let Some(hit) = cached::lookup(&plan.store, &plan.cache, spec, identity) {
            let when = format_age(Some(hit.passed_at()), SystemTime::now());
            let line = format!("cached (passed {when})");
            match board {
                Some(board) => board.println(&format!("[{}] {line}", spec.name)),
                None => eprintln!("vmrig: {}: {line}", spec.name),
            }
            let at = hit.passed_at();
            return (result(Outcome::Cached(at)), Junit::Cached(at));
        }
    }

    let line: Option<Arc<TestLine>> = board.map(|b| b.test(&spec.name));
    let collector = Arc::new(JunitCollector::new());
    let mut opts = plan.options.clone();
    if plan.per_test_dirs {
        opts.out_dir = opts.out_dir.map(|d| d.join(&spec.name));
    }
    opts.reporters.push(collector.clone());
    if let Some(line) = &line {
        opts.reporters.push(line.clone() as Arc<dyn Reporter>);
        opts.terminal_log = false;
    }
    let progress;
    let observer: &dyn BuildObserver = match &line {
        Some(line) => line.as_ref(),
        None => {
            progress = Progress::new(crate::verbosity() > 0);
            &progress
        }
    };
    let run = vmrig_driver::run_test(spec, &opts, observer);
    // Without the nested log (several tests at once), the status line says how to debug.
    let mut snapshot_of = None;
    let (outcome, piece) = match run {
        Ok(outcome) => {
            use vmrig_driver::failure::{DIR_NAME, MANIFEST};
            if !outcome.passed && outcome.out_dir.join(DIR_NAME).join(MANIFEST).exists() {
                snapshot_of = Some(outcome.out_dir.clone());
            }
            if plan.record_cache {
                cached::record(&plan.cache, spec, identity, &outcome);
            }
            let piece = Junit::Ran(collector, outcome.out_dir.clone());
            match (outcome.passed, outcome.failure) {
                (true, _) => (Outcome::Passed, piece),
                (false, why) => (
                    Outcome::Failed(why.unwrap_or_else(|| "failed".into())),
                    piece,
                ),
            }
        }
        Err(err) => {
            // The output directory, as `run_test` makes it: `-o DIR` or `vmrig-out`.
            let out_dir = opts.out_dir.as_deref().unwrap_or(Path::new("vmrig-out"));
            let (code, message) = describe(spec, err, Some(out_dir));
            match &line {
                Some(line) => line.say(&format!("error: {message}")),
                None => eprintln!("error: {message}"),
            }
            let piece = Junit::Error(message.clone(), started.elapsed());
            (Outcome::Error(code, message), piece)
        }
    };
    if let Some(line) = &line {
        let took = format_elapsed(started.elapsed());
        match &outcome {
            Outcome::Passed => line.finish(true, &format!("passed in {took}")),
            Outcome::Failed(why) => {
                if let Some(out) = &snapshot_of {
                    line.say(&format!(
                        "failure snapshot saved: `vmrig debug {}`",
                        out.display()
                    ));
                }
                line.finish(false, &format!("FAILED after {took}: {why}"))
            }
            _ => line.finish(false, "could not run"),
        }
    }
    (result(outcome), piece)
}

/// The exit code and message of an error that kept a test from running: the code by the
/// error's kind, the message its text (and for a full disk, where and what frees it).
fn describe(spec: &TestSpec, err: RunError, out_dir: Option<&Path>) -> (i32, String) {
    let kind = err.kind();
    let code = exit::exit_code(&kind);
    let message = match &err {
        RunError::Image(e) => {
            let place = unknown_package_place(spec, e).map(|at| format!("{at}: "));
            format!(
                "{}{}: building the images: {}",
                place.unwrap_or_default(),
                spec.name,
                exit::chain_text(e)
            )
        }
        // A syntax error is the test file's; Python that cannot check it is the host's.
        RunError::Script(e @ vmrig_python::ScriptError::Syntax(_)) => e.to_string(),
        other => format!("{}: {}", spec.name, exit::chain_text(other)),
    };
    match kind {
        vmrig_driver::ErrorKind::DiskFull(full) => {
            let full = exit::disk_full_message(&full, out_dir);
            (code, format!("{}: {full}\n  cause: {message}", spec.name))
        }
        _ => (code, message),
    }
}

/// `file:line:column` where the test file asks for the package of an unknown-package error,
/// or for the local package file whose dependency cannot be met (when the node has one;
/// apt names the package, not the file). From the places the spec kept; the file is not
/// read again.
pub fn unknown_package_place(spec: &TestSpec, err: &vmrig_image::ImageError) -> Option<String> {
    use vmrig_image::ImageError;
    let places: Vec<_> = match err {
        ImageError::UnknownPackage { package, nodes } => nodes
            .iter()
            .filter_map(|node| spec.package_place(node, package))
            .collect(),
        ImageError::UnmetDependency { nodes, .. } => nodes
            .iter()
            .filter_map(|node| match spec.nodes.get(node)?.local_debs.as_slice() {
                [only] => spec.package_place(node, &only.written),
                _ => None,
            })
            .collect(),
        _ => return None,
    };
    places.into_iter().min().map(|place| spec.location(place))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, text: &str) -> TestSpec {
        let path = dir.join("t.toml");
        std::fs::write(&path, text).unwrap();
        vmrig_spec::load(&path).unwrap()
    }

    #[test]
    fn an_unknown_package_is_reported_at_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(
            dir.path(),
            "name = \"t\"\ntest_script = \"start_all()\"\n\n[nodes.server]\npackages = [\"curl\", 'nosuchpkg']\n",
        );
        // The place comes from the parsed spec: the file is not read again.
        std::fs::remove_file(&spec.path).unwrap();
        let err = RunError::Image(vmrig_image::ImageError::UnknownPackage {
            package: "nosuchpkg".into(),
            nodes: vec!["server".into()],
        });
        let (code, message) = describe(&spec, err, None);
        assert_eq!(code, exit::IMAGE);
        assert_eq!(
            message,
            format!(
                "{}:5:21: t: building the images: unknown Debian package `nosuchpkg` (asked for by node server); check its name with `apt-cache search <name>` or `apt-cache policy <name>`",
                spec.path.display()
            )
        );
    }

    #[test]
    fn an_unmet_dependency_of_a_local_package_is_reported_at_its_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("broken.deb"),
            b"!<arch>\ndebian-binary   0           0     0     100644  4         `\n2.0\n",
        )
        .unwrap();
        let spec = spec(
            dir.path(),
            "name = \"t\"\ntest_script = \"start_all()\"\n\n[nodes.server]\npackages = [\"curl\", \"./broken.deb\"]\n",
        );
        let err = RunError::Image(vmrig_image::ImageError::UnmetDependency {
            package: "broken".into(),
            dependency: "nosuchpkg (>= 2)".into(),
            reason: "but it is not installable".into(),
            nodes: vec!["server".into()],
        });
        let (code, message) = describe(&spec, err, None);
        assert_eq!(code, exit::IMAGE);
        assert_eq!(
            message,
            format!(
                "{}:5:21: t: building the images: local package `broken` (of node server) depends on `nosuchpkg (>= 2)`, but it is not installable; check that the package's Depends: can be met from the node's suite (`apt-cache policy <name>`), or add the missing package to `packages`",
                spec.path.display()
            )
        );
    }

    #[test]
    fn python_too_old_is_the_hosts_problem_a_syntax_error_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path(), "name = \"t\"\ntest_script = \"x\"\n[nodes.a]\n");
        let old = vmrig_python::BridgeError::PythonTooOld {
            python: "/usr/bin/python3".into(),
            version: vmrig_python::PythonVersion { major: 3, minor: 8 },
        };
        let (code, message) = describe(&spec, RunError::Script(old.into()), None);
        assert_eq!(code, exit::INFRA);
        assert!(
            message.starts_with("t: /usr/bin/python3 is Python 3.8"),
            "{message}"
        );
    }

    #[test]
    fn a_full_disk_during_a_build_says_where_and_what_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path(), "name = \"t\"\ntest_script = \"x\"\n[nodes.a]\n");
        let enospc = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let err = RunError::Image(vmrig_image::ImageError::Io {
            context: "writing the initrd".into(),
            source: enospc,
        });
        let (code, message) = describe(&spec, err, None);
        assert_eq!(code, exit::INFRA);
        let first = message.lines().next().unwrap();
        assert!(
            first.starts_with("t: no space left on the disk of "),
            "{message}"
        );
        assert!(first.contains("`vmrig store gc`"), "{message}");
        assert!(
            message.ends_with("  cause: t: building the images: writing the initrd: No space left on device (os error 28)"),
            "{message}"
        );
    }
}
