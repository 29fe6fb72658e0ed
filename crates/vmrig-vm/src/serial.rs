//! The serial console: a reader thread splits QEMU's stdout into lines, appends them to
//! the machine's log file, hands them to a sink (the terminal log) and keeps them for
//! `get_console_log` and `wait_for_console_text`.
//!
//! Guest-controlled bytes: lines are bounded in length and the kept history in total size,
//! invalid UTF-8 is replaced, and a closed stream wakes every waiter.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// A line longer than this is cut into pieces (a guest printing without newlines must not
/// grow memory without bound).
pub const MAX_LINE: usize = 16 * 1024;
/// History kept in memory; older lines are dropped (the log file keeps everything).
pub const MAX_HISTORY_BYTES: usize = 32 * 1024 * 1024;

/// Splits a byte stream into lines: `\n` ends a line, a trailing `\r` is dropped, invalid
/// UTF-8 is replaced and over-long lines are cut into pieces of [`MAX_LINE`] bytes (a line of
/// exactly `MAX_LINE` bytes is one line).
#[derive(Debug, Default)]
pub struct LineSplitter {
    partial: Vec<u8>,
    /// The last line was emitted because it reached [`MAX_LINE`]: a `\n` right after it
    /// ends that line rather than an empty one.
    cut: bool,
}

