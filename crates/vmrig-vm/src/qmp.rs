//! A small, synchronous QMP (QEMU Machine Protocol) client.
//!
//! The client is generic over its transport ([`TimeoutStream`]): a
//! [`UnixStream`] in production, one end of [`UnixStream::pair`] in tests.
//! Every read is bounded by a deadline, replies are matched to commands by
//! `id`, and asynchronous events that arrive while waiting for a reply are
//! queued so that [`Qmp::next_event`] can return them later, in order.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// Longest accepted QMP message line (excluding the newline): 16 MiB.
#[cfg(not(fuzzing))]
pub const MAX_LINE_LEN: usize = 16 * 1024 * 1024;
/// In fuzz builds (cargo-fuzz's `--cfg fuzzing`) 64 KiB, so that the fuzzer reaches the bound
/// without feeding 16 MiB per input (the same code, a smaller number).
#[cfg(fuzzing)]
pub const MAX_LINE_LEN: usize = 64 * 1024;

/// Timeout used by the convenience helpers (`query_status`, `screendump`, ...).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How many bytes of an offending line are kept in a protocol error.
const EXCERPT_LEN: usize = 200;

/// A byte stream whose reads (and writes) can be bounded in time.
///
/// `set_read_timeout(None)` means "block forever"; the client never passes
/// `Some(Duration::ZERO)`.
pub trait TimeoutStream: Read + Write {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
}

impl TimeoutStream for UnixStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }
}

impl TimeoutStream for TcpStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }
}

/// Errors from the QMP client. Display strings are lowercase fragments.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("qmp i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("qmp timed out after {waited:?} waiting for {waiting_for}")]
    Timeout {
        waited: Duration,
        waiting_for: String,
    },
    #[error("qmp connection closed by peer")]
    Closed,
    #[error("qmp protocol error: {msg}: {excerpt:?}")]
    Protocol { msg: String, excerpt: String },
    #[error("qmp message line longer than {limit} bytes")]
    LineTooLong { limit: usize },
    #[error("qmp command {command:?} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("qmp invalid argument: {0}")]
    InvalidArgument(String),
}

impl QmpError {
    /// True for [`QmpError::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, QmpError::Timeout { .. })
    }
}

/// An asynchronous QMP event, e.g. `SHUTDOWN`, `STOP`, `RESUME`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    /// The `data` member, `Value::Null` when absent.
    pub data: Value,
    /// `(seconds, microseconds)` from the event's `timestamp`; `(0, 0)` when absent.
    pub timestamp: (u64, u64),
}

/// A connected QMP session (capabilities already negotiated).
pub struct Qmp<S: TimeoutStream> {
    stream: S,
    /// Bytes read; `buf[start..]` is not consumed yet. Consumed lines are cut off the front
    /// only when no complete line is left (not once per line: a read full of short lines
    /// would move the rest of the buffer once per line, quadratic in the read size).
    buf: Vec<u8>,
    /// Offset in `buf` of the first byte not yet consumed.
    start: usize,
    /// Offset in `buf` up to which we already know there is no newline (`>= start`).
    scanned: usize,
    /// After an oversized line, drop bytes until the next newline.
    discarding: bool,
    eof: bool,
    events: VecDeque<Event>,
    next_id: u64,
    greeting: Value,
    default_timeout: Duration,
}

impl<S: TimeoutStream> std::fmt::Debug for Qmp<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("queued_events", &self.events.len())
            .field("next_id", &self.next_id)
            .field("eof", &self.eof)
            .finish_non_exhaustive()
    }
}

impl Qmp<UnixStream> {
    /// Connect to a QMP unix socket and handshake, all within `timeout`.
    ///
    /// Retries while the socket does not exist yet or refuses connections
    /// (QEMU still starting), so it can be called right after spawning QEMU
    /// with `-qmp unix:PATH,server=on,wait=off`.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, QmpError> {
        let path = path.as_ref();
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return Err(QmpError::Timeout {
                            waited: timeout,
                            waiting_for: format!("qmp socket {}", path.display()),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        Qmp::handshake(stream, remaining.max(Duration::from_millis(1)))
    }
}

impl<S: TimeoutStream> Qmp<S> {
    /// Read the greeting (`{"QMP": {...}}`), send `qmp_capabilities` and await
    /// its `{"return": {}}`, all within `timeout`.
    pub fn handshake(stream: S, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let mut qmp = Qmp {
            stream,
            buf: Vec::with_capacity(4096),
            start: 0,
            scanned: 0,
            discarding: false,
            eof: false,
            events: VecDeque::new(),
            next_id: 1,
            greeting: Value::Null,
            default_timeout: DEFAULT_TIMEOUT,
        };
        let (line, msg) = qmp.read_message(deadline, timeout, "qmp greeting")?;
        match msg.get("QMP") {
            Some(g) if g.is_object() => qmp.greeting = g.clone(),
            _ => {
                return Err(QmpError::Protocol {
                    msg: "expected qmp greeting".into(),
                    excerpt: excerpt(&line),
                })
            }
        }
        qmp.execute_until("qmp_capabilities", None, deadline, timeout)?;
        Ok(qmp)
    }

