//! `report.html`: one self-contained page per run, written into the output directory when
//! the run finishes, that opens from a CI artifact without a server. It holds the nested
//! log (collapsible, the failing steps open and marked), a timeline per machine, the
//! screenshots (inline), each machine's serial log and links to the other files of the
//! output directory (pcaps, `events.jsonl`, JUnit).
//!
//! The page is built from the run's events (an [`HtmlReport`] is one of the run's
//! reporters) and the files the run left in its output directory. It needs no script: the
//! nesting is `<details>`, the timeline plain positioned boxes.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use crate::events::{BlockKind, Event, Level, Reporter, Stamped};

mod page;
#[cfg(test)]
mod tests;

pub use page::add_link;
use page::render;

/// The file name in the output directory.
pub const REPORT_FILE: &str = "report.html";

/// Serial logs longer than this are cut to their end (the page must stay openable).
const SERIAL_LOG_LIMIT: usize = 2 << 20;

/// Collects a run's events; writes the page at `RunFinished`, or when it is dropped
/// without one (a run that ended some other way still leaves its page).
pub struct HtmlReport {
    out_dir: PathBuf,
    events: Mutex<Vec<Stamped>>,
    written: std::sync::atomic::AtomicBool,
}

impl HtmlReport {
    pub fn new(out_dir: &Path) -> HtmlReport {
        HtmlReport {
            out_dir: out_dir.to_owned(),
            events: Mutex::new(Vec::new()),
            written: Default::default(),
        }
    }

    fn write(&self, events: &[Stamped]) {
        self.written
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // A report is a convenience: failing to write it never fails the run.
        let _ = std::fs::write(
            self.out_dir.join(REPORT_FILE),
            render(events, &self.out_dir),
        );
    }
}

impl Drop for HtmlReport {
    fn drop(&mut self) {
        let events = std::mem::take(self.events.get_mut().unwrap_or_else(|e| e.into_inner()));
        if !self.written.load(std::sync::atomic::Ordering::SeqCst) && !events.is_empty() {
            self.write(&events);
        }
    }
}

impl Reporter for HtmlReport {
    fn report(&self, event: &Stamped) {
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        // Console lines are in the serial logs: keep only who printed, not what.
        match &event.event {
            Event::Console { machine, .. } => events.push(Stamped {
                time: event.time,
                event: Event::Console {
                    machine: machine.clone(),
                    line: String::new(),
                },
            }),
            _ => events.push(event.clone()),
        }
        if matches!(event.event, Event::RunFinished { .. }) {
            self.write(&events);
        }
    }
}

/// A block of the nested log, with what happened inside it.
#[derive(Debug, Default)]
pub(crate) struct Block {
    message: String,
    machine: Option<String>,
    subtest: bool,
    start: f64,
    end: Option<f64>,
    error: Option<String>,
    children: Vec<Item>,
}

#[derive(Debug)]
pub(crate) enum Item {
    Block(Block),
    Log {
        time: f64,
        level: Level,
        machine: Option<String>,
        message: String,
    },
}

/// What the page shows, gathered from the events.
#[derive(Debug, Default)]
pub(crate) struct Run {
    test: String,
    file: String,
    start: f64,
    end: f64,
    passed: Option<bool>,
    summary: String,
    failure: Option<(String, String, String)>,
    top: Vec<Item>,
    machines: Vec<String>,
}

fn secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

pub(crate) fn collect(events: &[Stamped]) -> Run {
    let mut run = Run::default();
    let mut open: Vec<Block> = Vec::new();
    let seen = |run: &mut Run, m: &Option<String>| {
        if let Some(m) = m {
            if !run.machines.contains(m) {
                run.machines.push(m.clone());
            }
        }
    };
    for stamped in events {
        let time = secs(stamped.time);
        if run.start == 0.0 {
            run.start = time;
        }
        run.end = run.end.max(time);
        match &stamped.event {
            Event::RunStarted { test, file } => {
                run.test = test.clone();
                run.file = file.clone();
            }
            Event::BlockBegin {
                kind,
                message,
                machine,
                ..
            } => {
                seen(&mut run, machine);
                open.push(Block {
                    message: message.clone(),
                    machine: machine.clone(),
                    subtest: *kind == BlockKind::Subtest,
                    start: time,
                    ..Block::default()
                });
            }
            Event::BlockEnd { error, .. } => {
                if let Some(mut block) = open.pop() {
                    block.end = Some(time);
                    block.error = error.clone();
                    push(&mut open, &mut run.top, Item::Block(block));
                }
            }
            Event::Log {
                level,
                message,
                machine,
                ..
            } => {
                seen(&mut run, machine);
                let item = Item::Log {
                    time,
                    level: *level,
                    machine: machine.clone(),
                    message: message.clone(),
                };
                push(&mut open, &mut run.top, item);
            }
            Event::Info { message } => {
                let item = Item::Log {
                    time,
                    level: Level::Info,
                    machine: None,
                    message: message.clone(),
                };
                push(&mut open, &mut run.top, item);
            }
            Event::Console { machine, .. } => seen(&mut run, &Some(machine.clone())),
            Event::ScriptFailed {
                exc_type,
                message,
                line,
                file,
                traceback,
            } => {
                let place = crate::events::script_place(file, *line);
                run.failure = Some((place, format!("{exc_type}: {message}"), traceback.clone()));
            }
            Event::RunFinished {
                passed, summary, ..
            } => {
                run.passed = Some(*passed);
                run.summary = summary.clone();
            }
        }
    }
    // Blocks still open when the run ended (a killed run) end with it.
    while let Some(mut block) = open.pop() {
        block.end = Some(run.end);
        push(&mut open, &mut run.top, Item::Block(block));
    }
    run
}

fn push(open: &mut [Block], top: &mut Vec<Item>, item: Item) {
    match open.last_mut() {
        Some(parent) => parent.children.push(item),
        None => top.push(item),
    }
}
