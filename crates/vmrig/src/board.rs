//! The status of several tests running at once, on stderr.
//!
//! On a terminal: one live line per test (`⠋ client-server  12s  subtest: fetch`), finished
//! as `✓ client-server passed in 31.0s`. Otherwise plain lines, prefixed with the test's
//! name, for what matters only: start, subtests, failures, the end:
//!
//! ```text
//! [client-server] started
//! [client-server] subtest: fetch the page
//! [client-server] subtest failed: fetch the page: command `curl …` failed (exit code 7)
//! [client-server] FAILED after 31.0s: t.toml:12: RequestedAssertionFailed: …
//! ```
//!
//! Each test's full log is in its `events.jsonl` either way.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use vmrig_driver::events::{BlockKind, Event, Reporter, Stamped};
use vmrig_image::{BuildObserver, StepOutcome};

/// Where plain lines go (stderr, or a buffer in tests).
pub type Sink = Arc<dyn Fn(&str) + Send + Sync>;

/// Live lines on a terminal, plain lines otherwise.
pub struct Board {
    multi: Option<MultiProgress>,
    sink: Sink,
}

impl Board {
    pub fn new() -> Board {
        let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
        let sink: Sink = Arc::new(|line: &str| {
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        });
        if std::io::stderr().is_terminal() && !dumb {
            Board {
                multi: Some(MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
                sink,
            }
        } else {
            Board { multi: None, sink }
        }
    }

    /// Plain lines into `sink`.
    #[cfg(test)]
    pub fn plain(sink: Sink) -> Board {
        Board { multi: None, sink }
    }

    /// A line that stays (above the live lines on a terminal).
    pub fn println(&self, line: &str) {
        match &self.multi {
            Some(multi) => {
                let _ = multi.println(line);
            }
            None => (self.sink)(line),
        }
    }

    /// The status line of a test that starts now.
    pub fn test(self: &Arc<Self>, name: &str) -> Arc<TestLine> {
        let bar = self.multi.as_ref().map(|multi| {
            let bar = multi.add(ProgressBar::new_spinner());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner:.cyan} {prefix:.bold} {elapsed:>4.dim} {wide_msg}",
                )
                .expect("valid template"),
            );
            bar.set_prefix(name.to_owned());
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        let line = Arc::new(TestLine {
            name: name.to_owned(),
            board: self.clone(),
            bar,
        });
        line.say("started");
        line
    }
}

/// One test's status; a [`Reporter`] of its events and a [`BuildObserver`] of its builds.
pub struct TestLine {
    name: String,
    board: Arc<Board>,
    bar: Option<ProgressBar>,
}

impl TestLine {
    /// A line that stays: printed (plain) or above the live lines.
    pub fn say(&self, text: &str) {
        if self.bar.is_none() || text != "started" {
            self.board.println(&format!("[{}] {text}", self.name));
        }
    }

    fn status(&self, text: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(text.to_owned());
        }
    }

    /// Ends the live line with `text` (and prints it as a line when plain).
    pub fn finish(&self, ok: bool, text: &str) {
        match &self.bar {
            Some(bar) => {
                bar.set_style(ProgressStyle::with_template("{msg}").expect("valid template"));
                let mark = if ok { "✓" } else { "✗" };
                bar.finish_with_message(format!("{mark} {} {text}", self.name));
            }
            None => self.say(text),
        }
    }
}

impl Drop for TestLine {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}

/// What the live line shows for `event`, if it changes.
pub fn status_of(event: &Event) -> Option<String> {
    match event {
        Event::RunStarted { .. } => Some("starting".into()),
        Event::BlockBegin {
            kind: BlockKind::Subtest,
            message,
            ..
        } => Some(format!("subtest: {message}")),
        Event::BlockBegin {
            message, machine, ..
        } if message.starts_with("waiting for the VM to finish booting") => Some(format!(
            "booting {}",
            machine.as_deref().unwrap_or("a machine")
        )),
        Event::BlockBegin {
            depth: 0,
            message,
            machine,
            ..
        } => Some(match machine {
            Some(m) => format!("{m}: {message}"),
            None => message.clone(),
        }),
        _ => None,
    }
}