    /// The `QMP` member of the greeting (`{"version": ..., "capabilities": ...}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// QEMU `(major, minor, micro)` from the greeting, if present.
    pub fn qemu_version(&self) -> Option<(u64, u64, u64)> {
        let v = self.greeting.get("version")?.get("qemu")?;
        Some((
            v.get("major")?.as_u64()?,
            v.get("minor")?.as_u64()?,
            v.get("micro")?.as_u64()?,
        ))
    }

    /// Give back the transport. Buffered bytes and queued events are lost.
    pub fn into_inner(self) -> S {
        self.stream
    }

    /// Number of events currently queued.
    pub fn queued_events(&self) -> usize {
        self.events.len()
    }

    /// Remove and return all queued events without reading the stream.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// Send a command and return the `return` member of its reply.
    ///
    /// Events received meanwhile are queued. Replies carrying another `id`
    /// (late replies to commands that previously timed out) are discarded.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let deadline = Instant::now() + timeout;
        self.execute_until(command, arguments, deadline, timeout)
    }

    fn execute_until(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = Map::new();
        req.insert("execute".into(), Value::String(command.into()));
        if let Some(args) = arguments {
            req.insert("arguments".into(), args);
        }
        req.insert("id".into(), Value::from(id));
        let mut bytes = serde_json::to_vec(&Value::Object(req))
            .map_err(|e| QmpError::InvalidArgument(e.to_string()))?;
        bytes.push(b'\n');
        self.write_bounded(&bytes, deadline)?;

        let waiting_for = format!("reply to {command:?}");
        loop {
            let (line, mut msg) = self.read_message(deadline, timeout, &waiting_for)?;
            if let Some(event) = parse_event(&msg, &line)? {
                self.events.push_back(event);
                continue;
            }
            let is_reply = msg.get("return").is_some() || msg.get("error").is_some();
            if !is_reply {
                return Err(QmpError::Protocol {
                    msg: "unexpected message".into(),
                    excerpt: excerpt(&line),
                });
            }
            match msg.get("id") {
                // No id: QEMU could not parse the request well enough to echo
                // it; with one outstanding command it is ours.
                None => {}
                Some(v) if v.as_u64() == Some(id) => {}
                Some(_) => continue, // stale reply to an earlier, timed-out command
            }
            if let Some(err) = msg.get("error") {
                let field = |k: &str| {
                    err.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string()
                };
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Ok(msg
                .as_object_mut()
                .and_then(|o| o.remove("return"))
                .unwrap_or(Value::Null));
        }
    }

    /// Pop the oldest queued event, or wait up to `timeout` for one.
    /// `Ok(None)` when none arrived in time.
    ///
    /// A reply that arrives here (late reply to a timed-out command) is dropped.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>, QmpError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(Some(e));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let (line, msg) = match self.read_message(deadline, timeout, "qmp event") {
                Ok(m) => m,
                Err(QmpError::Timeout { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            if let Some(event) = parse_event(&msg, &line)? {
                return Ok(Some(event));
            }
            if msg.get("return").is_some() || msg.get("error").is_some() {
                continue;
            }
            return Err(QmpError::Protocol {
                msg: "unexpected message".into(),
                excerpt: excerpt(&line),
            });
        }
    }

    /// Wait up to `timeout` for an event called `name`. Other events stay
    /// queued, in order. `Ok(None)` on timeout.
    pub fn wait_for_event(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> Result<Option<Event>, QmpError> {
        if let Some(pos) = self.events.iter().position(|e| e.name == name) {
            return Ok(self.events.remove(pos));
        }
        let deadline = Instant::now() + timeout;
        let mut skipped = Vec::new();
        let result = loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break Ok(None);
            }
            // Queued events are popped first; non-matching ones go to `skipped`
            // and are put back in order below.
            match self.next_event(remaining) {
                Ok(Some(e)) if e.name == name => break Ok(Some(e)),
                Ok(Some(e)) => skipped.push(e),
                Ok(None) => break Ok(None),
                Err(e) => break Err(e),
            }
        };
        for e in skipped.into_iter().rev() {
            self.events.push_front(e);
        }
        result
    }

