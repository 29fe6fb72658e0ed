//! Running the selected tests: the result cache first, then the driver, `-j` at a time.

use std::collections::VecDeque;
use std::path::PathBuf;
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
    let (outcome, piece) = match run {
        Ok(outcome) => {
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
            let (code, message) = describe(spec, err);
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
            Outcome::Failed(why) => line.finish(false, &format!("FAILED after {took}: {why}")),
            _ => line.finish(false, "could not run"),
        }
    }
    (result(outcome), piece)
}

/// The exit code and message of an error that kept a test from running.
fn describe(spec: &TestSpec, err: RunError) -> (i32, String) {
    match err {
        RunError::Image(e) => (
            exit::IMAGE,
            format!(
                "{}: building the images: {:#}",
                spec.name,
                anyhow::Error::new(e)
            ),
        ),
        RunError::Script(e) => (exit::USAGE, format!("{e}")),
        other => (exit::INFRA, format!("{}: {other}", spec.name)),
    }
}
