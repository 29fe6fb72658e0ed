//! The guest command channel: the NixOS backdoor protocol over the virtio console.
//!
//! The guest runs a root bash reading commands from `/dev/hvc0` and announces itself with
//! [`BANNER`]. NixOS sends two lines per command (`bash -c '<cmd>' | (base64 -w 0; echo)`
//! then `echo ${PIPESTATUS[0]}`), two round trips and three guest processes. We send one
//! line whose reply carries output and exit status together:
//!
//! ```text
//! ( eval '<cmd>' ) </dev/null | base64 -w 0; echo " ${PIPESTATUS[0]}"
//! -> "<base64 of stdout> <status>\n"
//! ```
//!
//! The subshell is a fork of the already running bash (no exec), and base64 is the only
//! program started per command; the guest needs only bash and coreutils, so real NixOS
//! guests work too. Stdin is `/dev/null` so a command that reads stdin cannot swallow the
//! driver's next commands. Every read is bounded by a deadline and the reply size.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use base64::Engine;

/// The line the guest prints when its shell is ready.
pub const BANNER: &str = "Spawning backdoor root shell...";

/// The largest command output accepted (decoded); a larger reply is an error, not an OOM.
pub const MAX_OUTPUT: usize = 256 * 1024 * 1024;

/// A byte stream whose reads can be bounded in time.
pub trait TimedStream: Read + Write {
    fn set_read_deadline(&mut self, timeout: Option<Duration>) -> io::Result<()>;
}

impl TimedStream for UnixStream {
    fn set_read_deadline(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        // A zero timeout means "block forever" to the OS: never pass it.
        self.set_read_timeout(timeout.map(|t| t.max(Duration::from_millis(1))))
    }
}

/// What a command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    pub status: i32,
    pub stdout: Vec<u8>,
}

impl CommandOutput {
    /// Stdout as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    #[error("no reply within {0:.0?}")]
    Timeout(Duration),
    #[error("the guest closed its shell (console hvc0)")]
    Closed,
    #[error("garbled reply from the guest shell: {0:?}")]
    Protocol(String),
    #[error("command output is larger than {} MiB", MAX_OUTPUT / 1024 / 1024)]
    TooLarge,
    #[error("the shell is unusable: an earlier command ({0}) did not finish in time and is still running")]
    Busy(String),
    #[error("commands cannot contain NUL bytes")]
    NulInCommand,
    #[error("i/o on the guest shell: {0}")]
    Io(#[from] io::Error),
}

/// The line sent to the guest for `command`.
pub fn frame(command: &str) -> Result<String, ShellError> {
    if command.contains('\0') {
        return Err(ShellError::NulInCommand);
    }
    Ok(format!(
        "( eval {} ) </dev/null | base64 -w 0; echo \" ${{PIPESTATUS[0]}}\"\n",
        shell_quote(command)
    ))
}

/// Single-quotes `s` for bash.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Parses one reply line (without its newline): `<base64> <status>`.
pub fn parse_reply(line: &[u8]) -> Result<CommandOutput, ShellError> {
    let garbled = || ShellError::Protocol(excerpt(line));
    let space = line.iter().rposition(|&b| b == b' ').ok_or_else(garbled)?;
    let status = std::str::from_utf8(&line[space + 1..])
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .ok_or_else(garbled)?;
    let stdout = base64::engine::general_purpose::STANDARD
        .decode(&line[..space])
        .map_err(|_| garbled())?;
    Ok(CommandOutput { status, stdout })
}

fn closed_or_io(e: io::Error) -> ShellError {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => ShellError::Closed,
        _ => ShellError::Io(e),
    }
}

fn excerpt(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
    if bytes.len() > 200 {
        format!("{s}...")
    } else {
        s
    }
}

/// The host end of a guest's backdoor shell.
pub struct Shell<S: TimedStream> {
    stream: S,
    /// Bytes read past the last complete line.
    pending: Vec<u8>,
    busy: Option<String>,
}

impl<S: TimedStream> Shell<S> {
    pub fn new(stream: S) -> Self {
        Shell {
            stream,
            pending: Vec::new(),
            busy: None,
        }
    }