    // ---- convenience helpers (use `default_timeout`) ----

    /// Run an HMP command via `human-monitor-command`, return its output.
    pub fn human_monitor_command(&mut self, cmd: &str) -> Result<String, QmpError> {
        let t = self.default_timeout;
        let ret = self.execute(
            "human-monitor-command",
            Some(json!({ "command-line": cmd })),
            t,
        )?;
        match ret {
            Value::String(s) => Ok(s),
            other => Err(QmpError::Protocol {
                msg: "human-monitor-command did not return a string".into(),
                excerpt: excerpt(other.to_string().as_bytes()),
            }),
        }
    }

    /// `screendump` to `path` (written by QEMU), as PNG or PPM.
    pub fn screendump(&mut self, path: &Path, format_png: bool) -> Result<(), QmpError> {
        let filename = path.to_str().ok_or_else(|| {
            QmpError::InvalidArgument(format!("non-utf-8 path {}", path.display()))
        })?;
        let format = if format_png { "png" } else { "ppm" };
        let t = self.default_timeout;
        self.execute(
            "screendump",
            Some(json!({ "filename": filename, "format": format })),
            t,
        )?;
        Ok(())
    }

    /// `send-key` with QEMU qcodes (`"ctrl"`, `"alt"`, `"a"`, `"ret"`, ...).
    /// A key written as `0x..` is sent as a raw scancode number.
    /// `hold_ms`: how long to hold the keys (QEMU default 100 ms when `None`).
    pub fn send_key(&mut self, keys: &[&str], hold_ms: Option<u64>) -> Result<(), QmpError> {
        if keys.is_empty() {
            return Err(QmpError::InvalidArgument("send_key: no keys".into()));
        }
        let keys: Vec<Value> = keys
            .iter()
            .map(
                |k| match k.strip_prefix("0x").map(|h| u64::from_str_radix(h, 16)) {
                    Some(Ok(n)) => json!({ "type": "number", "data": n }),
                    _ => json!({ "type": "qcode", "data": k }),
                },
            )
            .collect();
        let mut args = json!({ "keys": keys });
        if let Some(ms) = hold_ms {
            args["hold-time"] = Value::from(ms);
        }
        let t = self.default_timeout;
        self.execute("send-key", Some(args), t)?;
        Ok(())
    }

    /// `set_link`: bring a NIC (by its `id`/name) up or down.
    pub fn set_link(&mut self, name: &str, up: bool) -> Result<(), QmpError> {
        let t = self.default_timeout;
        self.execute("set_link", Some(json!({ "name": name, "up": up })), t)?;
        Ok(())
    }

    /// `quit`: QEMU exits. A connection closed before the reply counts as success.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        let t = self.default_timeout;
        match self.execute("quit", None, t) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(QmpError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// `query-status` -> the `status` string (`"running"`, `"paused"`, `"prelaunch"`, ...).
    pub fn query_status(&mut self) -> Result<String, QmpError> {
        let t = self.default_timeout;
        let ret = self.execute("query-status", None, t)?;
        ret.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| QmpError::Protocol {
                msg: "query-status reply has no status".into(),
                excerpt: excerpt(ret.to_string().as_bytes()),
            })
    }

    /// `stop`: pause the guest.
    pub fn stop(&mut self) -> Result<(), QmpError> {
        let t = self.default_timeout;
        self.execute("stop", None, t)?;
        Ok(())
    }

    /// `cont`: resume the guest (also starts a `-S` VM).
    pub fn cont(&mut self) -> Result<(), QmpError> {
        let t = self.default_timeout;
        self.execute("cont", None, t)?;
        Ok(())
    }

    // ---- transport ----