impl LineSplitter {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                if !std::mem::take(&mut self.cut) {
                    lines.push(self.take());
                }
            } else {
                self.cut = false;
                self.partial.push(b);
                if self.partial.len() >= MAX_LINE {
                    lines.push(self.take());
                    self.cut = true;
                }
            }
        }
        lines
    }

    /// The unterminated rest, at end of stream.
    pub fn finish(&mut self) -> Option<String> {
        (!self.partial.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> String {
        let mut line = std::mem::take(&mut self.partial);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        String::from_utf8_lossy(&line).into_owned()
    }
}

#[derive(Debug, Default)]
struct History {
    lines: VecDeque<String>,
    /// Index of `lines[0]` in the stream since boot.
    first: usize,
    bytes: usize,
    closed: bool,
}

/// The console of one machine, shared between its reader thread and the driver.
#[derive(Debug, Default)]
pub struct Console {
    history: Mutex<History>,
    changed: Condvar,
}

/// Receives each console line as it arrives (e.g. to print it prefixed with the machine name).
pub type LineSink = Arc<dyn Fn(&str) + Send + Sync>;

impl Console {
    pub fn new() -> Arc<Console> {
        Arc::new(Console::default())
    }

    /// Starts a thread reading `stream` to its end.
    pub fn spawn_reader(
        self: &Arc<Self>,
        name: &str,
        mut stream: impl Read + Send + 'static,
        mut log: Option<std::fs::File>,
        sink: LineSink,
    ) -> std::thread::JoinHandle<()> {
        let console = Arc::clone(self);
        std::thread::Builder::new()
            .name(format!("serial-{name}"))
            .spawn(move || {
                let mut splitter = LineSplitter::default();
                let mut buf = [0u8; 8192];
                loop {
                    let n = match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if let Some(log) = log.as_mut() {
                        let _ = log.write_all(&buf[..n]);
                    }
                    for line in splitter.push(&buf[..n]) {
                        sink(&line);
                        console.push(line);
                    }
                }
                if let Some(line) = splitter.finish() {
                    sink(&line);
                    console.push(line);
                }
                console.close();
            })
            .expect("failed to start a serial reader thread")
    }

    pub fn push(&self, line: String) {
        let mut h = self.history.lock().unwrap();
        h.bytes += line.len();
        h.lines.push_back(line);
        while h.bytes > MAX_HISTORY_BYTES {
            let Some(old) = h.lines.pop_front() else {
                break;
            };
            h.bytes -= old.len();
            h.first += 1;
        }
        drop(h);
        self.changed.notify_all();
    }

    /// Marks the end of the stream (QEMU exited).
    pub fn close(&self) {
        self.history.lock().unwrap().closed = true;
        self.changed.notify_all();
    }

    /// Forgets the lines so far: a new start of the machine (upstream's console log is per
    /// start). Indices go on, so a reader's position stays valid.
    pub fn clear(&self) {
        let mut h = self.history.lock().unwrap();
        h.first += h.lines.len();
        h.lines.clear();
        h.bytes = 0;
    }

    /// Reopens after a restart of the machine.
    pub fn reopen(&self) {
        self.history.lock().unwrap().closed = false;
    }

    /// Index of the next line to arrive.
    pub fn end(&self) -> usize {
        let h = self.history.lock().unwrap();
        h.first + h.lines.len()
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let h = self.history.lock().unwrap();
        h.lines
            .iter()
            .skip(h.lines.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// All kept lines, joined with newlines.
    pub fn text(&self) -> String {
        let h = self.history.lock().unwrap();
        let mut s = String::with_capacity(h.bytes + h.lines.len());
        for line in &h.lines {
            s.push_str(line);
            s.push('\n');
        }
        s
    }

    /// Waits until a line at index >= `from` satisfies `matches`, up to `deadline`.
    /// Returns the index of the matching line; `Err(closed)` when the deadline passed
    /// (`closed == false`) or the stream ended first (`closed == true`).
    pub fn wait_for(
        &self,
        from: usize,
        deadline: Instant,
        mut matches: impl FnMut(&str) -> bool,
    ) -> Result<usize, bool> {
        let mut next = from;
        let mut h = self.history.lock().unwrap();
        loop {
            next = next.max(h.first);
            while next < h.first + h.lines.len() {
                if matches(&h.lines[next - h.first]) {
                    return Ok(next);
                }
                next += 1;
            }
            if h.closed {
                return Err(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(false);
            }
            h = self.changed.wait_timeout(h, deadline - now).unwrap().0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    #[test]
    fn clear_forgets_the_lines_and_keeps_the_indices() {
        let c = Console::new();
        c.push("boot one".into());
        c.push("MARK".into());
        assert_eq!(c.end(), 2);
        c.clear();
        assert_eq!(c.text(), "");
        assert_eq!(c.end(), 2);
        c.push("boot two".into());
        assert_eq!(c.text(), "boot two\n");
        assert_eq!(c.end(), 3);
    }

    #[test]
    fn splits_crlf_and_invalid_utf8() {
        let mut s = LineSplitter::default();
        assert_eq!(s.push(b"a\r\nb"), vec!["a"]);
        assert_eq!(s.push(b"\xff\n"), vec!["b\u{fffd}"]);
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn line_of_exactly_max_line_is_one_line() {
        // Found by the `serial_lines` fuzz target: MAX_LINE bytes and a newline gave the
        // line and then an empty one.
        let mut s = LineSplitter::default();
        let mut data = vec![b'x'; MAX_LINE];
        data.push(b'\n');
        assert_eq!(s.push(&data), vec!["x".repeat(MAX_LINE)]);
        assert_eq!(s.finish(), None);
        // Also when the newline arrives in a later read, and with CRLF across the cut.
        let mut data = vec![b'y'; MAX_LINE * 2 - 1];
        data.extend_from_slice(b"\r");
        assert_eq!(s.push(&data).len(), 2);
        assert_eq!(s.push(b"\n\nz\n"), vec!["", "z"]);
    }

    #[test]
    fn endless_line_is_cut() {
        let mut s = LineSplitter::default();
        let lines = s.push(&vec![b'x'; MAX_LINE * 3 + 5]);
        assert_eq!(lines.len(), 3);
        assert_eq!(s.finish().unwrap().len(), 5);
    }

    proptest! {
        #[test]
        fn chunking_does_not_change_lines(data in proptest::collection::vec(any::<u8>(), 0..2000), cut in 1usize..64) {
            let mut whole = LineSplitter::default();
            let mut expected = whole.push(&data);
            expected.extend(whole.finish());
            let mut chunked = LineSplitter::default();
            let mut got = Vec::new();
            for chunk in data.chunks(cut) {
                got.extend(chunked.push(chunk));
            }
            got.extend(chunked.finish());
            prop_assert_eq!(got, expected);
        }
    }

    #[test]
    fn reader_feeds_history_and_waiters() {
        let console = Console::new();
        let (mut tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let t = console.spawn_reader(
            "m",
            rx,
            None,
            Arc::new(move |l: &str| seen2.lock().unwrap().push(l.to_owned())),
        );
        tx.write_all(b"booting\nlogin: ").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        assert_eq!(
            console.wait_for(0, deadline, |l| l.contains("booting")),
            Ok(0)
        );
        tx.write_all(b"\nready\n").unwrap();
        assert_eq!(console.wait_for(1, deadline, |l| l == "ready"), Ok(2));
        drop(tx);
        t.join().unwrap();
        assert_eq!(console.wait_for(0, deadline, |l| l == "never"), Err(true));
        assert_eq!(console.text(), "booting\nlogin: \nready\n");
        assert_eq!(seen.lock().unwrap().len(), 3);
        assert_eq!(console.tail(1), vec!["ready"]);
    }

    #[test]
    fn wait_times_out_when_nothing_matches() {
        let console = Console::new();
        console.push("x".into());
        assert_eq!(
            console.wait_for(0, Instant::now() + Duration::from_millis(20), |l| l == "y"),
            Err(false)
        );
    }

    #[test]
    fn history_is_bounded() {
        let console = Console::new();
        let line = "y".repeat(1024 * 1024);
        for _ in 0..40 {
            console.push(line.clone());
        }
        assert!(console.tail(100).len() <= 32);
        assert_eq!(console.end(), 40);
    }
}