    /// Reads until the banner line; anything before it is discarded.
    pub fn wait_for_banner(&mut self, deadline: Instant) -> Result<(), ShellError> {
        loop {
            let line = self.read_line(deadline, 64 * 1024)?;
            if String::from_utf8_lossy(&line).trim_end().ends_with(BANNER) {
                return Ok(());
            }
        }
    }

    /// Runs `command`; waits for its reply until `deadline` (None: no bound — callers pass one).
    pub fn run(
        &mut self,
        command: &str,
        deadline: Option<Instant>,
    ) -> Result<CommandOutput, ShellError> {
        let line = frame(command)?;
        if let Some(earlier) = self.busy.clone() {
            // The reply of a command that outlived its deadline may have arrived since:
            // then the shell is free again. Otherwise it is still running.
            let wait = deadline
                .unwrap_or_else(Instant::now)
                .min(Instant::now() + Duration::from_millis(50));
            match self.read_line(wait, MAX_OUTPUT / 3 * 4 + 64) {
                Ok(_) => self.busy = None,
                Err(ShellError::Timeout(_)) => return Err(ShellError::Busy(earlier)),
                Err(e) => return Err(e),
            }
        }
        self.stream
            .write_all(line.as_bytes())
            .map_err(closed_or_io)?;
        self.stream.flush().map_err(closed_or_io)?;
        let deadline =
            deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600));
        match self.read_line(deadline, MAX_OUTPUT / 3 * 4 + 64) {
            Ok(reply) => parse_reply(&reply),
            Err(e) => {
                if matches!(e, ShellError::Timeout(_)) {
                    self.busy = Some(command.chars().take(80).collect());
                }
                Err(e)
            }
        }
    }

    /// Writes raw bytes to the guest shell (NixOS's `send_console`-like escapes go
    /// elsewhere; this is for the interactive shell).
    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    fn read_line(&mut self, deadline: Instant, limit: usize) -> Result<Vec<u8>, ShellError> {
        let start = Instant::now();
        let mut scanned = 0;
        loop {
            if let Some(pos) = self.pending[scanned..].iter().position(|&b| b == b'\n') {
                let end = scanned + pos;
                let mut line: Vec<u8> = self.pending.drain(..=end).collect();
                line.pop();
                return Ok(line);
            }
            scanned = self.pending.len();
            if self.pending.len() > limit {
                self.busy = Some("a reply that was too large".into());
                return Err(ShellError::TooLarge);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ShellError::Timeout(now - start));
            }
            self.stream.set_read_deadline(Some(deadline - now))?;
            let mut buf = [0u8; 64 * 1024];
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(ShellError::Closed),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frame_quotes_and_asks_for_status_in_the_same_reply() {
        assert_eq!(
            frame("echo 'hi'").unwrap(),
            "( eval 'echo '\\''hi'\\''' ) </dev/null | base64 -w 0; echo \" ${PIPESTATUS[0]}\"\n"
        );
        assert!(matches!(frame("a\0b"), Err(ShellError::NulInCommand)));
    }

    #[test]
    fn replies_parse() {
        assert_eq!(
            parse_reply(b"aGkK 0").unwrap(),
            CommandOutput {
                status: 0,
                stdout: b"hi\n".to_vec()
            }
        );
        assert_eq!(
            parse_reply(b" 3").unwrap(),
            CommandOutput {
                status: 3,
                stdout: vec![]
            }
        );
        assert!(matches!(
            parse_reply(b"garbage"),
            Err(ShellError::Protocol(_))
        ));
        assert!(matches!(
            parse_reply(b"!!!! 0"),
            Err(ShellError::Protocol(_))
        ));
    }

    proptest! {
        #[test]
        fn any_output_round_trips(data in proptest::collection::vec(any::<u8>(), 0..4000), status in 0i32..256) {
            let line = format!("{} {status}", base64::engine::general_purpose::STANDARD.encode(&data));
            let out = parse_reply(line.as_bytes()).unwrap();
            prop_assert_eq!(out.stdout, data);
            prop_assert_eq!(out.status, status);
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_reply(&data);
        }
    }
}
