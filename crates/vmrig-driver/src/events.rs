//! The driver's event stream. The driver never prints: it emits [`Event`]s, and reporters
//! (the terminal, the JSON-lines log, JUnit) consume them.

use std::time::{Duration, SystemTime};

use serde::Serialize;

/// A log level, as the script's `log.info/warning/error` uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Debug,
    Info,
    Warning,
    Error,
}

/// Kinds of nested block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    Subtest,
    Nested,
}

/// One thing that happened during a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    RunStarted {
        test: String,
        file: String,
    },
    Info {
        message: String,
    },
    BlockBegin {
        id: u64,
        depth: usize,
        kind: BlockKind,
        message: String,
        machine: Option<String>,
    },
    BlockEnd {
        id: u64,
        depth: usize,
        kind: BlockKind,
        message: String,
        #[serde(with = "secs")]
        elapsed: Duration,
        error: Option<String>,
    },
    Log {
        level: Level,
        message: String,
        machine: Option<String>,
        depth: usize,
    },
    Console {
        machine: String,
        line: String,
    },
    ScriptFailed {
        exc_type: String,
        message: String,
        line: Option<usize>,
        file: String,
        traceback: String,
    },
    RunFinished {
        passed: bool,
        #[serde(with = "secs")]
        elapsed: Duration,
        summary: String,
    },
}

/// Where a script failed, as reports show it: `file:line`, or the file alone.
pub fn script_place(file: &str, line: Option<usize>) -> String {
    match line {
        Some(line) => format!("{file}:{line}"),
        None => file.to_owned(),
    }
}

/// An event with the time it happened.
#[derive(Debug, Clone, Serialize)]
pub struct Stamped {
    #[serde(with = "unix_secs")]
    pub time: SystemTime,
    #[serde(flatten)]
    pub event: Event,
}

/// A consumer of events. Reporters must be cheap and never fail the run.
pub trait Reporter: Send + Sync {
    fn report(&self, event: &Stamped);
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
    }
}

mod unix_secs {
    pub fn serialize<S: serde::Serializer>(
        t: &std::time::SystemTime,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
    }
}