/// The line that stays for `event`, if any (subtests and failures only).
pub fn line_of(event: &Event) -> Option<String> {
    match event {
        Event::BlockBegin {
            kind: BlockKind::Subtest,
            message,
            ..
        } => Some(format!("subtest: {message}")),
        Event::BlockEnd {
            kind: BlockKind::Subtest,
            message,
            error: Some(err),
            ..
        } => Some(format!(
            "subtest failed: {message}: {}",
            err.lines().next().unwrap_or_default()
        )),
        Event::ScriptFailed {
            exc_type,
            message,
            line,
            file,
            ..
        } => {
            let place = line.map(|l| format!("{file}:{l}: ")).unwrap_or_default();
            let first = message.lines().next().unwrap_or_default();
            Some(format!("{place}{exc_type}: {first}"))
        }
        _ => None,
    }
}

impl Reporter for TestLine {
    fn report(&self, stamped: &Stamped) {
        if let Some(status) = status_of(&stamped.event) {
            self.status(&status);
        }
        if let Some(line) = line_of(&stamped.event) {
            self.say(&line);
        }
    }
}

impl BuildObserver for TestLine {
    fn step_started(&self, step: &str) {
        self.status(&format!("building {step}"));
        if self.bar.is_none() {
            self.say(&format!("building {step}..."));
        }
    }

    fn line(&self, step: &str, line: &str) {
        // A cache's warning (unreachable, corrupt object) is shown in any case.
        if line.starts_with("warning: ") {
            self.say(&format!("{step}: {line}"));
        }
    }

    fn step_finished(&self, step: &str, outcome: StepOutcome) {
        match outcome {
            StepOutcome::Built(took) => self.say(&format!(
                "built {step} in {}",
                crate::units::format_elapsed(took)
            )),
            StepOutcome::Fetched(took) => self.say(&format!(
                "fetched {step} from the cache in {}",
                crate::units::format_elapsed(took)
            )),
            StepOutcome::Cached => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn plain_lines_are_prefixed_and_few() {
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let l2 = lines.clone();
        let board = Arc::new(Board::plain(Arc::new(move |s: &str| {
            l2.lock().unwrap().push(s.to_owned())
        })));
        let t = board.test("web");
        let emit = |event: Event| {
            t.report(&Stamped {
                time: std::time::SystemTime::now(),
                event,
            })
        };
        emit(Event::Log {
            level: vmrig_driver::events::Level::Info,
            message: "noise".into(),
            machine: None,
            depth: 0,
        });
        emit(Event::BlockBegin {
            id: 1,
            depth: 0,
            kind: BlockKind::Subtest,
            message: "fetch".into(),
            machine: None,
        });
        emit(Event::BlockEnd {
            id: 1,
            depth: 0,
            kind: BlockKind::Subtest,
            message: "fetch".into(),
            elapsed: Duration::from_secs(1),
            error: Some("curl failed\nmore".into()),
        });
        emit(Event::ScriptFailed {
            exc_type: "RequestedAssertionFailed".into(),
            message: "curl failed".into(),
            line: Some(4),
            file: "web.toml".into(),
            traceback: String::new(),
        });
        t.finish(false, "FAILED after 3.0s");
        assert_eq!(
            *lines.lock().unwrap(),
            [
                "[web] started",
                "[web] subtest: fetch",
                "[web] subtest failed: fetch: curl failed",
                "[web] web.toml:4: RequestedAssertionFailed: curl failed",
                "[web] FAILED after 3.0s",
            ]
        );
    }

    #[test]
    fn live_status_follows_boot_and_subtests() {
        let boot = Event::BlockBegin {
            id: 1,
            depth: 0,
            kind: BlockKind::Nested,
            message: "waiting for the VM to finish booting".into(),
            machine: Some("server".into()),
        };
        assert_eq!(status_of(&boot).as_deref(), Some("booting server"));
        let cmd = Event::BlockBegin {
            id: 2,
            depth: 0,
            kind: BlockKind::Nested,
            message: "must succeed: true".into(),
            machine: Some("client".into()),
        };
        assert_eq!(
            status_of(&cmd).as_deref(),
            Some("client: must succeed: true")
        );
        let console = Event::Console {
            machine: "m".into(),
            line: "x".into(),
        };
        assert_eq!(status_of(&console), None);
        assert_eq!(line_of(&console), None);
    }
}
