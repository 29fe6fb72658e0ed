//! Nested, timed log blocks, as the NixOS driver has them, emitted as events.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::events::{BlockKind, Event, Level, Reporter, Stamped};

#[derive(Debug)]
struct OpenBlock {
    id: u64,
    kind: BlockKind,
    message: String,
    started: Instant,
}

#[derive(Default)]
struct State {
    stack: Vec<OpenBlock>,
    next_id: u64,
}

/// Fans events out to every reporter and keeps the block nesting.
#[derive(Clone)]
pub struct Logger {
    reporters: Arc<Vec<Box<dyn Reporter>>>,
    state: Arc<Mutex<State>>,
}

impl Logger {
    pub fn new(reporters: Vec<Box<dyn Reporter>>) -> Logger {
        Logger {
            reporters: Arc::new(reporters),
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    pub fn emit(&self, event: Event) {
        let stamped = Stamped {
            time: SystemTime::now(),
            event,
        };
        for r in self.reporters.iter() {
            r.report(&stamped);
        }
    }

    fn depth(&self) -> usize {
        self.state.lock().unwrap().stack.len()
    }

    pub fn info(&self, message: impl Into<String>) {
        self.log(Level::Info, message, None);
    }

    pub fn log(&self, level: Level, message: impl Into<String>, machine: Option<&str>) {
        let depth = self.depth();
        self.emit(Event::Log {
            level,
            message: message.into(),
            machine: machine.map(str::to_owned),
            depth,
        });
    }

    pub fn console(&self, machine: &str, line: &str) {
        self.emit(Event::Console {
            machine: machine.to_owned(),
            line: line.to_owned(),
        });
    }

    /// Opens a block; returns its id for [`Logger::end`].
    pub fn begin(&self, kind: BlockKind, message: impl Into<String>, machine: Option<&str>) -> u64 {
        let message = message.into();
        let (id, depth) = {
            let mut s = self.state.lock().unwrap();
            s.next_id += 1;
            let id = s.next_id;
            let depth = s.stack.len();
            s.stack.push(OpenBlock {
                id,
                kind,
                message: message.clone(),
                started: Instant::now(),
            });
            (id, depth)
        };
        self.emit(Event::BlockBegin {
            id,
            depth,
            kind,
            message,
            machine: machine.map(str::to_owned),
        });
        id
    }

    /// Closes block `id` (and any still open inside it).
    pub fn end(&self, id: u64, error: Option<String>) -> Option<Duration> {
        let closed = {
            let mut s = self.state.lock().unwrap();
            let pos = s.stack.iter().position(|b| b.id == id)?;
            let closed: Vec<OpenBlock> = s.stack.drain(pos..).collect();
            closed
                .into_iter()
                .enumerate()
                .rev()
                .map(|(i, b)| (pos + i, b))
                .collect::<Vec<_>>()
        };
        let mut elapsed = None;
        for (depth, block) in closed {
            let e = block.started.elapsed();
            let err = if block.id == id { error.clone() } else { None };
            if block.id == id {
                elapsed = Some(e);
            }
            self.emit(Event::BlockEnd {
                id: block.id,
                depth,
                kind: block.kind,
                message: block.message,
                elapsed: e,
                error: err,
            });
        }
        elapsed
    }

    /// Runs `f` inside a nested block; an `Err` closes the block with its message.
    pub fn nested<T, E: std::fmt::Display>(
        &self,
        message: impl Into<String>,
        machine: Option<&str>,
        f: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let id = self.begin(BlockKind::Nested, message, machine);
        let result = f();
        self.end(id, result.as_ref().err().map(|e| e.to_string()));
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default, Clone)]
    struct Collect(Arc<Mutex<Vec<Event>>>);
    impl Reporter for Collect {
        fn report(&self, e: &Stamped) {
            self.0.lock().unwrap().push(e.event.clone());
        }
    }

    #[test]
    fn blocks_nest_and_close_inner_ones_with_the_outer() {
        let c = Collect::default();
        let log = Logger::new(vec![Box::new(c.clone())]);
        let outer = log.begin(BlockKind::Subtest, "outer", None);
        let _inner = log.begin(BlockKind::Nested, "inner", Some("m"));
        log.info("hello");
        log.end(outer, Some("boom".into()));
        let events = c.0.lock().unwrap();
        assert!(
            matches!(&events[1], Event::BlockBegin { depth: 1, message, .. } if message == "inner")
        );
        assert!(matches!(&events[2], Event::Log { depth: 2, .. }));
        assert!(matches!(
            &events[3],
            Event::BlockEnd {
                depth: 1,
                error: None,
                ..
            }
        ));
        assert!(
            matches!(&events[4], Event::BlockEnd { depth: 0, error: Some(e), .. } if e == "boom")
        );
    }

    #[test]
    fn nested_reports_errors() {
        let c = Collect::default();
        let log = Logger::new(vec![Box::new(c.clone())]);
        let r: Result<(), String> = log.nested("step", None, || Err("bad".into()));
        assert!(r.is_err());
        let events = c.0.lock().unwrap();
        assert!(matches!(&events[1], Event::BlockEnd { error: Some(e), .. } if e == "bad"));
    }
}
