//! Reporters: the terminal log (stderr) and the JSON-lines event log.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Mutex;

use crate::events::{Event, Level, Reporter, Stamped};

/// NixOS-style nested log on stderr; console lines dimmed on a terminal.
pub struct Terminal {
    color: bool,
    out: Mutex<Box<dyn Write + Send>>,
}

impl Terminal {
    pub fn stderr() -> Terminal {
        Terminal {
            color: std::io::stderr().is_terminal(),
            out: Mutex::new(Box::new(std::io::stderr())),
        }
    }

    /// For tests: render into any writer, without color.
    pub fn to_writer(out: Box<dyn Write + Send>) -> Terminal {
        Terminal {
            color: false,
            out: Mutex::new(out),
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

/// The text the terminal shows for `event` (no trailing newline), or None.
pub fn render(event: &Event, paint: &dyn Fn(&str, &str) -> String) -> Option<String> {
    let indent = |depth: usize| "  ".repeat(depth);
    let who = |m: &Option<String>| m.as_ref().map(|m| format!("{m}: ")).unwrap_or_default();
    Some(match event {
        Event::RunStarted { test, file } => paint("1", &format!("vmrig: running {test} ({file})")),
        Event::Info { message } => format!("vmrig: {message}"),
        Event::BlockBegin {
            depth,
            message,
            machine,
            kind,
            ..
        } => {
            let label = match kind {
                crate::events::BlockKind::Subtest => paint("1", &format!("subtest: {message}")),
                crate::events::BlockKind::Nested => message.clone(),
            };
            format!("{}{}{label}", indent(*depth), who(machine))
        }
        Event::BlockEnd {
            depth,
            message,
            elapsed,
            error,
            ..
        } => match error {
            None => format!(
                "{}(finished: {message}, in {:.2} seconds)",
                indent(*depth),
                elapsed.as_secs_f64()
            ),
            Some(_) => paint(
                "31",
                &format!(
                    "{}(failed: {message}, after {:.2} seconds)",
                    indent(*depth),
                    elapsed.as_secs_f64()
                ),
            ),
        },
        Event::Log {
            level,
            message,
            machine,
            depth,
        } => {
            let text = format!("{}{}{message}", indent(*depth), who(machine));
            match level {
                Level::Warning => paint("33", &text),
                Level::Error => paint("31", &text),
                _ => text,
            }
        }
        Event::Console { machine, line } => paint("2", &format!("{machine} # {line}")),
        Event::ScriptFailed {
            exc_type,
            message,
            traceback,
            ..
        } => {
            let mut s = String::new();
            if !traceback.trim().is_empty() {
                s.push_str(traceback.trim_end());
                s.push('\n');
            }
            s.push_str(&paint("31;1", &format!("{exc_type}: {message}")));
            s
        }
        Event::RunFinished {
            passed, summary, ..
        } => {
            if *passed {
                paint("32;1", summary)
            } else {
                paint("31;1", summary)
            }
        }
    })
}

impl Reporter for Terminal {
    fn report(&self, event: &Stamped) {
        let paint = |code: &str, text: &str| self.paint(code, text);
        if let Some(text) = render(&event.event, &paint) {
            let mut out = self.out.lock().unwrap();
            let _ = writeln!(out, "{text}");
        }
    }
}

/// One JSON object per event, for tools (`events.jsonl` in the output directory).
pub struct JsonLines {
    out: Mutex<std::io::BufWriter<std::fs::File>>,
}

impl JsonLines {
    pub fn create(path: &Path) -> std::io::Result<JsonLines> {
        Ok(JsonLines {
            out: Mutex::new(std::io::BufWriter::new(std::fs::File::create(path)?)),
        })
    }
}

impl Reporter for JsonLines {
    fn report(&self, event: &Stamped) {
        if let Ok(line) = serde_json::to_string(event) {
            let mut out = self.out.lock().unwrap();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::BlockKind;
    use std::time::Duration;

    fn plain(e: &Event) -> String {
        render(e, &|_, t| t.to_owned()).unwrap()
    }

    #[test]
    fn golden_lines() {
        assert_eq!(
            plain(&Event::BlockBegin {
                id: 1,
                depth: 1,
                kind: BlockKind::Nested,
                message: "must succeed: true".into(),
                machine: Some("server".into())
            }),
            "  server: must succeed: true"
        );
        assert_eq!(
            plain(&Event::BlockEnd {
                id: 1,
                depth: 1,
                kind: BlockKind::Nested,
                message: "must succeed: true".into(),
                elapsed: Duration::from_millis(1234),
                error: None
            }),
            "  (finished: must succeed: true, in 1.23 seconds)"
        );
        assert_eq!(
            plain(&Event::Console {
                machine: "m".into(),
                line: "boot".into()
            }),
            "m # boot"
        );
        assert_eq!(
            plain(&Event::ScriptFailed {
                exc_type: "RequestedAssertionFailed".into(),
                message: "boom".into(),
                line: Some(3),
                file: "t.toml".into(),
                traceback: "Traceback:\n  x\n".into()
            }),
            "Traceback:\n  x\nRequestedAssertionFailed: boom"
        );
    }

    #[test]
    fn json_lines_are_tagged_objects() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let r = JsonLines::create(&path).unwrap();
        r.report(&Stamped {
            time: std::time::SystemTime::now(),
            event: Event::Info {
                message: "hi".into(),
            },
        });
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["event"], "info");
        assert_eq!(v["message"], "hi");
        assert!(v["time"].as_f64().unwrap() > 1.6e9);
    }
}