    fn write_bounded(&mut self, bytes: &[u8], deadline: Instant) -> Result<(), QmpError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.stream
            .set_write_timeout(Some(remaining.max(Duration::from_millis(1))))?;
        let res = self
            .stream
            .write_all(bytes)
            .and_then(|_| self.stream.flush());
        match res {
            Ok(()) => Ok(()),
            Err(e) if is_timeout_kind(e.kind()) => Err(QmpError::Timeout {
                waited: deadline.saturating_duration_since(Instant::now()),
                waiting_for: "qmp socket to accept a command".into(),
            }),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Err(QmpError::Closed),
            Err(e) => Err(e.into()),
        }
    }

    /// Read one non-empty line and parse it as a JSON object.
    fn read_message(
        &mut self,
        deadline: Instant,
        timeout: Duration,
        waiting_for: &str,
    ) -> Result<(Vec<u8>, Value), QmpError> {
        loop {
            let line = self.read_line(deadline, timeout, waiting_for)?;
            let trimmed = line.trim_ascii();
            if trimmed.is_empty() {
                continue;
            }
            let value: Value = serde_json::from_slice(trimmed).map_err(|e| QmpError::Protocol {
                msg: format!("invalid json ({e})"),
                excerpt: excerpt(trimmed),
            })?;
            if !value.is_object() {
                return Err(QmpError::Protocol {
                    msg: "message is not a json object".into(),
                    excerpt: excerpt(trimmed),
                });
            }
            return Ok((trimmed.to_vec(), value));
        }
    }

    /// Read one `\n`-terminated line (without the `\n`), bounded by `deadline`.
    fn read_line(
        &mut self,
        deadline: Instant,
        timeout: Duration,
        waiting_for: &str,
    ) -> Result<Vec<u8>, QmpError> {
        loop {
            // Complete line already buffered?
            if let Some(off) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + off;
                let line = self.start..end;
                self.start = end + 1;
                self.scanned = self.start;
                if self.discarding {
                    self.discarding = false;
                    continue;
                }
                if line.len() > MAX_LINE_LEN {
                    return Err(QmpError::LineTooLong {
                        limit: MAX_LINE_LEN,
                    });
                }
                return Ok(self.buf[line].to_vec());
            }
            // No complete line left: drop the consumed ones before reading more.
            self.buf.drain(..self.start);
            self.start = 0;
            self.scanned = self.buf.len();
            if self.discarding {
                self.buf.clear();
                self.scanned = 0;
            } else if self.buf.len() > MAX_LINE_LEN {
                // Resynchronise at the next newline if the caller goes on.
                self.buf.clear();
                self.scanned = 0;
                self.discarding = true;
                return Err(QmpError::LineTooLong {
                    limit: MAX_LINE_LEN,
                });
            }
            if self.eof {
                return Err(QmpError::Closed);
            }

            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(QmpError::Timeout {
                    waited: timeout,
                    waiting_for: waiting_for.to_string(),
                });
            }
            self.stream.set_read_timeout(Some(remaining))?;
            // Here rather than once per call: zeroing 64 KiB for every line returned from a
            // buffer full of short lines would cost more than reading them.
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.eof = true;
                    // Partial trailing data without newline is dropped.
                    return Err(QmpError::Closed);
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout_kind(e.kind()) => {
                    // Loop re-checks the deadline (spurious wakeups are fine).
                    if Instant::now() >= deadline {
                        return Err(QmpError::Timeout {
                            waited: timeout,
                            waiting_for: waiting_for.to_string(),
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    self.eof = true;
                    return Err(QmpError::Closed);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn is_timeout_kind(kind: io::ErrorKind) -> bool {
    matches!(kind, io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// `Some(event)` if `msg` is an event, `None` otherwise; error if malformed.
fn parse_event(msg: &Value, line: &[u8]) -> Result<Option<Event>, QmpError> {
    let Some(name) = msg.get("event") else {
        return Ok(None);
    };
    let Some(name) = name.as_str() else {
        return Err(QmpError::Protocol {
            msg: "event name is not a string".into(),
            excerpt: excerpt(line),
        });
    };
    let ts = msg.get("timestamp");
    let part = |k: &str| {
        ts.and_then(|t| t.get(k))
            .and_then(|v| v.as_u64().or_else(|| v.as_i64().map(|i| i.max(0) as u64)))
            .unwrap_or(0)
    };
    Ok(Some(Event {
        name: name.to_string(),
        data: msg.get("data").cloned().unwrap_or(Value::Null),
        timestamp: (part("seconds"), part("microseconds")),
    }))
}

fn excerpt(line: &[u8]) -> String {
    let s = String::from_utf8_lossy(&line[..line.len().min(EXCERPT_LEN)]).into_owned();
    if line.len() > EXCERPT_LEN {
        format!("{s}...")
    } else {
        s
    }
}
